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


def sort_window(train: TrainConfig) -> int:
    """Examples sorted together into batches: 64 batches' worth, or 256 with a token budget, whose
    two-way sort needs more examples to find close neighbours."""
    return train.batch_size * (64 if train.batch_tokens is None else 256)


def length_grouped_order(sizes: Sequence[ExampleSize], train: TrainConfig, seed: int | str) -> list[list[int]]:
    """Batches of indices of similar length (less padding), in a seeded random order.

    Indices are shuffled, sorted by length within windows (`sort_window`), cut into batches, and the
    batches shuffled again, so every epoch sees different neighbours. With `train.batch_tokens` a
    window is sorted both ways (`_grid_sorted`) and cut within the budget; else it is sorted by the
    longer side and cut every `train.batch_size` examples.
    """
    rng = random.Random(seed)
    order = list(range(len(sizes)))
    rng.shuffle(order)
    window = sort_window(train)
    batches = []
    for start in range(0, len(order), window):
        chunk = order[start : start + window]
        if train.batch_tokens is None:
            chunk.sort(key=lambda i: sizes[i].longer_side)
            batches += [chunk[i : i + train.batch_size] for i in range(0, len(chunk), train.batch_size)]
        else:
            batches += _within_budget(_grid_sorted(chunk, sizes, train.batch_size), sizes, train.batch_tokens)
    rng.shuffle(batches)
    return batches


def _grid_sorted(chunk: list[int], sizes: Sequence[ExampleSize], batch_size: int) -> list[int]:
    """`chunk` sorted by decoder-prompt length, cut into about sqrt(its batches) groups, each sorted
    by read length. A batch's padding is each side's spread, and the two lengths are only loosely
    related (a dialog's length says little about its question's), so sorting by one alone leaves
    the other's padding. The decoder's side comes first: it runs every block forward and backward,
    the target only blocks 0..L forward."""
    by_write = sorted(chunk, key=lambda i: sizes[i].write)
    group = -(-len(by_write) // max(1, round(math.sqrt(len(by_write) / batch_size))))
    return [
        i for g in range(0, len(by_write), group) for i in sorted(by_write[g : g + group], key=lambda i: sizes[i].read)
    ]


def _within_budget(chunk: list[int], sizes: Sequence[ExampleSize], batch_tokens: int) -> list[list[int]]:
    """Sorted `chunk` cut into runs whose padded tokens stay within `batch_tokens`; an example
    over the budget on its own is a batch of one."""
    batches: list[list[int]] = []
    current: list[int] = []
    longest = ExampleSize(0, 0)
    for i in chunk:
        grown = longest.widest(sizes[i])
        if current and (len(current) + 1) * grown.total > batch_tokens:
            batches.append(current)
            current, grown = [], sizes[i]
        current.append(i)
        longest = grown
    return batches + [current] if current else batches


def split_to(batches: list[list[int]], sizes: Sequence[ExampleSize], count: int) -> list[list[int]]:
    """`batches` with the costliest (in padded tokens) halved, in place in the order, until there
    are `count`: data-parallel ranks must run the same number of micro-batches, and token-budget
    batches of different examples need not come to the same number."""
    batches = list(batches)
    while len(batches) < count:
        splittable = [k for k, batch in enumerate(batches) if len(batch) > 1]
        if not splittable:
            raise ValueError(f"{sum(map(len, batches))} examples cannot make {count} batches")
        k = max(splittable, key=lambda k: padded_tokens([sizes[i] for i in batches[k]]))
        half = len(batches[k]) // 2
        batches[k : k + 1] = [batches[k][:half], batches[k][half:]]
    return batches


@dataclass(frozen=True)
class ExampleSize:
    """An example's tokens on each side: the target's read dialog and the decoder's prompt."""

    read: int
    write: int

    @classmethod
    def of(cls, example: LaidOutExample) -> ExampleSize:
        return cls(len(example.read.ids), len(example.write.ids))

    @property
    def longer_side(self) -> int:
        return max(self.read, self.write)

    @property
    def total(self) -> int:
        return self.read + self.write

    def widest(self, other: ExampleSize) -> ExampleSize:
        return ExampleSize(max(self.read, other.read), max(self.write, other.write))


def padded_tokens(sizes: Sequence[ExampleSize]) -> int:
    """Tokens a batch of these examples computes on, padding included: each side is padded to
    its longest."""
    longest = ExampleSize(0, 0)
    for size in sizes:
        longest = longest.widest(size)
    return len(sizes) * longest.total


def label_tokens(batch: Batch) -> int:
    return int((batch.labels != IGNORE_INDEX).sum())


def batch_tokens(batch: Batch) -> int:
    """Tokens the step computed on: the target's read dialogs and the decoder's, without padding."""
    return int(batch.read_attention.sum() + batch.write_attention.sum())


@dataclass(frozen=True)
class StepPlan:
    """How many optimizer steps a run takes: an epoch is every example of a rank once."""

    steps_per_epoch: int  # the first epoch's (with a token budget, epochs may differ by a step or two)
    total_steps: int

    @classmethod
    def of(cls, epoch_batches: Sequence[int], train: TrainConfig) -> StepPlan:
        """From each epoch's micro-batch count."""
        steps = [-(-batches // train.grad_accum) for batches in epoch_batches]
        return cls(steps[0], train.max_steps or sum(steps))


def ranks_batches_per_epoch(sizes: Sequence[ExampleSize], train: TrainConfig, ranks: int) -> int:
    """Micro-batches each of `ranks` data-parallel ranks runs in an epoch, each cutting its own
    equal share in windows (Ray Train's workers). Without a budget, exact. With one, the count
    depends on which examples meet in a window, which Ray's split and shuffle draw: an estimate,
    from shards dealt here by a seeded shuffle, each window counted as its largest share (ranks
    agree on the largest, `split_to`)."""
    per_rank = len(sizes) // ranks
    if train.batch_tokens is None:
        return -(-per_rank // train.batch_size)
    order = list(range(len(sizes)))
    random.Random(train.seed).shuffle(order)
    shards = [order[r * per_rank : (r + 1) * per_rank] for r in range(ranks)]
    window = sort_window(train)
    return sum(
        max(len(length_grouped_order([sizes[i] for i in shard[w : w + window]], train, w)) for shard in shards)
        for w in range(0, per_rank, window)
    )


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
