"""Activation patching (SPEC "Patching"): read the target, write into the decoder.

The target pass stops after the last read block (a forward hook raises), so later blocks and
the LM head never run. The decoder pass replaces (or norm-matched adds to) the output of block
W at the placeholder positions. Generation patches the prompt once, in the prefill, and then
decodes with the KV cache.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .layout import IGNORE_INDEX, Batch
from .models import DECODER, AdapterSet, decoder_blocks

PatchMode = Literal["replace", "add"]


class _StopForward(Exception):
    """Raised by the hook on the last read block to end the target pass there."""


def _hidden(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _with_hidden(output, hidden: torch.Tensor):
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def positions(attention: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded batch: 0 at each row's first real token."""
    return (attention.cumsum(-1) - 1).clamp(min=0)


def inject(hidden: torch.Tensor, mask: torch.Tensor, acts: torch.Tensor, mode: PatchMode) -> torch.Tensor:
    """Write `acts` (rows of the selected positions, in order) into `hidden` where `mask` is set."""
    mask = mask.unsqueeze(-1)
    placed = torch.zeros_like(hidden).masked_scatter(mask, acts.to(hidden.dtype))
    if mode == "replace":
        return torch.where(mask, placed, hidden)
    # norm-matched addition (Activation Oracles): h + |h| * v / |v|
    scale = hidden.norm(dim=-1, keepdim=True) / placed.norm(dim=-1, keepdim=True).clamp(min=1e-6)
    return torch.where(mask, hidden + scale * placed, hidden)


