"""LatentQA data: the paper's five files, validated, and expanded to (record x QA) examples.

SPEC "Data": records are JSON arrays (JSONL loads too) of string fields; `qa.json` maps each
label to its [question, answer] pairs. Every error names the file, the record and the field.
"""

from __future__ import annotations

import json
import random
import reprlib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, RootModel, ValidationError, field_validator

from .paths import usable_path

SET_FILES = ("system.json", "stimulus_completion.json", "stimulus.json", "control.json")
QA_FILE = "qa.json"
Verb = Literal["system", "user", "none"]

# What a read asks when the user asks nothing: two of the paper's own questions.
DEFAULT_QUESTIONS = ["What type of persona will the assistant adopt?", "What is the assistant trying to do?"]


class DataError(ValueError):
    """Bad LatentQA data; the message names the file, record index and field."""


_SHORT = reprlib.Repr()
_SHORT.maxstring = 60  # an error names a label or a field; it does not echo a 100 kB one


def _text(value: str) -> str:
    """JSON can escape half a surrogate pair (\\ud800); no tokenizer takes it, nor a UTF-8 writer."""
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            raise ValueError(f"{err.object[err.start]!r} is half a surrogate pair, not text") from None
    return value


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must be a non-empty string")
    return value


Text = Annotated[str, AfterValidator(_text)]
NonBlankText = Annotated[Text, AfterValidator(_not_blank)]


class Record(BaseModel):
    """One stimulus/control record; absent fields are empty strings."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    system: Text = ""
    control_user: Text = ""
    control_thought: Text = ""
    control_model: Text = ""
    stimulus_user: Text = ""
    stimulus_thought: Text = ""
    stimulus_model: Text = ""
    label: NonBlankText


QAPair = tuple[NonBlankText, NonBlankText]  # question, answer


class QAMap(RootModel[dict[Text, list[QAPair]]]):
    """`qa.json`: label -> list of [question, answer] pairs."""


class QARow(BaseModel):
    """A row of `qa.jsonl`: a label and its [question, answer] pairs."""

    model_config = ConfigDict(extra="forbid")

    label: Text
    qa: list[QAPair]


@dataclass(frozen=True)
class ReadDialog:
    """The target's dialog for a record (SPEC "Data", cases 1-4) and its verb kind."""

    messages: list[dict[str, str]]
    verb: Verb
    add_generation_prompt: bool


def read_dialog(record: Record, thought_tokens: bool = False) -> ReadDialog:
    """Build the read dialog of a record by the SPEC's four cases, checked in order."""
    if record.system:
        return ReadDialog(
            [{"role": "system", "content": record.system}, {"role": "user", "content": record.stimulus_user}],
            "system",
            True,
        )
    if not record.control_model:
        return ReadDialog([{"role": "user", "content": record.control_user}], "none", True)
    turns = [
        {"role": "user", "content": record.control_user},
        {"role": "assistant", "content": record.control_model},
        {"role": "user", "content": record.stimulus_user},
    ]
    if not record.stimulus_model:
        return ReadDialog(turns, "user", True)
    answer = record.stimulus_model
    if thought_tokens:
        answer = f"<think>\n{record.stimulus_thought}\n</think>\n\n{answer}"
    return ReadDialog(turns + [{"role": "assistant", "content": answer}], "user", False)


def _check_case(record: Record) -> str | None:
    """The field a record is missing for its case, or None when it fits one."""
    if record.system:
        return None if record.stimulus_user else "stimulus_user"
    if not record.control_user:
        return "control_user"
    if record.control_model and not record.stimulus_user:
        return "stimulus_user"
    return None


def _json(text: str, where: str) -> object:
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as err:  # JSONDecodeError, an integer of 4,300+ digits, deep nesting
        raise DataError(f"{where} not valid JSON: {err}") from None


def parse_json_or_jsonl(data: bytes, source: str) -> object:
    """A `.jsonl` source is one JSON value per line; anything else is one JSON document (UTF-8, a BOM allowed)."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise DataError(f"{source}: line {line} is not valid UTF-8 (byte {err.start})") from None
    if not source.endswith(".jsonl"):
        return _json(text, f"{source}:")
    # "\n" only: str.splitlines also splits at U+2028 and others, which JSON strings may hold
    lines = enumerate(text.split("\n"), 1)
    return [_json(line, f"{source}: line {line_no} is") for line_no, line in lines if line.strip()]


def _load_json_or_jsonl(path: Path) -> object:
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot read: {err.strerror}") from None
    return parse_json_or_jsonl(data, str(path))


def _field_of(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "record"
    return f"field {_SHORT.repr(where)}: {first['msg']}"


def _validated(model: type[BaseModel], row: object, source: str, index: int) -> BaseModel:
    """One row of a file as `model`; errors name the file, the row's index and the field."""
    if not isinstance(row, dict):
        raise DataError(f"{source}: record {index}: expected an object, got {type(row).__name__}")
    try:
        return model.model_validate(row)
    except ValidationError as err:
        raise DataError(f"{source}: record {index}: {_field_of(err)}") from None


