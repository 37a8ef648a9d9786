"""jobs/train.py: Ray Data + Ray Train + MLflow over the engine, on one local Ray cluster.

One session-scoped cluster (4 logical CPUs, token auth off) serves every test: the job runs as
a separate driver (`python jobs/train.py` with RAY_ADDRESS, or `ray job submit`), as it would
against a real cluster. Runs are tiny (a few optimizer steps, batch 4) so the slow tests stay
within a few minutes on 2 cores; their results are cached and compared across strategies.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import Cluster, import_job, job_env, tail
from latentqa.config import ConfigError, load_config
from latentqa.data import DataError, DatasetSpec, load_examples
from latentqa.paths import OFFLINE_TRAIN, PROJECT_ROOT
from latentqa_platform import raydata, tracking

JOB = PROJECT_ROOT / "jobs" / "train.py"
SMOLLM2_PREPARED = Path(
    load_config(PROJECT_ROOT / "infra" / "configs" / "smollm2-135m-instruct.yaml").model.path
).exists()
STEPS, CHECKPOINT_AT = 6, 3
# Tiny runs: batch 4 per worker, a short warmup so that the loss visibly falls in 6 steps.
# The shipped decoder's reading at the end is shown by the resumed DDP run only (ddp_run).
TINY = [
    "--train.max_steps",
    str(STEPS),
    "--train.batch_size",
    "4",
    "--train.warmup_steps",
    "2",
    "--train.eval_batches",
    "2",
    "--train.eval_every",
    str(CHECKPOINT_AT),
    "--no-showcase",
]


def run_job(cluster: Cluster, out: Path, *args: str, timeout: int = 400) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(JOB), "--train.output_dir", str(out), *args],
        cwd=PROJECT_ROOT,
        env=job_env(cluster),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    history = json.loads((run_dir / "metrics.json").read_text())["history"]
    return [(h["step"], h["train/loss"]) for h in history if "train/loss" in h]  # not the step-0 eval


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


# ---------------------------------------------------------------- fast: config and data


def test_config_is_validated_before_anything_starts(tmp_path):
    job = import_job("train")
    args, config, settings, strategy = job.parse_args(["--ray.num_workers", "3", "--train.lr", "3e-5"])
    assert not args.no_showcase and job.parse_args(["--no-showcase"])[0].no_showcase
    assert (settings.ray.num_workers, settings.ray.cpus_per_worker, config.train.lr) == (3, 0.5, 3e-5)
    assert strategy.kind == "ddp" and strategy.grad_accum_steps == config.train.grad_accum
    for bad, field in [
        (["--train.lr", "fast"], "train.lr"),
        (["--ray.cpus_per_worker", "0"], "ray.cpus_per_worker"),
        (["--ray.num_wokers", "2"], "ray.num_wokers"),
        (["--strategy.kind", "zero"], "strategy"),
        (["--strategy.grad_accum_steps", "4"], "strategy.grad_accum_steps"),
    ]:
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            job.parse_args(bad)
    yaml_file = tmp_path / "job.yaml"
    yaml_file.write_text("train:\n  lr: 2.0e-4\nray:\n  checkpoint_every: 7\nmlflow:\n  experiment: sweep\n")
    _, config, settings, _ = job.parse_args(["--config", str(yaml_file), "--ray.checkpoint_every", "9"])
    assert (config.train.lr, settings.ray.checkpoint_every, settings.mlflow.experiment) == (2e-4, 9, "sweep")
    assert job.run_main(lambda: job.main(["--patch.mode", "sideways"])) == 2  # rejected before Ray is contacted


def _jsonl_copy(src: Path, dst: Path) -> Path:
    """The set with its record files as JSONL (qa.json stays JSON)."""
    dst.mkdir(parents=True)
    shutil.copy(src / "qa.json", dst / "qa.json")
    for name in ("system", "stimulus_completion", "stimulus", "control"):
        rows = json.loads((src / f"{name}.json").read_text())
        (dst / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return dst


def test_ray_data_reads_validates_and_lays_out_like_the_engine(ray_cluster, tmp_path):
    from latentqa.config import load_config
    from latentqa.session import layout_for

    raydata.connect(None)  # joins the session's cluster; ordered Ray Data, as in the job
    config = load_config()
    folder = _jsonl_copy(OFFLINE_TRAIN, tmp_path / "train")
    spec = DatasetSpec(path=folder, filter=("goal",), train_percent=0.5, seed=3)
    data = raydata.read_set(spec, "train")
    engine_count = len(load_examples(DatasetSpec(path=OFFLINE_TRAIN, filter=("goal",))))
    assert data.examples.count() == round(engine_count * 0.5)
    assert sorted(Path(p).name for p in data.files) == [
        "control.jsonl",
        "qa.json",
        "stimulus.jsonl",
        "stimulus_completion.jsonl",
        "system.jsonl",
    ]
    rows = data.examples.take_all()
    assert not any(json.loads(r["record"])["label"].startswith("goal-") for r in rows)

    # The laid-out columns rebuild exactly the engine's LaidOutExample, row for row.
    import pyarrow as pa

    laid = raydata.lay_out(data.examples, config).take_all()
    rebuilt = raydata.laid_out_examples(pa.Table.from_pylist(laid))
    layout = layout_for(config)
    assert rebuilt == [layout.example(raydata.example_of_row(r), "train") for r in rows]

    # A JSONL line of the wrong type is named by file, record and field.
    bad = folder / "control.jsonl"
    lines = bad.read_text().splitlines()
    lines[4] = json.dumps({**json.loads(lines[4]), "control_user": 42})
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(Exception) as info:
        raydata.read_set(spec, "train")
    found = raydata.data_error(info.value)
    assert found is not None and "control.jsonl: record 4: field 'control_user'" in str(found)


def test_ray_data_streams_a_training_mix_like_the_engine(ray_cluster, tmp_path):
    """The mix's sources join the train set: as many examples as the engine builds, each laid out
    as the engine lays it out (context spans included), the files hashed for the resume check;
    a bad source fails before any worker starts, named by file, record and field."""
    import pyarrow as pa

    from latentqa.mixes import mix_examples
    from latentqa.session import layout_for

    raydata.connect(None)
    mix = [
        {"kind": "yes_no", "path": str(OFFLINE_TRAIN / "system.json"), "examples": 40},
        {"kind": "context", "path": str(OFFLINE_TRAIN / "stimulus.json"), "examples": 30, "seed": 1},
    ]
    config = load_config(overrides={"data": {"mix": mix, "eval": None}})
    sets = raydata.training_sets(config, 1)
    paper = len(load_examples(config.data.train))
    assert sets.train_count == paper + 70
    rows = sets.train.take_all()
    rebuilt = raydata.laid_out_examples(pa.Table.from_pylist(rows))
    layout = layout_for(config)
    expected = [layout.example(e, "train") for e in mix_examples(config.data.mix)]
    assert all(e in rebuilt for e in expected)  # shuffled among the paper's examples
    assert str(OFFLINE_TRAIN / "system.json") in sets.train_files  # twice: as a QA set file and a source

    bad = tmp_path / "system.json"
    bad.write_text(json.dumps([{"control_user": "hi", "label": "goal-x"}]))
    config = load_config(overrides={"data": {"mix": [{"kind": "yes_no", "path": str(bad), "examples": 4}]}})
    with pytest.raises(Exception) as info:
        raydata.training_sets(config, 1)
    found = raydata.data_error(info.value)
    assert found is not None and f"{bad}: record 0: field 'system' is required" in str(found)
    missing = load_config(overrides={"data": {"mix": [{"kind": "yes_no", "path": str(tmp_path), "examples": 4}]}})
    with pytest.raises(DataError, match=r"no such file \(data.mix\[0\].path\)"):
        raydata.training_sets(missing, 1)


def test_malformed_data_fails_before_training(ray_cluster, tmp_path):
    folder = tmp_path / "train"
    shutil.copytree(OFFLINE_TRAIN, folder)
    records = json.loads((folder / "stimulus.json").read_text())
    records[3]["label"] = 7
    (folder / "stimulus.json").write_text(json.dumps(records))
    proc = run_job(ray_cluster, tmp_path / "runs", "--data.train.path", str(folder), "--train.run_name", "bad")
    assert proc.returncode == 2, tail(proc)
    assert f"{folder / 'stimulus.json'}: record 3: field 'label'" in proc.stderr, tail(proc)
    assert "TrainController" not in proc.stdout + proc.stderr  # no worker ever started
    assert [p.name for p in (tmp_path / "runs" / "bad").iterdir()] == ["console.log"]  # Ray's and MLflow's lines


# ---------------------------------------------------------------- slow: training runs


@pytest.fixture(scope="session")
def ddp_run(ray_cluster, tmp_path_factory):
    """DDP, stopped on purpose right after its first checkpoint, rerun once with another worker
    count (refused: another data order), then rerun under the same name as it started."""
    out = tmp_path_factory.mktemp("ddp")
    args = [*TINY, "--train.run_name", "ddp", "--ray.checkpoint_every", str(CHECKPOINT_AT)]
    stopped = run_job(ray_cluster, out, *args, "--ray.fail_after_step", str(CHECKPOINT_AT))
    reordered = run_job(ray_cluster, out, *args, "--ray.num_workers", "1")
    resumed = run_job(ray_cluster, out, *[a for a in args if a != "--no-showcase"])
    return {"out": out, "run_dir": out / "ddp", "stopped": stopped, "reordered": reordered, "resumed": resumed}


@pytest.fixture(scope="session")
def fsdp_run(ray_cluster, tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    # With a moving average: it changes what is evaluated and saved, not the training losses.
    proc = run_job(
        ray_cluster,
        out,
        *TINY,
        "--train.run_name",
        "fsdp",
        "--strategy.kind",
        "fsdp",
        "--train.ema_decay",
        "0.5",
        "--train.eval_every",
        "0",
        "--ray.checkpoint_every",
        "0",
        "--mlflow.enabled",
        "false",
    )
    return {"run_dir": out / "fsdp", "proc": proc}


@pytest.mark.slow
def test_resume_continues_at_the_right_step(ddp_run):
    stopped, resumed, run_dir = ddp_run["stopped"], ddp_run["resumed"], ddp_run["run_dir"]
    assert stopped.returncode == 1, tail(stopped)
    assert f"fail_after_step={CHECKPOINT_AT}" in stopped.stdout + stopped.stderr
    reordered = ddp_run["reordered"]  # another worker count: other shards, so other batches skipped
    assert reordered.returncode == 1 and "its workers changed since" in reordered.stderr, tail(reordered)
    assert resumed.returncode == 0, tail(resumed)
    assert f"checkpoint_{CHECKPOINT_AT:06d} at step {CHECKPOINT_AT} " in resumed.stdout, tail(resumed)
    assert [step for step, _ in _losses(run_dir)] == list(range(1, STEPS + 1))
    assert (run_dir / f"checkpoint_{STEPS:06d}_final" / "progress.json").exists()


# Every piece of state a resume restores is in play: sampled read layers, gradient accumulation,
# the moving average, evaluations, and epochs of 36 examples a worker in token-budget batches (2 to
# 5 examples; each window's count agreed between the 2 workers) that end mid-step.
EXACT_RESUME = [
    *TINY,
    "--train.batch_tokens",
    "560",
    "--train.max_steps",
    "32",
    "--train.epochs",
    "8",
    "--data.train.train_percent",
    "0.1",
    "--train.grad_accum",
    "2",
    "--train.ema_decay",
    "0.5",
    "--patch.min_layer",
    "0",
    "--patch.max_layer",
    "3",
    "--ray.checkpoint_every",
    "2",
    "--mlflow.enabled",
    "false",
]


def _start_job(cluster: Cluster, out: Path, run_name: str, log: Path) -> subprocess.Popen:
    """jobs/train.py in a process group of its own, its output unbuffered into `log` (a kill loses none)."""
    with log.open("w") as sink:
        return subprocess.Popen(
            [sys.executable, str(JOB), "--train.output_dir", str(out), *EXACT_RESUME, "--train.run_name", run_name],
            cwd=PROJECT_ROOT,
            # The controller takes a report every 0.2 s, not 2 s: workers reporting every other step
            # would otherwise wait for it most of the time.
            env={**job_env(cluster), "PYTHONUNBUFFERED": "1", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"},
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL the job's driver and all it started on this machine, as a preempted machine or an
    out-of-memory kill would; the cluster then stops its workers."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _kill_after_checkpoints(proc: subprocess.Popen, log: Path, run_dir: Path, started: float, delay: float) -> str:
    """Kill the job `delay` seconds after it uploaded its third checkpoint; says where. Ray Train
    keeps one report in flight, so by its third upload the controller has registered its first:
    the rerun resumes at a later step than this job did."""
    uploaded: set[str] = set()
    deadline = time.monotonic() + 300
    while len(uploaded) < 3:
        assert proc.poll() is None, f"ended before its third checkpoint:\n{log.read_text()[-6000:]}"
        assert time.monotonic() < deadline, f"no third checkpoint:\n{log.read_text()[-6000:]}"
        for progress in run_dir.glob("checkpoint_??????/progress.json"):
            with contextlib.suppress(FileNotFoundError):  # Ray removes all but the latest two
                if progress.stat().st_mtime >= started:
                    uploaded.add(progress.parent.name)
        time.sleep(0.05)
    time.sleep(delay)
    newest = max(p.name for p in run_dir.glob("checkpoint_??????"))
    assert proc.poll() is None, f"ended before the kill:\n{log.read_text()[-6000:]}"
    _kill(proc)
    return f"{delay:.2f}s after its {max(uploaded)} (newest folder: {newest})"


@pytest.mark.slow
def test_a_job_killed_three_times_and_resumed_ends_as_an_uninterrupted_one(ray_cluster, tmp_path):
    """Killed at three seeded random moments (mid-step, mid-evaluation, mid-checkpoint or while a
    report waits; the steps after the last registered checkpoint are done again) and rerun each
    time, a run ends with an uninterrupted one's adapter, bit for bit, after the same steps with the
    same losses and evaluations."""
    import safetensors.torch

    rng, landed, logs = (
        random.Random(13),
        [],
        [tmp_path / f"{run}.log" for run in ("killed-0", "killed-1", "killed-2", "last")],
    )
    whole = _start_job(ray_cluster, tmp_path, "whole", tmp_path / "whole.log")  # beside the killed ones: room for both
    jobs = [whole]
    try:
        for log in logs[:-1]:
            started = time.time()
            jobs.append(_start_job(ray_cluster, tmp_path, "killed", log))
            landed.append(_kill_after_checkpoints(jobs[-1], log, tmp_path / "killed", started, rng.uniform(0, 0.5)))
        jobs.append(_start_job(ray_cluster, tmp_path, "killed", logs[-1]))
        for proc, log in [(whole, tmp_path / "whole.log"), (jobs[-1], logs[-1])]:
            assert proc.wait(timeout=400) == 0, log.read_text()[-6000:]
    finally:
        for proc in jobs:
            _kill(proc)
    resumed_at = [int(step) for log in logs for step in re.findall(r"resumed from \S+ at step (\d+)", log.read_text())]
    print(f"killed {'; '.join(landed)}; the reruns resumed at steps {resumed_at}")
    assert len(resumed_at) == 3 and resumed_at == sorted(set(resumed_at)), (landed, resumed_at)

    histories = [json.loads((tmp_path / run / "metrics.json").read_text())["history"] for run in ("whole", "killed")]
    untimed = [[{k: v for k, v in h.items() if not k.endswith("_per_s")} for h in history] for history in histories]
    assert [h["step"] for h in untimed[1]] == list(range(33))  # step 0: the first evaluation
    assert untimed[1] == untimed[0]  # every step's loss, learning rate and evaluation, exactly
    adapters = [
        safetensors.torch.load_file(tmp_path / run / "decoder" / "adapter_model.safetensors")
        for run in ("whole", "killed")
    ]
    assert adapters[1].keys() == adapters[0].keys()
    differing = [k for k in adapters[0] if not torch.equal(adapters[1][k], adapters[0][k])]
    assert not differing, differing


@pytest.mark.slow
def test_ddp_trains_and_saves_a_peft_decoder(ddp_run):
    import safetensors.torch

    assert ddp_run["resumed"].returncode == 0, tail(ddp_run["resumed"])
    losses = [loss for _, loss in _losses(ddp_run["run_dir"])]
    assert losses[-1] < losses[0] - 0.05, losses
    decoder = ddp_run["run_dir"] / "decoder"
    assert json.loads((decoder / "adapter_config.json").read_text())["peft_type"] == "LORA"
    keys = safetensors.torch.load_file(decoder / "adapter_model.safetensors")
    assert keys and all("lora_" in k for k in keys)
    # The held-out dialog is read with the new decoder and the answers printed.
    out = ddp_run["resumed"].stdout
    assert "held-out dialog:" in out and out.count("  A: ") == 2, tail(ddp_run["resumed"])
    assert f"step {STEPS}/{STEPS}: final/loss_true=" in out, tail(ddp_run["resumed"])
    # The console holds what a person reads; Ray's, MLflow's and the libraries' lines are in console.log.
    console = out + ddp_run["resumed"].stderr
    for noise in ("RayTrainWorker", "Reporting training result", "Downloading artifacts", "Warning", "INFO"):
        assert noise not in console, f"{noise!r} on the console:\n{tail(ddp_run['resumed'])}"
    assert len(console.splitlines()) < 60 + (40 if SMOLLM2_PREPARED else 0), tail(ddp_run["resumed"])
    assert "ray.data" in (ddp_run["run_dir"] / "console.log").read_text()
    # On the offline default the README's first command ends with the shipped SmolLM2 decoder reading.
    if SMOLLM2_PREPARED:
        assert "The offline target is a random network" in out, tail(ddp_run["resumed"])
        assert out.count("decoder, reading the user's message and the reply alone:") == 3, tail(ddp_run["resumed"])
        shipped = "latentqa-decoder-smollm2-135m-instruct-q4-1/1 (its controls: latentqa-control-pirate/1)"
        assert f"the shipped SmolLM2 decoder: {shipped}" in out, tail(ddp_run["resumed"])
    else:
        assert "run infra/setup.sh with PyPI reachable" in out


@pytest.mark.slow
def test_mlflow_run_and_registered_model(ddp_run, tmp_path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{ddp_run['out'] / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("latentqa")
    assert experiment.artifact_location == (ddp_run["out"] / "mlartifacts").as_uri()
    # the stopped run and its resume: one run (beside it, the shipped SmolLM2 decoder's registration)
    [run] = client.search_runs([experiment.experiment_id], f"tags.`{tracking.RUN_NAME_TAG}` = 'ddp'")
    assert run.info.status == "FINISHED"
    params, tags = run.data.params, run.data.tags
    assert params["train.max_steps"] == str(STEPS) and params["strategy.kind"] == "ddp"
    assert params["lora.target_modules"].startswith("[")
    assert len(params["data.sha256.train/stimulus.json"]) == 64
    assert tags["latentqa.run_name"] == "ddp" and len(tags["latentqa.code_sha256"]) == 16
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(1, STEPS + 1))  # each step once, across the resume
    for key in (
        "train/lr",
        "train/tokens_per_s",
        "train/label_tokens_per_s",
        "eval/activation_gain",
        "final/loss_true",
    ):
        assert key in run.data.metrics
    assert run.data.metrics["train/tokens_per_s"] > run.data.metrics["train/label_tokens_per_s"] > 0
    assert {a.path for a in client.list_artifacts(run.info.run_id, "decoder")} == {
        "decoder/adapter_config.json",
        "decoder/adapter_model.safetensors",
        "decoder/latentqa_target.json",
    }
    assert "loss_curves.png" in {a.path for a in client.list_artifacts(run.info.run_id)}
    [version] = client.search_model_versions("name='latentqa-decoder-tiny-llama'")
    assert version.run_id == run.info.run_id
    patch = json.loads((ddp_run["run_dir"] / "config.json").read_text())["patch"]
    assert version.tags["read_layer"] == str(patch["read_layer"])
    assert version.tags["write_layer"] == str(patch["write_layer"])
    # The registered version resolves back to the very adapter the run saved.
    registered = tracking.resolve_adapter(
        f"models:/latentqa-decoder-tiny-llama/{version.version}", client.tracking_uri, tmp_path
    )
    saved = ddp_run["run_dir"] / "decoder" / "adapter_model.safetensors"
    assert (registered / "adapter_model.safetensors").read_bytes() == saved.read_bytes()
    with pytest.raises(FileNotFoundError, match="models:/latentqa-decoder-tiny-llama/99"):
        tracking.resolve_adapter("models:/latentqa-decoder-tiny-llama/99", client.tracking_uri, tmp_path)
    if SMOLLM2_PREPARED:  # the shipped control, registered with the shipped decoder it steers through
        from latentqa.paths import SHIPPED_CONTROLS
        from latentqa_platform.adapters import KIND_TAG

        [control] = client.search_model_versions("name='latentqa-control-pirate'")
        assert control.tags[KIND_TAG] == "control" and control.tags["source"] == "shipped"
        assert control.tags["decoder"] == "models:/latentqa-decoder-smollm2-135m-instruct-q4-1/1"
        folder = tracking.resolve_adapter("models:/latentqa-control-pirate/1", client.tracking_uri, tmp_path / "c")
        shipped = SHIPPED_CONTROLS / "smollm2-135m-instruct" / "pirate" / "adapter_model.safetensors"
        assert (folder / "adapter_model.safetensors").read_bytes() == shipped.read_bytes()


@pytest.mark.slow
def test_every_checkpoint_is_a_logged_model_at_its_step(ddp_run, tmp_path):
    """Each checkpoint (before the stop and after the resume) is a logged model of the run at its
    step, linked to that step's metrics; the final one is the registered version; any one resolves
    to the adapter Ray saved, so it can be evaluated or registered."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{ddp_run['out'] / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("latentqa")
    [run] = client.search_runs([experiment.experiment_id], f"tags.`{tracking.RUN_NAME_TAG}` = 'ddp'")
    models = {
        m.name: m for m in client.search_logged_models([experiment.experiment_id]) if m.source_run_id == run.info.run_id
    }
    middle, final = f"checkpoint_{CHECKPOINT_AT:06d}", f"checkpoint_{STEPS:06d}_final"
    assert set(models) == {middle, final}
    assert {o.model_id: o.step for o in run.outputs.model_outputs} == {
        models[middle].model_id: CHECKPOINT_AT,
        models[final].model_id: STEPS,
    }
    linked = {m.key: m for m in models[middle].metrics}
    assert {"train/loss", "eval/loss_true", "eval/activation_gain"} <= set(linked)
    assert {m.step for m in linked.values()} == {CHECKPOINT_AT}
    [loss] = [m.value for m in client.get_metric_history(run.info.run_id, "eval/loss_true") if m.step == CHECKPOINT_AT][
        :1
    ]
    assert linked["eval/loss_true"].value == loss
    assert "final/loss_true" in {m.key for m in models[final].metrics}
    [version] = client.search_model_versions("name='latentqa-decoder-tiny-llama'")
    assert version.source == f"models:/{models[final].model_id}"
    adapter = tracking.resolve_adapter(f"models:/{models[middle].model_id}", client.tracking_uri, tmp_path)
    saved = ddp_run["run_dir"] / middle / "adapter" / "adapter_model.safetensors"
    assert (adapter / "adapter_model.safetensors").read_bytes() == saved.read_bytes()
    assert (
        str(json.loads((adapter.parent / "config.json").read_text())["patch"]["read_layer"])
        == run.data.params["patch.read_layer"]
    )


