"""Train a LatentQA decoder on a Ray cluster: Ray Data in, Ray Train across workers, MLflow out.

    python jobs/train.py                                   # offline default; starts or joins local Ray
    python jobs/train.py --train.max_steps 20 --strategy.kind fsdp
    python jobs/train.py --config my_run.yaml --ray.num_workers 8 --ray.use_gpu true
    ray job submit --working-dir . -- python jobs/train.py --train.output_dir /abs/runs

The recipe, top to bottom (one section of this file each):

1. config   the engine's `LatentQAConfig` plus this job's `ray:` and `mlflow:` sections
            (`jobs/ray_config.py`), from one YAML file and dotted overrides, validated first;
2. data     the paper's five files per folder (or their .jsonl twins) read with Ray Data,
            validated by the engine (errors name file, record and field), expanded to examples
            and laid out into token ids + spans, all before a single worker starts;
3. train    a `TorchTrainer`: each worker loads one base copy, wraps it in the engine's `Strategy`
            (ddp, fsdp or deepspeed), streams its shard through `latentqa.training.fit`, evaluates
            and checkpoints every `ray.checkpoint_every` steps (PEFT adapter, training state, RNG
            and progress); rerunning with the same `--train.run_name` resumes exactly;
4. track    one MLflow run per run name: the config, data hashes and code version as params and
            tags, loss/lr/throughput/eval as metrics, the adapter as an artifact, and the decoder
            registered as `latentqa-decoder-<target model>` with its read/write layers as tags;
5. read     the new decoder reads a held-out dialog and the answers are printed.

Outputs: `<train.output_dir>/<run name>/` holds `decoder/` (the final PEFT adapter, where `latentqa
read` finds it), `config.json` (the engine config), `job.json`, `metrics.json` and, with the
default storage, Ray Train's `checkpoint_*` folders. A run without `--train.run_name` gets a
timestamped name, as with `latentqa train`.

Under `ray job submit` the cluster's Python must import `latentqa` (installed, or
`--runtime-env-json '{"env_vars": {"PYTHONPATH": "<abs>/platform"}}'`); give an absolute
`--train.output_dir` when the cluster runs from the uploaded copy of the project.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
import ray.train
import torch
from ray.train import Checkpoint, CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

import latentqa.paths
from latentqa.config import ConfigError, LatentQAConfig
from latentqa.data import (
    QA_FILE, DataError, DatasetSpec, Example, Record, expand, parse_json_or_jsonl, parse_qa, parse_records, read_dialog,
)
from latentqa.layout import LaidOutExample, LayoutError, ReadSide, WriteSide, collate
from latentqa.strategy import StrategyConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))  # ray_config beside this file, however run
from ray_config import JobSettings, artifact_location, load_job_config, tracking_uri  # noqa: E402

QUESTIONS = ["What type of persona will the assistant adopt?", "What is the assistant trying to do?"]


# ---------------------------------------------------------------- 1. config


def parse_args(argv: list[str] | None) -> tuple[LatentQAConfig, JobSettings, StrategyConfig]:
    sections = {"ray": JobSettings().ray, "mlflow": JobSettings().mlflow, "strategy": StrategyConfig()}
    parser = argparse.ArgumentParser(
        prog="jobs/train.py",
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a LatentQA decoder with Ray Train. Any config field is an override: "
        "--train.lr 3e-5, --strategy.kind fsdp, --ray.num_workers 4, --mlflow.experiment NAME.",
        epilog="engine sections (see README): model, lora, patch, data, train\n"
        + "\n".join(f"{name}: " + ", ".join(f"{k}={v}" for k, v in section.model_dump().items())
                    for name, section in sections.items()),  # fmt: skip
    )
    parser.add_argument("--config", type=Path, help="YAML file of config sections (engine + ray + mlflow)")
    args, overrides = parser.parse_known_args(argv)
    config, settings = load_job_config(args.config, overrides)
    strategy = strategy_config(config)
    if config.train.eval_every and config.data.eval is None:
        config.train.eval_every = 0
    return config, settings, strategy


def strategy_config(config: LatentQAConfig) -> StrategyConfig:
    """`strategy:` section (kind ddp by default) + the train section's accumulation and clipping."""
    fields = {"kind": "ddp", **config.strategy}
    for key, value in (("grad_accum_steps", config.train.grad_accum), ("max_grad_norm", config.train.max_grad_norm)):
        if key in fields and fields[key] != value:
            raise ConfigError(f"strategy.{key}: set it through train.{'grad_accum' if key == 'grad_accum_steps' else key}")
        fields[key] = value
    try:
        return StrategyConfig.model_validate(fields)
    except Exception as err:  # pydantic ValidationError: name the section
        raise ConfigError(f"strategy: {err}") from None


