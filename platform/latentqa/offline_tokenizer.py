"""Build the tiny offline tokenizer and Llama config from the project's own data.

The offline default model (infra/models/tiny-llama) has no downloaded weights: the
tokenizer is a byte-level BPE trained on the strings in datasets/ and controls/, and the
config describes a small Llama the engine random-initialises from a fixed seed.

    PYTHONPATH=platform python -m latentqa.offline_tokenizer
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

REPO_ROOT = Path(__file__).resolve().parents[2]
OUT_DIR = REPO_ROOT / "infra" / "models" / "tiny-llama"

# Ids 0..5, in this order; Llama-3 names so the chat template works unchanged.
SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|pad|>",
]
BOS, EOS, PAD = "<|begin_of_text|>", "<|eot_id|>", "<|pad|>"

# The Llama-3 instruct chat template, verbatim (pasted, since the fixture copy may be absent).
CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)

# Strings the corpus lacks but the platform relies on being single tokens: the role
# names, the "\n\n" that ends a generation prompt, and " ?" (the "? ? ?" placeholder).
# Repeated so the merges are learned whatever the data holds.
SEED_TEXTS = ["system\n\n", "user\n\n", "assistant\n\n", "? ? ? ? ? ? ? ?", "\n\n"] * 200


def _strings(obj) -> list[str]:
    """Every string value in a JSON document, in document order (keys are skipped)."""
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, list):
        return [s for item in obj for s in _strings(item)]
    return []


def corpus_texts(corpus_files: list[Path]) -> list[str]:
    # Sorted so the training input, and hence the merges, never depend on listing order.
    texts = list(SEED_TEXTS)
    for path in sorted(Path(p) for p in corpus_files):
        texts += _strings(json.loads(Path(path).read_text(encoding="utf-8")))
    return texts


def build_tokenizer(corpus_files: list[Path], out_dir: Path, vocab_size: int = 4096) -> None:
    """Train a byte-level BPE on the files' strings and save it as a HF fast tokenizer."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    # No post-processor: the chat template adds BOS itself.
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        # All 256 byte symbols, so any text encodes even if unseen in the corpus.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_texts(corpus_files), trainer=trainer)
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"), pretty=True)
    config = {
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "model_max_length": 2048,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def build_config(out_dir: Path) -> None:
    """Write the tiny Llama config, sized to the tokenizer saved in out_dir."""
    from transformers import AutoTokenizer, LlamaConfig

    tok = AutoTokenizer.from_pretrained(out_dir)
    LlamaConfig(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        tie_word_embeddings=True,  # the LM head reads the embedding space, so copying a word from activations generalises
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        architectures=["LlamaForCausalLM"],
        torch_dtype="float32",
    ).save_pretrained(out_dir)


def main() -> None:
    files = [p for d in ("datasets", "controls") for p in (REPO_ROOT / d).rglob("*.json")]
    build_tokenizer(files, OUT_DIR)
    build_config(OUT_DIR)
    print(f"wrote {OUT_DIR} from {len(files)} files")


if __name__ == "__main__":
    main()
