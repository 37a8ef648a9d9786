"""The LatentQA Ray Serve application: read, score and control over HTTP.

    serve run serve.app:build_app                # offline default; decoder: the latest under runs/
    serve run serve.app:build_app settings=my_settings.yaml
    serve deploy serve/config.yaml               # replicas, autoscaling and settings from the file

Three deployments:

- `Gateway`  the FastAPI ingress: validation, auth, routing; no model.
- `ModelReplica` one base model per replica; decoders and control adapters are Serve-multiplexed
  on it (LRU, `max_adapters_per_replica`), reads are batched with @serve.batch, and all model
  work runs on one worker thread so the replica's event loop keeps answering.
- `Steering` control jobs, one at a time on a background thread; their state lives in MLflow.

The request contract (models, limits, errors) is `latentqa_platform.serving`; see serve/README.md.
"""

import asyncio
import hmac
import os
import tempfile
import uuid
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi_offline import FastAPIOffline
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from latentqa_platform import controls
from latentqa_platform.adapters import AdapterCatalog, SharedAdapters
from latentqa_platform.serving import (
    ChatRequest,
    ControlJob,
    ControlRequest,
    ReadAnswer,
    ReadRequest,
    ReadResponse,
    RequestError,
    ScoredCandidate,
    ScoreRequest,
    ScoreResponse,
    ServeSettings,
    UnknownAdapter,
    chat_chunk,
    chat_completion,
)

# ---------------------------------------------------------------- the model replica


@dataclass
class ServedAdapter:
    """One multiplexed adapter on a replica; Serve calls __del__ when the LRU evicts it."""

    replica: "ModelReplica"
    peft_name: str
    read_layer: int

    def __del__(self):
        # Serve runs this on an executor thread: queue the unload behind any model work in flight.
        if self.peft_name and self.replica.work is not None:
            name, self.peft_name = self.peft_name, ""
            self.replica.work.submit(self.replica.adapters.unload, name).result()


@dataclass(frozen=True)
class ReadJob:
    adapter: ServedAdapter
    dialogs: list[list[dict]]
    questions: list[str]
    read_layer: int
    max_new_tokens: int


