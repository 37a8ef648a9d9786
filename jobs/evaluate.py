"""Evaluate a decoder on a held-out set on a Ray worker and log the result to the decoder's MLflow run.

    python jobs/evaluate.py --decoder models:/latentqa-decoder-tiny-llama@champion
    python jobs/evaluate.py --decoder models:/NAME/3 --data.eval.path /data/latentqa/eval --layer 15
    ray job submit --working-dir . -- python jobs/evaluate.py --decoder models:/NAME@champion

The engine's evaluation suite (`latentqa.suite`, as `latentqa evaluate`): the held-out loss with
true, shuffled and no activations, the activation gain (shuffled - true) with its paired interval,
and multiple-choice identification of held-out personas and goals. The set (the engine's
`data.eval`) is read and validated with Ray Data; the metrics go to the run that registered the
decoder as `heldout/*`, or, for a decoder folder, to a new run `evaluate-<folder>`.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import ray

from latentqa.config import ConfigError
from latentqa_platform import raydata, tracking
from latentqa_platform.batchjobs import job_tracking_uri, load_session, parse, run_main

PREFIX = "heldout/"


def _arguments(parser) -> None:
    parser.add_argument("--decoder", required=True, help="models:/name@alias, models:/name/N or a PEFT folder")
    parser.add_argument("--layer", type=int, help="read layer (default: the config's patch.read_layer)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--choices", type=int, default=4, help="candidates per identification item (K)")
    parser.add_argument("--layers", type=int, nargs="+", default=[], help="also map identification over these read layers")
    parser.add_argument("--map-items", type=int, help="items in the layer map (default: all)")


def evaluate_task(config_json: str, decoder: str, tracking_uri: str, rows: list[dict], args: dict) -> tuple[dict, dict]:
    """The suite's metrics, and its report files (name -> bytes) for the run's artifacts."""
    from latentqa.config import LatentQAConfig
    from latentqa.suite import run_suite

    config = LatentQAConfig.model_validate_json(config_json)
    lqa = load_session(config, decoder, tracking_uri)
    examples = [raydata.example_of_row(r) for r in rows]
    result = run_suite(lqa, config.data.eval, examples, args["choices"], args["layer"], args["batch_size"],
                       args["layers"], args["map_items"])  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        report = {path.name: path.read_bytes() for path in result.write(tmp).iterdir()}
    return result.as_metrics(PREFIX), report


def decoder_run(decoder: str, tracking_uri: str, settings, output_dir: Path) -> tracking.RunRef:
    """The run that registered `decoder`; for a folder, a new evaluation run."""
    from mlflow.tracking import MlflowClient

    from latentqa_platform.adapters import REGISTRY_REF

    if not decoder.startswith("models:/"):
        return tracking.open_run(settings, output_dir, f"evaluate-{tracking.model_slug(decoder)}-{time.strftime('%Y%m%d-%H%M%S')}",
                                 {"decoder": decoder}, {})  # fmt: skip
    match = REGISTRY_REF.match(decoder.removeprefix("models:/"))
    if not match:
        raise ConfigError(f"--decoder {decoder}: expected models:/name/N or models:/name@alias")
    client = MlflowClient(tracking_uri)
    version = client.get_model_version(match["name"], match["version"]) if match["version"] else \
        client.get_model_version_by_alias(match["name"], match["alias"])  # fmt: skip
    run = client.get_run(version.run_id)
    return tracking.RunRef(tracking_uri, run.info.run_id, run.info.experiment_id)


def main(argv: list[str] | None = None) -> int:
    args, config, settings = parse("jobs/evaluate.py", "Evaluate a decoder on a held-out set.", argv, _arguments)
    if config.data.eval is None:
        raise ConfigError("data.eval: no held-out set configured")
    uri = job_tracking_uri(config, settings)
    output_dir = Path(config.train.output_dir).resolve()
    run = decoder_run(args.decoder, uri, settings.mlflow, output_dir)
    raydata.connect(settings.ray.address)
    try:
        rows = raydata.read_set(config.data.eval, "eval").examples.take_all()
    except Exception as err:  # the engine's DataError, possibly wrapped by Ray
        found = raydata.data_error(err)
        if found is None:
            raise
        print(f"data error: {found}", file=sys.stderr)
        return 2
    task = ray.remote(evaluate_task).options(num_cpus=settings.ray.cpus_per_worker, num_gpus=1 if settings.ray.use_gpu else 0)
    metrics, report = ray.get(task.remote(config.model_dump_json(), args.decoder, uri, rows, vars(args)))
    tracking.log_metrics(run, metrics, step=0)
    with tempfile.TemporaryDirectory() as tmp:  # results.json, per_item.jsonl and the figures
        for name, data in report.items():
            (Path(tmp) / name).write_bytes(data)
        run.client().log_artifacts(run.run_id, tmp, "evaluation")
    run.client().set_tag(run.run_id, f"{PREFIX}data", str(config.data.eval.path))
    if not args.decoder.startswith("models:/"):
        tracking.finish_run(run)  # the evaluation's own run
    print(json.dumps({k.removeprefix(PREFIX): v for k, v in metrics.items()}))
    print(f"mlflow: logged to run {run.run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
