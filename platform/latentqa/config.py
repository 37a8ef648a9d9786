"""One pydantic configuration for every LatentQA entry point.

Defaults are the offline default (the project's tiny Llama, its tokenizer and its dataset), so
every command runs with no arguments; `infra/configs/*.yaml` hold the paper's settings for
real models. A YAML file plus dotted command-line overrides (`--train.lr 3e-5`) build a config,
validated before anything is loaded.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .data import DatasetSpec
from .mixes import MixSource
from .paths import OFFLINE_HELDOUT, OFFLINE_MODEL, OFFLINE_TRAIN, PROJECT_ROOT, RUNS_DIR, usable_path


class StrictModel(BaseModel):
    """Every config section and request body: unknown fields are errors, assignments are checked.
    Each field's docstring is its description (`--help` lists them, `describe_fields`)."""

    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, use_attribute_docstrings=True, allow_inf_nan=False
    )


def _absolute_if_local(value: str | None) -> str | None:
    """A relative path that exists from the current folder, made absolute (so Ray workers, which
    run elsewhere, find it); hub ids and absolute paths pass through."""
    if value is None or Path(value).is_absolute() or not os.path.exists(value):  # False for a NUL, a long name
        return value
    return str(Path(value).resolve())


class ModelConfig(StrictModel):
    """The target model (and the decoder's base): one copy serves both."""

    path: str = str(OFFLINE_MODEL)
    """HF folder, hub id, or a .gguf file (converted once, latentqa.model_files)."""
    tokenizer: str | None = None
    """Tokenizer folder; null: `path`."""
    chat_template: str | None = None
    """A Jinja file that replaces the tokenizer's chat template (base models have none)."""
    weights: Literal["pretrained", "random"] = "random"
    """pretrained: load them; random: initialise from the model's config with init_seed."""
    init_seed: int = 0
    """Seed of random weights (every process builds the same base)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weights and compute dtype."""
    device: str = "auto"
    """auto: cuda if available, else cpu."""
    attn_implementation: str | None = None
    """e.g. sdpa, flash_attention_2; null: transformers' default."""
    decoder_adapter: str | None = None
    """A PEFT decoder adapter folder (e.g. the published decoder) or a registered decoder
    (`models:/NAME/3`, `NAME@alias`); null: a new LoRA."""

    _local_paths = field_validator("path", "tokenizer", "chat_template", "decoder_adapter")(_absolute_if_local)


class LoraSettings(StrictModel):
    """The decoder's LoRA."""

    r: int = Field(16, ge=1)
    """LoRA rank."""
    alpha: int = 32
    """LoRA scaling numerator (scale = alpha / r)."""
    dropout: float = Field(0.05, ge=0, lt=1)
    """Dropout on the LoRA input."""
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
    """Module names that get a LoRA."""


class PatchConfig(StrictModel):
    """Where activations are read and written (SPEC "Patching")."""

    read_layer: int = Field(1, ge=0)
    """L: the block whose output is read (Llama-3-8B: 15; the tiny offline model: 1)."""
    min_layer: int | None = None
    """With max_layer: training samples L from [min_layer, max_layer)."""
    max_layer: int | None = None
    """See min_layer."""
    write_layer: int = Field(0, ge=0)
    """W: the decoder block whose output is patched at the placeholders."""
    mode: Literal["replace", "add"] = "replace"
    """Replace the placeholders' hidden states, or add the activations to them."""
    shift_position_ids_train: bool = True
    """The published decoder trained with decoder position ids shifted past the read dialog ..."""
    shift_position_ids_read: bool = False
    """... and reads without the shift."""
    thought_tokens: bool = False
    """Reasoning targets: read with the template's thinking on, a completion as generated (docs/chat-templates.md)."""

    @model_validator(mode="after")
    def _layer_range(self) -> PatchConfig:
        if (self.min_layer is None) != (self.max_layer is None):
            raise ValueError("set both min_layer and max_layer to sample read layers, or neither")
        if self.min_layer is not None and not 0 <= self.min_layer < self.max_layer:
            raise ValueError("need 0 <= min_layer < max_layer")
        return self


class DataConfig(StrictModel):
    """The training set and the held-out set."""

    train: DatasetSpec = DatasetSpec(path=OFFLINE_TRAIN)
    """The training set."""
    eval: DatasetSpec | None = DatasetSpec(path=OFFLINE_HELDOUT)
    """The held-out set; null: none."""
    mix: list[MixSource] = []
    """More sources for the train set (latentqa.mixes): yes/no questions and context prediction
    from record files, each with its weight in examples; e.g. [{kind: yes_no, path:
    datasets/latentqa/train-prompts/system.json, examples: 2000}] (YAML, or JSON on the command line)."""


