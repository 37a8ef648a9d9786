"""The engine's APIs on the offline default: read, score, steer, evaluate, and their errors."""

import json

import pytest

from conftest import offline_config
from latentqa.data import DatasetSpec, load_examples
from latentqa.evaluation import evaluate, shuffled_partners
from latentqa.models import CONTROL
from latentqa.paths import CONTROLS_DIR, OFFLINE_HELDOUT, STEER_PROMPTS
from latentqa.reading import read, score
from latentqa.steering import complete, steer

DIALOGS = [
    [{"role": "user", "content": "Please talk like a pirate from now on."}],
    [
        {"role": "system", "content": "You are a cheerful baker."},
        {"role": "user", "content": "What should I make today?"},
        {"role": "assistant", "content": "Fresh bread, of course!"},
        {"role": "user", "content": "And for dessert?"},
    ],
]


def test_read_runs_one_target_pass_per_dialog_batch(offline_session, monkeypatch):
    lqa = offline_session
    calls = []
    original = lqa.model.target_activations
    monkeypatch.setattr(
        lqa.model, "target_activations", lambda batch, *a, **k: calls.append(len(batch)) or original(batch, *a, **k)
    )
    questions = ["What persona?", "What goal?", "What topic?"]
    answers = read(lqa, DIALOGS, questions, max_new_tokens=5)
    assert calls == [len(DIALOGS)]  # one pass for both dialogs, none per question
    assert len(answers) == 2 and all(len(a) == 3 and all(isinstance(x, str) for x in a) for a in answers)


def test_read_takes_per_dialog_questions_and_rejects_bad_dialogs(offline_session):
    answers = read(offline_session, DIALOGS, [["One?"], ["Two?", "Three?"]], max_new_tokens=3)
    assert [len(a) for a in answers] == [1, 2]
    with pytest.raises(ValueError, match="message 0"):
        read(offline_session, [[{"role": "user", "text": "hi"}]], ["Q?"])


def test_score_ranks_candidates_by_loss(offline_session):
    lqa = offline_session
    ranked = score(lqa, DIALOGS[0], "Who is the assistant?", ["A pirate.", "A baker who loves bread.", "Nobody."])
    assert sorted(r.answer for r in ranked) == sorted(["A pirate.", "A baker who loves bread.", "Nobody."])
    assert [r.loss for r in ranked] == sorted(r.loss for r in ranked)


def test_evaluate_reports_three_conditions(offline_session):
    examples = load_examples(DatasetSpec(path=OFFLINE_HELDOUT))[:24]
    partners = shuffled_partners(examples)
    assert all(examples[i].record.label != examples[j].record.label for i, j in enumerate(partners))
    result = evaluate(offline_session, examples, batch_size=8)
    assert result.examples == 24
    assert result.activation_gain == pytest.approx(result.loss_shuffled - result.loss_true)
    assert set(result.as_metrics()) == {
        "eval/loss_true",
        "eval/loss_shuffled",
        "eval/loss_none",
        "eval/activation_gain",
        "eval/activation_gain_ci_low",
        "eval/activation_gain_ci_high",
    }


def test_per_layer_control_gradients_stay_in_their_block(offline_session):
    lqa = offline_session
    lqa.model.adapters.add_control(offline_config().steer, 2)
    batch = lqa.collate(lqa.lay_out(load_examples(DatasetSpec(path=OFFLINE_HELDOUT))[:2], "score"))
    acts = lqa.model.target_activations(batch, [0, 1], adapter=CONTROL, grad=True, detach_between=True)
    lqa.model.decoder_loss(batch, acts[1], shift=False).backward()
    grads = {n: p.grad for n, p in lqa.model.peft_model.named_parameters() if f".{CONTROL}." in n}
    assert all(g is None or not g.any() for n, g in grads.items() if ".layers.0." in n)
    assert any(g is not None and g.any() for n, g in grads.items() if ".layers.1." in n)
    lqa.model.adapters.remove_control()


@pytest.mark.parametrize("per_layer", [False, True])
def test_steer_lowers_control_loss_and_changes_the_target(offline_session, tmp_path, per_layer):
    lqa = offline_session
    control = json.loads((CONTROLS_DIR / "pirate.json").read_text())["qa"]
    prompts = json.loads(STEER_PROMPTS.read_text())
    before = complete(lqa, prompts["heldout"], max_new_tokens=8)
    cfg = lqa.config.steer.model_copy(update={"steps": 30, "per_layer": per_layer, "lr": 3e-3})
    result = steer(lqa, control, prompts["train"], tmp_path / "control", cfg)
    assert sum(result.losses[-5:]) / 5 < sum(result.losses[:5]) / 5
    saved = json.loads((tmp_path / "control" / "adapter_config.json").read_text())
    assert saved["layers_to_transform"] == list(range(lqa.decoder_read_layer + 1))
    assert (tmp_path / "control" / "adapter_model.safetensors").exists()
    after = complete(lqa, prompts["heldout"], adapter=CONTROL, max_new_tokens=8)
    assert after != before
    assert complete(lqa, prompts["heldout"], max_new_tokens=8) == before  # the plain target is untouched
    with pytest.raises(FileExistsError):
        steer(lqa, control, prompts["train"], tmp_path / "control", cfg)
    lqa.model.adapters.remove_control()


def test_paired_interval_is_the_normal_interval_of_the_mean():
    from latentqa.evaluation import paired_interval

    low, high = paired_interval([1.0, 2.0, 3.0])  # mean 2, sd 1
    assert (low, high) == pytest.approx((2 - 1.96 / 3**0.5, 2 + 1.96 / 3**0.5))
    assert paired_interval([0.5]) == (0.5, 0.5)


def test_a_decoder_refuses_a_target_of_another_shape_in_one_line(offline_session, tiny_model_dirs, tmp_path):
    from conftest import session_for
    from latentqa.model_files import TARGET_FILE, WrongTarget
    from latentqa.models import DECODER
    from latentqa.session import LatentQA

    folder = offline_session.model.adapters.save(DECODER, tmp_path / "decoder")
    recorded = json.loads((folder / TARGET_FILE).read_text())
    assert recorded["name"] == "tiny-llama" and recorded["num_hidden_layers"] == 4
    LatentQA.load(offline_config(model={"decoder_adapter": str(folder)}))  # its own target loads
    mistral = session_for(tiny_model_dirs["mistral"]).config  # 3 blocks, hidden 64
    with pytest.raises(WrongTarget) as refused:
        LatentQA.load(
            mistral.model_copy(update={"model": mistral.model.model_copy(update={"decoder_adapter": str(folder)})})
        )
    message = str(refused.value)
    assert "\n" not in message and "tiny-llama (llama, 4 blocks" in message and "(mistral, 3 blocks" in message
