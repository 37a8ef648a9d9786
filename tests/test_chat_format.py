"""Format discovery from tokenizers and chat templates alone (no per-model tables)."""

import pytest
from transformers import AutoTokenizer

from latentqa.chat_format import ChatFormat, UnsupportedChatTemplate
from latentqa.data import Example, Record
from latentqa.layout import IGNORE_INDEX, Layout
from latentqa.paths import OFFLINE_MODEL

RECORDS = {
    "system": Record(system="Be a pirate.", stimulus_user="Hi there", label="a"),
    "none": Record(control_user="Be a pirate.", label="a"),
    "user": Record(control_user="Be a pirate.", control_model="Aye.", stimulus_user="Hi there", label="a"),
    "completion": Record(
        control_user="Be a pirate.",
        control_model="Aye.",
        stimulus_user="Hi there",
        stimulus_model="Arr matey.",
        label="a",
    ),
}


def test_llama3_format_is_discovered(llama3_tokenizer):
    fmt = ChatFormat(llama3_tokenizer)
    assert fmt.bos_id == 128000
    assert fmt.decoder_role == "reflect"
    assert fmt.system_placement == "own_turn"
    assert fmt.placeholder_ids(3) == [30, 949, 949]
    assert fmt.stop_ids == {128009}
    assert fmt.pad_id == 128009  # no pad token: falls back to EOS


@pytest.mark.parametrize(
    "family, bos, role, placement",
    [
        ("llama3", True, "reflect", "own_turn"),
        ("chatml", False, "reflect", "own_turn"),
        ("gemma", True, "reflect", "folded"),
        ("deepseek", True, "assistant", "own_turn"),  # no role headers: the decoder keeps "assistant"
    ],
)
def test_template_families(family_tokenizers, family, bos, role, placement):
    tokenizer = family_tokenizers[family]
    fmt = ChatFormat(tokenizer)
    assert (fmt.bos_id is not None) == bos
    assert fmt.decoder_role == role
    assert fmt.system_placement == placement
    layout = Layout(fmt)
    decode = lambda ids, span: tokenizer.decode(ids[span[0] : span[1]])
    for case, record in RECORDS.items():
        laid = layout.example(Example(record, "What?", "Pirate."), "train")
        read = laid.read
        masked, patched = decode(read.ids, read.masked_span), decode(read.ids, read.patched_span)
        assert read.patched_span[1] == len(read.ids)
        assert read.masked_span[1] == read.patched_span[0]
        if bos:
            assert read.ids[0] == fmt.bos_id and read.patched_span[0] >= 1
        if case == "system":
            assert "Be a pirate." in masked and "Hi there" in patched and "pirate" not in patched
        elif case == "none":
            assert masked == "" and "Be a pirate." in patched
        else:  # the instruction turn is masked, the stimulus is read
            assert "Be a pirate." in masked and "Aye." in masked and "Hi there" in patched
        write = laid.write
        n = read.patched_span[1] - read.patched_span[0]
        assert write.patched_span[1] - write.patched_span[0] == n
        assert write.ids[write.patched_span[0] : write.patched_span[1]] == fmt.placeholder_ids(n)
        learned = tokenizer.decode([t for t in write.labels if t != IGNORE_INDEX])
        assert learned.startswith("Sure, I've analyzed the assistant.") and "Pirate." in learned
        assert "What?" not in learned


@pytest.mark.parametrize(
    "family, roles",
    [
        ("llama3", ("system", "user", "assistant", "tool")),  # renders any role name
        ("gemma", ("system", "user", "assistant", "tool")),
        ("deepseek", ("system", "user", "assistant")),  # drops any other role
    ],
)
def test_dialog_roles_are_those_the_template_renders(family_tokenizers, family, roles):
    assert ChatFormat(family_tokenizers[family]).dialog_roles == roles


def test_dialog_roles_leave_out_a_role_whose_content_is_rewritten():
    """A system prompt the template refuses is still a role (the layout merges it into the first
    user turn); a tool turn written as JSON is not, as its content is not the text sent."""
    tokenizer = AutoTokenizer.from_pretrained(OFFLINE_MODEL)
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' }}"
        "{{ (m['content'] | tojson) if m['role'] == 'tool' else m['content'] }}{{ '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    )
    fmt = ChatFormat(tokenizer)
    assert fmt.system_placement == "merged"
    assert fmt.dialog_roles == ("system", "user", "assistant")


def test_score_mode_learns_only_the_answer(family_tokenizers):
    tokenizer = family_tokenizers["chatml"]
    layout = Layout(ChatFormat(tokenizer))
    laid = layout.example(Example(RECORDS["none"], "What?", "Pirate."), "score")
    learned = tokenizer.decode([t for t in laid.write.labels if t != IGNORE_INDEX])
    assert learned.startswith("Pirate.") and "Sure" not in learned


def test_generate_mode_ends_with_the_decoder_turn(family_tokenizers):
    tokenizer = family_tokenizers["gemma"]
    laid = Layout(ChatFormat(tokenizer)).example(Example(RECORDS["user"], "What?", ""), "generate")
    assert laid.write.labels is None
    assert tokenizer.decode(laid.write.ids).endswith("<start_of_turn>reflect\n")


def _with_template(tokenizer, template):
    clone = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    clone.chat_template = template
    return clone


@pytest.mark.parametrize(
    "template, message",
    [
        (None, "no chat_template"),
        ("{% for m in messages %}{{ m['role'] }}: hello\n{% endfor %}", "chat template"),  # drops contents
        (
            "{% for m in messages|reverse %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}",  # reorders turns
            "chat template",
        ),
    ],
)
def test_unsupported_templates_fail_clearly(family_tokenizers, template, message):
    tokenizer = _with_template(family_tokenizers["llama3"], template)
    with pytest.raises(UnsupportedChatTemplate, match=message):
        Layout(ChatFormat(tokenizer)).example(Example(RECORDS["user"], "What?", "Pirate."), "train")


def test_encode_matches_the_tokenizer_on_rendered_pieces(llama3_tokenizer, family_tokenizers):
    """`encode` calls the Rust tokenizer directly (faster for a layout's short pieces); its ids
    must be the wrapper's, special tokens included (or split, for plain text)."""
    for name, tokenizer in {"llama3-real": llama3_tokenizer, **family_tokenizers}.items():
        fmt = ChatFormat(tokenizer)
        text = fmt.render_text(
            [{"role": "user", "content": "Ahoy, matey! Où est le trésor? 1234"}], add_generation_prompt=True
        )
        pieces = [text[:7], text[7:40], text[40:], " ?", "?"]
        assert fmt.encode(pieces) == tokenizer(pieces, add_special_tokens=False)["input_ids"], name
        split = tokenizer(pieces, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        assert fmt.encode(pieces, plain=True) == split != fmt.encode(pieces), name


def test_encode_never_truncates_even_when_the_tokenizer_file_does(family_tokenizers):
    import copy

    tokenizer = copy.deepcopy(family_tokenizers["llama3"])
    tokenizer.backend_tokenizer.enable_truncation(max_length=3)  # as some tokenizer.json files ship
    text = "A sentence that is certainly longer than three tokens."
    assert len(ChatFormat(tokenizer).encode([text])[0]) > 3
