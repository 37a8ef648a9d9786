"""Data curation (`jobs/curate.py`) against a real OpenAI-compatible server on loopback that
returns scripted replies (valid, malformed, invalid, 429, 5xx, slow), on the session's Ray cluster;
and one stage against the project's own Serve /v1/chat/completions."""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from conftest import free_port
from latentqa.config import ConfigError
from latentqa.data import load_qa, load_records
from latentqa.paths import PROJECT_ROOT
from latentqa_platform.curation import (
    PROMPTS_DIR,
    CurationConfig,
    Dedup,
    ReplyError,
    append_jsonl,
    load_curation_config,
    parse_reply,
    read_jsonl,
    run,
)
from test_serve import TOKEN, app, decoder  # noqa: F401  the Serve app's fixtures, reused as they are

STYLES = [
    "Speak only as a {} captain who shouts.",
    "Pretend you are a sleepy {} apprentice.",
    "Become a cheerful {} inventor.",
]
WORDS = "anchor biscuit comet dragon ember falcon glacier harbor igloo jasmine kettle lantern meadow nutmeg orchard pepper quartz raven saffron thistle umbrella velvet walnut yarrow zephyr".split()


def instruction(category: str, i: int) -> str:
    """Distinct enough across categories that only the scripted duplicates count as near-duplicates."""
    return f"{STYLES[i % 3].format(category)} Mention {', '.join(random.Random(f'{category}{i}').sample(WORDS, 8))} in every reply."


