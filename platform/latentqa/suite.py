"""The evaluation suite: a decoder's held-out figures in one call, the same from every entry point
(`latentqa evaluate`, `jobs/evaluate.py`, Python).

- loss with true, shuffled and no activations, and the activation gain with its paired 95%
  interval (`latentqa.evaluation`);
- multiple-choice identification of held-out labels, top-1 accuracy with true, shuffled and no
  activations and the text and prompting baselines, for personas and goals in system prompts or
  shown by the target's reply, and the paper's scenario stories (`latentqa.identification`);
- open-ended reading of the same items: generated answers, each judged by the candidate it shares
  the most words with, under the same conditions;
- optionally a layer map: identification, and the activation gain on the true descriptions, with
  activations read at each of a set of layers.

`TASKS` names the first three; `run_suite(tasks=...)` runs a subset. `SuiteResult.write(folder)`
leaves `results.json`, `per_item.jsonl` (which items each condition gets right, and the generated
answers) and the figures `choice_accuracy.png` and, with a layer map, `layer_map.png`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .data import DatasetSpec, Example, load_examples
from .evaluation import EvalResult, evaluate
from .identification import CONDITIONS, ChoiceResult, choice_items, layer_map, multiple_choice, open_ended, read_items
from .session import LatentQA

TASKS = ("loss", "choice", "reading")


@dataclass(frozen=True)
class SuiteResult:
    read_layer: int
    loss: EvalResult | None = None
    choice: ChoiceResult | None = None  # None where not asked for, or the set has no dialogs to identify
    reading: ChoiceResult | None = None  # open-ended, over the same items
    layers: dict[int, ChoiceResult] = field(default_factory=dict)  # the layer map, if asked for

    def tasks(self) -> dict[str, ChoiceResult]:
        """The identification tasks that ran, by name."""
        return {name: result for name, result in (("choice", self.choice), ("reading", self.reading)) if result}

    def as_metrics(self, prefix: str = "eval/") -> dict[str, float]:
        metrics = {**self.loss.as_metrics(prefix), f"{prefix}examples": self.loss.examples} if self.loss else {}
        for name, result in self.tasks().items():
            metrics.update(result.as_metrics(f"{prefix}{name}/"))
            metrics[f"{prefix}{name}/items"] = len(result.items)
        for layer, result in self.layers.items():
            metrics.update({f"{prefix}layer_map/{layer}/{c}_accuracy": result.accuracy(c) for c in result.chosen})
            metrics[f"{prefix}layer_map/{layer}/activation_gain"] = result.activation_gain()
        return metrics

    def per_item(self) -> list[dict]:
        """One row per item: which conditions get it right in each task, and the generated answers."""
        tasks = self.tasks()
        if not tasks:
            return []
        items = next(iter(tasks.values())).items
        rows = [
            {
                "label": item.label,
                "setting": item.setting,
                "question": item.question,
                "true_description": item.candidates[item.answer],
            }
            for item in items
        ]
        for name, result in tasks.items():
            for condition in result.chosen:
                for row, hit in zip(rows, result.correct(condition)):
                    row[f"{name}/{condition}"] = hit
            for condition, answers in result.answers.items():
                for row, answer in zip(rows, answers):
                    row[f"{name}/{condition}/answer"] = answer
        return rows

    def write(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "results.json").write_text(json.dumps(self.as_metrics(prefix=""), indent=2) + "\n")
        (folder / "per_item.jsonl").write_text("".join(json.dumps(row) + "\n" for row in self.per_item()))
        if self.tasks():
            self._plot_choice(folder / "choice_accuracy.png")
        if self.layers:
            self._plot_layers(folder / "layer_map.png")
        return folder

    def _plot_choice(self, out: Path) -> None:
        plt = pyplot()
        tasks = self.tasks()
        titles = {"choice": "multiple choice (score mode)", "reading": "open-ended (closest candidate by words)"}
        fig, axes = plt.subplots(1, len(tasks), figsize=(8 * len(tasks), 3.8), squeeze=False)
        for ax, (name, result) in zip(axes[0], tasks.items()):
            settings = sorted({item.setting for item in result.items})
            width = 0.8 / len(settings)
            for s, setting in enumerate(settings):
                count = sum(item.setting == setting for item in result.items)
                values = [result.accuracy(c, setting) for c in CONDITIONS]
                ax.bar(
                    [i + s * width for i in range(len(CONDITIONS))], values, width, label=f"{setting} ({count} items)"
                )
            k = len(result.items[0].candidates)
            ax.axhline(1 / k, color="grey", linestyle="--", linewidth=1, label=f"chance (1/{k})")
            ax.set_xticks([i + width * (len(settings) - 1) / 2 for i in range(len(CONDITIONS))], CONDITIONS)
            ax.set(
                ylabel="top-1 accuracy", ylim=(0, 1), title=f"{k}-way identification of held-out labels: {titles[name]}"
            )
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out, dpi=120)
        plt.close(fig)

    def _plot_layers(self, out: Path) -> None:
        plt = pyplot()
        layers = sorted(self.layers)
        fig, (ax, gain_ax) = plt.subplots(1, 2, figsize=(12, 3.8))
        for condition, style in (("true", "o-"), ("shuffled", "s--")):
            ax.plot(
                layers,
                [self.layers[layer].accuracy(condition) for layer in layers],
                style,
                label=f"{condition} activations",
            )
        ax.set(xlabel="read layer", ylabel="top-1 accuracy", ylim=(0, 1), title="identification by read layer")
        gain_ax.plot(layers, [self.layers[layer].activation_gain() for layer in layers], "o-", color="tab:green")
        gain_ax.axhline(0, color="grey", linewidth=1)
        gain_ax.set(
            xlabel="read layer",
            ylabel="nats per answer token",
            title="activation gain by read layer\n(true description's loss, shuffled - true)",
        )
        for axis in (ax, gain_ax):
            axis.axvline(
                self.read_layer,
                color="grey",
                linestyle=":",
                label=f"the decoder was trained at layer {self.read_layer}",
            )
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out, dpi=120)
        plt.close(fig)


def pyplot():
    """matplotlib's pyplot on the file backend (no display on cluster nodes), imported on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def run_suite(
    lqa: LatentQA,
    spec: DatasetSpec,
    examples: Sequence[Example] | None = None,
    choices: int = 4,
    read_layer: int | None = None,
    batch_size: int = 16,
    layers: Sequence[int] = (),
    map_items: int | None = None,
    tasks: Sequence[str] = TASKS,
    max_new_tokens: int = 48,
) -> SuiteResult:
    """The figures of `tasks` over the held-out set `spec` (`examples`: its examples, if already
    loaded). Identification items are built from the set's local files; a remote set gets the loss
    only. `layers` adds a layer map over the first `map_items` items (all when None)."""
    unknown = set(tasks) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown suite task(s) {sorted(unknown)}; the tasks are {', '.join(TASKS)}")
    layer = lqa.config.patch.read_layer if read_layer is None else read_layer
    result: dict = {}
    if "loss" in tasks:
        examples = load_examples(spec) if examples is None else examples
        result["loss"] = evaluate(lqa, examples, read_layer=layer, batch_size=batch_size)
    identifying = {"choice", "reading"} & set(tasks) or layers
    items = choice_items(spec.path, k=choices, seed=spec.seed) if identifying and Path(spec.path).is_dir() else []
    if items:  # one target pass per dialog for every task and layer
        read = read_items(lqa, items, [layer, *layers], batch_size)
    if items and "choice" in tasks:
        result["choice"] = multiple_choice(lqa, items, layer, batch_size, read=read)
    if items and "reading" in tasks:
        result["reading"] = open_ended(lqa, items, layer, batch_size, max_new_tokens, read=read)
    if items and layers:
        result["layers"] = layer_map(lqa, items[:map_items], layers, batch_size, read=read.first(map_items))
    return SuiteResult(layer, **result)
