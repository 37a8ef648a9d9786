"""Property-based fuzzing of bad input (issue 13): malformed data files and configs.

Hypothesis starts from valid records, QA maps, YAML configs and dotted overrides and breaks them:
dropped, renamed and unknown fields, wrong types, empty, huge and unpaired-surrogate strings,
unknown labels, truncated JSON, invalid UTF-8, BOMs, blank lines, garbage, deep nesting, huge
numbers, out-of-range values. Each input either loads or fails with the project's own error
(DataError, ConfigError) on one short line that names the file, the record and the field; no other
exception escapes. A few of the failures also go through `jobs/train.py`: exit code 2, that one
line, no traceback, and the output folder as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from subprocess import PIPE

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import import_job, job_env, tail
from latentqa.config import ConfigError, describe_fields, engine_sections, load_config
from latentqa.data import QA_FILE, SET_FILES, DataError, DatasetSpec, Record, load_examples, load_qa, load_records
from latentqa.paths import OFFLINE_TRAIN, PROJECT_ROOT
from latentqa.training import StepPlan, strategy_config


def fuzz(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))


MAX_MESSAGE = 600  # an error names the problem, it does not echo the input

# ---------------------------------------------------------------- data files

SAMPLE = {name: json.loads((OFFLINE_TRAIN / name).read_text())[:3] for name in SET_FILES}
QA_SAMPLE = {
    label: pairs
    for label, pairs in json.loads((OFFLINE_TRAIN / QA_FILE).read_text()).items()
    if any(row["label"] == label for rows in SAMPLE.values() for row in rows)
}
FIELDS = tuple(Record.model_fields)

SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5)
NOT_TEXT = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.lists(SCALARS, max_size=3)
    | st.dictionaries(st.text(max_size=5), SCALARS, max_size=3)
)
ODD_TEXT = st.text() | st.sampled_from(["", " ", "\n", "x" * 100_000, "\ud800", "a\udfffb", "\x00", "\ufeff", "-"])
ANY_VALUE = NOT_TEXT | ODD_TEXT


@st.composite
def broken_rows(draw, rows: list[dict]) -> tuple[list, int]:
    """Valid rows with one of them broken: (rows, its index)."""
    rows = [dict(row) for row in rows]
    index = draw(st.integers(0, len(rows) - 1))
    row, field = rows[index], draw(st.sampled_from(FIELDS) | st.text(max_size=8))
    how = draw(st.sampled_from(["drop", "rename", "set", "replace"]))
    if how == "drop":
        row.pop(field, None)
    elif how == "rename":
        row[draw(st.text(max_size=8))] = row.pop(field, "")
    elif how == "set":
        row[field] = draw(ANY_VALUE)
    else:
        rows[index] = draw(ANY_VALUE.filter(lambda value: not isinstance(value, dict)))
    return rows, index


# Damage that leaves every record where it was (the error still names it), and damage that does not.
HARMLESS = ["none", "bom", "blank lines"]
DAMAGE = ["truncate", "insert bytes", "garbage", "not an array", "duplicate key", "deep nesting", "huge number"]


@st.composite
def file_bytes(draw, rows: list, jsonl: bool) -> tuple[bytes, str]:
    """`rows` as a JSON array (or JSONL), perhaps damaged byte-wise: (bytes, the damage)."""
    dump = lambda value: json.dumps(value, ensure_ascii=draw(st.booleans()))
    text = "".join(dump(row) + "\n" for row in rows) if jsonl else dump(rows)
    damage = draw(st.sampled_from(HARMLESS + DAMAGE))
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:  # an unpaired surrogate, not escaped: invalid UTF-8, named by line
        data, damage = text.encode("utf-8", "surrogatepass"), "invalid UTF-8"
    at = draw(st.integers(0, len(data)))
    if damage == "bom":
        data = b"\xef\xbb\xbf" + data
    elif damage == "blank lines":
        data = b"\n \n" + data.replace(b"\n", b"\n\r\n\t\n") if jsonl else b"\n\n" + data + b"\n\n"
    elif damage == "truncate":
        data = data[:at]
    elif damage == "insert bytes":
        data = data[:at] + draw(st.binary(min_size=1, max_size=8)) + data[at:]
    elif damage == "garbage":
        data = draw(st.binary(max_size=64) | st.text(max_size=64).map(str.encode))
    elif damage == "not an array":
        data = dump(draw(NOT_TEXT | st.dictionaries(st.text(max_size=5), NOT_TEXT, max_size=2))).encode()
    elif damage == "duplicate key":
        data = data.replace(b"{", b'{"label": 1, "control_user": null, ', 1)
    elif damage == "deep nesting":
        data = b"[" * 100_000 + b"]" * 100_000
    elif damage == "huge number":
        data = data[:at] + b"1" * 5000 + data[at:]
    return data, damage


def assert_names(err: Exception, source: Path | str, where: str = "") -> None:
    """The error is one short line that starts with the file and holds `where`."""
    message = str(err)
    assert message.startswith(f"{source}: "), message[:MAX_MESSAGE]
    assert "\n" not in message and len(message) < len(str(source)) + MAX_MESSAGE, message[:2000]
    assert where in message, message


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@fuzz(300)
@given(data=st.data(), name=st.sampled_from(SET_FILES), jsonl=st.booleans())
def test_fuzzed_record_files_load_or_name_file_record_and_field(scratch, data, name, jsonl):
    rows, index = data.draw(broken_rows(SAMPLE[name]))
    content, damage = data.draw(file_bytes(rows, jsonl))
    path = (scratch / name).with_suffix(".jsonl" if jsonl else ".json")
    path.write_bytes(content)
    try:
        load_records(path)
    except DataError as err:
        assert_names(err, path, f": record {index}: " if damage in HARMLESS else "")


@st.composite
def broken_qa(draw) -> tuple[dict, str]:
    """The sample QA map with one label's entry broken: (map, that label)."""
    qa = {label: [list(pair) for pair in pairs] for label, pairs in QA_SAMPLE.items()}
    label = draw(st.sampled_from(sorted(qa)))
    how = draw(st.sampled_from(["pairs", "pair", "part", "extra part", "rename"]))
    if how == "pairs":
        qa[label] = draw(ANY_VALUE)
    elif how == "pair":
        qa[label][0] = draw(ANY_VALUE)
    elif how == "part":
        qa[label][0][draw(st.integers(0, 1))] = draw(ANY_VALUE)
    elif how == "extra part":
        qa[label][0].append(draw(ANY_VALUE))
    else:
        label = draw(ODD_TEXT)
        qa[label] = qa.pop(sorted(qa)[0])
    return qa, label


