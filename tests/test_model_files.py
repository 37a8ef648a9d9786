"""GGUF model files: a tiny random Llama, written as GGUF the way llama.cpp writes one, converts into a
Hugging Face folder that computes the same logits; the folder is cached by the file's content, and a
missing, foreign, damaged or unsupported file is refused in one line that names it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from conftest import CHATML_TEMPLATE
from latentqa import model_files
from latentqa.model_files import ModelFileError, hf_folder

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A model file holds weights, a vocabulary and a chat template.",
    "Latent questions are asked of the activations of a target model.",
] * 4

# The HF name of each weight in a Llama block, and the name llama.cpp gives it in a GGUF file.
BLOCK_TENSORS = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def train_tokenizer() -> ByteLevelBPETokenizer:
    """A byte-level BPE, the kind llama.cpp calls `gpt2`, with ChatML's special tokens first."""
    tokenizer = ByteLevelBPETokenizer()
    tokenizer.train_from_iterator(
        SENTENCES, vocab_size=320, min_frequency=2, show_progress=False, special_tokens=SPECIALS
    )
    return tokenizer


def tiny_llama(vocab_size: int, tied: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rope_theta=500000.0,  # not the default: a file whose rope base were lost would give other logits
        rms_norm_eps=1e-5,
        tie_word_embeddings=tied,
        bos_token_id=SPECIALS.index("<|endoftext|>"),
        eos_token_id=SPECIALS.index("<|im_end|>"),
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms initialise to ones; random ones show a norm that went missing or astray
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    return model


def llama_cpp_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp reorders the rows of q and k from HF's half-split rotary layout into interleaved
    pairs (its convert_hf_to_gguf.py `permute`); transformers' GGUF loader undoes it."""
    return (
        weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def write_gguf(
    path: Path, model: LlamaForCausalLM, tokenizer: ByteLevelBPETokenizer, architecture: str = "llama"
) -> Path:
    """`model` and `tokenizer` as an F32 GGUF file, with the metadata transformers reads for a Llama."""
    config = model.config
    writer = gguf.GGUFWriter(path, architecture)  # writes general.architecture
    writer.add_name("tiny-llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)

    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.get)  # the file lists tokens by id
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in SPECIALS else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges([" ".join(pair) for pair in merges])  # the file spells a merge "a b"
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_id)
    writer.add_chat_template(CHATML_TEMPLATE)

    weights = {name: param.detach().numpy() for name, param in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", weights["model.embed_tokens.weight"])
    for block in range(config.num_hidden_layers):
        for hf_name, gguf_name in BLOCK_TENSORS.items():
            weight = weights[f"model.layers.{block}.{hf_name}.weight"]
            if gguf_name == "attn_q":
                weight = llama_cpp_permute(weight, config.num_attention_heads)
            elif gguf_name == "attn_k":
                weight = llama_cpp_permute(weight, config.num_key_value_heads)
            writer.add_tensor(f"blk.{block}.{gguf_name}.weight", weight)
    writer.add_tensor("output_norm.weight", weights["model.norm.weight"])
    if not config.tie_word_embeddings:  # llama.cpp writes no output.weight when it is the embedding matrix
        writer.add_tensor("output.weight", weights["lm_head.weight"])

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def make_tiny(folder: Path, tied: bool = False) -> tuple[LlamaForCausalLM, ByteLevelBPETokenizer, Path]:
    tokenizer = train_tokenizer()
    model = tiny_llama(tokenizer.get_vocab_size(), tied)
    return model, tokenizer, write_gguf(folder / "tiny-llama.gguf", model, tokenizer)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model, tokenizer, GGUF file) for the module; tests copy the file rather than change it."""
    return make_tiny(tmp_path_factory.mktemp("gguf"))


@pytest.fixture(autouse=True)
def model_cache(tmp_path, monkeypatch):
    """A fresh conversion cache per test; `_converted` also remembers conversions in-process."""
    cache = tmp_path / "model-cache"
    monkeypatch.setenv("LATENTQA_MODEL_CACHE", str(cache))
    model_files._converted.cache_clear()
    yield cache
    model_files._converted.cache_clear()


def copy_to(source: Path, folder: Path, name: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy(source, folder / (name or source.name)))


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_gguf_converts_to_a_folder_with_the_same_logits(tied, tmp_path, model_cache):
    model, tokenizer, path = make_tiny(tmp_path, tied)
    folder = Path(hf_folder(str(path)))

    assert folder.parent == model_cache and folder.name.startswith("tiny-llama-")
    names = {f.name for f in folder.iterdir()}
    assert {"config.json", "tokenizer.json", model_files.SOURCE_FILE} <= names, names
    assert "model.safetensors" in names or "model.safetensors.index.json" in names, names
    source = json.loads((folder / model_files.SOURCE_FILE).read_text())
    assert source["gguf"] == path.name and source["architecture"] == "llama"

    converted_tokenizer = AutoTokenizer.from_pretrained(folder)
    assert converted_tokenizer.chat_template == CHATML_TEMPLATE
    assert converted_tokenizer.eos_token == "<|im_end|>"
    text = converted_tokenizer.apply_chat_template([{"role": "user", "content": "The lazy fox."}], tokenize=False)
    assert text.startswith("<|im_start|>system\n")
    ids = converted_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids == tokenizer.encode(text).ids  # same vocabulary, merges and special tokens

    converted = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert converted.config.rope_parameters["rope_theta"] == model.config.rope_parameters["rope_theta"]
    assert converted.config.tie_word_embeddings == tied  # the loader infers it from output.weight
    input_ids = torch.tensor([ids[:24]])
    with torch.no_grad():
        torch.testing.assert_close(converted(input_ids).logits, model(input_ids).logits, rtol=1e-5, atol=1e-5)


def test_conversion_is_cached_by_file_content(tiny, tmp_path, monkeypatch):
    _, _, path = tiny
    folder = hf_folder(str(path))

    def no_second_conversion(*args):
        raise AssertionError("converted again")

    monkeypatch.setattr(model_files, "_convert", no_second_conversion)
    model_files._converted.cache_clear()  # so the copies below are hashed, not remembered
    elsewhere = copy_to(path, tmp_path / "elsewhere")  # same name: the cached folder is named by stem and hash
    assert hf_folder(str(elsewhere)) == folder
    assert hf_folder(str(elsewhere.parent)) == folder  # a folder holding one GGUF file names it


def test_a_hugging_face_folder_or_hub_id_is_passed_through(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "stray.gguf").write_bytes(b"GGUF")  # beside a config.json, a GGUF file is not the model
    assert hf_folder(str(tmp_path)) == str(tmp_path)
    assert hf_folder("meta-llama/Llama-3.2-1B-Instruct") == "meta-llama/Llama-3.2-1B-Instruct"


def test_missing_gguf_file(tmp_path):
    missing = tmp_path / "nowhere.gguf"
    with pytest.raises(ModelFileError, match="no such GGUF file") as error:
        hf_folder(str(missing))
    assert str(missing) in str(error.value)


def test_file_without_the_gguf_magic(tmp_path):
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"PK\x03\x04 a zip, say")
    with pytest.raises(ModelFileError, match="not a GGUF file") as error:
        hf_folder(str(fake))
    assert str(fake) in str(error.value)


def test_truncated_gguf_file(tiny, tmp_path, model_cache):
    _, _, path = tiny
    truncated = tmp_path / path.name
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ModelFileError, match="truncated or damaged") as error:
        hf_folder(str(truncated))
    assert str(truncated) in str(error.value)
    assert not model_cache.exists() or not any(model_cache.iterdir())  # nothing half-converted is left


def test_architecture_transformers_cannot_convert(tiny, tmp_path):
    model, tokenizer, _ = tiny
    path = write_gguf(tmp_path / "odd.gguf", model, tokenizer, architecture="notamodel")
    with pytest.raises(ModelFileError, match="GGUF architecture 'notamodel' cannot be converted") as error:
        hf_folder(str(path))
    assert str(path) in str(error.value) and "not supported" in str(error.value)  # transformers says why


def test_folder_with_two_gguf_files(tiny, tmp_path):
    _, _, path = tiny
    copy_to(path, tmp_path, "a.gguf")
    copy_to(path, tmp_path, "b.gguf")
    with pytest.raises(ModelFileError, match=r"holds 2 GGUF files \(a.gguf, b.gguf\); name one") as error:
        hf_folder(str(tmp_path))
    assert str(tmp_path) in str(error.value)
