"""Train a control adapter on a Ray worker, register it in MLflow, and log the target's replies to
held-out prompts without and with it.

    python jobs/control.py --control controls/pirate.json --decoder models:/latentqa-decoder-tiny-llama@champion
    python jobs/control.py --name pirate --instruction "Talk like a pirate." --decoder runs/NAME/decoder
    ray job submit --working-dir . -- python jobs/control.py --control controls/veganism.json --decoder ...

The control is a file (`controls/*.json`: name, qa, instruction, judge) or an instruction the target
is read under (the paper's way). Steering settings are the engine's `steer:` section (`--steer.steps
30`); the control is read where the decoder reads (a `steer.layers` that disagrees is refused before
anything runs). The job measures the target and the steered target on held-out prompts
(`latentqa.steering_evaluation`: behaviour rate by the file's judge, perplexity, repeated 3-grams, as
`steering/*` metrics and a `steering/` report on the run); a control past `steer.max_perplexity_ratio`
or `steer.max_repeated_trigrams` fails as degenerate. Otherwise the adapter is registered as
`latentqa-control-<name>` (a new version each run: nothing is overwritten) and served by the Serve app
as chat `model` `latentqa-control-<name>/<version>`.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import ray

from latentqa.config import ConfigError
from latentqa.steering import ControlFile, control_read_layer, load_control
from latentqa_platform import controls, tracking
from latentqa_platform.batchjobs import connect, job_tracking_uri, parse, run_main
from latentqa_platform.serving import ControlRequest, ServeSettings

PREFIX = ServeSettings().control_model_prefix


def _arguments(parser) -> None:
    parser.add_argument("--decoder", required=True, help="models:/name@alias, models:/name/N or a PEFT folder")
    parser.add_argument("--control", type=Path, help="control file: {name, description, instruction, judge, qa}")
    parser.add_argument("--instruction", help="read the control's QA pairs from the target under this instruction")
    parser.add_argument("--name", help="the control's name (default: the control file's)")
    parser.add_argument(
        "--heldout", type=int, default=30, help="held-out prompts to measure the target on without and with the control"
    )
    parser.add_argument("--show", type=int, default=3, help="held-out replies to print without and with the control")
    parser.add_argument(
        "--baselines", action="store_true", help="also measure the prompted target and a steering vector (ActAdd/CAA)"
    )


def control_task(
    config_json: str,
    decoder: str,
    registry: str,
    run: controls.RunRef,
    control_json: str,
    heldout: int,
    baselines: bool,
) -> str | None:
    """On a worker: the whole job (see controls.run_job); returns `name/version`, or None if it failed."""
    from latentqa import LatentQA, LatentQAConfig
    from latentqa.steering import ControlFile

    config = LatentQAConfig.model_validate_json(config_json)
    settings = ServeSettings()
    control = ControlFile.model_validate_json(control_json)
    lqa = LatentQA.load(config, decoder, registry=registry)
    prompts, held = settings.read_prompts()
    return controls.run_job(
        lqa,
        run,
        PREFIX + control.name,
        control,
        settings.control_questions,
        prompts,
        {"control": control.name, "decoder": decoder, "target_model": config.model.path},
        heldout=held[:heldout],
        baselines=baselines,
    )


def decoder_read_layer(decoder: str, tracking_uri: str, config) -> int:
    """The block `decoder` was trained to read: its training config's, else the job's config's."""
    from latentqa.decoders import trained_read_layer
    from latentqa_platform.adapters import fetch_adapter

    with tempfile.TemporaryDirectory() as tmp:
        return trained_read_layer(fetch_adapter(decoder, tracking_uri, Path(tmp)).folder, config.patch.read_layer)


def main(argv: list[str] | None = None) -> int:
    args, config, settings = parse(
        "jobs/control.py", "Train a control adapter and register it in MLflow.", argv, _arguments
    )
    if (args.control is None) == (args.instruction is None):
        raise ConfigError("give exactly one of --control FILE and --instruction TEXT")
    control = load_control(args.control) if args.control else None
    request = {
        "name": args.name or (control.name if control else None),
        **({"qa": control.qa} if control and control.qa else {"instruction": args.instruction or control.instruction}),
    }
    try:
        body = ControlRequest.model_validate(request)  # the limits of a control sent over HTTP
    except Exception as err:
        raise ConfigError(f"{args.control or '--instruction'}: {err}") from None
    control = (control or ControlFile(name=body.name, instruction=args.instruction)).model_copy(
        update={"name": body.name}
    )
    output_dir = Path(config.train.output_dir).resolve()
    uri = job_tracking_uri(config, settings)
    decoder = tracking.pinned(args.decoder, uri)  # the version the job uses throughout
    if config.steer.layers is not None:  # one that reads elsewhere than the decoder is refused before Ray starts
        control_read_layer(config.steer, decoder_read_layer(decoder, uri, config))
    connect(args, settings, output_dir / "logs" / f"control-{body.name}-{time.strftime('%Y%m%d-%H%M%S')}.log")
    params = {"steps": str(config.steer.steps), "decoder": decoder, "source": "qa" if body.qa else "instruction"}
    run = controls.open_job(settings.mlflow, output_dir, body.name, params, owner="jobs/control.py")
    print(f"mlflow: control job run {run.run_id} at {run.tracking_uri}")
    task = ray.remote(control_task).options(
        num_cpus=settings.ray.cpus_per_worker, num_gpus=1 if settings.ray.use_gpu else 0
    )
    adapter = ray.get(
        task.remote(
            config.model_dump_json(),
            decoder,
            run.tracking_uri,
            run,
            control.model_dump_json(),
            args.heldout,
            args.baselines,
        )
    )
    status = controls.job_status(run.tracking_uri, run.run_id)
    if adapter is None:
        print(f"control job failed: {status['error']}", file=sys.stderr)
        return 1
    print(f"registered control adapter {adapter} (final loss {status['loss']:.3f})")
    if args.heldout and ServeSettings().read_prompts()[1]:  # measured on held-out prompts: show them
        import mlflow

        mlflow.set_tracking_uri(run.tracking_uri)
        report = mlflow.artifacts.load_dict(f"runs:/{run.run_id}/steering/steering.json")
        target, steered = report["conditions"][0], report["conditions"][-1]
        for prompt, before, after in list(zip(report["prompts"], target["replies"], steered["replies"]))[: args.show]:
            print(json.dumps({"prompt": prompt, "target": before, "steered": after}, ensure_ascii=False))
        print(mlflow.artifacts.load_text(f"runs:/{run.run_id}/steering/steering.md"))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
