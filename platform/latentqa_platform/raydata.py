"""The five sets with Ray Data: read, validated by the engine, expanded and laid out.

Files are read as bytes (JSON arrays or JSONL, local paths or any URI Ray Data reads), parsed and
checked by the engine's own functions inside `flat_map`, so an error names the file, record and
field exactly as `latentqa train` does. Laid-out examples travel as Arrow list columns and come
back as the engine's `LaidOutExample`s for `collate`.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import ray
import ray.data

from latentqa.config import LatentQAConfig
from latentqa.data import (
    QA_FILE,
    DataError,
    DatasetSpec,
    Example,
    Record,
    expand,
    parse_json_or_jsonl,
    parse_qa,
    parse_records,
    read_dialog,
)
from latentqa.layout import LaidOutExample, Layout, LayoutError, ReadSide, WriteSide
from latentqa.session import layout_for

_joined = False  # whether `connect` joined the cluster; a caller already connected keeps its connection


def connect(address: str | None, log_to_driver: bool = True) -> None:
    """Join (or start) the cluster, with Ray Data set up for exact resumes. `log_to_driver`: print
    the workers' output here too (else it stays in Ray's logs)."""
    global _joined
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=log_to_driver)
        _joined = True
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    # Row order independent of task timing: the same seed gives the same shards and batches, so
    # a resumed run skips exactly the batches it already trained on.
    context.execution_options.preserve_order = True


def leave() -> None:
    """Disconnect from the cluster if `connect` joined it (never a connection the caller made)."""
    global _joined
    if _joined and ray.is_initialized():
        ray.shutdown()
    _joined = False


def _file_path(row: dict) -> str:
    return str(row["path"]).removeprefix("local://")


def _examples_of_file(row: dict, qa: dict, exclude: tuple[str, ...]) -> list[dict]:
    """flat_map: one file's bytes -> its validated examples (record x QA pair), one row each."""
    path = _file_path(row)
    records = parse_records(parse_json_or_jsonl(row["bytes"], path), path)
    return [
        {"record": e.record.model_dump_json(), "question": e.question, "answer": e.answer, "source": e.source}
        for e in expand(records, qa, path, exclude)
    ]


def example_of_row(row: dict) -> Example:
    return Example(Record.model_validate_json(row["record"]), row["question"], row["answer"], row["source"])


@dataclass
class DataSet:
    examples: ray.data.Dataset  # validated examples: record JSON, question, answer, source
    files: dict[str, str]  # path -> sha256, logged with the run


def _present(folder: Path, name: str) -> Path | None:
    """`name` in the folder, or its .jsonl twin."""
    for path in (folder / name, (folder / name).with_suffix(".jsonl")):
        if path.exists():
            return path
    return None


def read_set(spec: DatasetSpec, name: str) -> DataSet:
    """One set (a folder of the paper's files, or their .jsonl twins), validated and expanded,
    with `filter` and `train_percent` applied; raises DataError naming file, record and field."""
    folder = Path(spec.path)
    qa_path = _present(folder, QA_FILE)
    if qa_path is None:
        raise DataError(f"{folder}: {QA_FILE} is missing")
    record_paths = [p for p in (_present(folder, f) for f in spec.files) if p is not None]
    if not record_paths:
        raise DataError(f"{folder}: none of {', '.join(spec.files)} (or .jsonl) found")

    files = ray.data.read_binary_files([str(p) for p in [qa_path, *record_paths]], include_paths=True).materialize()
    hashes = {_file_path(r): hashlib.sha256(r["bytes"]).hexdigest() for r in files.iter_rows()}
    qa_row = next(r for r in files.iter_rows() if _file_path(r) == str(qa_path))
    qa = parse_qa(parse_json_or_jsonl(qa_row["bytes"], str(qa_path)), str(qa_path))

    examples = files.filter(lambda r: _file_path(r) != str(qa_path)).flat_map(
        _examples_of_file, fn_kwargs={"qa": qa, "exclude": tuple(spec.filter)}
    )
    examples = examples.random_shuffle(seed=spec.seed).materialize()  # runs the checks now
    if spec.train_percent < 1.0:
        examples = examples.limit(round(examples.count() * spec.train_percent)).materialize()
    if examples.count() == 0:
        raise DataError(f"{folder}: no examples in the {name} set")
    return DataSet(examples, hashes)


