"""The `latentqa` command: help, and clear errors for bad configuration and data."""

import json
import subprocess
import sys


def latentqa(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "latentqa.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def test_help_lists_every_subcommand():
    result = latentqa("--help")
    assert result.returncode == 0
    for command in ("inspect-batch", "train", "read", "score", "steer", "evaluate"):
        assert command in result.stdout


def test_unknown_config_field_is_named_before_anything_loads():
    result = latentqa("train", "--train.lrr", "0.1")
    assert result.returncode != 0
    assert "train.lrr" in result.stderr and "Traceback" not in result.stderr


def test_malformed_data_names_file_and_record(tmp_path):
    (tmp_path / "control.json").write_text(
        json.dumps([{"control_user": "hi", "label": "a"}, {"control_user": "x", "lable": "a"}])
    )
    (tmp_path / "qa.json").write_text(json.dumps({"a": [["q", "a"]]}))
    result = latentqa("train", "--data.train.path", str(tmp_path), "--train.output_dir", str(tmp_path / "runs"))
    assert result.returncode != 0
    assert "control.json: record 1: field 'label'" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()  # failed before anything was written
