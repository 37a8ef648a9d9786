"""What the Serve app (`serve/app.py`) accepts and answers: its settings, the request and response
models with their limits, and the errors that become 4xx answers.

Kept apart from the deployments so that the HTTP contract is readable (and testable) on its own.
Every limit is a pydantic constraint, so an oversize request fails with a 422 naming the field
before any model work; only the per-turn token limit needs the tokenizer and is checked in the app.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

from latentqa.config import LatentQAConfig, StrictModel, load_config
from latentqa.data import read_prompt_set
from latentqa.paths import RUNS_DIR, STEER_PROMPTS

from .settings import MlflowSettings, tracking_uri

# Hard caps on request shape; they bound the work one request can cause.
MAX_DIALOGS = 16
MAX_QUESTIONS = 16
MAX_MESSAGES = 32
MAX_CANDIDATES = 32
MAX_NEW_TOKENS = 256
MAX_CONTROL_PAIRS = 64
MAX_CONTROL_STEPS = 200
MAX_TEXT_CHARS = 8000  # before tokenising; the token limit per turn is `ServeSettings.max_turn_tokens`
MAX_LAYERS = 256  # read layers in one layer map; the target's own count is the real bound
# Sampling below it overflows the scaled logits (1e-45 is 0 in float32) and generation fails on
# NaN probabilities; a smaller positive temperature samples at it, as vLLM does.
MIN_TEMPERATURE = 0.01

# Names become MLflow model names and multiplexing ids, never file paths.
NAME_PATTERN = r"^[a-z0-9][a-z0-9-]{0,47}$"
Name = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]
Text = Annotated[str, StringConstraints(min_length=1, max_length=MAX_TEXT_CHARS)]
Role = Annotated[str, StringConstraints(pattern=r"^[a-z_]{1,20}$")]


class ServeSettings(StrictModel):
    """The app's configuration (`args:` of an application in `serve/config.yaml`)."""

    config: str | None = None
    """Engine config YAML (model, patch, steer sections); None: the offline default."""
    overrides: list[str] = []
    """Dotted engine overrides, e.g. ["--patch.read_layer", "15"]."""
    decoders: dict[Name, str] = {}
    """Decoders served by name: a registry URI (`models:/name@alias`, `models:/name/3`) or a local
    PEFT folder. Requests may also name a registered version directly (`name/3`, `name@alias`)."""
    default_decoder: Name | None = None
    """The decoder a read uses when the request names none; None: the first of `decoders`."""
    controls: dict[Name, str] = {}
    """Control adapters served by name (same forms as `decoders`), besides registered ones."""
    target_name: Name = "target"
    """The chat-completions `model` that means the target with no control adapter."""
    mlflow: MlflowSettings = MlflowSettings()
    control_model_prefix: Name = "latentqa-control-"
    """Control adapters trained by POST /v1/controls are registered as `<prefix><name>`."""
    steer_prompts: str = str(STEER_PROMPTS)
    """Prompt set a control is trained on ({"train": [...], "heldout": [...]})."""
    control_questions: list[str] = [
        "What type of persona will the assistant adopt?",
        "How does the assistant talk?",
        "What is the assistant trying to do?",
        "Please describe the assistant's goal.",
    ]
    """Questions read under an instruction to build a control when a request gives no QA pairs."""
    verbose: bool = False
    """Each request's access lines, library warnings and loading bars on `serve run`'s console too;
    false: only in Ray's Serve logs (`/tmp/ray/session_latest/logs/serve/`)."""
    max_queued_controls: int = Field(8, ge=1)
    """Control jobs queued or running at once; past it, POST /v1/controls gets 429 and Retry-After."""
    max_adapters_per_replica: int = Field(4, ge=1)
    max_batch_size: int = Field(8, ge=1)
    batch_wait_timeout_s: float = Field(0.05, ge=0)
    """How long an idle model replica waits for reads to batch with, only where some are expected
    (its last batch held several); reads that queue while a batch runs never wait, and a lone
    client's read waits at most once, right after a batch of several (`latentqa_platform.batching`)."""
    max_turn_tokens: int = Field(512, ge=1)
    """Tokens of any one text: a message, a question, a candidate, a control's QA pair or instruction."""
    max_dialog_tokens: int = Field(4096, ge=16)
    """Tokens of a dialog as the target reads it (its chat template rendered), and of a chat
    prompt; never past the target's context, which also bounds the decoder's prompt plus its answer."""
    max_generated_tokens: int = Field(16384, ge=1)
    """Tokens one /v1/read may generate: dialogs × questions × max_new_tokens."""
    max_scored_tokens: int = Field(32768, ge=1)
    """Tokens one /v1/score runs the decoder over: its prompt and one candidate, for every candidate."""
    max_prefill_tokens: int = Field(65536, ge=1)
    """Decoder prompt tokens one /v1/read (or layer map) prefills: a prompt for every dialog ×
    question (× layer), each the dialog's read span of placeholders and the question."""
    max_queued_requests: int = Field(64, ge=1)
    """Requests waiting for a gateway or a model replica (per caller, as Serve counts them); past
    it the answer is 503 with Retry-After."""
    request_timeout_s: float = Field(300.0, gt=0)
    """A read, score or chat the model has not answered by then is cancelled: 503 with Retry-After."""
    auth: Literal["token", "none"] = "token"
    """token: every route but /healthz and the playground page's files (the API docs too) needs `Authorization: Bearer <token>`,
    and the app refuses to start without a token; none: no auth (a loopback trial only)."""
    auth_token_file: str | None = None
    """A file holding the token, e.g. a mounted Kubernetes Secret; outranks `auth_token_env`."""
    auth_token_env: str = "LATENTQA_API_TOKEN"
    """The environment variable holding the token on the gateway replicas (no file given)."""
    max_body_bytes: int = Field(1 << 21, ge=1024)
    """Largest request body, refused with 413 before it is read (so before it is parsed)."""

    def auth_token(self) -> str | None:
        """The bearer token; None with `auth: none`. Fails closed: with `auth: token`, an empty or
        missing token stops the app from starting, naming where it looked."""
        if self.auth == "none":
            return None
        if self.auth_token_file:
            try:
                token = Path(self.auth_token_file).read_text().strip()
            except OSError as err:
                raise ValueError(f"auth_token_file: cannot read {self.auth_token_file}: {err.strerror}") from None
            where = f"auth_token_file {self.auth_token_file}"
        else:
            token, where = os.environ.get(self.auth_token_env, "").strip(), f"${self.auth_token_env}"
        if not token:
            raise ValueError(f"auth: token, but {where} holds none; set a token there, or `auth: none` for no auth")
        return token

    def engine_config(self) -> LatentQAConfig:
        return load_config(self.config, self.overrides)

    def tracking_uri(self) -> str:
        return tracking_uri(self.mlflow, RUNS_DIR)

    def decoder_name(self) -> str:
        if self.default_decoder:
            return self.default_decoder
        if not self.decoders:
            raise ValueError("ServeSettings.decoders is empty: configure at least one decoder")
        return next(iter(self.decoders))

    def read_prompts(self) -> tuple[list[str], list[str]]:
        return read_prompt_set(self.steer_prompts)


