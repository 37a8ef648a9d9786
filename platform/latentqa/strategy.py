"""One object that hides the data-parallel backend from a training loop.

Modelled on OpenRLHF's strategy. The loop is written once::

    strategy = Strategy.create(cfg)
    with strategy.model_loading():          # ZeRO-3: partitioned; FSDP2: the weights on rank 0 only
        peft_model = ...
    strategy.prepare(peft_model, lambda ps: torch.optim.AdamW(ps, lr=1e-4), None)
    for batch in batches:
        loss = strategy.model(**batch).loss
        strategy.backward(loss)
        if strategy.optimizer_step():
            ...  # a real optimizer step happened: log, checkpoint
    with strategy.averaged_weights(), strategy.evaluation():
        ...  # evaluate the moving average (ema_decay) through the model's other methods

and runs unchanged on one process ("local"), DDP, FSDP2 or DeepSpeed ZeRO. This module does not
import Ray: a launcher (Ray Train, torchrun, a test) initialises ``torch.distributed`` and, on GPUs,
calls ``torch.cuda.set_device`` before ``Strategy.create``.

Rules the loop must follow:

* Call every method on every rank, in the same order. Under FSDP and ZeRO-3 forwards are
  collective too (they gather parameters): evaluate on every rank.
* Under FSDP2 a model built inside ``model_loading`` has weights on rank 0 only (the other ranks
  build it on the meta device): hand it to ``prepare`` before using it.
* Only the parameters that require grad at ``prepare`` are trained, reduced and saved. Switch
  adapters off with ``strategy.disable_adapters()``, not PEFT's ``disable_adapter()`` (see there),
  and keep the trained adapter active (``set_adapter``) around training backwards and saves.
* Call ``optimizer_step()`` after every ``backward()``; save training state only when it returned
  True (or before the first micro-step).
* A forward hook may cut a no-grad forward short by raising (the engine's early exit); the next
  complete forward recovers under every backend. But FSDP2 then skips its root pre-forward in
  that next forward (no GPU-stream wait for optimizer work, no moving inputs to the device): put
  inputs on ``device`` and do not step the optimizer between an aborted forward and the next one.
  ZeRO-3 keeps invalidating its prefetch trace (consecutive forwards differ): correct, less overlap.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import pydantic
import safetensors.torch
import torch
import torch.distributed as dist
from peft import PeftModel, get_peft_model_state_dict
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from .config import merge_trees
from .model_files import write_target_identity
from .models import decoder_blocks

log = logging.getLogger(__name__)

OptimizerFactory = Callable[[list[nn.Parameter]], Optimizer]
SchedulerFactory = Callable[[Optimizer], LRScheduler]


class StrategyConfig(pydantic.BaseModel):
    """How to parallelise training; the same loop runs under every ``kind``."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    kind: Literal["local", "ddp", "fsdp", "deepspeed"] = "ddp"
    """local (one process), ddp, fsdp (FSDP2) or deepspeed (ZeRO)."""
    zero_stage: Literal[2, 3] = 3
    """DeepSpeed only."""
    deepspeed_config: Path | None = None
    """Optional DeepSpeed JSON; the fields computed from this config override it."""
    mixed_precision: Literal["no", "bf16"] = "no"
    """bf16 compute, meant for GPUs: autocast around ``forward`` (local/ddp), MixedPrecisionPolicy
    (fsdp), DeepSpeed's bf16 (deepspeed)."""
    activation_checkpointing: bool = False
    """Recompute decoder blocks in backward (HF ``gradient_checkpointing_enable``, non-reentrant)."""
    cpu_offload: bool = False
    """fsdp: CPUOffloadPolicy; deepspeed: offload optimizer (and, at ZeRO-3, parameters) to CPU."""
    grad_accum_steps: int = pydantic.Field(1, ge=1)
    """Micro-batches per optimizer step (jobs set it from train.grad_accum)."""
    max_grad_norm: float | None = pydantic.Field(1.0, gt=0)
    """Clip the global gradient norm to this at every optimizer step; None disables clipping."""
    ema_decay: float | None = pydantic.Field(None, gt=0, lt=1)
    """Keep an exponential moving average of the trained weights (updated every optimizer step)
    for ``averaged_weights()``; None: no average."""


