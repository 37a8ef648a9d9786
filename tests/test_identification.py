"""Multiple-choice identification (latentqa.identification) on the offline default."""

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


def test_picks_match_scoring_each_candidate_alone(offline_session):
    items = [item for item in choice_items(OFFLINE_HELDOUT, k=3) if item.setting == "reply"][:4]
    result = multiple_choice(offline_session, items, batch_size=5)
    for item, pick in zip(items, result.chosen["true"]):
        ranked = score(offline_session, item.dialog.messages, item.question, list(item.candidates))
        assert item.candidates[pick] == ranked[0].answer
    metrics = result.as_metrics()
    assert set(metrics) == {f"eval/choice/reply/{c}_accuracy" for c in ("true", "shuffled", "none")}
    assert metrics["eval/choice/reply/true_accuracy"] == sum(result.correct("true")) / len(items)
