"""Control (steering), SPEC "Control": train a LoRA on the target through the frozen decoder.

Each sample pairs a prompt from an instruction set (read whole, verb none) with one control
QA pair laid out in score mode; the decoder's loss on the control answer flows back through
the patched activations into the target's control adapter. The per-layer variant decodes from
every controlled block, each loss reaching only its own block.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import SteerConfig
from .data import QAPair, ReadDialog
from .layout import LaidOutExample, left_pad
from .models import CONTROL
from .patching import positions
from .session import LatentQA


@dataclass(frozen=True)
class SteerResult:
    adapter_dir: Path
    losses: list[float]  # one per step


def _sample(lqa: LatentQA, prompt: str, reference: str | None, qa: QAPair) -> LaidOutExample:
    messages = [{"role": "user", "content": prompt}]
    if reference:
        messages.append({"role": "assistant", "content": reference})
    read_side = lqa.layout.read_side(ReadDialog(messages, "none", reference is None))
    n = read_side.patched_span[1] - read_side.patched_span[0]
    return LaidOutExample(read_side, lqa.layout.write_side(n, qa[0], qa[1], "score"))


def steer(
    lqa: LatentQA,
    control: Sequence[QAPair],
    prompts: Sequence[str],
    out_dir: str | Path,
    cfg: SteerConfig | None = None,
    references: Sequence[str] | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> SteerResult:
    """Train a control adapter on target blocks 0..cfg.layers-1 and save it in PEFT format."""
    cfg = cfg or lqa.config.steer
    if not control:
        raise ValueError("a control needs at least one [question, answer] pair")
    if not prompts:
        raise ValueError("steering needs at least one prompt")
    if not 0 < cfg.layers <= lqa.model.num_layers:
        raise ValueError(f"steer.layers {cfg.layers} must be within the model's {lqa.model.num_layers} blocks")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} is not empty; choose a new output folder")
    lqa.model.adapters.add_control(cfg)
    params = lqa.model.adapters.trainable_parameters()
    optimizer = torch.optim.Adam(params, lr=cfg.lr)
    rng = random.Random(cfg.seed)
    read_layers = list(range(cfg.layers)) if cfg.per_layer else [cfg.layers - 1]
    shift = lqa.config.patch.shift_position_ids_train
    losses = []
    lqa.model.train()
    for step in range(cfg.steps):
        picks = [rng.randrange(len(prompts)) for _ in range(cfg.batch_size)]
        batch = lqa.collate(
            [_sample(lqa, prompts[p], references[p] if references else None, rng.choice(list(control))) for p in picks]
        )
        acts = lqa.model.target_activations(
            batch, read_layers, adapter=CONTROL, grad=True, detach_between=cfg.per_layer
        )
        loss = torch.stack([lqa.model.decoder_loss(batch, acts[layer], shift) for layer in read_layers]).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if on_step:
            on_step(step, losses[-1])
    lqa.model.eval()
    lqa.model.adapters.save(CONTROL, out_dir)
    return SteerResult(out_dir, losses)


@torch.no_grad()
def complete(
    lqa: LatentQA, prompts: Sequence[str | list[dict[str, str]]], adapter: str | None = None, max_new_tokens: int = 32
) -> list[str]:
    """Greedy replies of the target (adapter None) or of the target with a control adapter, to
    user prompts or whole dialogs (lists of messages)."""
    fmt = lqa.chat_format
    dialogs = [[{"role": "user", "content": p}] if isinstance(p, str) else p for p in prompts]
    rows = [fmt.prompt_ids(d) for d in dialogs]
    ids, attention = left_pad(rows, fmt.pad_id)
    ids, attention = ids.to(lqa.device), attention.to(lqa.device)
    tokens = lqa.model.generate(
        ids, attention, positions(attention), max_new_tokens, lqa.stop_ids, fmt.pad_id, adapter=adapter
    )
    return [lqa.decode(t) for t in tokens]