@serve.deployment(name="ModelReplica", ray_actor_options={"num_cpus": 1}, max_ongoing_requests=32)
class ModelReplica:
    def __init__(self, settings: dict):
        from latentqa.session import LatentQA

        self.work = None
        self.reads_in_flight = 0
        self.last_batch_size = 0
        self.settings = ServeSettings.model_validate(settings)
        uri = self.settings.tracking_uri()
        self.catalogs = {
            "decoder": AdapterCatalog("decoder", self.settings.decoders, uri),
            "control": AdapterCatalog("control", self.settings.controls, uri),
        }
        config = self.settings.engine_config()
        with tempfile.TemporaryDirectory() as tmp:
            default_id = self.catalogs["decoder"].locate(self.settings.decoder_name(), "decoder")
            fetched = self.catalogs["decoder"].fetch(default_id, Path(tmp))
            self.lqa = LatentQA.load(config, fetched.folder)
        # The default decoder stays in the engine's own "decoder" slot; others are multiplexed.
        self.adapters = self.lqa.model.adapters = SharedAdapters(self.lqa.model.adapters)
        self.default = ServedAdapter(self, "decoder", self._read_layer(fetched))
        self.default_id = default_id
        self.work = ThreadPoolExecutor(1, thread_name_prefix="latentqa-model")

        async def load(adapter_id: str) -> ServedAdapter:  # multiplexed() keeps its cache on a plain function
            return await self._load(adapter_id)

        self.adapter = serve.multiplexed(max_num_models_per_replica=self.settings.max_adapters_per_replica)(load)
        self.read_batch = serve.batch(
            max_batch_size=self.settings.max_batch_size, batch_wait_timeout_s=self.settings.batch_wait_timeout_s
        )(self._read_many)

    def _read_layer(self, fetched) -> int:
        """A decoder reads at the layer it was trained for, unless a request says otherwise; it
        must write where this replica patches."""
        config = fetched.config or self.settings.engine_config()
        served = self.settings.engine_config().patch
        if (config.patch.write_layer, config.patch.mode) != (served.write_layer, served.mode):
            raise RequestError(
                "decoder",
                f"trained to write at block {config.patch.write_layer} ({config.patch.mode}); "
                f"this app patches block {served.write_layer} ({served.mode})",
            )
        return config.patch.read_layer

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.work, fn, *args)

    async def _load(self, adapter_id: str) -> ServedAdapter:
        kind = "control" if adapter_id.startswith("control:") else "decoder"
        with tempfile.TemporaryDirectory() as tmp:  # the weights are in memory once loaded
            fetched = await asyncio.to_thread(self.catalogs[kind].fetch, adapter_id, Path(tmp))
            read_layer = self._read_layer(fetched) if kind == "decoder" else 0
            peft_name = f"a{uuid.uuid4().hex[:12]}"
            await self._run(self.adapters.load, fetched.folder, peft_name)
        return ServedAdapter(self, peft_name, read_layer)

    async def _current(self) -> ServedAdapter | None:
        """The adapter this request was routed for (its multiplexed id), or None (the target)."""
        adapter_id = serve.get_multiplexed_model_id()
        if not adapter_id:
            return None
        return self.default if adapter_id == self.default_id else await self.adapter(adapter_id)

    def _check(self, dialogs: list[list[dict]], field: str, read_layer: int | None) -> None:
        """Per-request checks that need the tokenizer or the model, done before batching so that
        one bad request never fails the others in its batch."""
        from latentqa.reading import dialog_to_read

        limit = self.settings.max_turn_tokens
        for d, dialog in enumerate(dialogs):
            for m, message in enumerate(dialog):
                tokens = len(self.lqa.chat_format.encode([message["content"]], plain=True)[0])
                if tokens > limit:
                    raise RequestError(f"{field}.{d}.{m}.content", f"{tokens} tokens; a turn may have at most {limit}")
            try:
                self.lqa.layout.read_side(dialog_to_read(dialog))
            except Exception as err:  # a role or shape the chat template rejects
                raise RequestError(f"{field}.{d}", str(err)) from None
        if read_layer is not None and not 0 <= read_layer < self.lqa.model.num_layers:
            raise RequestError("read_layer", f"{read_layer} is outside the target's {self.lqa.model.num_layers} blocks")

    async def read(self, dialogs: list[list[dict]], questions: list[str], read_layer: int | None, max_new_tokens: int):
        adapter = await self._current() or self.default
        layer = adapter.read_layer if read_layer is None else read_layer
        self._check(dialogs, "dialogs", layer)
        # Wait for company only where there is some: other reads in flight, or a last batch of
        # several (their clients are about to send again). A lone client's read starts at once.
        concurrent = self.reads_in_flight > 0 or self.last_batch_size > 1
        self.read_batch.set_batch_wait_timeout_s(self.settings.batch_wait_timeout_s if concurrent else 0.0)
        self.reads_in_flight += 1
        try:
            return layer, await self.read_batch(ReadJob(adapter, dialogs, questions, layer, max_new_tokens))
        finally:
            self.reads_in_flight -= 1

    async def _read_many(self, jobs: list[ReadJob]) -> list[list[list[str]]]:
        """One engine `read` per (decoder, layer, length) group of the batch: the target pass is
        shared by every dialog of the group."""
        self.last_batch_size = len(jobs)
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, job in enumerate(jobs):
            groups[(job.adapter.peft_name, job.read_layer, job.max_new_tokens)].append(i)
        results: list[Any] = [None] * len(jobs)
        for (peft_name, layer, max_new), members in groups.items():
            dialogs = [d for i in members for d in jobs[i].dialogs]
            questions = [jobs[i].questions for i in members for _ in jobs[i].dialogs]
            answers = await self._run(self._read_group, peft_name, dialogs, questions, layer, max_new)
            for i in members:
                results[i], answers = answers[: len(jobs[i].dialogs)], answers[len(jobs[i].dialogs) :]
        return results

    def _read_group(self, peft_name, dialogs, questions, layer, max_new_tokens):
        from latentqa.reading import read

        if not self.adapters.has(peft_name):
            raise RequestError("decoder", "the decoder was evicted while the request waited; retry")
        with self.adapters.routed(decoder=peft_name):
            return read(
                self.lqa,
                dialogs,
                questions,
                read_layer=layer,
                max_new_tokens=max_new_tokens,
                batch_size=self.settings.max_batch_size,
            )

    async def score(self, dialog: list[dict], question: str, candidates: list[str], read_layer: int | None):
        from latentqa.reading import score

        adapter = await self._current() or self.default
        layer = adapter.read_layer if read_layer is None else read_layer
        self._check([dialog], "dialog", layer)

        def run():
            with self.adapters.routed(decoder=adapter.peft_name):
                return [(s.answer, s.loss) for s in score(self.lqa, dialog, question, candidates, read_layer=layer)]

        return layer, await self._run(run)

    # ----- chat: the target (with or without a control adapter) as a chat model
    def _prompt(self, messages: list[dict]) -> list[int]:
        self._check([messages], "messages", None)
        return self.lqa.chat_format.prompt_ids(messages)

    def _generate(self, peft_name: str | None, prompt: list[int], options: dict, streamer=None) -> list[int]:
        import torch

        ids = torch.tensor([prompt], device=self.lqa.device)
        sampling = {"do_sample": False}
        if options["temperature"] > 0:
            sampling = {"do_sample": True, "temperature": options["temperature"], "top_p": options["top_p"]}
            if options["seed"] is not None:
                torch.manual_seed(options["seed"])
        with self.adapters.use(peft_name), torch.no_grad():
            out = self.lqa.model.peft_model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=options["max_tokens"],
                eos_token_id=sorted(self.lqa.stop_ids),
                pad_token_id=self.lqa.chat_format.pad_id,
                streamer=streamer,
                **sampling,
            )
        return out[0, len(prompt) :].tolist()

    def _finish(self, tokens: list[int]) -> tuple[list[int], str]:
        for i, token in enumerate(tokens):
            if token in self.lqa.stop_ids:
                return tokens[:i], "stop"
        return tokens, "length"

    async def chat(self, messages: list[dict], options: dict) -> dict:
        adapter = await self._current()
        prompt = self._prompt(messages)
        tokens, finish = self._finish(await self._run(self._generate, adapter and adapter.peft_name, prompt, options))
        return {
            "text": self.lqa.decode(tokens),
            "prompt_tokens": len(prompt),
            "completion_tokens": len(tokens),
            "finish": finish,
        }

    async def chat_stream(self, messages: list[dict], options: dict):
        """Text deltas as the target generates them, then {"finish": reason}."""
        from transformers import AsyncTextIteratorStreamer

        adapter = await self._current()
        prompt = self._prompt(messages)
        streamer = AsyncTextIteratorStreamer(self.lqa.tokenizer, skip_prompt=True, skip_special_tokens=True)
        generation = asyncio.ensure_future(
            self._run(self._generate, adapter and adapter.peft_name, prompt, options, streamer)
        )
        async for text in streamer:
            if text:
                yield {"delta": text}
        _, finish = self._finish(await generation)
        yield {"finish": finish}


