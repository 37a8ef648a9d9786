"""Strategy: the same tiny LoRA training loop under local, DDP, FSDP2 and DeepSpeed ZeRO-3.

Each distributed kind runs once in 2 spawned gloo processes (no Ray); results come back through
files in a temp dir and are cached for the cross-kind comparison.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from conftest import free_port
from latentqa.models import decoder_blocks
from latentqa.strategy import Strategy, StrategyConfig

VOCAB, BATCH, SEQ = 256, 2, 16
WORLD, GRAD_ACCUM, STEPS = 2, 2, 3
EMA_DECAY = 0.5  # large steps of the average, so that a wrong one shows
ADAPTER = "decoder"


# ---------------------------------------------------------------- model and data


def _base_model():
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return transformers.LlamaForCausalLM(config)


def _peft_model():
    import peft

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
    model = _base_model()
    torch.manual_seed(1)  # the LoRA init; the strategy also broadcasts rank 0's
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets)
    return peft.get_peft_model(model, config, adapter_name=ADAPTER)


def _data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """WORLD * GRAD_ACCUM micro-batches (the same every step, so the loss must fall), a probe
    batch for the early-exit pass and an eval batch."""
    g = torch.Generator().manual_seed(2)
    micro = torch.randint(0, VOCAB, (WORLD * GRAD_ACCUM, BATCH, SEQ), generator=g)
    probe = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    evaluation = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    return micro, probe, evaluation


# ---------------------------------------------------------------- the training loop under test


class _EarlyExit(Exception):
    """Raised by a forward hook to stop a forward after the block it watches."""


def _hidden(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


class _Objective(nn.Module):
    """Shaped like the engine's LatentQAModel: the PEFT model inside a module whose forward is the
    train objective. It reads block 0 of the plain target (PEFT's own disable_adapter(), no grad,
    the forward stopped by an exception caught *inside* this forward), then runs the adapter pass
    with that reading added to block 0's output. Without labels, forward is a plain adapter pass.
    It registers the blocks a second time, so state_dict() repeats them: the strategy must cope."""

    def __init__(self, peft_model: nn.Module):
        super().__init__()
        self.peft_model = peft_model
        self.blocks = decoder_blocks(peft_model)

    def read(self, input_ids: torch.Tensor) -> torch.Tensor:
        captured: list[torch.Tensor] = []

        def hook(module, args, output):
            captured.append(_hidden(output).detach())
            raise _EarlyExit

        handle = self.blocks[0].register_forward_hook(hook)
        try:
            with torch.no_grad(), self.peft_model.disable_adapter():
                self.peft_model(input_ids=input_ids)
        except _EarlyExit:
            pass
        finally:
            handle.remove()
        return captured[0]

    def logits(self, input_ids: torch.Tensor, reading: torch.Tensor | None = None) -> torch.Tensor:
        def patch(module, args, output):
            hidden = _hidden(output) + 0.5 * reading
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        handle = self.blocks[0].register_forward_hook(patch) if reading is not None else None
        try:
            return self.peft_model(input_ids=input_ids).logits
        finally:
            if handle:
                handle.remove()

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if labels is None:
            return self.logits(input_ids)
        logits = self.logits(input_ids, self.read(input_ids))
        return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())


def _early_exit_pass(strategy: Strategy, probe: torch.Tensor, disable=None) -> torch.Tensor:
    """Harsher than the engine's pattern: the exception escapes the wrapped model's forward
    (adapters off, by default via the strategy; no grad; stopped after block 0)."""
    captured: list[torch.Tensor] = []

    def hook(module, args, output):
        captured.append(_hidden(output).detach().to("cpu", copy=True))
        raise _EarlyExit

    handle = decoder_blocks(strategy.unwrapped)[0].register_forward_hook(hook)
    try:
        with torch.no_grad(), (disable or strategy.disable_adapters)():
            strategy.model(probe.to(strategy.device))
    except _EarlyExit:
        pass
    finally:
        handle.remove()
    return captured[0]


def _prepared(cfg: StrategyConfig) -> Strategy:
    strategy = Strategy.create(cfg)
    strategy.prepare(
        _Objective(_peft_model()),
        lambda params: torch.optim.AdamW(params, lr=1e-2),
        lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step)),
        forward_methods=["logits"],
    )
    strategy.model.train()
    return strategy


def _train_step(
    strategy: Strategy, micro: torch.Tensor, probe: torch.Tensor, probes: list[torch.Tensor]
) -> tuple[float, float]:
    """One optimizer step over this rank's micro-batches, each after an early-exit pass on the
    probe batch; returns (mean loss, first micro-batch loss), both averaged over ranks."""
    ga = strategy.cfg.grad_accum_steps
    losses = []
    for k in range(ga):
        probes.append(_early_exit_pass(strategy, probe))
        ids = micro[strategy.rank * ga + k].to(strategy.device)
        loss = strategy.model(ids, ids)
        strategy.backward(loss)
        assert strategy.optimizer_step() == (k == ga - 1)
        losses.append(loss.item())
    return strategy.all_reduce_mean(sum(losses) / ga), strategy.all_reduce_mean(losses[0])


def _eval_logits(strategy: Strategy, ids: torch.Tensor) -> torch.Tensor:
    """Through a method other than forward (registered for FSDP2 by forward_methods)."""
    with torch.no_grad():  # collective under FSDP / ZeRO-3: every rank runs it
        return strategy.unwrapped.logits(ids.to(strategy.device)).float().cpu()


def _raw_peft_disable_breaks(strategy: Strategy, micro: torch.Tensor, probe: torch.Tensor) -> bool:
    """An optimizer step, the early-exit pass under PEFT's own disable_adapter(), then a training
    micro-step: True if the strategy refuses the backward because adapter weights were left
    frozen. Leaves the strategy unusable."""
    _train_step(strategy, micro, probe, [])
    _early_exit_pass(strategy, probe, strategy.unwrapped.peft_model.disable_adapter)
    ids = micro[0].to(strategy.device)
    loss = strategy.model(ids, ids)
    try:
        strategy.backward(loss)
    except RuntimeError as e:
        assert "disable_adapters" in str(e)
        return True
    return False


def _run(cfg: StrategyConfig, out: Path) -> dict:
    """Train STEPS steps (saving the training state before the last), save the adapter, try
    PEFT's own disable_adapter(), then resume a fresh model from the saved state and redo the
    last step. The weights after every step are kept to check the moving average."""
    micro, probe, evaluation = _data()
    probes: list[torch.Tensor] = []
    strategy = _prepared(cfg)
    losses, first_micro = [], []
    states = [strategy.adapter_state_dict()]  # the average starts at the initial weights
    for step in range(STEPS):
        if step == STEPS - 1:
            strategy.save_training_state(out / "state", extra={"epoch": 7})
        loss, first = _train_step(strategy, micro, probe, probes)
        losses.append(loss)
        first_micro.append(first)
        states.append(strategy.adapter_state_dict())
    assert strategy.step == STEPS
    with strategy.averaged_weights():
        averaged = strategy.adapter_state_dict()
    logits = _eval_logits(strategy, evaluation)  # the live weights are back
    strategy.save_adapter(out / "adapter", ADAPTER)
    adapter_state = strategy.adapter_state_dict()
    raw_peft_disable_breaks = _raw_peft_disable_breaks(strategy, micro, probe)

    resumed = _prepared(cfg)
    extra = resumed.load_training_state(out / "state")
    assert extra == {"epoch": 7} and resumed.step == STEPS - 1
    _, resumed_first = _train_step(resumed, micro, probe, probes)
    resumed_logits = _eval_logits(resumed, evaluation)
    with resumed.averaged_weights():
        resumed_averaged = resumed.adapter_state_dict()
    return {
        "states": states,
        "averaged": averaged,
        "resumed_averaged": resumed_averaged,
        "kind": type(strategy).kind,
        "losses": losses,
        "next_loss": first_micro[-1],
        "resumed_next_loss": resumed_first,
        "logits": logits,
        "resumed_logits": resumed_logits,
        "probes": probes,
        "adapter_keys": sorted(adapter_state),
        "raw_peft_disable_breaks": raw_peft_disable_breaks,
    }


def _worker(rank: int, kind: str, port: int, out: Path) -> None:
    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD)
    )
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        cfg = StrategyConfig(kind=kind, zero_stage=3, grad_accum_steps=GRAD_ACCUM, ema_decay=EMA_DECAY)
        result = _run(cfg, out)
        if rank == 0:
            torch.save(result, out / "result.pt")
    finally:
        # Free DeepSpeed's engines (reference cycles) while the process group exists: left to
        # interpreter exit, they sometimes abort it ("terminate called without an active exception").
        gc.collect()
        dist.destroy_process_group()


# ---------------------------------------------------------------- running and checking


_RESULTS: dict[str, dict] = {}


def _result(kind: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    if kind not in _RESULTS:
        out = tmp_path_factory.mktemp(kind)
        if kind == "local":
            cfg = StrategyConfig(kind="local", grad_accum_steps=WORLD * GRAD_ACCUM, ema_decay=EMA_DECAY)
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # as in the workers; steadier on a busy 2-core machine
            try:
                result = _run(cfg, out)
            finally:
                torch.set_num_threads(threads)
        else:
            mp.spawn(_worker, args=(kind, free_port(), out), nprocs=WORLD, join=True)
            result = torch.load(out / "result.pt", weights_only=False)
        _RESULTS[kind] = {**result, "out": out}
    return _RESULTS[kind]


@pytest.fixture(scope="module")
def reference() -> dict:
    """Block-0 output of the base model on the probe batch, and its adapter key names."""
    _, probe, _ = _data()
    base = _base_model()
    with torch.no_grad():
        hidden = base(input_ids=probe, output_hidden_states=True).hidden_states[1]
    import peft

    keys = peft.get_peft_model_state_dict(_peft_model(), adapter_name=ADAPTER, save_embedding_layers=False)
    return {"probe": hidden, "adapter_keys": sorted(keys)}


def _check(result: dict, reference: dict) -> None:
    import peft

    # (a) the loss falls
    losses = result["losses"]
    assert losses[-1] < losses[0] - 0.01, losses
    # the early-exit pass keeps returning the base model's block-0 output, before and after steps
    for hidden in result["probes"]:
        torch.testing.assert_close(hidden, reference["probe"], atol=1e-5, rtol=0)
    # (c) the saved adapter reproduces the trained model's logits on a fresh base
    assert result["adapter_keys"] == reference["adapter_keys"]
    loaded = peft.PeftModel.from_pretrained(_base_model(), result["out"] / "adapter")
    _, _, evaluation = _data()
    with torch.no_grad():
        logits = loaded(input_ids=evaluation).logits
    torch.testing.assert_close(logits, result["logits"], atol=1e-4, rtol=0)
    # (d) resuming from the saved state repeats the last step exactly
    assert abs(result["resumed_next_loss"] - result["next_loss"]) < 1e-6
    torch.testing.assert_close(result["resumed_logits"], result["logits"], atol=1e-5, rtol=0)
    # (e) the moving average, kept shard by shard, is the average of the weights after each step,
    # and a resume restores it
    expected = result["states"][0]
    for state in result["states"][1:]:
        expected = {k: v.lerp(state[k], 1 - EMA_DECAY) for k, v in expected.items()}
    assert any((expected[k] - result["states"][-1][k]).abs().max() > 1e-3 for k in expected)
    torch.testing.assert_close(result["averaged"], expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(result["resumed_averaged"], result["averaged"], atol=1e-6, rtol=0)


def test_local(tmp_path_factory, reference, caplog):
    with caplog.at_level(logging.INFO, logger="latentqa.strategy"):
        fallback = Strategy.create(StrategyConfig(kind="ddp"))
    assert fallback.kind == "local" and fallback.world_size == 1
    assert "training locally" in caplog.text
    with pytest.raises(RuntimeError, match=r"torch\.distributed"):
        Strategy.create(StrategyConfig(kind="fsdp"))
    result = _result("local", tmp_path_factory)
    _check(result, reference)
    assert not result["raw_peft_disable_breaks"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ddp", "fsdp", "deepspeed"])
def test_distributed(kind, tmp_path_factory, reference):
    result = _result(kind, tmp_path_factory)
    assert result["kind"] == kind
    _check(result, reference)
    # PEFT's disable_adapter() flips requires_grad on whichever copy FSDP2 has registered; the
    # strategy catches the frozen adapter instead of silently not training it.
    assert result["raw_peft_disable_breaks"] == (kind == "fsdp")


@pytest.mark.slow
def test_kinds_agree(tmp_path_factory):
    """(b) same first-step loss everywhere; the whole run matches local training closely."""
    local = _result("local", tmp_path_factory)
    for kind in ["ddp", "fsdp", "deepspeed"]:
        losses = _result(kind, tmp_path_factory)["losses"]
        assert abs(losses[0] - local["losses"][0]) < 1e-5, (kind, losses, local["losses"])
        assert losses == pytest.approx(local["losses"], abs=1e-4), (kind, losses, local["losses"])


# ---------------------------------------------------------------- ZeRO-3 loading


def _zero3_loading_worker(rank: int, port: int, checkpoint: Path, out: Path) -> None:
    """The engine's model, from a pretrained checkpoint, loaded whole and then partitioned."""
    from latentqa.config import load_config
    from latentqa.data import load_examples
    from latentqa.session import LatentQA
    from latentqa.training import adamw_factory

    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD)
    )
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        config = load_config(overrides={"model": {"path": str(checkpoint), "weights": "pretrained"}})
        examples = load_examples(config.data.train)[:4]
        result = {}
        for partitioned in (False, True):
            strategy = Strategy.create(StrategyConfig(kind="deepspeed", zero_stage=3))
            torch.manual_seed(0)
            with strategy.model_loading() if partitioned else contextlib.nullcontext():
                lqa = LatentQA.load(config, train_decoder=True)
            # The embedding as loaded, before DeepSpeed's engine exists: empty when partitioned.
            loaded_numel = lqa.model.peft_model.get_input_embeddings().weight.numel()
            strategy.prepare(lqa.model, adamw_factory(config.train))
            batch = lqa.collate(lqa.lay_out(examples, "train"))
            losses = []
            for _ in range(2):
                loss = strategy.model(batch, config.patch.read_layer, True)
                strategy.backward(loss)
                strategy.optimizer_step()
                losses.append(strategy.all_reduce_mean(loss.item()))
            result[partitioned] = {"loaded_numel": loaded_numel, "losses": losses}
        if rank == 0:
            torch.save(result, out / "zero3_loading.pt")
    finally:
        gc.collect()
        dist.destroy_process_group()


