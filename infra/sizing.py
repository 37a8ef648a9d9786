"""What a decoder run needs, before you rent the GPUs: memory per GPU, host memory while loading,
tokens/s, and hours for a training run, computed from the model's shape (no GPU, no weights).

    python infra/sizing.py                          # the table in infra/README.md
    python infra/sizing.py --config path/to/config.json --gpus 16 --examples 20000

Memory per GPU, for LoRA decoders (SPEC: r 16 on q,k,v,o,gate,up,down and lm_head, batch 4 per
device) in bf16:
- base weights: 2 bytes a parameter, whole under DDP, a 1/N shard under FSDP2 and ZeRO-3 (plus
  the all-gathered blocks in flight, two at a time);
- LoRA: fp32 weights, gradients and Adam's two moments, 16 bytes a parameter (sharded likewise);
- activations: ACTIVATION_BYTES_PER_H bytes per padded decoder token, per block, per unit of
  hidden size, kept for the backward pass (2 bytes per unit with activation checkpointing, which
  keeps only each block's input), plus fp32 logits and their gradient on the label tokens.

ACTIVATION_BYTES_PER_H and the throughput come from one H200 run of `jobs/benchmark.py --preset
llama3-8b --device cuda` (docs/figures/gpu-h200-llama3-8b.json): the activation coefficient is the
slope of peak memory between batch 4 and batch 32; that run's batch-4 peak is then predicted
within 1% (tests/test_infra.py). Throughput of other shapes and GPUs is scaled from it (same
MFU; H100 by HBM bandwidth, 3.35/4.8 TB/s, since a batch-4 step is far from compute-bound):
estimates, marked as such, until measured.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

GIB = 1 << 30
# Llama-3-8B/70B-Instruct's config.json fields that set the size (public; no download needed).
LLAMA3_8B = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
}
LLAMA3_70B = {
    **LLAMA3_8B,
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
}
LORA_RANK = 16
ACTIVATION_BYTES_PER_H = 84.35  # fitted on the H200 run (see the module docstring)
LOGIT_BYTES = 12  # fp32 logits, their log-softmax and its gradient, per label token and vocabulary entry
# Measured: H200, Llama-3-8B shape, batch 4, the offline set's batches (read + decoder tokens).
MEASURED_TOKENS_PER_S, MEASURED_PARAMS = 1813.9, 8_030_261_248
HBM_TB_S = {"H200": 4.8, "H100": 3.35}
# The paper's data as the Llama-3 template lays it out (datasets/latentqa/train, 3774 examples):
# mean read and decoder tokens per example; the longest decoder side and the most label tokens
# of one example, which set the peak.
READ_TOKENS, DECODER_TOKENS, LONGEST_DECODER, MOST_LABELS = 96.7, 115.9, 225, 96
PAPER = {"batch": 4, "epochs": 5, "examples": 3774}


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int

    @classmethod
    def of(cls, config: dict) -> Shape:
        """From a transformers config.json."""
        fields = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        return cls(
            *(config[k] for k in fields),
            config.get("num_key_value_heads", config["num_attention_heads"]),
            config["vocab_size"],
        )

    @property
    def kv(self) -> int:
        return self.kv_heads * self.hidden // self.heads

    def block_params(self) -> int:
        attention = 2 * self.hidden * self.hidden + 2 * self.hidden * self.kv
        return attention + 3 * self.hidden * self.intermediate + 2 * self.hidden  # + two norms

    def params(self) -> int:
        """Untied embedding and LM head, as Llama 3."""
        return self.layers * self.block_params() + 2 * self.vocab * self.hidden + self.hidden

    def lora_params(self, rank: int = LORA_RANK) -> int:
        h, i, kv = self.hidden, self.intermediate, self.kv
        per_block = rank * ((h + h) * 2 + (h + kv) * 2 + (h + i) * 3)  # q,o; k,v; gate,up,down
        return self.layers * per_block + rank * (h + self.vocab)  # + lm_head


def memory_gib(
    shape: Shape,
    strategy: str,
    gpus: int,
    batch: int,
    decoder_tokens: int = LONGEST_DECODER,
    label_tokens: int = MOST_LABELS,
    checkpointing: bool = False,
) -> dict:
    """Peak GPU memory of a training step, in GiB, by part: `batch` examples padded to
    `decoder_tokens` on the decoder side, with `label_tokens` labels each."""
    shards = 1 if strategy == "ddp" else gpus
    weights = 2 * shape.params() / shards
    if strategy != "ddp":
        weights += 2 * 2 * shape.block_params()  # two gathered blocks in flight
    lora = 16 * shape.lora_params() / shards
    per_unit = 2 if checkpointing else ACTIVATION_BYTES_PER_H
    tokens = batch * decoder_tokens
    activations = tokens * shape.layers * shape.hidden * per_unit
    if checkpointing:  # one block recomputed at a time, at full size
        activations += tokens * shape.hidden * ACTIVATION_BYTES_PER_H
    logits = batch * label_tokens * shape.vocab * LOGIT_BYTES
    parts = {"weights": weights, "lora": lora, "activations": activations, "logits": logits}
    return {k: v / GIB for k, v in parts.items()} | {"total": sum(parts.values()) / GIB}


def tokens_per_s(shape: Shape, gpu: str) -> float:
    """Per GPU, at the measured MFU (an estimate for any shape or GPU but the measured one)."""
    return MEASURED_TOKENS_PER_S * MEASURED_PARAMS / shape.params() * HBM_TB_S[gpu] / HBM_TB_S["H200"]


def hours(shape: Shape, gpu: str, gpus: int, examples: int, epochs: int) -> float:
    tokens = examples * epochs * (READ_TOKENS + DECODER_TOKENS)
    return tokens / (tokens_per_s(shape, gpu) * gpus) / 3600


def table(models: dict[str, Shape], gpus: int, examples: int, epochs: int, batch: int) -> str:
    rows = [
        "| model | strategy | GPU memory, GiB (weights + LoRA + activations + logits) | with activation "
        "checkpointing | host memory while loading, GiB per node (every rank loads the whole bf16 base; "
        "fsdp2: rank 0 alone) | "
        "tokens/s per GPU H200 / H100 | "
        f"hours (GPU-hours) for {examples} examples x {epochs} epochs on {gpus} H200 |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, shape in models.items():
        for strategy in ("ddp", "fsdp2", "zero3"):
            plain = memory_gib(shape, strategy, gpus, batch)
            light = memory_gib(shape, strategy, gpus, batch, checkpointing=True)
            parts = " + ".join(f"{plain[k]:.1f}" for k in ("weights", "lora", "activations", "logits"))
            # FSDP2 loads the base on rank 0 and sends the other ranks their shards on their GPU
            # (Strategy.model_loading); DDP and ZeRO-3 here load it whole on every rank.
            host = (1 if strategy == "fsdp2" else gpus) * 2 * shape.params() / GIB
            speed = f"{tokens_per_s(shape, 'H200'):,.0f} / {tokens_per_s(shape, 'H100'):,.0f}"
            run = hours(shape, "H200", gpus, examples, epochs)
            rows.append(
                f"| {name} | {strategy} | **{plain['total']:.1f}** = {parts} | {light['total']:.1f} | {host:,.0f} | "
                f"{speed} | {run:.2f} ({run * gpus:.1f}) |"
            )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, help="a model's config.json (default: Llama-3-8B and 70B)")
    parser.add_argument("--gpus", type=int, default=8, help="GPUs (one node of 8 by default)")
    parser.add_argument("--examples", type=int, default=PAPER["examples"], help="training examples")
    parser.add_argument("--epochs", type=int, default=PAPER["epochs"])
    parser.add_argument("--batch", type=int, default=PAPER["batch"], help="per GPU")
    args = parser.parse_args(argv)
    models = (
        {args.config.parent.name: Shape.of(json.loads(args.config.read_text()))}
        if args.config
        else {"Llama-3-8B": Shape.of(LLAMA3_8B), "Llama-3-70B": Shape.of(LLAMA3_70B)}
    )
    print(table(models, args.gpus, args.examples, args.epochs, args.batch))


if __name__ == "__main__":
    main()
