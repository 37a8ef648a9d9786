"""The Serve app over real HTTP on loopback: a tiny decoder trained in this session and registered
in a real MLflow store, the app on the session's Ray cluster, httpx and the official openai client.

One app serves the whole module (auth on: every client sends the token); the load and replica
kill tests are `slow`.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from trained_decoder import DECODER_MODEL, trained_decoder

from conftest import browser_page, free_port
from latentqa.paths import CONTROLS_DIR, PROJECT_ROOT

TOKEN = "test-token-7f3a"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
APP = "latentqa-test"
SAME_DECODER = ["local", "local-b", "local-c", "local-d", "local-e"]  # one folder, five adapter ids
WORDS = "word " * 25  # about 51 tokens: within a turn's 64; several of them make a long dialog
LONG_DIALOG = [{"role": r, "content": WORDS} for r in ("user", "assistant", "user", "assistant")]
DIALOG = [{"role": "user", "content": "Please talk like a pirate from now on."}]
MULTI_TURN = [
    {"role": "system", "content": "You are a cheerful baker."},
    {"role": "user", "content": "What should I make today?"},
    {"role": "assistant", "content": "Fresh bread, of course!"},
    {"role": "user", "content": "And for dessert?"},
]


@pytest.fixture(scope="session")
def decoder(tmp_path_factory):
    return trained_decoder(tmp_path_factory.getbasetemp() / "trained-decoder")


@pytest.fixture(scope="module")
def app(ray_cluster, decoder):
    """The app on a free loopback port: two model replicas, adapters multiplexed (at most 2 each)."""
    from latentqa_platform.serving import ServeSettings

    settings = ServeSettings(
        # More adapters than the replicas have slots (2 x 2), so evictions happen under load.
        decoders={"tiny": decoder.registry_uri, **{name: str(decoder.folder) for name in SAME_DECODER}},
        mlflow=decoder.mlflow_settings(),
        max_adapters_per_replica=2,
        max_turn_tokens=64,
        max_dialog_tokens=160,
        max_generated_tokens=2000,
        max_scored_tokens=1200,
        max_prefill_tokens=4000,
        max_body_bytes=200_000,
        # a random tiny target repeats itself whatever steers it: the fluency bounds are for real models
        overrides=["--steer.max_repeated_trigrams", "null", "--steer.max_perplexity_ratio", "null"],
    )
    with served_app(settings, APP, model_replicas=2) as url:
        yield url


@contextmanager
def served_app(settings, name: str, model_replicas: int = 1) -> Iterator[str]:
    """`settings` served as app `name` on a free loopback port (auth on with TOKEN), healthy;
    yields its URL and shuts Serve down after."""
    from ray import serve

    from serve.app import Gateway, ModelReplica, Steering, application

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = application(
        settings,
        model=ModelReplica.options(num_replicas=model_replicas, ray_actor_options={"num_cpus": 0.5}),
        steering=Steering.options(ray_actor_options={"num_cpus": 0.5}),
        gateway=Gateway.options(
            ray_actor_options={"num_cpus": 0.25, "runtime_env": {"env_vars": {"LATENTQA_API_TOKEN": TOKEN}}}
        ),
    )
    serve.run(app, name=name, route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url)
        yield url
    finally:
        serve.shutdown()


def _request(path: str):
    """A request as the gateway's error handlers get it, for calling them directly."""
    from starlette.requests import Request

    return Request({"type": "http", "method": "POST", "path": path, "headers": [], "query_string": b""})


def _wait_healthy(url: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} did not become healthy")


@pytest.fixture(scope="module")
def client(app):
    with httpx.Client(base_url=app, headers=AUTH, timeout=120) as c:
        yield c


# ---------------------------------------------------------------- endpoints