def parse_records(rows: object, source: str) -> list[Record]:
    """Validate raw rows (already parsed JSON) into records; errors name source and index."""
    if not isinstance(rows, list):
        raise DataError(f"{source}: expected a JSON array (or JSONL) of records, got {type(rows).__name__}")
    records = []
    for index, row in enumerate(rows):
        record = _validated(Record, row, source, index)
        missing = _check_case(record)
        if missing:
            raise DataError(
                f"{source}: record {index}: field {missing!r} is required for this kind of record "
                "(SPEC Data cases: system+stimulus_user, control_user, or control_user+control_model+stimulus_user)"
            )
        records.append(record)
    return records


def load_records(path: str | Path) -> list[Record]:
    path = Path(path)
    return parse_records(_load_json_or_jsonl(path), str(path))


def parse_qa(raw: object, source: str) -> dict[str, list[QAPair]]:
    """Validate a QA map; JSONL rows of {"label": ..., "qa": [[q, a], ...]} are accepted too."""
    if isinstance(raw, list):
        rows, raw = [_validated(QARow, row, source, index) for index, row in enumerate(raw)], {}
        for index, row in enumerate(rows):
            if row.label in raw:
                raise DataError(f"{source}: record {index}: field 'label': {_SHORT.repr(row.label)} is repeated")
            raw[row.label] = row.qa
    if not isinstance(raw, dict):
        raise DataError(f"{source}: expected an object mapping each label to [question, answer] pairs")
    try:
        qa = QAMap.model_validate(raw).root
    except ValidationError as err:  # the field is label.pair.part
        raise DataError(f"{source}: {_field_of(err)}") from None
    return qa


def load_qa(path: str | Path) -> dict[str, list[QAPair]]:
    path = Path(path)
    return parse_qa(_load_json_or_jsonl(path), str(path))


@dataclass(frozen=True)
class ContextSpan:
    """What a context-prediction example (`latentqa.mixes`) answers and reads: `answer` tokens of
    the record's rendered read dialog, inside one message's content, at `position` (a fraction of
    the places where they fit), and the `span` tokens just after them ("before": the decoder says
    what came before the span) or just before them ("after"); a short dialog cuts both."""

    position: float
    span: int
    answer: int
    direction: Literal["before", "after"]

    @property
    def question(self) -> str:
        tokens = "token" if self.answer == 1 else f"{self.answer} tokens"
        if self.direction == "before":
            return f"Can you predict the previous {tokens} that came before this?"
        return f"Can you predict the next {tokens} that come after this?"


@dataclass(frozen=True)
class Example:
    """One training/eval example: a record paired with one QA pair of its label, or (with
    `context`) a span of its read dialog, whose question and answer the layout makes."""

    record: Record
    question: str
    answer: str
    source: str = ""
    context: ContextSpan | None = None


def expand(
    records: list[Record], qa: dict[str, list[QAPair]], source: str = "", exclude_prefixes: tuple[str, ...] = ()
) -> list[Example]:
    """Pair every record with every QA pair of its label (R x Q examples)."""
    examples = []
    for index, record in enumerate(records):
        if record.label.split("-")[0] in exclude_prefixes:
            continue
        if record.label not in qa:
            label = _SHORT.repr(record.label)
            raise DataError(f"{source}: record {index}: field 'label': {label} has no entry in {QA_FILE}")
        examples.extend(Example(record, q, a, source) for q, a in qa[record.label])
    return examples


class DatasetSpec(BaseModel):
    """Where a LatentQA set lives and how to cut it."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    path: Path
    """A folder of the paper's files (made absolute, so that Ray workers running elsewhere find it)."""
    files: tuple[str, ...] = SET_FILES
    """The record files to read from it (qa.json is always read)."""
    filter: tuple[str, ...] = ()
    """Label kinds to leave out (the part of a label before its first '-', e.g. sqa)."""
    train_percent: float = Field(1.0, gt=0, le=1)
    """A seeded fraction of the examples to keep."""
    seed: int = 0
    """Seed of that fraction."""

    @field_validator("path")
    @classmethod
    def _absolute(cls, path: Path) -> Path:
        return path if ":/" in str(path) else usable_path(path).resolve()


def load_examples(spec: DatasetSpec) -> list[Example]:
    """Load a folder of the paper's files (those present) and expand them to examples."""
    folder = Path(spec.path)
    qa_path = folder / QA_FILE
    if not qa_path.exists():
        raise DataError(f"{folder}: {QA_FILE} is missing")
    qa = load_qa(qa_path)
    present = [folder / name for name in spec.files if (folder / name).exists()]
    present += [
        (folder / name).with_suffix(".jsonl") for name in spec.files if (folder / name).with_suffix(".jsonl").exists()
    ]
    if not present:
        raise DataError(f"{folder}: none of {', '.join(spec.files)} (or .jsonl) found")
    examples = []
    for path in present:
        examples += expand(load_records(path), qa, str(path), spec.filter)
    if spec.train_percent < 1.0:
        keep = round(len(examples) * spec.train_percent)
        examples = random.Random(spec.seed).sample(examples, keep)
    return examples


def read_prompt_set(path: str | Path) -> tuple[list[str], list[str]]:
    """A steering prompt set's training and held-out prompts: `{"train": [...], "heldout": [...]}`,
    or a bare list (training prompts only)."""
    try:
        prompts = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: cannot read the prompt set: {err}") from None
    return (prompts["train"], prompts.get("heldout", [])) if isinstance(prompts, dict) else (prompts, [])
