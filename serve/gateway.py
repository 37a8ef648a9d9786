"""The `Gateway` deployment: the FastAPI ingress (validation, auth, routing to the model replicas
and to steering); it holds no model."""

import asyncio
import hmac
import logging
import uuid

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi_offline import FastAPIOffline
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from latentqa_platform import console, controls
from latentqa_platform.adapters import AdapterCatalog
from latentqa_platform.serving import (
    CONTRAST_DIALOG,
    ChatRequest,
    ControlJob,
    ControlRequest,
    LayerMapRequest,
    LayerMapResponse,
    LayerRow,
    Overloaded,
    ReadAnswer,
    ReadRequest,
    ReadResponse,
    RequestError,
    ScoredCandidate,
    ScoreRequest,
    ScoreResponse,
    ServeSettings,
    Unavailable,
    UnknownAdapter,
    chat_chunk,
    chat_completion,
)
from serve.playground import PAGE_FILES, add_page

# Swagger UI (/docs) and ReDoc (/redoc) from the assets inside fastapi-offline, not a CDN: GPU
# clusters are often offline.
api = FastAPIOffline(
    title="LatentQA",
    version="1",
    description="Read a chat model's activations in plain language, score answers about them, and "
    "steer the model with control adapters. Errors: 422 names the field, 404 an unknown decoder, "
    "control or job, 401 a missing or wrong bearer token (when auth is on), 411 and 413 a body without "
    "a size or too large, 429 too many control jobs, 503 the model registry or an adapter unavailable "
    "(429 and 503 with Retry-After).",
)


log = logging.getLogger("ray.serve")  # Serve's replica log: each line carries the request id


def _request_id(scope) -> str | None:
    """The id Serve's proxy gave the request (or the client sent); the response's X-Request-ID."""
    return dict(scope.get("headers") or []).get(b"x-request-id", b"").decode() or None


def _error(request: Request, status: int, fields: list[tuple[list, str]]) -> JSONResponse:
    detail = [{"loc": loc, "msg": msg} for loc, msg in fields]
    message = "; ".join(f"{'.'.join(str(p) for p in loc)}: {msg}" for loc, msg in fields)
    return JSONResponse(
        {"detail": detail, "message": message, "request_id": _request_id(request.scope)}, status_code=status
    )


@api.exception_handler(RequestValidationError)
async def _invalid(request: Request, err: RequestValidationError) -> JSONResponse:
    sent = request.headers.get("content-type", "")
    if "json" not in sent and any(tuple(e["loc"]) == ("body",) for e in err.errors()):
        # FastAPI reads a body sent as anything else as text, and says "Input should be a valid dictionary"
        what = f"Content-Type {sent}" if sent else "no Content-Type"
        return _error(request, 422, [(["body"], f"send a JSON object with Content-Type: application/json ({what})")])
    return _error(request, 422, [(list(e["loc"]), e["msg"]) for e in err.errors()])


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
    body = {"detail": err.detail, "message": str(err.detail), "request_id": _request_id(request.scope)}
    return JSONResponse(body, status_code=err.status_code, headers=err.headers)


@api.exception_handler(RequestError)
async def _request_error(request: Request, err: RequestError) -> JSONResponse:
    response = _error(request, err.status, [([err.place, *err.field.split(".")], err.message)])
    if isinstance(err, (Overloaded, Unavailable)):
        response.headers["Retry-After"] = str(err.retry_after_s)
        log.warning("%s %s: %s: %s", err.status, request.url.path, err.field, err.message)
    return response


@api.exception_handler(Exception)
async def _unexpected(request: Request, err: Exception) -> JSONResponse:
    # The details (and the trace) go to the log under the request id; the client gets the id only.
    log.error("500 %s: %s: %s", request.url.path, type(err).__name__, err, exc_info=err)
    request_id = _request_id(request.scope)
    message = f"internal error; the server log has the details under request id {request_id}"
    return JSONResponse({"detail": message, "message": message, "request_id": request_id}, status_code=500)