# ---------------------------------------------------------------- 2. data (Ray Data + the engine's checks)


def _file_path(row: dict) -> str:
    return str(row["path"]).removeprefix("local://")


def _examples_of_file(row: dict, qa: dict, exclude: tuple[str, ...]) -> list[dict]:
    """flat_map: one file's bytes -> its validated examples (record x QA pair), one row each."""
    path = _file_path(row)
    records = parse_records(parse_json_or_jsonl(row["bytes"].decode("utf-8"), path), path)
    return [
        {"record": e.record.model_dump_json(), "question": e.question, "answer": e.answer, "source": e.source}
        for e in expand(records, qa, path, exclude)
    ]


def _example(row: dict) -> Example:
    return Example(Record.model_validate_json(row["record"]), row["question"], row["answer"], row["source"])


_LAYOUTS: dict[str, Any] = {}


def _layout(config_json: str):
    """The engine's Layout for the target's tokenizer, built once per Ray worker process."""
    if config_json not in _LAYOUTS:
        from transformers import AutoConfig

        from latentqa.chat_format import ChatFormat
        from latentqa.layout import Layout
        from latentqa.models import load_tokenizer

        config = LatentQAConfig.model_validate_json(config_json)
        max_positions = getattr(AutoConfig.from_pretrained(config.model.path), "max_position_embeddings", None)
        layout = Layout(ChatFormat(load_tokenizer(config.model)), config.patch.thought_tokens, max_positions)
        _LAYOUTS[config_json] = layout
    return _LAYOUTS[config_json]


def _lay_out_batch(batch, config_json: str):
    """map_batches: examples -> the engine's token layout, kept as list columns + spans."""
    import pyarrow as pa

    layout = _layout(config_json)
    laid = [layout.example(_example(row), "train") for row in batch.to_pylist()]
    ints = pa.list_(pa.int32())
    return pa.table(
        {
            "read_ids": pa.array([e.read.ids for e in laid], ints),
            "read_masked_span": pa.array([list(e.read.masked_span) for e in laid], ints),
            "read_patched_span": pa.array([list(e.read.patched_span) for e in laid], ints),
            "write_ids": pa.array([e.write.ids for e in laid], ints),
            "write_patched_span": pa.array([list(e.write.patched_span) for e in laid], ints),
            "labels": pa.array([e.write.labels for e in laid], ints),
        }
    )


def laid_out_examples(table) -> list[LaidOutExample]:
    """Rows of the laid-out dataset back into the engine's `LaidOutExample`s (for `collate`)."""
    return [
        LaidOutExample(
            ReadSide(r["read_ids"], tuple(r["read_masked_span"]), tuple(r["read_patched_span"])),
            WriteSide(r["write_ids"], tuple(r["write_patched_span"]), r["labels"]),
        )
        for r in table.to_pylist()
    ]


def _data_error(err: BaseException) -> Exception | None:
    """The engine's DataError/LayoutError behind a (Ray-wrapped) exception, if that is what it is.

    Ray Data re-raises a task's error as RayTaskError(UserCodeException) whose chain may not
    hold the original across processes; its message always quotes the remote traceback.
    """
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, (DataError, LayoutError)):
            return err
        quoted = re.search(r"latentqa\.(?:data\.DataError|layout\.LayoutError): (.+)", str(err))
        if quoted:
            return DataError(quoted.group(1).strip())
        err = getattr(err, "cause", None) or err.__cause__ or err.__context__
    return None


@dataclasses.dataclass
class DataSet:
    examples: ray.data.Dataset  # validated examples (record JSON, question, answer, source)
    files: dict[str, str]  # path -> sha256