@pytest.mark.slow
def test_zero3_loads_pretrained_weights_partitioned(tmp_path):
    """Under `model_loading`, ZeRO-3 builds the pretrained base already partitioned (no rank holds
    a whole weight, as a 70B needs), and trains exactly as the whole-loaded model does."""
    from latentqa.config import load_config
    from latentqa.models import load_base, load_tokenizer

    model_config = load_config().model
    checkpoint = tmp_path / "pretrained"
    load_base(model_config).save_pretrained(checkpoint)
    load_tokenizer(model_config).save_pretrained(checkpoint)
    mp.spawn(_zero3_loading_worker, args=(free_port(), checkpoint, tmp_path), nprocs=WORLD, join=True)
    result = torch.load(tmp_path / "zero3_loading.pt", weights_only=False)
    assert result[False]["loaded_numel"] > 0 and result[True]["loaded_numel"] == 0
    assert result[True]["losses"] == pytest.approx(result[False]["losses"], abs=1e-6)
    assert result[True]["losses"][1] < result[True]["losses"][0]


# ---------------------------------------------------------------- FSDP2 loading on rank 0


FSDP_LOADINGS = [  # (weights, strategy, loaded under model_loading)
    *(("pretrained", kind, on_rank0) for kind, on_rank0 in (("ddp", False), ("fsdp", False), ("fsdp", True))),
    *(("random", "fsdp", on_rank0) for on_rank0 in (False, True)),
]


