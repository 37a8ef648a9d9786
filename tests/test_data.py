"""Data models and loaders: the paper's files load unchanged; bad data names file, record, field."""

import json

import pytest

from latentqa.data import DataError, DatasetSpec, Record, load_examples, load_records, read_dialog
from latentqa.paths import OFFLINE_HELDOUT, OFFLINE_TRAIN, PAPER_DATA


def test_paper_eval_files_load_unchanged():
    """The paper's evaluation set (datasets/latentqa, split by label) loads as the paper wrote it."""
    splits = [PAPER_DATA / "train", PAPER_DATA / "heldout"]
    records = {
        name: sum(len(load_records(split / name)) for split in splits)
        for name in ("system.json", "stimulus.json", "control.json")
    }
    assert records == {"system.json": 567, "stimulus.json": 567, "control.json": 500}
    examples = load_examples(DatasetSpec(path=splits[1]))
    kept = load_examples(DatasetSpec(path=splits[1], filter=("sqa",)))
    assert 0 < len(kept) < len(examples)
    assert all(e.record.label.split("-")[0] != "sqa" for e in kept)


def test_train_percent_keeps_a_seeded_fraction():
    full = load_examples(DatasetSpec(path=OFFLINE_TRAIN))
    part = load_examples(DatasetSpec(path=OFFLINE_TRAIN, train_percent=0.25, seed=3))
    again = load_examples(DatasetSpec(path=OFFLINE_TRAIN, train_percent=0.25, seed=3))
    assert len(part) == round(len(full) * 0.25) and part == again


def test_offline_dataset_splits_have_disjoint_labels():
    train = {e.record.label for e in load_examples(DatasetSpec(path=OFFLINE_TRAIN))}
    heldout = {e.record.label for e in load_examples(DatasetSpec(path=OFFLINE_HELDOUT))}
    assert train and heldout and not train & heldout


def test_jsonl_loads_like_json(tmp_path):
    rows = json.loads((OFFLINE_TRAIN / "control.json").read_text())
    (tmp_path / "control.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert load_records(tmp_path / "control.jsonl") == load_records(OFFLINE_TRAIN / "control.json")


@pytest.mark.parametrize(
    "rows, where",
    [
        ([{"control_user": "hi", "label": "x"}, {"control_user": "hi", "labl": "x"}], "record 1: field 'label'"),
        ([{"control_user": "hi", "label": "x", "mood": "happy"}], "record 0: field 'mood'"),
        ([{"control_user": 3, "label": "x"}], "record 0: field 'control_user'"),
        ([{"control_user": "hi", "label": ""}], "record 0: field 'label'"),
        ([{"control_user": "hi", "control_model": "ok", "label": "x"}], "record 0: field 'stimulus_user'"),
        ([{"stimulus_user": "hi", "label": "x"}], "record 0: field 'control_user'"),
    ],
)
def test_bad_records_name_file_record_and_field(tmp_path, rows, where):
    path = tmp_path / "control.json"
    path.write_text(json.dumps(rows))
    with pytest.raises(DataError, match=rf"control.json: {where}"):
        load_records(path)


def test_label_without_qa_is_an_error(tmp_path):
    (tmp_path / "control.json").write_text(
        json.dumps([{"control_user": "hi", "label": "known"}, {"control_user": "yo", "label": "lost"}])
    )
    (tmp_path / "qa.json").write_text(json.dumps({"known": [["q", "a"]]}))
    with pytest.raises(DataError, match=r"control.json: record 1: field 'label': 'lost' has no entry in qa.json"):
        load_examples(DatasetSpec(path=tmp_path))


def test_malformed_json_names_the_file_and_line(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"control_user": "hi", "label": "x"}\n{"control_user": \n')
    with pytest.raises(DataError, match=r"bad.jsonl: line 2 is not valid JSON"):
        load_records(tmp_path / "bad.jsonl")


def test_read_dialog_cases_and_thought_tokens():
    record = Record(
        control_user="c", control_model="m", stimulus_user="s", stimulus_model="out", stimulus_thought="why", label="x"
    )
    dialog = read_dialog(record, thought_tokens=True)
    assert dialog.verb == "user" and not dialog.add_generation_prompt
    assert dialog.messages[-1]["content"] == "<think>\nwhy\n</think>\n\nout"
    assert read_dialog(Record(system="s", stimulus_user="u", label="x")).verb == "system"
    assert read_dialog(Record(control_user="c", label="x")).verb == "none"