@fuzz(200)
@given(data=st.data(), jsonl=st.booleans())
def test_fuzzed_qa_files_load_or_name_file_and_label(scratch, data, jsonl):
    qa, label = data.draw(broken_qa())
    rows = [{"label": label, "qa": pairs} for label, pairs in qa.items()] if jsonl else qa
    content, damage = data.draw(file_bytes(rows, jsonl))
    path = scratch / ("qa.jsonl" if jsonl else QA_FILE)
    path.write_bytes(content)
    try:
        load_qa(path)
    except DataError as err:
        # JSONL rows are records; a map's entry is named by its label
        where = f": record {list(qa).index(label)}: " if jsonl else repr(label)[:40].rstrip("'")
        named = damage in HARMLESS and len(label) < 40 and label.isprintable()  # else shown escaped or cut
        assert_names(err, path, where if named else "")


@fuzz(100)
@given(data=st.data(), names=st.lists(st.sampled_from(SET_FILES), min_size=1, max_size=4, unique=True))
def test_fuzzed_sets_cross_check_labels_and_name_the_file(scratch, data, names):
    folder = scratch / "set"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    qa = dict(QA_SAMPLE)
    if data.draw(st.booleans()):  # a label with no QA pairs, or a QA entry no record uses
        qa.pop(data.draw(st.sampled_from(sorted(qa))))
    else:
        qa[data.draw(ODD_TEXT)] = [["q", "a"]]
    (folder / QA_FILE).write_text(json.dumps(qa))
    broken = data.draw(st.sampled_from(names))
    for name in names:
        rows = data.draw(broken_rows(SAMPLE[name]))[0] if name == broken else SAMPLE[name]
        (folder / name).write_text(json.dumps(rows))
    spec = DatasetSpec(path=folder, filter=data.draw(st.lists(st.sampled_from(["persona", "goal", ""]), max_size=2)))
    try:
        load_examples(spec)
    except DataError as err:  # in a record file, by record; in qa.json, by label
        named = str(err).split(": ")[0]
        assert named in {str(folder / name) for name in [*names, QA_FILE]}, str(err)
        assert_names(err, named, ": record " if named != str(folder / QA_FILE) else ": field ")