def read_set(spec: DatasetSpec, name: str) -> DataSet:
    """One set (a folder of the paper's files, or their .jsonl twins), read with Ray Data and
    validated by the engine; raises DataError naming the file, record and field."""
    folder = Path(spec.path)
    qa_path = folder / QA_FILE
    if not qa_path.exists() and not qa_path.with_suffix(".jsonl").exists():
        raise DataError(f"{folder}: {QA_FILE} is missing")
    qa_path = qa_path if qa_path.exists() else qa_path.with_suffix(".jsonl")
    record_paths = [folder / f for f in spec.files if (folder / f).exists()]
    record_paths += [(folder / f).with_suffix(".jsonl") for f in spec.files if (folder / f).with_suffix(".jsonl").exists()]
    if not record_paths:
        raise DataError(f"{folder}: none of {', '.join(spec.files)} (or .jsonl) found")

    files = ray.data.read_binary_files([str(p) for p in [qa_path, *record_paths]], include_paths=True).materialize()
    hashes = {_file_path(r): hashlib.sha256(r["bytes"]).hexdigest() for r in files.iter_rows()}
    qa_row = next(r for r in files.iter_rows() if _file_path(r) == str(qa_path))
    qa = parse_qa(parse_json_or_jsonl(qa_row["bytes"].decode("utf-8"), str(qa_path)), str(qa_path))

    examples = files.filter(lambda r: _file_path(r) != str(qa_path)).flat_map(
        _examples_of_file, fn_kwargs={"qa": qa, "exclude": tuple(spec.filter)}
    )
    examples = examples.random_shuffle(seed=spec.seed).materialize()  # runs the checks now
    if spec.train_percent < 1.0:
        examples = examples.limit(round(examples.count() * spec.train_percent)).materialize()
    if examples.count() == 0:
        raise DataError(f"{folder}: no examples in the {name} set")
    return DataSet(examples, hashes)


def lay_out(examples: ray.data.Dataset, config: LatentQAConfig) -> ray.data.Dataset:
    return examples.map_batches(
        _lay_out_batch, batch_format="pyarrow", batch_size=256, fn_kwargs={"config_json": config.model_dump_json()}
    ).materialize()


# ---------------------------------------------------------------- 3. the train loop (one per worker)


