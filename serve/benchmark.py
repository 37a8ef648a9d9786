"""The Serve benchmark (`jobs/benchmark.py --only serve`): the HTTP overhead of `/v1/read` and the
throughput gain of batching, on a real Serve instance over loopback. It lives beside the app it
measures; the platform layer's benchmark library (`latentqa_platform.benchmarks`) never imports
the app."""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from latentqa_platform.benchmarks import DIALOG, QUESTIONS, interleaved, paired_ratio, row

# Serve's ingress switches for `--serve-ingress haproxy` (jobs/benchmark.py sets them before the
# local cluster starts: Serve's controller and proxy read them): HAProxy with direct ingress in
# place of Serve's Python proxy.
HAPROXY_INGRESS = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1"}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _read_body(max_new_tokens: int) -> dict:
    return {"dialogs": [DIALOG], "questions": [QUESTIONS[0]], "max_new_tokens": max_new_tokens}


def _bare_app(folder: Path):
    """Serve's own floor for a read: a FastAPI ingress calling, through a deployment handle, a
    deployment that runs the engine's `read` with the same decoder; none of the app's code
    (validation, auth, limits, checks, multiplexing, batching). What the two hops cost by themselves."""
    from fastapi import FastAPI
    from ray import serve

    api = FastAPI()

    @serve.deployment(name="BareModel", ray_actor_options={"num_cpus": 0.5})
    class BareModel:
        def __init__(self, folder: str):
            from concurrent.futures import ThreadPoolExecutor

            from latentqa.config import load_config
            from latentqa.session import LatentQA

            torch.set_num_threads(1)  # as the app's replica and this process
            self.lqa = LatentQA.load(load_config(), folder)
            self.work = ThreadPoolExecutor(1)  # the model off the replica's loop, as in the app's replica

        async def read(self, body: dict) -> list[list[str]]:
            import asyncio

            from latentqa.reading import read

            args = (self.lqa, body["dialogs"], body["questions"], None, body["max_new_tokens"])
            return await asyncio.get_running_loop().run_in_executor(self.work, read, *args)

    @serve.deployment(name="BareIngress", ray_actor_options={"num_cpus": 0})
    @serve.ingress(api)
    class BareIngress:
        def __init__(self, model):
            self.model = model

        @api.post("/v1/read")
        async def read(self, body: dict) -> list[list[str]]:
            return await self.model.read.remote(body)

    return BareIngress.bind(BareModel.bind(str(folder)))


@contextlib.contextmanager
def _served(apps: dict[str, dict], model_replicas: int = 1, bare: bool = False) -> Iterator[tuple[str, Path]]:
    """A fresh (untrained) decoder of the offline default, served by one app per entry of `apps`
    (its `ServeSettings` fields) under /<name> on a local Serve instance, each answering reads;
    with `bare`, also Serve's floor for the same read under /bare (`_bare_app`). Yields the base URL
    and the decoder's folder. Model replicas at 1 CPU each."""
    import httpx
    from ray import serve

    from latentqa.config import load_config
    from latentqa.models import DECODER
    from latentqa.session import LatentQA
    from latentqa_platform.serving import ServeSettings
    from latentqa_platform.settings import MlflowSettings
    from serve.app import Gateway, ModelReplica, Steering, application

    tmp = Path(tempfile.mkdtemp(prefix="latentqa-bench-serve-"))
    torch.manual_seed(0)
    folder = LatentQA.load(load_config(), train_decoder=False).model.adapters.save(DECODER, tmp / "decoder")
    mlflow = MlflowSettings(
        tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}", artifact_location=(tmp / "mlartifacts").as_uri()
    )
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    try:
        for name, fields in apps.items():
            settings = ServeSettings(decoders={"bench": str(folder)}, mlflow=mlflow, auth="none", **fields)
            app = application(
                settings,
                model=ModelReplica.options(num_replicas=model_replicas, ray_actor_options={"num_cpus": 1}),
                steering=Steering.options(ray_actor_options={"num_cpus": 0.25}),
                gateway=Gateway.options(ray_actor_options={"num_cpus": 0.25}),
            )
            serve.run(app, name=f"bench-{name}", route_prefix=f"/{name}", blocking=False)
        if bare:
            serve.run(_bare_app(folder), name="bench-bare", route_prefix="/bare", blocking=False)
        deadline = time.monotonic() + 300
        with httpx.Client(base_url=url, timeout=300) as client:
            for name in [*apps, *(["bare"] if bare else [])]:
                while client.post(f"/{name}/v1/read", json=_read_body(1)).status_code != 200:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"the serve app {name} did not answer")
                    time.sleep(1)
        yield url, folder
    finally:
        serve.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