# ---------------------------------------------------------------- configs

ENGINE_KEYS = sorted(
    key.removeprefix("--")
    for prefix, model in engine_sections().items()
    for key, _, _ in describe_fields(model, prefix)
    if prefix != "strategy"
)
DEFAULTS = load_config().model_dump(mode="json")
NUMBERS = st.sampled_from([0, -1, -(10**20), 10**20, 0.0, -0.5, 1.5, float("nan"), float("inf"), float("-inf")])
STRINGS = st.sampled_from(["", " ", "-1", "1e-4", "nan", ".inf", "..", ".", "../x", "a/b", "x\x00y", "add", "ddp"])
YAML_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8) | NUMBERS | STRINGS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=5,
)
NEW_KEY = st.from_regex(r"[a-z_][a-z0-9_]{0,8}", fullmatch=True)


def default_at(key: str):
    value = DEFAULTS
    for part in key.split("."):
        value = value[part]
    return value


def set_key(tree: dict, key: str, value) -> None:
    *sections, leaf = key.split(".")
    for section in sections:
        tree = tree.setdefault(section, {})
    tree[leaf] = value


@st.composite
def broken_key(draw) -> tuple[str, object]:
    """A key (known, unknown in a known section, or an unknown section) and anything for it."""
    key = draw(st.sampled_from(ENGINE_KEYS))
    how = draw(st.sampled_from(["value", "value", "new field", "new section", "section"]))
    if how == "new field":
        key = f"{key.rsplit('.', 1)[0]}.{draw(NEW_KEY)}x"
    elif how == "new section":
        key = f"{draw(NEW_KEY)}x.{draw(NEW_KEY)}"
    elif how == "section":
        key = key.split(".")[0]
    return key, draw(YAML_VALUES)


def assert_names_key(err: Exception, key: str) -> None:
    """A config error is one line naming the key, or the section or field of it that is wrong (an unknown
    section, a cross-field check, a number where a section goes)."""
    message = str(err)
    assert "\n" not in message and len(message) < MAX_MESSAGE, message
    parts = key.split(".")
    prefixes = [".".join(parts[:n]) for n in range(1, len(parts) + 1)]
    assert (
        f"--{key}" in message
        or repr(key) in message
        or any(f"{p}: " in message or f"{p}." in message for p in prefixes)
    ), (key, message)


def assert_usable(config) -> None:
    """What a job computes from an accepted config before training works (runs at least a step)."""
    plan = StepPlan.of([1] * config.train.epochs, config.train)
    assert plan.steps_per_epoch >= 1 and plan.total_steps >= 1, config.train
    strategy_config(config, "ddp")
    if config.data.train.path == OFFLINE_TRAIN:  # the spec's cut of the offline set
        try:
            load_examples(config.data.train)
        except DataError as err:
            assert_names(err, OFFLINE_TRAIN)


@st.composite
def config_files(draw) -> tuple[bytes, str]:
    """A YAML config file: valid fields and one broken key, or no mapping at all: (bytes, that key)."""
    tree: dict = {}
    for key in draw(st.lists(st.sampled_from(ENGINE_KEYS), max_size=4)):
        set_key(tree, key, default_at(key))
    key, value = draw(broken_key())
    set_key(tree, key, value)
    whole = draw(st.sampled_from(["tree", "tree", "tree", "empty", "scalar", "text", "bytes", "deep", "huge number"]))
    if whole == "tree":
        text = yaml.safe_dump(tree, allow_unicode=draw(st.booleans()))
        try:
            yaml.safe_load(text)
        except yaml.YAMLError:  # PyYAML writes some characters it does not read back: no key to name then
            key = ""
        return text.encode(), key
    return {
        "empty": b"",
        "scalar": yaml.safe_dump(draw(YAML_VALUES)).encode(),
        "text": draw(st.text(max_size=60)).encode(),
        "bytes": draw(st.binary(max_size=60)),
        "deep": b"[" * 400,  # unclosed, and past the recursion limit of PyYAML's parser
        "huge number": b"train:\n  seed: " + b"9" * 5000 + b"\n",
    }[whole], ""


