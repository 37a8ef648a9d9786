"""Data curation: LatentQA training data from any OpenAI-compatible chat model, as a Ray Data pipeline.

Stages (each reads and writes JSONL in `output_dir`, so any one can be rerun or resumed alone):

    seed      config categories       -> controls.jsonl   personas and goals, one row per label
    expand    controls.jsonl          -> dialogs.jsonl    control/stimulus dialogs (+ a system prompt)
    qa        controls.jsonl          -> qa.jsonl         description and reasoning QA pairs per label
    assemble  dialogs.jsonl + qa.jsonl -> dataset/        the SPEC's five files

Every LLM row carries `source` (the id of the input row it came from). An input is done when its
source is in the stage's output or in `rejects.jsonl`; a rerun asks only for the rest (delete a
reject's line to have it asked again). The driver
appends each finished block and fsyncs it, so an interrupted run loses only requests in flight.

Requests: `llm.workers` Ray Data actors x `max_in_flight / workers` threads each, so at most
`max_in_flight` requests are ever open. The budget is one Ray actor shared by all of them (a
per-task split would strand budget on workers that run out of rows first). Replies are parsed with
`json.loads` only and validated with the engine's SPEC models (`latentqa.data`).
"""

from __future__ import annotations

import contextlib
import difflib
import fcntl
import hashlib
import json
import math
import os
import random
import re
import string
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import httpx
import numpy as np
import ray
import ray.data
from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator

from latentqa.config import ConfigError, StrictModel, merge_trees, parse_overrides, read_config_file, validation_message
from latentqa.data import QA_FILE, DataError, parse_qa, parse_records
from latentqa.paths import PROJECT_ROOT, RUNS_DIR

from . import raydata
from .tracking import slug

PROMPTS_DIR = PROJECT_ROOT / "datasets" / "curation" / "prompts" / "v1"
STAGES = ("seed", "expand", "qa", "assemble")
REJECTS = "rejects.jsonl"
MANIFEST = "manifest.jsonl"
LOCK_FILE = ".lock"  # held by the run writing the folder
DATASET = "dataset"

# ---------------------------------------------------------------- configuration


class LLMSettings(StrictModel):
    base_url: str = "http://127.0.0.1:8000/v1"
    """An OpenAI-compatible API root (`.../v1`); the default is the project's own Serve app."""
    model: str = "target"
    api_key: SecretStr | None = None
    """None: the environment variable named by `api_key_env` (unset: no Authorization header)."""
    api_key_env: str = "OPENAI_API_KEY"
    workers: int = Field(2, ge=1)
    """Ray Data actors calling the LLM."""
    max_in_flight: int = Field(4, ge=1)
    """Requests open at once, over all workers; a multiple of `workers` (each gets an equal share)."""
    cpus_per_worker: float = Field(0.25, gt=0)
    max_retries: int = Field(3, ge=0)
    """Per request on 429/5xx/timeouts, and again per row on replies that do not validate."""
    backoff_s: float = Field(1.0, ge=0)
    """First retry delay; doubles each attempt (with jitter), or the server's Retry-After."""
    timeout_s: float = Field(120, gt=0)
    temperature: float = Field(0.8, ge=0, le=2)
    max_tokens: int = Field(1024, ge=1)

    @model_validator(mode="after")
    def _exact_bound(self) -> LLMSettings:
        if self.max_in_flight % self.workers:
            raise ValueError(f"max_in_flight ({self.max_in_flight}) must be a multiple of workers ({self.workers})")
        return self

    def key(self) -> str | None:
        return self.api_key.get_secret_value() if self.api_key else os.environ.get(self.api_key_env)


class BudgetSettings(StrictModel):
    max_requests: int | None = Field(None, ge=1)
    """HTTP requests per run, retries included; None: no limit."""
    max_tokens: int | None = Field(None, ge=1)
    """Tokens per run (the server's `usage.total_tokens`); a request starts only while under it."""


class Counts(StrictModel):
    controls_per_category: int = Field(4, ge=1)
    qa_pairs: int = Field(4, ge=1)


