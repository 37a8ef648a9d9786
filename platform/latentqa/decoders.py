"""Where a decoder comes from: a PEFT adapter folder, or a reference to a registered one.

A reference (`models:/NAME/3`, `models:/NAME@alias`, `NAME@alias`) names a decoder in a model
registry. The engine knows no registry: a plugin fetches the folder. The platform layer declares
the MLflow one under the entry-point group `latentqa.registries` (so `LatentQA.load(config,
decoder="models:/NAME@champion")` works wherever the project is installed) and registers it on
import too (`register_registry`, for code run from a checkout on PYTHONPATH, as `ray job submit
--working-dir` does).
A plugin is a callable `fetch(reference, download_dir, registry, config) -> Path` with
`reference` normalised to `models:/...` and `registry` the registry's URI (None: its default).
"""

from __future__ import annotations

import contextlib
import json
import re
import tempfile
from collections.abc import Callable, Iterator
from importlib.metadata import entry_points
from pathlib import Path

from .model_files import ModelFileError

REGISTRY_GROUP = "latentqa.registries"
# Beside a decoder's folder: the config it was trained with (`<run>/config.json` beside `<run>/decoder`,
# written by `latentqa train` and jobs/train.py; a registered version's `config.json` artifact).
TRAINED_CONFIG = "config.json"
_ALIAS_REFERENCE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*@[A-Za-z][A-Za-z0-9_-]*")


def registry_reference(decoder: str | Path) -> str | None:
    """`decoder` as a `models:/` URI when it names a registered decoder, else None (a folder)."""
    text = str(decoder)
    if text.startswith("models:/"):
        return text
    if _ALIAS_REFERENCE.fullmatch(text) and not Path(text).exists():
        return f"models:/{text}"
    return None


def trained_config_file(folder: Path) -> Path | None:
    """The config file `folder`'s decoder was trained with, if one sits beside it."""
    found = Path(folder).parent / TRAINED_CONFIG
    return found if found.is_file() else None


def trained_read_layer(folder: Path, default: int) -> int:
    """The block the decoder in `folder` was trained to read: `patch.read_layer` of the config beside
    it (`trained_config_file`), read loosely (a config of another version of this project still
    says it), else `default` (no such file, or a file that is not ours: a model's own config.json)."""
    found = trained_config_file(folder)
    try:
        layer = json.loads(found.read_text())["patch"]["read_layer"] if found else None
    except (OSError, ValueError, KeyError, TypeError):
        layer = None
    return layer if isinstance(layer, int) and not isinstance(layer, bool) and layer >= 0 else default


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


_REGISTERED: dict[str, Callable] = {}


def register_registry(name: str, fetch: Callable) -> None:
    """Make `fetch` the plugin called `name` (as the entry point of that name would)."""
    _REGISTERED[name] = fetch


def _registry_plugin(reference: str) -> Callable:
    plugins = {
        **{p.name: p.load for p in entry_points(group=REGISTRY_GROUP)},
        **{n: lambda f=f: f for n, f in _REGISTERED.items()},
    }
    if not plugins:
        raise ModelFileError(
            f"decoder {reference} is a registry reference, but no registry plugin is installed "
            f"(entry points `{REGISTRY_GROUP}`): pip install -e '.[platform]' for MLflow's"
        )
    if len(plugins) > 1:
        raise ModelFileError(
            f"decoder {reference}: several registry plugins are installed ({', '.join(sorted(plugins))})"
        )
    return next(iter(plugins.values()))()
