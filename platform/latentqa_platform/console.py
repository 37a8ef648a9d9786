"""What a job prints, and where everything else goes.

A person running `jobs/train.py` wants the progress, the evaluation figures, where the decoder
went and the answers. Ray, Ray Data, MLflow, transformers and PEFT say much more: INFO lines,
the same warning from every worker, a result dict per checkpoint and rank, download bars. So,
unless `--verbose`:

- the driver's own library messages and Python warnings go to the run's `console.log`;
- the workers' output stays in Ray's logs (the driver joins with `log_to_driver=False`);
- the main rank's lines reach the console through a `Channel`, a Ray queue the driver prints.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path

# Ray Data configures "ray.data" when imported, with a console handler of its own; MLflow
# configures "mlflow" when imported unless MLFLOW_CONFIGURE_LOGGING is false.
LIBRARY_LOGGERS = ("ray", "ray.data", "ray.train", "mlflow", "alembic", "transformers", "peft", "py.warnings")


def quiet(log_file: Path) -> None:
    """Send the driver's library messages and warnings to `log_file` instead of the console."""
    os.environ["MLFLOW_CONFIGURE_LOGGING"] = "false"
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # its "Loading weights" bars write to stderr, not through logging
    log_file.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.captureWarnings(True)
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        for old in logger.handlers:  # a sweep runs several jobs in one process
            if isinstance(old, logging.FileHandler):
                old.close()
        logger.handlers = [handler]
        logger.propagate = False
        logger.setLevel(logging.INFO)


# A Serve replica's environment unless `ServeSettings.verbose`: Serve's lines (an access line per
# request) go to Ray's Serve log files only, and no loading bars; see `quiet_replica` for warnings.
QUIET_REPLICA_ENV = {"RAY_SERVE_LOG_TO_STDERR": "0", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


def quiet_replica() -> None:
    """Inside a Serve replica: library warnings go to the replica's Serve log file, beside its
    access lines, instead of stderr (which Ray forwards to `serve run`'s console)."""
    logging.captureWarnings(True)
    files = [h for h in logging.getLogger("ray.serve").handlers if isinstance(h, logging.FileHandler)]
    warnings_logger = logging.getLogger("py.warnings")
    warnings_logger.handlers, warnings_logger.propagate = files, False


def format_metrics(metrics: dict[str, float]) -> str:
    return "  ".join(f"{k}={v:.4g}" for k, v in metrics.items())


class Channel:
    """Lines from the workers, printed by the driver as they come (a thread drains the queue)."""

    def __init__(self):
        from ray.util.queue import Queue  # here: `quiet` alone needs no Ray

        self.queue = Queue(actor_options={"num_cpus": 0})  # no CPU taken from the workers
        self._stop = threading.Event()
        self._printer = threading.Thread(target=self._print, daemon=True)
        self._printer.start()

    def _print(self) -> None:
        from ray.util.queue import Empty

        while not self._stop.is_set() or not self.queue.empty():
            try:
                line = self.queue.get(timeout=0.5)
            except Empty:
                continue
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

    def close(self) -> None:
        """Print what is left, then stop."""
        self._stop.set()
        self._printer.join()
        self.queue.shutdown()


def for_rank(is_main: bool, queue) -> Callable[[str], None]:
    """A print for the main rank only, through the driver's channel when it has one."""

    def say(text: str) -> None:
        if not is_main:
            return
        if queue is not None:
            queue.put(text)
        else:  # not print(): Ray Train tees a patched print to a wrapped stdout twice
            sys.stdout.write(text + "\n")
            sys.stdout.flush()

    return say
