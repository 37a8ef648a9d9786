"""Control (steering), SPEC "Control": train a LoRA on the target through the frozen decoder.

Each sample pairs a prompt from an instruction set (read whole, verb none) with one control
QA pair laid out in score mode; the decoder's loss on the control answer flows back through
the patched activations into the target's control adapter. The control is read where the
decoder reads (`LatentQA.decoder_read_layer`): a decoder trained on block 12 says nothing
useful about block 1, and a control trained through it there breaks the target's language.
The per-layer variant decodes from every controlled block, each loss reaching only its own block.

A control file (`controls/*.json`, `ControlFile`) holds the QA pairs, the instruction that
prompts the same behaviour (the prompted baseline of `latentqa.steering_evaluation`) and the
judge that tells whether a reply shows it.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, ValidationError, model_validator

from .config import ConfigError, SteerConfig, StrictModel, validation_message
from .data import QAPair, ReadDialog
from .layout import LaidOutExample, left_pad
from .models import CONTROL
from .patching import positions
from .session import LatentQA

KL_REPLY_TOKENS = 32  # length of the target's own replies that the KL term keeps steady


class JudgeSpec(StrictModel):
    """How to tell, with no network, whether a reply shows a control: any of its keywords (whole
    words, any case), or a sentiment by VADER's lexicon (compound score past +-threshold)."""

    keywords: list[str] = Field(default_factory=list)
    """Words or phrases whose presence shows the control."""
    sentiment: Literal["positive", "negative"] | None = None
    """A sentiment the reply must carry (VADER), instead of keywords."""
    threshold: float = Field(0.5, gt=0, le=1)
    """|compound| a reply must reach to carry the sentiment."""

    @model_validator(mode="after")
    def _one_rule(self) -> JudgeSpec:
        if bool(self.keywords) == (self.sentiment is not None):
            raise ValueError("a judge has keywords or a sentiment, one of the two")
        return self


class ControlFile(StrictModel):
    """A control as `controls/*.json` holds it."""

    name: str = Field(min_length=1)
    description: str = ""
    instruction: str | None = None
    """A system prompt asking for the same behaviour: the prompted baseline, and the context
    under which a steered reply's perplexity is measured."""
    qa: list[tuple[str, str]] = Field(default_factory=list)
    """[question, answer] pairs the decoder should give about the steered target; none: read
    them from the target under the instruction (the paper's way, `latentqa_platform.controls`)."""
    judge: JudgeSpec | None = None
    """How the steering evaluation judges a reply; null: no behaviour rate."""

    @model_validator(mode="after")
    def _has_a_source(self) -> ControlFile:
        if not self.qa and not self.instruction:
            raise ValueError("a control needs qa pairs or an instruction")
        return self


def load_control(path: str | Path) -> ControlFile:
    """A control file, checked: errors name the file and the field."""
    try:
        return ControlFile.model_validate_json(Path(path).read_text(encoding="utf-8"))
    except OSError as err:
        raise ConfigError(f"{path}: cannot read control file: {err.strerror or err}") from None
    except ValidationError as err:
        raise ConfigError(validation_message(str(path), err)) from None


def control_read_layer(cfg: SteerConfig, decoder_read_layer: int) -> int:
    """The block a control is read at: the decoder's. A `steer.layers` that reads elsewhere is
    refused, naming both."""
    if cfg.layers is not None and cfg.layers - 1 != decoder_read_layer:
        raise ConfigError(
            f"steer.layers {cfg.layers} reads the control at block {cfg.layers - 1}, but the decoder reads "
            f"block {decoder_read_layer}: leave steer.layers unset (it follows the decoder) or set it to "
            f"{decoder_read_layer + 1}"
        )
    return decoder_read_layer


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
    """Train a control adapter on target blocks 0..R, R the decoder's read layer, and save it in
    PEFT format. The same config and seed give the same adapter on the same machine."""
    cfg = cfg or lqa.config.steer
    if not control:
        raise ValueError("a control needs at least one [question, answer] pair")
    if not prompts:
        raise ValueError("steering needs at least one prompt")
    read_layer = control_read_layer(cfg, lqa.decoder_read_layer)
    if not read_layer < lqa.model.num_layers:
        raise ValueError(f"the decoder's read layer {read_layer} is outside the model's {lqa.model.num_layers} blocks")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} is not empty; choose a new output folder")
    # Seeded LoRA init and dropout; manual_seed reseeds every GPU, so all are forked and the caller's
    # random state is untouched.
    with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
        torch.manual_seed(cfg.seed)
        try:
            losses = _train_control(lqa, control, prompts, cfg, read_layer, references, on_step)
        except BaseException:
            lqa.model.adapters.remove_control()  # no half-trained control left on the target
            raise
        finally:
            lqa.model.eval()
    lqa.model.adapters.save(CONTROL, out_dir)
    return SteerResult(out_dir, losses)