class RayAddress(StrictModel):
    address: str | None = None
    """None: RAY_ADDRESS, else a running local cluster, else start one."""


class CurationConfig(StrictModel):
    llm: LLMSettings = LLMSettings()
    budget: BudgetSettings = BudgetSettings()
    stages: list[Literal["seed", "expand", "qa", "assemble"]] = list(STAGES)
    categories: dict[Literal["persona", "goal"], list[str]] = {
        "persona": ["sea-faring characters", "kitchen staff", "fantasy creatures"],
        "goal": ["healthy habits", "travel advice", "money saving"],
    }
    counts: Counts = Counts()
    system_variant: bool = True
    """Also write `system.json` (the behaviour set by a system prompt instead of the user)."""
    near_duplicate: float = Field(0.9, gt=0, le=1)
    """Control texts at least this similar (difflib ratio, normalised text) count as duplicates."""
    prompts: Path = PROMPTS_DIR
    output_dir: Path = RUNS_DIR / "curation"
    ray: RayAddress = RayAddress()

    @field_validator("stages", mode="before")
    @classmethod
    def _comma_list(cls, value):
        return [s.strip() for s in value.split(",") if s.strip()] if isinstance(value, str) else value


def load_curation_config(path: str | Path | None = None, overrides: list[str] | None = None) -> CurationConfig:
    """Defaults, then the YAML file, then dotted overrides; raises ConfigError naming the field."""
    tree = read_config_file(path) if path is not None else {}
    tree = merge_trees(tree, parse_overrides(overrides or []))
    try:
        return CurationConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(validation_message(str(path or "config"), err)) from None


# ---------------------------------------------------------------- prompt templates


@dataclass(frozen=True)
class Prompts:
    version: str  # the folder's VERSION
    sha: str  # of every template, so an edited "v1" is not mistaken for the original
    templates: dict[str, string.Template]


def load_prompts(folder: Path) -> Prompts:
    """`$name` templates (string.Template: no code, and JSON braces need no escaping)."""
    folder = Path(folder)
    try:
        version = (folder / "VERSION").read_text().strip()
        texts = {stage: (folder / f"{stage}.txt").read_text() for stage in ("seed", "expand", "qa")}
    except OSError as err:
        raise ConfigError(f"prompts: {err}") from None
    sha = hashlib.sha256(json.dumps(texts, sort_keys=True).encode()).hexdigest()[:16]
    return Prompts(version, sha, {k: string.Template(v) for k, v in texts.items()})


# ---------------------------------------------------------------- reply checks (one per LLM stage)


class ReplyError(ValueError):
    """A reply that does not validate; the message is the reject reason."""


def _check(rows: list[dict], source: str) -> None:
    """The SPEC's own record checks, as a reply error."""
    try:
        parse_records(rows, source)
    except DataError as err:
        raise ReplyError(str(err)) from None


def _require_object(reply: object, field: str) -> object:
    if not isinstance(reply, dict) or field not in reply:
        raise ReplyError(f"expected a JSON object with field {field!r}")
    return reply[field]


def seed_rows(reply: object, row: dict, config: CurationConfig) -> list[dict]:
    controls = _require_object(reply, "controls")
    if not isinstance(controls, list) or not controls:
        raise ReplyError("field 'controls': expected a non-empty list")
    out = []
    for index, item in enumerate(controls):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not slug(item["name"]):
            raise ReplyError(f"controls[{index}]: field 'name': expected a non-empty string")
        label = f"{row['kind']}-{slug(item['name'])}"
        _check([{"control_user": item.get("instruction"), "label": label}], f"controls[{index}]")
        out.append(
            {
                "id": label,
                "label": label,
                "kind": row["kind"],
                "category": row["category"],
                "instruction": item["instruction"],
            }
        )
    return out


def expand_rows(reply: object, row: dict, config: CurationConfig) -> list[dict]:
    record = {**reply, "label": row["label"]} if isinstance(reply, dict) else reply
    _check([record], "reply")  # types and unknown fields, by the SPEC's Record
    needed = ["control_user", "control_model", "stimulus_user", "stimulus_model"] + ["system"] * config.system_variant
    for field in needed:
        if not record.get(field, "").strip():
            raise ReplyError(f"reply: field {field!r} must be a non-empty string")
    return [{"id": row["label"], "label": row["label"], "record": record}]