@fuzz(200)
@given(config_file=config_files())
def test_fuzzed_config_files_load_or_name_the_key(scratch, config_file):
    content, key = config_file
    path = scratch / "config.yaml"
    path.write_bytes(content)
    try:
        config = load_config(path)
    except ConfigError as err:
        assert_names(err, path)
        if key:
            assert_names_key(err, key)
        return
    assert_usable(config)


OVERRIDE_VALUES = st.text(max_size=10) | st.sampled_from(
    [
        "",
        "fast",
        "0",
        "-1",
        "1e-4",
        "nan",
        "[1",
        "{a: 1}",
        "- x",
        "a: b: c",
        "null",
        "'open",
        "!!python/none",
        "9" * 5000,
    ]
)
VALID_OVERRIDES = [["--train.lr", "3e-5"], ["--patch.mode=add"], ["--train.batch_size", "2"], ["--lora.r", "4"]]


@st.composite
def override_args(draw) -> tuple[list[str], str]:
    """Valid overrides, then one broken (bad key, value, or form): (argv, the broken key)."""
    args = [arg for pair in draw(st.lists(st.sampled_from(VALID_OVERRIDES), max_size=2)) for arg in pair]
    key = draw(st.sampled_from(ENGINE_KEYS) | broken_key().map(lambda kv: kv[0]))
    value = draw(OVERRIDE_VALUES)
    form = draw(st.sampled_from(["pair", "equals", "no value", "no dashes", "odd key"]))
    if form == "pair":
        return [*args, f"--{key}", value], key
    if form == "equals":
        return [*args, f"--{key}={value}"], key
    if form == "no value":
        return [*args, f"--{key}"], key
    if form == "no dashes":
        return [*args, key, value], key
    odd = draw(st.sampled_from(["", ".", "train.", ".lr", "train..lr", "-", "train.lr.x", "train.lr.x.y"]))
    return [*args, f"--{odd}", value], odd


@fuzz(300)
@given(argv=override_args())
def test_fuzzed_overrides_load_or_name_the_key(argv):
    args, key = argv
    try:
        config = load_config(None, args)
    except ConfigError as err:
        assert_names_key(err, key)
        return
    assert_usable(config)


# ---------------------------------------------------------------- jobs/train.py


class ReachedRay(Exception):
    """The job got past its config checks and was about to join Ray."""


@fuzz(100)
@given(config_file=config_files(), argv=override_args())
def test_fuzzed_job_configs_fail_before_ray_or_are_usable(scratch, monkeypatch, config_file, argv):
    job = import_job("train")
    reached: list[Path] = []

    def connect(args, settings, log_file: Path) -> None:
        reached.append(log_file)
        raise ReachedRay

    monkeypatch.setattr(job.batchjobs, "connect", connect)
    path = scratch / "job.yaml"
    path.write_bytes(config_file[0])
    out = scratch / "runs"
    argv = ["--config", str(path), "--train.output_dir", str(out), *argv[0]]
    try:
        job.main(argv)
    except ConfigError as err:
        assert "\n" not in str(err) and len(str(err)) < MAX_MESSAGE, str(err)
        return
    except ReachedRay:
        pass
    except SystemExit as exit:  # argparse's own: a usage error, or -h taken for --help
        assert exit.code in (0, 2)
        return
    _, config, _, _ = job.parse_args(argv)
    assert reached[0].parent.parent == Path(config.train.output_dir).resolve(), reached  # the run's folder is in it
    assert_usable(config)


