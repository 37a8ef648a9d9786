"""Load one base model and the adapters that make it target, decoder and control.

SPEC "Words": target = base with adapters off (or with a control adapter), decoder = base +
decoder adapter. Both share the base weights, so only one copy is ever in memory.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from .config import LoraSettings, ModelConfig, SteerConfig
from .model_files import ModelFileError, check_target, hf_folder, write_target_identity

log = logging.getLogger(__name__)
DECODER = "decoder"
CONTROL = "control"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_BASE_DEVICE: ContextVar[str | None] = ContextVar("latentqa_base_device", default=None)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_tokenizer(cfg: ModelConfig):
    tokenizer = AutoTokenizer.from_pretrained(hf_folder(cfg.tokenizer or cfg.path))
    if cfg.chat_template:
        try:
            tokenizer.chat_template = Path(cfg.chat_template).read_text()
        except OSError as err:
            raise ModelFileError(f"model.chat_template: cannot read {cfg.chat_template}: {err}") from None
    return tokenizer


def load_model_config(cfg: ModelConfig):
    """The model's transformers config (architecture and sizes; no weights)."""
    return AutoConfig.from_pretrained(hf_folder(cfg.path))


@contextlib.contextmanager
def base_placed_on(device: str) -> Iterator[None]:
    """Inside, `load_base` leaves the base on `device` instead of `model.device`, for a strategy
    that shards it before it reaches the accelerator (FSDP2's loading on rank 0): "cpu" loads the
    weights there; "meta" builds the modules without weights, for the strategy to fill in."""
    token = _BASE_DEVICE.set(device)
    try:
        yield
    finally:
        _BASE_DEVICE.reset(token)


