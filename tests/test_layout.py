"""Token layout: the golden Llama-3 layouts, reproduced by `latentqa inspect-batch`; batches."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import FIXTURES
from latentqa.chat_format import ChatFormat
from latentqa.data import Example, Record
from latentqa.layout import IGNORE_INDEX, Layout, LayoutError, collate


def test_inspect_batch_reproduces_the_golden_layouts(llama3_tokenizer_dir):
    golden_path = FIXTURES / "llama3_layout.jsonl"
    golden = [json.loads(line) for line in golden_path.read_text().splitlines() if line.strip()]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "latentqa.cli",
            "inspect-batch",
            "--tokenizer",
            str(llama3_tokenizer_dir),
            "--input",
            str(golden_path),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    produced = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(produced) == len(golden)
    fields = ("read_ids", "masked_read_span", "patched_read_span", "write_ids", "patched_write_span", "labels")
    for index, (got, want) in enumerate(zip(produced, golden)):
        for field in fields:
            assert got.get(field) == want.get(field), f"golden line {index}: {field} differs"


def test_collate_left_pads_and_pairs_spans(llama3_tokenizer):
    fmt = ChatFormat(llama3_tokenizer)
    layout = Layout(fmt)
    examples = [
        Example(Record(control_user="Be brief.", label="a"), "What?", "Brief."),
        Example(
            Record(system="Talk like a pirate, always.", stimulus_user="Tell me about ships please", label="b"),
            "Who?",
            "A pirate.",
        ),
    ]
    laid = [layout.example(e, "train") for e in examples]
    batch = collate(laid, fmt.pad_id)
    assert torch.equal(batch.read_patch_mask.sum(-1), batch.write_patch_mask.sum(-1))
    for row, example in enumerate(laid):
        pad = batch.read_ids.shape[1] - len(example.read.ids)
        assert batch.read_attention[row, :pad].sum() == 0 and bool(batch.read_attention[row, pad:].all())
        assert batch.read_ids[row, pad:].tolist() == example.read.ids
        start, end = example.read.patched_span
        assert batch.read_patch_mask[row].nonzero().flatten().tolist() == list(range(pad + start, pad + end))
        wpad = batch.write_ids.shape[1] - len(example.write.ids)
        assert batch.labels[row, :wpad].eq(IGNORE_INDEX).all()
    assert batch.verb_lengths.tolist() == [e.read.masked_span[1] - e.read.masked_span[0] for e in laid]


def test_too_long_prompt_is_a_clear_error(llama3_tokenizer):
    layout = Layout(ChatFormat(llama3_tokenizer), max_length=64)
    example = Example(
        Record(control_user="word " * 200, label="long-one"), "What?", "That.", source="data/control.json"
    )
    with pytest.raises(
        LayoutError,
        match=r"data/control.json: example 7 \(label 'long-one'\): \d+ tokens exceed the model's limit of 64",
    ):
        layout.example(example, "train", index=7)


def test_layout_keeps_the_ids_of_recurring_pieces_but_tokenises_contents_every_time(llama3_tokenizer):
    """The ids of template text and of the layout's own placeholder and acknowledgement are kept; a
    message's content is tokenised on every layout, so keeping ids cannot grow with the data (nor make
    the layout benchmark time a cache), and changing a returned piece cannot change a later one."""
    fmt = ChatFormat(llama3_tokenizer)
    layout = Layout(fmt)
    backend, encoded = fmt._encoder._backend, []

    class Recording:
        encode_special_tokens = False

        def encode(self, text, **kwargs):
            encoded.append(text)
            return backend.encode(text, **kwargs)

    fmt._encoder._backend = Recording()
    contents = [[f"Be pirate number {k}.", f"Hi {k}", f"Who is {k}?", f"Pirate {k}."] for k in range(3)]
    examples = [Example(Record(system=s, stimulus_user=u, label="a"), q, a) for s, u, q, a in contents]
    first = [layout.example(e, "train").as_json() for e in examples]
    encoded.clear()
    again = [layout.example(e, "train").as_json() for e in examples]
    assert again == first
    assert all(any(c in text for c in sum(contents, [])) for text in encoded)  # no template piece again
    assert all(any(c in text for text in encoded) for c in sum(contents, []))  # every content again
    rendered = fmt.render([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    _, pieces = fmt.tokenize(rendered)
    expected = [list(p) for p in pieces]
    for piece in pieces:
        piece.clear()
    assert fmt.tokenize(rendered)[1] == expected
