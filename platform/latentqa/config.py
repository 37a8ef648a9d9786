"""One pydantic configuration for every LatentQA entry point.

Defaults are the offline default (the project's tiny Llama, its tokenizer and its dataset), so
every command runs with no arguments; `infra/configs/*.yaml` hold the paper's settings for
real models. A YAML file plus dotted command-line overrides (`--train.lr 3e-5`) build a config,
validated before anything is loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .data import DatasetSpec
from .paths import OFFLINE_HELDOUT, OFFLINE_MODEL, OFFLINE_TRAIN, RUNS_DIR


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _absolute_if_local(value: str | None) -> str | None:
    """A relative path that exists from the current folder, made absolute (so Ray workers, which
    run elsewhere, find it); hub ids and absolute paths pass through."""
    if value is None or Path(value).is_absolute() or not Path(value).exists():
        return value
    return str(Path(value).resolve())


class ModelConfig(_Strict):
    """The target model (and the decoder's base): one copy serves both."""

    path: str = str(OFFLINE_MODEL)  # HF folder, hub id, or a .gguf file (converted once, latentqa.model_files)
    tokenizer: str | None = None  # defaults to `path`
    chat_template: str | None = None  # a Jinja file that replaces the tokenizer's template (base models have none)
    weights: Literal["pretrained", "random"] = "random"  # random: initialise from the config with init_seed
    init_seed: int = 0
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "auto"  # auto: cuda if available, else cpu
    attn_implementation: str | None = None  # e.g. "sdpa", "flash_attention_2"; None: transformers' default
    decoder_adapter: str | None = None  # a PEFT adapter dir (e.g. the published decoder); None: new LoRA

    _local_paths = field_validator("path", "tokenizer", "chat_template", "decoder_adapter")(_absolute_if_local)


class LoraSettings(_Strict):
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]


class PatchConfig(_Strict):
    """Where activations are read and written (SPEC "Patching")."""

    read_layer: int = 1  # L: the block whose output is read (Llama-3-8B: 15; the tiny offline model: 1)
    min_layer: int | None = None  # training samples L from [min_layer, max_layer) when both are set
    max_layer: int | None = None
    write_layer: int = 0  # W
    mode: Literal["replace", "add"] = "replace"
    shift_position_ids_train: bool = True  # the published decoder trained with the shift ...
    shift_position_ids_read: bool = False  # ... and reads without it
    thought_tokens: bool = False

    @model_validator(mode="after")
    def _layer_range(self) -> PatchConfig:
        if (self.min_layer is None) != (self.max_layer is None):
            raise ValueError("set both min_layer and max_layer to sample read layers, or neither")
        if self.min_layer is not None and not 0 <= self.min_layer < self.max_layer:
            raise ValueError("need 0 <= min_layer < max_layer")
        return self


class DataConfig(_Strict):
    train: DatasetSpec = DatasetSpec(path=OFFLINE_TRAIN)
    eval: DatasetSpec | None = DatasetSpec(path=OFFLINE_HELDOUT)


class TrainConfig(_Strict):
    lr: float = 2e-3
    weight_decay: float = 0.01
    epochs: int = 6
    max_steps: int | None = None  # optimizer steps; stops early when set
    batch_size: int = 8  # per device
    grad_accum: int = 1
    warmup_steps: int = 10
    max_grad_norm: float | None = 1.0
    ema_decay: float | None = Field(None, gt=0, lt=1)  # evaluate and save a moving average of the weights
    eval_every: int = 100  # optimizer steps; 0 disables
    eval_batches: int | None = None  # cap on eval batches (None: whole eval set)
    seed: int = 0
    run_name: str = "offline-default"
    output_dir: Path = RUNS_DIR


class SteerConfig(_Strict):
    """Control (steering): a LoRA on the target's first blocks, trained through the frozen decoder."""

    layers: int = 2  # adapter on target blocks 0 .. layers-1, read at block layers-1 (SPEC, 8B: 16, read at L=15)
    r: int = 16
    alpha: int = 32
    dropout: float = 0.1
    lr: float = 1e-3
    steps: int = 40
    batch_size: int = 4
    per_layer: bool = False
    seed: int = 0


class LatentQAConfig(_Strict):
    model: ModelConfig = ModelConfig()
    lora: LoraSettings = LoraSettings()
    patch: PatchConfig = PatchConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    steer: SteerConfig = SteerConfig()
    strategy: dict[str, Any] = Field(default_factory=dict)  # latentqa.strategy.StrategyConfig fields


class ConfigError(ValueError):
    """A configuration that does not validate; the message names the field."""


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for key in parents:
        tree = tree.setdefault(key, {})
        if not isinstance(tree, dict):
            raise ConfigError(f"--{dotted}: {key!r} is not a section")
    tree[leaf] = value


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """`--train.lr 3e-5 --patch.mode=add` -> {"train": {"lr": 3e-5}, "patch": {"mode": "add"}}.

    Values are read as YAML scalars, so numbers, booleans and lists need no quoting.
    """
    tree: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"expected --section.field VALUE, got {arg!r}")
        if "=" in arg:
            key, raw = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"{arg} needs a value")
            key, raw = arg[2:], args[i + 1]
            i += 2
        _set_dotted(tree, key, yaml.safe_load(raw))
    return tree


def merge_trees(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = merge_trees(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML config file as a tree of sections."""
    try:
        tree = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: cannot read config: {err}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: a config file is a mapping of sections")
    return tree


def validation_message(source: str, err: ValidationError) -> str:
    """`source: section.field: problem; ...` for a pydantic error."""
    problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors())
    return f"{source}: {problems}"


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> LatentQAConfig:
    """Defaults, then the YAML file, then overrides; errors name the offending field."""
    tree = read_config_file(path) if path is not None else {}
    if overrides:
        tree = merge_trees(tree, overrides if isinstance(overrides, dict) else parse_overrides(overrides))
    try:
        return LatentQAConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(validation_message(str(path or "config"), err)) from None