def qa_rows(reply: object, row: dict, config: CurationConfig) -> list[dict]:
    try:
        pairs = parse_qa({row["label"]: _require_object(reply, "qa")}, "reply")[row["label"]]
    except DataError as err:
        raise ReplyError(str(err)) from None
    if not pairs:
        raise ReplyError("field 'qa': expected at least one [question, answer] pair")
    return [{"id": row["label"], "label": row["label"], "qa": [list(p) for p in pairs]}]


@dataclass(frozen=True)
class Stage:
    name: str
    output: str
    check: Callable[[object, dict, CurationConfig], list[dict]]
    variables: Callable[[dict, CurationConfig], dict]
    dedup_text: Callable[[dict], str] | None  # the control text compared for near-duplicates


LLM_STAGES = {
    "seed": Stage(
        "seed",
        "controls.jsonl",
        seed_rows,
        lambda r, c: {"kind": r["kind"], "category": r["category"], "n": c.counts.controls_per_category},
        lambda r: r["instruction"],
    ),
    "expand": Stage(
        "expand",
        "dialogs.jsonl",
        expand_rows,
        lambda r, c: {"kind": r["kind"], "category": r["category"], "instruction": r["instruction"]},
        lambda r: r["record"]["control_user"],
    ),
    "qa": Stage(
        "qa", "qa.jsonl", qa_rows, lambda r, c: {"instruction": r["instruction"], "n": c.counts.qa_pairs}, None
    ),
}


def parse_reply(text: str) -> object:
    """JSON only (never eval); a ```json fence around it is tolerated."""
    fenced = re.fullmatch(r"\s*```(?:json)?\s*(.*?)\s*```\s*", text, re.S)
    try:
        return json.loads(fenced.group(1) if fenced else text)
    except json.JSONDecodeError as err:
        raise ReplyError(f"reply is not JSON: {err}") from None


# ---------------------------------------------------------------- calling the LLM (Ray side)


class Budget:
    """Run-wide request and token counts; a Ray actor shared by every worker thread."""

    def __init__(self, max_requests: int | None, max_tokens: int | None):
        self.max_requests, self.max_tokens = max_requests, max_tokens
        self.requests = self.tokens = 0

    def take(self) -> bool:
        """One more request, if the budget allows it."""
        if (self.max_requests is not None and self.requests >= self.max_requests) or (
            self.max_tokens is not None and self.tokens >= self.max_tokens
        ):
            return False
        self.requests += 1
        return True

    def spend(self, tokens: int) -> None:
        self.tokens += tokens

    def used(self) -> dict:
        return {"requests": self.requests, "tokens": self.tokens}


class BudgetSpent(Exception):
    pass


class RequestFailed(Exception):
    """The endpoint kept failing (or refused the request); the row stays pending for a rerun."""


RETRYABLE = {408, 409, 429} | set(range(500, 600))


