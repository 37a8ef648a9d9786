"""What the batch jobs (`jobs/read.py`, `jobs/control.py`, `jobs/evaluate.py`) share: the command
line (the engine's sections plus `ray:` and `mlflow:`, as `jobs/train.py`), its exit on a config
error, and the tracking store it reads decoders from."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from latentqa.config import ConfigError, LatentQAConfig, engine_sections, fields_help

from . import console, raydata
from .settings import JobSettings, load_job_config, tracking_uri


def parse(
    prog: str,
    description: str,
    argv: list[str] | None,
    add_arguments: Callable[[argparse.ArgumentParser], None] = lambda parser: None,
) -> tuple[argparse.Namespace, LatentQAConfig, JobSettings]:
    """The job's own flags, then `--config FILE.yaml` and dotted overrides for every section (all
    listed by --help); raises ConfigError naming the field."""
    job_sections = {name: info.annotation for name, info in JobSettings.model_fields.items()}
    parser = argparse.ArgumentParser(
        prog=prog,
        allow_abbrev=False,
        description=description + " Any config field is an override: "
        "--patch.read_layer 15, --ray.cpus_per_worker 1, --mlflow.tracking_uri URI.",
        epilog=fields_help({**engine_sections(), **job_sections}, {"strategy.kind": "ddp"}),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", type=Path, help="YAML file of config sections (engine + ray + mlflow)")
    parser.add_argument(
        "--verbose", action="store_true", help="show Ray's, MLflow's and the libraries' messages here too (else: a log)"
    )
    add_arguments(parser)
    args, overrides = parser.parse_known_args(argv)
    config, settings = load_job_config(args.config, overrides)
    return args, config, settings


def connect(args: argparse.Namespace, settings: JobSettings, log_file: Path) -> None:
    """Join (or start) the cluster. Unless `--verbose`, Ray's, MLflow's and the libraries' messages
    go to `log_file`, named here, and the workers' output stays in Ray's logs (`console`)."""
    if not args.verbose:
        console.quiet(log_file)
        print(f"Ray's, MLflow's and the libraries' messages: {log_file}")
    raydata.connect(settings.ray.address, log_to_driver=args.verbose)


def run_main(main: Callable[[], int]) -> int:
    """Config and data errors are the user's: a message and exit code 2, no traceback."""
    try:
        return main()
    except ConfigError as err:
        message = f"config error: {err}"
    except Exception as err:  # the engine's DataError or LayoutError, possibly wrapped by Ray
        found = raydata.data_error(err)
        if found is None:
            raise
        message = f"data error: {found}"
    # Leave Ray first: what its core prints while the driver goes ("Failed to push error to
    # driver") then comes before the message, and the last line is what went wrong.
    raydata.leave()
    print(message, file=sys.stderr)
    return 2


def job_tracking_uri(config: LatentQAConfig, settings: JobSettings) -> str:
    """As `jobs/train.py` resolves it: the setting, MLFLOW_TRACKING_URI, or `<train.output_dir>/mlflow.db`."""
    return tracking_uri(settings.mlflow, Path(config.train.output_dir))