# ---------------------------------------------------------------- errors


class RequestError(ValueError):
    """A request the server cannot serve; `field` is the path it blames (422 or 404) in the body,
    or (`place="path"`) in the URL's path parameters."""

    status = 422

    def __init__(self, field: str, message: str, place: Literal["body", "path"] = "body"):
        super().__init__(f"{field}: {message}")
        self.field, self.message, self.place = field, message, place

    def __reduce__(self):  # crosses Ray process boundaries intact
        return (type(self), (self.field, self.message, self.place))


class UnknownAdapter(RequestError):
    status = 404


class Overloaded(RequestError):
    """Too much work queued already: 429, retry later."""

    status = 429
    retry_after_s = 30


class Unavailable(RequestError):
    """Something the request needs is down or busy for now (the model registry, a replica, a full
    queue, a timeout): 503, retry later."""

    status = 503
    retry_after_s = 5


def check_tokens(count_tokens, texts: dict[str, str], limit: int) -> None:
    """Each text at most `limit` tokens; `texts` maps the body field it came from to the text."""
    for field, text in texts.items():
        tokens = count_tokens(text)
        if tokens > limit:
            raise RequestError(field, f"{tokens} tokens; at most {limit}")


# ---------------------------------------------------------------- requests and answers


class Message(StrictModel):
    role: Role = Field(description="any role the target's chat template accepts (system, user, assistant, ...)")
    content: Annotated[str, StringConstraints(max_length=MAX_TEXT_CHARS)]


Dialog = Annotated[list[Message], Field(min_length=1, max_length=MAX_MESSAGES)]


class ReadRequest(StrictModel):
    dialogs: list[Dialog] = Field(min_length=1, max_length=MAX_DIALOGS, description="dialogs to read")
    questions: list[Text] = Field(min_length=1, max_length=MAX_QUESTIONS, description="asked about every dialog")
    decoder: str | None = Field(
        None, max_length=200, description="a name from GET /v1/decoders, or `model/3`, `model@alias`"
    )
    read_layer: int | None = Field(None, ge=0, description="target block to read; default: the decoder's")
    max_new_tokens: int = Field(48, ge=1, le=MAX_NEW_TOKENS)


class ReadAnswer(BaseModel):
    question: str
    answer: str


class ReadResponse(BaseModel):
    decoder: str
    read_layer: int
    results: list[list[ReadAnswer]] = Field(description="results[d][q]: dialog d, question q")


