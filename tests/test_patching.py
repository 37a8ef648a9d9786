"""One model copy, early exit, the write hook, and KV-cached patched generation."""

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model

from conftest import session_for
from latentqa.data import Example, Record
from latentqa.models import DECODER, decoder_blocks, load_base
from latentqa.patching import positions
from latentqa.paths import OFFLINE_MODEL

ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma2")
EXAMPLES = [
    Example(Record(control_user="Please speak like a pirate captain.", label="a"), "Who is it?", "A pirate."),
    Example(
        Record(
            control_user="Adopt a chef persona.",
            control_model="Sure.",
            stimulus_user="What is for dinner tonight?",
            label="b",
        ),
        "What persona?",
        "A chef who cooks.",
    ),
]


def _batch(lqa, mode="train"):
    return lqa.collate(lqa.lay_out(EXAMPLES, mode))


@pytest.fixture(scope="module")
def sessions(tiny_model_dirs):
    torch.manual_seed(0)
    return {arch: session_for(tiny_model_dirs[arch], patch={"read_layer": 1}) for arch in ARCHS}


@pytest.mark.parametrize("arch", ARCHS)
def test_one_copy_of_the_base(sessions, arch):
    lqa = sessions[arch]
    base_params = [p for n, p in lqa.model.peft_model.named_parameters() if "lora_" not in n]
    ids = {p.data_ptr() for p in base_params}
    assert len(ids) == len(base_params)  # nothing duplicated
    assert len(decoder_blocks(lqa.model.peft_model)) == 3


@pytest.mark.parametrize("arch", ARCHS)
def test_plain_target_is_pefts_disable_adapter_and_keeps_requires_grad(sessions, arch):
    """The engine's own adapters-off switch gives what PEFT's disable_adapter() gives, changes
    no requires_grad (FSDP2 copies it per unshard), and turns the decoder back on after."""
    lqa = sessions[arch]
    peft = lqa.model.peft_model
    batch = _batch(lqa)
    lora_b = [p for name, p in peft.named_parameters() if "lora_B" in name]
    saved = [p.detach().clone() for p in lora_b]

    def logits():
        return peft(input_ids=batch.read_ids, attention_mask=batch.read_attention).logits

    grads = {name: p.requires_grad for name, p in peft.named_parameters()}
    try:
        with torch.no_grad():
            for p in lora_b:  # a decoder that changes the output (lora_B starts at zero)
                p.add_(0.05)
            decoder = logits()
            with peft.disable_adapter():
                expected = logits()
            assert not torch.allclose(decoder, expected)
            with lqa.model.adapters.use(None):
                plain = logits()
                assert {name: p.requires_grad for name, p in peft.named_parameters()} == grads
                with lqa.model.adapters.use(None):
                    pass
                torch.testing.assert_close(logits(), plain)  # leaving a nested switch keeps them off
            torch.testing.assert_close(plain, expected)
            torch.testing.assert_close(logits(), decoder)
    finally:
        with torch.no_grad():
            for p, value in zip(lora_b, saved):
                p.copy_(value)


@pytest.mark.parametrize("arch", ARCHS)
def test_early_exit_matches_full_forward(sessions, arch):
    lqa = sessions[arch]
    batch = _batch(lqa)
    ran = []
    handles = [
        block.register_forward_hook(lambda m, a, o, i=i: ran.append(i)) for i, block in enumerate(lqa.model.blocks)
    ]
    early = lqa.model.target_activations(batch, [1])[1]
    for handle in handles:
        handle.remove()
    assert ran == [0, 1]  # blocks after the read layer never ran
    with torch.no_grad(), lqa.model.adapters.use(None):
        full = lqa.model.peft_model(
            input_ids=batch.read_ids,
            attention_mask=batch.read_attention,
            position_ids=positions(batch.read_attention),
            output_hidden_states=True,
        ).hidden_states[2]  # hidden_states[0] is the embedding output
    torch.testing.assert_close(early, full[batch.read_patch_mask])


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", ["replace", "add"])
def test_write_hook_places_target_states_at_placeholders(sessions, arch, mode):
    lqa = sessions[arch]
    lqa.model.mode = mode
    batch = _batch(lqa)
    acts = lqa.model.target_activations(batch, [1])[1]
    seen = {}
    block = lqa.model.blocks[lqa.model.write_layer]
    with lqa.model.patched(batch.write_patch_mask, acts):
        handle = block.register_forward_hook(
            lambda m, a, o: seen.setdefault("out", o[0] if isinstance(o, tuple) else o)
        )
        with torch.no_grad():
            lqa.model.decoder_token_losses(batch, None, shift=False)
        handle.remove()
    lqa.model.mode = "replace"
    written = seen["out"][batch.write_patch_mask]
    if mode == "replace":
        torch.testing.assert_close(written, acts)
    else:
        assert not torch.allclose(written, acts)
        # direction moved towards the activations
        assert torch.nn.functional.cosine_similarity(written, acts).mean() > 0.5


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma2"])
def test_kv_cached_generation_equals_uncached(sessions, arch):
    lqa = sessions[arch]
    with torch.no_grad():  # give the decoder adapter weights so it differs from the target
        for name, param in lqa.model.peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    batch = _batch(lqa, "generate")
    acts = lqa.model.target_activations(batch, [1])[1]
    args = (batch, acts, 12, {-1}, lqa.chat_format.pad_id)  # no stop id: compare all 12 tokens
    cached = lqa.model.generate_answers(*args, use_cache=True)
    uncached = lqa.model.generate_answers(*args, use_cache=False)
    assert cached == uncached and all(len(row) == 12 for row in cached)
    assert len({token for row in cached for token in row}) > 2  # a real sequence, not one token repeated
    unpatched = lqa.model.generate(
        batch.write_ids, batch.write_attention, positions(batch.write_attention), 12, {-1}, 0
    )
    assert unpatched != cached  # the patch matters


def test_published_decoder_layout_adapter_loads_unchanged(tiny_model_dirs, tmp_path):
    """An adapter saved the way the paper's code saved aypan17/latentqa_llama-3-8b-instruct."""
    from latentqa.config import ModelConfig

    cfg = ModelConfig(path=str(tiny_model_dirs["llama"]), tokenizer=None, weights="random")
    base = load_base(cfg)
    paper = get_peft_model(
        base,
        LoraConfig(
            r=16,
            lora_alpha=32,
            lora_dropout=0.05,
            bias="none",
            task_type="CAUSAL_LM",
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"],
        ),
    )
    with torch.no_grad():
        for name, param in paper.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    paper.save_pretrained(tmp_path / "published", save_embedding_layers=False)
    config_path = tmp_path / "published" / "adapter_config.json"
    saved = json.loads(config_path.read_text())
    saved["base_model_name_or_path"] = "meta-llama/Meta-Llama-3-8B-Instruct"
    config_path.write_text(json.dumps(saved))
    paper.eval()
    ids = torch.tensor([[1, 20, 30, 40]])
    with torch.no_grad():
        expected = paper(input_ids=ids).logits

    lqa = session_for(
        tiny_model_dirs["llama"],
        model={
            "path": str(tiny_model_dirs["llama"]),
            "tokenizer": str(OFFLINE_MODEL),
            "weights": "random",
            "decoder_adapter": str(tmp_path / "published"),
        },
    )
    with torch.no_grad(), lqa.model.adapters.use(DECODER):
        got = lqa.model.peft_model(input_ids=ids).logits
    torch.testing.assert_close(got, expected)
    assert lqa.model.peft_model.peft_config[DECODER].r == 16
