"""One way to load: `LatentQA.load(config, decoder=...)` with a folder, a registry reference or
none, and the names `from latentqa import ...` offers."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch
from trained_decoder import ALIAS, DECODER_MODEL, trained_decoder

from latentqa.config import LatentQAConfig
from latentqa.model_files import ModelFileError
from latentqa.models import DECODER


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    return trained_decoder(tmp_path_factory.getbasetemp() / "trained-decoder")


def decoder_weights(lqa) -> dict[str, torch.Tensor]:
    return {name: p for name, p in lqa.model.peft_model.named_parameters() if f".{DECODER}." in name}


def test_a_decoder_loads_alike_from_its_folder_its_version_and_its_alias(decoder, monkeypatch):
    from latentqa import LatentQA

    config = LatentQAConfig.model_validate_json((decoder.run_dir / "config.json").read_text())
    given = config.model_dump()
    by_folder = LatentQA.load(config, decoder.folder)
    by_version = LatentQA.load(config, f"models:/{DECODER_MODEL}/{decoder.version}", registry=decoder.tracking_uri)
    by_alias = LatentQA.load(config, f"{DECODER_MODEL}@{ALIAS}", registry=decoder.tracking_uri)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", decoder.tracking_uri)  # no registry given: the jobs' default store
    by_config = LatentQA.load(
        config.model_copy(
            update={"model": config.model.model_copy(update={"decoder_adapter": f"models:/{DECODER_MODEL}@{ALIAS}"})}
        )
    )
    expected = decoder_weights(by_folder)
    assert len(expected) > 0 and any(p.abs().sum() > 0 for n, p in expected.items() if "lora_B" in n)
    for loaded in (by_version, by_alias, by_config):
        torch.testing.assert_close(decoder_weights(loaded), expected, rtol=0, atol=0)
    assert by_alias.config.model.decoder_adapter == f"{DECODER_MODEL}@{ALIAS}"  # what was loaded, not a temp folder
    assert config.model_dump() == given  # the caller's config is left as it was


def test_a_decoder_that_cannot_be_had_is_refused_by_name(decoder, tmp_path):
    from latentqa import LatentQA

    config = LatentQAConfig.model_validate_json((decoder.run_dir / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match=f"models:/{DECODER_MODEL}/99"):
        LatentQA.load(config, f"models:/{DECODER_MODEL}/99", registry=decoder.tracking_uri)
    pickled = shutil.copytree(decoder.folder, tmp_path / "pickled")
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    with pytest.raises(ModelFileError, match="safetensors only"):
        LatentQA.load(config, pickled)
    with pytest.raises(ModelFileError, match=r"no adapter_config\.json"):
        LatentQA.load(config, tmp_path)


def test_the_package_offers_the_engine_by_name_and_loads_torch_only_when_asked():
    probe = (
        "import sys, latentqa; assert 'torch' not in sys.modules, 'import latentqa loaded torch';"
        "from latentqa import LatentQA, load_config, read, score, steer, evaluate;"
        "assert 'torch' in sys.modules and callable(read) and LatentQA.load;"
        "print(LatentQA.__module__, evaluate.__module__)"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["latentqa.session", "latentqa.evaluation"]
    with pytest.raises(AttributeError, match="no attribute 'Reader'"):
        import latentqa

        latentqa.Reader  # noqa: B018