class RequestGuard:
    """Before any route reads a byte of the body: the bearer token (401; every path but /healthz,
    the API docs too), then the body's declared size (411 without one, 413 past the limit)."""

    # The playground's static files hold no secret and a browser cannot send a token when it
    # navigates; the page sends it on every API call (serve/playground/__init__.py).
    OPEN_PATHS = ("/healthz", *PAGE_FILES)

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "websocket":  # the API has none: refused rather than let past the check
            return await send({"type": "websocket.close", "code": 1008})
        if scope["type"] != "http":  # lifespan
            return await self.app(scope, receive, send)
        state = scope["app"].state  # the app Serve runs, which the Gateway's __init__ configured
        headers, token, limit = dict(scope["headers"]), state.token, state.max_body_bytes
        path = scope["path"].removeprefix(scope.get("root_path", ""))  # the app may sit under a route prefix
        if token and path not in self.OPEN_PATHS:
            scheme, _, given = headers.get(b"authorization", b"").partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(given, token.encode()):
                refusal = "missing or wrong bearer token"
                return await _refuse(401, refusal, scope, receive, send, {"WWW-Authenticate": "Bearer"})
        if scope["method"] in ("POST", "PUT", "PATCH"):
            length = headers.get(b"content-length", b"")
            if not length.isdigit():
                return await _refuse(411, "a request body needs a Content-Length", scope, receive, send)
            if int(length) > limit:
                return await _refuse(413, f"the body is {int(length)} bytes; at most {limit}", scope, receive, send)
        await self.app(scope, receive, send)


async def _refuse(status: int, message: str, scope, receive, send, headers: dict | None = None) -> None:
    body = {"detail": message, "message": message, "request_id": _request_id(scope)}
    response = JSONResponse(body, status_code=status, headers=headers)
    await response(scope, receive, send)


api.add_middleware(RequestGuard)
add_page(api)


def _block_count(settings: ServeSettings) -> int:
    """The target's blocks, from its config file (the gateway loads no weights)."""
    from latentqa.models import load_model_config

    return load_model_config(settings.engine_config().model).num_hidden_layers


def _dialog_roles(settings: ServeSettings) -> dict:
    """The roles a dialog may hold and where a system prompt goes, from the target's tokenizer and
    chat template (the playground's role picker)."""
    from latentqa.chat_format import ChatFormat
    from latentqa.models import load_tokenizer

    chat_format = ChatFormat(load_tokenizer(settings.engine_config().model))
    return {"roles": list(chat_format.dialog_roles), "system_placement": chat_format.system_placement}


def _cause(err: BaseException) -> BaseException:
    """The user exception inside a Ray task error, so RequestError reaches its handler intact."""
    cause = getattr(err, "cause", None)
    return cause if isinstance(cause, BaseException) else err


@serve.deployment(name="Gateway", ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=64)
@serve.ingress(api)
class Gateway:
    def __init__(self, model: DeploymentHandle, steering: DeploymentHandle, settings: dict):
        self.model, self.steering = model, steering
        self.settings = ServeSettings.model_validate(settings)
        if not self.settings.verbose:
            console.quiet_replica()
        uri = self.settings.tracking_uri()
        self.decoders = AdapterCatalog("decoder", self.settings.decoders, uri)
        self.controls = AdapterCatalog("control", self.settings.controls, uri)
        self.target_layers = _block_count(self.settings)
        self.target_roles = _dialog_roles(self.settings)
        api.state.token = self.settings.auth_token()  # raises (the replica does not start) when auth has no token
        api.state.max_body_bytes = self.settings.max_body_bytes
        log.warning("auth: %s", "bearer token" if api.state.token else "none (every route is open)")

    async def _call(self, method: str, adapter_id: str | None, *args, stream: bool = False):
        handle = self.model.options(multiplexed_model_id=adapter_id or "", stream=stream)
        response = getattr(handle, method).remote(*args)
        return response if stream else await self._answer(response, response)

    async def _answer(self, pending, response):
        """`pending` (the model's answer, or a stream's first part) within the request timeout,
        with the model's failures as HTTP errors; a request past its time is cancelled."""
        timeout = self.settings.request_timeout_s
        try:
            return await asyncio.wait_for(pending, timeout)
        except TimeoutError:
            response.cancel()
            raise Unavailable("model", f"no answer within {timeout:g} s; retry later, or send less") from None
        except (RayActorError, ActorUnavailableError):  # the replica died under the request; Serve replaces it
            raise Unavailable("model", "the model replica serving this request stopped; retry") from None
        except Exception as err:
            err = _cause(err)
            if isinstance(err, BackPressureError):
                raise Unavailable("model", "the model replicas' queues are full; retry later") from None
            raise err from None

    async def _decoder(self, name: str | None) -> str:
        ref = name or self.settings.decoder_name()
        # A configured folder resolves in place; only a registry lookup is worth a thread hop.
        return self.decoders.configured(ref) or await asyncio.to_thread(self.decoders.locate, ref, "decoder")

    @api.get("/healthz", tags=["ops"])
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @api.get("/v1/decoders", tags=["read"])
    async def list_decoders(self) -> dict:
        rows = await asyncio.to_thread(self.decoders.listing, self.settings.control_model_prefix)
        return {"default": self.settings.decoder_name(), "decoders": rows}

    @api.post("/v1/read", tags=["read"], response_model=ReadResponse)
    async def read(self, body: ReadRequest) -> ReadResponse:
        """Answer every question about every dialog from the dialog's activations."""
        decoder = await self._decoder(body.decoder)
        dialogs = [[m.model_dump() for m in d] for d in body.dialogs]
        layer, answers = await self._call(
            "read", decoder, dialogs, body.questions, body.read_layer, body.max_new_tokens
        )
        results = [[ReadAnswer(question=q, answer=a) for q, a in zip(body.questions, row)] for row in answers]
        return ReadResponse(decoder=decoder, read_layer=layer, results=results)

    @api.post("/v1/score", tags=["read"], response_model=ScoreResponse)
    async def score(self, body: ScoreRequest) -> ScoreResponse:
        """Rank candidate answers to a question about a dialog by the decoder's loss, best first."""
        decoder = await self._decoder(body.decoder)
        dialog = [m.model_dump() for m in body.dialog]
        if body.baselines:
            contrast = [m.model_dump() for m in body.contrast_dialog] if body.contrast_dialog else CONTRAST_DIALOG
            layer, rows = await self._call(
                "score_baselines", decoder, dialog, body.question, body.candidates, body.read_layer, contrast
            )
            return ScoreResponse(decoder=decoder, read_layer=layer, ranked=[ScoredCandidate(**row) for row in rows])
        layer, ranked = await self._call("score", decoder, dialog, body.question, body.candidates, body.read_layer)
        return ScoreResponse(
            decoder=decoder, read_layer=layer, ranked=[ScoredCandidate(answer=a, loss=loss) for a, loss in ranked]
        )

    @api.post("/v1/layers", tags=["read"], response_model=LayerMapResponse)
    async def layer_map(self, body: LayerMapRequest) -> LayerMapResponse:
        """The answer (or each candidate's loss) with activations read at every layer, in one request."""
        decoder = await self._decoder(body.decoder)
        dialog = [m.model_dump() for m in body.dialog]
        read_layer, rows = await self._call(
            "layer_map", decoder, dialog, body.question, body.candidates, body.layers, body.max_new_tokens
        )
        return LayerMapResponse(decoder=decoder, read_layer=read_layer, rows=[LayerRow(**row) for row in rows])

    @api.get("/v1/target", tags=["read"])
    async def target(self) -> dict:
        """The target: its chat name, its blocks (read layers 0 .. layers-1), the roles its chat
        template renders (`roles`; `system_placement`: own_turn, or folded/merged into a user turn),
        and what a request that says nothing gets: the paper's questions, the shuffled baseline's
        contrast dialog."""
        from latentqa.data import DEFAULT_QUESTIONS

        return {
            "name": self.settings.target_name,
            "layers": self.target_layers,
            **self.target_roles,
            "questions": DEFAULT_QUESTIONS,
            "contrast_dialog": CONTRAST_DIALOG,
        }

    @api.get("/v1/models", tags=["chat"])
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

    @api.post("/v1/chat/completions", tags=["chat"])
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
        # The first part comes after the replica's checks: a bad request still gets its 4xx.
        first = await self._answer(parts.__anext__(), parts)
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

    @api.post("/v1/controls", tags=["control"], status_code=202, response_model=ControlJob)
    async def start_control(self, body: ControlRequest) -> ControlJob:
        """Start training a control adapter; poll GET /v1/controls/{id} for progress."""
        decoder = await self._decoder(body.decoder)
        try:
            job_id = await self.steering.submit.remote(body.model_dump(), decoder)
        except Exception as err:
            raise _cause(err) from None
        return await self.get_control(job_id)

    @api.get("/v1/controls/{job_id}", tags=["control"], response_model=ControlJob)
    async def get_control(self, job_id: str) -> ControlJob:
        """Status and progress of a control job; when it succeeded, `adapter` is the chat `model`."""
        status = await asyncio.to_thread(controls.job_status, self.settings.tracking_uri(), job_id)
        if status is None:
            raise UnknownAdapter("job_id", f"no control job {job_id!r}", place="path")
        return ControlJob(**status)