def serve_benchmarks(
    repeats: int,
    requests: int = 20,
    clients: int = 16,
    max_new_tokens: int = 8,
    overhead_ms: float = 10.0,
    speedup: float = 4.0,
    floor_ratio: float = 1.25,
) -> list[dict]:
    """/v1/read over HTTP on loopback vs the engine's `read` in this process (p50 overhead), and
    throughput with `clients` concurrent clients of an app batching up to `clients` reads vs the
    same app with max_batch_size=1. Beside them, Serve's own floor: the overhead of a bare two-hop
    app running the same read (`_bare_app`), against which the app's overhead is set. A fresh
    (untrained) decoder of the offline default; all apps on one local cluster, model replicas at
    1 CPU (1 torch thread, as this process is set to)."""
    import asyncio

    import httpx

    from latentqa.config import load_config
    from latentqa.reading import read
    from latentqa.session import LatentQA
    from latentqa_platform.serving import ServeSettings

    body = _read_body(max_new_tokens)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    apps = {"batched": {"max_batch_size": clients}, "unbatched": {"max_batch_size": 1}}
    try:
        with _served(apps, bare=True) as (url, folder), httpx.Client(base_url=url, timeout=300) as client:
            lqa = LatentQA.load(load_config(), folder)
            times = interleaved(
                {
                    "batched": lambda: client.post("/batched/v1/read", json=body).raise_for_status(),
                    "local": lambda: read(lqa, [DIALOG], [QUESTIONS[0]], max_new_tokens=max_new_tokens),
                    # the same request where a batch never waits (max_batch_size=1)
                    "unbatched": lambda: client.post("/unbatched/v1/read", json=body).raise_for_status(),
                    "bare": lambda: client.post("/bare/v1/read", json=body).raise_for_status(),
                },
                requests * repeats,
                warmup=3,
            )
            http_times, local_times, unbatched_times, bare_times = times.values()

            async def load(name: str) -> float:
                async with httpx.AsyncClient(base_url=url, timeout=300) as ac:

                    async def one_client():
                        for _ in range(requests):
                            (await ac.post(f"/{name}/v1/read", json=body)).raise_for_status()

                    start = time.perf_counter()
                    await asyncio.gather(*(one_client() for _ in range(clients)))
                    return clients * requests / (time.perf_counter() - start)

            asyncio.run(load("batched"))  # warm-up round
            asyncio.run(load("unbatched"))
            batched, unbatched = [], []
            for _ in range(repeats):
                batched.append(asyncio.run(load("batched")))
                unbatched.append(asyncio.run(load("unbatched")))
    finally:
        torch.set_num_threads(previous)
    http_p50, local_p50, bare_p50 = (statistics.median(t) for t in (http_times, local_times, bare_times))
    overhead, floor = (http_p50 - local_p50) * 1000, (bare_p50 - local_p50) * 1000
    throughput_ratio = paired_ratio(batched, unbatched)
    ingress = "haproxy" if HAPROXY_INGRESS.items() <= os.environ.items() else "proxy"
    return [
        row(
            "serve /v1/read overhead",
            http_p50,
            local_p50,
            "s (p50)",
            http_p50 / local_p50,
            f"overhead <= {overhead_ms:g} ms",
            overhead <= overhead_ms,
            overhead_ms=overhead,
            measured_is="POST /v1/read over loopback HTTP",
            baseline_is="latentqa.reading.read in process",
            requests=len(http_times),
            max_new_tokens=max_new_tokens,
            http_p90=statistics.quantiles(http_times, n=10)[-1],
            local_p90=statistics.quantiles(local_times, n=10)[-1],
            batch_wait_timeout_s=ServeSettings().batch_wait_timeout_s,
            unbatched_app_p50=statistics.median(unbatched_times),
            unbatched_app_overhead_ms=(statistics.median(unbatched_times) - local_p50) * 1000,
            serve_floor_ms=floor,
            ingress=ingress,
        ),
        row(
            "serve /v1/read overhead vs Serve's floor",
            overhead,
            floor,
            "ms (p50 over in-process)",
            overhead / floor if floor > 0 else float("inf"),
            f"<= {floor_ratio:g}x",
            overhead <= floor_ratio * floor,
            measured_is="POST /v1/read: proxy, Gateway (FastAPI, auth, limits), model replica (checks, batching)",
            baseline_is="a bare two-hop Serve app (FastAPI ingress, handle, deployment) running the same read",
            bare_p50=bare_p50,
            local_p50=local_p50,
            ingress=ingress,
        ),
        row(
            "serve batching",
            statistics.median(batched),
            statistics.median(unbatched),
            "req/s",
            throughput_ratio,
            f">= {speedup:g}x",
            throughput_ratio >= speedup,
            measured_is=f"{clients} concurrent clients, max_batch_size={clients}",
            baseline_is=f"{clients} concurrent clients, max_batch_size=1",
            requests_per_client=requests,
            measured_all=batched,
            baseline_all=unbatched,
            repeats=repeats,
            ingress=ingress,
        ),
    ]


