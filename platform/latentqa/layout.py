"""Token layout of LatentQA examples (SPEC "Read side", "Write side") and left-padded batches.

An example is laid out as token ids plus half-open spans: the masked (verb) and patched
spans of the read dialog, the placeholder span of the decoder's dialog, and its labels.
Text is cut at those boundaries before tokenising, so span ends are exact token indices.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch

from .chat_format import ChatFormat
from .data import ContextSpan, Example, ReadDialog, Record, read_dialog

Mode = Literal["train", "score", "generate"]
IGNORE_INDEX = -100
# The decoder's fixed reply to the patched activations; learned in train mode (SPEC).
ACKNOWLEDGEMENT = "Sure, I've analyzed the assistant."
Span = tuple[int, int]


class LayoutError(ValueError):
    """An example cannot be laid out (e.g. longer than the model's context)."""


@dataclass(frozen=True)
class ReadSide:
    ids: list[int]
    masked_span: Span
    patched_span: Span


@dataclass(frozen=True)
class WriteSide:
    ids: list[int]
    patched_span: Span
    labels: list[int] | None  # None in generate mode


@dataclass(frozen=True)
class LaidOutExample:
    read: ReadSide
    write: WriteSide

    def as_json(self) -> dict:
        """The fields of `latentqa inspect-batch` (and of the golden layouts)."""
        out = {
            "read_ids": self.read.ids,
            "masked_read_span": list(self.read.masked_span),
            "patched_read_span": list(self.read.patched_span),
            "write_ids": self.write.ids,
            "patched_write_span": list(self.write.patched_span),
        }
        if self.write.labels is not None:
            out["labels"] = self.write.labels
        return out


def _token_index(bounds: list[int], pieces: list[list[int]]) -> dict[int, int]:
    """char bound -> token index where that bound falls."""
    index, total = {}, 0
    for bound, piece in zip(bounds, [*pieces, []]):
        index[bound] = total
        total += len(piece)
    return index


@dataclass
class Layout:
    """Lays out read dialogs and decoder dialogs for one tokenizer's chat format."""

    chat_format: ChatFormat
    thought_tokens: bool = False
    max_length: int | None = None

    def __post_init__(self) -> None:
        if self.max_length is None:
            limit = getattr(self.chat_format.tokenizer, "model_max_length", None)
            self.max_length = limit if limit and limit < 10**9 else None

    # ----- read side -------------------------------------------------------------------
    def _rendered(self, dialog: ReadDialog):
        """The read dialog as the target's template renders it (thinking as the layout is set)."""
        return self.chat_format.render(
            dialog.messages, add_generation_prompt=dialog.add_generation_prompt, thinking=self.thought_tokens
        )

    def read_side(self, dialog: ReadDialog) -> ReadSide:
        fmt = self.chat_format
        rendered = self._rendered(dialog)
        bos_end = len(fmt.bos_text)
        verb_start = verb_end = bos_end
        if dialog.verb == "system":
            user_turn = 1
            verb_end = (
                rendered.turn_starts[user_turn]
                if fmt.system_placement == "own_turn"
                else rendered.content_spans[user_turn][0]
            )
        elif dialog.verb == "user":
            user_turns = [k for k, m in enumerate(dialog.messages) if m["role"] == "user"]
            if len(user_turns) >= 2:
                verb_start = rendered.turn_starts[user_turns[0]]
                verb_end = rendered.turn_starts[user_turns[1]]
        bounds, pieces = fmt.tokenize(rendered, [bos_end, verb_start, verb_end])
        at = _token_index(bounds, pieces)
        ids = [t for piece in pieces for t in piece]
        verb_start_tok, verb_end_tok = at[verb_start], at[verb_end]
        return ReadSide(ids, (verb_start_tok, verb_end_tok), (verb_end_tok, len(ids)))

    # ----- write side ------------------------------------------------------------------
    def write_side(
        self, n: int, question: str, answer: str | None, mode: Mode, stand_in: list[int] | None = None
    ) -> WriteSide:
        """The decoder's dialog around n placeholders; `stand_in` puts these token ids where the
        placeholders go (the text baseline: the read span's own tokens instead of activations)."""
        fmt = self.chat_format
        role = fmt.decoder_role
        messages = [
            {"role": "user", "content": "?"},  # stands for the n placeholders, spliced in as ids
            {"role": role, "content": ACKNOWLEDGEMENT},
            {"role": "user", "content": question},
        ]
        if mode == "generate":
            rendered = fmt.render(messages, generation_role=role)
        else:
            if answer is None:
                raise LayoutError(f"mode {mode!r} needs an answer")
            messages.append({"role": role, "content": answer})
            rendered = fmt.render(messages)
        placeholder = rendered.content_spans[0]
        decoder_turns = [k for k, m in enumerate(messages) if m["role"] == role]
        # train learns every decoder turn, score only the answer, generate nothing
        labelled = {"train": decoder_turns, "score": decoder_turns[-1:], "generate": []}[mode]
        label_spans = [(rendered.content_spans[k][0], rendered.turn_ends[k]) for k in labelled]
        cuts = [*placeholder, *(b for span in label_spans for b in span)]
        bounds, pieces = fmt.tokenize(rendered, cuts, fixed=(0, 1))  # the placeholder and acknowledgement
        pieces[bounds.index(placeholder[0])] = fmt.placeholder_ids(n) if stand_in is None else stand_in
        at = _token_index(bounds, pieces)
        ids = [t for piece in pieces for t in piece]
        labels = None
        if mode != "generate":
            labels = [IGNORE_INDEX] * len(ids)
            for a, b in label_spans:
                labels[at[a] : at[b]] = ids[at[a] : at[b]]
        return WriteSide(ids, (at[placeholder[0]], at[placeholder[1]]), labels)

    def chat_side(self, messages: list[dict[str, str]], answer: str) -> WriteSide:
        """A plain chat ending in an assistant turn holding `answer`, labelled on that turn (score
        mode): how the target itself rates an answer (the prompting baseline). No patched span."""
        fmt = self.chat_format
        rendered = fmt.render([*messages, {"role": "assistant", "content": answer}])
        span = (rendered.content_spans[-1][0], rendered.turn_ends[-1])
        bounds, pieces = fmt.tokenize(rendered, list(span))
        at = _token_index(bounds, pieces)
        ids = [t for piece in pieces for t in piece]
        labels = [IGNORE_INDEX] * len(ids)
        labels[at[span[0]] : at[span[1]]] = ids[at[span[0]] : at[span[1]]]
        return WriteSide(ids, (0, 0), labels)

    # ----- examples --------------------------------------------------------------------
    def example(self, example: Example, mode: Mode, index: int | None = None) -> LaidOutExample:
        if example.context is None:
            read = self.read_side(read_dialog(example.record, self.thought_tokens))
            question, answer = example.question, example.answer
        else:
            try:
                read, question, answer = self.context_side(example.record, example.context)
            except LayoutError as err:
                raise LayoutError(f"{_where(example, index)}: {err}") from None
        n = read.patched_span[1] - read.patched_span[0]
        write = self.write_side(n, question, answer if mode != "generate" else None, mode)
        self._check_length(read, write, example, index)
        return LaidOutExample(read, write)

    def context_side(self, record: Record, context: ContextSpan) -> tuple[ReadSide, str, str]:
        """A context-prediction example's read side, question and answer: the record's read
        dialog rendered and tokenised whole; the answer is `context.answer` tokens inside one
        message's content (never a turn's markup, which the decoder could only say as text), and
        the read span the `context.span` tokens just after them (direction "before") or just before
        them ("after"), both cut to fit. The read stops at the span's end; the tokens before the
        span are its masked (verb) span."""
        fmt = self.chat_format
        rendered = self._rendered(read_dialog(record, self.thought_tokens))
        bos_end = len(fmt.bos_text)
        bounds, pieces = fmt.tokenize(rendered, [bos_end, *(b for span in rendered.content_spans for b in span)])
        at = _token_index(bounds, pieces)
        ids, first = [t for piece in pieces for t in piece], at[bos_end]
        contents = [(at[a], at[b]) for a, b in rendered.content_spans]
        n = min(context.answer, max(b - a for a, b in contents))
        before = context.direction == "before"
        # answer starts whose n tokens lie in one content, with at least one token to read beside them
        starts = [p for a, b in contents for p in range(a, b - n + 1) if (p + n < len(ids) if before else p > first)]
        if not starts:
            raise LayoutError(f"label {record.label!r}: no message content to predict context from")
        answer_at = starts[min(len(starts) - 1, int(context.position * len(starts)))]
        if before:
            start = answer_at + n
            k = min(context.span, len(ids) - start)
        else:
            k = min(context.span, answer_at - first)
            start = answer_at - k
        answer = fmt.tokenizer.decode(ids[answer_at : answer_at + n])
        question = dataclasses.replace(context, span=k, answer=n).question
        return ReadSide(ids[: start + k], (first, start), (start, start + k)), question, answer

    def _check_length(self, read: ReadSide, write: WriteSide, example: Example, index: int | None) -> None:
        longest = max(len(read.ids), len(write.ids))
        if self.max_length is not None and longest > self.max_length:
            raise LayoutError(
                f"{_where(example, index)} (label {example.record.label!r}): {longest} tokens exceed the "
                f"model's limit of {self.max_length}"
            )


def _where(example: Example, index: int | None) -> str:
    """Where an example came from, for errors: its file (and record, for a mix source's) and its index."""
    return f"{example.source or 'input'}" + (f": example {index}" if index is not None else "")


@dataclass
class Batch:
    """Left-padded tensors for one patched forward.

    read_patch_mask and write_patch_mask select, row by row, the same number of positions:
    the i-th selected read position feeds the i-th selected write position.
    """

    read_ids: torch.Tensor
    read_attention: torch.Tensor
    read_patch_mask: torch.Tensor
    write_ids: torch.Tensor
    write_attention: torch.Tensor
    write_patch_mask: torch.Tensor
    labels: torch.Tensor | None
    verb_lengths: torch.Tensor

    def to(self, device: torch.device | str) -> Batch:
        return Batch(**{k: (v.to(device) if v is not None else None) for k, v in self.__dict__.items()})

    def __len__(self) -> int:
        return self.read_ids.shape[0]


def left_pad(rows: list[list[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(r) for r in rows])
    width = int(lengths.max()) if rows else 0
    out = torch.full((len(rows), width), value, dtype=torch.long)
    pads = width - lengths
    for i, row in enumerate(rows):  # one slice copy per row, no per-token work
        out[i, int(pads[i]) :] = torch.tensor(row, dtype=torch.long)
    attention = torch.arange(width).unsqueeze(0) >= pads.unsqueeze(1)
    return out, attention.long()


def _span_mask(spans: list[Span], lengths: list[int], width: int) -> torch.Tensor:
    """Boolean mask of each row's span, shifted by that row's left padding."""
    pads = width - torch.tensor(lengths)
    starts = torch.tensor([s for s, _ in spans]) + pads
    ends = torch.tensor([e for _, e in spans]) + pads
    positions = torch.arange(width).unsqueeze(0)
    return (positions >= starts.unsqueeze(1)) & (positions < ends.unsqueeze(1))


def collate(examples: list[LaidOutExample], pad_id: int) -> Batch:
    read_ids, read_attention = left_pad([e.read.ids for e in examples], pad_id)
    write_ids, write_attention = left_pad([e.write.ids for e in examples], pad_id)
    labels = None
    if all(e.write.labels is not None for e in examples):
        labels, _ = left_pad([e.write.labels for e in examples], IGNORE_INDEX)
    return Batch(
        read_ids=read_ids,
        read_attention=read_attention,
        read_patch_mask=_span_mask(
            [e.read.patched_span for e in examples], [len(e.read.ids) for e in examples], read_ids.shape[1]
        ),
        write_ids=write_ids,
        write_attention=write_attention,
        write_patch_mask=_span_mask(
            [e.write.patched_span for e in examples], [len(e.write.ids) for e in examples], write_ids.shape[1]
        ),
        labels=labels,
        verb_lengths=torch.tensor([e.read.masked_span[1] - e.read.masked_span[0] for e in examples]),
    )
