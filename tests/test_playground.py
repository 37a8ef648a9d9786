"""The web playground (serve/playground/): its engine pieces against the engine's own read and
score, and the page in Debian's Chromium against a real Serve app on loopback: token, the dialog
with the template's roles, read, score with baselines, layer map, a 422 next to its field and a 429
in the banner, and a control with a two-turn side-by-side chat. Screenshots go to the test's tmp folder, and one to docs/figures/playground.png."""

from __future__ import annotations

import json
import shutil
import statistics
import time

import httpx
import pytest

from conftest import browser_page
from latentqa.paths import PROJECT_ROOT
from latentqa_platform.serving import Overloaded
from test_serve import TOKEN, decoder, served_app  # noqa: F401  (decoder: the session's trained one)

AUTH = {"Authorization": f"Bearer {TOKEN}"}
DIALOG = [
    {"role": "system", "content": "You are a cheerful baker."},
    {"role": "user", "content": "What should I make today?"},
]
QUESTION = "What type of persona will the assistant adopt?"
CANDIDATES = ["The assistant is a baker.", "The assistant is a pirate.", "The assistant is a doctor."]


# ---------------------------------------------------------------- the engine's pieces


def test_baselines_and_layer_scores_agree_with_score(offline_session):
    from latentqa.reading import score, score_baselines, score_layers

    contrast = [{"role": "user", "content": "What is the capital of France?"}]
    plain = {s.answer: s.loss for s in score(offline_session, DIALOG, QUESTION, CANDIDATES)}
    conditions = score_baselines(offline_session, DIALOG, QUESTION, CANDIDATES, contrast)
    assert conditions["true"] == pytest.approx([plain[c] for c in CANDIDATES], abs=1e-4)
    assert conditions["shuffled"] != pytest.approx(conditions["true"], abs=1e-4)  # another dialog's activations
    assert conditions["none"] != pytest.approx(conditions["true"], abs=1e-4)
    layer = offline_session.config.patch.read_layer
    by_layer = score_layers(offline_session, DIALOG, QUESTION, CANDIDATES, [0, layer])
    assert by_layer[layer] == pytest.approx(conditions["true"], abs=1e-4)
    assert by_layer[0] != pytest.approx(by_layer[layer], abs=1e-4)


def test_answers_at_every_layer_are_the_reads_at_each(offline_session):
    from latentqa.reading import read, read_layers

    answers = read_layers(offline_session, DIALOG, QUESTION, [0, 2], max_new_tokens=4)
    for layer in (0, 2):
        assert answers[layer] == read(offline_session, [DIALOG], [QUESTION], read_layer=layer, max_new_tokens=4)[0][0]


# ---------------------------------------------------------------- the page in a browser


@pytest.fixture(scope="module")
def app(ray_cluster, decoder):  # noqa: F811
    """The app on a free loopback port, one model replica, auth on."""
    from latentqa_platform.serving import ServeSettings

    settings = ServeSettings(
        decoders={"tiny": decoder.registry_uri},
        mlflow=decoder.mlflow_settings(),
        max_turn_tokens=64,
        max_dialog_tokens=160,
        max_generated_tokens=600,
        max_scored_tokens=1200,
        max_queued_controls=1,  # a second control job while one runs is a real 429
        # a random tiny target repeats itself whatever steers it: the fluency bounds are for real models
        overrides=["--steer.max_repeated_trigrams", "null", "--steer.max_perplexity_ratio", "null"],
    )
    with served_app(settings, "latentqa-playground") as url:
        yield url


def test_the_page_is_open_and_the_api_is_not(app):
    for path in ("/", "/playground/playground.js", "/playground/playground.css"):
        assert httpx.get(f"{app}{path}", timeout=30).status_code == 200, path
    assert httpx.get(f"{app}/playground/__init__.py", timeout=30).status_code == 401  # only the page's files
    assert httpx.get(f"{app}/v1/target", timeout=30).status_code == 401
    target = httpx.get(f"{app}/v1/target", headers=AUTH, timeout=30).json()
    assert target["layers"] >= 2 and target["questions"]
    # the tiny model's template renders any role in a turn of its own (test_chat_format.py: others differ)
    assert target["roles"] == ["system", "user", "assistant", "tool"] and target["system_placement"] == "own_turn"


