"""Steering on the tiny offline model: the control reads where its decoder reads, a disagreeing
config is refused, the same seed gives the same adapter, and the steering evaluation's judges,
fluency figures and steering vector compute what they say."""

import json
import math
import subprocess
import sys

import pytest
import torch

from conftest import offline_config
from latentqa.config import ConfigError
from latentqa.models import DECODER
from latentqa.paths import CONTROLS_DIR, PROJECT_ROOT, STEER_PROMPTS
from latentqa.steering import ControlFile, JudgeSpec, load_control, reply_ids, steer
from latentqa.steering_evaluation import (
    Condition,
    SteeringEvaluation,
    SteeringResult,
    judge,
    perplexity,
    repeated_trigram_share,
    steering_vector,
)

PROMPTS = json.loads(STEER_PROMPTS.read_text())
PIRATE = load_control(CONTROLS_DIR / "pirate.json")


@pytest.fixture(scope="module")
def decoder_run(offline_session, tmp_path_factory):
    """A decoder saved as a training run leaves it: `<run>/decoder` beside `<run>/config.json`,
    trained (so its config says) to read block 2 of the tiny model's 4, not the default 1."""
    run = tmp_path_factory.mktemp("run")
    offline_session.model.adapters.save(DECODER, run / "decoder")
    (run / "config.json").write_text(offline_config(patch={"read_layer": 2}).model_dump_json())
    return run


@pytest.fixture(scope="module")
def run_session(decoder_run):
    from latentqa.session import LatentQA

    return LatentQA.load(offline_config(), decoder_run / "decoder")


def test_the_decoder_read_layer_is_its_training_configs(offline_session, run_session, decoder_run, tmp_path):
    from latentqa.session import LatentQA

    assert run_session.config.patch.read_layer == 1 and run_session.decoder_read_layer == 2
    assert offline_session.decoder_read_layer == 1  # no training config beside it: the loaded config's
    alone = tmp_path / "decoder"
    alone.symlink_to(decoder_run / "decoder", target_is_directory=True)  # the same adapter, no config beside it
    assert LatentQA.load(offline_config(patch={"read_layer": 3}), alone).decoder_read_layer == 3


def test_the_control_reads_where_the_decoder_reads(run_session, tmp_path):
    lqa = run_session
    cfg = lqa.config.steer.model_copy(update={"steps": 2})
    read_at = []
    original = lqa.model.target_activations
    lqa.model.target_activations = lambda batch, layers, **kw: read_at.append(layers) or original(batch, layers, **kw)
    try:
        steer(lqa, PIRATE.qa, PROMPTS["train"], tmp_path / "control", cfg)
    finally:
        del lqa.model.target_activations
        lqa.model.adapters.remove_control()
    assert read_at == [[2], [2]]
    saved = json.loads((tmp_path / "control" / "adapter_config.json").read_text())
    assert saved["layers_to_transform"] == [0, 1, 2]


def test_a_steer_layers_that_reads_elsewhere_is_refused_naming_both(run_session, tmp_path):
    cfg = run_session.config.steer.model_copy(update={"steps": 1, "layers": 2})
    with pytest.raises(
        ConfigError, match=r"steer.layers 2 reads the control at block 1, but the decoder reads block 2"
    ):
        steer(run_session, PIRATE.qa, PROMPTS["train"], tmp_path / "control", cfg)
    assert not (tmp_path / "control").exists()
    agreeing = cfg.model_copy(update={"layers": 3})
    steer(run_session, PIRATE.qa, PROMPTS["train"], tmp_path / "control", agreeing)
    run_session.model.adapters.remove_control()


@pytest.mark.slow
def test_the_cli_refuses_a_disagreeing_steer_layers_in_one_line(decoder_run, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "latentqa.cli", "steer", "--decoder", str(decoder_run / "decoder")]
        + ["--steer.layers", "4", "--out", str(tmp_path / "control")],
        capture_output=True,
        text=True,
        cwd=PROJECT_ROOT,
        timeout=300,
    )
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: steer.layers 4 reads the control at block 3, but the decoder reads block 2: "
        "leave steer.layers unset (it follows the decoder) or set it to 3"
    )
    assert "Traceback" not in proc.stderr and not (tmp_path / "control").exists()


