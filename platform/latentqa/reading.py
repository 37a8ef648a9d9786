"""Read activations in plain language (SPEC "Read") and score candidate answers.

One target pass per dialog serves all of its questions: the dialog's activations are computed
once and repeated for each question's decoder prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .data import ReadDialog
from .layout import LaidOutExample
from .session import LatentQA

Dialog = list[dict[str, str]]


def dialog_to_read(messages: Dialog) -> ReadDialog:
    """A user's dialog is read whole (no verb span); a final user turn gets the generation prompt."""
    if not messages:
        raise ValueError("a dialog needs at least one message")
    for index, message in enumerate(messages):
        if set(message) != {"role", "content"} or not all(isinstance(v, str) for v in message.values()):
            raise ValueError(f"message {index}: expected {{'role': str, 'content': str}}, got {message!r}")
    return ReadDialog(list(messages), "none", messages[-1]["role"] == "user")


def _read_layer(lqa: LatentQA, layer: int | None) -> int:
    return lqa.config.patch.read_layer if layer is None else layer


def read(
    lqa: LatentQA,
    dialogs: Sequence[Dialog],
    questions: Sequence[str] | Sequence[Sequence[str]],
    read_layer: int | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 16,
) -> list[list[str]]:
    """Answer every question about every dialog: answers[d][q].

    `questions` is one list for all dialogs, or one list per dialog.
    """
    per_dialog = (
        [list(questions)] * len(dialogs)
        if questions and isinstance(questions[0], str)
        else [list(q) for q in questions]
    )
    if len(per_dialog) != len(dialogs):
        raise ValueError(f"got {len(dialogs)} dialogs but {len(per_dialog)} question lists")
    with lqa.model.evaluating():
        return _read(lqa, dialogs, per_dialog, _read_layer(lqa, read_layer), max_new_tokens, batch_size)


def _read(lqa, dialogs, per_dialog, layer, max_new_tokens, batch_size) -> list[list[str]]:
    answers: list[list[str]] = [[] for _ in dialogs]
    reads = [lqa.layout.read_side(dialog_to_read(d)) for d in dialogs]
    # Dialogs in target batches; each dialog's questions in decoder batches of <= batch_size.
    for start in range(0, len(dialogs), batch_size):
        chunk = range(start, min(start + batch_size, len(dialogs)))
        writes = {d: [lqa.layout.write_side(_n(reads[d]), q, None, "generate") for q in per_dialog[d]] for d in chunk}
        target_batch = lqa.collate([LaidOutExample(reads[d], writes[d][0]) for d in chunk if writes[d]])
        acts = lqa.model.target_activations(target_batch, [layer])[layer]
        rows = torch.split(acts, [_n(reads[d]) for d in chunk if writes[d]])
        dialog_acts = dict(zip([d for d in chunk if writes[d]], rows))
        jobs = [(d, w) for d in chunk for w in writes[d]]
        for job_start in range(0, len(jobs), batch_size):
            part = jobs[job_start : job_start + batch_size]
            batch = lqa.collate([LaidOutExample(reads[d], w) for d, w in part])
            part_acts = torch.cat([dialog_acts[d] for d, _ in part])
            generated = lqa.model.generate_answers(
                batch,
                part_acts,
                max_new_tokens,
                lqa.stop_ids,
                lqa.chat_format.pad_id,
                shift=lqa.config.patch.shift_position_ids_read,
            )
            for (d, _), tokens in zip(part, generated):
                answers[d].append(lqa.decode(tokens))
    return answers


def _n(read_side) -> int:
    return read_side.patched_span[1] - read_side.patched_span[0]


@dataclass(frozen=True)
class ScoredAnswer:
    answer: str
    loss: float


def score(
    lqa: LatentQA,
    dialog: Dialog,
    question: str,
    candidates: Sequence[str],
    read_layer: int | None = None,
    batch_size: int = 16,
) -> list[ScoredAnswer]:
    """Score-mode loss of each candidate answer, best (lowest) first."""
    with lqa.model.evaluating():
        return _score(lqa, dialog, question, candidates, _read_layer(lqa, read_layer), batch_size)