def test_health_and_openapi(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    paths = client.get("/openapi.json").json()["paths"]
    for path in (
        "/v1/read",
        "/v1/score",
        "/v1/chat/completions",
        "/v1/controls",
        "/v1/controls/{job_id}",
        "/v1/decoders",
    ):
        assert path in paths


def test_decoders_lists_configured_and_registered(client, decoder):
    body = client.get("/v1/decoders").json()
    assert body["default"] == "tiny"
    names = {row["name"]: row for row in body["decoders"]}
    assert names["tiny"]["kind"] == "configured" and names["local"]["kind"] == "configured"
    assert names[DECODER_MODEL]["aliases"] == ["champion"]
    assert names["local"]["source"] == "folder" and str(decoder.folder) not in json.dumps(body)  # no server paths


def test_a_registry_outage_is_503_with_retry_after_and_a_missing_version_404(decoder, tmp_path, monkeypatch):
    """An unreachable MLflow server is not an unknown decoder: 503 and Retry-After, not 404."""
    from latentqa_platform.adapters import AdapterCatalog
    from latentqa_platform.serving import Unavailable, UnknownAdapter
    from serve.gateway import _request_error

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    down = AdapterCatalog("decoder", {}, f"http://127.0.0.1:{free_port()}")
    with pytest.raises(Unavailable, match="registry is unavailable"):
        down.locate(f"{DECODER_MODEL}@champion", "decoder")
    with pytest.raises(Unavailable):
        down.listing()
    up = AdapterCatalog("decoder", {"local": str(tmp_path / "gone")}, decoder.tracking_uri)
    with pytest.raises(UnknownAdapter, match="no such registered model version"):
        up.locate(f"{DECODER_MODEL}/99", "decoder")
    with pytest.raises(Unavailable, match="configured decoder 'local' cannot be loaded") as refused:
        up.fetch("decoder:local", tmp_path)
    assert str(tmp_path) not in str(refused.value)
    response = asyncio.run(
        _request_error(_request("/v1/read"), Unavailable("decoder", "the model registry is unavailable"))
    )
    assert response.status_code == 503 and response.headers["retry-after"] == "5"


def test_read_multi_turn_dialogs_and_choices_per_request(client, decoder):
    questions = ["What persona will the assistant adopt?", "What is the assistant doing?"]
    body = {"dialogs": [DIALOG, MULTI_TURN], "questions": questions, "max_new_tokens": 8}
    out = client.post("/v1/read", json=body)
    assert out.status_code == 200, out.text
    data = out.json()
    assert data["decoder"] == f"models:/{DECODER_MODEL}/{decoder.version}"  # the alias, resolved
    assert data["read_layer"] == 1  # the layer the decoder was trained at
    assert [[a["question"] for a in row] for row in data["results"]] == [questions, questions]
    assert all(isinstance(a["answer"], str) for row in data["results"] for a in row)
    # The same registered decoder by version, through a local folder, and at another layer.
    by_version = client.post("/v1/read", json={**body, "decoder": f"{DECODER_MODEL}/{decoder.version}"}).json()
    local = client.post("/v1/read", json={**body, "decoder": "local"}).json()
    assert by_version["results"] == data["results"] == local["results"]  # one adapter, three ways to name it
    other = client.post("/v1/read", json={**body, "read_layer": 0})
    assert other.status_code == 200 and other.json()["read_layer"] == 0


def test_replica_lines_go_to_serve_logs_not_the_console(client):
    """Unless `verbose`, a replica's access lines and library warnings stay in Ray's Serve logs: its
    stdout and stderr, which Ray forwards to `serve run`'s console, hold neither."""
    import ray
    from ray.util.state import list_actors

    assert client.post("/v1/read", json={"dialogs": [DIALOG], "questions": ["Who?"], "max_new_tokens": 2}).is_success
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    serve_log = "".join(p.read_text() for p in (logs / "serve").glob(f"replica_{APP}_Gateway_*.log"))
    assert "POST /v1/read 200" in serve_log
    pids = [a.pid for a in list_actors(filters=[("class_name", "=", f"ServeReplica:{APP}:ModelReplica")]) if a.pid]
    pids += [a.pid for a in list_actors(filters=[("class_name", "=", f"ServeReplica:{APP}:Gateway")]) if a.pid]
    streams = [p for pid in pids for p in logs.glob(f"worker-*-{pid}.*") if p.suffix in (".out", ".err")]
    assert len(streams) >= 2 * len(pids) > 0
    console = "".join(p.read_text() for p in streams)
    assert "POST /v1/read" not in console and "Warning" not in console and "Loading weights" not in console


def test_score_ranks_candidates_best_first(client):
    candidates = ["The assistant is a pirate.", "The assistant is a baker.", "Nothing."]
    out = client.post(
        "/v1/score", json={"dialog": DIALOG, "question": "Who is the assistant?", "candidates": candidates}
    )
    assert out.status_code == 200, out.text
    ranked = out.json()["ranked"]
    assert sorted(r["answer"] for r in ranked) == sorted(candidates)
    assert [r["loss"] for r in ranked] == sorted(r["loss"] for r in ranked)


# ---------------------------------------------------------------- errors and limits


@pytest.mark.parametrize(
    ("path", "body", "status", "field"),
    [
        ("/v1/read", {"dialogs": [DIALOG], "questions": []}, 422, "body.questions"),
        ("/v1/read", {"dialogs": [DIALOG] * 17, "questions": ["Q?"]}, 422, "body.dialogs"),
        ("/v1/read", {"dialogs": [[{"role": "user"}]], "questions": ["Q?"]}, 422, "body.dialogs.0.0.content"),
        ("/v1/read", {"dialogs": [DIALOG], "questions": ["Q?"], "max_new_tokens": 100000}, 422, "body.max_new_tokens"),
        ("/v1/read", {"dialogs": [DIALOG], "questions": ["Q?"], "read_layer": 99}, 422, "body.read_layer"),
        (
            "/v1/read",
            {"dialogs": [[{"role": "user", "content": "word " * 200}]], "questions": ["Q?"]},
            422,
            "body.dialogs.0.0.content",
        ),
        ("/v1/read", {"dialogs": [DIALOG], "questions": ["Q?"], "decoder": "nope"}, 404, "body.decoder"),
        ("/v1/read", {"dialogs": [DIALOG], "questions": ["Q?"], "decoder": "../../etc/passwd"}, 404, "body.decoder"),
        ("/v1/read", {"dialogs": [DIALOG], "questions": ["Q?"], "decoder": f"{DECODER_MODEL}/99"}, 404, "body.decoder"),
        ("/v1/score", {"dialog": DIALOG, "question": "Q?", "candidates": ["a"] * 33}, 422, "body.candidates"),
        ("/v1/chat/completions", {"model": "target", "messages": DIALOG, "max_tokens": 5000}, 422, "body.max_tokens"),
        ("/v1/chat/completions", {"model": "target", "messages": DIALOG, "n": 3}, 422, "body.n"),
        ("/v1/chat/completions", {"model": "target", "messages": DIALOG, "seed": 2**64}, 422, "body.seed"),
        ("/v1/chat/completions", {"model": "no-such-control", "messages": DIALOG}, 404, "body.model"),
        ("/v1/chat/completions", {"model": f"{DECODER_MODEL}/1", "messages": DIALOG}, 404, "body.model"),  # a decoder
        ("/v1/controls", {"name": "Bad Name!", "qa": [["q", "a"]]}, 422, "body.name"),
        ("/v1/controls", {"name": "x", "qa": [["q", "a"]], "instruction": "Be a pirate."}, 422, "body"),
        ("/v1/controls", {"name": "x", "qa": [["q", "a"]], "steps": 10_000}, 422, "body.steps"),
        # work budgets in tokens (the fixture's: turn 64, dialog 160, read 2000 generated and 4000 prefilled, score 1200)
        ("/v1/read", {"dialogs": [DIALOG] * 4, "questions": ["Q?"] * 4, "max_new_tokens": 200}, 422, "at most 2000"),
        (
            "/v1/read",
            {"dialogs": [DIALOG] * 16, "questions": ["Q?"] * 16, "max_new_tokens": 1},
            422,
            "prefill at most 4000",
        ),
        ("/v1/read", {"dialogs": [LONG_DIALOG], "questions": ["Q?"]}, 422, "body.dialogs.0: "),
        ("/v1/read", {"dialogs": [DIALOG], "questions": ["Q?", WORDS * 2]}, 422, "body.questions.1"),
        ("/v1/score", {"dialog": DIALOG, "question": WORDS * 2, "candidates": ["a"]}, 422, "body.question"),
        ("/v1/score", {"dialog": DIALOG, "question": "Q?", "candidates": ["a", WORDS * 2]}, 422, "body.candidates.1"),
        ("/v1/score", {"dialog": DIALOG, "question": "Q?", "candidates": [WORDS] * 32}, 422, "a score may run at most"),
        ("/v1/chat/completions", {"model": "target", "messages": LONG_DIALOG}, 422, "body.messages.0: "),
        ("/v1/controls", {"name": "x", "qa": [["q", WORDS * 2]]}, 422, "body.qa.0.1"),
        ("/v1/controls", {"name": "x", "instruction": WORDS * 2}, 422, "body.instruction"),
    ],
)
def test_bad_requests_get_4xx_naming_the_field(client, path, body, status, field):
    out = client.post(path, json=body)
    assert out.status_code == status, out.text
    assert field in out.json()["message"], out.text


def test_messages_name_the_real_place_and_the_fix(client):
    """A body not sent as JSON, a non-finite number, a path parameter: each named where it is."""
    text = client.post("/v1/read", content=json.dumps({"dialogs": [DIALOG], "questions": ["Q?"]}))
    assert text.status_code == 422 and "Content-Type: application/json" in text.json()["message"], text.text
    plain = client.post("/v1/read", content=b"hello", headers={"Content-Type": "text/plain"})
    assert "(Content-Type text/plain)" in plain.json()["message"], plain.text
    nan = client.post(
        "/v1/chat/completions",
        content=b'{"model": "target", "messages": [{"role": "user", "content": "Hi"}], "temperature": NaN}',
        headers={"Content-Type": "application/json"},
    )
    assert nan.status_code == 422 and "body.temperature: Input should be a finite number" in nan.json()["message"]
    unknown = client.get("/v1/controls/" + "0" * 32)
    assert unknown.status_code == 404 and unknown.json()["message"].startswith("path.job_id: no control job")


def test_every_answer_carries_a_request_id_and_errors_name_it(app, client):
    """The id of Serve's proxy (or the client's own), in the header and in every error's body: the
    server log has the details under it."""
    assert client.get("/v1/decoders").headers["x-request-id"]
    refused = client.post("/v1/read", json={"dialogs": [DIALOG], "questions": []})
    assert refused.status_code == 422 and refused.json()["request_id"] == refused.headers["x-request-id"]
    traced = client.post("/v1/read", json={"dialogs": [DIALOG], "questions": []}, headers={"X-Request-ID": "trace-42"})
    assert traced.headers["x-request-id"] == "trace-42" and traced.json()["request_id"] == "trace-42"
    stranger = httpx.get(f"{app}/v1/decoders", timeout=30)  # refused by the guard, before any route
    assert stranger.status_code == 401 and stranger.json()["request_id"] == stranger.headers["x-request-id"]


def test_a_model_answer_past_the_timeout_or_a_full_queue_is_503_with_retry_after():
    """The Gateway's wait on the model: past `request_timeout_s` the request is cancelled and
    answered 503; Serve's back-pressure (a full queue) is 503 too, both with Retry-After."""
    from ray.serve.exceptions import BackPressureError

    from latentqa_platform.serving import ServeSettings, Unavailable
    from serve.gateway import Gateway

    class Pending:
        cancelled = False

        def cancel(self):
            self.cancelled = True

    gateway = Gateway.func_or_class.__new__(Gateway.func_or_class)
    gateway.settings = ServeSettings(request_timeout_s=0.2)
    pending = Pending()
    with pytest.raises(Unavailable, match=r"no answer within 0\.2 s"):
        asyncio.run(gateway._answer(asyncio.sleep(30), pending))
    assert pending.cancelled

    async def full():
        raise BackPressureError(num_queued_requests=64, max_queued_requests=64)

    with pytest.raises(Unavailable, match="queues are full") as refused:
        asyncio.run(gateway._answer(full(), pending))
    assert refused.value.status == 503 and refused.value.retry_after_s > 0


def test_unknown_control_job_is_404(client):
    for job_id in ("0" * 32, "not-a-run-id", "..%2F..%2Fmlflow.db"):
        out = client.get(f"/v1/controls/{job_id}")
        assert out.status_code == 404 and out.json()["message"], out.text


def test_auth_rejects_missing_and_wrong_tokens(app):
    body = {"dialogs": [DIALOG], "questions": ["Q?"]}
    assert httpx.post(f"{app}/v1/read", json=body, timeout=30).status_code == 401
    wrong = httpx.post(f"{app}/v1/read", json=body, headers={"Authorization": "Bearer nope"}, timeout=30)
    assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
    assert httpx.get(f"{app}/v1/decoders", timeout=30).status_code == 401
    assert httpx.get(f"{app}/healthz", timeout=30).status_code == 200  # probes need no token


def test_a_body_past_the_limit_is_refused_before_it_is_read(app):
    """413 from the declared size alone (auth first: a stranger's body is never read), 411 without one."""
    huge = b'{"dialogs": [' + b" " * 300_000 + b"]}"
    assert httpx.post(f"{app}/v1/read", content=huge, timeout=60).status_code == 401
    refused = httpx.post(
        f"{app}/v1/read", content=huge, headers={**AUTH, "content-type": "application/json"}, timeout=60
    )
    assert refused.status_code == 413 and "at most 200000" in refused.json()["message"]

    def chunks():
        yield b'{"dialogs": []'
        yield b"}"

    unsized = httpx.post(f"{app}/v1/read", content=chunks(), headers=AUTH, timeout=60)
    assert unsized.status_code == 411, unsized.text


def test_the_auth_token_fails_closed(tmp_path, monkeypatch):
    """No token, an empty one, or a misspelt variable: no token is found, an error names where it
    looked (the Gateway raises it from its constructor, so it does not start); a token file (a
    mounted Kubernetes Secret) works; `auth: none` is the explicit way out."""
    from latentqa_platform.serving import ServeSettings

    monkeypatch.delenv("LATENTQA_API_TOKEN", raising=False)
    with pytest.raises(ValueError, match=r"\$LATENTQA_API_TOKEN holds none"):
        ServeSettings().auth_token()
    monkeypatch.setenv("LATENTQA_API_TOKEN", "  ")
    with pytest.raises(ValueError, match="holds none"):
        ServeSettings().auth_token()
    monkeypatch.setenv("LATENTQA_API_TOKEN", "s3cret")
    with pytest.raises(ValueError, match=r"\$LATENTQA_API_TOKN holds none"):
        ServeSettings(auth_token_env="LATENTQA_API_TOKN").auth_token()
    secret = tmp_path / "token"
    secret.write_text("from-a-secret\n")
    assert ServeSettings(auth_token_file=str(secret)).auth_token() == "from-a-secret"
    with pytest.raises(ValueError, match="cannot read"):
        ServeSettings(auth_token_file=str(tmp_path / "missing")).auth_token()
    assert ServeSettings().auth_token() == "s3cret" and ServeSettings(auth="none").auth_token() is None


# ---------------------------------------------------------------- OpenAI client, controls


def _openai(app):
    from openai import OpenAI

    return OpenAI(base_url=f"{app}/v1", api_key=TOKEN, max_retries=0, timeout=120)


def test_openai_client_plain_and_streamed(app):
    oai = _openai(app)
    prompt = [{"role": "user", "content": "What should I cook for dinner tonight?"}]
    plain = oai.chat.completions.create(model="target", messages=prompt, max_tokens=12, temperature=0)
    text = plain.choices[0].message.content
    assert isinstance(text, str) and plain.usage.completion_tokens > 0
    assert plain.choices[0].finish_reason in ("stop", "length")
    chunks = list(
        oai.chat.completions.create(model="target", messages=prompt, max_tokens=12, temperature=0, stream=True)
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert streamed.strip() == text.strip()  # greedy: the stream says what the plain call said
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    sampled = oai.chat.completions.create(model="target", messages=prompt, max_tokens=12, temperature=1.0, seed=3)
    assert isinstance(sampled.choices[0].message.content, str)
    from openai import AuthenticationError, OpenAI

    with pytest.raises(AuthenticationError):
        OpenAI(base_url=f"{app}/v1", api_key="wrong", max_retries=0).chat.completions.create(
            model="target", messages=prompt
        )


@pytest.fixture(scope="module")
def pirate_job(client):
    """A control job from the project's pirate control, polled to the end."""
    qa = json.loads((CONTROLS_DIR / "pirate.json").read_text())["qa"]
    started = client.post("/v1/controls", json={"name": "pirate", "qa": qa, "steps": 30, "lr": 3e-3})
    assert started.status_code == 202, started.text
    job = started.json()
    assert job["status"] in ("queued", "running") and job["steps"] == 30
    seen = [job]
    deadline = time.monotonic() + 300
    while job["status"] in ("queued", "running") and time.monotonic() < deadline:
        time.sleep(1)
        job = client.get(f"/v1/controls/{job['id']}").json()
        seen.append(job)
    return job, seen


def test_control_job_reports_progress_and_registers_an_adapter(pirate_job, decoder):
    from mlflow.tracking import MlflowClient

    job, seen = pirate_job
    assert job["status"] == "succeeded", job
    assert job["progress"] == 1.0 and job["step"] == 30 and job["loss"] is not None
    assert job["adapter"].startswith("latentqa-control-pirate/")
    name, version = job["adapter"].split("/")
    registered = MlflowClient(decoder.tracking_uri).get_model_version(name, version)
    assert registered.tags["latentqa.kind"] == "control"
    progress = [j["progress"] for j in seen]
    assert progress == sorted(progress)


def test_a_stream_whose_generation_fails_ends_instead_of_hanging(decoder):
    """A generate() that raises never ends its streamer: the replica's stream (here in process,
    its generation made to fail, since no valid request makes it fail) must end with the error
    instead of waiting forever; the gateway answers such an error with a 500 that names the
    request id, not the error."""
    from starlette.requests import Request

    from latentqa_platform.serving import ServeSettings
    from serve.gateway import _unexpected
    from serve.replica import ModelReplica

    settings = ServeSettings(decoders={"local": str(decoder.folder)}, mlflow=decoder.mlflow_settings(), verbose=True)
    replica = ModelReplica.func_or_class(settings.model_dump(mode="json"))

    def failing_generate(*args, **kwargs):
        raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")

    replica._generate = failing_generate
    options = {"max_tokens": 4, "temperature": 1.0, "top_p": 1.0, "seed": None}

    async def stream() -> list[dict]:
        return [part async for part in replica.chat_stream(DIALOG, options)]

    with pytest.raises(RuntimeError, match="probability tensor"):
        asyncio.run(asyncio.wait_for(stream(), 60))
    scope = {"type": "http", "method": "POST", "scheme": "http", "server": ("127.0.0.1", 80), "query_string": b""}
    scope |= {"path": "/v1/chat/completions", "headers": [(b"x-request-id", b"req-7")]}
    failed = asyncio.run(_unexpected(Request(scope), RuntimeError("probability tensor contains NaN")))
    assert failed.status_code == 500 and b"req-7" in failed.body and b"probability" not in failed.body


def test_a_client_gone_mid_adapter_load_leaves_no_adapter_mounted(decoder):
    """The replica in process: a request cancelled (its client gone) while its decoder is being
    mounted must not leave that decoder on the base past the LRU cap, where nothing would evict
    it: the mount finishes on the model thread and is unmounted at once."""
    from latentqa_platform.serving import ServeSettings
    from serve.replica import ModelReplica

    settings = ServeSettings(
        decoders={"local": str(decoder.folder), "other": str(decoder.folder)},
        mlflow=decoder.mlflow_settings(),
        verbose=True,
    )
    replica = ModelReplica.func_or_class(settings.model_dump(mode="json"))
    mounting, release, load = threading.Event(), threading.Event(), replica.adapters.load

    def slow_load(folder, name):  # on the model thread, as a real load is
        mounting.set()
        release.wait(60)
        load(folder, name)

    replica.adapters.load = slow_load
    names_before = set(replica.adapters.model.peft_config)

    async def cancelled_mid_load() -> None:
        request = asyncio.ensure_future(replica._load("decoder:other"))
        await asyncio.to_thread(mounting.wait, 60)
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request
        release.set()
        for _ in range(2):  # the mount, then the unmount it queued behind it on the model thread
            await replica._run(lambda: None)
            await asyncio.sleep(0.1)

    asyncio.run(asyncio.wait_for(cancelled_mid_load(), 120))
    assert set(replica.adapters.model.peft_config) == names_before


def test_steered_model_over_the_openai_client(app, pirate_job):
    job, _ = pirate_job
    oai = _openai(app)
    prompts = json.loads((PROJECT_ROOT / "datasets" / "prompts" / "steer.json").read_text())["heldout"][:3]

    def replies(model: str) -> list[str]:
        return [
            oai.chat.completions.create(
                model=model, messages=[{"role": "user", "content": p}], max_tokens=8, temperature=0
            )
            .choices[0]
            .message.content
            for p in prompts
        ]

    target, steered = replies("target"), replies(job["adapter"])
    assert steered != target  # the control changes the target's replies
    assert replies("target") == target  # and leaves the plain target alone
    listed = [m.id for m in oai.models.list().data]
    assert "target" in listed and job["adapter"] in listed
    streamed = oai.chat.completions.create(
        model=job["adapter"],
        messages=[{"role": "user", "content": prompts[0]}],
        max_tokens=8,
        temperature=0,
        stream=True,
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed).strip() == steered[0].strip()


def test_control_from_an_instruction(client):
    started = client.post(
        "/v1/controls", json={"name": "pirate-read", "instruction": "Talk like a pirate.", "steps": 2}
    )
    assert started.status_code == 202, started.text
    job = started.json()
    deadline = time.monotonic() + 300
    while job["status"] in ("queued", "running") and time.monotonic() < deadline:
        time.sleep(1)
        job = client.get(f"/v1/controls/{job['id']}").json()
    assert job["status"] == "succeeded", job
    assert job["adapter"].startswith("latentqa-control-pirate-read/")


@pytest.mark.parametrize(
    "error, shown",
    [
        ("No such file or directory: '/srv/app/prompts.json'", "No such file or directory: '…/prompts.json'"),
        ("cannot open '/home/my user/secret dir/x.json'", "cannot open '…/x.json'"),
        ("store at file:///srv/runs/mlflow.db is locked", "store at file://…/mlflow.db is locked"),
        ("see /srv/a/b.json, and /tmp", "see …/b.json, and /tmp"),
        # the client's own references stay whole
        ("no version models:/latentqa-decoder/3 (runs:/abc/adapter)", None),
        ("GET http://registry:5000/api/2.0/get failed; ratio 1/2/3", None),
    ],
)
def test_a_failed_jobs_error_cuts_server_paths_only(error, shown):
    from latentqa_platform.controls import without_server_paths

    assert without_server_paths(error) == (shown or error)


def test_control_jobs_are_bounded_and_never_lost(decoder, tmp_path, monkeypatch):
    """The Steering deployment's class in process: past `max_queued_controls` a job is refused
    (429 with Retry-After at the gateway), and a failure outside the job itself (here an
    unreadable prompt set) still ends the job failed, with the error (and no server path in it),
    instead of queued forever."""
    from ray import serve

    from latentqa_platform import controls
    from latentqa_platform.serving import Overloaded, ServeSettings
    from serve.gateway import _request_error
    from serve.steering import Steering

    settings = ServeSettings(
        decoders={"local": str(decoder.folder)},
        mlflow=decoder.mlflow_settings(),
        steer_prompts=str(tmp_path / "missing.json"),
        max_queued_controls=1,
        verbose=True,
    )
    monkeypatch.setattr(serve, "get_replica_context", lambda: SimpleNamespace(app_name="in-process"))
    steering = Steering.func_or_class(settings.model_dump(mode="json"))
    opened, load = threading.Event(), steering._session
    steering._session = lambda decoder_id: opened.wait(60) and load(decoder_id)  # the job waits while we submit
    request = {"name": "lost", "qa": [["What persona?", "A pirate."]], "steps": 1}
    job = steering.submit(request, "decoder:local")
    with pytest.raises(Overloaded, match="1 control jobs are queued or running"):
        steering.submit(request, "decoder:local")
    # A Steering of the same app starting again (its last one died): the job it left is failed.
    restarted = Steering.func_or_class(settings.model_dump(mode="json"))
    status = controls.job_status(decoder.tracking_uri, job)
    assert status["status"] == "failed" and "in-process stopped before the job ended" in status["error"], status
    opened.set()  # the first Steering's job now ends (failed: the prompts are missing) and frees its place
    steering.queue.shutdown(wait=True)
    status = controls.job_status(decoder.tracking_uri, job)
    assert status["status"] == "failed" and "…/missing.json" in status["error"], status
    assert str(tmp_path) not in status["error"], "a job's error, which any client can read, names a server path"
    assert steering.pending == 0 and restarted.pending == 0
    response = asyncio.run(_request_error(_request("/v1/controls"), Overloaded("name", "busy")))
    assert response.status_code == 429 and response.headers["retry-after"] == "30"


def test_a_control_that_would_read_elsewhere_than_its_decoder_is_refused(decoder, monkeypatch):
    """The Steering deployment's class in process: an app whose `steer.layers` reads the control
    at another block than the decoder was trained to read refuses the job (422 at the gateway)
    before anything is queued; unset, the control follows the decoder and the job is taken."""
    from ray import serve

    from latentqa_platform.serving import RequestError, ServeSettings
    from serve.gateway import _request_error
    from serve.steering import Steering

    monkeypatch.setattr(serve, "get_replica_context", lambda: SimpleNamespace(app_name="in-process"))
    trained_at = json.loads((decoder.run_dir / "config.json").read_text())["patch"]["read_layer"]
    settings = ServeSettings(
        decoders={"local": str(decoder.folder)},
        mlflow=decoder.mlflow_settings(),
        overrides=["--steer.layers", str(trained_at + 2)],
        verbose=True,
    )
    steering = Steering.func_or_class(settings.model_dump(mode="json"))
    request = {"name": "elsewhere", "qa": [["What persona?", "A pirate."]], "steps": 1}
    with pytest.raises(RequestError) as refused:
        steering.submit(request, "decoder:local")
    assert refused.value.field == "decoder" and refused.value.message == (
        f"steer.layers {trained_at + 2} reads the control at block {trained_at + 1}, but the decoder reads block "
        f"{trained_at}: leave steer.layers unset (it follows the decoder) or set it to {trained_at + 1}"
    )
    assert steering.pending == 0
    response = asyncio.run(_request_error(_request("/v1/controls"), refused.value))
    assert response.status_code == 422 and f"decoder reads block {trained_at}" in response.body.decode()


def test_a_degenerate_control_fails_its_job_and_registers_nothing(decoder, monkeypatch):
    """The Steering deployment's class in process: a control past the fluency bounds (here a
    perplexity bound no control meets) ends its job failed, naming the figure, with its
    steering report on the run and no adapter registered."""
    from mlflow.tracking import MlflowClient
    from ray import serve

    from latentqa_platform import controls
    from latentqa_platform.serving import ServeSettings
    from serve.steering import Steering

    monkeypatch.setattr(serve, "get_replica_context", lambda: SimpleNamespace(app_name="in-process"))
    settings = ServeSettings(
        decoders={"local": str(decoder.folder)},
        mlflow=decoder.mlflow_settings(),
        overrides=["--steer.max_perplexity_ratio", "0.001", "--steer.max_repeated_trigrams", "null"],
        verbose=True,
    )
    steering = Steering.func_or_class(settings.model_dump(mode="json"))
    job = steering.submit({"name": "garbled", "qa": [["What persona?", "A pirate."]], "steps": 2}, "decoder:local")
    steering.queue.shutdown(wait=True)
    status = controls.job_status(decoder.tracking_uri, job)
    assert status["status"] == "failed" and status["adapter"] is None, status
    assert status["error"].startswith("DegenerateControl: degenerate control: steered: perplexity"), status
    assert status["error"].endswith("(bound 0.001x); not registered (see the run's steering/ report)"), status
    client = MlflowClient(decoder.tracking_uri)
    assert not client.search_model_versions("name='latentqa-control-garbled'")
    metrics = client.get_run(job).data.metrics
    assert metrics["steering/steered/perplexity_ratio"] > 0.001 and "steering/target/repeated_trigrams" in metrics
    assert {a.path for a in client.list_artifacts(job, "steering")} >= {"steering/steering.json"}


# ---------------------------------------------------------------- load and failure


async def _load(
    app: str, total: int, concurrency: int, on_half=None, decoders: tuple[str | None, ...] = (None,)
) -> tuple[list[float], list[str]]:
    """`total` reads, `concurrency` at a time, read i with `decoders[i % len(decoders)]`; returns
    latencies of successes and the failures."""
    latencies, failures = [], []
    queue = asyncio.Queue()
    for i in range(total):
        queue.put_nowait(i)
    body = {"dialogs": [DIALOG], "questions": ["What persona will the assistant adopt?"], "max_new_tokens": 6}

    async def worker(http: httpx.AsyncClient):
        while not queue.empty():
            i = queue.get_nowait()
            if on_half and i == total // 2:
                await asyncio.to_thread(on_half)
            start = time.perf_counter()
            try:
                out = await http.post("/v1/read", json={**body, "decoder": decoders[i % len(decoders)]})
                if out.status_code == 200 and len(out.json()["results"][0]) == 1:
                    latencies.append(time.perf_counter() - start)
                else:
                    failures.append(f"{out.status_code}: {out.text[:200]}")
            except httpx.HTTPError as err:  # no answer at all: counted, and the kill test forbids it
                failures.append(f"no response: {err!r}")

    async with httpx.AsyncClient(base_url=app, headers=AUTH, timeout=120) as http:
        await asyncio.gather(*(worker(http) for _ in range(concurrency)))
    return latencies, failures


def _percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else values[0]


@pytest.mark.slow
def test_load_200_reads_16_concurrent(app):
    started = time.perf_counter()
    latencies, failures = asyncio.run(_load(app, 200, 16))
    wall = time.perf_counter() - started
    print(
        f"\nload: 200 reads, 16 concurrent, {wall:.1f}s: p50 {_percentile(latencies, 50) * 1000:.0f} ms, "
        f"p95 {_percentile(latencies, 95) * 1000:.0f} ms, errors {len(failures)}"
    )
    assert failures == [] and len(latencies) == 200


@pytest.mark.slow
def test_more_decoders_than_adapter_slots_never_fail_a_queued_read(app):
    """Five decoders over two replicas of two slots each: evictions happen while other reads of
    the evicted decoder wait in the batch, and those reads are still answered."""
    latencies, failures = asyncio.run(_load(app, 40, 10, decoders=tuple(SAME_DECODER)))
    assert failures == [] and len(latencies) == 40


@pytest.mark.slow
def test_killing_a_replica_mid_load_loses_nothing_unreported(app):
    """Every request is either answered or reported failed; the app then serves again."""
    import ray
    from ray import serve

    def kill_one_model_replica():
        status = serve.status().applications[APP].deployments["ModelReplica"]
        assert status.status.value == "HEALTHY"
        actors = [a for a in ray.util.list_named_actors(all_namespaces=True) if "ModelReplica" in a["name"]]
        ray.kill(ray.get_actor(actors[0]["name"], namespace=actors[0]["namespace"]), no_restart=True)

    latencies, failures = asyncio.run(_load(app, 60, 8, on_half=kill_one_model_replica))
    print(f"\nkill: {len(latencies)} answered, {len(failures)} reported failed: {failures[:3]}")
    # Every request got an HTTP answer; only those in flight on the killed replica (at most the
    # concurrency) may fail, and they fail with 503 (retry), not a 500 or silence.
    assert len(latencies) + len(failures) == 60
    assert len(failures) <= 8 and all(f.startswith("503") for f in failures), failures
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # Serve replaces the replica
        deployment = serve.status().applications[APP].deployments["ModelReplica"]
        if deployment.status.value == "HEALTHY":
            break
        time.sleep(1)
    after, after_failures = asyncio.run(_load(app, 16, 4))
    assert after_failures == [] and len(after) == 16


@pytest.mark.slow
def test_serve_deploy_of_the_config_file(app, ray_cluster, decoder, tmp_path):
    """`serve deploy` of serve/config.yaml (as a second app beside the test app: the test cluster
    already serves HTTP, and its decoder lives in this session's MLflow store)."""
    import subprocess
    import sys
    from pathlib import Path

    import yaml
    from ray import serve

    config = yaml.safe_load((PROJECT_ROOT / "serve" / "config.yaml").read_text())
    for key in ("proxy_location", "http_options"):
        config.pop(key)
    [application] = config["applications"]
    application.update(
        name="deployed", route_prefix="/deployed", runtime_env={"env_vars": {"LATENTQA_API_TOKEN": TOKEN}}
    )
    # a batch wait far longer than any read here: a lone read on an idle replica must not pay it
    application["args"].update(
        decoders={"tiny": decoder.registry_uri}, mlflow=decoder.mlflow_settings(), batch_wait_timeout_s=10.0
    )
    for deployment in application["deployments"]:
        deployment["ray_actor_options"]["num_cpus"] = 0.25
        deployment.pop("autoscaling_config", None)
        deployment["num_replicas"] = 1
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "serve"), "deploy", str(path), "--address", ray_cluster.dashboard],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    try:
        deadline = time.monotonic() + 180
        while (
            time.monotonic() < deadline and serve.status().applications.get("deployed", None) is None
        ) or serve.status().applications["deployed"].status.value not in ("RUNNING", "DEPLOY_FAILED"):
            time.sleep(2)
        status = serve.status().applications["deployed"]
        assert status.status.value == "RUNNING", status
        body = {"dialogs": [DIALOG], "questions": ["Who?"], "max_new_tokens": 4}
        assert httpx.get(f"{app}/deployed/healthz", timeout=30).status_code == 200  # under its prefix, open too
        assert httpx.post(f"{app}/deployed/v1/read", json=body, timeout=60).status_code == 401
        out = httpx.post(f"{app}/deployed/v1/read", json=body, headers=AUTH, timeout=60)
        assert out.status_code == 200 and out.json()["decoder"] == f"models:/{DECODER_MODEL}/{decoder.version}", (
            out.text
        )
        started = time.perf_counter()
        httpx.post(f"{app}/deployed/v1/read", json=body, headers=AUTH, timeout=60).raise_for_status()
        assert time.perf_counter() - started < 5.0, "a lone read waited for a batch"
    finally:
        serve.delete("deployed")