def train_loop_per_worker(ctx: dict) -> None:
    from latentqa.evaluation import evaluate
    from latentqa.models import DECODER
    from latentqa.session import LatentQA
    from latentqa.strategy import Strategy
    from latentqa.training import TrainProgress, adamw_factory, cosine_with_warmup, fit

    config = LatentQAConfig.model_validate_json(ctx["config"])
    train = config.train
    torch.manual_seed(train.seed)
    lqa = LatentQA.load(config, train_decoder=True)  # one base copy per worker
    strategy = Strategy.create(StrategyConfig.model_validate(ctx["strategy"]))
    total = ctx["total_steps"]
    strategy.prepare(lqa.model, adamw_factory(train), lambda opt: cosine_with_warmup(opt, train.warmup_steps, total))
    tracker = _Tracker(ctx["mlflow"]) if strategy.is_main and ctx["mlflow"] else None

    progress = TrainProgress()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            strategy.load_training_state(Path(folder) / "state")
            progress = TrainProgress(**json.loads((Path(folder) / "progress.json").read_text()))
            rng = Path(folder) / f"rng_rank{strategy.rank}.pt"
            if rng.exists():  # absent when resuming on more workers
                _set_rng_state(torch.load(rng, weights_only=False))
        _say(strategy, f"resumed from {checkpoint.path} at step {progress.step} (epoch {progress.epoch})")

    shard = ray.train.get_dataset_shard("train")
    pad_id = lqa.chat_format.pad_id

    def epoch_batches(epoch: int, skip: int):
        batches = shard.iter_batches(
            batch_size=train.batch_size,
            batch_format="pyarrow",
            local_shuffle_buffer_size=64 * train.batch_size,
            local_shuffle_seed=train.seed + epoch,  # with ordered splits: the same order on resume
        )
        for index, table in enumerate(batches):
            if index >= skip:
                yield collate(laid_out_examples(table), pad_id).to(strategy.device)

    eval_examples = [_example(r) for r in ray.train.get_dataset_shard("eval").iter_rows()] if ctx["has_eval"] else []

    def run_eval() -> dict[str, float]:
        # Every rank evaluates (FSDP/ZeRO-3 forwards are collective), all on the same examples.
        with _full_root(strategy):
            result = evaluate(lqa, eval_examples, batch_size=train.batch_size, max_batches=train.eval_batches)
        return result.as_metrics()

    def save_and_report(metrics: dict[str, float], name: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            strategy.save_adapter(folder / "adapter", DECODER)  # PEFT format, written by rank 0
            strategy.save_training_state(folder / "state")  # deepspeed: every rank writes its shard
            torch.save(_rng_state(), folder / f"rng_rank{strategy.rank}.pt")  # dropout: exact resume
            if strategy.is_main:
                (folder / "progress.json").write_text(json.dumps(dataclasses.asdict(progress)))
            # Every rank reports its folder; Ray merges them into one checkpoint directory.
            ray.train.report(
                {**metrics, "step": progress.step, "epoch": progress.epoch},
                checkpoint=Checkpoint.from_directory(tmp),
                checkpoint_dir_name=name,
            )

    def on_step(progress: TrainProgress, metrics: dict[str, float]) -> None:
        if tracker:
            tracker.log(metrics, progress.step)
        if progress.step % 10 == 0 or "eval/loss_true" in metrics:
            _say(strategy, f"step {progress.step}/{total}: " + _format(metrics))
        if ctx["checkpoint_every"] and progress.step % ctx["checkpoint_every"] == 0 and progress.step < total:
            save_and_report(metrics, f"checkpoint_{progress.step:06d}")
        if ctx["fail_after_step"] == progress.step:
            raise RuntimeError(f"fail_after_step={progress.step}: stopping on purpose (tests)")

    if ctx["has_eval"] and train.eval_every and progress.step == 0:
        first = run_eval()
        if tracker:
            tracker.log(first, 0)
        _say(strategy, "step 0: " + _format(first))
    fit(strategy, epoch_batches, ctx["steps_per_epoch"], train, config.patch, progress,
        run_eval if ctx["has_eval"] else None, on_step)  # fmt: skip
    final = run_eval() if ctx["has_eval"] else {}
    if tracker and final:
        tracker.log({f"final/{k.split('/', 1)[1]}": v for k, v in final.items()}, progress.step)
    last = progress.history[-1] if progress.history else {}
    save_and_report({**{k: v for k, v in last.items() if k != "step"}, **final, "final": 1},
                    f"checkpoint_{progress.step:06d}_final")  # fmt: skip


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _say(strategy, text: str) -> None:
    if strategy.is_main:  # not print(): Ray Train tees a patched print to a wrapped stdout twice
        sys.stdout.write(text + "\n")
        sys.stdout.flush()


def _format(metrics: dict[str, float]) -> str:
    return "  ".join(f"{k}={v:.4g}" for k, v in metrics.items())


class _full_root:
    """FSDP2 gathers the root's own parameters (embeddings, norm, head) only around `forward`;
    evaluation calls the model's other methods, so gather them for its duration."""

    def __init__(self, strategy):
        self.fsdp = strategy.kind == "fsdp"
        self.model = strategy.model

    def __enter__(self):
        if self.fsdp:
            # The root must initialise before any block runs on its own (an evaluation before the
            # first training forward would make block 0 a root); FSDP2 has no public call for it.
            self.model._get_fsdp_state()._lazy_init()
            self.model.unshard()

    def __exit__(self, *exc):
        if self.fsdp:
            self.model.reshard()


class _Tracker:
    """Rank 0's MLflow logging into the run the driver opened."""

    def __init__(self, mlflow_ctx: dict):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(mlflow_ctx["tracking_uri"])
        self.run_id = mlflow_ctx["run_id"]

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])


# ---------------------------------------------------------------- 4. MLflow (driver side)