# ---------------------------------------------------------------- control jobs


@serve.deployment(name="Steering", num_replicas=1, ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=16)
class Steering:
    """Runs control jobs one at a time on a background thread, so submitting returns at once."""

    def __init__(self, settings: dict):
        self.settings = ServeSettings.model_validate(settings)
        self.catalog = AdapterCatalog("decoder", self.settings.decoders, self.settings.tracking_uri())
        self.queue = ThreadPoolExecutor(1, thread_name_prefix="latentqa-steer")
        self.session = None  # (decoder id, LatentQA): kept while jobs use the same decoder

    def submit(self, request: dict, decoder_id: str) -> str:
        body = ControlRequest.model_validate(request)
        from latentqa.paths import RUNS_DIR

        params = {
            "steps": str(body.steps or self.settings.engine_config().steer.steps),
            "decoder": decoder_id,
            "source": "qa" if body.qa else "instruction",
        }
        run = controls.open_job(self.settings.mlflow, RUNS_DIR, body.name, params)
        self.queue.submit(self._run, run, body, decoder_id)
        return run.run_id

    def _session(self, decoder_id: str):
        from latentqa.session import LatentQA

        if self.session is None or self.session[0] != decoder_id:
            self.session = None  # free the previous copy first
            with tempfile.TemporaryDirectory() as tmp:
                folder = self.catalog.fetch(decoder_id, Path(tmp)).folder
                self.session = (decoder_id, LatentQA.load(self.settings.engine_config(), folder))
        return self.session[1]

    def _run(self, run, body: ControlRequest, decoder_id: str) -> None:
        try:
            lqa = self._session(decoder_id)
        except Exception as err:
            run.client().set_tag(run.run_id, controls.ERROR_TAG, f"loading the decoder: {err}"[:5000])
            controls.finish_run(run, "FAILED")
            return
        prompts, heldout = self.settings.read_prompts()
        controls.run_job(
            lqa,
            run,
            self.settings.control_model_prefix + body.name,
            body.qa,
            body.instruction,
            body.questions or self.settings.control_questions,
            prompts,
            {"control": body.name, "decoder": decoder_id, "target_model": lqa.config.model.path},
            body.steps,
            body.lr,
            heldout[:3],
        )


