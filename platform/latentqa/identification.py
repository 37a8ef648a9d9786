"""Identification: does the decoder tell a held-out label's true description from others?

Each item is one held-out dialog and the first question of its label; the candidates are the
label's own answer and the answers of K-1 other held-out labels of the same kind (persona, goal,
sqa), in a seeded order. Two tasks over the same items:

- multiple choice (`multiple_choice`): the decoder scores every candidate in score mode (lowest
  loss wins);
- open-ended reading (`open_ended`): the decoder answers the question in its own words (greedy),
  and a rule with no judge model picks the candidate the answer shares the most words with.

Each task runs with the dialog's own activations ("true"), another label's ("shuffled") and none
("none"), so a reader sees what the activations add over guessing from the question alone. Two
baselines say what the dialog's text alone gives: "text", the decoder given the read span's
tokens as text where the activations would go (Li et al., arXiv 2509.13316), and "prompting", the
target itself asked the question after its own dialog (scoring each candidate as its reply, or
answering it).

Three settings: "system" dialogs state the persona or goal in a system prompt that the decoder
never sees (SPEC case 1, the verb span); "reply" dialogs hold only the user's message and the
target's own reply under that system prompt (`stimulus_completion.json`), read whole; "story"
dialogs are the paper's scenario stories (`control.json`, labels "sqa-"), a user's message read
whole, with questions about what happens in them.
"""

from __future__ import annotations

import itertools
import random
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .data import QA_FILE, ReadDialog, load_qa, load_records, read_dialog
from .evaluation import shuffled_partners
from .layout import LaidOutExample, ReadSide, WriteSide
from .models import DECODER
from .session import LatentQA
from .steering import complete

CONDITIONS = ("true", "shuffled", "none", "text", "prompting")


@dataclass(frozen=True)
class ChoiceItem:
    label: str
    setting: str  # "system", "reply" or "story"
    dialog: ReadDialog
    question: str
    candidates: tuple[str, ...]
    answer: int  # index of the true description among the candidates


def choice_items(
    folder: str | Path, k: int = 4, kinds: Sequence[str] = ("persona", "goal", "sqa"), seed: int = 0
) -> list[ChoiceItem]:
    """Items from a held-out folder of the paper's files: system.json and stimulus_completion.json
    (personas and goals), and the scenario stories of control.json (the paper's "sqa" labels)."""
    folder = Path(folder)
    qa = load_qa(folder / QA_FILE)
    dialogs: list[tuple[str, str, ReadDialog]] = []
    if (folder / "system.json").exists():
        dialogs += [(r.label, "system", read_dialog(r)) for r in load_records(folder / "system.json")]
    if (folder / "stimulus_completion.json").exists():
        for r in load_records(folder / "stimulus_completion.json"):
            turns = [{"role": "user", "content": r.stimulus_user}, {"role": "assistant", "content": r.stimulus_model}]
            dialogs.append((r.label, "reply", ReadDialog(turns, "none", False)))
    if (folder / "control.json").exists():  # a story in the user's message, read whole; the questions ask about it
        dialogs += [
            (r.label, "story", read_dialog(r))
            for r in load_records(folder / "control.json")
            if r.label.startswith("sqa-")
        ]
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
    answer_losses: dict[str, list[float]] = field(
        default_factory=dict
    )  # scored: condition -> the true candidate's loss
    answers: dict[str, list[str]] = field(default_factory=dict)  # open-ended: condition -> generated answers

    def correct(self, condition: str) -> list[bool]:
        return [pick == item.answer for pick, item in zip(self.chosen[condition], self.items)]

    def accuracy(self, condition: str, setting: str | None = None) -> float:
        hits = [c for c, item in zip(self.correct(condition), self.items) if setting in (None, item.setting)]
        return sum(hits) / max(len(hits), 1)

    def activation_gain(self) -> float | None:
        """Mean loss of the true description with shuffled minus with true activations (scored results)."""
        if not {"true", "shuffled"} <= set(self.answer_losses):
            return None
        gains = [s - t for s, t in zip(self.answer_losses["shuffled"], self.answer_losses["true"])]
        return sum(gains) / len(gains)

    def as_metrics(self, prefix: str = "eval/choice/") -> dict[str, float]:
        settings = sorted({item.setting for item in self.items})
        return {
            f"{prefix}{setting}/{condition}_accuracy": self.accuracy(condition, setting)
            for setting in settings
            for condition in self.chosen
        }


