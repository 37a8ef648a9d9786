"""Train a control adapter on a Ray worker, register it in MLflow, and log the target's replies to
held-out prompts without and with it.

    python jobs/control.py --control controls/pirate.json --decoder models:/latentqa-decoder-tiny-llama@champion
    python jobs/control.py --name pirate --instruction "Talk like a pirate." --decoder runs/NAME/decoder
    ray job submit --working-dir . -- python jobs/control.py --control controls/veganism.json --decoder ...

The control is a file ({name, description, qa}) or an instruction the target is read under (the
paper's way). Steering settings are the engine's `steer:` section (`--steer.steps 30`). The adapter
is registered as `latentqa-control-<name>` (a new version each run: nothing is overwritten) and
served by the Serve app as chat `model` `latentqa-control-<name>/<version>`.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import ray

from latentqa.config import ConfigError
from latentqa_platform import controls, tracking
from latentqa_platform.batchjobs import connect, job_tracking_uri, parse, run_main
from latentqa_platform.serving import ControlRequest, ServeSettings

PREFIX = ServeSettings().control_model_prefix


def _arguments(parser) -> None:
    parser.add_argument("--decoder", required=True, help="models:/name@alias, models:/name/N or a PEFT folder")
    parser.add_argument("--control", type=Path, help="control file: {name, description, qa}")
    parser.add_argument("--instruction", help="read the control's QA pairs from the target under this instruction")
    parser.add_argument("--name", help="the control's name (default: the control file's)")
    parser.add_argument(
        "--heldout", type=int, default=3, help="held-out prompts to complete without and with the control"
    )


def control_task(
    config_json: str, decoder: str, registry: str, run: controls.RunRef, request: dict, heldout: int
) -> str | None:
    """On a worker: the whole job (see controls.run_job); returns `name/version`, or None if it failed."""
    from latentqa import LatentQA, LatentQAConfig

    config = LatentQAConfig.model_validate_json(config_json)
    settings = ServeSettings()
    body = ControlRequest.model_validate(request)
    lqa = LatentQA.load(config, decoder, registry=registry)
    prompts, held = settings.read_prompts()
    return controls.run_job(
        lqa,
        run,
        PREFIX + body.name,
        body.qa,
        body.instruction,
        settings.control_questions,
        prompts,
        {"control": body.name, "decoder": decoder, "target_model": config.model.path},
        heldout=held[:heldout],
    )


def main(argv: list[str] | None = None) -> int:
    args, config, settings = parse(
        "jobs/control.py", "Train a control adapter and register it in MLflow.", argv, _arguments
    )
    if (args.control is None) == (args.instruction is None):
        raise ConfigError("give exactly one of --control FILE and --instruction TEXT")
    source = json.loads(args.control.read_text()) if args.control else {}
    request = {
        "name": args.name or source.get("name"),
        **({"qa": source.get("qa")} if args.control else {"instruction": args.instruction}),
    }
    try:
        body = ControlRequest.model_validate(request)
    except Exception as err:
        raise ConfigError(f"{args.control or '--instruction'}: {err}") from None
    output_dir = Path(config.train.output_dir).resolve()
    connect(args, settings, output_dir / "logs" / f"control-{body.name}-{time.strftime('%Y%m%d-%H%M%S')}.log")
    decoder = tracking.pinned(args.decoder, job_tracking_uri(config, settings))  # the version the job uses throughout
    params = {"steps": str(config.steer.steps), "decoder": decoder, "source": "qa" if body.qa else "instruction"}
    run = controls.open_job(settings.mlflow, output_dir, body.name, params, owner="jobs/control.py")
    print(f"mlflow: control job run {run.run_id} at {run.tracking_uri}")
    task = ray.remote(control_task).options(
        num_cpus=settings.ray.cpus_per_worker, num_gpus=1 if settings.ray.use_gpu else 0
    )
    adapter = ray.get(
        task.remote(config.model_dump_json(), decoder, run.tracking_uri, run, body.model_dump(), args.heldout)
    )
    status = controls.job_status(run.tracking_uri, run.run_id)
    if adapter is None:
        print(f"control job failed: {status['error']}", file=sys.stderr)
        return 1
    print(f"registered control adapter {adapter} (final loss {status['loss']:.3f})")
    if args.heldout:
        import mlflow

        mlflow.set_tracking_uri(run.tracking_uri)
        for row in mlflow.artifacts.load_dict(f"runs:/{run.run_id}/completions.json"):
            print(json.dumps(row, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