def test_build_app_refuses_a_decoder_of_another_target_in_one_line(tmp_path):
    from latentqa.model_files import TARGET_FILE
    from serve.app import build_app

    smollm2_decoder = tmp_path / "smollm2-decoder"
    smollm2_decoder.mkdir()
    (smollm2_decoder / TARGET_FILE).write_text(
        json.dumps(
            {
                "name": "SmolLM2-135M-Instruct",
                "model_type": "llama",
                "num_hidden_layers": 30,
                "hidden_size": 576,
                "vocab_size": 49152,
            }
        )
    )
    with pytest.raises(SystemExit) as refused:  # the offline default's tiny target
        build_app({"decoders": {"smol": str(smollm2_decoder)}})
    message = str(refused.value)
    assert message.startswith("cannot serve:") and "\n" not in message
    assert "SmolLM2-135M-Instruct (llama, 30 blocks" in message and "tiny-llama (llama, 4 blocks" in message


def test_the_api_docs_render_with_no_network_beyond_the_app(app):
    """/docs is Swagger UI from the assets installed with fastapi-offline: in a headless Chromium
    that may reach nothing but the app, the page still lists the API's routes."""
    elsewhere = []

    def only_the_app(route):
        if route.request.url.startswith(app):
            route.continue_()
        else:
            elsewhere.append(route.request.url)
            route.abort()

    assert httpx.get(f"{app}/docs", timeout=30).status_code == 401  # the docs follow the API's auth
    assert httpx.get(f"{app}/openapi.json", timeout=30).status_code == 401
    with browser_page() as page:
        page.set_extra_http_headers(AUTH)
        page.route("**/*", only_the_app)
        page.goto(f"{app}/docs")
        read_route = page.locator('.opblock-summary-path[data-path="/v1/read"]')  # Swagger breaks paths with <wbr>
        try:
            read_route.wait_for(timeout=60_000)
        except Exception as err:
            raise AssertionError(
                f"no /v1/read on the page; blocked: {elsewhere}; page: {page.inner_text('body')[:1500]}"
            ) from err
        assert "LatentQA" in page.locator(".swagger-ui .info .title").inner_text()
    assert elsewhere == []


