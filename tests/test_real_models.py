"""The real models that reach this machine through PyPI (SmolLM2-135M-Instruct, Gemma 3 270M),
the paper's data split, and the decoder shipped for SmolLM2.

The slow tests need the models prepared by `infra/setup.sh` (CI always has them); elsewhere they
skip saying so, and under CI they fail instead.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from conftest import needs
from latentqa.config import load_config
from latentqa.data import DatasetSpec, load_examples
from latentqa.model_files import TARGET_FILE
from latentqa.paths import PROJECT_ROOT

SMOLLM2 = PROJECT_ROOT / "infra" / "configs" / "smollm2-135m-instruct.yaml"
GEMMA3 = PROJECT_ROOT / "infra" / "configs" / "gemma3-270m.yaml"
SPLIT = PROJECT_ROOT / "datasets" / "latentqa"


def prepared(config_file):
    """The config, or a skip (a failure under CI) when its model file has not been prepared."""
    config = load_config(config_file)
    needs(Path(config.model.path), "infra/setup.sh")
    return config


def test_the_paper_split_holds_out_whole_labels():
    spec = importlib.util.spec_from_file_location("build", SPLIT / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    train = load_examples(DatasetSpec(path=SPLIT / "train"))
    heldout = load_examples(DatasetSpec(path=SPLIT / "heldout"))
    train_labels, heldout_labels = {e.record.label for e in train}, {e.record.label for e in heldout}
    assert not train_labels & heldout_labels
    assert build.split_labels(train_labels | heldout_labels) == heldout_labels  # reproducible from the seed
    completions = [e for e in heldout if e.record.stimulus_model]  # the target's own replies
    assert {e.record.label.split("-")[0] for e in completions} == {"persona", "goal"}


def test_the_shipped_decoder_is_small_and_names_its_target():
    config = load_config(SMOLLM2)
    folder = PROJECT_ROOT / "infra" / "decoders" / "smollm2-135m-instruct"
    assert config.model.decoder_adapter == str(folder)
    assert (folder / "adapter_model.safetensors").stat().st_size < 8 * 2**20
    target = json.loads((folder / TARGET_FILE).read_text())
    assert (target["model_type"], target["num_hidden_layers"], target["hidden_size"], target["vocab_size"]) == (
        "llama",
        30,
        576,
        49152,
    )


@pytest.mark.slow
def test_the_shipped_decoder_reads_smollm2():
    from latentqa.identification import choice_items, multiple_choice
    from latentqa.session import LatentQA
    from latentqa.showcase import showcase

    lqa = LatentQA.load(prepared(SMOLLM2))
    items = [item for item in choice_items(SPLIT / "heldout") if item.setting == "system"][:24]
    result = multiple_choice(lqa, items, conditions=("true", "shuffled"))
    # 4-way choice on held-out personas and goals: chance is 0.25. Measured: 17/24 with true and
    # 16/24 with shuffled activations; the question and candidates carry most of it, the activations
    # a little (docs/real-models.md has the full figures and baselines).
    assert result.accuracy("true") >= 0.6, result.as_metrics()
    assert result.accuracy("true") >= result.accuracy("shuffled"), result.as_metrics()
    rows = showcase(count=2)
    assert all(row["target_reply"] and row["read_from_reply"] and row["read_with_system_prompt"] for row in rows)


@pytest.mark.slow
def test_gemma3_loads_lays_out_and_trains(tmp_path):
    import torch

    from latentqa.session import LatentQA
    from latentqa.training import adamw_factory

    config = prepared(GEMMA3)
    lqa = LatentQA.load(config, train_decoder=True)
    assert lqa.model.num_layers == 18 and lqa.chat_format.system_placement == "folded"  # the attached template
    batch = lqa.collate(lqa.lay_out(load_examples(config.data.train)[:4], "train"))
    optimizer = adamw_factory(config.train)(lqa.model.adapters.trainable_parameters())
    losses = []
    for _ in range(3):  # the same batch: a working step lowers its loss
        loss = lqa.model(batch, config.patch.read_layer)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses
