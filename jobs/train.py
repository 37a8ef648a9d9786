"""Train a LatentQA decoder on a Ray cluster: Ray Data in, Ray Train across workers, MLflow out.

    python jobs/train.py                                   # offline default; starts or joins local Ray
    python jobs/train.py --train.max_steps 20 --strategy.kind fsdp
    python jobs/train.py --config infra/configs/llama3-8b-ddp.yaml --train.lr 3e-5
    ray job submit --working-dir . -- python jobs/train.py --train.output_dir /abs/runs

(1) The config, validated before Ray starts; (2) the data, read, checked and laid out with Ray
Data; (3) one MLflow run per run name; (4) Ray Train workers, each with one base copy under the
engine's `Strategy` (ddp, fsdp, deepspeed), train, evaluate and checkpoint (a rerun of the run
name resumes); (5) the decoder published and registered; (6) it reads a held-out dialog.

Outputs in `<train.output_dir>/<run name>/`: `decoder/`, `config.json`, `job.json`, `metrics.json`,
the `checkpoint_*` folders (`latentqa_platform.raytrain`) and `console.log`, where Ray's, MLflow's
and the libraries' messages go (`--verbose`: to the console too).
"""

from __future__ import annotations

import json
import sys
import time
from functools import partial
from pathlib import Path

import ray
import torch

from latentqa.config import LatentQAConfig
from latentqa.data import DEFAULT_QUESTIONS
from latentqa.paths import OFFLINE_MODEL
from latentqa.showcase import after_the_offline_default
from latentqa.training import StepPlan, ranks_batches_per_epoch, strategy_config
from latentqa_platform import batchjobs, console, raydata, raytrain, tracking
from latentqa_platform.batchjobs import parse, run_main
from latentqa_platform.settings import MlflowSettings


def train_loop_per_worker(loop_config: dict) -> None:
    from latentqa import LatentQA, evaluate
    from latentqa.strategy import Strategy
    from latentqa.training import adamw_factory, cosine_with_warmup, fit

    plan = raytrain.WorkerPlan.model_validate(loop_config["plan"])
    config, train, total = plan.config, plan.config.train, plan.steps.total_steps
    torch.manual_seed(train.seed)
    strategy = Strategy.create(plan.strategy)
    with strategy.model_loading(pretrained=config.model.weights == "pretrained"):
        lqa = LatentQA.load(config, train_decoder=True)  # ZeRO-3: partitioned; FSDP2: on rank 0 only
    strategy.prepare(lqa.model, adamw_factory(train), lambda opt: cosine_with_warmup(opt, train.warmup_steps, total))
    progress, resumed_from = raytrain.resume(strategy, plan)
    say, run = console.for_rank(strategy.is_main, loop_config["console"]), plan.mlflow if strategy.is_main else None
    eval_examples = (
        [raydata.example_of_row(r) for r in ray.train.get_dataset_shard("eval").iter_rows()] if plan.has_eval else []
    )

    def run_eval() -> dict[str, float]:
        # Every rank holds the held-out examples and evaluates its share of the batches.
        with strategy.averaged_weights(), strategy.evaluation():
            result = evaluate(
                lqa, eval_examples, batch_size=train.batch_size, max_batches=train.eval_batches, ranks=strategy
            )
        return result.as_metrics()

    def report(step: int, metrics: dict[str, float]) -> None:
        if run:
            tracking.log_metrics(run, metrics, step)
        if step % 10 == 0 or any(k.startswith(("eval/", "final/")) for k in metrics):
            say(f"step {step}/{total}: {console.format_metrics(metrics)}")

    def on_step(progress, metrics: dict[str, float]) -> None:
        report(progress.step, metrics)
        if plan.ray.checkpoint_every and progress.step % plan.ray.checkpoint_every == 0 and progress.step < total:
            raytrain.report_checkpoint(strategy, plan, progress, metrics, f"checkpoint_{progress.step:06d}")
        if plan.ray.fail_after_step == progress.step:
            raise RuntimeError(f"fail_after_step={progress.step}: stopping on purpose (tests)")

    if resumed_from:
        say(f"resumed from {resumed_from} at step {progress.step} (epoch {progress.epoch})")
    elif plan.has_eval and train.eval_every:
        progress.history.append({"step": 0, **run_eval()})
        report(0, {k: v for k, v in progress.history[0].items() if k != "step"})
    batches = raytrain.shard_batches(train, lqa.chat_format.pad_id, strategy.device, strategy.all_reduce_max)
    fit(strategy, batches, plan.steps, train, config.patch, progress, run_eval if plan.has_eval else None, on_step)
    final = run_eval() if plan.has_eval else {}
    if final:
        progress.history[-1].update(final)  # the curves end at the last step
        report(progress.step, {f"final/{k.split('/', 1)[1]}": v for k, v in final.items()})
    last = {k: v for k, v in (progress.history[-1] if progress.history else {}).items() if k != "step"}
    raytrain.report_checkpoint(
        strategy, plan, progress, {**last, **final, "final": 1}, f"checkpoint_{progress.step:06d}_final"
    )


