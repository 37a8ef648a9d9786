"""The Serve benchmark (`jobs/benchmark.py --only serve`): the HTTP overhead of `/v1/read` and the
throughput gain of batching, on a real Serve instance over loopback. It lives beside the app it
measures; the platform layer's benchmark library (`latentqa_platform.benchmarks`) never imports
the app."""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from latentqa_platform.benchmarks import DIALOG, QUESTIONS, paired_ratio, row


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_benchmarks(
    repeats: int,
    requests: int = 20,
    clients: int = 16,
    max_new_tokens: int = 8,
    overhead_ms: float = 30.0,
    speedup: float = 2.0,
) -> list[dict]:
    """/v1/read over HTTP on loopback vs the engine's `read` in this process (p50 overhead), and
    throughput with `clients` concurrent clients of an app batching up to `clients` reads vs the
    same app with max_batch_size=1. A fresh (untrained) decoder of the offline default; both apps
    on one local cluster, model replicas at 1 CPU (1 torch thread, as this process is set to)."""
    import asyncio

    import httpx
    from ray import serve

    from latentqa.config import load_config
    from latentqa.models import DECODER
    from latentqa.reading import read
    from latentqa.session import LatentQA
    from latentqa_platform.serving import ServeSettings
    from latentqa_platform.settings import MlflowSettings
    from serve.app import Gateway, ModelReplica, Steering, application

    tmp = Path(tempfile.mkdtemp(prefix="latentqa-bench-serve-"))
    torch.manual_seed(0)
    lqa = LatentQA.load(load_config(), train_decoder=False)
    folder = lqa.model.adapters.save(DECODER, tmp / "decoder")
    lqa = LatentQA.load(load_config(), folder)
    mlflow = MlflowSettings(
        tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}", artifact_location=(tmp / "mlartifacts").as_uri()
    )
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    for name, batch in (("batched", clients), ("unbatched", 1)):
        settings = ServeSettings(decoders={"bench": str(folder)}, mlflow=mlflow, max_batch_size=batch, auth="none")
        app = application(
            settings,
            model=ModelReplica.options(num_replicas=1, ray_actor_options={"num_cpus": 1}),
            steering=Steering.options(ray_actor_options={"num_cpus": 0.25}),
            gateway=Gateway.options(ray_actor_options={"num_cpus": 0.25}),
        )
        serve.run(app, name=f"bench-{name}", route_prefix=f"/{name}", blocking=False)
    body = {"dialogs": [DIALOG], "questions": [QUESTIONS[0]], "max_new_tokens": max_new_tokens}
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with httpx.Client(base_url=url, timeout=300) as client:
            deadline = time.monotonic() + 300
            for name in ("batched", "unbatched"):
                while client.post(f"/{name}/v1/read", json=body).status_code != 200:
                    if time.monotonic() > deadline:
                        raise TimeoutError("the serve app did not answer")
                    time.sleep(1)
            http_times, local_times, unbatched_times = [], [], []
            for _ in range(3):  # warm both paths
                client.post("/batched/v1/read", json=body)
                read(lqa, [DIALOG], [QUESTIONS[0]], max_new_tokens=max_new_tokens)
            for _ in range(requests * repeats):
                start = time.perf_counter()
                response = client.post("/batched/v1/read", json=body)
                http_times.append(time.perf_counter() - start)
                response.raise_for_status()
                start = time.perf_counter()
                read(lqa, [DIALOG], [QUESTIONS[0]], max_new_tokens=max_new_tokens)
                local_times.append(time.perf_counter() - start)
                start = time.perf_counter()  # the same request where a batch never waits (max_batch_size=1)
                client.post("/unbatched/v1/read", json=body).raise_for_status()
                unbatched_times.append(time.perf_counter() - start)

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
        serve.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    http_p50, local_p50 = statistics.median(http_times), statistics.median(local_times)
    overhead = (http_p50 - local_p50) * 1000
    throughput_ratio = paired_ratio(batched, unbatched)
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
        ),
    ]