def test_layer_map_and_baselines_count_their_work(app):
    """A layer map runs the decoder once per layer, and the baselines three times: the budgets count it."""
    with httpx.Client(base_url=app, headers=AUTH, timeout=120) as client:
        layers = client.get("/v1/target").json()["layers"]
        body = {"dialog": DIALOG, "question": QUESTION, "max_new_tokens": 600 // layers + 1}
        refused = client.post("/v1/layers", json=body)
        assert refused.status_code == 422 and f"× {layers} layers" in refused.json()["message"]
        assert refused.json()["detail"][0]["loc"] == ["body", "max_new_tokens"]
        wrong = client.post("/v1/layers", json={**body, "layers": [0, layers], "max_new_tokens": 2})
        assert wrong.status_code == 422 and wrong.json()["detail"][0]["loc"] == ["body", "layers", "1"]
        many = {"dialog": DIALOG, "question": QUESTION, "candidates": [f"candidate {i} " * 4 for i in range(8)]}
        assert client.post("/v1/score", json=many).status_code == 200
        tripled = client.post("/v1/score", json={**many, "baselines": True})
        assert tripled.status_code == 422 and "with the two baselines" in tripled.json()["message"]


def test_the_playground_reads_scores_maps_and_steers_in_a_browser(app, tmp_path):
    with browser_page() as page:
        page.goto(app)
        page.locator("#banner").filter(has_text="401").wait_for(timeout=30_000)  # no token yet
        page.fill("#token", TOKEN)
        page.click("#token-form button")
        page.locator("#token-state").filter(has_text="connected").wait_for(timeout=30_000)
        assert page.locator("#decoder").input_value() == "tiny"

        page.click("#dialog-section summary")
        page.fill("#dialog-json", json.dumps(DIALOG))
        page.click("#paste-json")
        page.click("#add-turn")
        page.fill('textarea[aria-label="turn 2 content"]', "Bread, then cake.")
        assert page.locator(".turn").count() == 3
        roles = httpx.get(f"{app}/v1/target", headers=AUTH, timeout=30).json()["roles"]
        pickers = page.eval_on_selector_all(".turn select", "all => all.map(s => [...s.options].map(o => o.value))")
        assert pickers == [roles] * 3  # what the target's template renders, on every turn
        page.click("#copy-json")
        assert json.loads(page.input_value("#dialog-json"))[2] == {"role": "assistant", "content": "Bread, then cake."}
        page.locator(".turn").nth(2).get_by_role("button", name="Remove").click()
        assert page.locator(".turn").count() == 2

        page.click("#read")
        page.locator("#answers tbody tr").first.wait_for(timeout=60_000)
        questions = page.input_value("#questions").splitlines()
        assert page.locator("#answers tbody tr").count() == len(questions) == 2

        print(_page_read_overhead(page, app, questions))

        page.fill("#score-question", QUESTION)
        page.fill("#candidates", "\n".join(CANDIDATES))
        page.click("#score")
        page.locator("#ranked tbody tr").first.wait_for(timeout=60_000)
        shown = [row.locator("td").all_inner_texts() for row in page.locator("#ranked tbody tr").all()]
        expected = httpx.post(
            f"{app}/v1/score",
            headers=AUTH,
            json={"dialog": DIALOG, "question": QUESTION, "candidates": CANDIDATES},
            timeout=120,
        ).json()["ranked"]
        assert [(row[1], float(row[2])) for row in shown] == [(r["answer"], round(r["loss"], 3)) for r in expected]
        assert all(row[3] and row[4] for row in shown)  # shuffled and none beside every candidate

        page.click("#layer-map")
        page.locator("#layers tbody tr").first.wait_for(timeout=60_000)
        layers = httpx.get(f"{app}/v1/target", headers=AUTH, timeout=30).json()["layers"]
        assert page.locator("#layers tbody tr").count() == layers
        assert page.locator("#layers tbody tr.trained").count() == 1
        assert page.locator("#layers tbody tr").first.locator("td").count() == len(CANDIDATES)
        page.screenshot(path=str(tmp_path / "playground.png"), full_page=True)

        page.fill("#score-question", "")  # the API's 422 goes next to the field; the editor keeps its text
        page.click("#score")
        error = page.locator('.field-error[data-field="question"]')
        error.filter(has_text="at least 1 character").wait_for(timeout=30_000)
        assert page.locator(".turn").count() == 2 and page.input_value("#candidates") == "\n".join(CANDIDATES)
        assert page.input_value('textarea[aria-label="turn 0 content"]') == DIALOG[0]["content"]
        page.screenshot(path=str(tmp_path / "playground-error.png"), full_page=True)

        page.fill("#control-name", "playground")
        page.fill("#control-steps", "2")
        page.click("#start-control")
        page.locator("#control-status").filter(has_text="done").wait_for(timeout=120_000)
        steered = page.inner_text("#steered-title").removeprefix("Steered (").removesuffix(")")
        assert steered.startswith("latentqa-control-playground")

        busy = httpx.post(
            f"{app}/v1/controls", headers=AUTH, json={"name": "busy", "qa": [["Who?", "A baker."]], "steps": 1}
        )
        assert busy.status_code == 202  # the one control job the app runs at a time: the page's gets 429
        page.click("#start-control")
        page.locator("#banner").filter(has_text="429").wait_for(timeout=30_000)
        assert f"Retry in {Overloaded.retry_after_s} s" in page.inner_text("#banner")
        assert page.input_value("#control-text") == "Talk like a pirate in every reply."
        assert page.input_value('textarea[aria-label="turn 0 content"]') == DIALOG[0]["content"]

        chats = []  # the chat requests the page sends, and when each stream ends, in order
        page.on("request", _chat_recorder(chats, "sent"))
        page.on("requestfinished", _chat_recorder(chats, "ended"))
        turns = ["Tell me about your day.", "And tomorrow?"]
        for turn in turns:
            page.fill("#chat-input", turn)
            page.click("#chat-send")
            page.locator('#chat-steered[data-done="true"]').wait_for(timeout=60_000)
            page.locator('#chat-target[data-done="true"]').wait_for(timeout=60_000)
            assert page.input_value("#chat-input") == ""
        assert [kind for kind, _ in chats[:2]] == ["sent", "sent"]  # both sides stream at once
        second = {body["model"]: body["messages"] for kind, body in chats[2:] if kind == "sent"}
        for side, model in (("target", "target"), ("steered", steered)):
            first_reply = page.locator(f"#chat-{side} p.assistant").first.text_content()
            assert second[model] == [  # the shared user turns, and this side's own reply
                {"role": "user", "content": turns[0]},
                {"role": "assistant", "content": first_reply},
                {"role": "user", "content": turns[1]},
            ]
            assert page.locator(f"#chat-{side} p").count() == 4
        assert page.locator("#banner").is_hidden()
        page.screenshot(path=str(tmp_path / "playground-steer.png"), full_page=True)
        _wait_done(app, busy.json()["id"])  # not cut off when the app shuts down
    shutil.copy(tmp_path / "playground.png", PROJECT_ROOT / "docs" / "figures" / "playground.png")


def _chat_recorder(chats: list, kind: str):
    """A page event handler that notes each chat request's body under `kind`."""

    def record(request) -> None:
        if request.url.endswith("/v1/chat/completions"):
            chats.append((kind, request.post_data_json))

    return record


def _wait_done(app: str, job_id: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while httpx.get(f"{app}/v1/controls/{job_id}", headers=AUTH, timeout=30).json()["status"] in ("queued", "running"):
        assert time.monotonic() < deadline, f"control job {job_id} still running after {timeout} s"
        time.sleep(0.5)


def _page_read_overhead(page, app: str, questions: list[str], reads: int = 10) -> str:
    """What the page adds to a read (docs/benchmarks.md): the page's whole Read (fetch, JSON, the
    table drawn) against the same request from httpx, interleaved, on a short read."""
    page.fill("#max-new-tokens", "4")
    body = {"dialogs": [DIALOG], "questions": questions, "decoder": "tiny", "max_new_tokens": 4}
    page_ms, httpx_ms = [], []
    with httpx.Client(base_url=app, headers=AUTH, timeout=120) as client:
        for _ in range(reads):
            page_ms.append(
                page.evaluate(
                    "async () => { const t = performance.now(); await read(); return performance.now() - t; }"
                )
            )
            start = time.perf_counter()
            client.post("/v1/read", json=body).raise_for_status()
            httpx_ms.append((time.perf_counter() - start) * 1000)
    page.fill("#max-new-tokens", "32")
    page_median, httpx_median = statistics.median(page_ms), statistics.median(httpx_ms)
    assert page_median - httpx_median < 50, (page_ms, httpx_ms)  # a few ms, with room for a busy 2-core machine
    return (
        f"page read: median {page_median:.1f} ms from the page, {httpx_median:.1f} ms from httpx, "
        f"{reads} reads each: the page adds {page_median - httpx_median:.1f} ms"
    )
