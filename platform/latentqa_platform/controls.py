"""Control (steering) jobs tracked in MLflow: one run per job, the adapter registered at the end.

Used by the Serve app's POST /v1/controls (the run id is the job id; GET reads the job's state
back from MLflow, so any gateway replica can answer) and by `jobs/control.py`.
"""

from __future__ import annotations

import logging
import re
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path

from latentqa.config import LatentQAConfig
from latentqa.data import QAPair
from latentqa.models import CONTROL
from latentqa.paths import SHIPPED_CONTROLS
from latentqa.reading import read
from latentqa.session import LatentQA
from latentqa.steering import ControlFile, steer
from latentqa.steering_evaluation import SteeringEvaluation

from .adapters import KIND_TAG
from .settings import MlflowSettings, tracking_uri
from .tracking import RunRef, finish_run, log_metrics, open_run, register_adapter, register_shipped, slug

JOB_KIND = "control-job"  # KIND_TAG of a control job's run
NAME_TAG, ADAPTER_TAG, ERROR_TAG = "latentqa.control", "latentqa.adapter", "latentqa.error"
OWNER_TAG = "latentqa.owner"  # who runs the job: a Serve app's Steering, or a `jobs/control.py` run
RUN_ID = re.compile(r"^[0-9a-f]{32}$")
# An absolute path of two or more parts, quoted (as Python's OSErrors quote it, spaces and all) or
# not, a file:// URI's too: the server's, not the client's. Its folders are cut; registry and
# HTTP references (models:/name/3, runs:/id/x, http://host/x) are the client's and stay whole.
_QUOTED_PATH = re.compile(r"""(['"])(?:file://)?/[^'"]*/([^'"/]*)\1""")
_SERVER_PATH = re.compile(r"(?:(?<=file://)|(?<![\w.~:/]))(?:/[^/\s'\"]+)+(?=/[^/\s'\"]+)")
log = logging.getLogger(__name__)
_STATUS = {"SCHEDULED": "queued", "RUNNING": "running", "FINISHED": "succeeded", "FAILED": "failed", "KILLED": "failed"}


def open_job(settings: MlflowSettings, output_dir: Path, name: str, params: dict[str, str], owner: str) -> RunRef:
    """A new MLflow run for a control job (never a reopened one: the run name is unique)."""
    tags = {KIND_TAG: JOB_KIND, NAME_TAG: name, OWNER_TAG: slug(owner)}
    run = open_run(settings, output_dir, f"control-{name}-{uuid.uuid4().hex[:8]}", params, tags)
    run.client().update_run(run.run_id, status="SCHEDULED")
    return run


class JobLost(RuntimeError):
    """What ran the job stopped before the job ended."""


def fail_orphaned_jobs(settings: MlflowSettings, output_dir: Path, owner: str) -> list[str]:
    """End FAILED the jobs `owner` left queued or running: it is starting again, so whatever ran
    them is gone, and they would otherwise look queued or running forever. Returns their ids."""
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(settings, output_dir)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(settings.experiment)
    if experiment is None:
        return []
    mine = f"tags.`{KIND_TAG}` = '{JOB_KIND}' and tags.`{OWNER_TAG}` = '{slug(owner)}'"
    lost = []
    for status in ("SCHEDULED", "RUNNING"):
        for found in client.search_runs([experiment.experiment_id], f"{mine} and attributes.status = '{status}'"):
            run = RunRef(uri, found.info.run_id, experiment.experiment_id)
            fail_job(run, JobLost(f"{owner} stopped before the job ended; submit it again"))
            lost.append(found.info.run_id)
    return lost


def register_shipped_controls(
    settings: MlflowSettings, output_dir: Path, config: LatentQAConfig, decoder: str, prefix: str
) -> list[str]:
    """The controls shipped for `config`'s decoder (`infra/controls/<decoder>/<control>/`), each
    registered on first use as a version of control model `<prefix><control>`, tagged with the
    registered `decoder` it was trained through; returns their `name/version`s."""
    shipped = SHIPPED_CONTROLS / Path(config.model.decoder_adapter).name
    folders = sorted(p for p in shipped.iterdir() if p.is_dir()) if shipped.is_dir() else []
    tags = {KIND_TAG: "control", "decoder": f"models:/{decoder}", "target_model": config.model.path}
    return [
        register_shipped(settings, output_dir, folder, config, prefix + folder.name, {**tags, "control": folder.name})
        for folder in folders
    ]


def read_control(lqa: LatentQA, instruction: str, questions: Sequence[str]) -> list[QAPair]:
    """The paper's way to get a control: read the target under the instruction."""
    [answers] = read(lqa, [[{"role": "user", "content": instruction}]], list(questions), lqa.decoder_read_layer)
    return list(zip(questions, answers))


