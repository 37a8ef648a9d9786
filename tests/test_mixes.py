"""Training mixes (`data.mix`, latentqa.mixes): yes/no questions are balanced and ask about the
record's own system prompt or another of its kind; context prediction reads exactly a span of
the dialog and answers with exactly the tokens before or after it; bad sources are named."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from latentqa.config import ConfigError, load_config
from latentqa.data import DataError, Record, read_dialog
from latentqa.mixes import NO, YES, MixSource, mix_examples, yes_no_question
from latentqa.paths import OFFLINE_TRAIN

SYSTEM = OFFLINE_TRAIN / "system.json"
STIMULUS = OFFLINE_TRAIN / "stimulus.json"


def test_yes_no_questions_are_balanced_and_ask_about_a_system_prompt_of_the_same_kind():
    examples = mix_examples([MixSource(kind="yes_no", path=SYSTEM, examples=101, seed=2)])
    assert len(examples) == 101
    answers = Counter(e.answer for e in examples)
    assert answers == {YES: 51, NO: 50}
    prompts = {r["system"]: r["label"].split("-")[0] for r in json.loads(SYSTEM.read_text())}
    for e in examples:
        asked = e.question.removeprefix(yes_no_question("")[:-2]).removesuffix('"?')
        assert e.question == yes_no_question(asked)
        if e.answer == YES:
            assert asked == e.record.system
        else:  # a distractor of the same kind (persona or goal), never the record's own
            assert asked != e.record.system and prompts[asked] == e.record.label.split("-")[0]
        # Read over the user's message alone: the system prompt is the masked verb span.
        assert read_dialog(e.record).verb == "system"
    assert examples == mix_examples([MixSource(kind="yes_no", path=SYSTEM, examples=101, seed=2)])  # seeded


def test_context_spans_are_exactly_the_tokens_before_or_after_the_read_span(offline_session):
    layout = offline_session.layout
    fmt = layout.chat_format
    specials = set(fmt.tokenizer.all_special_ids)
    source = MixSource(kind="context", path=STIMULUS, examples=60, span_tokens=(1, 12), answer_tokens=(1, 10))
    examples = mix_examples([source])
    directions = Counter(e.context.direction for e in examples)
    assert set(directions) == {"before", "after"} and examples[0].question == examples[0].answer == ""
    for e in examples:
        dialog = read_dialog(e.record)
        rendered = fmt.render(dialog.messages, add_generation_prompt=dialog.add_generation_prompt)
        cuts = [len(fmt.bos_text), *(b for span in rendered.content_spans for b in span)]  # as the layout cuts
        ids = [t for piece in fmt.tokenize(rendered, cuts)[1] for t in piece]
        laid = layout.example(e, "train")
        start, end = laid.read.patched_span
        assert laid.read.ids == ids[:end]  # the target never sees a token after the span
        assert laid.read.masked_span[1] == start and 1 <= end - start <= e.context.span
        write_text = fmt.tokenizer.decode(laid.write.ids)
        said = re.search(r"predict the (previous|next) (?:(\d+) tokens|token)", write_text)
        n = int(said[2] or 1)
        assert said[1] == ("previous" if e.context.direction == "before" else "next") and 1 <= n <= e.context.answer
        answer_ids = ids[start - n : start] if e.context.direction == "before" else ids[end : end + n]
        assert len(answer_ids) == n and not set(answer_ids) & specials  # message content, never markup
        labelled = fmt.tokenizer.decode([t for t in laid.write.labels if t >= 0])
        assert fmt.tokenizer.decode(answer_ids).strip() in labelled, (e, write_text)
        assert laid.write.patched_span[1] - laid.write.patched_span[0] == end - start


def test_a_short_dialog_cuts_the_span_and_the_answer(offline_session):
    from latentqa.data import ContextSpan, Example

    layout = offline_session.layout
    record = Record(control_user="Hi", label="goal-greet")
    for direction in ("before", "after"):
        wide = ContextSpan(position=0.99, span=500, answer=500, direction=direction)
        read, question, answer = layout.context_side(record, wide)
        assert answer.strip() == "Hi"  # the one message's whole content
        assert re.search(r"predict the (previous|next) (token|\d+ tokens)", question)
        assert 1 <= read.patched_span[1] - read.patched_span[0] < 500
        assert layout.example(Example(record, "", "", "test", wide), "train").read == read


def test_bad_sources_are_named_by_file_record_and_field(tmp_path):
    no_system = tmp_path / "records.json"
    no_system.write_text(json.dumps([{"control_user": "hello", "label": "goal-x"}]))
    with pytest.raises(DataError, match=r"records.json: record 0: field 'system' is required for yes/no"):
        mix_examples([MixSource(kind="yes_no", path=no_system, examples=4)])
    alone = tmp_path / "alone.json"
    alone.write_text(json.dumps([{"system": "Be a pirate.", "stimulus_user": "hi", "label": "persona-pirate"}]))
    with pytest.raises(DataError, match=r"alone.json: record 0: field 'label': no other system prompt of kind"):
        mix_examples([MixSource(kind="yes_no", path=alone, examples=4)])
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps([{"system": 3, "stimulus_user": "hi", "label": "persona-pirate"}]))
    with pytest.raises(DataError, match=r"broken.json: record 0: field 'system'"):
        mix_examples([MixSource(kind="context", path=broken, examples=4)])
    with pytest.raises(ConfigError, match=r"data.mix.0: .*span_tokens: need 1 <= low <= high"):
        load_config(
            overrides={
                "data": {"mix": [{"kind": "context", "path": str(STIMULUS), "examples": 3, "span_tokens": [4, 2]}]}
            }
        )
    with pytest.raises(ConfigError, match=r"data.mix.0.kind"):
        load_config(overrides={"data": {"mix": [{"kind": "riddles", "path": str(STIMULUS), "examples": 3}]}})


def test_the_shipped_training_prompts_make_the_readme_mix():
    """`datasets/latentqa/train-prompts` (the paper's training system prompts) builds the README's
    mix; none of its labels is a label of the evaluation splits."""
    from latentqa.paths import PROJECT_ROOT

    prompts = PROJECT_ROOT / "datasets" / "latentqa" / "train-prompts" / "system.json"
    sources = [
        MixSource(kind="yes_no", path=prompts, examples=400),
        MixSource(kind="context", path=prompts, examples=400),
    ]
    examples = mix_examples(sources)
    assert len(examples) == 800 and Counter(e.answer for e in examples[:400]) == {YES: 200, NO: 200}
    evaluated = {
        r["label"]
        for split in ("train", "heldout")
        for name in ("system.json", "stimulus.json", "control.json")
        for r in json.loads((PROJECT_ROOT / "datasets" / "latentqa" / split / name).read_text())
    }
    assert not {r["label"] for r in json.loads(prompts.read_text())} & evaluated


def test_a_mix_is_one_field_of_the_help_and_set_as_json_on_the_command_line():
    from latentqa.cli import build_parser

    helped = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    assert "--data.mix" in helped and "--data.mix.kind" not in helped
    mix = '[{"kind": "yes_no", "path": "' + str(SYSTEM) + '", "examples": 6}]'
    config = load_config(overrides=["--data.mix", mix])
    assert config.data.mix == [MixSource(kind="yes_no", path=SYSTEM, examples=6)]