# ---------------------------------------------------------------- the HTTP ingress

# Swagger UI (/docs) and ReDoc (/redoc) from the assets inside fastapi-offline, not a CDN: GPU
# clusters are often offline.
api = FastAPIOffline(
    title="LatentQA",
    version="1",
    description="Read a chat model's activations in plain language, score answers about them, and "
    "steer the model with control adapters. Errors: 422 names the field, 404 an unknown decoder, "
    "control or job, 401 a missing or wrong bearer token (when auth is on).",
)


def _error(status: int, fields: list[tuple[list, str]]) -> JSONResponse:
    detail = [{"loc": loc, "msg": msg} for loc, msg in fields]
    message = "; ".join(f"{'.'.join(str(p) for p in loc)}: {msg}" for loc, msg in fields)
    return JSONResponse({"detail": detail, "message": message}, status_code=status)


@api.exception_handler(RequestValidationError)
async def _invalid(request: Request, err: RequestValidationError) -> JSONResponse:
    return _error(422, [(list(e["loc"]), e["msg"]) for e in err.errors()])


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
    return JSONResponse(
        {"detail": err.detail, "message": str(err.detail)}, status_code=err.status_code, headers=err.headers
    )


@api.exception_handler(RequestError)
async def _request_error(request: Request, err: RequestError) -> JSONResponse:
    return _error(err.status, [(["body", *err.field.split(".")], err.message)])


def _bearer(request: Request) -> None:
    """Bearer-token auth when the gateway was started with its token variable set."""
    token = request.app.state.token
    given = request.headers.get("authorization", "")
    if token and not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
        raise _Unauthorized()


class _Unauthorized(Exception):
    pass


@api.exception_handler(_Unauthorized)
async def _unauthorized(request: Request, err: _Unauthorized) -> JSONResponse:
    return JSONResponse(
        {"detail": "missing or wrong bearer token", "message": "missing or wrong bearer token"},
        status_code=401,
        headers={"WWW-Authenticate": "Bearer"},
    )


def _cause(err: BaseException) -> BaseException:
    """The user exception inside a Ray task error, so RequestError reaches its handler intact."""
    cause = getattr(err, "cause", None)
    return cause if isinstance(cause, BaseException) else err


