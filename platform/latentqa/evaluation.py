"""Held-out evaluation (SPEC "Evaluate"): loss with true, shuffled and no activations.

"shuffled" pairs each example's question and answer with the read dialog of an example of
another label; "none" leaves the placeholders unpatched. activation_gain = shuffled - true is
what the decoder reads from the target rather than from the data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


from .data import Example
from .layout import IGNORE_INDEX
from .session import LatentQA


@dataclass(frozen=True)
class EvalResult:
    loss_true: float
    loss_shuffled: float
    loss_none: float
    examples: int

    @property
    def activation_gain(self) -> float:
        return self.loss_shuffled - self.loss_true

    def as_metrics(self, prefix: str = "eval/") -> dict[str, float]:
        return {
            f"{prefix}loss_true": self.loss_true,
            f"{prefix}loss_shuffled": self.loss_shuffled,
            f"{prefix}loss_none": self.loss_none,
            f"{prefix}activation_gain": self.activation_gain,
        }


def shuffled_partners(examples: Sequence[Example]) -> list[int]:
    """For each example, the nearest later example (cyclically) whose label differs."""
    labels = [e.record.label for e in examples]
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
) -> EvalResult:
    """Token-weighted mean loss of the three conditions over `examples`."""
    layer = lqa.config.patch.read_layer if read_layer is None else read_layer
    shift = lqa.config.patch.shift_position_ids_train
    if max_batches is not None:
        examples = list(examples)[: max_batches * batch_size]
    with lqa.model.evaluating():
        return _evaluate(lqa, examples, layer, shift, batch_size)


def _evaluate(lqa: LatentQA, examples: Sequence[Example], layer: int, shift: bool, batch_size: int) -> EvalResult:
    partners = shuffled_partners(examples)
    shuffled = [
        Example(examples[j].record, e.question, e.answer, e.source) for e, j in zip(examples, partners)
    ]
    totals = {"true": [0.0, 0], "shuffled": [0.0, 0], "none": [0.0, 0]}
    for condition, chosen in (("true", examples), ("shuffled", shuffled), ("none", examples)):
        for batch in lqa.batches(lqa.lay_out(chosen, "train"), batch_size):
            acts = None if condition == "none" else lqa.model.target_activations(batch, [layer])[layer]
            losses = lqa.model.decoder_token_losses(batch, acts, shift)
            totals[condition][0] += float(losses.sum())
            totals[condition][1] += int((batch.labels[:, 1:] != IGNORE_INDEX).sum())
    mean = {k: s / max(n, 1) for k, (s, n) in totals.items()}
    return EvalResult(mean["true"], mean["shuffled"], mean["none"], len(examples))