@pytest.mark.slow
def test_the_cli_evaluates_a_control_over_seeds_beside_the_baselines(decoder_run, tmp_path):
    def cli(*args):
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "latentqa.cli",
                "evaluate-steering",
                "--decoder",
                str(decoder_run / "decoder"),
                *args,
            ],
            capture_output=True,
            text=True,
            cwd=PROJECT_ROOT,
            timeout=600,
        )

    proc = cli("--steer.steps", "2", "--seeds", "0", "1", "--max-new-tokens", "6", "--output", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "steering.json").read_text())
    names = [c["name"] for c in report["conditions"]]
    assert names == ["target", "prompted", "vector-x1", "vector-x2", "vector-x4", "vector-x8"] + [
        "steered-seed0",
        "steered-seed1",
    ]
    assert report["read_layer"] == 2 and len(report["prompts"]) == len(PROMPTS["heldout"])
    assert set(report["spread"]) == {"behaviour_rate", "perplexity_ratio", "repeated_trigrams"}
    assert (tmp_path / "out" / "adapter-seed1" / "adapter_model.safetensors").is_file()
    assert "| steered-seed1 |" in proc.stdout
    refused = cli("--adapter", str(tmp_path / "out" / "adapter-seed0"), "--seeds", "1")
    assert refused.returncode != 0 and refused.stderr.strip().splitlines()[-1] == (
        "error: give --adapter (evaluate that one) or --seeds (train one per seed), not both"
    )


def test_the_same_seed_gives_the_same_adapter(offline_session, tmp_path):
    from safetensors.torch import load_file

    def adapter(seed: int, name: str) -> dict:
        cfg = offline_session.config.steer.model_copy(update={"steps": 3, "seed": seed, "dropout": 0.3})
        steer(offline_session, PIRATE.qa, PROMPTS["train"], tmp_path / name, cfg)
        offline_session.model.adapters.remove_control()
        return load_file(tmp_path / name / "adapter_model.safetensors")

    torch.manual_seed(123)  # the caller's random state differs between the runs: the seed alone decides
    first = adapter(0, "a")
    torch.rand(7)
    again, other = adapter(0, "b"), adapter(1, "c")
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_keyword_judge_matches_whole_words_in_any_case():
    shows = judge(JudgeSpec(keywords=["arr", "shiver me timbers"]))
    assert shows("ARR, that be true.") and shows("Well, shiver me timbers!")
    assert not shows("I carry the groceries.") and not shows("An arrow flew.")


def test_sentiment_judge_uses_vaders_lexicon():
    positive, negative = judge(JudgeSpec(sentiment="positive")), judge(JudgeSpec(sentiment="negative"))
    assert positive("What a wonderful, lovely day! I love it.") and not negative("What a wonderful, lovely day!")
    assert negative("This is awful, terrible and I hate it.") and not positive("This is awful and I hate it.")
    assert not positive("The bus leaves at nine.") and not negative("The bus leaves at nine.")


def test_repeated_trigram_share():
    assert repeated_trigram_share("a b c a b c") == pytest.approx(1 / 4)  # abc bca cab abc: one repeat
    assert repeated_trigram_share("The cat sat on the mat.") == 0
    assert repeated_trigram_share("too short") == 0


def test_perplexity_is_the_models_own_loss_over_the_reply_tokens(offline_session):
    lqa = offline_session
    prompts = ["Hi there", "What should I cook for dinner tonight, and why?"]
    replies = reply_ids(lqa, prompts, None, 6)
    total, count = 0.0, 0
    for prompt, reply in zip(prompts, replies):  # one unpadded sequence at a time, by HF's own loss
        context = lqa.chat_format.prompt_ids(
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": prompt}]
        )
        ids = torch.tensor([context + reply])
        labels = torch.tensor([[-100] * len(context) + reply])
        with torch.no_grad(), lqa.model.adapters.use(None):
            loss = lqa.model.peft_model(input_ids=ids, labels=labels).loss
        total, count = total + float(loss) * len(reply), count + len(reply)
    assert perplexity(lqa, prompts, replies, "Be brief.") == pytest.approx(math.exp(total / count), rel=1e-4)


