"""MLflow: one run per training (or steering) run name, its metrics and figures, its checkpoints
as logged models, and adapters in the model registry.

An adapter is logged as an MLflow logged model of its run (`log_decoder`): a pyfunc model whose
artifacts are the PEFT adapter (`adapter/`) and the engine config it was trained with
(`config.json`), at the step it was saved, so MLflow links the run's metrics at that step to it.
Every checkpoint of a training run is one; the final one is registered as a version of the
decoder's model (`register_decoder`). `resolve_adapter` turns a registry URI (`models:/name@alias`,
`models:/name/3`), a logged model (`models:/m-...`) or a local folder back into an adapter folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import io
import json
import logging
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

import latentqa.paths
from latentqa.config import ConfigError, LatentQAConfig
from latentqa.decoders import registry_reference

from .settings import MlflowSettings, artifact_location, tracking_uri

# Search runs by this tag: a resumed run reopens the MLflow run of its name.
RUN_NAME_TAG = "latentqa.run_name"


@dataclass(frozen=True)
class RunRef:
    """An MLflow run, by value (it travels to Ray workers)."""

    tracking_uri: str
    run_id: str
    experiment_id: str

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(self.tracking_uri)


def slug(text: str) -> str:
    """Lower-case letters and digits joined by dashes: a name safe in MLflow, labels and paths."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def model_slug(path: str) -> str:
    """`meta-llama/Meta-Llama-3-8B-Instruct` -> `meta-llama-3-8b-instruct`; a GGUF file by its stem."""
    return slug(Path(path.rstrip("/")).name.removesuffix(".gguf")) or "model"


def decoder_model_name(settings: MlflowSettings, config: LatentQAConfig) -> str:
    return settings.registered_model or f"latentqa-decoder-{model_slug(config.model.path)}"


def code_version(job_file: str | Path) -> dict[str, str]:
    """The git commit (when the code is a checkout) and a hash of the engine, platform and job
    sources, which identifies the code also where there is no .git (a `ray job submit` package)."""
    digest = hashlib.sha256()
    roots = [Path(latentqa.paths.__file__).parent, Path(__file__).parent, Path(job_file).resolve().parent]
    for path in sorted(p for root in roots for p in root.glob("*.py")):
        digest.update(path.name.encode() + path.read_bytes())
    tags = {"latentqa.code_sha256": digest.hexdigest()[:16]}
    try:
        root = Path(job_file).resolve().parents[1]
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, timeout=10)
        if sha.returncode == 0:
            tags["mlflow.source.git.commit"] = sha.stdout.strip()
            tags["latentqa.git_dirty"] = str(bool(dirty.stdout.strip())).lower()
    except (OSError, subprocess.SubprocessError):
        pass
    return tags


def flatten(tree: dict, prefix: str = "") -> dict[str, str]:
    """Nested config sections -> `section.field` params (non-strings as JSON)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, str) else json.dumps(value)
    return out


def train_params(
    config: LatentQAConfig, job: dict, examples: int, total_steps: int, files: dict[str, str]
) -> dict[str, str]:
    """A training run's params: the engine config, the job's (`ray`, `strategy`), the data's size
    and the sha256 of every data file (`data.sha256.<set>/<file>`)."""
    return {
        **flatten(json.loads(config.model_dump_json())),
        **flatten(job),
        "data.train.examples": str(examples),
        "train.total_steps": str(total_steps),
        **{f"data.sha256.{Path(p).parent.name}/{Path(p).name}": digest for p, digest in files.items()},
    }


def publish_run(run: RunRef, run_dir: Path, history: list[dict], logged_model: str, name: str, tags: dict) -> str:
    """A finished training run: its run folder's files as artifacts, the loss curves, the final
    checkpoint's logged model registered as a version of `name`; returns `name/version`."""
    client = run.client()
    client.log_artifacts(run.run_id, str(run_dir / "decoder"), "decoder")
    for file in ("config.json", "job.json", "metrics.json"):
        client.log_artifact(run.run_id, str(run_dir / file))
    log_loss_curves(run, history)
    registered = register_decoder(run.tracking_uri, logged_model, name, tags)
    finish_run(run)
    return registered


