"""Where the offline default lives in the project tree (the library is installed editable)."""

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
OFFLINE_MODEL = PROJECT_ROOT / "infra" / "models" / "tiny-llama"
OFFLINE_TRAIN = PROJECT_ROOT / "datasets" / "offline" / "train"
OFFLINE_HELDOUT = PROJECT_ROOT / "datasets" / "offline" / "heldout"
STEER_PROMPTS = PROJECT_ROOT / "datasets" / "prompts" / "steer.json"
CONTROLS_DIR = PROJECT_ROOT / "controls"
RUNS_DIR = PROJECT_ROOT / "runs"
