"""Multiple-choice identification (latentqa.identification) on the offline default."""

import pytest

from latentqa.identification import choice_items, multiple_choice
from latentqa.paths import OFFLINE_HELDOUT
from latentqa.reading import score


def test_items_hold_the_true_description_among_same_kind_distractors():
    items = choice_items(OFFLINE_HELDOUT, k=4)
    assert {item.setting for item in items} == {"system", "reply"}
    assert items == choice_items(OFFLINE_HELDOUT, k=4)  # seeded
    for item in items:
        assert len(item.candidates) == len(set(item.candidates)) == 4
        assert item.label.split("-")[0] in ("persona", "goal")
    system = [item for item in items if item.setting == "system"]
    assert all(item.dialog.verb == "system" for item in system)  # the decoder never sees the system prompt
    reply = [item for item in items if item.setting == "reply"]
    assert all([m["role"] for m in item.dialog.messages] == ["user", "assistant"] for item in reply)


def test_the_papers_scenario_stories_are_items_too():
    """The paper's "sqa" labels: a story in the user's message (read whole), a question about it,
    distractors from other stories."""
    from latentqa.paths import PROJECT_ROOT

    items = [
        item
        for item in choice_items(PROJECT_ROOT / "datasets" / "latentqa" / "heldout", k=4)
        if item.setting == "story"
    ]
    assert len(items) == 22
    for item in items:
        assert item.label.startswith("sqa-") and item.dialog.verb == "none"
        assert [m["role"] for m in item.dialog.messages] == ["user"]
    answers = {item.candidates[item.answer] for item in items}
    assert all(set(item.candidates) <= answers for item in items)  # every distractor is another story's answer


def test_picks_match_scoring_each_candidate_alone(offline_session):
    items = [item for item in choice_items(OFFLINE_HELDOUT, k=3) if item.setting == "reply"][:4]
    result = multiple_choice(offline_session, items, batch_size=5)
    for item, pick in zip(items, result.chosen["true"]):
        ranked = score(offline_session, item.dialog.messages, item.question, list(item.candidates))
        assert item.candidates[pick] == ranked[0].answer
    metrics = result.as_metrics()
    assert set(metrics) == {
        f"eval/choice/reply/{c}_accuracy" for c in ("true", "shuffled", "none", "text", "prompting")
    }
    assert metrics["eval/choice/reply/true_accuracy"] == sum(result.correct("true")) / len(items)


def test_baselines_score_the_dialog_as_text(offline_session):
    """ "text": the decoder reads the read span's tokens in place of the placeholders; "prompting":
    the plain target scores the candidate as its reply to the question after the dialog."""
    from latentqa.identification import condition_write_side
    from latentqa.layout import IGNORE_INDEX

    lqa = offline_session
    item = [item for item in choice_items(OFFLINE_HELDOUT, k=3) if item.setting == "system"][0]
    read = lqa.layout.read_side(item.dialog)
    text = condition_write_side(lqa, "text", item, read, item.candidates[0])
    start, end = text.patched_span
    assert text.ids[start:end] == read.ids[read.patched_span[0] : read.patched_span[1]]
    placeholders = condition_write_side(lqa, "true", item, read, item.candidates[0])
    assert text.ids[:start] == placeholders.ids[:start] and text.ids[end:] == placeholders.ids[end:]
    prompt = condition_write_side(lqa, "prompting", item, read, item.candidates[0])
    decoded = lqa.tokenizer.decode(prompt.ids)
    assert item.dialog.messages[0]["content"] in decoded and item.question in decoded  # the target sees the text
    answer = [t for t, label in zip(prompt.ids, prompt.labels) if label != IGNORE_INDEX]
    assert lqa.tokenizer.decode(answer).startswith(item.candidates[0])


def test_layer_map_reads_every_layer_from_one_target_pass(offline_session):
    from latentqa.identification import layer_map

    every = choice_items(OFFLINE_HELDOUT, k=3)
    items = [i for i in every if i.setting == "system"][:3] + [i for i in every if i.setting == "reply"][:3]
    calls = []
    original = offline_session.model.target_activations
    offline_session.model.target_activations = lambda batch, layers, **kw: (
        calls.append(list(layers)) or original(batch, layers, **kw)
    )
    try:
        by_layer = layer_map(offline_session, items, [0, 1, 2, 3], batch_size=16)
    finally:
        del offline_session.model.target_activations
    assert calls == [[0, 1, 2, 3]]  # six dialogs, one batch, one pass for all four layers
    single = multiple_choice(offline_session, items, read_layer=2, batch_size=16)
    assert (
        by_layer[2].chosen["true"] == single.chosen["true"]
        and by_layer[2].chosen["shuffled"] == single.chosen["shuffled"]
    )
    # the gain: the true description's loss with shuffled minus with true activations, as scored
    i = next(i for i, item in enumerate(items) if item.setting == "reply")  # read whole, as `score` reads
    ranked = score(
        offline_session, items[i].dialog.messages, items[i].question, list(items[i].candidates), read_layer=2
    )
    true_loss = {s.answer: s.loss for s in ranked}[items[i].candidates[items[i].answer]]
    assert single.answer_losses["true"][i] == pytest.approx(true_loss, abs=1e-5)
    gains = [s - t for s, t in zip(single.answer_losses["shuffled"], single.answer_losses["true"])]
    assert by_layer[2].activation_gain() == pytest.approx(sum(gains) / len(gains))