class TrainConfig(StrictModel):
    """The decoder's training loop: AdamW with a cosine schedule stepped per optimizer step."""

    lr: float = Field(2e-3, gt=0)
    """Peak learning rate."""
    weight_decay: float = Field(0.01, ge=0)
    """AdamW weight decay."""
    epochs: int = Field(6, ge=1)
    """Passes over the training set."""
    max_steps: int | None = Field(None, ge=1)
    """Optimizer steps; stops early when set."""
    batch_size: int = Field(8, ge=1)
    """Examples per device per micro-batch; with batch_tokens, the typical count (batches are cut
    from length-sorted windows of 64 x batch_size examples, 256 x with batch_tokens)."""
    batch_tokens: int | None = Field(None, ge=1)
    """Token budget per micro-batch: batches of similar length grow while their padded tokens
    (examples x (longest read dialog + longest decoder prompt)) stay within it, so short examples
    come many to a batch and long ones few (each batch's mean loss still counts alike, so label
    tokens, not examples, weigh about evenly); null: batch_size examples per batch."""
    grad_accum: int = Field(1, ge=1)
    """Micro-batches per optimizer step."""
    warmup_steps: int = Field(10, ge=0)
    """Linear warmup, in optimizer steps."""
    max_grad_norm: float | None = Field(1.0, gt=0)
    """Clip the gradient norm to this; null: no clipping."""
    ema_decay: float | None = Field(None, gt=0, lt=1)
    """Evaluate and save a moving average of the weights with this decay; null: none."""
    eval_every: int = Field(100, ge=0)
    """Optimizer steps between held-out evaluations; 0 disables."""
    eval_batches: int | None = Field(None, ge=1)
    """Cap on eval batches; null: the whole held-out set."""
    seed: int = 0
    """Seed of data order and initialisation."""
    run_name: str = "offline-default"
    """Folder under output_dir (and the MLflow run's name)."""
    output_dir: Path = RUNS_DIR
    """Where runs are written."""

    @field_validator("run_name")
    @classmethod
    def _one_folder(cls, name: str) -> str:
        # A run writes only into its own folder under output_dir, never output_dir itself nor beside it.
        if name in ("", ".", "..") or "/" in name or "\\" in name:
            raise ValueError("a run name is one folder name: not '', '.' or '..', no '/' or '\\'")
        usable_path(Path(f"{name}-YYYYmmdd-HHMMSS"))  # an unnamed run's folder takes a timestamp more
        return name

    _usable_output_dir = field_validator("output_dir")(usable_path)


class SteerConfig(StrictModel):
    """Control (steering): a LoRA on the target's first blocks, trained through the frozen decoder,
    read where the decoder reads."""

    layers: int | None = Field(None, ge=1)
    """Adapter on target blocks 0 .. layers-1, read at block layers-1; null: through the decoder's
    read layer (SPEC, 8B: 16, read at L=15). A value that reads elsewhere than the decoder is refused."""
    r: int = Field(16, ge=1)
    """Control LoRA rank."""
    alpha: int = 32
    """Control LoRA scaling numerator."""
    dropout: float = Field(0.1, ge=0, lt=1)
    """Dropout on the control LoRA input."""
    lr: float = Field(1e-3, gt=0)
    """Adam learning rate."""
    steps: int = Field(40, ge=1)
    """Optimizer steps."""
    batch_size: int = Field(4, ge=1)
    """Prompts per step."""
    per_layer: bool = False
    """Decode from every controlled block, each loss reaching only its own block."""
    kl_weight: float = Field(0.0, ge=0)
    """Weight of a term that keeps the steered target's next-token distribution near the target's
    on the target's own replies to the training prompts (KL(target || steered)); 0: none."""
    seed: int = 0
    """Seed of prompt and QA sampling and of the adapter's initialisation and dropout."""
    max_perplexity_ratio: float | None = Field(3.0, gt=0)
    """A control whose held-out completions' perplexity (under the target told to show the control)
    exceeds this multiple of the target's own completions' is reported degenerate; null: unchecked."""
    max_repeated_trigrams: float | None = Field(0.10, ge=0, le=1)
    """A control whose held-out completions repeat more than this share of their word 3-grams (and
    more than the target's own) is reported degenerate; null: unchecked."""


class LatentQAConfig(StrictModel):
    model: ModelConfig = ModelConfig()
    """The target model."""
    lora: LoraSettings = LoraSettings()
    """The decoder's LoRA."""
    patch: PatchConfig = PatchConfig()
    """Reading and writing activations."""
    data: DataConfig = DataConfig()
    """Training and held-out sets."""
    train: TrainConfig = TrainConfig()
    """The training loop."""
    steer: SteerConfig = SteerConfig()
    """Control adapters."""
    strategy: dict[str, Any] = Field(default_factory=dict)
    """latentqa.strategy.StrategyConfig fields (how training is parallelised)."""


class ConfigError(ValueError):
    """A configuration that does not validate; the message names the field."""


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    if not all((*parents, leaf)):
        raise ConfigError(f"--{dotted}: expected --section.field VALUE")
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
        _set_dotted(tree, key, _override_value(raw))
    return tree