def open_run(
    settings: MlflowSettings, output_dir: Path, run_name: str, params: dict[str, str], tags: dict[str, str]
) -> RunRef:
    """The MLflow run of `run_name` (reopened on resume, else created), with its params logged.

    Params are immutable in MLflow: a resume with changed settings keeps them as `resume.*` tags.
    """
    from mlflow.entities import Param, RunTag
    from mlflow.tracking import MlflowClient

    output_dir.mkdir(parents=True, exist_ok=True)
    uri = tracking_uri(settings, output_dir)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(settings.experiment)
    experiment_id = (
        experiment.experiment_id
        if experiment
        else client.create_experiment(settings.experiment, artifact_location(settings, output_dir))
    )
    found = client.search_runs([experiment_id], f"tags.`{RUN_NAME_TAG}` = '{run_name}'", max_results=1)
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        logged = found[0].data.params
    else:
        run_id = client.create_run(experiment_id, run_name=run_name, tags={RUN_NAME_TAG: run_name}).info.run_id
        logged = {}
    changed = {k: v for k, v in params.items() if k in logged and logged[k] != v[:6000]}
    if changed:
        print(f"note: resumed with changed settings (kept as tags, params are immutable): {sorted(changed)}")
        tags = {**tags, **{f"resume.{k}": v[:5000] for k, v in changed.items()}}
    new = [Param(k, v[:6000]) for k, v in params.items() if k not in logged]
    for start in range(0, len(new), 100):  # MLflow's batch limit
        client.log_batch(run_id, params=new[start : start + 100])
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    return RunRef(uri, run_id, experiment_id)


def log_metrics(run: RunRef, metrics: dict[str, float], step: int, model_id: str | None = None) -> None:
    """Metrics of the run at `step`; with `model_id`, also of that logged model (a checkpoint)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    run.client().log_batch(run.run_id, metrics=[Metric(k, float(v), now, step, model_id) for k, v in metrics.items()])


def log_loss_curves(run: RunRef, history: list[dict]) -> None:
    """Train loss and the eval losses against the step, as `loss_curves.png` on the run."""
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    for key, style in (
        ("train/loss", "-"),
        ("eval/loss_true", "o-"),
        ("eval/loss_shuffled", "s--"),
        ("eval/loss_none", "^:"),
    ):
        points = [(h["step"], h[key]) for h in history if key in h]
        if points:
            axis.plot(*zip(*points), style, label=key, markersize=3)
    axis.set(xlabel="optimizer step", ylabel="loss (nats per answer token)", yscale="log")
    axis.legend()
    axis.grid(alpha=0.3)
    run.client().log_figure(run.run_id, figure, "loss_curves.png")
    plt.close(figure)


def finish_run(run: RunRef, status: str = "FINISHED") -> None:
    run.client().set_terminated(run.run_id, status)


def _adapter_pyfunc():
    import mlflow.pyfunc

    class LatentQADecoder(mlflow.pyfunc.PythonModel):
        """Reads dialogs with the decoder. Input: rows with `dialog` (a list of {role, content}
        messages, or its JSON) and `question`; output: one answer per row."""

        def load_context(self, context):
            from latentqa.session import LatentQA

            config = LatentQAConfig.model_validate_json(Path(context.artifacts["config"]).read_text())
            self.lqa = LatentQA.load(config, context.artifacts["adapter"])

        def predict(self, context, model_input, params=None):
            from latentqa.reading import read

            rows = model_input.to_dict("records") if hasattr(model_input, "to_dict") else list(model_input)
            dialogs = [json.loads(r["dialog"]) if isinstance(r["dialog"], str) else r["dialog"] for r in rows]
            return [a[0] for a in read(self.lqa, dialogs, [[r["question"]] for r in rows])]

    return LatentQADecoder()


def log_decoder(
    run: RunRef,
    adapter_dir: Path,
    config_file: Path,
    name: str = "adapter_model",
    step: int = 0,
    tags: dict[str, str] | None = None,
) -> str:
    """Log a PEFT adapter and its engine config on the run as a logged model named `name` at
    `step` (MLflow links the run's metrics at that step to it); returns its model id."""
    import mlflow

    mlflow.set_tracking_uri(run.tracking_uri)
    status = run.client().get_run(run.run_id).info.status
    mlflow.start_run(run_id=run.run_id)  # log_model logs into the active run
    try:
        info = mlflow.pyfunc.log_model(
            name=name,
            python_model=_adapter_pyfunc(),
            artifacts={"adapter": str(adapter_dir), "config": str(config_file)},
            pip_requirements=[f"latentqa=={importlib.metadata.version('latentqa')}", "torch", "transformers", "peft"],
            step=step,
            tags=tags,
        )
    finally:
        mlflow.end_run(status)  # leave the run as it was: its owner finishes it
    return info.model_id


def register_decoder(tracking: str, model_id: str, name: str, tags: dict[str, str]) -> str:
    """Register a logged adapter model as a new version of model `name` with `tags`; returns `name/version`."""
    import mlflow

    # MLflow's own registration also links the version on the logged model's page; it reads the
    # model from the default tracking store, and registers where that store's registry is. (No
    # set_registry_uri: it is process-wide and outranks every client's own tracking URI after.)
    mlflow.set_tracking_uri(tracking)
    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said):  # MLflow prints its news to stderr; the caller says it once
            version = mlflow.register_model(f"models:/{model_id}", name, tags=tags)
    finally:
        if said.getvalue().strip():
            logging.getLogger("mlflow").info(said.getvalue().strip())
    return f"{name}/{version.version}"