def serve_load(reads: int = 2000, clients: int = 32, max_new_tokens: int = 4) -> list[dict]:
    """`reads` reads from `clients` concurrent clients to one app of two model replicas: latency
    percentiles and lost requests; then the same with one model replica killed a third of the way
    in, where every request must be answered, 200 or 503 with Retry-After, and none may hang.
    The ratio is the fault round's p50 against the steady round's, measured one after the other."""
    import asyncio

    import ray

    def kill_one_model_replica() -> None:
        replicas = [
            a
            for a in ray.util.list_named_actors(all_namespaces=True)
            if "bench-load" in a["name"] and "ModelReplica" in a["name"]
        ]
        ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]), no_restart=True)

    with _served({"load": {}}, model_replicas=2) as (url, _):
        steady = asyncio.run(_load_round(f"{url}/load", reads, clients, max_new_tokens))
        faulty = asyncio.run(_load_round(f"{url}/load", reads, clients, max_new_tokens, kill_one_model_replica))
    rows = []
    for name, round_, fault in (("serve load", steady, None), ("serve load, a replica killed", faulty, "killed")):
        unexpected = {s: n for s, n in round_["statuses"].items() if s != 200 and not (fault and s == 503)}
        met = not unexpected and round_["hung"] == 0 and round_["answered"] == reads and round_["retry_after"]
        rows.append(
            row(
                name,
                _percentile(round_["latencies"], 50),
                _percentile(steady["latencies"], 50),
                "s (p50)",
                _percentile(round_["latencies"], 50) / _percentile(steady["latencies"], 50),
                "every read answered (200, or 503 with Retry-After where a replica died); none lost or hung",
                bool(met),
                measured_is=f"{reads} reads, {clients} concurrent clients, 2 model replicas"
                + (", one killed after a third" if fault else ""),
                baseline_is="the steady round's p50",
                p95=_percentile(round_["latencies"], 95),
                p99=_percentile(round_["latencies"], 99),
                statuses={str(s): n for s, n in sorted(round_["statuses"].items())},
                hung=round_["hung"],
                wall_s=round_["wall_s"],
                reads_per_s=reads / round_["wall_s"],
            )
        )
    return rows


def _percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else values[0]


async def _load_round(url: str, reads: int, clients: int, max_new_tokens: int, on_third=None) -> dict:
    """`reads` POST /v1/read from `clients` concurrent clients; `on_third` runs once a third are
    sent. A read with no answer in 120 s counts as hung."""
    import asyncio
    from collections import Counter

    import httpx

    body, queue = _read_body(max_new_tokens), asyncio.Queue()
    for i in range(reads):
        queue.put_nowait(i)
    latencies, statuses, hung, retry_after = [], Counter(), 0, True

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal hung, retry_after
        while not queue.empty():
            i = queue.get_nowait()
            if on_third and i == reads // 3:
                await asyncio.to_thread(on_third)
            start = time.perf_counter()
            try:
                response = await http.post("/v1/read", json=body)
            except httpx.HTTPError:
                hung += 1
                continue
            statuses[response.status_code] += 1
            if response.status_code == 200:
                latencies.append(time.perf_counter() - start)
            elif response.status_code == 503:
                retry_after = retry_after and "retry-after" in response.headers

    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    wall = time.perf_counter() - started
    return {
        "latencies": latencies,
        "statuses": statuses,
        "hung": hung,
        "answered": sum(statuses.values()),
        "retry_after": retry_after,
        "wall_s": wall,
    }
