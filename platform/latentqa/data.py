"""LatentQA data: the paper's five files, validated, and expanded to (record x QA) examples.

SPEC "Data": records are JSON arrays (JSONL loads too) of string fields; `qa.json` maps each
label to its [question, answer] pairs. Every error names the file, the record and the field.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, RootModel, ValidationError, field_validator

SET_FILES = ("system.json", "stimulus_completion.json", "stimulus.json", "control.json")
QA_FILE = "qa.json"
Verb = Literal["system", "user", "none"]

# What a read asks when the user asks nothing: two of the paper's own questions.
DEFAULT_QUESTIONS = ["What type of persona will the assistant adopt?", "What is the assistant trying to do?"]


class DataError(ValueError):
    """Bad LatentQA data; the message names the file, record index and field."""


class Record(BaseModel):
    """One stimulus/control record; absent fields are empty strings."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    system: str = ""
    control_user: str = ""
    control_thought: str = ""
    control_model: str = ""
    stimulus_user: str = ""
    stimulus_thought: str = ""
    stimulus_model: str = ""
    label: str

    @field_validator("label")
    @classmethod
    def _label_not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("label must be a non-empty string")
        return value


QAPair = tuple[str, str]


class QAMap(RootModel[dict[str, list[QAPair]]]):
    """`qa.json`: label -> list of [question, answer] pairs."""


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


def parse_json_or_jsonl(text: str, source: str) -> object:
    """A `.jsonl` source is one JSON value per line; anything else is one JSON document."""
    if not source.endswith(".jsonl"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{source}: not valid JSON: {err}") from None
    rows = []
    for line_no, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataError(f"{source}: line {line_no} is not valid JSON: {err}") from None
    return rows


def _load_json_or_jsonl(path: Path) -> object:
    return parse_json_or_jsonl(path.read_text(encoding="utf-8"), str(path))


def _field_of(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "record"
    return f"field {where!r}: {first['msg']}"


def parse_records(rows: object, source: str) -> list[Record]:
    """Validate raw rows (already parsed JSON) into records; errors name source and index."""
    if not isinstance(rows, list):
        raise DataError(f"{source}: expected a JSON array (or JSONL) of records, got {type(rows).__name__}")
    records = []
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{source}: record {index}: expected an object, got {type(row).__name__}")
        try:
            record = Record.model_validate(row)
        except ValidationError as err:
            raise DataError(f"{source}: record {index}: {_field_of(err)}") from None
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
        raw = {row.get("label"): row.get("qa") for row in raw if isinstance(row, dict)}
    if not isinstance(raw, dict):
        raise DataError(f"{source}: expected an object mapping each label to [question, answer] pairs")
    try:
        qa = QAMap.model_validate(raw).root
    except ValidationError as err:
        raise DataError(f"{source}: {_field_of(err)}") from None
    for label, pairs in qa.items():
        for index, (question, answer) in enumerate(pairs):
            if not question.strip() or not answer.strip():
                raise DataError(f"{source}: label {label!r} pair {index}: question and answer must be non-empty")
    return qa


def load_qa(path: str | Path) -> dict[str, list[QAPair]]:
    path = Path(path)
    return parse_qa(_load_json_or_jsonl(path), str(path))


@dataclass(frozen=True)
class Example:
    """One training/eval example: a record paired with one QA pair of its label."""

    record: Record
    question: str
    answer: str
    source: str = ""


def expand(
    records: list[Record], qa: dict[str, list[QAPair]], source: str = "", exclude_prefixes: tuple[str, ...] = ()
) -> list[Example]:
    """Pair every record with every QA pair of its label (R x Q examples)."""
    examples = []
    for index, record in enumerate(records):
        if record.label.split("-")[0] in exclude_prefixes:
            continue
        if record.label not in qa:
            raise DataError(f"{source}: record {index}: field 'label': {record.label!r} has no entry in {QA_FILE}")
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
    train_percent: float = 1.0
    """A seeded fraction of the examples to keep."""
    seed: int = 0
    """Seed of that fraction."""

    @field_validator("path")
    @classmethod
    def _absolute(cls, path: Path) -> Path:
        return path if ":/" in str(path) else path.resolve()


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