def _override_value(raw: str) -> Any:
    """A value as YAML reads it (numbers, booleans, lists); one YAML cannot read is the string itself,
    which the field's own check then takes or names."""
    try:
        return yaml.safe_load(raw)
    except (yaml.YAMLError, ValueError, RecursionError):  # ValueError: an integer of 4,300+ digits
        return raw


def _problem(err: Exception) -> str:
    """An error on one line; a YAML error as its line, column and problem (PyYAML's spans several)."""
    mark, problem = getattr(err, "problem_mark", None), getattr(err, "problem", None)
    if mark is not None and problem is not None:
        return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
    return " ".join(str(err).split())


def merge_trees(base: dict, extra: dict) -> dict:
    """A recursive merge of two trees of sections; `extra` wins."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = merge_trees(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML config file as a tree of sections."""
    try:
        tree = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, ValueError, RecursionError, yaml.YAMLError) as err:  # ValueError: not UTF-8, a huge integer
        raise ConfigError(f"{path}: cannot read config: {_problem(err)}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: a config file is a mapping of sections")
    return tree


def validation_message(source: str, err: ValidationError, section: str = "") -> str:
    """`source: section.field: problem; ...` for a pydantic error; `section`: where the model sits."""

    def dotted(loc: tuple) -> str:
        # a key that is empty or holds a newline is quoted: the message stays one readable line
        parts = [str(part) if str(part).isprintable() and str(part) else repr(part) for part in loc]
        return ".".join([section, *parts] if section else parts)

    problems = "; ".join(f"{dotted(e['loc'])}: {e['msg']}" for e in err.errors())
    return f"{source}: {problems}"


def _over_default_sets(tree: dict) -> dict:
    """A data set given in part (`--data.train.filter sqa`) is read over its default (which has the path)."""
    data = tree.get("data")
    if not isinstance(data, dict):
        return tree
    defaults = DataConfig().model_dump()
    given = {
        name: spec for name, spec in data.items() if isinstance(spec, dict) and isinstance(defaults.get(name), dict)
    }
    return merge_trees(tree, {"data": {name: merge_trees(defaults[name], spec) for name, spec in given.items()}})


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> LatentQAConfig:
    """Defaults, then the YAML file, then overrides; errors name the offending field."""
    tree = read_config_file(path) if path is not None else {}
    if overrides:
        tree = merge_trees(tree, overrides if isinstance(overrides, dict) else parse_overrides(overrides))
    try:
        return LatentQAConfig.model_validate(_over_default_sets(tree))
    except ValidationError as err:
        raise ConfigError(validation_message(str(path or "config"), err)) from None


def describe_fields(model: type[BaseModel], prefix: str, values: BaseModel | None = None) -> list[tuple[str, str, str]]:
    """(--prefix.field, default, description) for every field of `model`, nested sections too;
    `values` is the section's default where its parent sets one (data.train's path)."""
    rows = []
    for name, info in model.model_fields.items():
        key = f"{prefix}.{name}"
        default = getattr(values, name) if values is not None else info.get_default(call_default_factory=True)
        nested = [
            t for t in (info.annotation, *get_args(info.annotation)) if isinstance(t, type) and issubclass(t, BaseModel)
        ]
        if nested and not isinstance(default, list):  # a list of sections (data.mix) is one field, set in YAML
            rows += describe_fields(nested[0], key, default)
            continue
        shown = "null" if default is None else str(default).replace(f"{PROJECT_ROOT}/", "")
        rows.append((f"--{key}", shown, " ".join((info.description or "").split())))
    return rows


def fields_help(sections: dict[str, type[BaseModel]], defaults: dict[str, str] | None = None) -> str:
    """Every field a user may set, with its default and meaning: the epilog of `--help`.
    `defaults` replaces the shown default of a key (`--strategy.kind`, which differs by command)."""
    hidden = {f"--strategy.{key}" for key in STRATEGY_FROM_TRAIN}
    rows = [
        (key, (defaults or {}).get(key.removeprefix("--"), default), description)
        for prefix, model in sections.items()
        for key, default, description in describe_fields(model, prefix)
        if key not in hidden
    ]
    width = max(len(key) for key, _, _ in rows)
    lines = [f"  {key:<{width}}  {description} (default: {default})" for key, default, description in rows]
    return "config fields (override any with --section.field VALUE):\n" + "\n".join(lines)


# Strategy fields set through the train section, which the single-process CLI shares with the
# distributed job: `strategy.<key>` is refused, `train.<value>` sets it.
STRATEGY_FROM_TRAIN = {"grad_accum_steps": "grad_accum", "max_grad_norm": "max_grad_norm", "ema_decay": "ema_decay"}


def engine_sections() -> dict[str, type[BaseModel]]:
    """The engine's config sections, the strategy's included."""
    from .strategy import StrategyConfig

    sections = {name: info.annotation for name, info in LatentQAConfig.model_fields.items() if name != "strategy"}
    return {**sections, "strategy": StrategyConfig}
