"""Where the offline default lives in the project tree (the library is installed editable)."""

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
OFFLINE_MODEL = PROJECT_ROOT / "infra" / "models" / "tiny-llama"
OFFLINE_TRAIN = PROJECT_ROOT / "datasets" / "offline" / "train"
OFFLINE_HELDOUT = PROJECT_ROOT / "datasets" / "offline" / "heldout"
STEER_PROMPTS = PROJECT_ROOT / "datasets" / "prompts" / "steer.json"
PAPER_DATA = PROJECT_ROOT / "datasets" / "latentqa"  # the paper's evaluation set, split by label
# Real tokenizers with their models' chat templates, fetched by infra/setup.sh (infra/tokenizers/)
FETCHED_TOKENIZERS = PROJECT_ROOT / "infra" / "tokenizers" / "cache"
CONTROLS_DIR = PROJECT_ROOT / "controls"
# Control adapters trained through a shipped decoder: infra/controls/<decoder folder name>/<control>/
SHIPPED_CONTROLS = PROJECT_ROOT / "infra" / "controls"
RUNS_DIR = PROJECT_ROOT / "runs"


NAME_MAX = 255  # bytes in one file or folder name (Linux, macOS)


def usable_path(path: Path) -> Path:
    """`path`, if the OS can take it: no NUL and no name over NAME_MAX bytes (either fails every use,
    even `exists()`)."""
    if "\0" in str(path) or any(len(os.fsencode(part)) > NAME_MAX for part in path.parts):
        raise ValueError(f"not a usable path: a NUL, or a name of over {NAME_MAX} bytes")
    return path


def latest_decoder(runs: Path = RUNS_DIR) -> Path:
    """The most recently trained decoder under `runs/` (by `latentqa train` or `jobs/train.py`)."""
    found = sorted(runs.glob("*/decoder/adapter_config.json"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"no trained decoder under {runs}: train one first, or name one with --decoder DIR")
    return found[-1].parent