@dataclass(frozen=True)
class ItemReads:
    """Each item's read side and its activations at some read layers (layer -> one tensor per item)."""

    reads: list[ReadSide]
    acts: dict[int, list[torch.Tensor]]

    def first(self, n: int | None) -> ItemReads:
        return ItemReads(self.reads[:n], {layer: rows[:n] for layer, rows in self.acts.items()})


def read_items(lqa: LatentQA, items: Sequence[ChoiceItem], layers: Sequence[int], batch_size: int = 16) -> ItemReads:
    """The items' activations at every layer in `layers`, from one target pass per dialog batch;
    every task below takes them, so a whole suite reads each dialog once."""
    with lqa.model.evaluating():
        return ItemReads(*_read_all(lqa, items, sorted(set(layers)), batch_size))


def multiple_choice(
    lqa: LatentQA,
    items: Sequence[ChoiceItem],
    read_layer: int | None = None,
    batch_size: int = 16,
    conditions: Sequence[str] = CONDITIONS,
    read: ItemReads | None = None,
) -> ChoiceResult:
    """Each item's pick under each of `conditions` (`read`: the items' activations, if read already)."""
    layer = lqa.config.patch.read_layer if read_layer is None else read_layer
    read = read or read_items(lqa, items, [layer], batch_size)
    with lqa.model.evaluating():
        return _choose(lqa, items, read.reads, read.acts[layer], conditions, batch_size)


def layer_map(
    lqa: LatentQA,
    items: Sequence[ChoiceItem],
    layers: Sequence[int],
    batch_size: int = 16,
    read: ItemReads | None = None,
) -> dict[int, ChoiceResult]:
    """Picks with true and shuffled activations read at each of `layers` (the other conditions do
    not depend on the layer), all layers from one target pass per dialog."""
    read = read or read_items(lqa, items, layers, batch_size)
    with lqa.model.evaluating():
        return {
            layer: _choose(lqa, items, read.reads, read.acts[layer], ("true", "shuffled"), batch_size)
            for layer in layers
        }


def open_ended(
    lqa: LatentQA,
    items: Sequence[ChoiceItem],
    read_layer: int | None = None,
    batch_size: int = 16,
    max_new_tokens: int = 48,
    conditions: Sequence[str] = CONDITIONS,
    read: ItemReads | None = None,
) -> ChoiceResult:
    """Each item's generated answer under each of `conditions`, and the candidate it is judged
    closest to (`closest_candidate`)."""
    layer = lqa.config.patch.read_layer if read_layer is None else read_layer
    read = read or read_items(lqa, items, [layer], batch_size)
    with lqa.model.evaluating():
        answers = {
            c: _generate(lqa, items, read.reads, read.acts[layer], c, batch_size, max_new_tokens) for c in conditions
        }
    chosen = {
        c: [
            closest_candidate(a, item.candidates, item.question, judge_seed(item, c))
            for a, item in zip(answers[c], items)
        ]
        for c in conditions
    }
    return ChoiceResult(list(items), chosen, answers=answers)


def judge_seed(item: ChoiceItem, condition: str) -> str:
    """Seeds the judge's tie-break per item and condition, so a pick does not depend on which
    other conditions ran."""
    return f"{item.label}/{item.setting}/{condition}"


