"""Held-out evaluation (SPEC "Evaluate"): loss with true, shuffled and no activations.

"shuffled" pairs each example's question and answer with the read dialog of an example of
another label; "none" leaves the placeholders unpatched. activation_gain = shuffled - true is
what the decoder reads from the target rather than from the data; its 95% confidence interval
is over the examples' paired differences (each example's mean loss, shuffled minus true).

Across ranks (a `Strategy` of several), every rank takes every world-size-th batch and the
results are gathered, then summed in batch order: the figures equal a single rank's.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .data import Example
from .layout import IGNORE_INDEX
from .session import LatentQA

if TYPE_CHECKING:
    from .strategy import Strategy


@dataclass(frozen=True)
class EvalResult:
    loss_true: float
    loss_shuffled: float
    loss_none: float
    examples: int
    gain_ci: tuple[float, float]  # 95% interval of the mean paired per-example gain

    @property
    def activation_gain(self) -> float:
        return self.loss_shuffled - self.loss_true

    def as_metrics(self, prefix: str = "eval/") -> dict[str, float]:
        return {
            f"{prefix}loss_true": self.loss_true,
            f"{prefix}loss_shuffled": self.loss_shuffled,
            f"{prefix}loss_none": self.loss_none,
            f"{prefix}activation_gain": self.activation_gain,
            f"{prefix}activation_gain_ci_low": self.gain_ci[0],
            f"{prefix}activation_gain_ci_high": self.gain_ci[1],
        }


def paired_interval(differences: Sequence[float], z: float = 1.96) -> tuple[float, float]:
    """Normal-approximation interval of the mean of paired differences."""
    mean = statistics.fmean(differences)
    if len(differences) < 2:
        return mean, mean
    half = z * statistics.stdev(differences) / math.sqrt(len(differences))
    return mean - half, mean + half


def shuffled_partners(examples: Sequence, key: Callable = lambda example: example.record.label) -> list[int]:
    """For each example, the nearest later example (cyclically) whose label differs."""
    labels = [key(e) for e in examples]
    if len(set(labels)) < 2:
        raise ValueError("the shuffled baseline needs examples of at least two labels")
    partners = []
    for i, label in enumerate(labels):
        step = 1
        while labels[(i + step) % len(labels)] == label:
            step += 1
        partners.append((i + step) % len(labels))
    return partners


def evaluate(
    lqa: LatentQA,
    examples: Sequence[Example],
    read_layer: int | None = None,
    batch_size: int = 16,
    max_batches: int | None = None,
    ranks: Strategy | None = None,
) -> EvalResult:
    """Token-weighted mean loss of the three conditions over `examples`; with `ranks`, every rank
    passes the same `examples` and evaluates its share of the batches."""
    layer = lqa.config.patch.read_layer if read_layer is None else read_layer
    shift = lqa.config.patch.shift_position_ids_train
    if max_batches is not None:
        examples = list(examples)[: max_batches * batch_size]
    with lqa.model.evaluating():
        return _evaluate(lqa, examples, layer, shift, batch_size, ranks)


def _evaluate(
    lqa: LatentQA, examples: Sequence[Example], layer: int, shift: bool, batch_size: int, ranks: Strategy | None
) -> EvalResult:
    partners = shuffled_partners(examples)
    shuffled = [Example(examples[j].record, e.question, e.answer, e.source) for e, j in zip(examples, partners)]
    conditions = {"true": examples, "shuffled": shuffled, "none": examples}
    batches = [(c, start) for c in conditions for start in range(0, len(examples), batch_size)]
    rank, world = (ranks.rank, ranks.world_size) if ranks else (0, 1)
    mine = {}  # (condition, start) -> (loss sum, label tokens, per-example mean losses)
    # The same number of passes on every rank (FSDP2's forwards are collective): the last round
    # repeats a batch where a rank has none left, and drops its result.
    for round_start in range(0, len(batches), world):
        index = min(round_start + rank, len(batches) - 1)
        condition, start = batches[index]
        chosen = lqa.lay_out(conditions[condition][start : start + batch_size], "train")
        batch = lqa.collate(chosen)
        acts = None if condition == "none" else lqa.model.target_activations(batch, [layer])[layer]
        losses = lqa.model.decoder_token_losses(batch, acts, shift)
        counts = (batch.labels[:, 1:] != IGNORE_INDEX).sum(-1)
        if round_start + rank < len(batches):
            mine[batches[index]] = (
                float(losses.sum()),
                int(counts.sum()),
                (losses.sum(-1) / counts.clamp(min=1)).tolist(),
            )
    done = {key: value for gathered in (ranks.all_gather(mine) if ranks else [mine]) for key, value in gathered.items()}
    totals = {c: [0.0, 0] for c in conditions}
    per_example: dict[str, list[float]] = {"true": [], "shuffled": []}
    for condition, start in batches:  # in order, as one rank sums them
        loss_sum, count, means = done[(condition, start)]
        totals[condition][0] += loss_sum
        totals[condition][1] += count
        if condition in per_example:
            per_example[condition] += means
    mean = {k: s / max(n, 1) for k, (s, n) in totals.items()}
    gains = [s - t for s, t in zip(per_example["shuffled"], per_example["true"])]
    return EvalResult(mean["true"], mean["shuffled"], mean["none"], len(examples), paired_interval(gains))
