"""Training mixes: sources of examples beside the paper's QA sets (`data.mix`).

Activation Oracles (Karvonen et al.) learned general reading from a mix; two of its sources are
built here from labelled records (the paper's record files, e.g. the 7,844 training system
prompts), for any tokenizer and template:

- **yes/no**: a record with a system prompt, read over the user's message alone (the system
  prompt is the masked verb span, SPEC case 1), asked whether the assistant was told its own
  system prompt or another of the same kind (the label's first word: persona, goal); half the
  answers are "Yes", half "No", so the decoder learns to say no.
- **context prediction**: a record's read dialog, rendered and tokenised whole; the decoder reads
  a span of k tokens at a random place and answers with the n tokens just before it or just after
  it. The read stops at the span's end, so tokens after it are never in the target's pass.

Each source is one record file; `examples` is its weight in the mix: how many examples it adds
per epoch, drawn by its seed. Errors name the file, the record and the field.
"""

from __future__ import annotations

import random
from collections import defaultdict
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .data import ContextSpan, DataError, Example, Record, load_records, parse_json_or_jsonl, parse_records
from .paths import usable_path

YES, NO = "Yes", "No"


def yes_no_question(description: str) -> str:
    return f"Answer with 'Yes' or 'No' only. Was the assistant given this instruction: \"{description}\"?"


class MixSource(BaseModel):
    """One source of a training mix: its kind, its record file and its weight in examples."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    kind: Literal["yes_no", "context"]
    """yes_no: is the assistant told this system prompt? context: the tokens before or after a read span."""
    path: Path
    """A record file in the paper's format (.json array or .jsonl), e.g. system.json."""
    examples: int = Field(ge=1)
    """Examples this source adds to every epoch (its weight in the mix)."""
    seed: int = 0
    """Seed of the examples drawn."""
    span_tokens: tuple[int, int] = (1, 16)
    """context: the read span's length k, drawn from this range (inclusive)."""
    answer_tokens: tuple[int, int] = (1, 16)
    """context: how many tokens n to predict, drawn from this range (inclusive)."""

    @field_validator("path")
    @classmethod
    def _absolute(cls, path: Path) -> Path:
        return path if ":/" in str(path) else usable_path(path).resolve()

    @model_validator(mode="after")
    def _ranges(self) -> MixSource:
        for name in ("span_tokens", "answer_tokens"):
            low, high = getattr(self, name)
            if not 1 <= low <= high:
                raise ValueError(f"{name}: need 1 <= low <= high, got [{low}, {high}]")
        return self


def mix_examples(sources: list[MixSource]) -> list[Example]:
    """Every source's examples, each file read and validated here."""
    return [e for source in sources for e in examples_of_records(load_records(source.path), source, str(source.path))]


def examples_of_file(data: bytes, source: MixSource, path: str) -> list[Example]:
    """The source's examples from its file's bytes (Ray Data reads the file)."""
    return examples_of_records(parse_records(parse_json_or_jsonl(data, path), path), source, path)


def examples_of_records(records: list[Record], source: MixSource, path: str) -> list[Example]:
    if source.kind == "yes_no":
        return yes_no_examples(records, source, path)
    return context_examples(records, source, path)


def yes_no_examples(records: list[Record], source: MixSource, path: str) -> list[Example]:
    """`source.examples` yes/no examples, half "Yes" (one more for an odd count): each a record with a system prompt,
    asked about its own system prompt (Yes) or another record's of the same label kind (No)."""
    for index, record in enumerate(records):
        if not record.system:
            raise DataError(f"{path}: record {index}: field 'system' is required for yes/no questions")
    by_kind: dict[str, list[str]] = defaultdict(list)
    for record in records:
        by_kind[_kind(record)].append(record.system)
    for index, record in enumerate(records):
        if len(set(by_kind[_kind(record)])) < 2:
            raise DataError(
                f"{path}: record {index}: field 'label': no other system prompt of kind {_kind(record)!r} "
                "to ask about (a 'No' needs one)"
            )
    rng = random.Random(source.seed)
    examples = []
    for i in range(source.examples):
        index = rng.randrange(len(records))
        record = records[index]
        if i % 2 == 0:
            description, answer = record.system, YES
        else:
            description = rng.choice([s for s in by_kind[_kind(record)] if s != record.system])
            answer = NO
        examples.append(Example(record, yes_no_question(description), answer, f"{path}: record {index}"))
    rng.shuffle(examples)
    return examples


def context_examples(records: list[Record], source: MixSource, path: str) -> list[Example]:
    """`source.examples` context-prediction examples over the records' read dialogs, each with
    its span drawn (`ContextSpan`); the layout cuts the span to the dialog's tokens, and asks and
    answers from them."""
    rng = random.Random(source.seed)
    examples = []
    for _ in range(source.examples):
        index = rng.randrange(len(records))
        span = ContextSpan(
            position=rng.random(),
            span=rng.randint(*source.span_tokens),
            answer=rng.randint(*source.answer_tokens),
            direction=rng.choice(["before", "after"]),
        )
        examples.append(Example(records[index], "", "", f"{path}: record {index}", span))  # the layout asks, answers
    return examples


def _kind(record: Record) -> str:
    return record.label.split("-")[0]
