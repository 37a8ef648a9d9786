"""jobs/train.py on a Ray cluster of two nodes on this machine: a head and a second `ray start`, each
with its own custom resource and its own loopback address, so that Ray sees two nodes as it would
two machines. The job spreads its two workers over them (`ray.placement_strategy SPREAD`) and
checkpoints to a folder both nodes see; the worker on the second node is killed mid-run, and Ray
Train restarts the worker group from the latest registered checkpoint (`ray.max_failures`).

The cluster is this module's own, beside the session's `ray_cluster`: its processes are those of
the two `ray start --block` sessions it starts, and only those are ended (`ray stop` would end every
Ray process on the machine, the session's cluster too). tests/test_infra.py checks the KubeRay
manifests against the same settings (TWO_NODE_SETTINGS)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from conftest import Cluster, job_env
from latentqa.config import ConfigError
from latentqa.paths import PROJECT_ROOT
from latentqa_platform.settings import load_job_config

JOB = PROJECT_ROOT / "jobs" / "train.py"
RAY = Path(sys.executable).parent / "ray"
# Two loopback addresses: Ray maps 127.0.0.1 itself to the machine's routable address.
NODES = {"node_head": "127.0.0.2", "node_b": "127.0.0.3"}
STEPS = 8
# How the job spreads over the nodes and outlives a lost worker; test_infra asks the same of the
# jobs that the KubeRay manifests run.
TWO_NODE_SETTINGS = {"placement_strategy": "SPREAD", "max_failures": 1, "checkpoint_every": 2}

# Every port a node opens, chosen here: two nodes on one machine would collide on Ray's defaults.
NODE_PORTS = (
    "--node-manager-port",
    "--object-manager-port",
    "--metrics-export-port",
    "--runtime-env-agent-port",
    "--dashboard-agent-listen-port",
    "--dashboard-agent-grpc-port",
)
HEAD_PORTS = ("--port", "--dashboard-port", "--ray-client-server-port")


def _free_ports(count: int) -> list[int]:
    """Distinct free ports (each socket stays bound until all are chosen)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


def _ray_start(temp_dir: Path, log: Path, resource: str, ports: dict[str, int], *role: str) -> subprocess.Popen:
    """`ray start --block` of the node named by its custom resource, in a session of its own."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    command = [
        str(RAY), "start", "--block", *role, "--node-ip-address", NODES[resource], "--num-cpus", "2",
        "--resources", json.dumps({resource: 1}), "--object-store-memory", str(256 * 2**20),
        "--temp-dir", str(temp_dir), "--disable-usage-stats",
        *[part for flag, port in ports.items() for part in (flag, str(port))],
    ]  # fmt: skip
    with log.open("w") as sink:
        return subprocess.Popen(
            command, env={**env, "RAY_AUTH_MODE": "disabled"}, stdout=sink, stderr=sink, start_new_session=True
        )


def _end_session(process: subprocess.Popen) -> None:
    """Kill a `ray start --block` and every process of its session: its node's daemons and workers
    (which have process groups of their own, but not sessions). A test cluster needs no goodbyes."""
    process.kill()
    process.wait()
    # Until none is left: a raylet may start a worker while the others are being killed.
    while leftovers := [p for p in psutil.process_iter() if _in_session(p, process.pid)]:
        for leftover in leftovers:
            with contextlib.suppress(psutil.NoSuchProcess):
                leftover.kill()
        psutil.wait_procs(leftovers, timeout=5)


def _in_session(process: psutil.Process, session: int) -> bool:
    with contextlib.suppress(ProcessLookupError, psutil.NoSuchProcess):
        return os.getsid(process.pid) == session and process.status() != psutil.STATUS_ZOMBIE
    return False


def _alive_nodes() -> dict[str, str]:
    """Custom resource -> node id of the cluster's alive nodes (none while the dashboard starts)."""
    from ray.util.state import list_nodes
    from ray.util.state.exception import RayStateApiException

    try:
        nodes = list_nodes(filters=[("state", "=", "ALIVE")], raise_on_missing_output=False)
    except RayStateApiException:
        return {}
    return {name: node.node_id for node in nodes for name in NODES if name in node.resources_total}


def _wait_for(nodes: set[str], processes: list[subprocess.Popen], logs: Path) -> dict[str, str]:
    deadline = time.monotonic() + 120
    while (alive := _alive_nodes()).keys() != nodes:
        tails = "\n".join(f"{log.name}:\n{log.read_text()[-3000:]}" for log in logs.glob("*.log"))
        assert all(p.poll() is None for p in processes), f"a `ray start` ended:\n{tails}"
        assert time.monotonic() < deadline, f"nodes {sorted(alive)} of {sorted(nodes)} after 120 s:\n{tails}"
        time.sleep(1)
    return alive


@contextlib.contextmanager
def two_nodes(logs: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Cluster, dict[str, str]]]:
    """The cluster and its node ids by custom resource; `ray start`'s output in `logs`. Both nodes
    are ended on exit. Ray's state API reads RAY_API_SERVER_ADDRESS before its `address` argument
    (and RAY_ADDRESS, which may name the session's cluster): set here, it points at this cluster."""
    with (
        # Ray's temp dirs hold its sockets, whose paths must stay short: not under tmp_path.
        tempfile.TemporaryDirectory(prefix="ray2n-", ignore_cleanup_errors=True) as temp_dirs,
        contextlib.ExitStack() as stack,
    ):
        (head, second), started = NODES, []
        ports = dict(zip(HEAD_PORTS + NODE_PORTS, _free_ports(len(HEAD_PORTS + NODE_PORTS))))
        head_address = f"{NODES[head]}:{ports['--port']}"
        dashboard = f"http://{NODES[head]}:{ports['--dashboard-port']}"
        monkeypatch.setenv("RAY_API_SERVER_ADDRESS", dashboard)
        for name, node_ports, role in [
            (head, ports, ["--head", "--dashboard-host", NODES[head], "--include-dashboard", "true"]),
            (second, dict(zip(NODE_PORTS, _free_ports(len(NODE_PORTS)))), ["--address", head_address]),
        ]:
            started.append(_ray_start(Path(temp_dirs) / name, logs / f"{name}.log", name, node_ports, *role))
            stack.callback(_end_session, started[-1])
            alive = _wait_for({head, name}, started, logs)
        yield Cluster(head_address, dashboard), alive


