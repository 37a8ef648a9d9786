"""Where a decoder comes from: a PEFT adapter folder, or a reference to a registered one.

A reference (`models:/NAME/3`, `models:/NAME@alias`, `NAME@alias`) names a decoder in a model
registry. The engine knows no registry: a plugin installed under the entry-point group
`latentqa.registries` fetches the folder (the platform layer installs the MLflow one), so
`LatentQA.load(config, decoder="models:/NAME@champion")` works wherever that plugin is installed.
A plugin is a callable `fetch(reference, download_dir, registry, config) -> Path` with
`reference` normalised to `models:/...` and `registry` the registry's URI (None: its default).
"""

from __future__ import annotations

import contextlib
import re
import tempfile
from collections.abc import Iterator
from importlib.metadata import entry_points
from pathlib import Path

from .model_files import ModelFileError

REGISTRY_GROUP = "latentqa.registries"
_ALIAS_REFERENCE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*@[A-Za-z][A-Za-z0-9_-]*")


def registry_reference(decoder: str | Path) -> str | None:
    """`decoder` as a `models:/` URI when it names a registered decoder, else None (a folder)."""
    text = str(decoder)
    if text.startswith("models:/"):
        return text
    if _ALIAS_REFERENCE.fullmatch(text) and not Path(text).exists():
        return f"models:/{text}"
    return None


def check_adapter_folder(folder: Path, named: str) -> None:
    """A PEFT adapter in safetensors: a pickled `adapter_model.bin` could run code when loaded."""
    if not (folder / "adapter_config.json").is_file():
        raise ModelFileError(f"decoder {named}: {folder} is not a PEFT adapter folder (no adapter_config.json)")
    if not (folder / "adapter_model.safetensors").is_file() or (folder / "adapter_model.bin").exists():
        raise ModelFileError(f"decoder {named}: adapters load from adapter_model.safetensors only")


@contextlib.contextmanager
def decoder_folder(decoder: str | Path, registry: str | None, config) -> Iterator[Path]:
    """The adapter folder of `decoder`, checked; a registered one is fetched into a temporary
    folder that lives as long as the context (the weights are in memory once loaded)."""
    reference = registry_reference(decoder)
    if reference is None:
        folder = Path(decoder)
        check_adapter_folder(folder, str(decoder))
        yield folder
        return
    with tempfile.TemporaryDirectory(prefix="latentqa-decoder-") as tmp:
        folder = _registry_plugin(reference)(reference, Path(tmp), registry, config)
        check_adapter_folder(folder, reference)
        yield folder


def _registry_plugin(reference: str):
    plugins = sorted(entry_points(group=REGISTRY_GROUP), key=lambda plugin: plugin.name)
    if not plugins:
        raise ModelFileError(
            f"decoder {reference} is a registry reference, but no registry plugin is installed "
            f"(entry points `{REGISTRY_GROUP}`): pip install -e '.[platform]' for MLflow's"
        )
    if len(plugins) > 1:
        raise ModelFileError(
            f"decoder {reference}: several registry plugins are installed ({', '.join(p.name for p in plugins)})"
        )
    return plugins[0].load()