def _last_states(lqa, prompts, system=None):
    from latentqa.layout import left_pad

    head = [{"role": "system", "content": system}] if system else []
    rows = [lqa.chat_format.prompt_ids([*head, {"role": "user", "content": p}]) for p in prompts]
    return lqa.model.last_token_states(*left_pad(rows, lqa.chat_format.pad_id), 1)


def test_the_steering_vector_adds_exactly_its_vector(offline_session):
    lqa, prompts = offline_session, PROMPTS["heldout"][:3]
    vector = torch.randn(lqa.model.peft_model.config.hidden_size)
    plain = _last_states(lqa, prompts)
    with lqa.model.adding(1, vector):
        added = _last_states(lqa, prompts)
    assert torch.allclose(added - plain, vector.expand_as(plain), atol=1e-5)
    assert torch.equal(_last_states(lqa, prompts), plain)  # gone after the context
    expected = (_last_states(lqa, prompts, "Talk like a pirate.") - plain).mean(0)
    assert torch.allclose(steering_vector(lqa, "Talk like a pirate.", prompts, 1), expected, atol=1e-5)


def test_steering_evaluation_reports_every_condition(offline_session, tmp_path):
    lqa = offline_session
    control = ControlFile(
        name="pirate", instruction=PIRATE.instruction, qa=PIRATE.qa, judge=JudgeSpec(keywords=["the", "a"])
    )
    evaluation = SteeringEvaluation(lqa, control, PROMPTS["heldout"][:4], max_new_tokens=8)
    rows = evaluation.baselines(PROMPTS["train"][:4], coefficients=(1.0, 4.0))
    steer(lqa, PIRATE.qa, PROMPTS["train"], tmp_path / "control", lqa.config.steer.model_copy(update={"steps": 2}))
    rows.append(evaluation.steered())
    lqa.model.adapters.remove_control()
    result = evaluation.result(rows)
    names = [c.name for c in result.conditions]
    assert names == ["target", "prompted", "vector-x1", "vector-x4", "steered"]
    target = result.conditions[0]
    assert target.perplexity_ratio == pytest.approx(target.perplexity / evaluation._plain_perplexity)
    for c in result.conditions:
        assert len(c.replies) == 4 and 0 <= c.behaviour_rate <= 1 and c.perplexity > 0
        assert c.behaviour_rate == sum(judge(control.judge)(r) for r in c.replies) / 4
        assert c.repeated_trigrams == pytest.approx(sum(map(repeated_trigram_share, c.replies)) / 4)
    metrics = result.as_metrics()
    assert metrics["steering/steered/behaviour_rate"] == result.conditions[-1].behaviour_rate
    strict = lqa.config.steer.model_copy(update={"max_perplexity_ratio": 1e-3, "max_repeated_trigrams": None})
    assert result.degenerate(strict).startswith("degenerate control: steered: perplexity")
    lenient = strict.model_copy(update={"max_perplexity_ratio": None})
    assert result.degenerate(lenient) is None
    written = result.write(tmp_path / "report")
    assert {p.name for p in written.iterdir()} == {"steering.json", "steering.md", "steering.png"}
    report = json.loads((written / "steering.json").read_text())
    assert report["matched_vector"] == result.matched_vector and len(report["conditions"]) == 5


def test_shipped_controls_are_valid_and_judged():
    for path in sorted(CONTROLS_DIR.glob("*.json")):
        control = load_control(path)
        assert control.qa and control.instruction and control.judge, path.name
    names = {load_control(p).name for p in CONTROLS_DIR.glob("*.json")}
    assert {"pirate", "veganism", "eiffel-tower", "positive", "negative"} <= names


def test_a_bad_control_file_is_named(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"name": "x", "qa": [["q"]], "judge": {"sentiment": "happy"}}))
    with pytest.raises(ConfigError, match=r"bad.json: qa.0.1: Field required; judge.sentiment: Input should be"):
        load_control(bad)
    bad.write_text(json.dumps({"name": "x"}))
    with pytest.raises(ConfigError, match="a control needs qa pairs or an instruction"):
        load_control(bad)


