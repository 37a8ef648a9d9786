"""Quality on the offline default: a few minutes of `latentqa train` learns to read the target.

Slow: it trains a decoder for real (the same `latentqa train` a user runs), then checks the
held-out labels: the loss falls, and activations from the right dialog beat activations from
another label's dialog (activation gain) by a clear margin.
"""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "latentqa.cli",
            "train",
            "--run-name",
            "quality",
            "--train.output_dir",
            str(out),
            "--train.eval_every",
            "0",
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=900,
    )
    return out / "quality"


def test_training_lowers_held_out_loss_and_reads_activations(trained_run):
    metrics = json.loads((trained_run / "metrics.json").read_text())
    before, after = metrics["before"], metrics["after"]
    assert after["eval/loss_true"] < before["eval/loss_true"] - 2.0
    assert after["eval/activation_gain"] > GAIN_FLOOR
    assert after["eval/activation_gain"] > before["eval/activation_gain"] + GAIN_FLOOR


def test_cli_reads_a_held_out_dialog_with_the_new_decoder(trained_run):
    result = subprocess.run(
        [sys.executable, "-m", "latentqa.cli", "read", "--decoder", str(trained_run / "decoder"), "--count", "1"],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    row = json.loads(result.stdout.splitlines()[-1])
    assert row["answers"] and all(isinstance(a, str) and a for a in row["answers"].values())


GAIN_FLOOR = 0.05