class DegenerateControl(RuntimeError):
    """The control's held-out replies are past the config's fluency bounds (`steer.max_*`)."""


def run_job(
    lqa: LatentQA,
    run: RunRef,
    registered_name: str,
    control: ControlFile,
    questions: Sequence[str],
    prompts: Sequence[str],
    tags: dict[str, str],
    steps: int | None = None,
    lr: float | None = None,
    heldout: Sequence[str] = (),
    baselines: bool = False,
) -> str | None:
    """A whole control job: steer (loss and progress logged at every step), measure the target and
    the steered target on the `heldout` prompts, with `baselines` the prompted target and the
    steering vector too (`latentqa.steering_evaluation`: metrics `steering/*`, the replies, table
    and figure as `steering/` artifacts), and register the adapter as a
    new version of `registered_name` unless its language is degenerate. Returns `name/version`;
    a failure, a degenerate control included, ends the run FAILED with the error as a tag and is
    not raised: the run is what the caller reports. The session's control adapter is removed."""
    try:
        client = run.client()
        client.update_run(run.run_id, status="RUNNING")
        if not control.qa:
            control = control.model_copy(update={"qa": read_control(lqa, control.instruction or "", questions)})
        client.log_dict(run.run_id, {"qa": [list(pair) for pair in control.qa]}, "control.json")
        cfg = lqa.config.steer.model_copy(update={k: v for k, v in (("steps", steps), ("lr", lr)) if v is not None})
        evaluation = SteeringEvaluation(lqa, control, heldout) if heldout else None
        compared = evaluation.baselines(prompts) if evaluation and baselines else []

        def on_step(step: int, loss: float) -> None:
            log_metrics(run, {"control/loss": loss, "control/progress": (step + 1) / cfg.steps}, step + 1)

        with tempfile.TemporaryDirectory() as tmp:
            adapter_dir = Path(tmp) / "adapter"
            steer(lqa, list(control.qa), list(prompts), adapter_dir, cfg, on_step=on_step)
            if evaluation is not None:
                measured = evaluation.result([*compared, evaluation.steered()])
                log_metrics(run, measured.as_metrics(), cfg.steps)
                client.log_artifacts(run.run_id, str(measured.write(Path(tmp) / "steering")), "steering")
                problem = measured.degenerate(cfg)
                if problem:
                    raise DegenerateControl(f"{problem}; not registered (see the run's steering/ report)")
            config_file = Path(tmp) / "config.json"
            config_file.write_text(lqa.config.model_copy(update={"steer": cfg}).model_dump_json(indent=2))
            adapter = register_adapter(run, adapter_dir, config_file, registered_name, {KIND_TAG: "control", **tags})
        client.set_tag(run.run_id, ADAPTER_TAG, adapter)
        finish_run(run)
        return adapter
    except Exception as err:  # the job's state is all the caller sees
        fail_job(run, err)
        return None
    finally:
        if CONTROL in lqa.model.adapters.model.peft_config:
            lqa.model.adapters.remove_control()


def without_server_paths(text: str) -> str:
    """`text` with each server path cut to its last part: `'…/prompts.json'`."""
    return _SERVER_PATH.sub("…", _QUOTED_PATH.sub(r"\1…/\2\1", text))


def fail_job(run: RunRef, err: BaseException, doing: str = "") -> None:
    """End the job's run FAILED. The error tag, which GET /v1/controls/{id} returns to anyone
    holding the job id, says what went wrong with each server path cut to its last part; the
    whole error and its trace go to the log under the job's run id."""
    log.error("control job %s failed: %s", run.run_id, doing, exc_info=err)
    error = without_server_paths(f"{doing}{type(err).__name__}: {err}")
    run.client().set_tag(run.run_id, ERROR_TAG, error[:5000])
    finish_run(run, "FAILED")


def job_status(tracking_uri: str, run_id: str) -> dict | None:
    """A control job's state from its MLflow run; None if there is no such job."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    if not RUN_ID.match(run_id):
        return None
    client = MlflowClient(tracking_uri)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        return None
    tags = run.data.tags
    if tags.get(KIND_TAG) != JOB_KIND:
        return None
    status = _STATUS.get(run.info.status, "failed")
    steps = int(run.data.params.get("steps", 0)) or 1
    progress = run.data.metrics.get("control/progress", 0.0)
    return {
        "id": run_id,
        "name": tags.get(NAME_TAG, ""),
        "status": status,
        "progress": progress,
        "step": round(progress * steps),
        "steps": steps,
        "loss": run.data.metrics.get("control/loss"),
        "adapter": tags.get(ADAPTER_TAG),
        "error": tags.get(ERROR_TAG),
    }