def _fsdp_loading_worker(rank: int, port: int, checkpoint: Path, out: Path) -> None:
    """The engine's model, trained a few steps under FSDP2 loaded on rank 0 (`model_loading`) and,
    as before, loaded whole on every rank under FSDP2 and DDP: from a pretrained checkpoint, and
    with random weights (which rank 0 alone draws)."""
    from latentqa.config import load_config
    from latentqa.data import load_examples
    from latentqa.session import LatentQA
    from latentqa.training import adamw_factory

    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD)
    )
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        result = {}
        for weights, kind, on_rank0 in FSDP_LOADINGS:
            config = load_config(overrides={"model": {"path": str(checkpoint), "weights": weights}})
            examples = load_examples(config.data.train)[4 * rank : 4 * rank + 4]  # each rank its own batch
            strategy = Strategy.create(StrategyConfig(kind=kind))
            torch.manual_seed(0)  # as jobs/train.py: one seed on every rank
            with strategy.model_loading() if on_rank0 else contextlib.nullcontext():
                lqa = LatentQA.load(config, train_decoder=True)
            has_weights = not lqa.model.peft_model.get_input_embeddings().weight.is_meta
            strategy.prepare(lqa.model, adamw_factory(config.train))
            strategy.model.train()  # LoRA dropout on: the ranks' generators matter too
            batch = lqa.collate(lqa.lay_out(examples, "train"))
            losses = []
            for _ in range(3):
                loss = strategy.model(batch, config.patch.read_layer, True)
                strategy.backward(loss)
                strategy.optimizer_step()
                losses.append(strategy.all_reduce_mean(loss.item()))
            result[weights, kind, on_rank0] = {
                "has_weights": has_weights,
                "losses": losses,
                "adapter": strategy.adapter_state_dict(),
            }
        torch.save(result, out / f"fsdp-loading-{rank}.pt")
    finally:
        gc.collect()
        dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp_loads_on_rank0_and_trains_as_before(tmp_path):
    """Under `model_loading`, FSDP2 loads the weights on rank 0 only (the other rank builds the
    model without weights) and sends each rank its shards: the training losses and the trained
    adapter equal those of the model loaded whole on every rank, under FSDP2 and DDP."""
    from latentqa.config import load_config
    from latentqa.models import load_base, load_tokenizer

    model_config = load_config().model
    checkpoint = tmp_path / "pretrained"
    # Not the default seed: a rank that initialised the model instead of receiving it would differ.
    load_base(model_config.model_copy(update={"init_seed": 7})).save_pretrained(checkpoint)
    load_tokenizer(model_config).save_pretrained(checkpoint)
    mp.spawn(_fsdp_loading_worker, args=(free_port(), checkpoint, tmp_path), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"fsdp-loading-{rank}.pt", weights_only=False) for rank in range(WORLD)]
    for loading in FSDP_LOADINGS:
        on_rank0 = loading[2]
        assert [r[loading]["has_weights"] for r in ranks] == [True, not on_rank0], loading
    for weights, before in [("pretrained", "ddp"), ("pretrained", "fsdp"), ("random", "fsdp")]:
        new, old = ranks[0][weights, "fsdp", True], ranks[0][weights, before, False]
        assert new["losses"][-1] < new["losses"][0]
        assert new["losses"] == pytest.approx(old["losses"], abs=1e-5), (weights, before)
        torch.testing.assert_close(new["adapter"], old["adapter"], atol=1e-5, rtol=0)


