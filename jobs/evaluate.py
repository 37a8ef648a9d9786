"""Evaluate a decoder on a held-out set on a Ray worker and log the result to the decoder's MLflow run.

    python jobs/evaluate.py --decoder models:/latentqa-decoder-tiny-llama@champion
    python jobs/evaluate.py --decoder models:/NAME/3 --data.eval.path /data/latentqa/eval --layer 15
    python jobs/evaluate.py --decoder models:/m-<id> --suite loss choice   # one checkpoint of a training run
    ray job submit --working-dir . -- python jobs/evaluate.py --decoder models:/NAME@champion
    python jobs/evaluate.py --decoder models:/NAME/3 --steering controls/pirate.json \
        --control models:/latentqa-control-pirate/1          # a control: behaviour, fluency, baselines

The engine's evaluation suite (`latentqa.suite`, as `latentqa evaluate`): the held-out loss with
true, shuffled and no activations, the activation gain (shuffled - true) with its paired interval,
and identification of held-out personas and goals, by multiple choice and by open-ended reading,
each beside the text and prompting baselines (`--suite loss choice reading` picks tasks; `--layers`
adds a layer map). The set (the engine's
`data.eval`) is read and validated with Ray Data; the metrics go to the run that registered the
decoder as `heldout/*` (for a registered version or a checkpoint, at the logged model's step and
linked to that model, so the MLflow UI shows them beside it; the report under `evaluation/<model
name>-<model id>`), or, for a decoder folder, to a new run `evaluate-<folder>`.

With `--steering CONTROL_FILE --control ADAPTER` it evaluates a control adapter instead
(`latentqa.steering_evaluation`, as `latentqa evaluate-steering --adapter`): on the held-out
steering prompts, the behaviour rate by the control file's judge, the fluency (perplexity under
the instructed target, repeated 3-grams) and the baselines (the target, the prompted target, a
steering vector at the read layer), logged as `steering/*` to the run that registered the control
(or a new run for a folder), with the table and figure as its report.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import ray
from mlflow.exceptions import MlflowException

from latentqa.cli import add_suite_arguments, suite_options
from latentqa.config import ConfigError
from latentqa_platform import raydata, tracking
from latentqa_platform.batchjobs import connect, job_tracking_uri, parse, run_main

PREFIX, STEERING = "heldout/", "steering/"


def _arguments(parser) -> None:
    parser.add_argument("--decoder", required=True, help="models:/name@alias, models:/name/N or a PEFT folder")
    parser.add_argument("--layer", type=int, help="read layer (default: the config's patch.read_layer)")
    add_suite_arguments(parser)
    steering = parser.add_argument_group("a control instead (steering evaluation)")
    steering.add_argument("--steering", type=Path, help="the control's file: its instruction and judge")
    steering.add_argument("--control", help="the control adapter: models:/name@alias, models:/name/N or a folder")
    steering.add_argument("--heldout", type=int, default=30, help="held-out steering prompts to measure on")


def steering_task(
    config_json: str, decoder: str, control_uri: str, tracking_uri: str, control_json: str, heldout: int
) -> tuple[dict, dict]:
    """The steering evaluation's metrics, and its report files (name -> bytes)."""
    from latentqa import LatentQA, LatentQAConfig
    from latentqa.models import CONTROL
    from latentqa.steering import ControlFile
    from latentqa.steering_evaluation import SteeringEvaluation
    from latentqa_platform.adapters import fetch_adapter
    from latentqa_platform.serving import ServeSettings

    config = LatentQAConfig.model_validate_json(config_json)
    lqa = LatentQA.load(config, decoder, registry=tracking_uri)
    train_prompts, held = ServeSettings().read_prompts()
    evaluation = SteeringEvaluation(lqa, ControlFile.model_validate_json(control_json), held[:heldout])
    rows = evaluation.baselines(train_prompts)
    with tempfile.TemporaryDirectory() as fetched:
        lqa.model.adapters.load_frozen(fetch_adapter(control_uri, tracking_uri, Path(fetched)).folder, CONTROL)
        rows.append(evaluation.steered())
    result = evaluation.result(rows)
    with tempfile.TemporaryDirectory() as tmp:
        report = {path.name: path.read_bytes() for path in result.write(tmp).iterdir()}
    return result.as_metrics(STEERING), report