def model_slug(path: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", Path(path.rstrip("/")).name.lower()).strip("-") or "model"


def code_version() -> dict[str, str]:
    """The git commit (when the code is a checkout) and a hash of the engine and job sources,
    which identifies the code also where there is no .git (e.g. a `ray job submit` package)."""
    digest = hashlib.sha256()
    roots = [Path(latentqa.paths.__file__).parent, Path(__file__).resolve().parent]
    for path in sorted(p for root in roots for p in root.glob("*.py")):
        digest.update(path.name.encode() + path.read_bytes())
    tags = {"latentqa.code_sha256": digest.hexdigest()[:16]}
    try:
        root = Path(__file__).resolve().parents[1]
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, timeout=10)
        if sha.returncode == 0:
            tags["mlflow.source.git.commit"] = sha.stdout.strip()
            tags["latentqa.git_dirty"] = str(bool(dirty.stdout.strip())).lower()
    except (OSError, subprocess.SubprocessError):
        pass
    return tags


def _flatten(tree: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, str) else json.dumps(value)
    return out


def open_mlflow_run(config: LatentQAConfig, settings: JobSettings, params: dict[str, str], tags: dict[str, str]) -> dict:
    """The MLflow run of `train.run_name` (reopened on resume, else created), params logged."""
    import mlflow
    from mlflow.tracking import MlflowClient

    output_dir = Path(config.train.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    uri = tracking_uri(settings.mlflow, output_dir)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(settings.mlflow.experiment)
    experiment_id = (
        experiment.experiment_id
        if experiment
        else client.create_experiment(settings.mlflow.experiment, artifact_location(settings.mlflow, output_dir))
    )
    name = config.train.run_name
    found = client.search_runs([experiment_id], f"tags.`latentqa.run_name` = '{name}'", max_results=1)
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        logged = found[0].data.params
    else:
        run_id = client.create_run(experiment_id, run_name=name, tags={"latentqa.run_name": name}).info.run_id
        logged = {}
    changed = {k: v for k, v in params.items() if k in logged and logged[k] != v[:6000]}
    if changed:
        print(f"note: resumed with changed settings (kept as tags, params are immutable): {sorted(changed)}")
        tags = {**tags, **{f"resume.{k}": v[:5000] for k, v in changed.items()}}
    new = [mlflow.entities.Param(k, v[:6000]) for k, v in params.items() if k not in logged]
    for start in range(0, len(new), 100):
        client.log_batch(run_id, params=new[start : start + 100])
    client.log_batch(run_id, tags=[mlflow.entities.RunTag(k, v) for k, v in tags.items()])
    return {"tracking_uri": uri, "run_id": run_id, "experiment_id": experiment_id}


def _decoder_pyfunc_class():
    import mlflow.pyfunc

    class LatentQADecoder(mlflow.pyfunc.PythonModel):
        """Reads dialogs with the decoder. Input: rows with `dialog` (a list of {role, content}
        messages, or its JSON) and `question`; output: one answer per row."""

        def load_context(self, context):
            from latentqa.config import LatentQAConfig
            from latentqa.session import LatentQA

            config = LatentQAConfig.model_validate_json(Path(context.artifacts["config"]).read_text())
            config.model.decoder_adapter = context.artifacts["adapter"]
            self.lqa = LatentQA.load(config)

        def predict(self, context, model_input, params=None):
            from latentqa.reading import read

            rows = model_input.to_dict("records") if hasattr(model_input, "to_dict") else list(model_input)
            dialogs = [json.loads(r["dialog"]) if isinstance(r["dialog"], str) else r["dialog"] for r in rows]
            return [a[0] for a in read(self.lqa, dialogs, [[r["question"]] for r in rows])]

    return LatentQADecoder


def log_decoder(mlflow_ctx: dict, config: LatentQAConfig, settings: JobSettings, run_dir: Path) -> str:
    """Adapter as an artifact, then a pyfunc model over it, registered; returns 'name/version'."""
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(mlflow_ctx["tracking_uri"])
    client = MlflowClient(mlflow_ctx["tracking_uri"])
    run_id = mlflow_ctx["run_id"]
    client.log_artifacts(run_id, str(run_dir / "decoder"), "decoder")
    client.log_artifact(run_id, str(run_dir / "config.json"))
    client.log_artifact(run_id, str(run_dir / "metrics.json"))
    client.log_artifact(run_id, str(run_dir / "job.json"))
    name = settings.mlflow.registered_model or f"latentqa-decoder-{model_slug(config.model.path)}"
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="decoder_model",
            python_model=_decoder_pyfunc_class()(),
            artifacts={"adapter": str(run_dir / "decoder"), "config": str(run_dir / "config.json")},
            registered_model_name=name,
            pip_requirements=[f"latentqa=={importlib.metadata.version('latentqa')}", "torch", "transformers", "peft"],
        )
    version = str(info.registered_model_version)
    tags = {
        "read_layer": str(config.patch.read_layer),
        "write_layer": str(config.patch.write_layer),
        "target_model": config.model.path,
        "run_name": config.train.run_name,
    }
    if config.patch.min_layer is not None:
        tags["read_layers"] = f"[{config.patch.min_layer}, {config.patch.max_layer})"
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    return f"{name}/{version}"