class Caller:
    """A Ray Data actor: `threads` rows at a time, each through prompt -> LLM -> checks."""

    def __init__(self, stage: str, config_json: str, api_key: str | None, budget, threads: int):
        self.budget = budget
        self.config = CurationConfig.model_validate_json(config_json)
        self.stage, self.prompts = LLM_STAGES[stage], load_prompts(self.config.prompts)
        llm = self.config.llm
        self.client = httpx.Client(
            base_url=llm.base_url.rstrip("/") + "/",
            timeout=llm.timeout_s,
            headers={"Authorization": f"Bearer {api_key}"} if api_key else {},
        )
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="curation")

    def __call__(self, batch: dict) -> dict:
        results = self.pool.map(self.one, [json.loads(r) for r in batch["row"]])
        return {"result": np.array([json.dumps(r) for r in results], dtype=object)}

    def one(self, row: dict) -> dict:
        """{"source", "rows"} when the reply validated, "reject" when it never did, "pending" otherwise."""
        template = self.prompts.templates[self.stage.name]
        prompt = template.substitute(self.stage.variables(row, self.config))
        result = {"source": row["id"], "requests": 0}
        reason = reply = ""
        for _ in range(self.config.llm.max_retries + 1):
            try:
                reply = self.complete(prompt, result)
                return {**result, "rows": self.stage.check(parse_reply(reply), row, self.config)}
            except ReplyError as err:
                reason = str(err)
            except (BudgetSpent, RequestFailed) as err:
                return {**result, "pending": str(err) or "budget spent"}
        return {**result, "reject": reason, "reply": reply[:2000]}

    def complete(self, prompt: str, result: dict) -> str:
        llm = self.config.llm
        body = {
            "model": llm.model,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": llm.temperature,
            "max_tokens": llm.max_tokens,
        }
        problem = ""
        for attempt in range(llm.max_retries + 1):
            if not ray.get(self.budget.take.remote()):
                raise BudgetSpent("budget spent")
            result["requests"] += 1
            retry_after = None
            try:
                response = self.client.post("chat/completions", json=body)
            except httpx.TransportError as err:  # timeouts, refused and dropped connections
                problem = f"{type(err).__name__}: {err}"
            else:
                if response.status_code == 200:
                    return self._content(response)
                problem = f"HTTP {response.status_code}: {response.text[:300]}"
                if response.status_code not in RETRYABLE:
                    raise RequestFailed(problem)
                retry_after = response.headers.get("retry-after")
            if attempt < llm.max_retries:
                time.sleep(_delay(llm.backoff_s, attempt, retry_after))
        raise RequestFailed(f"gave up after {llm.max_retries + 1} attempts: {problem}")

    def _content(self, response: httpx.Response) -> str:
        try:
            body = response.json()
            text = body["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as err:
            raise RequestFailed(f"not a chat completion: {err!r}: {response.text[:300]}") from None
        usage = body.get("usage") or {}
        self.budget.spend.remote(int(usage.get("total_tokens") or len(text) // 4))  # estimate when not reported
        return text or ""


def _delay(base: float, attempt: int, retry_after: str | None) -> float:
    """The server's Retry-After in seconds where it is a sane one (finite, not negative), else
    exponential backoff with jitter; capped at a minute."""
    try:
        seconds = float(retry_after) if retry_after is not None else math.nan
    except ValueError:  # an HTTP date, or garbage
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds >= 0):
        seconds = base * 2**attempt * (0.5 + random.random())
    return min(seconds, 60.0)


# ---------------------------------------------------------------- files (driver side)


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a stage file. A last line without its newline is a write cut short by a crash:
    it was never complete, so it is cut off before anything is appended."""
    if not path.exists():
        return []
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if len(complete) < len(data):
        with open(path, "r+b") as f:
            f.truncate(len(complete))
    rows = []
    for number, line in enumerate(complete.decode("utf-8").splitlines(), 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: line {number}: not valid JSON: {err}") from None
    return rows


def append_jsonl(path: Path, rows: list[dict]) -> None:
    if rows:
        with open(path, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
            f.flush()
            os.fsync(f.fileno())


def _normal(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text.lower()).split())


class Dedup:
    """Labels seen, and control texts compared by similarity of their normalised form."""

    def __init__(self, ratio: float):
        self.ratio, self.labels, self.texts = ratio, set(), {}

    def duplicate_of(self, label: str, text: str | None) -> str | None:
        if label in self.labels:
            return f"duplicate label {label!r}"
        if text is not None:
            norm = _normal(text)
            for other, other_label in self.texts.items():
                matcher = difflib.SequenceMatcher(None, norm, other)
                if (
                    matcher.real_quick_ratio() >= self.ratio
                    and matcher.quick_ratio() >= self.ratio
                    and matcher.ratio() >= self.ratio
                ):
                    return f"near-duplicate of {other_label!r}"
        return None

    def add(self, label: str, text: str | None) -> None:
        self.labels.add(label)
        if text is not None:
            self.texts[_normal(text)] = label


def _seed_inputs(config: CurationConfig) -> list[dict]:
    return [
        {"id": f"{kind}:{category}", "kind": kind, "category": category}
        for kind, categories in config.categories.items()
        for category in categories
    ]


def _stage_inputs(stage: str, config: CurationConfig) -> list[dict]:
    if stage == "seed":
        return _seed_inputs(config)
    controls = Path(config.output_dir) / LLM_STAGES["seed"].output
    if not controls.exists():
        raise ConfigError(f"{controls} is missing: run the seed stage first")
    return read_jsonl(controls)


def run_llm_stage(stage_name: str, config: CurationConfig, prompts: Prompts, budget) -> dict:
    """One LLM stage over the inputs not yet done; returns its counts."""
    stage, out_dir = LLM_STAGES[stage_name], Path(config.output_dir)
    output, rejects = out_dir / stage.output, out_dir / REJECTS
    done_rows = read_jsonl(output)
    mixed = {r.get("prompt_sha") for r in done_rows} - {prompts.sha}
    if mixed:
        raise ConfigError(
            f"{output} was written with other prompts ({', '.join(sorted(map(str, mixed)))}; these are "
            f"{prompts.version} {prompts.sha}): choose a new output_dir"
        )
    done = {r["source"] for r in done_rows} | {r["source"] for r in read_jsonl(rejects) if r["stage"] == stage_name}
    pending = [r for r in _stage_inputs(stage_name, config) if r["id"] not in done]
    counts = {
        "inputs_done_before": len(done),
        "pending": len(pending),
        "written": 0,
        "rejected": 0,
        "duplicates": 0,
        "left_pending": 0,
        "requests": 0,
    }
    if not pending:
        return counts
    seen = Dedup(config.near_duplicate)
    for r in done_rows:
        seen.add(r["label"], stage.dedup_text(r) if stage.dedup_text else None)
    threads = config.llm.max_in_flight // config.llm.workers
    results = ray.data.from_items([{"row": json.dumps(r)} for r in pending]).map_batches(
        Caller,
        fn_constructor_kwargs={
            "stage": stage_name,
            "config_json": config.model_dump_json(),
            "budget": budget,
            "api_key": config.llm.key(),
            "threads": threads,
        },  # resolved here: workers may lack the env
        batch_size=threads,
        compute=ray.data.ActorPoolStrategy(size=config.llm.workers),
        num_cpus=config.llm.cpus_per_worker,
    )
    stamp = {"prompt_version": prompts.version, "prompt_sha": prompts.sha}
    for batch in results.iter_batches(batch_size=None, batch_format="numpy"):
        keep, dropped = [], []
        for result in map(json.loads, batch["result"]):
            counts["requests"] += result["requests"]
            if "pending" in result:
                counts["left_pending"] += 1
                counts["why_pending"] = result["pending"]
                continue
            if "reject" in result:
                counts["rejected"] += 1
                dropped.append(
                    {
                        "stage": stage_name,
                        "source": result["source"],
                        "reason": result["reject"],
                        "reply": result["reply"],
                        **stamp,
                    }
                )
            for row in result.get("rows", []):
                text = stage.dedup_text(row) if stage.dedup_text else None
                why = seen.duplicate_of(row["label"], text)
                if why:  # kept in rejects too, so a resumed run knows this source is done
                    counts["duplicates"] += 1
                    dropped.append(
                        {
                            "stage": stage_name,
                            "source": result["source"],
                            "reason": why,
                            "reply": json.dumps(row),
                            **stamp,
                        }
                    )
                else:
                    seen.add(row["label"], text)
                    keep.append({**row, "source": result["source"], **stamp})
        append_jsonl(output, keep)  # output first: a crash between the two leaves the source done
        append_jsonl(rejects, dropped)
        counts["written"] += len(keep)
    return counts


def assemble(config: CurationConfig) -> dict:
    """The SPEC's five files from dialogs.jsonl and qa.jsonl (labels present in both), checked by the
    engine's loaders' own functions, written aside and renamed into `dataset/` in one step."""
    out_dir = Path(config.output_dir)
    dialogs = {r["label"]: r for r in read_jsonl(out_dir / LLM_STAGES["expand"].output)}
    qa = {r["label"]: r["qa"] for r in read_jsonl(out_dir / LLM_STAGES["qa"].output)}
    labels = [label for label in dialogs if label in qa]
    if not labels:
        raise ConfigError(f"{out_dir}: no label has both dialogs and QA pairs yet: run the expand and qa stages")
    full = [dialogs[label]["record"] for label in labels]
    files = {
        "control.json": [{"control_user": r["control_user"], "label": r["label"]} for r in full],
        "stimulus.json": [{k: r[k] for k in ("control_user", "control_model", "stimulus_user", "label")} for r in full],
        "stimulus_completion.json": [
            {k: r[k] for k in ("control_user", "control_model", "stimulus_user", "stimulus_model", "label")}
            for r in full
        ],
    }
    if config.system_variant:
        files["system.json"] = [
            {"system": r["system"], "stimulus_user": r["stimulus_user"], "label": r["label"]} for r in full
        ]
    for name, rows in files.items():
        parse_records(rows, name)
    files[QA_FILE] = parse_qa({label: qa[label] for label in labels}, QA_FILE)
    versions = sorted({dialogs[label]["prompt_version"] for label in labels})
    files["manifest.json"] = {
        "labels": len(labels),
        "prompt_versions": versions,
        "records": {k: len(v) for k, v in files.items() if k != QA_FILE},
    }
    target = out_dir / DATASET
    texts = {name: json.dumps(data, indent=1, ensure_ascii=False) + "\n" for name, data in files.items()}
    if target.exists():
        if all((target / n).exists() and (target / n).read_text() == t for n, t in texts.items()):
            return {"labels": len(labels), "unchanged": True}
        raise ConfigError(
            f"{target} exists with other contents; move it away to assemble again (nothing is overwritten)"
        )
    staging = Path(tempfile.mkdtemp(prefix=".dataset-", dir=out_dir))
    for name, text in texts.items():
        (staging / name).write_text(text)
    staging.rename(target)
    return {"labels": len(labels), "dropped_without_pair": len(set(dialogs) ^ set(qa))}


@contextlib.contextmanager
def _only_run_in(out_dir: Path) -> Iterator[None]:
    """Hold `<out_dir>/.lock` for the run; another run (any process) is refused while it is held."""
    handle = open(out_dir / LOCK_FILE, "a")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(
                f"{out_dir}: another curation run is writing here ({out_dir / LOCK_FILE} is held); "
                "wait for it to end, or choose another output_dir"
            ) from None
        yield
    finally:
        handle.close()  # releases the lock


def run(config: CurationConfig, log: Callable[[str], None] = print) -> dict:
    """The chosen stages in pipeline order; each stage's counts are appended to manifest.jsonl."""
    prompts = load_prompts(config.prompts)
    out_dir = Path(config.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary, budget = {}, None
    with _only_run_in(out_dir):  # two runs at once would truncate each other's files
        try:
            for name in [s for s in STAGES if s in config.stages]:
                started = time.time()
                if name == "assemble":
                    counts = assemble(config)
                else:
                    if budget is None:
                        raydata.connect(config.ray.address)
                        budget = ray.remote(num_cpus=0)(Budget).remote(
                            config.budget.max_requests, config.budget.max_tokens
                        )
                    counts = run_llm_stage(name, config, prompts, budget)
                summary[name] = counts
                log(f"{name}: {json.dumps(counts)}")
                entry = {
                    "stage": name,
                    "started": started,
                    "seconds": round(time.time() - started, 3),
                    "counts": counts,
                    "prompt_version": prompts.version,
                    "prompt_sha": prompts.sha,
                    "llm": {"base_url": config.llm.base_url, "model": config.llm.model},
                }
                append_jsonl(out_dir / MANIFEST, [entry])
            if budget is not None:
                summary["budget_used"] = ray.get(budget.used.remote())
        finally:
            if budget is not None:
                ray.kill(budget)
    return summary