def test_the_shipped_smollm2_controls_sit_where_its_decoder_reads():
    """Each control shipped for SmolLM2's decoder is a safetensors PEFT adapter for SmolLM2 on
    blocks 0..12 (the decoder reads block 12), and the Serve app offers them as chat models."""
    from latentqa.config import load_config
    from latentqa.paths import SHIPPED_CONTROLS
    from serve.app import shipped_controls

    config = load_config(PROJECT_ROOT / "infra" / "configs" / "smollm2-135m-instruct.yaml")
    decoder = PROJECT_ROOT / config.model.decoder_adapter
    shipped = shipped_controls(decoder.name)
    assert "pirate" in shipped and shipped_controls("no-such-decoder") == {}
    target = json.loads((decoder / "latentqa_target.json").read_text())
    for name, folder in shipped.items():
        folder = SHIPPED_CONTROLS / decoder.name / name
        assert {p.name for p in folder.iterdir()} == {
            "adapter_config.json",
            "adapter_model.safetensors",
            "latentqa_target.json",
        }, name
        assert json.loads((folder / "latentqa_target.json").read_text()) == target, name
        layers = json.loads((folder / "adapter_config.json").read_text())["layers_to_transform"]
        assert layers == list(range(config.patch.read_layer + 1)), name
        assert load_control(CONTROLS_DIR / f"{name}.json").name == name


def test_the_matched_vector_is_the_strongest_as_fluent():
    def row(name, rate, perplexity_ratio, repeats):
        return Condition(name, [], rate, 1.0, perplexity_ratio, repeats)

    vectors = [
        row("vector-x1", 0.2, 1.1, 0.05),
        row("vector-x2", 0.6, 1.9, 0.05),
        row("vector-x4", 0.9, 4.0, 0.05),  # shows it more, but less fluent than the control
        row("vector-x8", 0.95, 1.5, 0.50),  # repeats itself more than the control
    ]
    target = row("target", 0.0, 1.0, 0.0)
    result = SteeringResult("c", 1, [], [target, *vectors, row("steered", 0.9, 2.0, 0.1)])
    assert result.matched_vector == "vector-x2"
    none_as_fluent = SteeringResult("c", 1, [], [target, *vectors, row("steered", 0.9, 1.05, 0.01)])
    assert none_as_fluent.matched_vector == "vector-x1"  # then the most fluent one
    seeds = [row("steered-seed0", 0.9, 1.2, 0.1), row("steered-seed1", 0.7, 2.0, 0.2)]
    spread = SteeringResult("c", 1, [], [target, *vectors, *seeds])
    assert spread.matched_vector == "vector-x2"  # as fluent as the worst seed
    assert spread.spread() == {
        "behaviour_rate": [0.7, 0.9],
        "perplexity_ratio": [1.2, 2.0],
        "repeated_trigrams": [0.1, 0.2],
    }


def test_the_kl_term_is_zero_until_the_control_moves_the_target(offline_session):
    from latentqa.steering import _drift, _own_replies

    lqa = offline_session
    rows = _own_replies(lqa, PROMPTS["train"][:3])
    lqa.model.adapters.add_control(lqa.config.steer, 2)  # LoRA B starts at zero: the target itself
    try:
        assert float(_drift(lqa, rows)) == pytest.approx(0.0, abs=1e-6)
        with torch.no_grad():
            for name, param in lqa.model.peft_model.named_parameters():
                if ".control." in name and "lora_B" in name:
                    param.normal_(std=0.5)
        assert float(_drift(lqa, rows)) > 1e-3
    finally:
        lqa.model.adapters.remove_control()


def test_a_decoders_read_layer_is_read_loosely_from_the_config_beside_it(tmp_path):
    from latentqa.decoders import trained_read_layer

    folder = tmp_path / "decoder"
    folder.mkdir()
    assert trained_read_layer(folder, 7) == 7  # no config beside it
    (tmp_path / "config.json").write_text(json.dumps({"patch": {"read_layer": 12}, "from_a_later_version": 1}))
    assert trained_read_layer(folder, 7) == 12
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))  # a model's
    assert trained_read_layer(folder, 7) == 7