def test_a_fresh_checkout_serves_the_shipped_smollm2_decoder_or_says_what_to_do(tmp_path, capsys):
    """No decoder trained under runs/: the shipped SmolLM2 decoder, its target and its controls,
    said in one line; with a config named that has no decoder, one line naming the fixes."""
    from latentqa.config import load_config
    from latentqa.showcase import SHIPPED_CONFIG
    from serve.app import build_app, served_by_default

    if Path(load_config(SHIPPED_CONFIG).model.path).exists():  # prepared by infra/setup.sh
        chosen = served_by_default({"auth": "none"}, runs=tmp_path)
        assert chosen["config"] == str(SHIPPED_CONFIG)
        assert list(chosen["decoders"]) == ["smollm2-135m-instruct"] and "pirate" in chosen["controls"]
        said = capsys.readouterr().out
        assert said == (
            f"no decoder trained under {tmp_path}: serving the shipped SmolLM2 decoder "
            "(config=infra/configs/smollm2-135m-instruct.yaml)\n"
        )
    tiny = tmp_path / "tiny.yaml"
    tiny.write_text("patch: {read_layer: 1}\n")
    with pytest.raises(SystemExit) as refused:
        served_by_default({"config": str(tiny)}, runs=tmp_path)
    message = str(refused.value)
    assert message.startswith(f"cannot serve: no decoder trained under {tmp_path}; train one") and "\n" not in message
    assert "serve run serve.app:build_app config=infra/configs/smollm2-135m-instruct.yaml" in message
    with pytest.raises(SystemExit) as refused:  # a bad setting: one line naming it, no traceback
        build_app({"auth": "sometimes", "decoders": {"x": str(tmp_path)}})
    assert str(refused.value).startswith("cannot serve: serve.app:build_app: auth") and "\n" not in str(refused.value)


