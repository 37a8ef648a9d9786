"""Multiple-choice identification: does the decoder pick a held-out label's true description?

Each item is one held-out dialog and the first question of its label; the candidates are the
label's own answer and the answers of K-1 other held-out labels of the same kind (persona, goal),
in a seeded order. The decoder scores every candidate in score mode (lowest loss wins), with the
dialog's own activations ("true"), another label's ("shuffled") and none ("none"), so a reader
sees what the activations add over guessing from the question and candidates alone.

Two settings: "system" dialogs state the persona or goal in a system prompt that the decoder never
sees (SPEC case 1, the verb span); "reply" dialogs hold only the user's message and the target's
own reply under that system prompt (`stimulus_completion.json`), read whole.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from .data import QA_FILE, ReadDialog, load_qa, load_records, read_dialog
from .evaluation import shuffled_partners
from .layout import LaidOutExample, ReadSide
from .session import LatentQA

CONDITIONS = ("true", "shuffled", "none")


@dataclass(frozen=True)
class ChoiceItem:
    label: str
    setting: str  # "system" or "reply"
    dialog: ReadDialog
    question: str
    candidates: tuple[str, ...]
    answer: int  # index of the true description among the candidates


def choice_items(folder: str | Path, k: int = 4, kinds: Sequence[str] = ("persona", "goal"), seed: int = 0) -> list[ChoiceItem]:
    """Items from a held-out folder of the paper's files (system.json, stimulus_completion.json)."""
    folder = Path(folder)
    qa = load_qa(folder / QA_FILE)
    dialogs: list[tuple[str, str, ReadDialog]] = []
    if (folder / "system.json").exists():
        dialogs += [(r.label, "system", read_dialog(r)) for r in load_records(folder / "system.json")]
    if (folder / "stimulus_completion.json").exists():
        for r in load_records(folder / "stimulus_completion.json"):
            turns = [{"role": "user", "content": r.stimulus_user}, {"role": "assistant", "content": r.stimulus_model}]
            dialogs.append((r.label, "reply", ReadDialog(turns, "none", False)))
    by_kind: dict[str, list[str]] = defaultdict(list)
    for label in sorted({label for label, _, _ in dialogs}):
        by_kind[label.split("-")[0]].append(label)
    rng = random.Random(seed)
    items = []
    for label, setting, dialog in dialogs:
        kind = label.split("-")[0]
        if kind not in kinds or len(by_kind[kind]) < k:
            continue
        question, answer = qa[label][0]
        others = rng.sample([other for other in by_kind[kind] if other != label], k - 1)
        candidates = [answer] + [qa[other][0][1] for other in others]
        rng.shuffle(candidates)
        items.append(ChoiceItem(label, setting, dialog, question, tuple(candidates), candidates.index(answer)))
    return items


@dataclass(frozen=True)
class ChoiceResult:
    items: list[ChoiceItem]
    chosen: dict[str, list[int]]  # condition -> the candidate picked for each item

    def correct(self, condition: str) -> list[bool]:
        return [pick == item.answer for pick, item in zip(self.chosen[condition], self.items)]

    def accuracy(self, condition: str, setting: str | None = None) -> float:
        hits = [c for c, item in zip(self.correct(condition), self.items) if setting in (None, item.setting)]
        return sum(hits) / max(len(hits), 1)

    def as_metrics(self, prefix: str = "eval/choice/") -> dict[str, float]:
        settings = sorted({item.setting for item in self.items})
        return {f"{prefix}{setting}/{condition}_accuracy": self.accuracy(condition, setting)
                for setting in settings for condition in self.chosen}  # fmt: skip


def multiple_choice(lqa: LatentQA, items: Sequence[ChoiceItem], read_layer: int | None = None, batch_size: int = 16) -> ChoiceResult:
    """Each item's pick under every condition; one target pass per dialog."""
    layer = lqa.config.patch.read_layer if read_layer is None else read_layer
    with lqa.model.evaluating():
        reads = [lqa.layout.read_side(item.dialog) for item in items]
        firsts = [lqa.layout.write_side(_n(read), item.question, item.candidates[0], "score") for read, item in zip(reads, items)]
        acts = _dialog_activations(lqa, [LaidOutExample(r, w) for r, w in zip(reads, firsts)], layer, batch_size)
        partners = shuffled_partners(items, key=lambda item: item.label)
        chosen = {}
        for condition in CONDITIONS:
            source = partners if condition == "shuffled" else range(len(items))
            jobs = [(i, j, c) for i, j in enumerate(source) for c in items[i].candidates]
            losses = []
            for start in range(0, len(jobs), batch_size):
                part = jobs[start : start + batch_size]
                batch = lqa.collate([
                    LaidOutExample(reads[j], lqa.layout.write_side(_n(reads[j]), items[i].question, c, "score")) for i, j, c in part
                ])  # fmt: skip
                part_acts = None if condition == "none" else torch.cat([acts[j] for _, j, _ in part])
                losses += lqa.model.example_losses(batch, part_acts, lqa.config.patch.shift_position_ids_read).tolist()
            chosen[condition] = _argmins(losses, [len(item.candidates) for item in items])
    return ChoiceResult(list(items), chosen)


def _dialog_activations(lqa: LatentQA, laid: list[LaidOutExample], layer: int, batch_size: int) -> list[torch.Tensor]:
    """Block `layer`'s output at each dialog's patched read span, one target pass per dialog."""
    rows: list[torch.Tensor] = []
    for start in range(0, len(laid), batch_size):
        part = laid[start : start + batch_size]
        acts = lqa.model.target_activations(lqa.collate(part), [layer])[layer]
        rows += torch.split(acts, [_n(example.read) for example in part])
    return rows


def _n(read: ReadSide) -> int:
    return read.patched_span[1] - read.patched_span[0]


def _argmins(losses: list[float], sizes: list[int]) -> list[int]:
    picks, at = [], 0
    for size in sizes:
        group = losses[at : at + size]
        picks.append(group.index(min(group)))
        at += size
    return picks