def register_adapter(run: RunRef, adapter_dir: Path, config_file: Path, name: str, tags: dict[str, str]) -> str:
    """Log a PEFT adapter and its engine config on the run and register them as a version of
    model `name` with `tags`; returns `name/version`."""
    return register_decoder(run.tracking_uri, log_decoder(run, adapter_dir, config_file), name, tags)


def register_shipped_decoder(settings: MlflowSettings, output_dir: Path, config: LatentQAConfig) -> str:
    """Register the decoder shipped with the project that `config.model.decoder_adapter` names
    (e.g. `infra/configs/smollm2-135m-instruct.yaml`'s) on first use; returns `name/version`."""
    adapter = Path(config.model.decoder_adapter)
    return register_shipped(
        settings, output_dir, adapter, config, decoder_model_name(settings, config), decoder_tags(config)
    )


def register_shipped(
    settings: MlflowSettings, output_dir: Path, adapter: Path, config: LatentQAConfig, name: str, tags: dict[str, str]
) -> str:
    """Register an adapter folder shipped with the project (a decoder, a control), trained with
    `config`, as a version of model `name` on first use; later calls find that version by the
    hash of its weights. Returns `name/version`."""
    digest = hashlib.sha256((adapter / "adapter_model.safetensors").read_bytes()).hexdigest()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri(settings, output_dir))
    for version in client.search_model_versions(f"name='{name}'"):
        if version.tags.get("adapter_sha256") == digest:
            return f"{name}/{version.version}"
    run = open_run(
        settings,
        output_dir,
        f"shipped-{adapter.name}",
        flatten(json.loads(config.model_dump_json())),
        {"source": "shipped"},
    )
    with tempfile.TemporaryDirectory() as tmp:
        config_file = Path(tmp) / "config.json"
        config_file.write_text(config.model_dump_json(indent=2))
        registered = register_adapter(
            run, adapter, config_file, name, {**tags, "adapter_sha256": digest, "source": "shipped"}
        )
    finish_run(run)
    return registered


def decoder_tags(config: LatentQAConfig) -> dict[str, str]:
    """What the MLflow UI compares decoders by: where they read and write, and on what target."""
    tags = {
        "read_layer": str(config.patch.read_layer),
        "write_layer": str(config.patch.write_layer),
        "target_model": config.model.path,
        "run_name": config.train.run_name,
    }
    if config.patch.min_layer is not None:
        tags["read_layers"] = f"[{config.patch.min_layer}, {config.patch.max_layer})"
    return tags


