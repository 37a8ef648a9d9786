"""The `latentqa` command: help, and clear errors for bad configuration and data."""

import json
import subprocess
import sys

import pytest


def latentqa(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "latentqa.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def test_help_lists_every_subcommand():
    result = latentqa("--help")
    assert result.returncode == 0
    for command in ("inspect-batch", "train", "read", "score", "steer", "evaluate-steering", "evaluate"):
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


def test_help_lists_every_config_field_with_its_default_and_meaning(capsys):
    from conftest import import_job
    from latentqa.config import STRATEGY_FROM_TRAIN, describe_fields, engine_sections
    from latentqa_platform.settings import JobSettings

    job_sections = {name: info.annotation for name, info in JobSettings.model_fields.items()}
    engine = [row for prefix, model in engine_sections().items() for row in describe_fields(model, prefix)]
    set_through_train = {f"--strategy.{key}" for key in STRATEGY_FROM_TRAIN}  # refused if given: not listed
    assert set_through_train < {key for key, _, _ in engine}
    engine = [row for row in engine if row[0] not in set_through_train]
    jobs = [row for prefix, model in job_sections.items() for row in describe_fields(model, prefix)]
    assert [key for key, _, meaning in engine + jobs if not meaning] == []  # every field says what it is
    cli = subprocess.run(
        [sys.executable, "-m", "latentqa.cli", "train", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert all(key in cli for key, _, _ in engine) and "--train.lr" in cli and "(default: 0.002)" in cli
    assert not any(key in cli for key in set_through_train)
    assert "(default: local)" in cli.split("--strategy.kind", 1)[1].splitlines()[0]
    with pytest.raises(SystemExit):
        import_job("train").main(["--help"])
    job_help = capsys.readouterr().out
    assert all(key in job_help for key, _, _ in engine + jobs)
    assert not any(key in job_help for key in set_through_train)
    assert "(default: ddp)" in job_help.split("--strategy.kind", 1)[1].splitlines()[0]
    assert "datasets/offline/train" in job_help  # a nested section's own default, not its class's