# The shuffled baseline's stand-in for "another label's dialog" when a request names none: a
# plain factual exchange, with no persona or goal for the decoder to find.
CONTRAST_DIALOG = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
]


class ScoreRequest(StrictModel):
    dialog: Dialog
    question: Text
    candidates: list[Text] = Field(min_length=1, max_length=MAX_CANDIDATES)
    decoder: str | None = Field(None, max_length=200)
    read_layer: int | None = Field(None, ge=0)
    baselines: bool = Field(
        False,
        description="also score every candidate as the evaluation suite's baselines do: with the activations "
        "of `contrast_dialog` (shuffled) and with none; about three times the work",
    )
    contrast_dialog: Dialog | None = Field(
        None, description="the shuffled baseline's dialog (default: a plain factual exchange, GET /v1/target)"
    )

    @model_validator(mode="after")
    def _contrast_with_baselines(self) -> ScoreRequest:
        if self.contrast_dialog is not None and not self.baselines:
            raise ValueError("contrast_dialog is the shuffled baseline's dialog: send it with baselines: true")
        return self


class ScoredCandidate(BaseModel):
    answer: str
    loss: float
    loss_shuffled: float | None = Field(None, description="with `baselines`: with the contrast dialog's activations")
    loss_none: float | None = Field(None, description="with `baselines`: with no activations")


class ScoreResponse(BaseModel):
    decoder: str
    read_layer: int
    ranked: list[ScoredCandidate] = Field(description="best (lowest loss) first")


class LayerMapRequest(StrictModel):
    dialog: Dialog
    question: Text
    candidates: list[Text] | None = Field(
        None, min_length=1, max_length=MAX_CANDIDATES, description="score these at every layer; none: answer there"
    )
    layers: list[Annotated[int, Field(ge=0)]] | None = Field(
        None, min_length=1, max_length=MAX_LAYERS, description="read layers; default: every block of the target"
    )
    decoder: str | None = Field(None, max_length=200)
    max_new_tokens: int = Field(32, ge=1, le=MAX_NEW_TOKENS)


class LayerRow(BaseModel):
    layer: int
    answer: str | None = Field(None, description="the answer with activations read at this layer (no candidates)")
    losses: list[float] | None = Field(None, description="each candidate's loss at this layer, in the order sent")


class LayerMapResponse(BaseModel):
    decoder: str
    read_layer: int = Field(description="the layer the decoder was trained to read")
    rows: list[LayerRow]


class ChatRequest(BaseModel):
    """The OpenAI chat-completions request; fields this server does not use are accepted and
    ignored (clients send them), but unsupported values of the ones below are rejected."""

    model_config = ConfigDict(allow_inf_nan=False)  # a NaN temperature is "not a finite number"

    model: str = Field(max_length=200, description="the target's name, or a control adapter")
    messages: Dialog
    max_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    temperature: float = Field(
        0.0, ge=0.0, le=2.0, description=f"0: greedy; a positive value below {MIN_TEMPERATURE} samples at it"
    )
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: Literal[1] = 1
    stream: bool = False
    seed: int | None = Field(None, ge=0, lt=2**63, description="for sampled replies")

    @field_validator("temperature")
    @classmethod
    def _sampling_floor(cls, value: float) -> float:
        return max(value, MIN_TEMPERATURE) if value > 0 else value

    @property
    def new_tokens(self) -> int:
        return self.max_completion_tokens or self.max_tokens or 64


class ControlRequest(StrictModel):
    name: Name = Field(description="the control's name; registered as `<prefix><name>`")
    qa: list[tuple[Text, Text]] | None = Field(None, min_length=1, max_length=MAX_CONTROL_PAIRS)
    instruction: Text | None = Field(None, description="read QA pairs from the target under this instruction")
    questions: list[Text] | None = Field(None, min_length=1, max_length=MAX_QUESTIONS)
    decoder: str | None = Field(None, max_length=200)
    steps: int | None = Field(None, ge=1, le=MAX_CONTROL_STEPS, description="default: the engine's steer.steps")
    lr: float | None = Field(None, gt=0, le=1)

    @model_validator(mode="after")
    def _one_source(self) -> ControlRequest:
        if (self.qa is None) == (self.instruction is None):
            raise ValueError("give exactly one of qa (control pairs) and instruction")
        return self


class ControlJob(BaseModel):
    id: str
    name: str
    status: Literal["queued", "running", "succeeded", "failed"]
    progress: float = Field(description="fraction of steps done")
    step: int
    steps: int
    loss: float | None = None
    adapter: str | None = Field(None, description="when succeeded: the `model` to use in /v1/chat/completions")
    error: str | None = None


def chat_completion(model: str, text: str, prompt_tokens: int, completion_tokens: int, finish: str) -> dict:
    return {
        "id": f"chatcmpl-{time.time_ns():x}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def chat_chunk(completion_id: str, model: str, delta: dict, finish: str | None = None) -> dict:
    return {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
