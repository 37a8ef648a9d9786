"""Steering evaluation: how often a steered target shows its control, what that costs in
language, and how it compares with steering by prompt and by a steering vector.

For a control (`latentqa.steering.ControlFile`) and held-out prompts, each condition's greedy
replies are measured by:
- **behaviour rate**: the share of replies the control's judge says show it (keywords as whole
  words, or a sentiment by VADER's lexicon; no network);
- **perplexity** of the replies under the unsteered target told, by the control's instruction as
  a system prompt, to show the control (so the control's content is expected, and only broken
  language costs), and its **ratio** to the perplexity of the target's own plain replies under
  the plain target;
- **repeated 3-grams**: the share of a reply's word 3-grams that repeat an earlier one, averaged.

Conditions: `target` (unsteered), `prompted` (the instruction as a system prompt), `vector-xC`
(the mean difference of the read layer's last-token states with and without the instruction,
times C, added at the read layer at every position: ActAdd/CAA) for each coefficient C, and
`steered` (the control adapter; one row per seed when several are trained). The vector's
coefficient is tuned: `matched_vector` is the one that shows the control most at no worse
fluency than the control adapter.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import SteerConfig
from .layout import left_pad
from .models import CONTROL
from .session import LatentQA
from .steering import ControlFile, JudgeSpec, Prompt, control_read_layer, reply_ids, reply_positions

VECTOR_COEFFICIENTS = (1.0, 2.0, 4.0, 8.0)
_WORD = re.compile(r"[a-z0-9']+")


def judge(spec: JudgeSpec) -> Callable[[str], bool]:
    """Whether a reply shows the control, by its keywords or its sentiment."""
    if spec.sentiment is not None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        analyzer, sign = SentimentIntensityAnalyzer(), 1 if spec.sentiment == "positive" else -1
        return lambda text: sign * analyzer.polarity_scores(text)["compound"] >= spec.threshold
    patterns = [re.compile(rf"(?<!\w){re.escape(word)}(?!\w)", re.IGNORECASE) for word in spec.keywords]
    return lambda text: any(p.search(text) for p in patterns)


def repeated_trigram_share(text: str) -> float:
    """The share of the text's word 3-grams that repeat an earlier one (0 with fewer than two)."""
    words = _WORD.findall(text.lower())
    grams = list(zip(words, words[1:], words[2:]))
    return (len(grams) - len(set(grams))) / len(grams) if grams else 0.0


def _dialog(prompt: Prompt, system: str | None) -> list[dict[str, str]]:
    dialog = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    return [{"role": "system", "content": system}, *dialog] if system else dialog


@torch.no_grad()
def perplexity(lqa: LatentQA, prompts: Sequence[Prompt], replies: Sequence[list[int]], system: str | None) -> float:
    """exp(mean negative log-likelihood per reply token) of `replies` under the plain target,
    each after its prompt (with `system` as a system prompt when given)."""
    rows = []
    for prompt, reply in zip(prompts, replies):
        context = lqa.chat_format.prompt_ids(_dialog(prompt, system))
        rows.append((context + list(reply), len(context)))
    ids, attention, keep, targets = reply_positions(lqa, rows)
    if not keep.any():
        return float("nan")
    with lqa.model.evaluating():
        logits = lqa.model.logits_at(ids, attention, keep, None)
    return math.exp(float(F.cross_entropy(logits.float(), targets, reduction="mean")))


def steering_vector(lqa: LatentQA, instruction: str, prompts: Sequence[Prompt], layer: int) -> torch.Tensor:
    """Mean over `prompts` of block `layer`'s last-token state with the instruction as a system
    prompt minus without it (CAA's mean difference, ActAdd's prompt pair)."""
    fmt = lqa.chat_format

    def states(system: str | None) -> torch.Tensor:
        ids, attention = left_pad([fmt.prompt_ids(_dialog(p, system)) for p in prompts], fmt.pad_id)
        return lqa.model.last_token_states(ids.to(lqa.device), attention.to(lqa.device), layer).float()

    return (states(instruction) - states(None)).mean(0)


