"""Model folders from GGUF files: converted once into a cached Hugging Face folder.

`model.path` may name a `.gguf` file, or a folder that holds one and no `config.json`. The file
is dequantised by transformers (with the `gguf` package) and saved as a Hugging Face folder
(safetensors weights, `tokenizer.json`, the chat template the file carries) under
`$LATENTQA_MODEL_CACHE` (default `~/.cache/latentqa/models`), keyed by the file's name and content
hash (`<stem>-<sha256 prefix>`):
the first load converts (a minute for a 100M-parameter model on 2 cores), later loads only hash
the file and find the folder. Nothing here knows a model by name.

Adapters record the target they were trained on (`latentqa_target.json`, beside
`adapter_config.json`), and loading one onto a target of another shape is refused in one line.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

GGUF_MAGIC = b"GGUF"
SOURCE_FILE = "latentqa_source.json"  # written last: a folder without it is an unfinished conversion


class ModelFileError(ValueError):
    """A model file that cannot be used; the message says which file, what is wrong and what to do."""


def cache_root() -> Path:
    return Path(os.environ.get("LATENTQA_MODEL_CACHE") or Path.home() / ".cache" / "latentqa" / "models")


def hf_folder(path: str) -> str:
    """A Hugging Face model folder for `path`: `path` itself unless it names a GGUF file (or a
    folder holding one), which is converted on first use."""
    source = gguf_file(path)
    if source is None:
        return path
    stat = source.stat()
    return str(_converted(str(source), stat.st_size, stat.st_mtime_ns, cache_root()))


def gguf_file(path: str) -> Path | None:
    """The GGUF file that `path` names, or None for a Hugging Face folder or hub id."""
    candidate = Path(path).expanduser()
    if candidate.suffix == ".gguf":
        if not candidate.is_file():
            raise ModelFileError(f"model.path {path}: no such GGUF file")
        return candidate
    if candidate.is_dir() and not (candidate / "config.json").exists():
        found = sorted(candidate.glob("*.gguf"))
        if len(found) > 1:
            raise ModelFileError(
                f"model.path {path}: holds {len(found)} GGUF files ({', '.join(f.name for f in found)}); name one"
            )
        return found[0] if found else None
    return None


@functools.lru_cache(maxsize=8)  # keyed by size and mtime too, so a replaced file is hashed again
def _converted(source: str, size: int, mtime_ns: int, root: Path) -> Path:
    path = Path(source)
    _check_header(path)
    digest = _sha256(path)
    folder = root / f"{path.stem}-{digest[:16]}"
    if (folder / SOURCE_FILE).exists():
        return folder
    _convert(path, digest, folder)
    return folder


def _check_header(path: Path) -> None:
    with path.open("rb") as handle:
        if handle.read(4) != GGUF_MAGIC:
            raise ModelFileError(f"{path}: not a GGUF file (it does not start with 'GGUF')")


def _sha256(path: Path) -> str:
    from tqdm import tqdm

    digest = hashlib.sha256()
    with (
        path.open("rb") as handle,
        tqdm(
            total=path.stat().st_size,
            unit="B",
            unit_scale=True,
            desc=f"hashing {path.name}",
            leave=False,
            file=sys.stderr,
            disable=None,  # on a terminal only: in a job's log a bar is noise
        ) as bar,
    ):
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


def _architecture(path: Path) -> str:
    """The file's `general.architecture`, read through the gguf package (which checks the layout)."""
    import gguf

    try:
        reader = gguf.GGUFReader(path)
        field = reader.fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode()
    except KeyError:
        raise ModelFileError(f"{path}: the GGUF file has no general.architecture; it is not a model file") from None
    except Exception as err:  # numpy/struct errors from a short or damaged file
        raise ModelFileError(
            f"{path}: cannot read the GGUF file ({type(err).__name__}: {err}); it is probably truncated or "
            "damaged: reinstall the package that ships it or download it again"
        ) from None


def _convert(path: Path, digest: str, folder: Path) -> None:
    """Dequantise into a temporary folder and move it into place whole (concurrent loaders of the
    same file each convert, and the first to finish wins)."""
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    architecture = _architecture(path)
    try:  # transformers knows which GGUF architectures it converts (and their aliases): ask it
        AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    except ValueError as err:
        raise ModelFileError(
            f"{path}: GGUF architecture {architecture!r} cannot be converted by transformers "
            f"{transformers.__version__} ({err}); convert the model to a Hugging Face folder another way "
            "and point model.path at it"
        ) from None
    print(f"converting {path.name} ({architecture}) to a Hugging Face folder in {folder} (once)", file=sys.stderr)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    tmp.chmod(0o755)
    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        # The weights are dequantised now; without the GGUF quantizer marker save_pretrained accepts them.
        model.hf_quantizer = None
        model.config.quantization_config = None
        del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(tmp)
        (tmp / SOURCE_FILE).write_text(
            json.dumps({"gguf": path.name, "sha256": digest, "architecture": architecture}, indent=2)
        )
        try:
            tmp.rename(folder)
        except OSError:
            if not (folder / SOURCE_FILE).exists():
                raise
    except ModelFileError:
        raise
    except Exception as err:
        raise ModelFileError(f"{path}: conversion failed ({type(err).__name__}: {err})") from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


TARGET_FILE = "latentqa_target.json"  # beside adapter_config.json: the target an adapter was trained on
_IDENTITY_FIELDS = ("model_type", "num_hidden_layers", "hidden_size", "vocab_size")


class WrongTarget(ValueError):
    """An adapter trained on another target model than the one loaded; `trained` and `loaded`
    describe the two (for a message that names the adapter otherwise than by its folder)."""

    def __init__(self, message: str, trained: str = "", loaded: str = ""):
        super().__init__(message)
        self.trained, self.loaded = trained, loaded


def target_identity(model_config) -> dict:
    """The target as an adapter records it: its name and the shape any adapter depends on."""
    name = str(getattr(model_config, "_name_or_path", "") or "unnamed")
    return {
        "name": Path(name).name if Path(name).is_absolute() else name,
        **{field: getattr(model_config, field, None) for field in _IDENTITY_FIELDS},
    }


def write_target_identity(adapter_dir: str | Path, model_config) -> None:
    (Path(adapter_dir) / TARGET_FILE).write_text(json.dumps(target_identity(model_config), indent=2) + "\n")


def check_target(adapter_dir: str | Path, model_config) -> None:
    """Refuse, in one line naming both models, an adapter trained on a target of another shape.
    Adapters without the file (e.g. the paper's published decoder) load unchecked."""
    recorded_file = Path(adapter_dir) / TARGET_FILE
    if not recorded_file.is_file():
        return
    recorded, current = json.loads(recorded_file.read_text()), target_identity(model_config)
    if any(recorded.get(field) != current[field] for field in _IDENTITY_FIELDS):
        trained, loaded = _describe(recorded), _describe(current)
        raise WrongTarget(
            f"adapter {adapter_dir} was trained on {trained}, but the target loaded is {loaded}: load it with "
            "its own model (model.path, or the --config it was trained with)",
            trained,
            loaded,
        )


def _describe(identity: dict) -> str:
    return (
        f"{identity.get('name')} ({identity.get('model_type')}, {identity.get('num_hidden_layers')} blocks, "
        f"hidden {identity.get('hidden_size')}, vocab {identity.get('vocab_size')})"
    )
