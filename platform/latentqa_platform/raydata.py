"""The five sets with Ray Data: read, validated by the engine, expanded and laid out.

Files are read as bytes (JSON arrays or JSONL, local paths or any URI Ray Data reads), parsed and
checked by the engine's own functions inside `flat_map`, so an error names the file, record and
field exactly as `latentqa train` does. Laid-out examples travel as Arrow list columns and come
back as the engine's `LaidOutExample`s for `collate`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.data

from latentqa.config import LatentQAConfig
from latentqa.data import (
    QA_FILE,
    ContextSpan,
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
from latentqa.mixes import MixSource

if TYPE_CHECKING:
    from latentqa.layout import LaidOutExample, Layout
    from latentqa.training import ExampleSize

# Ray Data's workers import this module to run its functions. The engine's layout (torch,
# transformers, peft: ~10 s of imports per worker process on 2 cores) is imported only by the
# functions that lay out, so a job start's read-and-validate tasks stay light.

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
    return [_row_of_example(e) for e in expand(records, qa, path, exclude)]


def _mix_examples_of_file(row: dict, source_json: str) -> list[dict]:
    """flat_map: a mix source's file bytes -> its validated examples (`latentqa.mixes`), one row each."""
    from latentqa.mixes import MixSource, examples_of_file

    source = MixSource.model_validate_json(source_json)
    return [_row_of_example(e) for e in examples_of_file(row["bytes"], source, _file_path(row))]


def _row_of_example(e: Example) -> dict:
    context = json.dumps(dataclasses.asdict(e.context)) if e.context else ""  # one column type for every row
    row = {"record": e.record.model_dump_json(), "question": e.question, "answer": e.answer, "source": e.source}
    return {**row, "context": context}


def example_of_row(row: dict) -> Example:
    context = ContextSpan(**json.loads(row["context"])) if row.get("context") else None
    return Example(Record.model_validate_json(row["record"]), row["question"], row["answer"], row["source"], context)


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


def _located(spec: DatasetSpec) -> tuple[str, list[str]]:
    """A set's QA file and record files (each the file or its .jsonl twin); raises DataError where missing."""
    folder = Path(spec.path)
    qa_path = _present(folder, QA_FILE)
    if qa_path is None:
        raise DataError(f"{folder}: {QA_FILE} is missing")
    record_paths = [p for p in (_present(folder, f) for f in spec.files) if p is not None]
    if not record_paths:
        raise DataError(f"{folder}: none of {', '.join(spec.files)} (or .jsonl) found")
    return str(qa_path), [str(p) for p in record_paths]


@dataclass
class _ReadSet:
    spec: DatasetSpec
    name: str
    examples: ray.data.Dataset  # lazy: validated, expanded, shuffled and sampled when first executed
    files: dict[str, str]  # path -> sha256

    def checked(self, examples: ray.data.Dataset) -> ray.data.Dataset:
        """`examples` (derived from this set's) executed, and refused when there are none."""
        examples = examples.materialize()
        if examples.count() == 0:
            raise DataError(f"{Path(self.spec.path)}: no examples in the {self.name} set")
        return examples


def _read_sets(specs: dict[str, DatasetSpec], mix: list[MixSource] = ()) -> dict[str, _ReadSet]:
    """Each named set's files read, and its examples as a lazy pipeline, so that a caller runs a
    set's validation and whatever follows it as one Ray Data execution; the `mix` sources join
    the train set before it is shuffled. All files are checked to be present before any is read."""
    located = {name: _located(spec) for name, spec in specs.items()}
    for index, source in enumerate(mix):
        if ":/" not in str(source.path) and not Path(source.path).is_file():
            raise DataError(f"{source.path}: no such file (data.mix[{index}].path)")
    sets = {}
    for name, spec in specs.items():
        qa_path, record_paths = located[name]
        # One read per set: the blocks, and so the seeded shuffle's order, depend only on the set's own files.
        files = ray.data.read_binary_files([qa_path, *record_paths], include_paths=True).materialize()
        hashes = {_file_path(r): hashlib.sha256(r["bytes"]).hexdigest() for r in files.iter_rows()}
        qa_row = next(r for r in files.iter_rows() if _file_path(r) == qa_path)
        qa = parse_qa(parse_json_or_jsonl(qa_row["bytes"], qa_path), qa_path)
        examples = files.filter(lambda r, qa_path=qa_path: _file_path(r) != qa_path).flat_map(
            _examples_of_file, fn_kwargs={"qa": qa, "exclude": tuple(spec.filter)}
        )
        for source in mix if name == "train" else ():
            data = ray.data.read_binary_files([str(source.path)], include_paths=True).materialize()
            hashes.update({_file_path(r): hashlib.sha256(r["bytes"]).hexdigest() for r in data.iter_rows()})
            built = data.flat_map(_mix_examples_of_file, fn_kwargs={"source_json": source.model_dump_json()})
            examples = examples.union(built)
        examples = examples.random_shuffle(seed=spec.seed)
        if spec.train_percent < 1.0:
            examples = examples.materialize()  # counted before it is cut
            examples = examples.limit(round(examples.count() * spec.train_percent))
        sets[name] = _ReadSet(spec, name, examples, hashes)
    return sets