def test_suite_writes_results_per_item_table_and_figures(offline_session, tmp_path):
    import json

    from latentqa.data import DatasetSpec, load_examples
    from latentqa.suite import run_suite

    spec = DatasetSpec(path=OFFLINE_HELDOUT)
    result = run_suite(offline_session, spec, load_examples(spec)[:24], layers=[0, 1], map_items=4, max_new_tokens=6)
    folder = result.write(tmp_path / "report")
    assert sorted(p.name for p in folder.iterdir()) == [
        "choice_accuracy.png",
        "layer_map.png",
        "per_item.jsonl",
        "results.json",
    ]
    metrics = json.loads((folder / "results.json").read_text())
    assert metrics["examples"] == 24 and metrics["choice/items"] == metrics["reading/items"] == len(result.choice.items)
    assert set(metrics) >= {
        "layer_map/0/true_accuracy",
        "layer_map/1/shuffled_accuracy",
        "layer_map/1/activation_gain",
        "choice/system/prompting_accuracy",
        "reading/reply/text_accuracy",
    }
    rows = [json.loads(line) for line in (folder / "per_item.jsonl").read_text().splitlines()]
    assert len(rows) == len(result.choice.items)
    assert sum(r["choice/true"] for r in rows) == sum(result.choice.correct("true"))
    assert sum(r["reading/none"] for r in rows) == sum(result.reading.correct("none"))
    assert [r["reading/prompting/answer"] for r in rows] == result.reading.answers["prompting"]


def test_suite_runs_the_tasks_asked_for(offline_session):
    import pytest

    from latentqa.data import DatasetSpec
    from latentqa.suite import run_suite

    spec = DatasetSpec(path=OFFLINE_HELDOUT)
    only = run_suite(offline_session, spec, tasks=["reading"], max_new_tokens=4)
    assert only.loss is None and only.choice is None and only.reading is not None
    assert {k.split("/")[1] for k in only.as_metrics()} == {"reading"}
    # every identification task and layer from one target pass per dialog (one batch here)
    calls = []
    original = offline_session.model.target_activations
    offline_session.model.target_activations = lambda batch, layers, **kw: (
        calls.append(list(layers)) or original(batch, layers, **kw)
    )
    try:
        run_suite(offline_session, spec, tasks=["choice", "reading"], layers=[0, 2], max_new_tokens=2, batch_size=64)
    finally:
        del offline_session.model.target_activations
    assert calls == [[0, 1, 2]]  # the read layer (1) and the map's layers
    with pytest.raises(ValueError, match=r"unknown suite task\(s\) \['judge'\]; the tasks are loss, choice, reading"):
        run_suite(offline_session, spec, tasks=["choice", "judge"])


def test_open_ended_answers_are_the_decoders_readings(offline_session):
    """ "true" answers are what `read` says about the same dialog; "prompting" answers are the
    target's own replies to the question after its dialog; each answer is judged by the rule."""
    from latentqa.identification import _asking, closest_candidate, judge_seed, open_ended
    from latentqa.reading import read
    from latentqa.steering import complete

    items = [item for item in choice_items(OFFLINE_HELDOUT, k=3) if item.setting == "reply"][:3]
    result = open_ended(offline_session, items, batch_size=2, max_new_tokens=8)
    assert set(result.answers) == {"true", "shuffled", "none", "text", "prompting"}
    assert result.answers["true"] == [
        read(offline_session, [i.dialog.messages], [i.question], max_new_tokens=8)[0][0] for i in items
    ]
    assert result.answers["prompting"] == complete(offline_session, [_asking(i) for i in items], None, 8)
    for condition, answers in result.answers.items():  # the picks follow from the answers alone
        assert result.chosen[condition] == [
            closest_candidate(a, i.candidates, i.question, judge_seed(i, condition)) for a, i in zip(answers, items)
        ]
    # a tie's draw does not depend on which other conditions ran
    alone = open_ended(offline_session, items, batch_size=2, max_new_tokens=8, conditions=["none"])
    assert alone.chosen["none"] == result.chosen["none"]


def test_the_judge_matches_answers_to_descriptions_by_content_words():
    from latentqa.identification import closest_candidate, word_overlap

    candidates = [
        "The assistant is a pirate who sails the seas.",
        "The assistant is a chef cooking pasta.",
        "It will express itself as a calm robot.",
    ]
    assert closest_candidate("Arr, a pirate on the seas!", candidates) == 0
    assert closest_candidate("I love cooking pasta", candidates) == 1
    assert word_overlap("The assistant's tone: it's calm", "It's a chef's dish") == 0.0  # no "s" fragments
    assert word_overlap("the assistant is a", "The assistant is a chef.") == 0.0  # stopwords tell nothing apart
    # the question's own words do not count: echoing "express itself" favours no candidate
    assert word_overlap("It will express itself.", candidates[2], "How will the assistant express itself?") == 0.0
    assert word_overlap("It will express itself.", candidates[2]) > 0
    # an answer that shares nothing is a draw among all candidates, not a pick of the first
    picks = {closest_candidate("zzz", candidates, seed=str(seed)) for seed in range(20)}
    assert picks == {0, 1, 2}