def evaluate_task(
    config_json: str, decoder: str, tracking_uri: str, rows: list[dict], options: dict
) -> tuple[dict, dict]:
    """The suite's metrics, and its report files (name -> bytes) for the run's artifacts."""
    from latentqa import LatentQA, LatentQAConfig
    from latentqa.suite import run_suite

    config = LatentQAConfig.model_validate_json(config_json)
    lqa = LatentQA.load(config, decoder, registry=tracking_uri)
    examples = [raydata.example_of_row(r) for r in rows]
    result = run_suite(lqa, config.data.eval, examples, **options)
    with tempfile.TemporaryDirectory() as tmp:
        report = {path.name: path.read_bytes() for path in result.write(tmp).iterdir()}
    return result.as_metrics(PREFIX), report


@dataclass(frozen=True)
class Destination:
    """Where an evaluation's results go."""

    run: tracking.RunRef
    model_id: str | None  # the logged model its metrics are linked to
    step: int  # the step its metrics are logged at
    artifact_path: str  # the run's folder for its report


def destination(decoder: str, tracking_uri: str, settings, output_dir: Path) -> Destination:
    """The run that logged `decoder`, at that model's step, the report in `evaluation/<model
    name>-<model id>`; for a folder, a new evaluation run."""
    from mlflow.tracking import MlflowClient

    if not decoder.startswith("models:/"):
        run = tracking.open_run(
            settings,
            output_dir,
            f"evaluate-{tracking.model_slug(decoder)}-{time.strftime('%Y%m%d-%H%M%S')}",
            {"decoder": decoder},
            {},
        )
        return Destination(run, None, 0, "evaluation")
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    try:
        model = client.get_logged_model(tracking.logged_model_id(decoder, client))
        run = client.get_run(model.source_run_id)
    except (FileNotFoundError, MlflowException) as err:
        raise ConfigError(f"--decoder {decoder}: {getattr(err, 'message', err)}") from None
    step = next((o.step for o in run.outputs.model_outputs if o.model_id == model.model_id), 0)
    ref = tracking.RunRef(tracking_uri, run.info.run_id, run.info.experiment_id)
    return Destination(ref, model.model_id, step, f"evaluation/{model.name}-{model.model_id}")


def main(argv: list[str] | None = None) -> int:
    args, config, settings = parse("jobs/evaluate.py", "Evaluate a decoder on a held-out set.", argv, _arguments)
    if (args.steering is None) != (args.control is None):
        raise ConfigError("give both --steering CONTROL_FILE and --control ADAPTER to evaluate a control, or neither")
    if args.steering is None and config.data.eval is None:
        raise ConfigError("data.eval: no held-out set configured")
    if args.heldout < 1:
        raise ConfigError(f"--heldout {args.heldout}: measure on at least 1 held-out prompt")
    control = None
    if args.steering:
        from latentqa.steering import load_control  # the steering engine (torch): only for a control

        control = load_control(args.steering)
    if control and not control.instruction:
        raise ConfigError(f"{args.steering}: instruction: the steering evaluation needs the control's instruction")
    uri = job_tracking_uri(config, settings)
    output_dir = Path(config.train.output_dir).resolve()
    connect(args, settings, output_dir / "logs" / f"evaluate-{time.strftime('%Y%m%d-%H%M%S')}.log")
    decoder = tracking.pinned(args.decoder, uri)  # the version evaluated is the one logged to
    evaluated = tracking.pinned(args.control, uri) if control else decoder
    to = destination(evaluated, uri, settings.mlflow, output_dir)
    run = to.run
    resources = {"num_cpus": settings.ray.cpus_per_worker, "num_gpus": 1 if settings.ray.use_gpu else 0}
    if control:
        prefix, task = STEERING, ray.remote(steering_task).options(**resources)
        work = task.remote(config.model_dump_json(), decoder, evaluated, uri, control.model_dump_json(), args.heldout)
    else:
        rows = raydata.read_set(config.data.eval, "eval").examples.take_all()
        prefix, task = PREFIX, ray.remote(evaluate_task).options(**resources)
        work = task.remote(config.model_dump_json(), decoder, uri, rows, suite_options(args))
    metrics, report = ray.get(work)
    tracking.log_metrics(run, metrics, to.step, to.model_id)
    with tempfile.TemporaryDirectory() as tmp:  # the report: results or steering table, and the figures
        for name, data in report.items():
            (Path(tmp) / name).write_bytes(data)
        run.client().log_artifacts(run.run_id, tmp, to.artifact_path)
    if not control:
        run.client().set_tag(run.run_id, f"{PREFIX}data", str(config.data.eval.path))
    if not evaluated.startswith("models:/"):
        tracking.finish_run(run)  # the evaluation's own run
    print(json.dumps({k.removeprefix(prefix): v for k, v in metrics.items()}))
    print(f"mlflow: logged to run {run.run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