def read_set(spec: DatasetSpec, name: str) -> DataSet:
    """One set (a folder of the paper's files, or their .jsonl twins), validated and expanded,
    with `filter` and `train_percent` applied; raises DataError naming file, record and field."""
    [read] = _read_sets({name: spec}).values()
    return DataSet(read.checked(read.examples), read.files)


_LAYOUTS: dict[str, Layout] = {}


def _layout(config_json: str) -> Layout:
    """The engine's Layout for the target's tokenizer, built once per Ray worker process."""
    from latentqa.session import layout_for

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
    """Lazy: the examples as the engine's token layout, in list columns."""
    return examples.map_batches(
        _lay_out_batch, batch_format="pyarrow", batch_size=256, fn_kwargs={"config_json": config.model_dump_json()}
    )


def example_sizes(laid_out: ray.data.Dataset) -> list[ExampleSize]:
    """Every laid-out example's read and write token counts (only the lengths leave the blocks)."""
    from latentqa.training import ExampleSize

    lengths = laid_out.map_batches(
        lambda t: pa.table(
            {"read": pc.list_value_length(t["read_ids"]), "write": pc.list_value_length(t["write_ids"])}
        ),
        batch_format="pyarrow",
    )
    return [
        ExampleSize(read, write)
        for table in lengths.iter_batches(batch_format="pyarrow", batch_size=None)
        for read, write in zip(table["read"].to_pylist(), table["write"].to_pylist(), strict=True)
    ]


def laid_out_examples(table: pa.Table) -> list[LaidOutExample]:
    """Rows of the laid-out dataset back into the engine's `LaidOutExample`s."""
    from latentqa.layout import LaidOutExample, ReadSide, WriteSide

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
    from latentqa.layout import LayoutError

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
    train_sizes: list[ExampleSize]  # every train example's tokens, read and write, for the step plan
    files: dict[str, str]  # path -> sha256, both sets
    train_files: dict[str, str]

    @property
    def train_count(self) -> int:
        return len(self.train_sizes)

    def datasets(self) -> dict[str, ray.data.Dataset]:
        return {"train": self.train, **({"eval": self.eval} if self.eval is not None else {})}


def training_sets(config: LatentQAConfig, workers: int) -> TrainingSets:
    """Read, check and lay out the train and held-out sets before any worker starts; raises
    DataError naming file, record and field (Ray may wrap it: `data_error` finds it). Past reading
    its files, each set runs as one Ray Data execution: validated, expanded, shuffled and laid out
    (train) or cut to the evaluated batches (eval)."""
    specs = {"train": config.data.train, **({"eval": config.data.eval} if config.data.eval else {})}
    sets = _read_sets(specs, config.data.mix)
    train = sets["train"].checked(lay_out(sets["train"].examples, config))
    sizes = example_sizes(train)
    count = len(sizes)
    if count < workers:
        raise DataError(f"{config.data.train.path}: {count} train examples for {workers} workers")
    held_out = sets.get("eval")
    eval_examples = None
    if held_out is not None:
        eval_examples = held_out.examples
        if config.train.eval_batches:
            eval_examples = eval_examples.limit(config.train.eval_batches * config.train.batch_size)
        eval_examples = held_out.checked(eval_examples)
    files = {path: sha for read in sets.values() for path, sha in read.files.items()}
    return TrainingSets(train, eval_examples, sizes, files, sets["train"].files)


def held_out_dialog(eval_examples: ray.data.Dataset) -> list[dict]:
    """A held-out record's read dialog, preferring a lone instruction (read whole, as `latentqa read`)."""
    records = [Record.model_validate_json(r["record"]) for r in eval_examples.take(200)]
    lone = [r for r in records if not r.system and not r.control_model]
    return read_dialog((lone or records)[0]).messages