AUTH = [Depends(_bearer)]


@serve.deployment(name="Gateway", ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=64)
@serve.ingress(api)
class Gateway:
    def __init__(self, model: DeploymentHandle, steering: DeploymentHandle, settings: dict):
        self.model, self.steering = model, steering
        self.settings = ServeSettings.model_validate(settings)
        uri = self.settings.tracking_uri()
        self.decoders = AdapterCatalog("decoder", self.settings.decoders, uri)
        self.controls = AdapterCatalog("control", self.settings.controls, uri)
        api.state.token = os.environ.get(self.settings.auth_token_env) or None

    async def _call(self, method: str, adapter_id: str | None, *args, stream: bool = False):
        handle = self.model.options(multiplexed_model_id=adapter_id or "", stream=stream)
        if stream:
            return getattr(handle, method).remote(*args)
        try:
            return await getattr(handle, method).remote(*args)
        except Exception as err:
            raise _cause(err) from None

    async def _decoder(self, name: str | None) -> str:
        return await asyncio.to_thread(self.decoders.locate, name or self.settings.decoder_name(), "decoder")

    @api.get("/healthz", tags=["ops"])
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @api.get("/v1/decoders", tags=["read"], dependencies=AUTH)
    async def list_decoders(self) -> dict:
        rows = await asyncio.to_thread(self.decoders.listing, self.settings.control_model_prefix)
        return {"default": self.settings.decoder_name(), "decoders": rows}

    @api.post("/v1/read", tags=["read"], response_model=ReadResponse, dependencies=AUTH)
    async def read(self, body: ReadRequest) -> ReadResponse:
        """Answer every question about every dialog from the dialog's activations."""
        decoder = await self._decoder(body.decoder)
        dialogs = [[m.model_dump() for m in d] for d in body.dialogs]
        layer, answers = await self._call(
            "read", decoder, dialogs, body.questions, body.read_layer, body.max_new_tokens
        )
        results = [[ReadAnswer(question=q, answer=a) for q, a in zip(body.questions, row)] for row in answers]
        return ReadResponse(decoder=decoder, read_layer=layer, results=results)

    @api.post("/v1/score", tags=["read"], response_model=ScoreResponse, dependencies=AUTH)
    async def score(self, body: ScoreRequest) -> ScoreResponse:
        """Rank candidate answers to a question about a dialog by the decoder's loss, best first."""
        decoder = await self._decoder(body.decoder)
        dialog = [m.model_dump() for m in body.dialog]
        layer, ranked = await self._call("score", decoder, dialog, body.question, body.candidates, body.read_layer)
        return ScoreResponse(
            decoder=decoder, read_layer=layer, ranked=[ScoredCandidate(answer=a, loss=loss) for a, loss in ranked]
        )

    @api.get("/v1/models", tags=["chat"], dependencies=AUTH)
    async def models(self) -> dict:
        """The chat `model` names: the target, and the control adapters."""
        rows = await asyncio.to_thread(self.controls.listing)
        names = (
            [self.settings.target_name]
            + [r["name"] for r in rows if r["kind"] == "configured"]
            + [
                f"{r['name']}/{r['latest_version']}"
                for r in rows
                if r["kind"] == "registered" and r["name"].startswith(self.settings.control_model_prefix)
            ]
        )
        return {"object": "list", "data": [{"id": n, "object": "model", "owned_by": "latentqa"} for n in names]}

    @api.post("/v1/chat/completions", tags=["chat"], dependencies=AUTH)
    async def chat_completions(self, body: ChatRequest):
        """The target behind the OpenAI chat-completions API; `model` picks a control adapter."""
        adapter = (
            None
            if body.model == self.settings.target_name
            else await asyncio.to_thread(self.controls.locate, body.model, "model")
        )
        messages = [m.model_dump() for m in body.messages]
        options = {
            "max_tokens": body.new_tokens,
            "temperature": body.temperature,
            "top_p": body.top_p,
            "seed": body.seed,
        }
        if not body.stream:
            out = await self._call("chat", adapter, messages, options)
            return chat_completion(
                body.model, out["text"], out["prompt_tokens"], out["completion_tokens"], out["finish"]
            )
        parts = await self._call("chat_stream", adapter, messages, options, stream=True)
        try:  # the first part comes after the replica's checks: a bad request still gets its 4xx
            first = await parts.__anext__()
        except Exception as err:
            raise _cause(err) from None
        return StreamingResponse(self._sse(first, parts, body.model), media_type="text/event-stream")

    async def _sse(self, first: dict, parts, model: str):
        import json

        async def all_parts():
            yield first
            async for part in parts:
                yield part

        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        yield f"data: {json.dumps(chat_chunk(completion_id, model, {'role': 'assistant', 'content': ''}))}\n\n"
        try:
            async for part in all_parts():
                if "delta" in part:
                    yield f"data: {json.dumps(chat_chunk(completion_id, model, {'content': part['delta']}))}\n\n"
                else:
                    yield f"data: {json.dumps(chat_chunk(completion_id, model, {}, part['finish']))}\n\n"
        except Exception as err:  # headers are sent: report in-band, as OpenAI does
            err = _cause(err)
            yield f"data: {json.dumps({'error': {'message': str(err), 'type': type(err).__name__}})}\n\n"
        yield "data: [DONE]\n\n"

    @api.post("/v1/controls", tags=["control"], status_code=202, response_model=ControlJob, dependencies=AUTH)
    async def start_control(self, body: ControlRequest) -> ControlJob:
        """Start training a control adapter; poll GET /v1/controls/{id} for progress."""
        decoder = await self._decoder(body.decoder)
        try:
            job_id = await self.steering.submit.remote(body.model_dump(), decoder)
        except Exception as err:
            raise _cause(err) from None
        return await self.get_control(job_id)

    @api.get("/v1/controls/{job_id}", tags=["control"], response_model=ControlJob, dependencies=AUTH)
    async def get_control(self, job_id: str) -> ControlJob:
        """Status and progress of a control job; when it succeeded, `adapter` is the chat `model`."""
        status = await asyncio.to_thread(controls.job_status, self.settings.tracking_uri(), job_id)
        if status is None:
            raise UnknownAdapter("job_id", f"no control job {job_id!r}")
        return ControlJob(**status)