def find_peft_model(model: nn.Module) -> tuple[str, PeftModel]:
    """The PeftModel in ``model`` (itself, or a submodule such as the engine's ``peft_model``)
    and its name prefix ("" or "peft_model.")."""
    for name, module in model.named_modules():
        if isinstance(module, PeftModel):
            return (f"{name}." if name else ""), module
    raise ValueError(f"no PeftModel inside {type(model).__name__}")


def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


class Strategy:
    """Base class: the torch-native training step shared by local, DDP and FSDP2.

    Subclasses wrap the model (``_wrap``) and switch gradient synchronisation (``_set_grad_sync``);
    DeepSpeed overrides the step and checkpoint methods because its engine owns them.
    """

    kind: ClassVar[str]
    _STATE_FILE: ClassVar[str] = "training_state.pt"

    def __init__(self, cfg: StrategyConfig) -> None:
        self.cfg = cfg
        distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if distributed else 0
        self.world_size = dist.get_world_size() if distributed else 1
        self.is_main = self.rank == 0
        # The launcher picks this rank's GPU (Ray Train calls torch.cuda.set_device).
        self.device = (
            torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        )
        self.step = 0
        """Optimizer steps taken (restored by ``load_training_state``)."""
        self._micro_step = 0
        """Backwards since the last optimizer step."""
        self._model: nn.Module | None = None
        self._trainable_names: list[str] = []
        self._trainable_params: list[nn.Parameter] = []
        self.optimizer: Optimizer | None = None
        self.scheduler: LRScheduler | None = None
        self._ema: list[torch.Tensor] | None = None
        """The moving average, shard by shard: each rank averages the part of the weights it holds."""

    @classmethod
    def create(cls, cfg: StrategyConfig) -> Strategy:
        """The strategy for ``cfg.kind``. ddp/fsdp/deepspeed need ``torch.distributed`` initialised,
        except that ddp without a process group falls back to local training."""
        distributed = dist.is_available() and dist.is_initialized()
        kind = cfg.kind
        if kind == "ddp" and not distributed:
            log.info("torch.distributed is not initialised: training locally instead of with DDP")
            kind = "local"
        if kind != "local" and not distributed:
            raise RuntimeError(f"strategy {kind!r} needs torch.distributed initialised first")
        subclass = {s.kind: s for s in (LocalStrategy, DDPStrategy, FSDPStrategy, DeepSpeedStrategy)}
        return subclass[kind](cfg)

    # ---------------------------------------------------------------- setup

    @property
    def model(self) -> nn.Module:
        """The wrapped model to call for forwards (DDP module, FSDP2 root, DeepSpeed engine)."""
        if self._model is None:
            raise RuntimeError("call prepare() first")
        return self._model

    @property
    def unwrapped(self) -> nn.Module:
        """The module given to ``prepare``: register hooks on it, call its other methods.

        Under FSDP2 and ZeRO-3 its parameters are shards; only forwards through it see full weights.
        """
        return self.model

    @contextlib.contextmanager
    def model_loading(self, pretrained: bool = True) -> Iterator[None]:
        """Load the base model inside: ZeRO-3 then loads pretrained weights already partitioned,
        so no rank ever holds the whole model (a 70B does not fit one GPU); FSDP2 loads it on
        rank 0 only and sends the other ranks their shards in ``prepare``. Local and DDP, and
        ZeRO-3 with randomly initialised models (tiny tests: their seeded init must match the
        other strategies'), load it whole on every rank."""
        yield

    def prepare(
        self,
        model: nn.Module,
        optimizer_factory: OptimizerFactory,
        scheduler_factory: SchedulerFactory | None = None,
        *,
        forward_methods: Sequence[str] = (),
    ) -> None:
        """Wrap ``model`` (a PeftModel, or a module holding one) for this backend and build the
        optimizer over its trainable parameters (after wrapping: FSDP2 replaces them by shards).

        Training must run through ``model.forward`` (``strategy.model(...)``): DDP syncs
        gradients and FSDP2 unshards the root's parameters only around it. ``forward_methods``
        names other methods of ``model`` that run it (e.g. ``generate``) and that you call on
        ``strategy.unwrapped``; FSDP2 gets the same hooks around them, the others need nothing.
        """
        if self.cfg.activation_checkpointing:
            find_peft_model(model)[1].gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        self._broadcast_trainable(model)
        self._build(model, optimizer_factory, scheduler_factory, forward_methods)
        if self.cfg.ema_decay is not None:
            self._ema = [t.detach().float().clone() for t in self._local_shards()]

    def _build(
        self,
        model: nn.Module,
        optimizer_factory: OptimizerFactory,
        scheduler_factory: SchedulerFactory | None,
        forward_methods: Sequence[str],
    ) -> None:
        self._model = self._wrap(model, forward_methods)
        self._record_trainable(self.unwrapped)
        self.optimizer = optimizer_factory(list(self._trainable_params))
        self.scheduler = scheduler_factory(self.optimizer) if scheduler_factory else None
        self._set_grad_sync(self._next_backward_syncs())

    def _wrap(self, model: nn.Module, forward_methods: Sequence[str]) -> nn.Module:
        raise NotImplementedError

    def _set_grad_sync(self, enabled: bool) -> None:
        """Whether the next backward reduces gradients across ranks."""

    def _broadcast_trainable(self, model: nn.Module) -> None:
        """Copy rank 0's adapter initialisation to every rank.

        PEFT initialises LoRA A randomly; unseeded ranks would otherwise train different replicas
        (or, sharded, a mix of shards). The frozen base weights must already agree (same checkpoint).
        """
        if self.world_size == 1:
            return
        with torch.no_grad():
            for _, p in _trainable(model):
                buf = p.detach().to(self.device)
                dist.broadcast(buf, src=0)
                p.copy_(buf)

    @contextlib.contextmanager
    def disable_adapters(self) -> Iterator[None]:
        """``PeftModel.disable_adapter()`` that is safe under every backend: use this one.

        PEFT switches adapters off by setting ``requires_grad=False`` on the adapter parameters
        the modules hold, and back on when leaving. Under FSDP2 a module holds the sharded copy
        between forwards and the unsharded one during a forward (the root also after a forward
        cut short by an exception, or until backward), and each unshard copies ``requires_grad``
        from the sharded copy. If the context is entered with one copy and left with the other,
        the sharded adapter stays frozen and, from its next unshard, silently stops training.
        This re-enables it on the way out; ``backward`` raises if it finds it frozen.
        """
        try:
            with find_peft_model(self.unwrapped)[1].disable_adapter():
                yield
        finally:  # also when the forward was cut short by an exception (early exit)
            for p in self._trainable_params:
                p.requires_grad_(True)

    def _record_trainable(self, model: nn.Module) -> None:
        """Fix the trained set. FSDP2 params: the sharded ones (what the optimizer steps)."""
        named = _trainable(model)
        self._trainable_names = [name for name, _ in named]
        self._trainable_params = [p for _, p in named]

    def _check_trainable(self) -> None:
        if not all(p.requires_grad for p in self._trainable_params):
            raise RuntimeError(
                "parameters being trained no longer require grad: PEFT's disable_adapter()/"
                "set_adapter() froze them; use Strategy.disable_adapters() and keep the trained "
                "adapter active"
            )

    def _check_backward(self) -> None:
        if self._micro_step == self.cfg.grad_accum_steps:
            raise RuntimeError("call optimizer_step() after every backward()")
        self._check_trainable()

    # ---------------------------------------------------------------- step

    def _next_backward_syncs(self) -> bool:
        return self._micro_step + 1 == self.cfg.grad_accum_steps

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's loss, scaled so that accumulated grads are a mean."""
        self._check_backward()
        (loss / self.cfg.grad_accum_steps).backward()
        self._micro_step += 1
        self._set_grad_sync(self._next_backward_syncs())  # for the micro-step after this one

    def optimizer_step(self) -> bool:
        """Call after every ``backward``. At an accumulation boundary, clip, step the optimizer and
        the scheduler, zero the grads and return True; otherwise do nothing and return False."""
        if self._micro_step < self.cfg.grad_accum_steps:
            return False
        assert self.optimizer is not None
        if self.cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self._trainable_params, self.cfg.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()
        self.step += 1
        self._micro_step = 0
        self._set_grad_sync(self._next_backward_syncs())
        self._update_ema()
        return True

    # ---------------------------------------------------------------- averaged weights

    def _local_shards(self) -> list[torch.Tensor]:
        """The trained weights as this rank holds them (FSDP2: its shard of each DTensor)."""
        from torch.distributed.tensor import DTensor

        return [p.to_local() if isinstance(p, DTensor) else p for p in self._trainable_params]

    @torch.no_grad()
    def _update_ema(self) -> None:
        if self._ema is not None:
            for average, live in zip(self._ema, self._local_shards()):
                average.lerp_(live.detach().float(), 1.0 - self.cfg.ema_decay)

    @contextlib.contextmanager
    def averaged_weights(self) -> Iterator[None]:
        """Inside, the trained weights are their moving average (to evaluate or save it); the
        live weights come back on exit. Without ``ema_decay`` it changes nothing."""
        if self._ema is None:
            yield
            return
        shards = self._local_shards()
        live = [t.detach().clone() for t in shards]
        with torch.no_grad():
            for shard, average in zip(shards, self._ema):
                shard.copy_(average)
        try:
            yield
        finally:
            with torch.no_grad():
                for shard, saved in zip(shards, live):
                    shard.copy_(saved)

    @contextlib.contextmanager
    def evaluation(self) -> Iterator[None]:
        """Around calls to the unwrapped model's methods other than ``forward`` (evaluation,
        reading). FSDP2 needs it to gather the root's own weights; the others need nothing."""
        yield

    # ---------------------------------------------------------------- per-rank state

    def _save_rank_state(self, out_dir: Path) -> None:
        """What each rank holds alone: its RNG (dropout draws, for an exact resume) and its
        shard of the moving average."""
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        state = {
            "world_size": self.world_size,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "ema": self._ema,
        }
        torch.save(state, Path(out_dir) / f"rank_state_{self.rank}.pt")

    def _load_rank_state(self, in_dir: Path) -> None:
        path = Path(in_dir) / f"rank_state_{self.rank}.pt"
        state = torch.load(path, weights_only=True) if path.exists() else None
        if state is None or state["world_size"] != self.world_size:
            if self._ema is not None:
                raise ValueError(
                    f"{in_dir}: the moving average was saved by another number of ranks; resume on as many"
                )
            log.info("%s: saved on another number of ranks; RNG streams start afresh", in_dir)
            return
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        if self._ema is not None:
            if state["ema"] is None:
                raise ValueError(f"{in_dir}: saved without a moving average (train.ema_decay was unset)")
            for average, saved in zip(self._ema, state["ema"]):
                average.copy_(saved)

    def all_reduce_mean(self, value: float) -> float:
        """Mean of ``value`` over ranks (for logging losses and metrics)."""
        if self.world_size == 1:
            return float(value)
        t = torch.tensor(float(value), dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.item() / self.world_size

    def all_reduce_max(self, value: int) -> int:
        """The largest ``value`` over ranks (e.g. a count every rank must agree on)."""
        if self.world_size == 1:
            return value
        t = torch.tensor(value, dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def all_gather(self, value: Any) -> list[Any]:
        """Every rank's `value` (any picklable object), in rank order, on every rank."""
        if self.world_size == 1:
            return [value]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    # ---------------------------------------------------------------- adapters

    def _full_trainable_state(self) -> dict[str, torch.Tensor]:
        """The trained parameters by name, full and on CPU, on every rank. Collective.

        Looked up by name, not through ``state_dict()``, which repeats a parameter under every
        module path that reaches it (a wrapper that also registers the decoder blocks would drag
        the whole frozen base into the gather).
        """
        from torch.distributed.tensor import DTensor

        state = {}
        # The recorded parameters, not the module's: an unsharded FSDP2 root registers a gathered
        # copy, which `averaged_weights` does not reach.
        for name, p in zip(self._trainable_names, self._trainable_params):
            if isinstance(p, DTensor):  # an FSDP2 shard: all-gather on the mesh's device
                p = p.to(p.device_mesh.device_type).full_tensor()
            state[name] = p.detach().to("cpu", copy=True)
        return state

    def adapter_state_dict(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """The adapter's weights on CPU, keyed like ``peft.get_peft_model_state_dict``.

        Collective; every rank gets it. ``adapter_name`` defaults to the active adapter.
        """
        prefix, peft_model = find_peft_model(self.unwrapped)
        name = adapter_name or peft_model.active_adapter
        full = self._full_trainable_state()
        full = {k.removeprefix(prefix): v for k, v in full.items() if k.startswith(prefix)}
        # save_embedding_layers=False: with lm_head among target_modules PEFT's "auto" would also
        # save the frozen base lm_head (vocab x hidden), which only matters for resized vocabularies.
        return get_peft_model_state_dict(peft_model, state_dict=full, adapter_name=name, save_embedding_layers=False)

    def save_adapter(self, out_dir: Path, adapter_name: str) -> None:
        """Write a PEFT adapter directory (adapter_config.json + adapter_model.safetensors) that
        ``PeftModel.from_pretrained(base, out_dir)`` loads. Collective; rank 0 writes."""
        state = self.adapter_state_dict(adapter_name)
        if self.is_main:
            out_dir = Path(out_dir)
            out_dir.mkdir(parents=True, exist_ok=True)
            # Written by hand: PeftModel.save_pretrained puts non-"default" adapters in a subfolder.
            peft_model = find_peft_model(self.unwrapped)[1]
            config = copy.deepcopy(peft_model.peft_config[adapter_name])
            config.inference_mode = True
            config.save_pretrained(str(out_dir))
            write_target_identity(out_dir, peft_model.get_base_model().config)
            tensors = {k: v.detach().contiguous() for k, v in state.items()}
            safetensors.torch.save_file(tensors, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
        self.barrier()

    # ---------------------------------------------------------------- resume

    def _check_boundary(self) -> None:
        if self._micro_step != 0:
            raise RuntimeError("training state can only be saved at a gradient-accumulation boundary")

    def save_training_state(self, out_dir: Path, extra: dict[str, Any] | None = None) -> None:
        """Save adapter weights, optimizer, scheduler, step counter and ``extra`` (plain Python
        values, e.g. the data position) for ``load_training_state``. Collective.

        local/ddp/fsdp: rank 0 writes one file, ``training_state.pt``, with full (unsharded) state,
        so a run may resume on another world size. deepspeed: see ``DeepSpeedStrategy``.
        """
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        self._check_boundary()
        assert self.optimizer is not None
        model_state = self._full_trainable_state()
        # Keyed by parameter name; full_state_dict + cpu_offload gathers it on rank 0 only.
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        optim_state = get_optimizer_state_dict(self.model, self.optimizer, options=opts)
        if self.is_main:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            state = {
                "model": model_state,
                "optimizer": optim_state,
                "scheduler": self.scheduler.state_dict() if self.scheduler else None,
                "step": self.step,
                "extra": extra or {},
            }
            torch.save(state, Path(out_dir) / self._STATE_FILE)
        self._save_rank_state(out_dir)
        self.barrier()

    def load_training_state(self, in_dir: Path) -> dict[str, Any]:
        """Restore what ``save_training_state`` wrote, after ``prepare``; returns its ``extra``.

        Every rank reads the directory (Ray Train hands each worker the checkpoint).
        """
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        assert self.optimizer is not None
        state = torch.load(Path(in_dir) / self._STATE_FILE, map_location="cpu", weights_only=True)
        # The file holds only the trainable weights, hence strict=False; check those instead.
        if set(state["model"]) != set(self._trainable_names):
            raise ValueError(f"{in_dir}: saved trainable parameters differ from this model's")
        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optimizer"],
            options=StateDictOptions(full_state_dict=True, strict=False),
        )
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.step = state["step"]
        self._micro_step = 0
        self._set_grad_sync(self._next_backward_syncs())
        self._load_rank_state(in_dir)
        return state["extra"]


def _autocast_forward(model: nn.Module, device: torch.device) -> None:
    """Run ``model.forward`` under bf16 autocast (what accelerate does for DDP)."""
    model.forward = torch.autocast(device.type, dtype=torch.bfloat16)(model.forward)


class LocalStrategy(Strategy):
    """One process, no process group."""

    kind = "local"

    def _wrap(self, model: nn.Module, forward_methods: Sequence[str]) -> nn.Module:
        model.to(self.device)
        if self.cfg.mixed_precision == "bf16":
            _autocast_forward(model, self.device)
        return model


class DDPStrategy(Strategy):
    """DistributedDataParallel over the trainable (LoRA) parameters; the frozen base is replicated."""

    kind = "ddp"

    def _wrap(self, model: nn.Module, forward_methods: Sequence[str]) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        model.to(self.device)
        if self.cfg.mixed_precision == "bf16":
            _autocast_forward(model, self.device)
        return DistributedDataParallel(
            model,
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            # Every trainable parameter is used by every forward; frozen ones are ignored by DDP.
            find_unused_parameters=False,
            # Rotary caches are the only buffers: constant, no need to broadcast each forward.
            forward_sync_buffers=False,
            # _broadcast_trainable already synced the adapter; skip broadcasting the frozen base.
            init_sync=False,
        )

    @property
    def unwrapped(self) -> nn.Module:
        return self.model.module

    def _set_grad_sync(self, enabled: bool) -> None:
        # The flag that DDP.no_sync() toggles. no_sync() must span forward *and* backward, and the
        # loop owns the forward, so the flag is set ahead of the next micro-step instead.
        self.model.require_backward_grad_sync = enabled


class FSDPStrategy(Strategy):
    """FSDP2: ``fully_shard`` on every decoder block, then on the root (embeddings, norm, head)."""

    kind = "fsdp"

    def __init__(self, cfg: StrategyConfig) -> None:
        super().__init__(cfg)
        self._loaded_on_rank0 = False
        """The model was built under ``model_loading``: weights on rank 0, meta modules elsewhere."""

    @contextlib.contextmanager
    def model_loading(self, pretrained: bool = True) -> Iterator[None]:
        """Rank 0 loads the base on the CPU; the other ranks build it on the meta device (modules
        without weights). ``prepare`` then shards it unit by unit (each decoder block, then the
        root), sending each unit's weights from rank 0 just before: the other ranks hold their
        shards and at most one unit whole, and rank 0 frees what it loaded as it goes (rank-0
        loading, as in torchtune and accelerate). Random weights alike: rank 0 draws them from the
        same seed as every rank of the other strategies."""
        from .models import base_placed_on

        with base_placed_on("cpu" if self.is_main else "meta"):
            yield
        # Every rank used to make the same random draws (same seed, same weights) and so reached
        # the same generator state, which dropout starts from; the meta ranks drew nothing.
        rng = torch.get_rng_state().to(self.device)
        dist.broadcast(rng, src=0)
        torch.set_rng_state(rng.cpu())
        self._loaded_on_rank0 = True

    def _broadcast_trainable(self, model: nn.Module) -> None:
        if not self._loaded_on_rank0:  # else the adapter comes with the rest of rank 0's weights
            super()._broadcast_trainable(model)

    def _receive_from_rank0(self, unit: nn.Module) -> None:
        """Put the tensors of ``unit`` that are not sharded yet on this rank's device, meta ones
        in uninitialised memory, and give them rank 0's values. Buffers too: the non-persistent
        ones (rotary ``inv_freq``) are in no state dict, and the meta ranks have none."""
        from torch.distributed.fsdp import FSDPModule

        def unsharded(module: nn.Module) -> Iterator[nn.Module]:
            yield module
            for child in module.children():
                if not isinstance(child, FSDPModule):
                    yield from unsharded(child)

        slots = [
            (tensors, name, tensor)
            for module in unsharded(unit)
            for tensors in (module._parameters, module._buffers)
            for name, tensor in tensors.items()
            if tensor is not None
        ]
        placed: dict[int, torch.Tensor] = {}  # by id: `slots` keeps the old tensors alive meanwhile
        for _, _, tensor in slots:
            if id(tensor) not in placed:  # tied embeddings: one tensor in two modules, kept one
                placed[id(tensor)] = self._placed(tensor)
        for tensors, name, tensor in slots:
            tensors[name] = placed[id(tensor)]
        for tensor in placed.values():
            dist.broadcast(tensor.detach(), src=0)

    def _placed(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` on this rank's device; a meta one gets uninitialised memory."""
        data = torch.empty_like(tensor, device=self.device) if tensor.is_meta else tensor.to(self.device)
        if data is tensor or not isinstance(tensor, nn.Parameter):
            return data
        return nn.Parameter(data, requires_grad=tensor.requires_grad)

    def _wrap(self, model: nn.Module, forward_methods: Sequence[str]) -> nn.Module:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import (
            CPUOffloadPolicy,
            MixedPrecisionPolicy,
            OffloadPolicy,
            fully_shard,
            register_fsdp_forward_method,
        )

        offload = OffloadPolicy()
        if self.cfg.cpu_offload:
            if self.device.type == "cpu":  # CPUOffloadPolicy needs an accelerator (pinned memory)
                log.info("cpu_offload ignored: training on the CPU already")
            else:
                offload = CPUOffloadPolicy()
        kwargs: dict[str, Any] = {
            "mesh": init_device_mesh(self.device.type, (self.world_size,)),
            "offload_policy": offload,
        }
        if self.cfg.mixed_precision == "bf16":
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for unit in [*decoder_blocks(model), model]:  # the root last: it holds what the blocks do not
            if self._loaded_on_rank0:
                self._receive_from_rank0(unit)
            fully_shard(unit, **kwargs)
        for name in forward_methods:
            register_fsdp_forward_method(model, name)
        return model

    def _set_grad_sync(self, enabled: bool) -> None:
        # Micro-steps accumulate unsharded local grads; the boundary backward reduce-scatters them.
        self.model.set_requires_gradient_sync(enabled)

    def _init_root(self) -> None:
        # The root must initialise before any block runs on its own (else, before the first
        # training forward, block 0 would make itself a root); FSDP2 has no public call for it.
        self.model._get_fsdp_state()._lazy_init()

    @contextlib.contextmanager
    def evaluation(self) -> Iterator[None]:
        # FSDP2 gathers the root's own weights (embeddings, norm, head) only around `forward`.
        self._init_root()
        self.model.unshard()
        try:
            yield
        finally:
            self.model.reshard()

    @contextlib.contextmanager
    def averaged_weights(self) -> Iterator[None]:
        # A root left unsharded (e.g. after an evaluation forward) would keep computing with its
        # gathered live weights: reshard it, so that forwards gather the swapped-in average.
        self._init_root()
        self.model.reshard()
        with super().averaged_weights():
            yield


class DeepSpeedStrategy(Strategy):
    """DeepSpeed ZeRO-2/3 with a plain torch optimizer (no JIT-built cpu_adam; gloo works on CPU).

    The engine accumulates, scales, clips and steps the scheduler itself. Training state is
    DeepSpeed's own checkpoint: every rank writes its shard into the directory (so every rank's
    files must reach the resume, e.g. every Ray worker reports the directory), and it can only be
    resumed on the same world size.
    """

    kind = "deepspeed"
    _TAG: ClassVar[str] = "training_state"

    def deepspeed_config(self) -> dict[str, Any]:
        """The config passed to ``deepspeed.initialize``: the user's JSON under our fields."""
        zero: dict[str, Any] = {"stage": self.cfg.zero_stage}
        offload: dict[str, Any] = {}
        if self.cfg.cpu_offload:
            zero["offload_optimizer"] = {"device": "cpu"}
            if self.cfg.zero_stage == 3:
                zero["offload_param"] = {"device": "cpu"}
            # Keep the torch optimizer rather than JIT-building DeepSpeedCPUAdam: the LoRA
            # parameters are few, so a torch step on CPU is cheap.
            offload["zero_force_ds_cpu_optimizer"] = False
        ours = {
            # The loop feeds micro-batches itself; DeepSpeed only needs a consistent batch triple.
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": self.cfg.grad_accum_steps,
            "gradient_clipping": self.cfg.max_grad_norm or 0.0,
            "zero_allow_untested_optimizer": True,
            "zero_optimization": zero,
            "bf16": {"enabled": self.cfg.mixed_precision == "bf16"},
            **offload,
        }
        user = json.loads(self.cfg.deepspeed_config.read_text()) if self.cfg.deepspeed_config else {}
        return merge_trees(user, ours)

    @contextlib.contextmanager
    def model_loading(self, pretrained: bool = True) -> Iterator[None]:
        if self.cfg.zero_stage != 3 or not pretrained:
            yield
            return
        from transformers.integrations.deepspeed import HfDeepSpeedConfig

        # While this object lives, transformers builds and loads models under deepspeed.zero.Init.
        config = HfDeepSpeedConfig(self.deepspeed_config())
        try:
            yield
        finally:
            del config

    def _build(
        self,
        model: nn.Module,
        optimizer_factory: OptimizerFactory,
        scheduler_factory: SchedulerFactory | None,
        forward_methods: Sequence[str],
    ) -> None:
        import deepspeed

        # The engine partitions the parameters the torch optimizer holds and keeps fp32 masters.
        self._record_trainable(model)
        optimizer = optimizer_factory(list(self._trainable_params))
        engine, _, _, scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler_factory, config=self.deepspeed_config()
        )
        self._model, self.optimizer, self.scheduler = engine, optimizer, scheduler

    @property
    def unwrapped(self) -> nn.Module:
        return self.model.module

    def backward(self, loss: torch.Tensor) -> None:
        self._check_backward()
        self.model.backward(loss)  # scales by 1/grad_accum_steps
        self._micro_step += 1

    def optimizer_step(self) -> bool:
        # engine.step() must run after every micro-batch; it only updates at the boundary.
        boundary = self.model.is_gradient_accumulation_boundary()
        self.model.step()
        if boundary:
            self.step += 1
            self._micro_step = 0
            self._update_ema()
        return boundary

    def _local_shards(self) -> list[torch.Tensor]:
        # ZeRO-3 keeps this rank's partition in `ds_tensor` (`data` is empty between gathers).
        return [getattr(p, "ds_tensor", p) for p in self._trainable_params]

    def _full_trainable_state(self) -> dict[str, torch.Tensor]:
        import deepspeed

        named = zip(self._trainable_names, self._trainable_params)
        # Gathers ZeRO-3 partitions on every rank (a no-op at ZeRO-2, where weights are replicated).
        with deepspeed.zero.GatheredParameters(self._trainable_params):
            return {name: p.detach().to("cpu", copy=True) for name, p in named}

    def save_training_state(self, out_dir: Path, extra: dict[str, Any] | None = None) -> None:
        self._check_boundary()
        self._check_trainable()  # exclude_frozen_parameters goes by requires_grad
        client_state = {"strategy_step": self.step, "extra": extra or {}}
        self.model.save_checkpoint(
            str(out_dir), tag=self._TAG, client_state=client_state, exclude_frozen_parameters=True
        )
        self._save_rank_state(out_dir)

    def load_training_state(self, in_dir: Path) -> dict[str, Any]:
        # Frozen weights were left out of the checkpoint, hence non-strict module loading.
        _, client_state = self.model.load_checkpoint(str(in_dir), tag=self._TAG, load_module_strict=False)
        if client_state is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint {self._TAG!r} in {in_dir}")
        self.step = client_state["strategy_step"]
        self._load_rank_state(in_dir)
        return client_state["extra"]
