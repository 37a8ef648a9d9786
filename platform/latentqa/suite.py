"""The evaluation suite: a decoder's held-out figures in one call, the same from every entry point
(`latentqa evaluate`, `jobs/evaluate.py`, Python).

- loss with true, shuffled and no activations, and the activation gain with its paired 95%
  interval (`latentqa.evaluation`);
- multiple-choice identification of held-out personas and goals, top-1 accuracy with true,
  shuffled and no activations, for system-prompt and reply-only dialogs (`latentqa.identification`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .data import DatasetSpec, Example, load_examples
from .evaluation import EvalResult, evaluate
from .identification import ChoiceResult, choice_items, multiple_choice
from .session import LatentQA


@dataclass(frozen=True)
class SuiteResult:
    loss: EvalResult
    choice: ChoiceResult | None  # None where the set has no persona/goal dialogs to choose for

    def as_metrics(self, prefix: str = "eval/") -> dict[str, float]:
        metrics = {**self.loss.as_metrics(prefix), f"{prefix}examples": self.loss.examples}
        if self.choice:
            metrics.update(self.choice.as_metrics(f"{prefix}choice/"))
            metrics[f"{prefix}choice/items"] = len(self.choice.items)
        return metrics

    def per_item(self) -> list[dict]:
        """One row per choice item: which conditions pick the true description."""
        if not self.choice:
            return []
        hits = {condition: self.choice.correct(condition) for condition in self.choice.chosen}
        return [{"label": item.label, "setting": item.setting, **{c: hits[c][i] for c in hits}}
                for i, item in enumerate(self.choice.items)]  # fmt: skip


def run_suite(lqa: LatentQA, spec: DatasetSpec, examples: Sequence[Example] | None = None, choices: int = 4,
              read_layer: int | None = None, batch_size: int = 16) -> SuiteResult:  # fmt: skip
    """Every figure over the held-out set `spec` (`examples`: its examples, if already loaded).
    Identification items are built from the set's local files; a remote set gets the loss only."""
    loss = evaluate(lqa, load_examples(spec) if examples is None else examples, read_layer=read_layer, batch_size=batch_size)
    items = choice_items(spec.path, k=choices, seed=spec.seed) if Path(spec.path).is_dir() else []
    choice = multiple_choice(lqa, items, read_layer=read_layer, batch_size=batch_size) if items else None
    return SuiteResult(loss, choice)