# ---------------------------------------------------------------- evaluation across ranks


def _eval_examples():
    from latentqa.config import load_config
    from latentqa.data import load_examples

    config = load_config()
    return config, load_examples(config.data.eval)[:18]  # 5 batches of 4 per condition: ranks get 8 and 7


def _evaluation(strategy: Strategy) -> dict:
    """The offline decoder (seeded, so alike on every rank) evaluated under `strategy`."""
    from latentqa.evaluation import evaluate
    from latentqa.session import LatentQA
    from latentqa.training import adamw_factory

    config, examples = _eval_examples()
    torch.manual_seed(0)
    lqa = LatentQA.load(config, train_decoder=True)
    with torch.no_grad():  # a decoder that is not the base, so the three conditions differ
        for name, param in lqa.model.peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02, generator=torch.Generator().manual_seed(len(name)))
    strategy.prepare(lqa.model, adamw_factory(config.train))
    with strategy.averaged_weights(), strategy.evaluation():
        return dataclasses.asdict(evaluate(lqa, examples, batch_size=4, ranks=strategy))


def _evaluation_worker(rank: int, port: int, out: Path) -> None:
    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD)
    )
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        result = _evaluation(Strategy.create(StrategyConfig(kind="fsdp")))
        torch.save(result, out / f"evaluation-{rank}.pt")
    finally:
        gc.collect()
        dist.destroy_process_group()


@pytest.mark.slow
def test_evaluation_split_across_ranks_equals_one_rank(tmp_path):
    """Under FSDP2 on 2 ranks each rank evaluates its share of the batches (the share differs by
    one: the collective forwards still pair up) and every rank ends with one rank's figures."""
    single = _evaluation(Strategy.create(StrategyConfig(kind="local")))
    mp.spawn(_evaluation_worker, args=(free_port(), tmp_path), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        split = torch.load(tmp_path / f"evaluation-{rank}.pt", weights_only=False)
        assert split["examples"] == single["examples"] == 18
        for key in ("loss_true", "loss_shuffled", "loss_none"):
            assert split[key] == pytest.approx(single[key], abs=1e-6), (rank, key)
        assert split["gain_ci"] == pytest.approx(single["gain_ci"], abs=1e-6)
    assert single["loss_shuffled"] != pytest.approx(single["loss_true"], abs=1e-6)
