"""Multiple-choice identification: does the decoder pick a held-out label's true description?

Each item is one held-out dialog and the first question of its label; the candidates are the
label's own answer and the answers of K-1 other held-out labels of the same kind (persona, goal),
in a seeded order. The decoder scores every candidate in score mode (lowest loss wins), with the
dialog's own activations ("true"), another label's ("shuffled") and none ("none"), so a reader
sees what the activations add over guessing from the question and candidates alone. Two
baselines say what the dialog's text alone gives: "text", the decoder given the read span's
tokens as text where the activations would go (Li et al., arXiv 2509.13316), and "prompting", the
target itself asked the question after its own dialog, scoring each candidate as its reply.

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
from .layout import LaidOutExample, ReadSide, WriteSide
from .models import DECODER
from .session import LatentQA

CONDITIONS = ("true", "shuffled", "none", "text", "prompting")


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


def multiple_choice(lqa: LatentQA, items: Sequence[ChoiceItem], read_layer: int | None = None, batch_size: int = 16,
                    conditions: Sequence[str] = CONDITIONS) -> ChoiceResult:  # fmt: skip
    """Each item's pick under each of `conditions`; one target pass per dialog."""
    layer = lqa.config.patch.read_layer if read_layer is None else read_layer
    with lqa.model.evaluating():
        reads, acts = _read_all(lqa, items, [layer], batch_size)
        return _choose(lqa, items, reads, acts[layer], conditions, batch_size)


def layer_map(lqa: LatentQA, items: Sequence[ChoiceItem], layers: Sequence[int], batch_size: int = 16) -> dict[int, ChoiceResult]:
    """Picks with true and shuffled activations read at each of `layers`, all layers from one
    target pass per dialog (the other conditions do not depend on the layer)."""
    with lqa.model.evaluating():
        reads, acts = _read_all(lqa, items, list(layers), batch_size)
        return {layer: _choose(lqa, items, reads, acts[layer], ("true", "shuffled"), batch_size) for layer in layers}


def _read_all(lqa: LatentQA, items: Sequence[ChoiceItem], layers: list[int], batch_size: int):
    """Each item's read side, and its activations at every layer in `layers` (layer -> per-item rows)."""
    reads = [lqa.layout.read_side(item.dialog) for item in items]
    laid = [LaidOutExample(r, lqa.layout.write_side(_n(r), item.question, item.candidates[0], "score")) for r, item in zip(reads, items)]
    acts: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    for start in range(0, len(laid), batch_size):
        part = laid[start : start + batch_size]
        sizes = [_n(example.read) for example in part]
        for layer, rows in lqa.model.target_activations(lqa.collate(part), layers).items():
            acts[layer] += torch.split(rows, sizes)
    return reads, acts


def _choose(lqa, items, reads, acts, conditions, batch_size) -> ChoiceResult:
    partners = shuffled_partners(items, key=lambda item: item.label)
    shift = lqa.config.patch.shift_position_ids_read
    chosen = {}
    for condition in conditions:
        source = partners if condition == "shuffled" else range(len(items))
        jobs = [(i, j, c) for i, j in enumerate(source) for c in items[i].candidates]
        losses = []
        for start in range(0, len(jobs), batch_size):
            part = jobs[start : start + batch_size]
            batch = lqa.collate([LaidOutExample(reads[j], _write(lqa, condition, items[i], reads[j], c)) for i, j, c in part])
            part_acts = torch.cat([acts[j] for _, j, _ in part]) if condition in ("true", "shuffled") else None
            adapter = None if condition == "prompting" else DECODER
            losses += lqa.model.example_losses(batch, part_acts, shift, adapter).tolist()
        chosen[condition] = _argmins(losses, [len(item.candidates) for item in items])
    return ChoiceResult(list(items), chosen)


def _write(lqa: LatentQA, condition: str, item: ChoiceItem, read: ReadSide, candidate: str) -> WriteSide:
    """What scores `candidate` under `condition`: the decoder's dialog (with placeholders, or the
    read span's tokens as text), or the target's own chat with the question appended."""
    if condition == "prompting":
        messages = [dict(m) for m in item.dialog.messages]
        if messages[-1]["role"] == "user":  # keep roles alternating: the question joins the last user turn
            messages[-1]["content"] += "\n\n" + item.question
        else:
            messages.append({"role": "user", "content": item.question})
        return lqa.layout.chat_side(messages, candidate)
    stand_in = read.ids[read.patched_span[0] : read.patched_span[1]] if condition == "text" else None
    return lqa.layout.write_side(_n(read), item.question, candidate, "score", stand_in)


def _n(read: ReadSide) -> int:
    return read.patched_span[1] - read.patched_span[0]


def _argmins(losses: list[float], sizes: list[int]) -> list[int]:
    picks, at = [], 0
    for size in sizes:
        group = losses[at : at + size]
        picks.append(group.index(min(group)))
        at += size
    return picks