# Words too common to tell descriptions apart ("The assistant is a ...").
_STOPWORDS = frozenset(
    "a an the and or but of to in on at for with by from as is are was were be been being will would can could "
    "it its this that these those who whom which what their there they them he she his her you your i me my we our "
    "assistant".split()
)


def _words(text: str, ignore: frozenset[str] = frozenset()) -> Counter:
    # three letters at least: no contraction fragments ("assistant's" -> "s", "don't" -> "t")
    words = (_stem(w) for w in re.findall(r"[a-z0-9]+", text.lower()) if len(w) >= 3 and w not in _STOPWORDS)
    return Counter(w for w in words if w not in ignore)


def _stem(word: str) -> str:
    """A crude suffix strip, so that "engages" and "engaging" count as "engag" (and as the
    question's "engage" once that is stripped too)."""
    for suffixes in (("ing", "ed", "es", "s"), ("e",)):
        for suffix in suffixes:
            if word.endswith(suffix) and not word.endswith("ss") and len(word) - len(suffix) >= 4:
                word = word[: -len(suffix)]
                break
    return word


def word_overlap(answer: str, candidate: str, question: str = "") -> float:
    """F1 of the content words two texts share (each word counted as often as both hold it),
    leaving out the question's words: an answer that echoes the question would otherwise favour
    the candidate written as an answer to it, the true one."""
    ignore = frozenset(_words(question))
    a, c = _words(answer, ignore), _words(candidate, ignore)
    common = sum((a & c).values())
    if not common:
        return 0.0
    precision, recall = common / sum(a.values()), common / sum(c.values())
    return 2 * precision * recall / (precision + recall)


def closest_candidate(answer: str, candidates: Sequence[str], question: str = "", seed: str = "") -> int:
    """The candidate with the highest `word_overlap`, ties (e.g. an answer sharing no word with
    any candidate) drawn at random, seeded by `seed`."""
    scores = [word_overlap(answer, c, question) for c in candidates]
    return random.Random(seed).choice([i for i, s in enumerate(scores) if s == max(scores)])


def _read_all(lqa: LatentQA, items: Sequence[ChoiceItem], layers: list[int], batch_size: int):
    """Each item's read side, and its activations at every layer in `layers` (layer -> per-item rows)."""
    reads = [lqa.layout.read_side(item.dialog) for item in items]
    laid = [
        LaidOutExample(r, lqa.layout.write_side(_n(r), item.question, item.candidates[0], "score"))
        for r, item in zip(reads, items)
    ]
    acts: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    for start in range(0, len(laid), batch_size):
        part = laid[start : start + batch_size]
        sizes = [_n(example.read) for example in part]
        for layer, rows in lqa.model.target_activations(lqa.collate(part), layers).items():
            acts[layer] += torch.split(rows, sizes)
    return reads, acts


def read_sources(items: Sequence[ChoiceItem], condition: str) -> list[int]:
    """Whose dialog each item is read with: its own, or under "shuffled" another label's."""
    return shuffled_partners(items, key=lambda item: item.label) if condition == "shuffled" else list(range(len(items)))


def scoring_batches(
    lqa: LatentQA, items: Sequence[ChoiceItem], reads: Sequence[ReadSide], condition: str, batch_size: int
):
    """The batches that score every item's candidates under `condition`, in order: (the index of
    the dialog whose activations patch each row, the batch, the adapter that scores it)."""
    jobs = [(i, j, c) for i, j in enumerate(read_sources(items, condition)) for c in items[i].candidates]
    for start in range(0, len(jobs), batch_size):
        part = jobs[start : start + batch_size]
        batch = lqa.collate(
            [LaidOutExample(reads[j], condition_write_side(lqa, condition, items[i], reads[j], c)) for i, j, c in part]
        )
        yield [j for _, j, _ in part], batch, None if condition == "prompting" else DECODER