def test_a_registered_decoder_of_another_target_is_a_4xx_not_a_500(client, decoder, tmp_path):
    """Refused before anything is added to the replica's base, named without the server's folder."""
    import shutil

    from latentqa.config import load_config
    from latentqa.model_files import TARGET_FILE
    from latentqa_platform import tracking
    from latentqa_platform.settings import MlflowSettings

    other = shutil.copytree(decoder.folder, tmp_path / "decoder")
    identity = {"name": "SmolLM2-135M-Instruct", "model_type": "llama", "num_hidden_layers": 30}
    (other / TARGET_FILE).write_text(json.dumps({**identity, "hidden_size": 576, "vocab_size": 49152}))
    settings = MlflowSettings(**decoder.mlflow_settings())
    registered = tracking.register_shipped(settings, decoder.root, other, load_config(), "other-target", {})
    out = client.post("/v1/read", json={"dialogs": [DIALOG], "questions": ["Q?"], "decoder": registered})
    assert out.status_code == 422, out.text
    message = out.json()["message"]
    assert message.startswith("body.decoder: this decoder was trained on SmolLM2-135M-Instruct (llama, 30 blocks")
    assert str(tmp_path) not in message and "/tmp" not in message
    again = client.post("/v1/read", json={"dialogs": [DIALOG], "questions": ["Q?"], "decoder": registered})
    assert again.status_code == 422  # nothing was left half-mounted
    assert client.post("/v1/read", json={"dialogs": [DIALOG], "questions": ["Q?"]}).status_code == 200