@dataclass(frozen=True)
class Condition:
    name: str
    replies: list[str]
    behaviour_rate: float | None  # None: the control has no judge
    perplexity: float
    perplexity_ratio: float  # over the target's own plain replies' perplexity
    repeated_trigrams: float


@dataclass(frozen=True)
class SteeringResult:
    control: str
    read_layer: int
    prompts: list[Prompt]
    conditions: list[Condition]  # "target" first; "steered" (or "steered-seedN", one per seed) for adapters

    def steered(self) -> list[Condition]:
        return [c for c in self.conditions if c.name.startswith("steered")]

    @property
    def matched_vector(self) -> str | None:
        """The steering vector's row that shows the control most at no worse fluency (perplexity
        ratio and repeated 3-grams) than the control adapter's worst; the most fluent one (by
        perplexity) if none is as fluent."""
        vectors = [c for c in self.conditions if c.name.startswith("vector-x")]
        steered = self.steered()
        if not vectors or not steered or steered[0].behaviour_rate is None:
            return None
        perplexity_bound = max(c.perplexity_ratio for c in steered)
        repeats_bound = max(c.repeated_trigrams for c in steered)
        within = [c for c in vectors if c.perplexity_ratio <= perplexity_bound and c.repeated_trigrams <= repeats_bound]
        if not within:
            return min(vectors, key=lambda c: c.perplexity_ratio).name
        return max(within, key=lambda c: (c.behaviour_rate, -c.perplexity_ratio)).name

    def spread(self) -> dict[str, list[float]]:
        """[min, max] of each figure over the control adapters (the seeds)."""
        steered = self.steered()
        figures = ("behaviour_rate", "perplexity_ratio", "repeated_trigrams")
        return {
            f: [min(values), max(values)]
            for f in figures
            if None not in (values := [getattr(c, f) for c in steered]) and values
        }

    def degenerate(self, cfg: SteerConfig) -> str | None:
        """Why a control adapter's language is past the config's bounds; None when within."""
        problems = []
        for steered in self.steered():
            problems += self._past_bounds(steered, self.conditions[0], cfg)
        return f"degenerate control: {'; '.join(problems)}" if problems else None

    @staticmethod
    def _past_bounds(steered: Condition, target: Condition, cfg: SteerConfig) -> list[str]:
        """The bounds `steered` breaks; repetition only counts past what the target itself repeats."""
        problems = []
        if cfg.max_perplexity_ratio is not None and not steered.perplexity_ratio <= cfg.max_perplexity_ratio:
            problems.append(
                f"{steered.name}: perplexity {steered.perplexity_ratio:.2f}x the target's "
                f"(bound {cfg.max_perplexity_ratio}x)"
            )
        repeats_allowed = (
            None if cfg.max_repeated_trigrams is None else max(cfg.max_repeated_trigrams, target.repeated_trigrams)
        )
        if repeats_allowed is not None and steered.repeated_trigrams > repeats_allowed:
            problems.append(
                f"{steered.name}: {steered.repeated_trigrams:.0%} repeated 3-grams (bound {repeats_allowed:.0%})"
            )
        return problems

    def as_metrics(self, prefix: str = "steering/") -> dict[str, float]:
        metrics = {}
        for c in self.conditions:
            if c.behaviour_rate is not None:
                metrics[f"{prefix}{c.name}/behaviour_rate"] = c.behaviour_rate
            metrics[f"{prefix}{c.name}/perplexity_ratio"] = c.perplexity_ratio
            metrics[f"{prefix}{c.name}/repeated_trigrams"] = c.repeated_trigrams
        return metrics

    def table(self) -> str:
        """A Markdown table, one row per condition."""
        lines = ["| condition | behaviour rate | perplexity | x target's | repeated 3-grams |", "|---|---|---|---|---|"]
        matched = self.matched_vector
        for c in self.conditions:
            rate = "-" if c.behaviour_rate is None else f"{c.behaviour_rate:.0%}"
            mark = " (matched)" if c.name == matched else ""
            lines.append(
                f"| {c.name}{mark} | {rate} | {c.perplexity:.2f} | {c.perplexity_ratio:.2f} | {c.repeated_trigrams:.0%} |"
            )
        return "\n".join(lines)

    def write(self, folder: str | Path) -> Path:
        """`steering.json` (figures and replies), `steering.md` (the table) and `steering.png`."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        report = {**asdict(self), "matched_vector": self.matched_vector, "spread": self.spread()}
        (folder / "steering.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
        (folder / "steering.md").write_text(
            f"# Steering: {self.control} (read layer {self.read_layer})\n\n{self.table()}\n"
        )
        self._plot(folder / "steering.png")
        return folder

    def _plot(self, out: Path) -> None:
        from .suite import pyplot

        plt = pyplot()
        judged = [c for c in self.conditions if c.behaviour_rate is not None]
        fig, ax = plt.subplots(figsize=(6, 4))
        for c in judged:
            ax.scatter(c.perplexity_ratio, c.behaviour_rate, s=40)
            ax.annotate(c.name, (c.perplexity_ratio, c.behaviour_rate), textcoords="offset points", xytext=(4, 4))
        ax.set_xlabel("perplexity, x the target's own replies' (lower: more fluent)")
        ax.set_ylabel("behaviour rate")
        ax.set_ylim(-0.05, 1.05)
        ax.set_title(f"Steering: {self.control} (read layer {self.read_layer})")
        fig.tight_layout()
        fig.savefig(out, dpi=120)
        plt.close(fig)


class SteeringEvaluation:
    """One control's held-out prompts, with the target's own replies measured once; each
    condition is then one call (`baselines`, `steered` after each control adapter is loaded)."""

    def __init__(self, lqa: LatentQA, control: ControlFile, prompts: Sequence[Prompt], max_new_tokens: int = 48):
        self.lqa, self.control, self.prompts, self.max_new_tokens = lqa, control, list(prompts), max_new_tokens
        self.read_layer = control_read_layer(lqa.config.steer, lqa.decoder_read_layer)
        self._shows = judge(control.judge) if control.judge else None
        plain = self._replies(self.prompts)
        self._plain_perplexity = perplexity(lqa, self.prompts, plain, None)
        self.target = self._measure("target", plain)

    def _replies(self, prompts: Sequence[Prompt], adapter: str | None = None) -> list[list[int]]:
        return reply_ids(self.lqa, prompts, adapter, self.max_new_tokens)

    def _measure(self, name: str, replies: list[list[int]]) -> Condition:
        texts = [self.lqa.decode(r) for r in replies]
        ppl = perplexity(self.lqa, self.prompts, replies, self.control.instruction)
        return Condition(
            name,
            texts,
            sum(map(self._shows, texts)) / len(texts) if self._shows else None,
            ppl,
            ppl / self._plain_perplexity,
            sum(map(repeated_trigram_share, texts)) / len(texts),
        )

    def baselines(
        self, vector_prompts: Sequence[Prompt] = (), coefficients: Sequence[float] = VECTOR_COEFFICIENTS
    ) -> list[Condition]:
        """The prompted target, and the steering vector (its mean difference over
        `vector_prompts`, else the held-out prompts) at each coefficient; none without an instruction."""
        system = self.control.instruction
        if not system:
            return []
        rows = [self._measure("prompted", self._replies([_dialog(p, system) for p in self.prompts]))]
        vector = steering_vector(self.lqa, system, vector_prompts or self.prompts, self.read_layer)
        for coefficient in coefficients:
            with self.lqa.model.adding(self.read_layer, coefficient * vector):
                rows.append(self._measure(f"vector-x{coefficient:g}", self._replies(self.prompts)))
        return rows

    def steered(self, name: str = "steered") -> Condition:
        """The target with the session's control adapter."""
        return self._measure(name, self._replies(self.prompts, CONTROL))

    def result(self, conditions: Sequence[Condition]) -> SteeringResult:
        return SteeringResult(self.control.name, self.read_layer, self.prompts, [self.target, *conditions])
