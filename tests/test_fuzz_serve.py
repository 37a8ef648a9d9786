"""Property-based fuzzing of the Serve app over real HTTP on loopback (issue 13).

Schemathesis reads the running app's own /openapi.json and sends, for every operation, its
coverage cases (boundary values, missing and wrong-typed fields, unexpected methods), then
Hypothesis-generated valid and mutated requests; a few hundred hostile requests cover what the
schema cannot describe (garbage bytes, wrong content types, invalid UTF-8, deep nesting, huge
numbers, unknown paths and methods, missing or wrong tokens). Every answer must be below 500 and
come within REQUEST_TIMEOUT_S, and the app must still answer afterwards.

The app runs with auth on and small work budgets, so that the generated valid requests stay
cheap; its control jobs fail at once (their prompt set is missing), so POST /v1/controls is fuzzed
up to the job's start without training a control per request.
"""

from __future__ import annotations

import json
import random
import re
import socket
import time
from collections import Counter, defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field

import httpx
import pytest
import requests
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from trained_decoder import ALIAS, DECODER_MODEL, trained_decoder

from test_serve import AUTH, DIALOG, TOKEN, served_app

pytestmark = pytest.mark.slow

REQUEST_TIMEOUT_S = 60  # no answer (or no next bytes of one) for this long is a hang
MIN_REQUESTS = 2000
FUZZ_EXAMPLES = {"positive": 80, "negative": 250}  # Hypothesis examples per operation and mode
RANDOM_BODIES = 120
MAX_BODY_BYTES = 100_000
FUZZ_SETTINGS = settings(
    phases=[Phase.generate],  # every failure is collected, none shrunk: one run shows them all
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
# A valid body for every POST route of the schema, and its numeric fields
VALID = {
    "/v1/read": {"dialogs": [DIALOG], "questions": ["Who?"], "max_new_tokens": 2},
    "/v1/score": {"dialog": DIALOG, "question": "Who?", "candidates": ["A pirate."]},
    "/v1/layers": {"dialog": DIALOG, "question": "Who?", "layers": [0, 1], "max_new_tokens": 2},
    "/v1/chat/completions": {"model": "target", "messages": DIALOG, "max_tokens": 2},
    "/v1/controls": {"name": "fuzz", "qa": [["Who?", "A pirate."]], "steps": 1},
}
NUMBERS = {
    "/v1/read": ["max_new_tokens", "read_layer"],
    "/v1/score": ["read_layer"],
    "/v1/layers": ["max_new_tokens"],
    "/v1/chat/completions": ["max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "n"],
    "/v1/controls": ["steps", "lr"],
}
DECODER_NAMES = ["tiny", "local", f"{DECODER_MODEL}/1", f"{DECODER_MODEL}@{ALIAS}"]  # configured, registered
API_DOCS = ("/docs", "/redoc", "/openapi.json")  # outside the schema, behind the token like the API
CLIENT_ERROR = range(400, 500)
ACCEPTED = (200, 202, 429)  # 429: a control job is queued already


@dataclass
class Tally:
    """Every request the module sent, by route and status ("hung": no answer); a failure is a
    5xx, a hang, or a status outside what the request should get."""

    known: set[str]  # "METHOD /path/{param}" of the app's routes; the rest are counted together
    routes: defaultdict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    failures: list[str] = field(default_factory=list)
    slowest_s: float = 0.0

    def answered(self, route: str, status: int, elapsed_s: float, request: str, reply: str, expected=range(500)):
        self.routes[self._label(route)][status] += 1
        self.slowest_s = max(self.slowest_s, elapsed_s)
        if status not in expected:
            self.failures.append(f"{status} for {request[:600]}\n    answer: {reply[:400]}")

    def hung(self, route: str, request: str) -> None:
        self.routes[self._label(route)]["hung"] += 1
        self.failures.append(f"no answer within {REQUEST_TIMEOUT_S} s: {request[:600]}")

    def _label(self, route: str) -> str:
        for known in self.known:
            if re.fullmatch(re.sub(r"\\\{\w+\\\}", "[^/]+", re.escape(known)), route):
                return known
        return "other paths and methods"

    @property
    def statuses(self) -> Counter:
        return sum(self.routes.values(), Counter())

    @contextmanager
    def no_new_failures(self):
        before = len(self.failures)
        yield
        new = self.failures[before:]
        assert not new, f"{len(new)} bad answers:\n" + "\n".join(new[:20])


@pytest.fixture(scope="module")
def app(ray_cluster, tmp_path_factory):
    """One model replica over the session's trained decoder, auth on, small limits."""
    from latentqa_platform.serving import ServeSettings

    decoder = trained_decoder(tmp_path_factory.getbasetemp() / "trained-decoder")
    settings = ServeSettings(
        decoders={"tiny": decoder.registry_uri, "local": str(decoder.folder)},
        mlflow=decoder.mlflow_settings(),
        max_turn_tokens=32,
        max_dialog_tokens=256,
        max_generated_tokens=512,
        max_scored_tokens=2048,
        request_timeout_s=REQUEST_TIMEOUT_S / 2,  # a runaway request is a 503 here before the client gives up
        max_body_bytes=MAX_BODY_BYTES,
        max_queued_controls=1,
        steer_prompts=str(tmp_path_factory.mktemp("fuzz") / "no-prompts.json"),
    )
    with served_app(settings, "latentqa-fuzz") as url:
        yield url


@pytest.fixture(scope="module")
def operations(app) -> list:
    """The app's operations, from the schema it serves."""
    import schemathesis

    schema = schemathesis.openapi.from_url(f"{app}/openapi.json", headers=AUTH, timeout=30)
    return [result.ok() for result in schema.get_all_operations()]


@pytest.fixture(scope="module")
def get_paths(operations) -> dict[str, bool]:
    """Every GET path the app serves (a path parameter filled in), and whether it needs the token."""
    from serve.gateway import RequestGuard

    paths = [re.sub(r"\{\w+\}", "0", op.path) for op in operations if op.method.upper() == "GET"]
    return {path: path not in RequestGuard.OPEN_PATHS for path in [*paths, *API_DOCS, *RequestGuard.OPEN_PATHS]}


@pytest.fixture(scope="module")
def tally(operations) -> Tally:
    from serve.gateway import RequestGuard

    routes = {f"{op.method.upper()} {op.path}" for op in operations}
    return Tally(known=routes | {f"GET {path}" for path in [*API_DOCS, *RequestGuard.OPEN_PATHS]})


def _send_case(case, app: str, session: requests.Session, tally: Tally) -> None:
    route, request = f"{case.method.upper()} {case.operation.path}", case.as_curl_command(headers=AUTH, base_url=app)
    start = time.monotonic()
    try:
        response = case.call(base_url=app, session=session, headers=AUTH, timeout=REQUEST_TIMEOUT_S)
    except requests.Timeout:
        tally.hung(route, request)
        return
    tally.answered(route, response.status_code, time.monotonic() - start, request, response.text)


def _send(client: httpx.Client, tally: Tally, method: str, path: str, expected=CLIENT_ERROR, **kwargs):
    """The response (None: it hung), tallied."""
    route, request = f"{method} {path}", f"{method} {path} {kwargs!r}"
    start = time.monotonic()
    try:
        response = client.request(method, path, timeout=REQUEST_TIMEOUT_S, **kwargs)
    except httpx.TimeoutException:
        tally.hung(route, request)
        return None
    tally.answered(route, response.status_code, time.monotonic() - start, request, response.text, expected)
    return response


def _send_raw(app: str, tally: Tally, request: bytes, expected=CLIENT_ERROR) -> None:
    """Bytes no HTTP client would send, straight down a socket; the status line is read back."""
    host, port = app.removeprefix("http://").split(":")
    route = b" ".join(request.split(b" ", 2)[:2]).decode("latin-1")
    start = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=REQUEST_TIMEOUT_S) as sock:
        sock.sendall(request)
        try:
            reply = sock.recv(4096)
        except TimeoutError:
            tally.hung(route, repr(request))
            return
    status = int(reply.split(b" ", 2)[1]) if reply.startswith(b"HTTP/1.1 ") else 0  # 0: closed without an answer
    tally.answered(route, status, time.monotonic() - start, repr(request), reply.decode(errors="replace"), expected)


# ---------------------------------------------------------------- from the app's own schema


def test_the_schema_names_every_route(operations):
    """Every operation of the schema is fuzzed below; the hostile bodies need a valid one per POST route."""
    routes = {(op.method.upper(), op.path) for op in operations}
    assert {
        ("GET", "/healthz"),
        ("GET", "/v1/decoders"),
        ("GET", "/v1/models"),
        ("GET", "/v1/controls/{job_id}"),
    } <= routes
    assert {path for method, path in routes if method == "POST"} == set(VALID), "VALID needs a body for each POST route"


def test_coverage_cases_of_every_operation(operations, app, tally):
    """Schemathesis' deterministic cases: each field at its bounds and just past them, missing,
    null or of the wrong type, and every operation under methods it does not have."""
    from schemathesis import GenerationMode

    with requests.Session() as session, tally.no_new_failures():
        for op in operations:
            config = op.schema.config.generation_for(operation=op)
            for case in op.schema.iter_coverage_cases(
                op, generation_modes=list(GenerationMode), generation_config=config
            ):
                _send_case(case, app, session, tally)


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_generated_requests_to_every_operation(operations, app, tally, mode):
    """Hypothesis draws valid (positive) or schema-violating (negative) requests per operation.
    Half the valid ones name the target and a served decoder where they name a model or a
    decoder: a generated name is almost never one the app serves, and the request would end at
    404 before the model."""
    from schemathesis import GenerationMode

    with requests.Session() as session, tally.no_new_failures():
        for op in operations:
            cases = op.as_strategy(generation_mode=GenerationMode(mode))
            if mode == "positive":
                cases = cases | st.builds(_with_served_names, cases, st.sampled_from(DECODER_NAMES))

            @settings(FUZZ_SETTINGS, max_examples=FUZZ_EXAMPLES[mode])
            @given(case=cases)
            def send(case):
                _send_case(case, app, session, tally)

            try:
                send()
            except Unsatisfiable:  # nothing about this operation can be invalid (no body, any path string)
                assert mode == "negative" and op.method.upper() == "GET"


def _with_served_names(case, decoder: str):
    if isinstance(case.body, dict):
        case.body |= {"model": "target"} if "model" in case.body else {}
        case.body |= {"decoder": decoder} if "decoder" in case.body else {}
    return case


# ---------------------------------------------------------------- what the fuzzing found


def test_a_vanishing_temperature_samples_instead_of_failing(app):
    """Found by the positive cases: a temperature of 5e-324 is 0 in float32, the scaled logits
    overflowed and generate() failed on NaN probabilities (500); it now samples at MIN_TEMPERATURE."""
    body = {"model": "target", "messages": DIALOG, "max_tokens": 4, "temperature": 5e-324, "seed": 1}
    with httpx.Client(base_url=app, headers=AUTH, timeout=REQUEST_TIMEOUT_S) as client:
        plain = client.post("/v1/chat/completions", json=body)
        assert plain.status_code == 200 and plain.json()["usage"]["completion_tokens"] > 0, plain.text
        streamed = client.post("/v1/chat/completions", json={**body, "temperature": 1e-45, "stream": True})
        assert streamed.status_code == 200 and '"error"' not in streamed.text, streamed.text
        assert streamed.text.endswith("data: [DONE]\n\n")


# ---------------------------------------------------------------- what the schema cannot describe


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def _hostile_bodies(path: str) -> list[bytes]:
    """Bodies that are JSON only to a lenient reader, or JSON past what a parser or the route
    takes: all of them 4xx."""
    adapter = "model" if path == "/v1/chat/completions" else "decoder"
    bodies = [
        '{"dialogs": [[{"role": "user", "content": "\\ud800"}]], "questions": ["\\udfff"]}',  # lone surrogates
        '{"\\ud800": 1, "dialogs": [], "questions": []}',
        '{"dialog": [{"role": "user", "content": "x"}], "question": "\\udc00?", "candidates": ["\\ud800"]}',
        '{"model": "\\ud800", "messages": [{"role": "\\ud800", "content": "hi"}]}',
        '{"name": "\\ud800", "qa": [["\\ud800", "a"]]}',
        # the adapter named twice, the second time with a lone surrogate
        json.dumps({**VALID[path], adapter: "x"})[:-1] + f', "{adapter}": "\\ud800"}}',
        '{"dialogs": [[{"role": "user", "content": "a\\u0000b"}]], "questions": ["\\u0000"], "decoder": "\\u0000"}',
        '{"a": 1, "a": 2}',
        "",
        "null",
        "[]",
        '"text"',
        "0",
        "true",
        "{",
        json.dumps(VALID[path]) + " trailing",
        json.dumps(VALID[path])[:-5],
        _nested(5000),
        '{"a":' * 5000 + "1" + "}" * 5000,
        '{"dialogs": ' + _nested(3000) + ', "questions": ["Q?"]}',
    ]
    for name in NUMBERS[path]:
        for number in ("1e400", "-1e400", "NaN", "Infinity", "-Infinity", str(2**64), "9" * 5000):
            bodies.append(json.dumps({**VALID[path], name: "NUMBER"}).replace('"NUMBER"', number))
    return [b.encode("utf-8", "surrogatepass") for b in bodies] + [
        b'{"questions": ["\xff\xfe"], "dialogs": [[{"role": "user", "content": "\xc3\x28"}]]}',  # invalid UTF-8
        b'{"model": "target", "messages": [{"role": "user", "content": "\xed\xa0\x80"}]}',  # an encoded surrogate
        b"\x00" * 64,
    ]


def test_hostile_bodies_to_every_post_route(app, tally):
    """Malformed, mis-encoded, deeply nested JSON, numbers past any field's range, and valid bodies
    under a content type that is not JSON: 4xx (the token is sent, so auth passes)."""
    json_type = {"content-type": "application/json"}
    with httpx.Client(base_url=app, headers=AUTH) as client, tally.no_new_failures():
        for path in VALID:
            for body in _hostile_bodies(path):
                _send(client, tally, "POST", path, content=body, headers=json_type)
            for content_type in ("text/plain", "application/x-www-form-urlencoded", "application/xml"):
                _send(
                    client, tally, "POST", path, content=json.dumps(VALID[path]), headers={"content-type": content_type}
                )
            _send(client, tally, "POST", path, files={"dialogs": ("d.json", json.dumps(VALID[path]).encode())})
            accepted = _send(client, tally, "POST", path, ACCEPTED, json=VALID[path])  # the same, as JSON: accepted
            if accepted is not None and accepted.status_code == 202:  # a control job: it can be polled
                _send(client, tally, "GET", f"/v1/controls/{accepted.json()['id']}", range(200, 201))


def test_random_bytes_to_every_post_route(app, tally):
    """Hypothesis' bytes and text (lone surrogates too) as the body, under JSON and other types."""
    with httpx.Client(base_url=app, headers=AUTH) as client, tally.no_new_failures():

        @settings(FUZZ_SETTINGS, max_examples=RANDOM_BODIES)
        @given(
            path=st.sampled_from(list(VALID)),
            body=st.binary(max_size=2000) | st.text(max_size=500).map(lambda s: s.encode("utf-8", "surrogatepass")),
            content_type=st.sampled_from(["application/json", "application/json; charset=latin-1", "text/plain", ""]),
        )
        def send(path, body, content_type):
            _send(client, tally, "POST", path, content=body, headers={"content-type": content_type})

        send()


def test_unknown_paths_methods_and_tokens(app, tally, get_paths):
    """Routes that do not exist, methods a route does not have, and every way to get the token
    wrong: 4xx, and 401 before anything else where a token is needed."""
    rng = random.Random(13)
    unknown_paths = [
        "/v1/nope",
        "/v1/read/extra",
        "/v1/controls/",
        "/v1/controls/a/b",
        "/v1/controls/%ff%fe",
        "/v1/controls/%00",
        "/v1/controls/" + "9" * 5000,
        "/v1/controls/%ED%A0%80",
        "/v1/controls/..%2F..%2Fmlflow.db",
        "/../../etc/passwd",
        "/%2e%2e/%2e%2e/etc/passwd",
        "/v1//read",
        "/V1/READ",
        "/" + "a" * 6000,
        "/v1/%ff",
    ] + ["/x" + "".join(rng.choice("abc/%-_~!$&'()*+,;=:@09") for _ in range(rng.randint(1, 60))) for _ in range(40)]
    wrong_tokens = [
        {},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer nope"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": f"Bearer  {TOKEN}"},
        {"Authorization": f"Bearer {TOKEN[:-1]}"},
        {"Authorization": TOKEN},
        {"Authorization": "Bearer " + "x" * 6000},
        {"Authorization": "Bearer \xe9\xff".encode("latin-1")},
        {"X-Authorization": f"Bearer {TOKEN}"},
    ]
    with httpx.Client(base_url=app) as client, tally.no_new_failures():
        for path in unknown_paths:  # 404, or a redirect to the route without its trailing slash
            _send(client, tally, "GET", path, range(300, 500), headers=AUTH)
            _send(client, tally, "POST", path, range(300, 500), headers=AUTH, content=b"{}")
        for path in [*VALID, *get_paths]:  # with a body, so that 411 is not what refuses them
            own = "POST" if path in VALID else "GET"
            for method in {"GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "FOO"} - {own}:
                _send(client, tally, method, path, headers=AUTH, content=b"{}")
        for headers in wrong_tokens:
            for path, guarded in get_paths.items():  # the open ones (probes, the playground's page) answer
                _send(client, tally, "GET", path, range(401, 402) if guarded else range(200, 300), headers=headers)
            for path in VALID:
                _send(client, tally, "POST", path, range(401, 402), headers=headers, json=VALID[path])


def test_sizes_the_guard_refuses(app, tally):
    """411 without a declared size, 413 past the limit, and Content-Lengths that are not numbers."""

    def chunks():
        yield b'{"dialogs": '
        yield b"[]}"

    with httpx.Client(base_url=app, headers=AUTH) as client, tally.no_new_failures():
        for path in VALID:
            _send(client, tally, "POST", path, range(411, 412), content=chunks())
            _send(client, tally, "POST", path, range(413, 414), content=b"[" * (MAX_BODY_BYTES + 1))
            for length in (b"abc", b"-1", b"1e3", b"", b"0x2", b"99999999999999999999999", b"2, 2"):
                head = f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n".encode()
                _send_raw(app, tally, head + b"Content-Length: " + length + b"\r\n\r\n{}")
            _send_raw(app, tally, f"POST {path}\xff HTTP/1.1\r\nHost: x\r\n\r\n".encode("latin-1"))


# ---------------------------------------------------------------- afterwards


def test_the_app_is_healthy_after_the_fuzzing(app, tally):
    with httpx.Client(base_url=app, headers=AUTH, timeout=REQUEST_TIMEOUT_S) as client:
        assert client.get("/healthz").status_code == 200
        read = client.post("/v1/read", json={"dialogs": [DIALOG], "questions": ["Who?"], "max_new_tokens": 4})
        assert read.status_code == 200, read.text
    statuses = tally.statuses
    print(f"\nfuzzed the Serve app: {statuses.total()} requests, the slowest answered in {tally.slowest_s:.1f} s")
    for route, counts in sorted(tally.routes.items()) + [("all", statuses)]:
        print(f"  {route}: " + ", ".join(f"{status} x{n}" for status, n in sorted(counts.items(), key=str)))
    assert statuses.total() >= MIN_REQUESTS
    assert "hung" not in statuses and max(s for s in statuses if s != "hung") < 500