def resolve_adapter(uri: str, tracking: str | None = None, download_dir: Path | None = None) -> Path:
    """A PEFT adapter folder from a registry URI (`models:/name@alias`, `models:/name/3`), a logged
    model (`models:/m-...`, e.g. a checkpoint) or a local folder; one from MLflow comes with its
    `config.json` beside it. Raises FileNotFoundError naming what is missing."""
    if not uri.startswith("models:/"):
        folder = Path(uri)
        if not (folder / "adapter_config.json").is_file():
            raise FileNotFoundError(f"{uri}: not a PEFT adapter folder (no adapter_config.json)")
        return folder
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    # Through the client, not download_artifacts("models:/..."), which looks the name up in the
    # default store rather than in `tracking` (MLflow 3.17).
    client = MlflowClient(tracking, registry_uri=tracking)
    try:
        location = client.get_logged_model(logged_model_id(uri, client)).artifact_location
        mlmodel = yaml.safe_load(mlflow.artifacts.load_text(f"{location}/MLmodel"))
        within = Path(mlmodel["flavors"]["python_function"]["artifacts"]["adapter"]["path"])  # artifacts/<folder name>
        # The whole artifacts folder: the adapter and, beside it, the config.json it was trained with.
        local = mlflow.artifacts.download_artifacts(
            f"{location}/{within.parent}", dst_path=download_dir, tracking_uri=tracking
        )
        adapter = Path(local) / within.name
    except MlflowException as err:
        raise FileNotFoundError(f"{uri}: {err.message}") from None
    except KeyError:
        raise FileNotFoundError(f"{uri}: not a LatentQA adapter model (its MLmodel names no adapter)") from None
    if not (adapter / "adapter_model.safetensors").is_file():
        raise FileNotFoundError(f"{uri}: the model holds no adapter_model.safetensors")
    return adapter


def fetch_registered_decoder(reference: str, download_dir: Path, registry: str | None, config: LatentQAConfig) -> Path:
    """The engine's registry plugin (entry point `latentqa.registries`): `LatentQA.load(config,
    decoder="models:/...")` fetches here, from `registry` or as the jobs find the tracking store."""
    return resolve_adapter(
        reference, registry or tracking_uri(MlflowSettings(), Path(config.train.output_dir)), download_dir
    )


def pinned(decoder: str, tracking: str) -> str:
    """`decoder` with an alias (`models:/NAME@alias`, `NAME@alias`) resolved once, to the version it
    names now (`models:/NAME/N`), so every worker of a job loads the same version even if the
    alias moves meanwhile; versions, logged models and folders are returned as they are."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    reference = registry_reference(decoder)
    if reference is None or "@" not in reference:
        return decoder
    name, alias = reference.removeprefix("models:/").split("@", 1)
    try:
        version = MlflowClient(tracking, registry_uri=tracking).get_model_version_by_alias(name, alias).version
    except MlflowException as err:
        raise ConfigError(f"--decoder {decoder}: {err.message}") from None
    return f"models:/{name}/{version}"


def logged_model_id(uri: str, client) -> str:
    """The logged model behind `models:/m-...`, `models:/name/3` or `models:/name@alias`.
    Raises FileNotFoundError for a malformed URI, MlflowException for an unknown one."""
    reference = uri.removeprefix("models:/")
    if re.fullmatch(r"m-[0-9a-f]{32}", reference):
        return reference
    name, alias = reference.split("@", 1) if "@" in reference else (reference, None)
    name, _, version = name.partition("/") if alias is None else (name, "", "")
    if not name or not (alias or version.isdigit()):
        raise FileNotFoundError(
            f"{uri}: expected models:/NAME@ALIAS, models:/NAME/VERSION or models:/m-<logged model id>"
        )
    found = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    return found.model_id or found.source.removeprefix("models:/")
