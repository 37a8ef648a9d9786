"""Training the decoder (SPEC "Objectives: Train"): the step, the schedule and the loop.

The loop is written once over a `Strategy` (local, DDP, FSDP2 or DeepSpeed) and an iterator of
batches, so the single-process CLI and the Ray Train job run the same code.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from pydantic import ValidationError
from torch.optim.lr_scheduler import LambdaLR

from .config import STRATEGY_FROM_TRAIN, ConfigError, LatentQAConfig, PatchConfig, TrainConfig, validation_message
from .layout import IGNORE_INDEX, Batch, LaidOutExample
from .strategy import Strategy, StrategyConfig


def strategy_config(config: LatentQAConfig, default_kind: str) -> StrategyConfig:
    """The `strategy:` section (its kind defaulting to `default_kind`) plus the train section's
    accumulation, clipping and averaging."""
    fields = {"kind": default_kind, **config.strategy}
    for key, train_key in STRATEGY_FROM_TRAIN.items():
        if key in config.strategy:
            raise ConfigError(f"strategy.{key}: set it through train.{train_key}")
        fields[key] = getattr(config.train, train_key)
    try:
        return StrategyConfig.model_validate(fields)
    except ValidationError as err:
        raise ConfigError(validation_message("config", err, "strategy")) from None


def sample_read_layer(patch: PatchConfig, seed: str) -> int:
    """The read layer for a micro-batch: fixed, or drawn from [min_layer, max_layer) by a seed that
    names the micro-batch, so that a resumed run draws what an uninterrupted one did."""
    if patch.min_layer is None:
        return patch.read_layer
    return random.Random(seed).randrange(patch.min_layer, patch.max_layer)


def train_step(strategy: Strategy, batch: Batch, read_layer: int, shift: bool = True) -> float:
    """Loss and backward for one micro-batch; the optimizer steps at accumulation boundaries."""
    loss = strategy.model(batch, read_layer, shift)
    strategy.backward(loss)
    return float(loss.detach())


def cosine_with_warmup(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int) -> LambdaLR:
    """Linear warmup, then cosine decay to zero, stepped once per optimizer step."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return LambdaLR(optimizer, factor)


def adamw_factory(cfg: TrainConfig) -> Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]:
    return lambda params: torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def length_grouped_order(lengths: Sequence[int], batch_size: int, seed: int | str) -> list[list[int]]:
    """Batches of indices of similar length (less padding), in a seeded random order.

    Indices are shuffled, sorted by length within windows of 64 batches, cut into batches,
    and the batches shuffled again, so every epoch sees different neighbours.
    """
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * 64
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def example_length(example: LaidOutExample) -> int:
    return max(len(example.read.ids), len(example.write.ids))


def label_tokens(batch: Batch) -> int:
    return int((batch.labels != IGNORE_INDEX).sum())


def batch_tokens(batch: Batch) -> int:
    """Tokens the step computed on: the target's read dialogs and the decoder's, without padding."""
    return int(batch.read_attention.sum() + batch.write_attention.sum())


@dataclass(frozen=True)
class StepPlan:
    """How many optimizer steps a run takes: an epoch is every example of a rank once."""

    steps_per_epoch: int
    total_steps: int

    @classmethod
    def of(cls, examples_per_rank: int, train: TrainConfig) -> StepPlan:
        batches = -(-examples_per_rank // train.batch_size)
        per_epoch = -(-batches // train.grad_accum)
        return cls(per_epoch, train.max_steps or per_epoch * train.epochs)


@dataclass
class TrainProgress:
    """Where a run is: restored on resume so the step count continues."""

    step: int = 0  # optimizer steps
    epoch: int = 0
    batches_done: int = 0  # micro-batches done in the current epoch
    history: list[dict] = field(default_factory=list)


def fit(
    strategy: Strategy,
    epoch_batches: Callable[[int, int], Iterable[Batch]],
    plan: StepPlan,
    train: TrainConfig,
    patch: PatchConfig,
    progress: TrainProgress,
    evaluate: Callable[[], dict[str, float]] | None = None,
    on_step: Callable[[TrainProgress, dict[str, float]], None] | None = None,
) -> TrainProgress:
    """Run epochs of `epoch_batches(epoch, skip)` until `plan.total_steps`.

    `skip` is how many micro-batches of that epoch were already done (resume). `on_step` is
    called after every optimizer step with the step's metrics; it logs and checkpoints.
    """
    total_steps = plan.total_steps
    losses: list[float] = []
    labels = tokens = 0
    started = time.perf_counter()
    while progress.epoch < train.epochs and progress.step < total_steps:
        for batch in epoch_batches(progress.epoch, progress.batches_done):
            strategy.model.train()
            read_layer = sample_read_layer(patch, f"{train.seed}/{progress.epoch}/{progress.batches_done}")
            losses.append(train_step(strategy, batch, read_layer, patch.shift_position_ids_train))
            labels += label_tokens(batch)
            tokens += batch_tokens(batch)
            progress.batches_done += 1
            if not strategy.optimizer_step():
                continue
            progress.step += 1
            elapsed = time.perf_counter() - started
            metrics = {
                "train/loss": strategy.all_reduce_mean(sum(losses) / len(losses)),
                "train/lr": strategy.optimizer.param_groups[0]["lr"],
                "train/tokens_per_s": strategy.all_reduce_mean(tokens / elapsed) * strategy.world_size,
                "train/label_tokens_per_s": strategy.all_reduce_mean(labels / elapsed) * strategy.world_size,
            }
            losses, labels, tokens, started = [], 0, 0, time.perf_counter()
            if evaluate and train.eval_every and progress.step % train.eval_every == 0:
                strategy.model.eval()
                metrics.update(evaluate())
            progress.history.append({"step": progress.step, **metrics})
            if on_step:
                on_step(progress, metrics)
            if progress.step >= total_steps:
                return progress
        progress.epoch += 1
        progress.batches_done = 0
    return progress