def _train_control(
    lqa: LatentQA,
    control: Sequence[QAPair],
    prompts: Sequence[str],
    cfg: SteerConfig,
    read_layer: int,
    references: Sequence[str] | None,
    on_step: Callable[[int, float], None] | None,
) -> list[float]:
    own_replies = _own_replies(lqa, prompts) if cfg.kl_weight else None
    lqa.model.adapters.add_control(cfg, read_layer + 1)
    params = lqa.model.adapters.trainable_parameters()
    optimizer = torch.optim.Adam(params, lr=cfg.lr)
    rng = random.Random(cfg.seed)
    read_layers = list(range(read_layer + 1)) if cfg.per_layer else [read_layer]
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
        if own_replies is not None:
            loss = loss + cfg.kl_weight * _drift(lqa, [own_replies[p] for p in picks])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if on_step:
            on_step(step, losses[-1])
    return losses


def _own_replies(lqa: LatentQA, prompts: Sequence[str]) -> list[tuple[list[int], int]]:
    """Each prompt followed by the plain target's greedy reply, as ids, with the reply's start."""
    rows = []
    for prompt, reply in zip(prompts, reply_ids(lqa, prompts, None, KL_REPLY_TOKENS)):
        context = lqa.chat_format.prompt_ids([{"role": "user", "content": prompt}])
        rows.append((context + reply, len(context)))
    return rows


def reply_positions(
    lqa: LatentQA, rows: Sequence[tuple[list[int], int]]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of (ids, where the reply starts) left-padded on the session's device, as (ids,
    attention, keep, targets): `keep` marks the positions that predict a reply token and
    `targets` holds those tokens, in `keep`'s order."""
    ids, attention = left_pad([full for full, _ in rows], lqa.chat_format.pad_id)
    keep = torch.zeros_like(ids, dtype=torch.bool)
    for row, (full, start) in enumerate(rows):
        keep[row, ids.shape[1] - len(full) + start - 1 : -1] = True
    targets = ids[:, 1:][keep[:, :-1]]
    return ids.to(lqa.device), attention.to(lqa.device), keep.to(lqa.device), targets.to(lqa.device)


def _drift(lqa: LatentQA, rows: list[tuple[list[int], int]]) -> torch.Tensor:
    """KL(target || steered) of the next-token distributions over the replies' tokens: how far
    the control has moved the target's language on neutral text."""
    ids, attention, keep, _ = reply_positions(lqa, rows)
    if not keep.any():  # the target ended every reply at once: nothing to keep steady
        return torch.zeros((), device=ids.device)
    with torch.no_grad():
        plain = lqa.model.logits_at(ids, attention, keep, None).float()
    steered = lqa.model.logits_at(ids, attention, keep, CONTROL).float()
    return F.kl_div(F.log_softmax(steered, -1), F.log_softmax(plain, -1), log_target=True, reduction="batchmean")


Prompt = str | list[dict[str, str]]  # a user message, or a whole dialog


@torch.no_grad()
def reply_ids(
    lqa: LatentQA, prompts: Sequence[Prompt], adapter: str | None = None, max_new_tokens: int = 32
) -> list[list[int]]:
    """Greedy replies' token ids of the target (adapter None) or of the target with a control
    adapter, to user prompts or whole dialogs (lists of messages)."""
    fmt = lqa.chat_format
    dialogs = [[{"role": "user", "content": p}] if isinstance(p, str) else p for p in prompts]
    ids, attention = left_pad([fmt.prompt_ids(d) for d in dialogs], fmt.pad_id)
    ids, attention = ids.to(lqa.device), attention.to(lqa.device)
    return lqa.model.generate(
        ids, attention, positions(attention), max_new_tokens, lqa.stop_ids, fmt.pad_id, adapter=adapter
    )


def complete(
    lqa: LatentQA, prompts: Sequence[Prompt], adapter: str | None = None, max_new_tokens: int = 32
) -> list[str]:
    """Greedy replies (`reply_ids`) as text."""
    return [lqa.decode(t) for t in reply_ids(lqa, prompts, adapter, max_new_tokens)]