# A few of the inputs above, as the job met them before: a traceback (invalid UTF-8, an override
# YAML cannot read), a message of several lines (the strategy), Ray started and then a traceback
# (batch size 0), a run folder outside the output folder.
BAD_JOB_CONFIGS = [  # the config file, overrides, what the error names
    (b"train:\n  run_name: caf\xe9\n", [], "invalid continuation byte"),
    (b"", ["--train.lr", "[1"], "train.lr"),
    (b"", ["--strategy.kind", "zero"], "strategy.kind"),
    (b"", ["--train.batch_size", "0"], "train.batch_size"),
    (b"", ["--train.run_name", "../elsewhere"], "train.run_name"),
]


def folder_state(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else b"" for p in sorted(folder.rglob("*"))}


def saved_run(out: Path, name: str) -> Path:
    """An earlier, interrupted run of `name` under `out`: a checkpoint and its console log."""
    (out / name / "checkpoint_000003").mkdir(parents=True)
    (out / name / "checkpoint_000003" / "progress.json").write_text('{"step": 3}')
    (out / name / "console.log").write_text("earlier run\n")
    return out / name


def assert_failed_in_one_line(proc: subprocess.CompletedProcess, kind: str, *named: str) -> str:
    assert proc.returncode == 2, tail(proc)
    assert "Traceback" not in proc.stderr, tail(proc)
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(f"{kind} error: ") and all(text in line for text in named), tail(proc)
    return line


def test_train_job_rejects_bad_configs_in_one_line_before_ray(tmp_path):
    out = tmp_path / "runs"
    saved_run(out, "kept")
    before = folder_state(tmp_path)
    # No cluster here: a job that got as far as joining one fails (not in one line) instead of starting one.
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:1"}
    runs = []
    try:
        for index, (content, args, named) in enumerate(BAD_JOB_CONFIGS):  # at once: each takes seconds to import
            config = tmp_path / f"{index}.yaml"
            config.write_bytes(content)
            command = [sys.executable, "jobs/train.py", "--config", str(config), "--train.output_dir", str(out)]
            command += ["--train.run_name", "kept", *args]
            proc = subprocess.Popen(command, cwd=PROJECT_ROOT, env=env, stdout=PIPE, stderr=PIPE, text=True)
            runs.append((proc, config, named))
        for proc, config, named in runs:
            stdout, stderr = proc.communicate(timeout=120)
            done = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
            assert_failed_in_one_line(done, "config", named)
            assert "Ray's, MLflow's and the libraries' messages" not in done.stdout, tail(done)
            config.unlink()
    finally:
        for proc, _, _ in runs:
            if proc.poll() is None:
                proc.kill()
    assert folder_state(tmp_path) == before  # nothing written anywhere


BAD_DATA = {
    # file, the damage, what the error names
    "stimulus.jsonl": (
        lambda rows: b"".join(json.dumps(r).encode() + b"\n" for r in rows[:2]) + b'{"label": "\xff"}\n',
        "not valid UTF-8",
    ),
    "control.json": (
        lambda rows: json.dumps([*rows[:1], {**rows[1], "control_user": "a\ud800"}]).encode(),
        "record 1: field 'control_user'",
    ),
}


@pytest.mark.parametrize("name", sorted(BAD_DATA))
def test_train_job_rejects_bad_data_in_one_line_keeping_earlier_runs(ray_cluster, tmp_path, name):
    folder = tmp_path / "train"
    shutil.copytree(OFFLINE_TRAIN, folder)
    damage, named = BAD_DATA[name]
    rows = json.loads((folder / Path(name).with_suffix(".json").name).read_text())
    (folder / Path(name).with_suffix(".json").name).unlink()
    (folder / name).write_bytes(damage(rows))
    out = tmp_path / "runs"
    run_dir = saved_run(out, "kept")
    before = folder_state(out)
    proc = subprocess.run(
        [sys.executable, "jobs/train.py", "--data.train.path", str(folder), "--train.output_dir", str(out)]
        + ["--train.run_name", "kept", "--no-showcase"],
        cwd=PROJECT_ROOT,
        env=job_env(ray_cluster),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert_failed_in_one_line(proc, "data", f"{folder / name}: ", named)
    after = folder_state(out)
    log = str((run_dir / "console.log").relative_to(out))
    assert after.pop(log).startswith(before.pop(log))  # the console log is appended to
    assert after == before  # the checkpoint as it was; no MLflow store, no new files