_LAYOUTS: dict[str, Layout] = {}


def _layout(config_json: str) -> Layout:
    """The engine's Layout for the target's tokenizer, built once per Ray worker process."""
    if config_json not in _LAYOUTS:
        _LAYOUTS[config_json] = layout_for(LatentQAConfig.model_validate_json(config_json))
    return _LAYOUTS[config_json]


_INTS = pa.list_(pa.int32())


def _lay_out_batch(batch: pa.Table, config_json: str) -> pa.Table:
    """map_batches: examples -> the engine's token layout, as list columns."""
    layout = _layout(config_json)
    laid = [layout.example(example_of_row(row), "train") for row in batch.to_pylist()]
    columns = {
        "read_ids": [e.read.ids for e in laid],
        "read_masked_span": [list(e.read.masked_span) for e in laid],
        "read_patched_span": [list(e.read.patched_span) for e in laid],
        "write_ids": [e.write.ids for e in laid],
        "write_patched_span": [list(e.write.patched_span) for e in laid],
        "labels": [e.write.labels for e in laid],
    }
    return pa.table({name: pa.array(values, _INTS) for name, values in columns.items()})


def lay_out(examples: ray.data.Dataset, config: LatentQAConfig) -> ray.data.Dataset:
    return examples.map_batches(
        _lay_out_batch, batch_format="pyarrow", batch_size=256, fn_kwargs={"config_json": config.model_dump_json()}
    ).materialize()


def laid_out_examples(table: pa.Table) -> list[LaidOutExample]:
    """Rows of the laid-out dataset back into the engine's `LaidOutExample`s."""
    return [
        LaidOutExample(
            ReadSide(r["read_ids"], tuple(r["read_masked_span"]), tuple(r["read_patched_span"])),
            WriteSide(r["write_ids"], tuple(r["write_patched_span"]), r["labels"]),
        )
        for r in table.to_pylist()
    ]


def data_error(err: BaseException) -> Exception | None:
    """The engine's DataError/LayoutError behind a (Ray-wrapped) exception, if that is what it is.

    Ray Data re-raises a task's error as RayTaskError(UserCodeException) whose chain may not
    hold the original across processes; its message always quotes the remote traceback.
    """
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, (DataError, LayoutError)):
            return err
        quoted = re.search(r"latentqa\.(?:data\.DataError|layout\.LayoutError): (.+)", str(err))
        if quoted:
            return DataError(quoted.group(1).strip())
        err = getattr(err, "cause", None) or err.__cause__ or err.__context__
    return None


@dataclass
class TrainingSets:
    """What a training job streams: the laid-out train set, the held-out examples it evaluates
    on (at most `train.eval_batches` batches' worth), and every data file's sha256."""

    train: ray.data.Dataset
    eval: ray.data.Dataset | None
    train_count: int
    examples_per_worker: int  # the equal split across workers drops the remainder
    files: dict[str, str]  # path -> sha256, both sets
    train_files: dict[str, str]

    def datasets(self) -> dict[str, ray.data.Dataset]:
        return {"train": self.train, **({"eval": self.eval} if self.eval is not None else {})}


def training_sets(config: LatentQAConfig, workers: int) -> TrainingSets:
    """Read, check and lay out the train and held-out sets before any worker starts; raises
    DataError naming file, record and field (Ray may wrap it: `data_error` finds it)."""
    train = read_set(config.data.train, "train")
    held_out = read_set(config.data.eval, "eval") if config.data.eval else None
    laid_out = lay_out(train.examples, config)
    count = laid_out.count()
    eval_examples = held_out.examples if held_out else None
    if eval_examples is not None and config.train.eval_batches:
        eval_examples = eval_examples.limit(config.train.eval_batches * config.train.batch_size).materialize()
    if count < workers:
        raise DataError(f"{config.data.train.path}: {count} train examples for {workers} workers")
    files = {**train.files, **(held_out.files if held_out else {})}
    return TrainingSets(laid_out, eval_examples, count, count // workers, files, train.files)


def held_out_dialog(eval_examples: ray.data.Dataset) -> list[dict]:
    """A held-out record's read dialog, preferring a lone instruction (read whole, as `latentqa read`)."""
    records = [Record.model_validate_json(r["record"]) for r in eval_examples.take(200)]
    lone = [r for r in records if not r.system and not r.control_model]
    return read_dialog((lone or records)[0]).messages