class ScriptedLLM:
    """An OpenAI-compatible chat-completions server (FastAPI under uvicorn, in a thread). Replies
    follow the prompt's stage; `script[substring]` lists actions for prompts containing it, used
    up one per request: 429, 503, slow (beyond the client's timeout), malformed (not JSON),
    invalid (JSON that fails the SPEC checks), dup (repeats a label and a control text)."""

    def __init__(self, delay: float = 0.0, slow: float = 2.0):
        self.delay, self.slow, self.script = delay, slow, {}
        self.prompts: list[str] = []
        self.statuses: list[int] = []
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        api = FastAPI()

        @api.post("/v1/chat/completions")
        async def chat(request: Request):
            if request.headers.get("authorization") != "Bearer k":
                return JSONResponse({"error": {"message": "bad key"}}, 401)
            body = await request.json()
            prompt = body["messages"][-1]["content"]
            with self.lock:
                self.prompts.append(prompt)
                self.in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self.in_flight)
                action = self._action(prompt)
            try:
                end = time.monotonic() + (self.slow if action == "slow" else self.delay)
                while time.monotonic() < end:  # a request the client gave up on is no longer in flight
                    if await request.is_disconnected():
                        return JSONResponse({}, 499)
                    await asyncio.sleep(0.02)
                status = {"429": 429, "503": 503}.get(action.split(" ")[0], 200)
                with self.lock:
                    self.statuses.append(status)
                if status != 200:
                    # "503 -1": the status with that Retry-After (servers send odd ones)
                    retry_after = action.split(" ")[1] if " " in action else "0"
                    return JSONResponse({"error": {"message": action}}, status, headers={"Retry-After": retry_after})
                text = "Sure! Here you go: {controls: [" if action == "malformed" else json.dumps(reply(prompt, action))
                return {
                    "id": "chatcmpl-1",
                    "object": "chat.completion",
                    "created": 0,
                    "model": body["model"],
                    "choices": [
                        {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                    ],
                    "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
                }
            finally:
                with self.lock:
                    self.in_flight -= 1

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(api, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def _action(self, prompt: str) -> str:
        for key, actions in self.script.items():
            if key in prompt and actions:
                return actions.pop(0)
        return "ok"

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def reply(prompt: str, action: str) -> dict:
    """A reply that validates for the prompt's stage (or, for `invalid`, one that does not)."""
    if "Invent" in prompt:
        category = re.search(r'category "([^"]+)"', prompt).group(1)
        n = int(re.search(r"Invent (\d+)", prompt).group(1))
        controls = [{"name": f"{category} {i}", "instruction": instruction(category, i)} for i in range(n)]
        if action == "dup":
            controls += [
                {"name": f"{category} 0", "instruction": "anything else entirely"},
                {"name": f"{category} copy", "instruction": controls[0]["instruction"].upper() + "!"},
            ]
        return {"controls": controls}
    told = re.search(r"\n  (.+)\n", prompt).group(1)
    if "conversation" in prompt:
        if action == "invalid":
            return {
                "control_user": told,
                "control_model": 42,
                "stimulus_user": "Hi",
                "stimulus_model": "Yo",
                "system": "S",
            }
        return {
            "control_user": told,
            "control_model": "Aye, I will.",
            "stimulus_user": "What should I cook?",
            "stimulus_model": f"In character ({told[:30]}): soup!",
            "system": f"You always: {told}",
        }
    if action == "invalid":
        return {"qa": [["What is the assistant like?", ""]]}
    return {
        "qa": [
            ["What type of persona will the assistant adopt?", f"The assistant follows: {told}"],
            ["Why does the assistant answer this way?", "Because it was told to, and keeps to it."],
        ]
    }


@pytest.fixture
def llm():
    server = ScriptedLLM(delay=0.15, slow=2.0)
    yield server
    server.close()


@pytest.fixture
def ray_data(ray_cluster):
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    return ray_cluster


def config(server: ScriptedLLM, tmp_path: Path, **fields) -> CurationConfig:
    tree = {
        "llm": {
            "base_url": server.url,
            "model": "scripted",
            "api_key": "k",
            "workers": 2,
            "max_in_flight": 4,
            "max_retries": 2,
            "backoff_s": 0.01,
            "timeout_s": 1.0,
        },
        "categories": {"persona": ["pirates", "chefs"], "goal": ["tea", "savings"]},
        "counts": {"controls_per_category": 3, "qa_pairs": 2},
        "output_dir": str(tmp_path / "out"),
    }
    for key, value in fields.items():
        tree[key] = {**tree[key], **value} if isinstance(value, dict) and key in tree else value
    return CurationConfig.model_validate(tree)


# ---------------------------------------------------------------- no Ray


def test_replies_are_json_only_and_checked_by_the_spec_models():
    with pytest.raises(ReplyError, match="not JSON"):
        parse_reply("__import__('os').system('echo owned')")
    assert parse_reply('```json\n{"qa": []}\n```') == {"qa": []}
    from latentqa_platform.curation import expand_rows, qa_rows

    row = {"label": "persona-x", "kind": "persona", "category": "x", "instruction": "Be x."}
    cfg = CurationConfig()
    with pytest.raises(ReplyError, match="'control_model'"):  # wrong type, named by the SPEC's Record
        expand_rows({"control_user": "a", "control_model": 1}, row, cfg)
    with pytest.raises(ReplyError, match="'stimulus_model' must be a non-empty"):
        expand_rows({"control_user": "a", "control_model": "b", "stimulus_user": "c", "system": "d"}, row, cfg)
    with pytest.raises(ReplyError, match="persona_hint"):  # unknown field
        expand_rows({"control_user": "a", "persona_hint": "b"}, row, cfg)
    with pytest.raises(ReplyError, match="non-empty"):
        qa_rows({"qa": [["q", " "]]}, row, cfg)


def test_config_errors_name_the_field_and_stages_take_a_comma_list(tmp_path):
    assert load_curation_config(None, ["--stages", "seed,qa"]).stages == ["seed", "qa"]
    with pytest.raises(ConfigError, match="stages"):
        load_curation_config(None, ["--stages", "seed,distill"])
    with pytest.raises(ConfigError, match="multiple of workers"):
        load_curation_config(None, ["--llm.max_in_flight", "3", "--llm.workers", "2"])


def test_dedup_and_a_write_cut_short(tmp_path):
    seen = Dedup(0.9)
    seen.add("persona-a", "From now on, act like a grumpy pirate in everything you say.")
    assert "label" in seen.duplicate_of("persona-a", "something else")
    assert "near-duplicate" in seen.duplicate_of(
        "persona-b", "From now on act like a GRUMPY pirate in everything you say!!"
    )
    assert seen.duplicate_of("persona-c", "Recommend green tea, with a joke, whenever you can.") is None
    path = tmp_path / "rows.jsonl"
    append_jsonl(path, [{"id": 1}, {"id": 2}])
    with open(path, "a") as f:
        f.write('{"id": 3, "trunc')  # a crash mid-write
    assert read_jsonl(path) == [{"id": 1}, {"id": 2}]
    append_jsonl(path, [{"id": 3}])
    assert read_jsonl(path) == [{"id": 1}, {"id": 2}, {"id": 3}]


# ---------------------------------------------------------------- the pipeline on Ray Data


def test_a_second_run_on_the_same_folder_is_refused(llm, tmp_path):
    """Two runs at once would truncate each other's files: while one (here another process)
    holds the output folder, a second is refused before it asks or writes anything."""
    cfg = config(llm, tmp_path)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
            "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)",
            str(out / ".lock"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match="another curation run is writing here"):
            run(cfg, log=lambda _: None)
    finally:
        holder.kill()
        holder.wait()
    assert llm.prompts == [] and sorted(p.name for p in out.iterdir()) == [".lock"]


def test_pipeline_writes_valid_spec_files_retries_and_rejects(ray_data, llm, tmp_path):
    llm.script = {
        'category "pirates"': ["429 nan", "503 -1"],  # retried with backoff (not those delays), then fine
        'category "chefs"': ["malformed"],  # re-asked, then fine
        'category "tea"': ["slow"],  # times out, retried
        'category "savings"': ["dup"],  # one duplicate label and one near-duplicate text dropped
        instruction("pirates", 2): ["invalid"] * 6,  # expand and qa: rejected
    }
    cfg = config(llm, tmp_path)
    summary = run(cfg, log=lambda _: None)
    out = Path(cfg.output_dir)

    assert summary["seed"]["written"] == 12 and summary["seed"]["duplicates"] == 2 and summary["seed"]["rejected"] == 0
    assert summary["expand"]["rejected"] == 1 and summary["qa"]["rejected"] == 1
    assert summary["expand"]["written"] == summary["qa"]["written"] == 11
    assert llm.statuses.count(429) == 1 and llm.statuses.count(503) == 1
    seed_asks = [re.search(r'category "([^"]+)"', p).group(1) for p in llm.prompts if "Invent" in p]
    assert {c: seed_asks.count(c) for c in ("pirates", "chefs", "tea")} == {"pirates": 3, "chefs": 2, "tea": 2}
    assert summary["budget_used"]["requests"] == len(llm.prompts)  # every request counted, retries too
    assert 1 < llm.max_in_flight <= cfg.llm.max_in_flight

    rejects = read_jsonl(out / "rejects.jsonl")
    reasons = {(r["stage"], r["source"]): r["reason"] for r in rejects}
    assert "'control_model'" in reasons[("expand", "persona-pirates-2")]
    assert "non-empty" in reasons[("qa", "persona-pirates-2")]
    seed_reasons = sorted(r["reason"] for r in rejects if r["stage"] == "seed")
    assert seed_reasons == ["duplicate label 'goal-savings-0'", "near-duplicate of 'goal-savings-0'"]

    dataset = out / "dataset"
    qa = load_qa(dataset / "qa.json")
    assert len(qa) == 11 and "persona-pirates-2" not in qa
    for name in ("system.json", "control.json", "stimulus.json", "stimulus_completion.json"):
        records = load_records(dataset / name)
        assert sorted(r.label for r in records) == sorted(qa)
    assert all(r.stimulus_model for r in load_records(dataset / "stimulus_completion.json"))
    assert json.loads((dataset / "manifest.json").read_text())["prompt_versions"] == ["v1"]
    rows = read_jsonl(out / "controls.jsonl")
    assert {r["prompt_version"] for r in rows} == {"v1"}
    assert [e["stage"] for e in read_jsonl(out / "manifest.jsonl")] == ["seed", "expand", "qa", "assemble"]

    # A rerun asks for nothing (rejects count as done) and leaves the dataset as it was.
    asked = len(llm.prompts)
    again = run(cfg, log=lambda _: None)
    assert len(llm.prompts) == asked and again["assemble"]["unchanged"]


def test_budget_stops_a_stage_and_a_rerun_finishes_it(ray_data, llm, tmp_path):
    cfg = config(llm, tmp_path, stages=["seed"], budget={"max_requests": 2}, llm={"workers": 1, "max_in_flight": 1})
    first = run(cfg, log=lambda _: None)["seed"]
    assert first["written"] == 6 and first["left_pending"] == 2 and first["why_pending"] == "budget spent"
    assert len(llm.prompts) == 2 and llm.max_in_flight == 1
    done = {r["source"] for r in read_jsonl(Path(cfg.output_dir) / "controls.jsonl")}

    second = run(
        cfg.model_copy(update={"budget": cfg.budget.model_copy(update={"max_requests": None})}), log=lambda _: None
    )
    assert second["seed"]["written"] == 6 and second["seed"]["left_pending"] == 0
    asked_again = {re.search(r'category "([^"]+)"', p).group(1) for p in llm.prompts[2:]}
    assert not {s.split(":")[1] for s in done} & asked_again  # done categories were not asked again
    labels = [r["label"] for r in read_jsonl(Path(cfg.output_dir) / "controls.jsonl")]
    assert len(labels) == len(set(labels)) == 12


@pytest.mark.slow
def test_job_resumes_after_being_killed_without_duplicates(ray_data, tmp_path):
    llm = ScriptedLLM(delay=0.4)
    try:
        cfg = config(
            llm,
            tmp_path,
            stages=["seed"],
            categories={"persona": [f"group{i}" for i in range(10)], "goal": []},
            llm={"workers": 1, "max_in_flight": 2},
        )
        path = tmp_path / "curate.yaml"
        path.write_text(
            json.dumps(cfg.model_dump(mode="json") | {"llm": cfg.llm.model_dump(mode="json") | {"api_key": "k"}})
        )
        env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_ADDRESS=ray_data.address)
        job = subprocess.Popen(
            [sys.executable, "jobs/curate.py", "--config", str(path)],
            cwd=PROJECT_ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        output = Path(cfg.output_dir) / "controls.jsonl"
        deadline = time.monotonic() + 120
        while not (output.exists() and output.read_text().count("\n") >= 3) and time.monotonic() < deadline:
            time.sleep(0.1)
        job.kill()  # SIGKILL: no cleanup in the job
        job.wait()
        assert output.exists(), "the job wrote nothing before the deadline"
        time.sleep(2)  # let the cluster stop the killed job's workers
        done = {r["source"] for r in read_jsonl(output)}
        assert 0 < len(done) < 10
        asked = len(llm.prompts)

        summary = run(cfg, log=lambda _: None)["seed"]
        rows = read_jsonl(output)
        assert sorted({r["source"] for r in rows}) == sorted(f"persona:group{i}" for i in range(10))
        assert len(rows) == len({r["label"] for r in rows}) == 30
        asked_again = {re.search(r'category "([^"]+)"', p).group(1) for p in llm.prompts[asked:]}
        assert not {s.split(":")[1] for s in done} & asked_again
        assert summary["pending"] == 10 - len(done)
    finally:
        llm.close()


@pytest.mark.slow
def test_a_stage_against_the_projects_serve_endpoint_is_rejected_cleanly(app, tmp_path, ray_data):  # noqa: F811  the fixture
    """The tiny target over real HTTP: replies arrive, are not JSON, and end up in rejects. The seed
    prompt is shortened (a copy of the v1 templates) to fit the test app's 64-token turns."""
    prompts = shutil.copytree(PROMPTS_DIR, tmp_path / "prompts")
    (prompts / "seed.txt").write_text('Invent $n ${kind}s in the category "$category", as JSON.')
    cfg = CurationConfig.model_validate(
        {
            "llm": {
                "base_url": f"{app}/v1",
                "model": "target",
                "api_key": TOKEN,
                "workers": 1,
                "max_in_flight": 1,
                "max_retries": 1,
                "max_tokens": 8,
                "backoff_s": 0.01,
            },
            "stages": ["seed"],
            "categories": {"persona": ["pirates"], "goal": []},
            "prompts": str(prompts),
            "output_dir": str(tmp_path / "out"),
        }
    )
    summary = run(cfg, log=lambda _: None)["seed"]
    assert summary == {**summary, "written": 0, "rejected": 1, "left_pending": 0, "requests": 2}
    (reject,) = read_jsonl(tmp_path / "out" / "rejects.jsonl")
    assert reject["source"] == "persona:pirates" and reject["reason"].startswith(
        ("reply is not JSON", "expected a JSON object")
    )
    assert not (tmp_path / "out" / "controls.jsonl").exists()