# ---------------------------------------------------------------- 5. read with the new decoder


@ray.remote
def read_held_out(config_json: str, checkpoint: Checkpoint, dialog: list[dict], questions: list[str]) -> list[str]:
    from latentqa.reading import read
    from latentqa.session import LatentQA

    config = LatentQAConfig.model_validate_json(config_json)
    with checkpoint.as_directory() as folder:
        config.model.decoder_adapter = str(Path(folder) / "adapter")
        lqa = LatentQA.load(config)
    return read(lqa, [dialog], questions)[0]


def held_out_dialog(eval_examples: ray.data.Dataset) -> list[dict]:
    """A held-out record's read dialog, preferring a lone instruction (read whole, as `latentqa read`)."""
    rows = eval_examples.take(200)
    records = [Record.model_validate_json(r["record"]) for r in rows]
    lone = [r for r in records if not r.system and not r.control_model]
    return read_dialog((lone or records)[0]).messages


# ---------------------------------------------------------------- the job


def connect(settings: JobSettings) -> None:
    if not ray.is_initialized():
        ray.init(address=settings.ray.address, log_to_driver=True)
    data = ray.data.DataContext.get_current()
    data.enable_progress_bars = False
    # Row order independent of task timing: the same seed gives the same shards and batches, so
    # a resumed run skips exactly the batches it already trained on.
    data.execution_options.preserve_order = True


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    try:
        config, settings, strategy = parse_args(argv)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    train = config.train
    if "run_name" not in train.model_fields_set:  # unnamed: a new run, as `latentqa train` does
        train.run_name = f"{train.run_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(train.output_dir).resolve() / train.run_name
    if (run_dir / "decoder").exists():  # nothing saved is ever overwritten
        print(f"{run_dir / 'decoder'} exists: run {train.run_name!r} is complete; pick another --train.run_name", file=sys.stderr)
        return 2
    storage = settings.ray.storage_path or str(Path(train.output_dir).resolve())
    if "://" not in storage:
        storage = str(Path(storage).resolve())

    connect(settings)
    try:
        train_set = read_set(config.data.train, "train")
        eval_set = read_set(config.data.eval, "eval") if config.data.eval else None
        laid_out = lay_out(train_set.examples, config)
        if eval_set and train.eval_batches:
            eval_set.examples = eval_set.examples.limit(train.eval_batches * train.batch_size).materialize()
    except Exception as err:  # the engine's DataError/LayoutError, possibly wrapped by Ray
        found = _data_error(err)
        if found is None:
            raise
        print(f"data error: {found}", file=sys.stderr)
        return 2

    workers = settings.ray.num_workers
    per_worker = laid_out.count() // workers  # the equal split drops the remainder
    if per_worker == 0:
        print(f"data error: {laid_out.count()} examples for {workers} workers", file=sys.stderr)
        return 2
    batches_per_epoch = -(-per_worker // train.batch_size)
    steps_per_epoch = -(-batches_per_epoch // train.grad_accum)
    total_steps = train.max_steps or steps_per_epoch * train.epochs
    print(
        f"run {train.run_name!r} (rerun with --train.run_name {train.run_name} to resume it): "
        f"{laid_out.count()} train examples, {workers} workers x batch {train.batch_size} "
        f"x accum {train.grad_accum}, {steps_per_epoch} steps/epoch, {total_steps} steps, strategy {strategy.kind}"
    )

    mlflow_ctx = None
    if settings.mlflow.enabled:
        params = {
            **_flatten(json.loads(config.model_dump_json())),
            **_flatten({"ray": json.loads(settings.ray.model_dump_json())}),
            **_flatten({"strategy": json.loads(strategy.model_dump_json())}),
            "data.train.examples": str(laid_out.count()),
            "train.total_steps": str(total_steps),
        }
        hashes = {**train_set.files, **(eval_set.files if eval_set else {})}
        params.update({f"data.sha256.{Path(p).parent.name}/{Path(p).name}": h for p, h in hashes.items()})
        mlflow_ctx = open_mlflow_run(config, settings, params, code_version())
        print(f"mlflow: run {mlflow_ctx['run_id']} at {mlflow_ctx['tracking_uri']}")

    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": config.model_dump_json(),
            "strategy": strategy.model_dump(mode="json"),
            "steps_per_epoch": steps_per_epoch,
            "total_steps": total_steps,
            "has_eval": eval_set is not None,
            "checkpoint_every": settings.ray.checkpoint_every,
            "fail_after_step": settings.ray.fail_after_step,
            "mlflow": mlflow_ctx,
        },
        scaling_config=ScalingConfig(
            num_workers=workers,
            use_gpu=settings.ray.use_gpu,
            resources_per_worker={"CPU": settings.ray.cpus_per_worker, **({"GPU": 1} if settings.ray.use_gpu else {})},
        ),
        run_config=RunConfig(
            name=train.run_name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=settings.ray.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=settings.ray.checkpoints_to_keep),
        ),
        datasets={"train": laid_out, **({"eval": eval_set.examples} if eval_set else {})},
        # Ordered, deterministic splits: a resumed epoch skips exactly the batches already done.
        dataset_config=DataConfig(
            datasets_to_split=["train"],
            execution_options=ray.data.ExecutionOptions(preserve_order=True),
        ),
    )
    try:
        result = trainer.fit()
    except Exception as err:
        if mlflow_ctx:
            from mlflow.tracking import MlflowClient

            MlflowClient(mlflow_ctx["tracking_uri"]).set_terminated(mlflow_ctx["run_id"], "FAILED")
        print(f"training failed: {err}", file=sys.stderr)
        return 1

    # The final checkpoint holds the final adapter; copy it where `latentqa read` finds it.
    with result.checkpoint.as_directory() as folder:
        shutil.copytree(Path(folder) / "adapter", run_dir / "decoder")
        progress = json.loads((Path(folder) / "progress.json").read_text())
    (run_dir / "config.json").write_text(config.model_dump_json(indent=2))  # as `latentqa train` writes it
    (run_dir / "job.json").write_text(
        json.dumps({**json.loads(settings.model_dump_json()), "strategy": strategy.model_dump(mode="json")}, indent=2)
    )
    (run_dir / "metrics.json").write_text(json.dumps({"final": result.metrics, "history": progress["history"]}, indent=2))
    print(f"decoder saved to {run_dir / 'decoder'} (step {progress['step']})")
    if mlflow_ctx:
        registered = log_decoder(mlflow_ctx, config, settings, run_dir)
        from mlflow.tracking import MlflowClient

        MlflowClient(mlflow_ctx["tracking_uri"]).set_terminated(mlflow_ctx["run_id"], "FINISHED")
        print(f"mlflow: registered model version {registered}")

    if eval_set:
        dialog = held_out_dialog(eval_set.examples)
        options = {"num_cpus": settings.ray.cpus_per_worker, "num_gpus": 1 if settings.ray.use_gpu else 0}
        answers = ray.get(read_held_out.options(**options).remote(config.model_dump_json(), result.checkpoint, dialog, QUESTIONS))
        print("held-out dialog:", json.dumps(dialog))
        for question, answer in zip(QUESTIONS, answers):
            print(f"  Q: {question}\n  A: {answer}")
    print(f"done in {time.perf_counter() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
