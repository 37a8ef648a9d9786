"""Smoke test of `jobs/benchmark.py`: tiny sizes, one repeat, engine figures only (no Ray).

It checks that the command runs and writes valid JSON and markdown with every requested figure;
it never asserts a timing target (timings belong in docs/benchmarks.md, not in unit tests).
"""

from __future__ import annotations

import importlib.util
import json

import pytest

from latentqa.paths import PROJECT_ROOT

KEYS = {"name", "measured", "baseline", "unit", "ratio", "target", "met", "details"}


def _job():
    spec = importlib.util.spec_from_file_location("benchmark_job", PROJECT_ROOT / "jobs" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY = [
    "--repeats",
    "1",
    "--hidden",
    "64",
    "--layers",
    "3",
    "--intermediate",
    "128",
    "--heads",
    "4",
    "--kv-heads",
    "2",
    "--read-layer",
    "1",
    "--questions",
    "3",
    "--new-tokens",
    "4",
    "--batch-size",
    "2",
]


def test_engine_benchmarks_write_json_and_markdown(tmp_path, llama3_tokenizer_dir):
    out = tmp_path / "bench"
    argv = [
        *TINY,
        "--only",
        "read",
        "train_step",
        "token_batches",
        "early_exit",
        "suite",
        "layout",
        "memory",
        "--output",
        str(out),
        "--suite-items",
        "4",
        "--token-batch-steps",
        "3",
        "--layout-examples",
        "10",
        "--layout-tokenizer",
        str(llama3_tokenizer_dir),
        "--memory-hidden",
        "64",
        "--memory-layers",
        "2",
        "--memory-intermediate",
        "128",
    ]
    assert _job().main(argv) == 0
    result = json.loads((out / "results.json").read_text())
    names = [r["name"] for r in result["results"]]
    assert names == [
        "early exit",
        "read overhead",
        "evaluation suite (multiple choice)",
        "train step",
        "token batches",
        "layout",
        "memory",
    ]
    for r in result["results"]:
        assert KEYS <= set(r), r
        assert r["measured"] > 0 and r["baseline"] > 0 and r["ratio"] > 0
        assert isinstance(r["met"], bool)
    assert result["results"][1]["details"]["generate_new_tokens"] == 4  # both sides generate every token
    assert result["results"][2]["details"]["scored_rows"] == 4 * 4 * 5  # items x candidates x conditions
    assert "two_copies_mb" in result["results"][6]["details"]
    batches = result["results"][4]["details"]  # the whole train set both ways, each way's padding
    assert batches["examples"] == 720 and batches["timed_batches"] == {"token budget": 3, "fixed count": 3}
    padding = batches["padding_share"]
    assert padding["token budget"]["both"] < padding["fixed count"]["both"], padding
    table = (out / "results.md").read_text()
    assert "| figure | measured | baseline | unit | ratio | target | met |" in table
    for name in names:
        assert f"| {name} |" in table


def test_preset_path_runs_on_cpu(tmp_path):
    """The GPU preset's code path, on a tiny model on the CPU (the real run needs a GPU)."""
    out = tmp_path / "preset"
    assert _job().main(["--preset", "tiny", "--repeats", "1", "--output", str(out), "--verbose"]) == 0
    rows = {r["name"]: r for r in json.loads((out / "results.json").read_text())["results"]}
    assert set(rows) == {"gpu train step", "gpu MFU", "gpu read latency", "gpu peak memory"}
    assert rows["gpu train step"]["measured"] > 0 and 0 < rows["gpu MFU"]["ratio"]


def test_smollm2_preset_runs_the_engine_figures_on_the_configured_model(tmp_path, monkeypatch):
    """`--preset smollm2` wiring, with the offline tiny model's config standing in for SmolLM2's:
    the figures run on the config's session and held-out dialog, with issue 18's targets."""
    from latentqa.config import load_config
    from latentqa.paths import OFFLINE_HELDOUT, OFFLINE_MODEL, OFFLINE_TRAIN
    from latentqa.reading import dialog_to_read
    from latentqa.session import layout_for
    from latentqa_platform import benchmarks as bm

    config = tmp_path / "stand-in.yaml"
    config.write_text(
        f"model: {{path: {OFFLINE_MODEL}, weights: random}}\npatch: {{read_layer: 1}}\n"
        f"data: {{train: {{path: {OFFLINE_TRAIN}}}, eval: {{path: {OFFLINE_HELDOUT}}}}}\n"
    )
    monkeypatch.setattr(bm, "SMOLLM2_CONFIG", config)
    job, out = _job(), tmp_path / "smollm2"
    sizes = ["--repeats", "1", "--questions", "2", "--new-tokens", "2", "--batch-size", "2"]
    argv = ["--preset", "smollm2", "--only", "early_exit", "read", *sizes, "--output", str(out)]
    assert job.main(argv) == 0
    rows = {r["name"]: r for r in json.loads((out / "results.json").read_text())["results"]}
    assert set(rows) == {"early exit", "read overhead"}
    assert rows["read overhead"]["target"] == "<= 1.05x"
    assert "(+-10%)" in rows["early exit"]["target"] and rows["early exit"]["details"]["read_layer"] == 1
    dialog, _ = bm.heldout_read(OFFLINE_HELDOUT)  # the held-out dialog is read, not the synthetic one
    read_side = layout_for(load_config(config)).read_side(dialog_to_read(dialog))
    assert rows["read overhead"]["details"]["read_tokens"] == len(read_side.ids)
    with pytest.raises(SystemExit, match="not layout"):
        job.main(["--preset", "smollm2", "--only", "layout", "--output", str(out)])
