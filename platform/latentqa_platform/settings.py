"""The Ray side of a job's configuration: the cluster, the workers, checkpoints and MLflow.

The engine's `latentqa.config.LatentQAConfig` says *what* is trained; `JobSettings` says *where*
and *how it is tracked*. Both come from the same YAML file and the same dotted overrides: the
`ray:` and `mlflow:` sections (`--ray.num_workers 4 --mlflow.experiment sweeps`) go here, every
other section to the engine's config. Everything is validated before Ray starts anything.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError

from latentqa.config import (
    ConfigError,
    LatentQAConfig,
    StrictModel,
    load_config,
    merge_trees,
    parse_overrides,
    read_config_file,
    validation_message,
)

JOB_SECTIONS = ("ray", "mlflow")


class RaySettings(StrictModel):
    address: str | None = None
    """Cluster to join (`auto`, `ray://host:10001`, `host:6379`). None: RAY_ADDRESS, else a running
    local cluster, else start one for this job."""
    num_workers: int = Field(2, ge=1)
    """Ray Train workers (one rank each)."""
    cpus_per_worker: float = Field(0.5, gt=0)
    """Fractional by default: two workers at one CPU each leave Ray Data none on a 2-CPU machine
    and the run hangs (PLATFORM-NOTES)."""
    use_gpu: bool = False
    """One GPU per worker."""
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """How Ray places the workers on nodes: PACK (on as few as possible: a node's ranks share its
    fast links), SPREAD (on as many as possible: 2 workers on 2 nodes, one each), STRICT_PACK (all
    on one) or STRICT_SPREAD (each on its own), which Ray never relaxes. Workers that take every
    GPU of their nodes land the same under PACK and SPREAD."""
    storage_path: str | None = None
    """Where Ray Train keeps checkpoints (`<storage_path>/<train.run_name>/checkpoint_*`): a
    folder every node sees, or a URI such as `s3://bucket/runs`. None: `train.output_dir`."""
    checkpoint_every: int = Field(50, ge=0)
    """Optimizer steps between checkpoints; 0: only at the end. The last step always checkpoints."""
    checkpoints_to_keep: int | None = Field(2, ge=1)
    """Newest checkpoints kept; null: all."""
    max_failures: int = Field(0, ge=-1)
    """Worker-group restarts Ray Train attempts (from the latest checkpoint) before failing."""
    fail_after_step: int | None = Field(None, ge=1)
    """For tests: raise in the train loop right after the checkpoint of this step."""


class MlflowSettings(StrictModel):
    enabled: bool = True
    """Track the run in MLflow (params, metrics, checkpoints, the registered decoder)."""
    tracking_uri: str | None = None
    """None: MLFLOW_TRACKING_URI, else `sqlite:///<train.output_dir>/mlflow.db` (absolute)."""
    artifact_location: str | None = None
    """Artifact root of a new experiment. None with the default sqlite store:
    `<train.output_dir>/mlartifacts`; otherwise the tracking server's default."""
    experiment: str = "latentqa"
    """The MLflow experiment runs go to."""
    registered_model: str | None = None
    """None: `latentqa-decoder-<target model name>`."""


class JobSettings(StrictModel):
    ray: RaySettings = RaySettings()
    """How the job runs on Ray."""
    mlflow: MlflowSettings = MlflowSettings()
    """How the job is tracked."""


def load_job_config(
    path: str | Path | None = None, overrides: list[str] | None = None
) -> tuple[LatentQAConfig, JobSettings]:
    """Defaults, then the YAML file, then overrides, split between the engine and the job.

    Raises `ConfigError` naming the file and field on anything unknown or invalid.
    """
    tree = read_config_file(path) if path is not None else {}
    extra = parse_overrides(overrides or [])
    job_tree = merge_trees(
        {k: tree.pop(k) for k in JOB_SECTIONS if k in tree}, {k: extra.pop(k) for k in JOB_SECTIONS if k in extra}
    )
    try:
        settings = JobSettings.model_validate(job_tree)
    except ValidationError as err:
        raise ConfigError(validation_message(str(path or "config"), err)) from None
    merged = merge_trees(tree, extra)
    try:
        config = load_config(None, merged)
    except ConfigError as err:
        raise ConfigError(str(err).replace("config:", f"{path}:", 1) if path else str(err)) from None
    return config, settings


def tracking_uri(settings: MlflowSettings, output_dir: Path) -> str:
    """The MLflow tracking URI: the setting, MLFLOW_TRACKING_URI, or an absolute sqlite store."""
    if settings.tracking_uri:
        return settings.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path(output_dir).resolve() / 'mlflow.db'}"


def artifact_location(settings: MlflowSettings, output_dir: Path) -> str | None:
    if settings.artifact_location:
        return settings.artifact_location
    if settings.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"):
        return None  # the server (or store) decides
    return (Path(output_dir).resolve() / "mlartifacts").as_uri()
