"""A loaded LatentQA setup: tokenizer, chat format, layout and the one-copy model."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .chat_format import ChatFormat
from .config import LatentQAConfig
from .data import Example
from .decoders import decoder_folder, trained_read_layer
from .layout import Batch, LaidOutExample, Layout, Mode, collate
from .models import AdapterSet, load_base, load_model_config, load_tokenizer
from .patching import LatentQAModel


def layout_for(config: LatentQAConfig) -> Layout:
    """The token layout of the configured model, from its tokenizer and config alone (no weights),
    e.g. for data workers that only lay out examples."""
    max_positions = getattr(load_model_config(config.model), "max_position_embeddings", None)
    chat_format = ChatFormat(load_tokenizer(config.model))
    return Layout(chat_format, thought_tokens=config.patch.thought_tokens, max_length=max_positions)


@dataclass
class LatentQA:
    config: LatentQAConfig
    tokenizer: object
    chat_format: ChatFormat
    layout: Layout
    model: LatentQAModel
    decoder_read_layer: int
    """The block the loaded decoder was trained to read: its training config's (beside its folder),
    else `config.patch.read_layer`. Controls read there (latentqa.steering)."""

    @classmethod
    def load(
        cls,
        config: LatentQAConfig,
        decoder: str | Path | None = None,
        *,
        train_decoder: bool = False,
        registry: str | None = None,
    ) -> LatentQA:
        """The target and its decoder, one base copy. `decoder`: an adapter folder, a registered
        decoder (`models:/NAME/3`, `models:/NAME@alias`, `NAME@alias`, fetched from `registry`,
        an MLflow tracking URI; None: MLFLOW_TRACKING_URI or `<train.output_dir>/mlflow.db`), or
        None: `config.model.decoder_adapter`, and without one a new decoder (for training).
        `lqa.config.model.decoder_adapter` records what was loaded."""
        config = config.model_copy(deep=True)
        if decoder is not None:
            config.model.decoder_adapter = str(decoder)
        layout = layout_for(config)
        with contextlib.ExitStack() as fetched:  # the decoder first: a bad reference fails before the base loads
            decoder_at = config.model.decoder_adapter
            folder = fetched.enter_context(decoder_folder(decoder_at, registry, config)) if decoder_at else None
            read_layer = trained_read_layer(folder, config.patch.read_layer) if folder else config.patch.read_layer
            adapters = AdapterSet.create(load_base(config.model), folder, config.lora, train_decoder)
        model = LatentQAModel(adapters, write_layer=config.patch.write_layer, mode=config.patch.mode)
        if not 0 <= config.patch.write_layer < model.num_layers:
            raise ValueError(
                f"patch.write_layer {config.patch.write_layer} is outside the model's {model.num_layers} blocks"
            )
        return cls(config, layout.chat_format.tokenizer, layout.chat_format, layout, model, read_layer)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def stop_ids(self) -> set[int]:
        return self.chat_format.stop_ids

    def lay_out(self, examples: Sequence[Example], mode: Mode) -> list[LaidOutExample]:
        return [self.layout.example(example, mode, index) for index, example in enumerate(examples)]

    def collate(self, laid_out: Sequence[LaidOutExample]) -> Batch:
        return collate(list(laid_out), self.chat_format.pad_id).to(self.device)

    def batches(self, laid_out: Sequence[LaidOutExample], batch_size: int) -> Iterator[Batch]:
        for start in range(0, len(laid_out), batch_size):
            yield self.collate(laid_out[start : start + batch_size])

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()