class LatentQAModel(nn.Module):
    """The base model with its adapters, as one module a training strategy can wrap.

    `forward` is the train objective so that DDP/FSDP/DeepSpeed see one call per step.
    """

    def __init__(self, adapters: AdapterSet, write_layer: int = 0, mode: PatchMode = "replace"):
        super().__init__()
        self.adapters = adapters
        self.peft_model = adapters.model
        # a plain list, so the blocks are not registered (and saved, sharded) a second time
        self.blocks = list(decoder_blocks(self.peft_model))
        self.write_layer = write_layer
        self.mode = mode
        self.eval()  # LoRA dropout modules start in train mode; training switches on explicitly

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        """Eval mode (no dropout) and no gradients, restoring the previous mode after."""
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            self.train(was_training)

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    # ----- target ----------------------------------------------------------------------
    def target_activations(
        self,
        batch: Batch,
        layers: list[int],
        adapter: str | None = None,
        grad: bool = False,
        detach_between: bool = False,
    ) -> dict[int, torch.Tensor]:
        """Block outputs of the target at the patched read positions, as (sum of n, d) rows.

        Runs the target (base, or base + `adapter`) only up to max(layers). With
        `detach_between`, each read block's output is detached before the next block sees it,
        so a loss on block l's output reaches block l's parameters only (per-layer control).
        """
        last = max(layers)
        if not 0 <= last < self.num_layers:
            raise ValueError(f"read layer {last} is outside the model's {self.num_layers} blocks")
        captured: dict[int, torch.Tensor] = {}

        def hook_for(index: int):
            def hook(module, args, output):
                hidden = _hidden(output)
                captured[index] = hidden[batch.read_patch_mask]
                if index == last:
                    raise _StopForward
                if detach_between:
                    return _with_hidden(output, hidden.detach())
                return None

            return hook

        handles = [self.blocks[i].register_forward_hook(hook_for(i)) for i in sorted(set(layers))]
        try:
            with self.adapters.use(adapter), torch.set_grad_enabled(grad):
                self.peft_model(
                    input_ids=batch.read_ids,
                    attention_mask=batch.read_attention,
                    position_ids=positions(batch.read_attention),
                    use_cache=False,
                )
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        return captured

    @torch.no_grad()
    def last_token_states(self, ids: torch.Tensor, attention: torch.Tensor, layer: int) -> torch.Tensor:
        """Block `layer`'s output of the plain target at each left-padded row's last token, (B, d)."""
        captured: list[torch.Tensor] = []

        def hook(module, args, output):
            captured.append(_hidden(output)[:, -1])
            raise _StopForward

        handle = self.blocks[layer].register_forward_hook(hook)
        try:
            with self.adapters.use(None):
                self.peft_model(
                    input_ids=ids, attention_mask=attention, position_ids=positions(attention), use_cache=False
                )
        except _StopForward:
            pass
        finally:
            handle.remove()
        return captured[0]

    @contextlib.contextmanager
    def adding(self, layer: int, vector: torch.Tensor) -> Iterator[None]:
        """Add `vector` to block `layer`'s output at every position, prompt and generated tokens
        alike (activation steering: ActAdd, CAA)."""

        def hook(module, args, output):
            hidden = _hidden(output)
            return _with_hidden(output, hidden + vector.to(hidden.dtype))

        handle = self.blocks[layer].register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    # ----- decoder ---------------------------------------------------------------------
    @contextlib.contextmanager
    def patched(self, write_patch_mask: torch.Tensor, acts: torch.Tensor | None) -> Iterator[None]:
        """Patch block W's output at the placeholders. A pass over more than the prompt (an
        uncached decode step) keeps the prompt patched; single-token cached steps pass through."""
        if acts is None:
            yield
            return
        prompt_len = write_patch_mask.shape[1]

        def hook(module, args, output):
            hidden = _hidden(output)
            if hidden.shape[1] < prompt_len:
                return None
            mask = F.pad(write_patch_mask, (0, hidden.shape[1] - prompt_len))
            return _with_hidden(output, inject(hidden, mask, acts, self.mode))

        handle = self.blocks[self.write_layer].register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    def decoder_position_ids(self, batch: Batch, shift: bool) -> torch.Tensor:
        """SPEC 3: the paper's training shift offsets positions by read padding + verb length."""
        pos = positions(batch.write_attention)
        if shift:
            read_pad = (batch.read_attention == 0).sum(-1)
            pos = pos + (read_pad + batch.verb_lengths).unsqueeze(1)
        return pos

    def decoder_token_losses(
        self, batch: Batch, acts: torch.Tensor | None, shift: bool, adapter: str | None = DECODER
    ) -> torch.Tensor:
        """Per-token cross-entropy of the labels, (B, T-1), zero where ignored.

        Only labelled positions go through the LM head: with a 128k vocabulary the full
        logits would dwarf everything else in memory. `adapter=None` (and no `acts`) scores the
        write side with the plain target instead of the decoder.
        """
        assert batch.labels is not None, "decoder losses need a batch laid out in train or score mode"
        causal_lm = self.peft_model.get_base_model()
        with self.adapters.use(adapter), self.patched(batch.write_patch_mask, acts):
            hidden = causal_lm.get_decoder()(
                input_ids=batch.write_ids,
                attention_mask=batch.write_attention,
                position_ids=self.decoder_position_ids(batch, shift),
                use_cache=False,
            ).last_hidden_state
            targets = batch.labels[:, 1:]
            keep = targets != IGNORE_INDEX
            logits = self._head(hidden[:, :-1][keep])
            token_losses = torch.zeros(targets.shape, dtype=torch.float32, device=hidden.device)
            token_losses[keep] = F.cross_entropy(logits.float(), targets[keep], reduction="none")
        return token_losses

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head (and its soft-capping, Gemma 2) over rows of final hidden states."""
        causal_lm = self.peft_model.get_base_model()
        logits = causal_lm.get_output_embeddings()(hidden)
        softcap = getattr(causal_lm.config, "final_logit_softcapping", None)
        return torch.tanh(logits / softcap) * softcap if softcap else logits

    def logits_at(
        self, ids: torch.Tensor, attention: torch.Tensor, keep: torch.Tensor, adapter: str | None
    ) -> torch.Tensor:
        """Next-token logits of a left-padded batch at the positions `keep` selects, (sum of keep, V),
        with `adapter` active (None: the plain target). Only those rows go through the LM head."""
        with self.adapters.use(adapter):
            hidden = (
                self.peft_model.get_base_model()
                .get_decoder()(
                    input_ids=ids, attention_mask=attention, position_ids=positions(attention), use_cache=False
                )
                .last_hidden_state
            )
        return self._head(hidden[keep])

    def decoder_loss(self, batch: Batch, acts: torch.Tensor | None, shift: bool) -> torch.Tensor:
        """Mean cross-entropy over all label tokens of the batch (the train objective)."""
        token_losses = self.decoder_token_losses(batch, acts, shift)
        count = (batch.labels[:, 1:] != IGNORE_INDEX).sum().clamp(min=1)
        return token_losses.sum() / count

    def example_losses(
        self, batch: Batch, acts: torch.Tensor | None, shift: bool, adapter: str | None = DECODER
    ) -> torch.Tensor:
        """Mean cross-entropy per example (score mode: the loss of each candidate answer)."""
        token_losses = self.decoder_token_losses(batch, acts, shift, adapter)
        counts = (batch.labels[:, 1:] != IGNORE_INDEX).sum(-1).clamp(min=1)
        return token_losses.sum(-1) / counts

    def forward(self, batch: Batch, read_layer: int, shift: bool = True) -> torch.Tensor:
        """Train objective: read the target at `read_layer`, patch at W, loss on the labels."""
        acts = self.target_activations(batch, [read_layer])[read_layer]
        return self.decoder_loss(batch, acts, shift)

    # ----- generation ------------------------------------------------------------------
    def generate(
        self,
        ids: torch.Tensor,
        attention: torch.Tensor,
        position_ids: torch.Tensor,
        max_new_tokens: int,
        stop_ids: set[int],
        pad_id: int,
        adapter: str | None = DECODER,
        patch: tuple[torch.Tensor, torch.Tensor] | None = None,
        use_cache: bool = True,
    ) -> list[list[int]]:
        """Greedy generation from a left-padded prompt with `adapter` active (None: the plain
        target), optionally patched by (write_patch_mask, acts). With the cache the prompt is
        patched once, in the prefill, and each new token is one single-token step; without it
        (for checking) every step re-runs the patched prompt plus the tokens so far."""
        finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        stop = torch.tensor(sorted(stop_ids), device=ids.device)
        new_tokens: list[torch.Tensor] = []
        cache = None
        step_ids, step_pos, pos = ids, position_ids, position_ids
        mask, acts = patch if patch is not None else (None, None)
        with self.evaluating(), self.adapters.use(adapter), self.patched(mask, acts):
            for _ in range(max_new_tokens):
                out = self.peft_model(
                    input_ids=step_ids,
                    attention_mask=attention,
                    position_ids=step_pos,
                    cache=cache,
                    use_cache=use_cache,
                    logits_to_keep=1,
                )
                token = out.logits[:, -1].argmax(-1)
                token = torch.where(finished, torch.full_like(token, pad_id), token)
                new_tokens.append(token)
                finished |= torch.isin(token, stop)
                if bool(finished.all()):
                    break
                attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=1)
                next_pos = pos[:, -1:] + 1
                pos = torch.cat([pos, next_pos], dim=1)
                if use_cache:
                    cache, step_ids, step_pos = out.cache, token.unsqueeze(1), next_pos
                else:
                    step_ids = torch.cat([step_ids, token.unsqueeze(1)], dim=1)
                    step_pos = pos
        generated = torch.stack(new_tokens, dim=1).tolist() if new_tokens else [[] for _ in range(ids.shape[0])]
        return [_until_stop(row, stop_ids) for row in generated]

    def generate_answers(
        self,
        batch: Batch,
        acts: torch.Tensor,
        max_new_tokens: int,
        stop_ids: set[int],
        pad_id: int,
        shift: bool = False,
        use_cache: bool = True,
    ) -> list[list[int]]:
        """The decoder's patched answers to a batch laid out in generate mode."""
        return self.generate(
            batch.write_ids,
            batch.write_attention,
            self.decoder_position_ids(batch, shift),
            max_new_tokens,
            stop_ids,
            pad_id,
            patch=(batch.write_patch_mask, acts),
            use_cache=use_cache,
        )


def _until_stop(tokens: list[int], stop_ids: set[int]) -> list[int]:
    for i, token in enumerate(tokens):
        if token in stop_ids:
            return tokens[:i]
    return tokens