@pytest.mark.slow
def test_a_checkpoint_is_evaluated_at_its_step(ray_cluster, ddp_run):
    """`jobs/evaluate.py --decoder models:/<checkpoint's model id>`: the suite's metrics go to the
    training run at the checkpoint's step, linked to that checkpoint, its report beside them."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{ddp_run['out'] / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("latentqa")
    [run] = client.search_runs([experiment.experiment_id], f"tags.`{tracking.RUN_NAME_TAG}` = 'ddp'")
    name = f"checkpoint_{CHECKPOINT_AT:06d}"
    [model] = [m for m in client.search_logged_models([experiment.experiment_id]) if m.name == name]
    proc = subprocess.run(
        [
            sys.executable,
            str(PROJECT_ROOT / "jobs" / "evaluate.py"),
            "--decoder",
            f"models:/{model.model_id}",
            "--train.output_dir",
            str(ddp_run["out"]),
            "--suite",
            "loss",
        ],
        cwd=PROJECT_ROOT,
        env=job_env(ray_cluster),
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, tail(proc)
    result = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    linked = {m.key: m for m in client.get_logged_model(model.model_id).metrics}
    assert linked["heldout/loss_true"].step == CHECKPOINT_AT
    assert linked["heldout/loss_true"].value == pytest.approx(result["loss_true"])
    assert not any(key.startswith(("choice/", "reading/", "layer_map/")) for key in result)  # only the task asked for
    folder = f"evaluation/{name}-{model.model_id}"
    assert f"{folder}/results.json" in {a.path for a in client.list_artifacts(run.info.run_id, folder)}


@pytest.mark.slow
def test_mlflow_ui_lists_the_checkpoints_of_a_run(ddp_run, tmp_path):
    """The MLflow UI, served by a real `mlflow server` over the run's store and read in headless
    Chromium, lists each checkpoint as a logged model of the run at its step, and the registered
    version. Screenshots go to $LATENTQA_SCREENSHOTS (docs/figures/mlflow-*.png) or tmp_path."""
    import os

    from conftest import browser_page, mlflow_server

    with browser_page() as page, mlflow_server(ddp_run["out"] / "mlflow.db") as url:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(url)
        experiment = client.get_experiment_by_name("latentqa")
        [run] = client.search_runs([experiment.experiment_id], f"tags.`{tracking.RUN_NAME_TAG}` = 'ddp'")
        shots = Path(os.environ.get("LATENTQA_SCREENSHOTS", tmp_path))
        page.goto(
            f"{url}/#/experiments/{experiment.experiment_id}/runs/{run.info.run_id}?workflowType=machine_learning"
        )
        page.get_by_text("Logged models (2)").wait_for(timeout=60_000)
        [loss] = [
            m.value for m in client.get_metric_history(run.info.run_id, "eval/loss_true") if m.step == CHECKPOINT_AT
        ][:1]

        def logged_model_rows() -> dict[str, list[str]]:  # step -> the row's cells: type, step, model, ..., metrics
            texts = page.get_by_role("row").all_inner_texts()
            return {cells[1]: cells for cells in (t.split("\n") for t in texts) if cells[0] == "Output"}

        deadline = time.monotonic() + 60  # the metric columns fill in after the rows
        while (
            loss not in [_number(c) for c in logged_model_rows().get(str(CHECKPOINT_AT), [])]
            and time.monotonic() < deadline
        ):
            time.sleep(0.5)
        rows = logged_model_rows()
        assert set(rows) == {str(CHECKPOINT_AT), str(STEPS)}, rows
        assert f"checkpoint_{CHECKPOINT_AT:06d}" in rows[str(CHECKPOINT_AT)]
        assert loss in [_number(c) for c in rows[str(CHECKPOINT_AT)]], rows  # its linked eval/loss_true, in a column
        assert {f"checkpoint_{STEPS:06d}_final", "latentqa-decoder-tiny-llama"} <= set(rows[str(STEPS)])
        page.get_by_text("Logged models (2)").scroll_into_view_if_needed()
        page.screenshot(path=shots / "mlflow-run-checkpoints.png")
        page.goto(f"{url}/#/experiments/{experiment.experiment_id}/models?workflowType=machine_learning")
        page.get_by_text(f"checkpoint_{CHECKPOINT_AT:06d}", exact=True).first.wait_for(timeout=60_000)
        assert page.get_by_text(f"checkpoint_{STEPS:06d}_final", exact=True).count() >= 1
        page.screenshot(path=shots / "mlflow-models.png")


@pytest.mark.slow
def test_fsdp_matches_ddp(ddp_run, fsdp_run):
    """Same seed, same data: FSDP2's losses equal the (stopped and resumed) DDP run's, so the
    resume continued with the very batches, weights, optimizer state and dropout it stopped at."""
    import safetensors.torch

    assert fsdp_run["proc"].returncode == 0, tail(fsdp_run["proc"])
    ddp, fsdp = _losses(ddp_run["run_dir"]), _losses(fsdp_run["run_dir"])
    assert fsdp[0] == pytest.approx(ddp[0], abs=1e-5)
    assert [loss for _, loss in fsdp] == pytest.approx([loss for _, loss in ddp], abs=1e-4)
    # The same trajectory, but FSDP's decoder is the average of its weights: it must differ.
    ddp_adapter, fsdp_adapter = (
        safetensors.torch.load_file(run["run_dir"] / "decoder" / "adapter_model.safetensors")
        for run in (ddp_run, fsdp_run)
    )
    assert ddp_adapter.keys() == fsdp_adapter.keys()
    assert max(float((ddp_adapter[k] - fsdp_adapter[k]).abs().max()) for k in ddp_adapter) > 2e-4  # fp noise: ~1e-7


@pytest.mark.slow
def test_ray_job_submit_runs_deepspeed_zero3_end_to_end(ray_cluster, ddp_run, tmp_path):
    """`ray job submit --working-dir .` against the running cluster, with ZeRO-3 (slow on CPU:
    two steps, both still in the warmup, so their learning rates equal the 6-step DDP run's)."""
    ray_cli = Path(sys.executable).parent / "ray"
    out = tmp_path / "runs"
    command = [
        str(ray_cli),
        "job",
        "submit",
        "--address",
        ray_cluster.dashboard,
        "--working-dir",
        str(PROJECT_ROOT),
        "--",
        sys.executable,
        "jobs/train.py",
        "--train.output_dir",
        str(out),
        *TINY,
        "--train.run_name",
        "zero3",
        "--strategy.kind",
        "deepspeed",
        "--strategy.zero_stage",
        "3",
        "--ray.checkpoint_every",
        "0",
        "--train.max_steps",
        "2",
        "--train.eval_every",
        "0",
    ]
    for _ in range(3):  # the dashboard's job agent may still be starting: it says to retry
        proc = subprocess.run(
            command, cwd=PROJECT_ROOT, env=job_env(ray_cluster), capture_output=True, text=True, timeout=500
        )
        if "No available agent to submit job" not in proc.stderr:
            break
        time.sleep(10)
    assert proc.returncode == 0, tail(proc)
    assert "succeeded" in proc.stdout + proc.stderr
    assert (out / "zero3" / "decoder" / "adapter_model.safetensors").exists()
    assert "held-out dialog:" in proc.stdout
    zero3, ddp = _losses(out / "zero3"), _losses(ddp_run["run_dir"])
    assert zero3[0] == pytest.approx(ddp[0], abs=1e-5)
    assert zero3[1] == pytest.approx(ddp[1], abs=1e-4)


@pytest.mark.slow
def test_sweep_trains_one_run_per_value_and_picks_the_largest_gain(ray_cluster, tmp_path):
    command = [
        sys.executable,
        "jobs/sweep.py",
        "--field",
        "patch.read_layer",
        "--values",
        "0",
        "1",
        "--name",
        "layers",
        "--train.output_dir",
        str(tmp_path),
        *TINY,
        "--train.max_steps",
        "2",
        "--train.eval_every",
        "0",
        "--ray.checkpoint_every",
        "0",
        "--mlflow.enabled",
        "false",
    ]
    proc = subprocess.run(
        command, cwd=PROJECT_ROOT, env=job_env(ray_cluster), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, tail(proc)
    results = json.loads((tmp_path / "layers" / "sweep.json").read_text())
    assert [(r["value"], r["run_name"]) for r in results] == [("0", "layers-0"), ("1", "layers-1")]
    for r in results:  # each value's own run, evaluated at its end
        final = json.loads((tmp_path / r["run_name"] / "metrics.json").read_text())["final"]
        assert r["eval/activation_gain"] == final["eval/activation_gain"]
        assert json.loads((tmp_path / r["run_name"] / "config.json").read_text())["patch"]["read_layer"] == int(
            r["value"]
        )
    best = max(results, key=lambda r: r["eval/activation_gain"])
    assert f"best patch.read_layer: {best['value']} " in proc.stdout
    assert (tmp_path / "layers" / "sweep.png").stat().st_size > 0
