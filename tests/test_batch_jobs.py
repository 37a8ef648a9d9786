"""jobs/read.py, jobs/control.py and jobs/evaluate.py under `ray job submit` against the session's
cluster, with the tiny decoder trained and registered in this session (tests/trained_decoder.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from trained_decoder import DECODER_MODEL, trained_decoder

from conftest import import_job, job_env, tail
from latentqa.paths import CONTROLS_DIR, PROJECT_ROOT

pytestmark = pytest.mark.slow
DIALOGS = [
    [{"role": "user", "content": "Please talk like a pirate from now on."}],
    [{"role": "system", "content": "You are a cheerful baker."}, {"role": "user", "content": "What should I bake?"}],
    [
        {"role": "user", "content": "Always mention the Eiffel Tower."},
        {"role": "assistant", "content": "Of course!"},
        {"role": "user", "content": "What should I do this weekend?"},
    ],
]


@pytest.fixture(scope="session")
def decoder(tmp_path_factory):
    return trained_decoder(tmp_path_factory.getbasetemp() / "trained-decoder")


def submit(cluster, decoder, job: str, *args: str) -> subprocess.CompletedProcess:
    """`ray job submit -- python PROJECT/jobs/<job> ...` with the session's MLflow store.

    No `--working-dir`: the project is installed in the cluster's Python, and resubmitting an
    identical working-dir package lets Ray drop it from the GCS while a later job still needs it
    ("Failed to download runtime_env file package"), which these repeated submissions would hit."""
    command = [
        str(Path(sys.executable).parent / "ray"),
        "job",
        "submit",
        "--address",
        cluster.dashboard,
        "--",
        sys.executable,
        str(PROJECT_ROOT / "jobs" / job),
        "--mlflow.tracking_uri",
        decoder.tracking_uri,
        "--mlflow.artifact_location",
        decoder.artifact_location,
        "--train.output_dir",
        str(decoder.root / "job-runs"),
        *args,
    ]
    return subprocess.run(command, cwd=PROJECT_ROOT, env=job_env(cluster), capture_output=True, text=True, timeout=500)


def test_read_job_writes_shards_and_resumes_by_shard(ray_cluster, decoder, tmp_path, capsys):
    source = tmp_path / "dialogs.jsonl"
    source.write_text("".join(json.dumps({"id": f"d{i}", "messages": d}) + "\n" for i, d in enumerate(DIALOGS * 2)))
    out = tmp_path / "answers"
    args = [
        "--input",
        str(source),
        "--output",
        str(out),
        "--decoder",
        decoder.registry_uri,
        "--shard-size",
        "2",
        "--question",
        "What persona will the assistant adopt?",
        "--max-new-tokens",
        "6",
    ]
    first = submit(ray_cluster, decoder, "read.py", *args)
    assert first.returncode == 0, tail(first)
    # The job's console: its own lines; Ray's, MLflow's and the libraries' in the log it names.
    assert f"Ray's, MLflow's and the libraries' messages: {out / 'console.log'}" in first.stdout, tail(first)
    for noise in ("ShardReader pid=", "Warning", "streaming_executor"):
        assert noise not in first.stdout, f"{noise!r} on the console:\n{tail(first)}"
    assert "ray.data" in (out / "console.log").read_text()
    # The alias is resolved once, on the driver: every worker, and a rerun, read with that version.
    assert json.loads((out / "job.json").read_text())["decoder"] == f"models:/{DECODER_MODEL}/{decoder.version}"
    shards = sorted(out.glob("shard-*.jsonl"))
    assert [s.name for s in shards] == ["shard-00000.jsonl", "shard-00001.jsonl", "shard-00002.jsonl"]
    rows = [json.loads(line) for s in shards for line in s.read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"d{i}" for i in range(6)]
    assert all(set(r["answers"]) == {"What persona will the assistant adopt?"} for r in rows)
    # A lost shard is redone on rerun; the finished ones are left alone.
    kept = {s.name: s.stat().st_mtime_ns for s in shards if s.name != "shard-00001.jsonl"}
    (out / "shard-00001.jsonl").unlink()
    again = submit(ray_cluster, decoder, "read.py", *args)
    assert again.returncode == 0, tail(again)
    assert "1 to read, 2 already done" in again.stdout, tail(again)
    assert {s.name: s.stat().st_mtime_ns for s in out.glob("shard-*.jsonl") if s.name in kept} == kept
    assert [json.loads(line)["id"] for line in (out / "shard-00001.jsonl").read_text().splitlines()] == ["d2", "d3"]
    # Checked before Ray is contacted (so in process here): another job against the same folder
    # is refused, and a bad line is named.
    job = import_job("read")
    assert job.run_main(lambda: job.main([*args[:-2], "--max-new-tokens", "9"])) == 2
    assert "holds the shards of a different job" in capsys.readouterr().err
    source.write_text(source.read_text() + json.dumps({"messages": [{"role": "user"}]}) + "\n")
    assert job.run_main(lambda: job.main([*args[:2], "--output", str(tmp_path / "bad"), *args[4:]])) == 2
    assert "dialogs.jsonl: line 7: field messages.0.content: Field required" in capsys.readouterr().err
    assert not (tmp_path / "bad" / "job.json").exists()


def test_control_job_registers_an_adapter_and_logs_its_steering_figures(ray_cluster, decoder):
    from mlflow.tracking import MlflowClient

    proc = submit(
        ray_cluster,
        decoder,
        "control.py",
        "--control",
        str(CONTROLS_DIR / "veganism.json"),
        "--decoder",
        decoder.registry_uri,
        "--steer.steps",
        "20",
        "--steer.lr",
        "3e-3",
        "--heldout",
        "4",
        "--show",
        "2",
        "--baselines",
        # a random tiny target repeats itself whatever steers it: the fluency bounds are for real models
        "--steer.max_repeated_trigrams",
        "null",
        "--steer.max_perplexity_ratio",
        "null",
    )
    assert proc.returncode == 0, tail(proc)
    assert "registered control adapter latentqa-control-veganism/" in proc.stdout, tail(proc)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"prompt"')]
    assert len(rows) == 2 and all(set(r) == {"prompt", "target", "steered"} for r in rows)
    assert "| steered |" in proc.stdout and "| prompted |" in proc.stdout, tail(proc)
    client = MlflowClient(decoder.tracking_uri)
    [version] = client.search_model_versions("name='latentqa-control-veganism'")
    pinned = f"models:/{DECODER_MODEL}/{decoder.version}"  # the alias, resolved once for the whole job
    assert version.tags["latentqa.kind"] == "control" and version.tags["decoder"] == pinned
    history = client.get_metric_history(version.run_id, "control/loss")
    assert sorted(m.step for m in history) == list(range(1, 21))
    metrics = client.get_run(version.run_id).data.metrics
    for condition in ("target", "prompted", "vector-x1", "steered"):
        assert 0 <= metrics[f"steering/{condition}/behaviour_rate"] <= 1
        assert metrics[f"steering/{condition}/perplexity_ratio"] > 0
    report = {a.path for a in client.list_artifacts(version.run_id, "steering")}
    assert report == {"steering/steering.json", "steering/steering.md", "steering/steering.png"}


def test_control_job_refuses_a_steer_layers_that_reads_elsewhere(decoder, capsys):
    """Checked before Ray is contacted (so in process here): the job names both blocks."""
    job = import_job("control")
    trained_at = json.loads((decoder.run_dir / "config.json").read_text())["patch"]["read_layer"]
    args = ["--control", str(CONTROLS_DIR / "pirate.json"), "--decoder", decoder.registry_uri]
    args += ["--mlflow.tracking_uri", decoder.tracking_uri, "--steer.layers", str(trained_at + 2)]
    assert job.run_main(lambda: job.main(args)) == 2
    assert f"reads the control at block {trained_at + 1}, but the decoder reads block {trained_at}" in (
        capsys.readouterr().err
    )


def test_evaluate_job_logs_to_the_decoders_run(ray_cluster, decoder):
    from mlflow.tracking import MlflowClient

    proc = submit(
        ray_cluster,
        decoder,
        "evaluate.py",
        "--decoder",
        decoder.registry_uri,
        "--layers",
        "0",
        "1",
        "--map-items",
        "4",
        "--max-new-tokens",
        "4",
    )
    assert proc.returncode == 0, tail(proc)
    result = json.loads([line for line in proc.stdout.splitlines() if line.startswith('{"loss_true"')][0])
    assert result["activation_gain"] == pytest.approx(result["loss_shuffled"] - result["loss_true"])
    metrics = MlflowClient(decoder.tracking_uri).get_run(decoder.run_id).data.metrics
    assert metrics["heldout/loss_true"] == pytest.approx(result["loss_true"])
    assert {"heldout/loss_shuffled", "heldout/loss_none", "heldout/activation_gain"} <= set(metrics)
    # the suite's identification figures, for both kinds of held-out dialog
    assert metrics["heldout/choice/system/true_accuracy"] == pytest.approx(result["choice/system/true_accuracy"])
    assert {
        f"heldout/{task}/reply/{c}_accuracy"
        for task in ("choice", "reading")
        for c in ("true", "shuffled", "none", "text", "prompting")
    } <= set(metrics)
    assert {"heldout/layer_map/0/true_accuracy", "heldout/layer_map/1/shuffled_accuracy"} <= set(metrics)
    # the report as artifacts of the decoder's run: results, the per-item table, the figures
    from latentqa_platform.tracking import logged_model_id

    client = MlflowClient(decoder.tracking_uri)
    model = client.get_logged_model(logged_model_id(f"models:/{DECODER_MODEL}/{decoder.version}", client))
    folder = f"evaluation/adapter_model-{model.model_id}"  # per evaluated model: two never overwrite each other
    names = ("results.json", "per_item.jsonl", "choice_accuracy.png", "layer_map.png")
    assert {f"{folder}/{name}" for name in names} <= {a.path for a in client.list_artifacts(decoder.run_id, folder)}
    # the metrics are also the registered logged model's, so the UI lists them beside it
    assert {m.key: m.value for m in model.metrics}["heldout/loss_true"] == pytest.approx(result["loss_true"])


def test_evaluate_job_measures_a_control_beside_its_baselines(ray_cluster, decoder, offline_session, tmp_path, capsys):
    """`--steering FILE --control models:/...`: the steering evaluation on a worker, logged to the
    run that registered the control; the two flags come together or not at all."""
    from mlflow.tracking import MlflowClient

    from latentqa.data import read_prompt_set
    from latentqa.paths import STEER_PROMPTS
    from latentqa.steering import load_control, steer
    from latentqa_platform import tracking
    from latentqa_platform.adapters import KIND_TAG
    from latentqa_platform.settings import MlflowSettings

    control_file = CONTROLS_DIR / "veganism.json"
    adapter = tmp_path / "control"
    prompts, _ = read_prompt_set(STEER_PROMPTS)
    cfg = offline_session.config.steer.model_copy(update={"steps": 2})
    steer(offline_session, load_control(control_file).qa, prompts[:4], adapter, cfg)
    offline_session.model.adapters.remove_control()
    mlflow = MlflowSettings(**decoder.mlflow_settings())
    registered = tracking.register_shipped(
        mlflow, decoder.root, adapter, offline_session.config, "latentqa-control-evaluated", {KIND_TAG: "control"}
    )

    args = ("--decoder", decoder.registry_uri, "--steering", str(control_file), "--control", f"models:/{registered}")
    proc = submit(ray_cluster, decoder, "evaluate.py", *args, "--heldout", "3")
    assert proc.returncode == 0, tail(proc)
    result = json.loads([line for line in proc.stdout.splitlines() if line.startswith('{"target/')][0])
    run_id = proc.stdout.split("mlflow: logged to run ")[1].split()[0]
    client = MlflowClient(decoder.tracking_uri)
    [version] = client.search_model_versions("name='latentqa-control-evaluated'")
    assert run_id == version.run_id
    metrics = client.get_run(run_id).data.metrics
    for condition in ("target", "prompted", "vector-x1", "steered"):
        assert metrics[f"steering/{condition}/behaviour_rate"] == pytest.approx(result[f"{condition}/behaviour_rate"])
        assert metrics[f"steering/{condition}/perplexity_ratio"] > 0
    [folder] = [a.path for a in client.list_artifacts(run_id, "evaluation")]  # evaluation/<model>-<id>
    assert {a.path.rsplit("/", 1)[1] for a in client.list_artifacts(run_id, folder)} == {
        "steering.json",
        "steering.md",
        "steering.png",
    }

    job = import_job("evaluate")
    assert job.run_main(lambda: job.main(["--decoder", decoder.registry_uri, "--steering", str(control_file)])) == 2
    assert "give both --steering CONTROL_FILE and --control ADAPTER" in capsys.readouterr().err