def build_app(args: dict) -> serve.Application:
    """The application for `serve run serve.app:build_app key=value` and `serve deploy`: `args`
    are `ServeSettings` fields; `settings=FILE.yaml` reads them from a file first. Without
    `decoders`, the engine config's `model.decoder_adapter` is served, else the latest under runs/."""
    import yaml

    from latentqa.model_files import WrongTarget, check_target
    from latentqa.models import load_model_config
    from latentqa.paths import latest_decoder

    args = dict(args)
    if "settings" in args:
        args = {**yaml.safe_load(Path(args.pop("settings")).read_text()), **args}
    model = ServeSettings.model_validate(args).engine_config().model
    if not args.get("decoders"):  # the config's own decoder (e.g. a shipped one), else the latest trained
        named = model.decoder_adapter
        args["decoders"] = {Path(named).name: named} if named else {"latest": str(latest_decoder())}
    settings = ServeSettings.model_validate(args)
    target = load_model_config(model)
    for folder in settings.decoders.values():  # a wrong base fails here in one line, not in the replicas
        if Path(folder).is_dir():
            try:
                check_target(folder, target)
            except WrongTarget as err:
                raise SystemExit(f"cannot serve: {err}") from None
    return application(settings)


def application(settings: ServeSettings, model=ModelReplica, steering=Steering, gateway=Gateway) -> serve.Application:
    """The three deployments bound together; callers in Python may pass deployments with
    `.options(...)` (replicas, resources, runtime_env)."""
    args = settings.model_dump(mode="json")
    return gateway.bind(model.bind(args), steering.bind(args), args)