def load_base(cfg: ModelConfig) -> PreTrainedModel:
    """The base weights, or a model initialised from the config (tiny test models, benchmarks)."""
    kwargs = {"dtype": _DTYPES[cfg.dtype]}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    placed_on = _BASE_DEVICE.get()
    if placed_on == "meta":  # no weights, no memory: the modules only
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(load_model_config(cfg), **kwargs)
    elif cfg.weights == "random":
        torch.manual_seed(cfg.init_seed)  # every process builds the same base
        model = AutoModelForCausalLM.from_config(load_model_config(cfg), **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(hf_folder(cfg.path), **kwargs)
    model.requires_grad_(False)
    return model.to(placed_on or resolve_device(cfg.device)).eval()


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's own list of decoder blocks (Llama, Mistral, Qwen2/3, Gemma: `model.layers`).

    Found by structure, not by name: the ModuleList whose children are all decoder layers
    (through PEFT wrappers, and after FSDP2 renames their classes `FSDP<Name>`).
    """
    for module in model.modules():
        if (
            isinstance(module, nn.ModuleList)
            and len(module)
            and all(type(child).__name__.endswith("DecoderLayer") for child in module)
        ):
            return module
    raise ValueError(f"cannot find the decoder blocks of {type(model).__name__}: no ModuleList of *DecoderLayer")


def _lora_config(settings: LoraSettings) -> LoraConfig:
    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


class AdapterSet:
    """The PEFT model over the one base, and which of its adapters is active and trainable.

    PEFT's adapter switches also flip requires_grad; we switch freely and re-impose the
    trainable set, so a frozen decoder stays frozen while a control adapter learns.
    """

    def __init__(self, peft_model: PeftModel, trainable: set[str]):
        self.model = peft_model
        self.trainable = trainable
        self._train_decoder = DECODER in trainable
        self._adapter_layers: list[nn.Module] | None = None  # found again whenever adapters change
        self._enforce()

    @classmethod
    def create(cls, base: PreTrainedModel, decoder: Path | None, lora: LoraSettings, train_decoder: bool) -> AdapterSet:
        """The decoder adapter from its folder, or a new LoRA when `decoder` is None."""
        if decoder is not None:
            check_target(decoder, base.config)
            model = PeftModel.from_pretrained(base, str(decoder), adapter_name=DECODER, is_trainable=train_decoder)
        else:
            model = get_peft_model(base, _lora_config(lora), adapter_name=DECODER)
        return cls(model, {DECODER} if train_decoder else set())

    def add_control(self, steer: SteerConfig, blocks: int) -> None:
        """A new, trainable control adapter on target blocks 0..blocks-1."""
        if CONTROL in self.model.peft_config:
            self.model.delete_adapter(CONTROL)
        config = LoraConfig(
            r=steer.r,
            lora_alpha=steer.alpha,
            lora_dropout=steer.dropout,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            layers_to_transform=list(range(blocks)),
            task_type="CAUSAL_LM",
        )
        self.model.add_adapter(CONTROL, config)
        self.trainable = {CONTROL}
        self._adapters_changed()

    def load_frozen(self, folder: str | Path, name: str) -> None:
        """Load a saved adapter under `name`, untrainable, after checking it fits this target."""
        check_target(folder, self.model.get_base_model().config)
        self.model.load_adapter(str(folder), adapter_name=name, is_trainable=False)

    def remove_control(self) -> None:
        """Drop the control adapter; the decoder becomes trainable again if it was."""
        self.model.delete_adapter(CONTROL)
        self.trainable = {DECODER} if self._train_decoder else set()
        self._adapters_changed()

    def _adapters_changed(self) -> None:
        """Call after adding or deleting an adapter: the adapter layers may have changed."""
        self._adapter_layers = None
        self._enforce()

    def _enforce(self) -> None:
        for name, param in self.model.named_parameters():
            param.requires_grad_(any(f".{adapter}." in name for adapter in self.trainable))

    @contextlib.contextmanager
    def use(self, adapter: str | None) -> Iterator[None]:
        """Run with one adapter active, or with none (the plain target)."""
        if adapter is None:
            with self._adapters_off():
                yield
            return
        previous = self.model.active_adapter
        if adapter == previous:  # the usual case (the decoder, in training and reading): nothing to switch
            yield
            return
        self.model.set_adapter(adapter)
        self._enforce()
        try:
            yield
        finally:
            self.model.set_adapter(previous)
            self._enforce()

    @contextlib.contextmanager
    def _adapters_off(self) -> Iterator[None]:
        """The plain target: the off switch of every adapter layer that PEFT's own switch covers
        (modules_to_save wrappers too), i.e. the flag each one's forward reads, and nothing else.
        PeftModel.disable_adapter() also walks every module twice, reprs them all
        (get_model_status) and flips requires_grad, which under FSDP2 must then be undone on the
        right copy (Strategy.disable_adapters): 14 ms per target pass on an 8-block model, and
        more with every LoRA layer (docs/benchmarks.md). peft is pinned; tests/test_patching.py
        checks this equals PEFT's disable_adapter()."""
        if self._adapter_layers is None:
            kinds = (BaseTunerLayer, AuxiliaryTrainingWrapper)
            self._adapter_layers = [m for m in self.model.modules() if isinstance(m, kinds)]
        found = [layer._disable_adapters for layer in self._adapter_layers]
        for layer in self._adapter_layers:
            layer._disable_adapters = True
        try:
            yield
        finally:
            for layer, state in zip(self._adapter_layers, found):
                layer._disable_adapters = state

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def save(self, adapter: str, out_dir: str | Path) -> Path:
        """Save one adapter in PEFT format (adapter_config.json + adapter_model.safetensors)."""
        out_dir = Path(out_dir)
        # save_embedding_layers=False: a LoRA on lm_head must not drag the frozen head into the adapter
        self.model.save_pretrained(
            str(out_dir), selected_adapters=[adapter], safe_serialization=True, save_embedding_layers=False
        )
        nested = out_dir / adapter  # PEFT nests non-default adapter names in a subfolder
        if nested.is_dir():
            for item in nested.iterdir():
                item.replace(out_dir / item.name)
            nested.rmdir()
        write_target_identity(out_dir, self.model.get_base_model().config)
        return out_dir