def _score(lqa, dialog, question, candidates, layer, batch_size) -> list[ScoredAnswer]:
    read_side = lqa.layout.read_side(dialog_to_read(dialog))
    one = lqa.collate(
        [LaidOutExample(read_side, lqa.layout.write_side(_n(read_side), question, candidates[0], "score"))]
    )
    acts = lqa.model.target_activations(one, [layer])[layer]
    losses: list[float] = []
    for start in range(0, len(candidates), batch_size):
        part = candidates[start : start + batch_size]
        batch = lqa.collate(
            [LaidOutExample(read_side, lqa.layout.write_side(_n(read_side), question, c, "score")) for c in part]
        )
        losses += lqa.model.example_losses(
            batch, acts.repeat(len(part), 1), lqa.config.patch.shift_position_ids_read
        ).tolist()
    return sorted((ScoredAnswer(c, loss) for c, loss in zip(candidates, losses)), key=lambda s: s.loss)


# The evaluation suite's conditions (`latentqa.identification`), for one dialog.
BASELINES = ("true", "shuffled", "none")


def score_baselines(
    lqa: LatentQA,
    dialog: Dialog,
    question: str,
    candidates: Sequence[str],
    contrast: Dialog,
    read_layer: int | None = None,
    batch_size: int = 16,
) -> dict[str, list[float]]:
    """Each candidate's loss (in the order given) under the suite's conditions: the dialog's own
    activations ("true"), the `contrast` dialog's ("shuffled": the suite pairs each item with
    another label's dialog) and none ("none"). What "true" does better than the other two is what
    the decoder reads from the activations rather than guesses from the question."""
    from .identification import ChoiceItem, candidate_losses, read_items

    layer = _read_layer(lqa, read_layer)
    items = [
        ChoiceItem("dialog", "read", dialog_to_read(dialog), question, tuple(candidates), 0),
        # The contrast dialog only lends its activations; one candidate of its own lays it out.
        ChoiceItem("contrast", "read", dialog_to_read(contrast), question, tuple(candidates[:1]), 0),
    ]
    read = read_items(lqa, items, [layer], batch_size)
    with lqa.model.evaluating():
        return {
            condition: candidate_losses(lqa, items, read.reads, read.acts[layer], condition, batch_size)[
                : len(candidates)
            ]
            for condition in BASELINES
        }


def score_layers(
    lqa: LatentQA, dialog: Dialog, question: str, candidates: Sequence[str], layers: Sequence[int], batch_size: int = 16
) -> dict[int, list[float]]:
    """Each candidate's loss (in the order given) with the dialog's activations read at each of
    `layers`, all from one target pass (the suite's layer map, for one dialog)."""
    from .identification import ChoiceItem, candidate_losses, read_items

    items = [ChoiceItem("dialog", "read", dialog_to_read(dialog), question, tuple(candidates), 0)]
    read = read_items(lqa, items, layers, batch_size)
    with lqa.model.evaluating():
        return {
            layer: candidate_losses(lqa, items, read.reads, read.acts[layer], "true", batch_size) for layer in layers
        }


def read_layers(
    lqa: LatentQA, dialog: Dialog, question: str, layers: Sequence[int], max_new_tokens: int = 64, batch_size: int = 16
) -> dict[int, str]:
    """The answer to `question` with the dialog's activations read at each of `layers`: one
    target pass, then the layers' decoder prompts generated together."""
    read_side = lqa.layout.read_side(dialog_to_read(dialog))
    example = LaidOutExample(read_side, lqa.layout.write_side(_n(read_side), question, None, "generate"))
    answers: dict[int, str] = {}
    with lqa.model.evaluating():
        acts = lqa.model.target_activations(lqa.collate([example]), list(layers))
        for start in range(0, len(layers), batch_size):
            part = layers[start : start + batch_size]
            generated = lqa.model.generate_answers(
                lqa.collate([example] * len(part)),
                torch.cat([acts[layer] for layer in part]),
                max_new_tokens,
                lqa.stop_ids,
                lqa.chat_format.pad_id,
                shift=lqa.config.patch.shift_position_ids_read,
            )
            answers |= {layer: lqa.decode(tokens) for layer, tokens in zip(part, generated)}
    return answers
