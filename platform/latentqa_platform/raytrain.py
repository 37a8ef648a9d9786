"""How `jobs/train.py` uses Ray Train: the plan every worker gets, the trainer built from the
`ray:` settings, the batches a worker streams from its shard, the checkpoints every rank reports
and resumes from, and the final decoder published where `latentqa read` finds it.

A checkpoint folder holds `adapter/` (PEFT, safetensors), `state/` (optimizer, scheduler, RNG;
under DeepSpeed one shard per rank), `progress.json` (step, epoch, batches done, history),
`config.json`, `data_order.json` (what fixes the order of the batches, which a resume must keep)
and, when the run is tracked, `mlflow_model.json` (the checkpoint's logged model).
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import ray
import ray.train
from pydantic import BaseModel
from ray.train import Checkpoint, CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.util.queue import Queue

from latentqa.config import ConfigError, LatentQAConfig, TrainConfig
from latentqa.layout import Batch, collate
from latentqa.models import DECODER
from latentqa.strategy import Strategy, StrategyConfig
from latentqa.training import ExampleSize, StepPlan, TrainProgress, length_grouped_order, sort_window, split_to

from . import raydata, tracking
from .files import publish_folder, write_whole
from .settings import RaySettings

ADAPTER, STATE, PROGRESS, CONFIG, LOGGED_MODEL = "adapter", "state", "progress.json", "config.json", "mlflow_model.json"
DATA_ORDER = "data_order.json"


class WorkerPlan(BaseModel):
    """What the driver hands every worker (Ray passes it as the loop's config)."""

    config: LatentQAConfig
    strategy: StrategyConfig
    steps: StepPlan
    ray: RaySettings  # checkpoint_every, fail_after_step
    mlflow: tracking.RunRef | None
    train_files: dict[str, str]  # path -> sha256 of every train-set file

    @property
    def has_eval(self) -> bool:
        return self.config.data.eval is not None

    def data_order(self) -> dict:
        """What fixes the order of the batches: a resume skips the batches done, so it must be
        the same order, or it would train on some examples twice and never on others."""
        train, mix = self.config.train, self.config.data.mix
        sources = {str(source.path) for source in mix}  # a source may share a QA set file's name
        order = {
            "train files": {Path(p).name: d for p, d in sorted(self.train_files.items()) if p not in sources},
            "train set": self.config.data.train.model_dump(mode="json"),
            "workers": self.ray.num_workers,
            "batch size": train.batch_size,
            "batch tokens": train.batch_tokens,
            "gradient accumulation": train.grad_accum,
            "seed": train.seed,
        }
        if mix:  # absent without one, so checkpoints from before mixes still resume
            order["mix"] = [{**s.model_dump(mode="json"), "sha256": self.train_files.get(str(s.path))} for s in mix]
        return order


def trainer(
    loop: Callable[[dict], None],
    plan: WorkerPlan,
    ray_settings: RaySettings,
    storage: str,
    datasets: dict,
    console: Queue | None = None,
) -> TorchTrainer:
    """The loop gets `{"plan": <WorkerPlan as JSON>, "console": <queue of lines for the driver>}`."""
    gpu = {"GPU": 1} if ray_settings.use_gpu else {}
    return TorchTrainer(
        loop,
        train_loop_config={"plan": plan.model_dump(mode="json"), "console": console},
        scaling_config=ScalingConfig(
            num_workers=ray_settings.num_workers,
            use_gpu=ray_settings.use_gpu,
            resources_per_worker={"CPU": ray_settings.cpus_per_worker, **gpu},
            placement_strategy=ray_settings.placement_strategy,
        ),
        run_config=RunConfig(
            name=plan.config.train.run_name,
            storage_path=storage if "://" in storage else str(Path(storage).resolve()),  # pyarrow needs it absolute
            failure_config=FailureConfig(max_failures=ray_settings.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=ray_settings.checkpoints_to_keep),
        ),
        datasets=datasets,
        # Ordered, deterministic splits: a resumed epoch skips exactly the batches already done.
        dataset_config=DataConfig(
            datasets_to_split=["train"], execution_options=ray.data.ExecutionOptions(preserve_order=True)
        ),
    )


def shard_batches(
    train: TrainConfig, pad_id: int, device, agree: Callable[[int], int]
) -> Callable[[int, int], Iterator[Batch]]:
    """`epoch_batches(epoch, skip)` over this worker's shard of the laid-out train set: windows
    (`sort_window`), each cut into batches of similar length (less padding) in a seeded order; with
    ordered splits the same order again on resume, so `skip` batches are exactly those done.

    Token-budget batches of different examples need not come to the same count, and data-parallel
    ranks must run the same number of steps: every window's count is agreed on (`agree`: the
    largest over ranks, a collective every rank calls once a window) and reached by halving the
    costliest batches (`split_to`)."""
    shard = ray.train.get_dataset_shard("train")
    window = sort_window(train)

    def epoch_batches(epoch: int, skip: int) -> Iterator[Batch]:
        windows = shard.iter_batches(
            batch_size=window,
            batch_format="pyarrow",
            local_shuffle_buffer_size=window,
            local_shuffle_seed=train.seed + epoch,
        )
        index = 0
        for number, table in enumerate(windows):
            examples = raydata.laid_out_examples(table)
            sizes = [ExampleSize.of(e) for e in examples]
            order = length_grouped_order(sizes, train, seed=f"{train.seed}/{epoch}/{number}")
            if train.batch_tokens is not None:
                order = split_to(order, sizes, agree(len(order)))
            for indices in order:
                if index >= skip:
                    yield collate([examples[i] for i in indices], pad_id).to(device)
                index += 1

    return epoch_batches


def resume(strategy: Strategy, plan: WorkerPlan) -> tuple[TrainProgress, str | None]:
    """Where the latest checkpoint of this run name stopped (its training state loaded) and that
    checkpoint's path; a fresh start has none. Refused when the data order changed since."""
    checkpoint = ray.train.get_checkpoint()
    if not checkpoint:
        return TrainProgress(), None
    with checkpoint.as_directory() as folder:
        recorded = Path(folder) / DATA_ORDER  # absent in checkpoints written before it was recorded
        saved = json.loads(recorded.read_text()) if recorded.is_file() else plan.data_order()
        changed = [key for key, value in plan.data_order().items() if saved.get(key) != value]
        if changed:
            raise ValueError(
                f"run {plan.config.train.run_name!r} cannot resume from {checkpoint.path}: its {', '.join(changed)} "
                "changed since, so the batches already trained on would no longer be the ones skipped; rerun "
                "with the settings it started with, or pick a new --train.run_name"
            )
        strategy.load_training_state(Path(folder) / STATE)
        return TrainProgress(**json.loads((Path(folder) / PROGRESS).read_text())), checkpoint.path


def report_checkpoint(
    strategy: Strategy, plan: WorkerPlan, progress: TrainProgress, metrics: dict[str, float], name: str
) -> None:
    """Every rank writes its part and reports its folder; Ray merges them into one checkpoint."""
    run = plan.mlflow if strategy.is_main else None
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        with strategy.averaged_weights():
            strategy.save_adapter(folder / ADAPTER, DECODER)  # written by rank 0
        strategy.save_training_state(folder / STATE)
        if strategy.is_main:
            (folder / PROGRESS).write_text(json.dumps(dataclasses.asdict(progress)))
            (folder / DATA_ORDER).write_text(json.dumps(plan.data_order()))
            (folder / CONFIG).write_text(plan.config.model_dump_json())
            if run:  # the checkpoint as a logged model of the run, linked to this step's metrics
                model_id = tracking.log_decoder(
                    run, folder / ADAPTER, folder / CONFIG, name, progress.step, {"ray_checkpoint": name}
                )
                (folder / LOGGED_MODEL).write_text(json.dumps({"model_id": model_id}))
        ray.train.report(
            {**metrics, "step": progress.step, "epoch": progress.epoch},
            checkpoint=Checkpoint.from_directory(tmp),
            checkpoint_dir_name=name,
        )


@dataclass(frozen=True)
class PublishedDecoder:
    folder: Path  # <run dir>/decoder
    history: list[dict]
    logged_model: str | None  # the final checkpoint's MLflow logged model


def run_folder(train: TrainConfig) -> Path:
    """`<train.output_dir>/<run name>`; an unnamed run gets a new name (as `latentqa train` does),
    and a complete one (its `decoder/` published) is refused: nothing saved is overwritten."""
    if "run_name" not in train.model_fields_set:
        train.run_name = f"{train.run_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(train.output_dir).resolve() / train.run_name
    if (run_dir / "decoder").exists():
        raise ConfigError(
            f"{run_dir / 'decoder'} exists: run {train.run_name!r} is complete; pick another --train.run_name"
        )
    return run_dir


def publish_decoder(result: ray.train.Result, run_dir: Path, config: str, job: str) -> PublishedDecoder:
    """The final checkpoint's adapter as `<run dir>/decoder`, beside `config.json` (as `latentqa
    train` writes it), `job.json` and `metrics.json`. Each is written whole or not at all
    (`files`), the decoder last: its presence marks the run complete."""
    with result.checkpoint.as_directory() as folder:
        history = json.loads((Path(folder) / PROGRESS).read_text())["history"]
        logged = Path(folder) / LOGGED_MODEL
        model_id = json.loads(logged.read_text())["model_id"] if logged.is_file() else None
        write_whole(run_dir / "config.json", config)
        write_whole(run_dir / "job.json", job)
        write_whole(run_dir / "metrics.json", json.dumps({"final": result.metrics, "history": history}, indent=2))
        publish_folder(Path(folder) / ADAPTER, run_dir / "decoder")
    return PublishedDecoder(run_dir / "decoder", history, model_id)


@ray.remote
def _read(config_json: str, checkpoint: Checkpoint, dialogs: list[list[dict]], questions: list[str]) -> list[list[str]]:
    from latentqa import LatentQA, read

    with checkpoint.as_directory() as folder:  # on any node: checkpoints live on the shared storage
        lqa = LatentQA.load(LatentQAConfig.model_validate_json(config_json), Path(folder) / ADAPTER)
    return read(lqa, dialogs, questions)


def read_with_final_decoder(
    result: ray.train.Result, config: LatentQAConfig, ray_settings: RaySettings, dialogs: list, questions: list[str]
) -> list[list[str]]:
    """The run's final decoder reads `dialogs` in a task with a worker's resources; answers[d][q]."""
    resources = {"num_cpus": ray_settings.cpus_per_worker, "num_gpus": 1 if ray_settings.use_gpu else 0}
    return ray.get(_read.options(**resources).remote(config.model_dump_json(), result.checkpoint, dialogs, questions))