def candidate_losses(
    lqa: LatentQA,
    items: Sequence[ChoiceItem],
    reads: Sequence[ReadSide],
    acts: Sequence[torch.Tensor],
    condition: str,
    batch_size: int = 16,
) -> list[float]:
    """The loss of every item's every candidate under `condition`, item by item (in eval mode)."""
    shift = lqa.config.patch.shift_position_ids_read
    losses = []
    for sources, batch, adapter in scoring_batches(lqa, items, reads, condition, batch_size):
        part_acts = torch.cat([acts[j] for j in sources]) if condition in ("true", "shuffled") else None
        losses += lqa.model.example_losses(batch, part_acts, shift, adapter).tolist()
    return losses


def _choose(lqa, items, reads, acts, conditions, batch_size) -> ChoiceResult:
    chosen, answer_losses = {}, {}
    for condition in conditions:
        losses = candidate_losses(lqa, items, reads, acts, condition, batch_size)
        sizes = [len(item.candidates) for item in items]
        chosen[condition] = _argmins(losses, sizes)
        starts = itertools.accumulate(sizes[:-1], initial=0)
        answer_losses[condition] = [losses[start + item.answer] for start, item in zip(starts, items)]
    return ChoiceResult(list(items), chosen, answer_losses=answer_losses)


def _generate(lqa, items, reads, acts, condition, batch_size, max_new_tokens) -> list[str]:
    """Greedy answers to each item's question under `condition`."""
    if condition == "prompting":
        asked = [_asking(item) for item in items]
        return [
            a
            for start in range(0, len(items), batch_size)
            for a in complete(lqa, asked[start : start + batch_size], None, max_new_tokens)
        ]
    shift = lqa.config.patch.shift_position_ids_read
    jobs = list(enumerate(read_sources(items, condition)))
    answers = []
    for start in range(0, len(jobs), batch_size):
        part = jobs[start : start + batch_size]
        batch = lqa.collate(
            [LaidOutExample(reads[j], condition_write_side(lqa, condition, items[i], reads[j], None)) for i, j in part]
        )
        patch = (
            (batch.write_patch_mask, torch.cat([acts[j] for _, j in part]))
            if condition in ("true", "shuffled")
            else None
        )
        tokens = lqa.model.generate(
            batch.write_ids,
            batch.write_attention,
            lqa.model.decoder_position_ids(batch, shift),
            max_new_tokens,
            lqa.stop_ids,
            lqa.chat_format.pad_id,
            patch=patch,
        )
        answers += [lqa.decode(t) for t in tokens]
    return answers


def _asking(item: ChoiceItem) -> list[dict[str, str]]:
    """The item's dialog with its question put to the target (the prompting baseline)."""
    messages = [dict(m) for m in item.dialog.messages]
    if messages[-1]["role"] == "user":  # keep roles alternating: the question joins the last user turn
        messages[-1]["content"] += "\n\n" + item.question
    else:
        messages.append({"role": "user", "content": item.question})
    return messages


def condition_write_side(
    lqa: LatentQA, condition: str, item: ChoiceItem, read: ReadSide, candidate: str | None
) -> WriteSide:
    """What scores `candidate` (or, for None, asks for an answer) under `condition`: the decoder's
    dialog (with placeholders, or the read span's tokens as text), or the target's own chat with
    the question appended."""
    mode = "generate" if candidate is None else "score"
    if condition == "prompting":
        return lqa.layout.chat_side(_asking(item), candidate)
    stand_in = read.ids[read.patched_span[0] : read.patched_span[1]] if condition == "text" else None
    return lqa.layout.write_side(_n(read), item.question, candidate, mode, stand_in)


def _n(read: ReadSide) -> int:
    return read.patched_span[1] - read.patched_span[0]


def _argmins(losses: list[float], sizes: list[int]) -> list[int]:
    picks, at = [], 0
    for size in sizes:
        group = losses[at : at + size]
        picks.append(group.index(min(group)))
        at += size
    return picks
