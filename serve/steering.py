"""The `Steering` deployment: control jobs, one at a time on a background thread; their state
lives in MLflow."""

import logging
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ray import serve

from latentqa_platform import console, controls
from latentqa_platform.adapters import AdapterCatalog
from latentqa_platform.serving import ControlRequest, Overloaded, RequestError, ServeSettings, check_tokens


@serve.deployment(name="Steering", num_replicas=1, ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=16)
class Steering:
    """Runs control jobs one at a time on a background thread, so submitting returns at once."""

    def __init__(self, settings: dict):
        from latentqa.paths import RUNS_DIR
        from latentqa.session import layout_for

        self.settings = ServeSettings.model_validate(settings)
        if not self.settings.verbose:
            console.quiet_replica()
        self.catalog = AdapterCatalog("decoder", self.settings.decoders, self.settings.tracking_uri())
        self.chat_format = layout_for(self.settings.engine_config()).chat_format  # counts tokens; no weights
        # One Steering per app: a new one means the last is gone, with the jobs it had queued or running.
        self.owner = f"serve app {serve.get_replica_context().app_name}"
        lost = controls.fail_orphaned_jobs(self.settings.mlflow, RUNS_DIR, self.owner)
        if lost:
            logging.getLogger("ray.serve").warning(
                "control jobs left unfinished by the last Steering, failed: %s", lost
            )
        self.queue = ThreadPoolExecutor(1, thread_name_prefix="latentqa-steer")
        self.pending, self.pending_lock = 0, threading.Lock()  # jobs queued or running
        self.session = None  # (decoder id, LatentQA): kept while jobs use the same decoder
        self.read_layers: dict[str, int] = {}  # decoder id -> the block it was trained to read

    def submit(self, request: dict, decoder_id: str) -> str:
        from latentqa.paths import RUNS_DIR

        body = ControlRequest.model_validate(request)
        texts = {f"qa.{i}.{j}": text for i, pair in enumerate(body.qa or []) for j, text in enumerate(pair)}
        texts |= {f"questions.{i}": text for i, text in enumerate(body.questions or [])}
        texts |= {"instruction": body.instruction} if body.instruction else {}
        check_tokens(self._tokens, texts, self.settings.max_turn_tokens)
        with self.pending_lock:
            if self.pending >= self.settings.max_queued_controls:
                raise Overloaded("name", f"{self.pending} control jobs are queued or running; retry later")
            self.pending += 1
        try:
            self._check_read_layer(decoder_id)
        except BaseException:
            self._done()
            raise

        params = {
            "steps": str(body.steps or self.settings.engine_config().steer.steps),
            "decoder": decoder_id,
            "source": "qa" if body.qa else "instruction",
        }
        try:
            run = controls.open_job(self.settings.mlflow, RUNS_DIR, body.name, params, self.owner)
        except BaseException:
            self._done()
            raise
        self.queue.submit(self._run, run, body, decoder_id)
        return run.run_id

    def _check_read_layer(self, decoder_id: str) -> None:
        """Refuse (422) a control that this app's `steer.layers` would read elsewhere than the decoder."""
        from latentqa.config import ConfigError
        from latentqa.decoders import trained_read_layer
        from latentqa.steering import control_read_layer

        config = self.settings.engine_config()
        if config.steer.layers is None:
            return  # the control follows the decoder
        if decoder_id not in self.read_layers:  # an id names one version: its read layer never changes
            with tempfile.TemporaryDirectory() as tmp:
                folder = self.catalog.fetch(decoder_id, Path(tmp)).folder
                self.read_layers[decoder_id] = trained_read_layer(folder, config.patch.read_layer)
        try:
            control_read_layer(config.steer, self.read_layers[decoder_id])
        except ConfigError as err:
            raise RequestError("decoder", str(err)) from None

    def _tokens(self, text: str) -> int:
        return len(self.chat_format.encode([text], plain=True)[0])

    def _done(self) -> None:
        with self.pending_lock:
            self.pending -= 1

    def _session(self, decoder_id: str):
        from latentqa.session import LatentQA

        if self.session is None or self.session[0] != decoder_id:
            self.session = None  # free the previous copy first
            with tempfile.TemporaryDirectory() as tmp:
                folder = self.catalog.fetch(decoder_id, Path(tmp)).folder
                self.session = (decoder_id, LatentQA.load(self.settings.engine_config(), folder))
        return self.session[1]

    def _run(self, run, body: ControlRequest, decoder_id: str) -> None:
        """The job on the queue's thread: whatever fails ends its run FAILED (an exception here
        would be lost with the thread, and the job would look queued forever)."""
        from latentqa.steering import ControlFile

        try:
            try:
                lqa = self._session(decoder_id)
            except Exception as err:
                controls.fail_job(run, err, "loading the decoder: ")
                return
            prompts, heldout = self.settings.read_prompts()
            controls.run_job(
                lqa,
                run,
                self.settings.control_model_prefix + body.name,
                ControlFile(name=body.name, instruction=body.instruction, qa=body.qa or []),
                body.questions or self.settings.control_questions,
                prompts,
                {"control": body.name, "decoder": decoder_id, "target_model": lqa.config.model.path},
                body.steps,
                body.lr,
                heldout,
            )
        except Exception as err:
            controls.fail_job(run, err)
        finally:
            self._done()
