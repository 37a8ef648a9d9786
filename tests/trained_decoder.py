"""A tiny decoder trained in the test session and registered in a real MLflow store, for the Serve
and batch-job tests (built once per session, whichever test module asks first)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

DECODER_MODEL = "latentqa-decoder-tiny"
ALIAS = "champion"
STEPS = 30


@dataclass(frozen=True)
class TrainedDecoder:
    root: Path
    run_dir: Path  # runs/<name>/ with decoder/ and config.json, as `latentqa train` writes it
    tracking_uri: str
    artifact_location: str
    run_id: str
    version: str

    @property
    def folder(self) -> Path:
        return self.run_dir / "decoder"

    @property
    def registry_uri(self) -> str:
        return f"models:/{DECODER_MODEL}@{ALIAS}"

    def mlflow_settings(self) -> dict:
        return {"tracking_uri": self.tracking_uri, "artifact_location": self.artifact_location}


def trained_decoder(root: Path) -> TrainedDecoder:
    """Train with the engine's own `latentqa train` (in process, a few seconds), then register the
    PEFT adapter as a version of DECODER_MODEL with an alias."""
    from mlflow.tracking import MlflowClient

    from latentqa.cli import main
    from latentqa.config import LatentQAConfig
    from latentqa_platform.settings import MlflowSettings
    from latentqa_platform.tracking import decoder_tags, finish_run, flatten, open_run, register_adapter

    done = root / "registered.txt"
    settings = MlflowSettings(
        tracking_uri=f"sqlite:///{root / 'mlflow.db'}", artifact_location=(root / "mlartifacts").as_uri()
    )
    run_dir = root / "runs" / "tiny"
    if not done.exists():
        main(
            [
                "train",
                "--run-name",
                "tiny",
                "--train.output_dir",
                str(root / "runs"),
                "--train.max_steps",
                str(STEPS),
                "--data.eval",
                "null",
            ]
        )
        config = LatentQAConfig.model_validate_json((run_dir / "config.json").read_text())
        adapter = shutil.copytree(run_dir / "decoder", root / "adapter")  # registered artifacts keep the folder name
        run = open_run(settings, root, "tiny", flatten(config.model_dump(mode="json")), {})
        name_version = register_adapter(run, adapter, run_dir / "config.json", DECODER_MODEL, decoder_tags(config))
        version = name_version.split("/")[1]
        MlflowClient(settings.tracking_uri).set_registered_model_alias(DECODER_MODEL, ALIAS, version)
        finish_run(run)
        done.write_text(f"{run.run_id} {version}")
    run_id, version = done.read_text().split()
    return TrainedDecoder(root, run_dir, settings.tracking_uri, settings.artifact_location, run_id, version)
