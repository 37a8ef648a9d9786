"""Copy a trained adapter (a decoder into `infra/decoders/NAME/`, a control trained through it into
`infra/controls/NAME/CONTROL/`) to ship it with the project, its weights cast to bfloat16 (half the
bytes; LoRA weights lose nothing that matters here, and PEFT casts them back to the base model's
dtype on load).

    .venv/bin/python infra/decoders/ship.py runs/smollm2-135m-instruct/decoder infra/decoders/smollm2-135m-instruct
    .venv/bin/python infra/decoders/ship.py runs/steering/pirate/adapter-seed0 infra/controls/smollm2-135m-instruct/pirate
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

WEIGHTS = "adapter_model.safetensors"


def ship(source: Path, destination: Path) -> None:
    if destination.exists():
        raise SystemExit(f"{destination} exists; remove it first (nothing shipped is overwritten)")
    destination.mkdir(parents=True)
    for item in source.iterdir():
        if item.name != WEIGHTS:
            shutil.copy2(item, destination / item.name)
    tensors = {name: tensor.to(torch.bfloat16) for name, tensor in load_file(source / WEIGHTS).items()}
    save_file(tensors, destination / WEIGHTS, metadata={"format": "pt"})
    print(f"{destination / WEIGHTS}: {(destination / WEIGHTS).stat().st_size / 2**20:.1f} MiB")


if __name__ == "__main__":
    ship(Path(sys.argv[1]), Path(sys.argv[2]))
