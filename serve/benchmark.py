"""The Serve benchmark (`jobs/benchmark.py --only serve`): the HTTP overhead of `/v1/read` and the
throughput gain of batching, on a real Serve instance over loopback. It lives beside the app it
measures; the platform layer's benchmark library (`latentqa_platform.benchmarks`) never imports
the app."""

from __future__ import annotations

import contextlib
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from latentqa_platform.benchmarks import DIALOG, QUESTIONS, interleaved, paired_ratio, row

# Ray Serve's defaults for the switches `serve.app.GATEWAY_ENV` sets (the values a caller's own
# env_vars win with): user code on its own thread and loop, the router on another, actor calls.
SERVE_DEFAULTS = {
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "1",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "1",
    "RAY_SERVE_USE_GRPC_BY_DEFAULT": "0",
}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _read_body(max_new_tokens: int) -> dict:
    return {"dialogs": [DIALOG], "questions": [QUESTIONS[0]], "max_new_tokens": max_new_tokens}


@contextlib.contextmanager
def _served(
    apps: dict[str, dict], model_replicas: int = 1, serve_defaults: tuple[str, ...] = ()
) -> Iterator[tuple[str, Path]]:
    """A fresh (untrained) decoder of the offline default, served by one app per entry of `apps`
    (its `ServeSettings` fields) under /<name> on a local Serve instance, each answering reads;
    yields the base URL and the decoder's folder. Model replicas at 1 CPU each. The apps named in
    `serve_defaults` run with Serve's default switches (`SERVE_DEFAULTS`) instead of the app's:
    the before side of their figure."""
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
            env = {"runtime_env": {"env_vars": SERVE_DEFAULTS if name in serve_defaults else {}}}
            app = application(
                settings,
                model=ModelReplica.options(num_replicas=model_replicas, ray_actor_options={"num_cpus": 1, **env}),
                steering=Steering.options(ray_actor_options={"num_cpus": 0.25}),
                gateway=Gateway.options(ray_actor_options={"num_cpus": 0.25, **env}),
            )
            serve.run(app, name=f"bench-{name}", route_prefix=f"/{name}", blocking=False)
        deadline = time.monotonic() + 300
        with httpx.Client(base_url=url, timeout=300) as client:
            for name in apps:
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
) -> list[dict]:
    """/v1/read over HTTP on loopback vs the engine's `read` in this process (p50 overhead), and
    throughput with `clients` concurrent clients of an app batching up to `clients` reads vs the
    same app with max_batch_size=1. A fresh (untrained) decoder of the offline default; the apps
    on one local cluster, model replicas at 1 CPU (1 torch thread, as this process is set to).
    Beside them, interleaved, the batching app with Serve's default switches: the before side."""
    import asyncio

    import httpx

    from latentqa.config import load_config
    from latentqa.reading import read
    from latentqa.session import LatentQA
    from latentqa_platform.serving import ServeSettings

    body = _read_body(max_new_tokens)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    batched = {"max_batch_size": clients}
    apps = {"batched": batched, "unbatched": {"max_batch_size": 1}, "defaults": batched}
    try:
        with (
            _served(apps, serve_defaults=("defaults",)) as (url, folder),
            httpx.Client(base_url=url, timeout=300) as client,
        ):
            lqa = LatentQA.load(load_config(), folder)

            def local_read() -> None:
                read(lqa, [DIALOG], [QUESTIONS[0]], max_new_tokens=max_new_tokens)

            def http_read(app: str) -> Callable[[], None]:
                return lambda: client.post(f"/{app}/v1/read", json=body).raise_for_status()

            # a lone client, one read at a time; "unbatched" is where a batch never waits
            latency = interleaved(
                {"local": local_read, **{app: http_read(app) for app in apps}}, repeats=requests * repeats, warmup=3
            )

            async def load(name: str) -> float:
                async with httpx.AsyncClient(base_url=url, timeout=300) as ac:

                    async def one_client():
                        for _ in range(requests):
                            (await ac.post(f"/{name}/v1/read", json=body)).raise_for_status()

                    start = time.perf_counter()
                    await asyncio.gather(*(one_client() for _ in range(clients)))
                    return clients * requests / (time.perf_counter() - start)

            throughput = {app: [] for app in apps}
            for repeat in range(repeats + 1):  # the first round warms up
                for app in apps:
                    measured = asyncio.run(load(app))
                    if repeat:
                        throughput[app].append(measured)
    finally:
        torch.set_num_threads(previous)
    p50 = {name: statistics.median(times) for name, times in latency.items()}
    overhead = {app: (p50[app] - p50["local"]) * 1000 for app in apps}
    throughput_ratio = paired_ratio(throughput["batched"], throughput["unbatched"])
    return [
        row(
            "serve /v1/read overhead",
            p50["batched"],
            p50["local"],
            "s (p50)",
            p50["batched"] / p50["local"],
            f"overhead <= {overhead_ms:g} ms",
            overhead["batched"] <= overhead_ms,
            overhead_ms=overhead["batched"],
            measured_is="POST /v1/read over loopback HTTP",
            baseline_is="latentqa.reading.read in process",
            requests=len(latency["local"]),
            max_new_tokens=max_new_tokens,
            http_p90=statistics.quantiles(latency["batched"], n=10)[-1],
            local_p90=statistics.quantiles(latency["local"], n=10)[-1],
            batch_wait_timeout_s=ServeSettings().batch_wait_timeout_s,
            unbatched_app_overhead_ms=overhead["unbatched"],
            serve_defaults_overhead_ms=overhead["defaults"],
        ),
        row(
            "serve batching",
            statistics.median(throughput["batched"]),
            statistics.median(throughput["unbatched"]),
            "req/s",
            throughput_ratio,
            f">= {speedup:g}x",
            throughput_ratio >= speedup,
            measured_is=f"{clients} concurrent clients, max_batch_size={clients}",
            baseline_is=f"{clients} concurrent clients, max_batch_size=1",
            requests_per_client=requests,
            measured_all=throughput["batched"],
            baseline_all=throughput["unbatched"],
            serve_defaults_all=throughput["defaults"],
            serve_defaults_ratio=paired_ratio(throughput["defaults"], throughput["unbatched"]),
            repeats=repeats,
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