def register_shipped(mlflow: MlflowSettings, output_dir: Path, shipped: LatentQAConfig) -> str:
    """The shipped SmolLM2 decoder and the controls shipped with it, registered on first use."""
    from latentqa_platform import controls  # the steering engine: only for this
    from latentqa_platform.serving import ServeSettings

    decoder = tracking.register_shipped_decoder(mlflow, output_dir, shipped)
    prefix = ServeSettings().control_model_prefix
    steered = controls.register_shipped_controls(mlflow, output_dir, shipped, decoder, prefix)
    return decoder + (f" (its controls: {', '.join(steered)})" if steered else "")


def parse_args(argv: list[str] | None):
    """The flags, the config, the job's settings and the strategy; raises ConfigError naming the field."""

    def flags(parser) -> None:
        parser.add_argument("--no-showcase", action="store_true", help="skip the shipped SmolLM2 decoder's reading")

    args, config, settings = parse("jobs/train.py", "Train a LatentQA decoder with Ray Train.", argv, flags)
    if config.data.eval is None:
        config.train.eval_every = 0
    return args, config, settings, strategy_config(config, "ddp")


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    # 1. config
    args, config, settings, strategy = parse_args(argv)
    train, run_dir = config.train, raytrain.run_folder(config.train)
    output_dir = run_dir.parent

    # 2. data
    batchjobs.connect(args, settings, run_dir / "console.log")
    sets = raydata.training_sets(config, settings.ray.num_workers)
    batches = ranks_batches_per_epoch(sets.train_sizes, train, settings.ray.num_workers)
    steps = StepPlan.of([batches] * train.epochs, train)
    batch, estimated = f"batch {train.batch_size}", ""
    if train.batch_tokens:  # how many batches a window cuts into depends on Ray's split: counted on a likely one
        batch, estimated = f"batches of <= {train.batch_tokens} tokens", " (estimated)"
    print(
        f"run {train.run_name!r} (rerun with --train.run_name {train.run_name} to resume it): {sets.train_count} train "
        f"examples, {settings.ray.num_workers} workers x {batch} x accum {train.grad_accum}, "
        f"{steps.steps_per_epoch} steps/epoch{estimated}, {steps.total_steps} steps, strategy {strategy.kind}"
    )

    # 3. track (opened before training so that metrics stream in)
    job = {"ray": settings.ray.model_dump(mode="json"), "strategy": strategy.model_dump(mode="json")}
    run = None
    if settings.mlflow.enabled:
        params = tracking.train_params(config, job, sets.train_count, steps.total_steps, sets.files)
        run = tracking.open_run(settings.mlflow, output_dir, train.run_name, params, tracking.code_version(__file__))
        print(f"mlflow: run {run.run_id} at {run.tracking_uri}")

    # 4. train
    plan = raytrain.WorkerPlan(
        config=config, strategy=strategy, steps=steps, ray=settings.ray, mlflow=run, train_files=sets.train_files
    )
    storage, lines = settings.ray.storage_path or str(output_dir), console.Channel()
    try:
        result = raytrain.trainer(
            train_loop_per_worker, plan, settings.ray, storage, sets.datasets(), lines.queue
        ).fit()
    except Exception as err:
        if run:
            tracking.finish_run(run, "FAILED")
        print(f"training failed: {err}", file=sys.stderr)
        return 1
    finally:
        lines.close()

    # 5. publish
    job = json.dumps({**settings.model_dump(mode="json"), **job}, indent=2)
    published = raytrain.publish_decoder(result, run_dir, config=config.model_dump_json(indent=2), job=job)
    print(f"decoder saved to {published.folder} (step {result.metrics['step']})")
    if run:
        name, tags = tracking.decoder_model_name(settings.mlflow, config), tracking.decoder_tags(config)
        registered = tracking.publish_run(run, run_dir, published.history, published.logged_model, name, tags)
        print(f"mlflow: registered model version {registered}")

    # 6. read
    if sets.eval is not None:
        dialog = raydata.held_out_dialog(sets.eval)
        answers = raytrain.read_with_final_decoder(result, config, settings.ray, [dialog], DEFAULT_QUESTIONS)[0]
        print("held-out dialog:", json.dumps(dialog))
        for question, answer in zip(DEFAULT_QUESTIONS, answers):
            print(f"  Q: {question}\n  A: {answer}")
    if not args.no_showcase and config.model.path == str(OFFLINE_MODEL):
        after_the_offline_default(
            partial(register_shipped, settings.mlflow, output_dir) if settings.mlflow.enabled else None
        )
    print(f"done in {time.perf_counter() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