def _train_workers(state: str = "ALIVE") -> list:
    from ray.util.state import list_actors

    return list_actors(
        filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", state)],
        detail=True,
        raise_on_missing_output=False,
    )


def _latest_checkpoint(run_storage: Path) -> str | None:
    """The checkpoint Ray Train has registered last, which a restart resumes from."""
    with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):  # not yet, or being rewritten
        snapshot = json.loads((run_storage / "checkpoint_manager_snapshot.json").read_text())
        return (snapshot.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
    return None


def _still_running(job: subprocess.Popen, log: Path, deadline: float, waiting_for: str) -> None:
    assert job.poll() is None, f"the job ended before {waiting_for}:\n{log.read_text()[-6000:]}"
    assert time.monotonic() < deadline, f"no {waiting_for} in time:\n{log.read_text()[-6000:]}"
    time.sleep(0.1)


def test_the_placement_strategy_is_one_of_rays():
    assert load_job_config(None, ["--ray.placement_strategy", "SPREAD"])[1].ray.placement_strategy == "SPREAD"
    assert load_job_config()[1].ray.placement_strategy == "PACK"  # a node's GPUs first
    with pytest.raises(ConfigError, match=r"ray\.placement_strategy: Input should be 'PACK', 'SPREAD'"):
        load_job_config(None, ["--ray.placement_strategy", "spread"])


@pytest.mark.slow
def test_a_job_across_two_nodes_survives_losing_the_second_nodes_worker(tmp_path, monkeypatch):
    storage, out = tmp_path / "shared", tmp_path / "runs"  # the storage both nodes see; the published run
    args = [
        "--train.output_dir", str(out), "--train.run_name", "two-nodes", "--train.max_steps", str(STEPS),
        "--train.batch_size", "4", "--train.warmup_steps", "2", "--data.eval", "null",
        "--ray.num_workers", "2", "--ray.storage_path", str(storage), "--mlflow.enabled", "false", "--no-showcase",
        *[part for key, value in TWO_NODE_SETTINGS.items() for part in (f"--ray.{key}", str(value))],
    ]  # fmt: skip
    started = time.monotonic()
    with two_nodes(tmp_path, monkeypatch) as (cluster, node_ids):
        nodes_up, node_name = time.monotonic() - started, {node: name for name, node in node_ids.items()}
        log = tmp_path / "job.log"
        with log.open("w") as sink:
            job = subprocess.Popen(
                [sys.executable, str(JOB), *args], cwd=PROJECT_ROOT, env=job_env(cluster), stdout=sink, stderr=sink
            )
        try:
            # The workers, one on each node; once a checkpoint is registered, the second node's is killed.
            deadline = time.monotonic() + 180
            while len(workers := _train_workers()) < 2:
                _still_running(job, log, deadline, "both workers")
            placed = sorted(node_name[w.node_id] for w in workers)
            assert placed == sorted(NODES), f"workers on {placed}"
            (victim,) = [w for w in workers if w.node_id == node_ids["node_b"]]
            while (registered := _latest_checkpoint(storage / "two-nodes")) is None:
                _still_running(job, log, deadline, "a checkpoint")
            _still_running(job, log, deadline, "the kill")
            os.kill(victim.pid, signal.SIGKILL)  # a worker of node_b's `ray start`, so one this test started
            killed_at = time.monotonic() - started
            job.wait(timeout=240)
            job_done = time.monotonic() - started
        finally:
            if job.poll() is None:
                job.kill()
                job.wait()
        output = log.read_text()
        assert job.returncode == 0, output[-6000:]
        restarted = [w for w in _train_workers("DEAD") if w.actor_id not in {x.actor_id for x in workers}]
        replaced = sorted(node_name[w.node_id] for w in restarted)

    resumed = re.findall(r"resumed from \S+/(checkpoint_\d+) at step (\d+)", output)
    print(
        f"\ntwo nodes up in {nodes_up:.0f} s; workers on {placed}; killed pid {victim.pid} on node_b "
        f"{killed_at:.0f} s in, {registered} registered; resumed {resumed}; restarted on {replaced}; "
        f"job done {job_done:.0f} s in; {time.monotonic() - started:.0f} s in all"
    )
    assert replaced == sorted(NODES)  # the restarted group spread over both nodes again
    assert len(resumed) == 1, output[-6000:]  # one restart, from a checkpoint on the shared storage
    ((checkpoint, step),) = resumed
    assert checkpoint >= registered and int(step) == int(checkpoint.removeprefix("checkpoint_")) < STEPS
    run_dir = out / "two-nodes"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["final"]["step"] == STEPS
    assert [h["step"] for h in metrics["history"]] == list(range(1, STEPS + 1))
    assert (run_dir / "decoder" / "adapter_model.safetensors").is_file()
    assert (storage / "two-nodes" / f"checkpoint_{STEPS:06d}_final").is_dir()
