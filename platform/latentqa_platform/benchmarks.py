"""Benchmarks of the engine and the platform against their physical limits (issue #6).

Every figure is a RATIO of two things measured side by side in the same process on the same
inputs, interleaved (A, B, A, B, ...), reported as medians over repeats: the machine may be
shared, so absolute times are noise, ratios much less so. Each function returns one row::

    {"name", "measured", "baseline", "unit", "ratio", "target", "met", "details"}

`ratio` is the median of the per-repeat ratios measured/baseline (each pair taken back to back).
Engine benchmarks need no Ray; `ray_overhead` and `serve` import Ray lazily. `memory` runs each
setup in a fresh subprocess (`python -m latentqa_platform.benchmarks memory-setup ...`) so peaks
do not mix, and `fsdp_loading` each rank of each run (`... fsdp-loading-rank ...`). `gpu_preset` is the one-shot GPU run (Llama-3-8B shaped, random weights, bf16).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from latentqa.paths import FETCHED_TOKENIZERS, OFFLINE_HELDOUT, OFFLINE_TRAIN, PAPER_DATA, PROJECT_ROOT

LLAMA3_TOKENIZER = FETCHED_TOKENIZERS / "llama-3.1"
PAPER_TRAIN = PAPER_DATA / "train"
SMOLLM2_CONFIG = PROJECT_ROOT / "infra" / "configs" / "smollm2-135m-instruct.yaml"
QUESTIONS = [
    "What type of persona will the assistant adopt?",
    "What is the assistant trying to do?",
    "How does the assistant talk?",
    "Please describe the assistant's goal.",
    "What will the assistant do in its replies?",
    "Who is the assistant pretending to be?",
    "What tone will the assistant use?",
    "Is the assistant being honest?",
    "What does the user want?",
    "What emotion is the assistant expressing?",
    "What topic will the assistant focus on?",
    "Will the assistant follow the user's instruction?",
    "What style does the assistant write in?",
    "What is special about the assistant's answers?",
    "Describe the assistant in one sentence.",
]
DIALOG = [{"role": "user", "content": "Please act like a pirate captain from now on, and tell me about the sea."}]

# ---------------------------------------------------------------- measurement helpers


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each fn, called in turn A, B, A, B, ... after `warmup` rounds."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync()
            start = time.perf_counter()
            fn()
            _sync()
            times[name].append(time.perf_counter() - start)
    return times


def paired_ratio(measured: list[float], baseline: list[float]) -> float:
    return statistics.median(m / b for m, b in zip(measured, baseline))


def row(
    name: str, measured: float, baseline: float, unit: str, ratio: float, target: str, met: bool | None, **details
) -> dict:
    return {
        "name": name,
        "measured": measured,
        "baseline": baseline,
        "unit": unit,
        "ratio": ratio,
        "target": target,
        "met": met,
        "details": details,
    }


def _timed_row(name: str, times: dict[str, list[float]], limit: float | None, target: str, **details) -> dict:
    (a, ta), (b, tb) = list(times.items())[:2]
    ratio = paired_ratio(ta, tb)
    return row(
        name,
        statistics.median(ta),
        statistics.median(tb),
        "s",
        ratio,
        target,
        None if limit is None else ratio <= limit,
        measured_is=a,
        baseline_is=b,
        repeats=len(ta),
        measured_all=ta,
        baseline_all=tb,
        **details,
    )


def _rate_row(name: str, rates: dict[str, list[float]], unit: str, floor: float, **details) -> dict:
    """A row of two rates (the measured one first, per repeat), met at `floor` times the baseline's."""
    (a, measured), (b, baseline) = list(rates.items())[:2]
    ratio = paired_ratio(measured, baseline)
    return row(
        name,
        statistics.median(measured),
        statistics.median(baseline),
        unit,
        ratio,
        f">= {floor:g}x",
        ratio >= floor,
        measured_is=a,
        baseline_is=b,
        repeats=len(measured),
        measured_all=measured,
        baseline_all=baseline,
        **details,
    )


# ---------------------------------------------------------------- the benchmark model


@dataclasses.dataclass
class ModelSize:
    """A random Llama; defaults are small enough for a 2-core CPU."""

    hidden: int = 256
    layers: int = 8
    intermediate: int = 688
    heads: int = 8
    kv_heads: int = 4
    vocab: int | None = None  # None: the tokenizer's size
    tie_embeddings: bool = True
    rope_theta: float = 500000.0
    max_positions: int = 4096

    def parameters(self, vocab: int) -> int:
        head_dim = self.hidden // self.heads
        attn = self.hidden * head_dim * (2 * self.heads + 2 * self.kv_heads)
        mlp = 3 * self.hidden * self.intermediate
        embed = vocab * self.hidden * (1 if self.tie_embeddings else 2)
        return self.layers * (attn + mlp + 2 * self.hidden) + embed + self.hidden


LLAMA3_8B = ModelSize(
    hidden=4096,
    layers=32,
    intermediate=14336,
    heads=32,
    kv_heads=8,
    vocab=128256,
    tie_embeddings=False,
    max_positions=8192,
)
MEMORY_DEFAULT = ModelSize(hidden=1024, layers=24, intermediate=2816, heads=16, kv_heads=8, vocab=32000)


def write_model_dir(size: ModelSize, vocab: int, folder: Path) -> Path:
    from transformers import LlamaConfig

    LlamaConfig(
        vocab_size=size.vocab or vocab,
        hidden_size=size.hidden,
        intermediate_size=size.intermediate,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.kv_heads,
        max_position_embeddings=size.max_positions,
        tie_word_embeddings=size.tie_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": size.rope_theta},
        bos_token_id=0,
        eos_token_id=4,
        pad_token_id=5,
    ).save_pretrained(folder)
    return folder


def engine_config(
    model_dir: Path, tokenizer: Path, read_layer: int, device: str = "cpu", dtype: str = "float32", **train
):
    from latentqa.config import load_config

    return load_config(
        overrides={
            "model": {
                "path": str(model_dir),
                "tokenizer": str(tokenizer),
                "weights": "random",
                "device": device,
                "dtype": dtype,
            },
            "patch": {"read_layer": read_layer},
            "data": {"train": {"path": str(OFFLINE_TRAIN)}, "eval": None},
            "train": {"eval_every": 0, **train},
        }
    )


def random_session(size: ModelSize, tokenizer: Path, read_layer: int, **engine):
    """A LatentQA session over a random Llama of `size` with `tokenizer`, its decoder trainable;
    `engine`: device, dtype and train settings (see `engine_config`)."""
    from latentqa.session import LatentQA

    with tempfile.TemporaryDirectory() as tmp:  # the weights are in memory once loaded
        model_dir = write_model_dir(size, vocabulary_size(tokenizer), Path(tmp))
        config = engine_config(model_dir, tokenizer, read_layer, **engine)
        return LatentQA.load(config, train_decoder=True)


def config_session(config_path: Path, device: str = "cpu", dtype: str | None = None, **train):
    """A LatentQA session over the real model of a config file (its tokenizer, chat template,
    read layer and data), with a new trainable decoder in place of the shipped one: the figures
    time the computation, which the adapter's values do not change."""
    from latentqa.config import load_config
    from latentqa.session import LatentQA

    model = {"decoder_adapter": None, "device": device, **({"dtype": dtype} if dtype else {})}
    config = load_config(config_path, overrides={"model": model, "train": {"eval_every": 0, **train}})
    return LatentQA.load(config, train_decoder=True)


def heldout_read(folder: Path, questions: int = 15) -> tuple[list[dict], list[str]]:
    """A real read: the first held-out dialog of a user's message and the target's own reply (no
    system prompt, so a template's default one applies), and the first `questions` distinct
    questions of the held-out QA file."""
    from latentqa.data import QA_FILE, load_qa, load_records

    record = load_records(folder / "stimulus_completion.json")[0]
    dialog = [
        {"role": "user", "content": record.stimulus_user},
        {"role": "assistant", "content": record.stimulus_model},
    ]
    asked = dict.fromkeys(q for pairs in load_qa(folder / QA_FILE).values() for q, _ in pairs)
    return dialog, list(asked)[:questions]


def vocabulary_size(tokenizer: Path) -> int:
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(tokenizer))


def no_stop(lqa):
    """The session with no stop tokens, so every read generates exactly max_new_tokens."""
    fmt = copy.copy(lqa.chat_format)
    fmt.stop_ids = set()
    return dataclasses.replace(lqa, chat_format=fmt)


def example_batch(layout, data, batch_size: int, seed: int = 0):
    """`batch_size` seeded examples of the `data` set (a DatasetSpec), laid out for training."""
    import random

    from latentqa.data import load_examples
    from latentqa.layout import collate

    examples = load_examples(data)
    random.Random(seed).shuffle(examples)
    return collate(
        [layout.example(e, "train", i) for i, e in enumerate(examples[:batch_size])], layout.chat_format.pad_id
    )


def train_batch(lqa, batch_size: int, seed: int = 0):
    """A batch of the session's own training set, on its device."""
    return example_batch(lqa.layout, lqa.config.data.train, batch_size, seed).to(lqa.device)


# ---------------------------------------------------------------- 1. read overhead


def read_overhead(
    lqa,
    repeats: int,
    questions: int = 15,
    max_new_tokens: int = 64,
    dialog: list[dict] = DIALOG,
    asked: list[str] = QUESTIONS,
    limit: float = 1.25,
) -> dict:
    """Patched read (one dialog x Q questions x T new tokens, the engine's `read`, layout
    included) vs HF's KV-cached `generate` of the same decoder on the same write prompts.
    The questions are the first Q of `asked`, repeated as needed."""
    from latentqa.layout import LaidOutExample
    from latentqa.models import DECODER
    from latentqa.reading import dialog_to_read, read

    lqa = no_stop(lqa)
    qs = (asked * (questions // len(asked) + 1))[:questions]
    read_side = lqa.layout.read_side(dialog_to_read(dialog))
    n = read_side.patched_span[1] - read_side.patched_span[0]
    batch = lqa.collate([LaidOutExample(read_side, lqa.layout.write_side(n, q, None, "generate")) for q in qs])
    peft = lqa.model.peft_model
    produced = {}

    def patched_read():
        produced["read"] = read(lqa, [dialog], qs, max_new_tokens=max_new_tokens, batch_size=max(16, questions))

    def plain_generate():
        with lqa.model.evaluating(), lqa.model.adapters.use(DECODER):
            out = peft.generate(
                input_ids=batch.write_ids,
                attention_mask=batch.write_attention,
                do_sample=False,
                max_new_tokens=max_new_tokens,
                min_new_tokens=max_new_tokens,
                pad_token_id=lqa.chat_format.pad_id,
            )
        produced["generate"] = out.shape[1] - batch.write_ids.shape[1]

    times = interleaved({"patched read": patched_read, "HF generate (KV cache)": plain_generate}, repeats)
    return _timed_row(
        "read overhead",
        times,
        limit,
        f"<= {limit:g}x",
        questions=questions,
        new_tokens=max_new_tokens,
        generate_new_tokens=produced["generate"],
        prompt_tokens=int(batch.write_ids.shape[1]),
        read_tokens=len(read_side.ids),
    )


# ---------------------------------------------------------------- 2. train step


def train_step_overhead(lqa, repeats: int, batch_size: int = 8) -> dict:
    """One engine train step (the loop's `train_step` + `optimizer_step`) vs its unavoidable
    parts run bare on the same batch: the target's blocks 0..L (no hooks), the decoder's
    forward + loss on the labelled positions + backward, gradient clipping when the config
    clips (as the engine's default does), and a plain AdamW step."""
    import torch.nn.functional as F

    from latentqa.layout import IGNORE_INDEX
    from latentqa.patching import positions
    from latentqa.strategy import Strategy
    from latentqa.training import adamw_factory, strategy_config, train_step

    config = lqa.config
    layer = config.patch.read_layer
    strategy = Strategy.create(strategy_config(config, "local"))
    strategy.prepare(lqa.model, adamw_factory(config.train))
    batch = train_batch(lqa, batch_size)
    peft = lqa.model.peft_model
    causal = peft.get_base_model()
    inner = causal.get_decoder()
    params = [p for p in peft.parameters() if p.requires_grad]
    bare_opt = torch.optim.AdamW(params, lr=config.train.lr, weight_decay=config.train.weight_decay)
    all_layers = inner.layers
    read_pos, write_pos = positions(batch.read_attention), lqa.model.decoder_position_ids(batch, True)

    def engine():
        strategy.model.train()
        train_step(strategy, batch, layer, True)
        strategy.optimizer_step()

    def target_part():
        inner.layers = all_layers[: layer + 1]  # blocks 0..L only, no hooks
        try:  # the engine's own switch: one flag per adapter layer, the least any plain target costs
            with torch.no_grad(), lqa.model.adapters.use(None):
                inner(
                    input_ids=batch.read_ids,
                    attention_mask=batch.read_attention,
                    position_ids=read_pos,
                    use_cache=False,
                )
        finally:
            inner.layers = all_layers

    def decoder_part():
        hidden = inner(
            input_ids=batch.write_ids, attention_mask=batch.write_attention, position_ids=write_pos, use_cache=False
        ).last_hidden_state
        targets = batch.labels[:, 1:]
        keep = targets != IGNORE_INDEX
        logits = causal.get_output_embeddings()(hidden[:, :-1][keep])
        F.cross_entropy(logits.float(), targets[keep]).backward()
        if config.train.max_grad_norm:  # the same training semantics as the engine's config
            torch.nn.utils.clip_grad_norm_(params, config.train.max_grad_norm)
        bare_opt.step()
        bare_opt.zero_grad(set_to_none=True)

    def parts():
        peft.train()
        target_part()
        decoder_part()

    times = interleaved({"engine step": engine, "bare parts": parts}, repeats)
    # the split of the bare parts, for the report
    split = interleaved(
        {"target to L": target_part, "decoder fwd/bwd+adamw": decoder_part}, max(1, repeats // 2), warmup=0
    )
    peft.eval()
    return _timed_row(
        "train step",
        times,
        1.1,
        "<= 1.1x",
        batch_size=batch_size,
        read_layer=layer,
        target_part_s=statistics.median(split["target to L"]),
        decoder_part_s=statistics.median(split["decoder fwd/bwd+adamw"]),
        tokens=int(batch.read_attention.sum() + batch.write_attention.sum()),
    )


# ---------------------------------------------------------------- 2b. token-budget batches


def token_batches(lqa, repeats: int, batch_size: int = 8, steps: int = 16, batch_tokens: int | None = None) -> dict:
    """The session's train set cut two ways: today's fixed-count batches (`batch_size` examples,
    sorted by the longer side) and token-budget batches (`train.batch_tokens`: sorted both ways,
    cut within the budget), each over every example as a run's epoch is. Each way trains on a
    seeded sample of `steps` of its batches (0: all), interleaved, and counts real (non-padding)
    tokens/s; the ratio is the median over repeats of budget tokens/s over fixed-count tokens/s.
    The budget defaults to the fixed batches' mean padded tokens (a step costs about what one of
    today's does). Each way's padding share, both sides and each side, is over the whole set."""
    import random

    from latentqa.data import load_examples
    from latentqa.strategy import Strategy
    from latentqa.training import (
        ExampleSize,
        adamw_factory,
        length_grouped_order,
        padded_tokens,
        strategy_config,
        train_step,
    )

    config = lqa.config
    laid = lqa.lay_out(load_examples(config.data.train), "train")
    sizes = [ExampleSize.of(e) for e in laid]
    fixed = config.train.model_copy(update={"batch_size": batch_size, "batch_tokens": None})
    fixed_order = length_grouped_order(sizes, fixed, 0)
    budget = batch_tokens or round(statistics.mean(padded_tokens([sizes[i] for i in b]) for b in fixed_order))
    orders = {
        "token budget": length_grouped_order(sizes, fixed.model_copy(update={"batch_tokens": budget}), 0),
        "fixed count": fixed_order,
    }
    timed = {
        name: random.Random(0).sample(order, min(steps or len(order), len(order))) for name, order in orders.items()
    }
    batches = {
        name: [lqa.collate([laid[i] for i in b]).to(lqa.device) for b in chosen] for name, chosen in timed.items()
    }
    real = {name: sum(sizes[i].total for b in chosen for i in b) for name, chosen in timed.items()}
    strategy = Strategy.create(strategy_config(config, "local"))
    strategy.prepare(lqa.model, adamw_factory(config.train))
    layer = config.patch.read_layer

    def train_on(name: str, count: int | None = None) -> Callable[[], None]:
        def run() -> None:
            strategy.model.train()
            for batch in batches[name][:count]:
                train_step(strategy, batch, layer, True)
                strategy.optimizer_step()

        return run

    for name in orders:  # warm up on one batch each, not a whole pass: a real model's pass takes minutes
        train_on(name, 1)()
    times = interleaved({name: train_on(name) for name in orders}, repeats, warmup=0)
    lqa.model.eval()
    rates = {name: [real[name] / t for t in ts] for name, ts in times.items()}

    def padding(order: list[list[int]]) -> dict[str, float]:
        padded = {
            side: sum(len(b) * max(getattr(sizes[i], side) for i in b) for b in order) for side in ("read", "write")
        }
        used = {side: sum(getattr(s, side) for s in sizes) for side in ("read", "write")}
        return {
            "both": 1 - sum(used.values()) / sum(padded.values()),
            **{side: 1 - used[side] / padded[side] for side in padded},
        }

    return _rate_row(
        "token batches",
        rates,
        "real tokens/s",
        1.0,
        examples=len(sizes),
        batch_size=batch_size,
        batch_tokens=budget,
        batches={name: len(order) for name, order in orders.items()},
        timed_batches={name: len(chosen) for name, chosen in timed.items()},
        timed_real_tokens=real,
        padding_share={name: padding(order) for name, order in orders.items()},
    )


# ---------------------------------------------------------------- 4. early exit


def early_exit(lqa, repeats: int, batch_size: int = 8, tolerance: float = 0.2) -> dict:
    """The target pass to read layer L of N vs a full forward with logits (same batch, adapters
    off in both). Expected ratio = (L+1)/N x (1 - h), h the LM head's share of the full forward
    (measured: the head on the full forward's last hidden states)."""
    from latentqa.patching import positions

    layer = lqa.config.patch.read_layer
    n = lqa.model.num_layers
    batch = train_batch(lqa, batch_size)
    peft = lqa.model.peft_model
    pos = positions(batch.read_attention)
    hidden = {}

    def early():
        with lqa.model.evaluating():
            lqa.model.target_activations(batch, [layer])

    def full():
        with lqa.model.evaluating(), lqa.model.adapters.use(None):
            out = peft(
                input_ids=batch.read_ids,
                attention_mask=batch.read_attention,
                position_ids=pos,
                use_cache=False,
                output_hidden_states=not hidden,
            )
            if out.hidden_states is not None:
                hidden["last"] = out.hidden_states[-1]

    def head():
        with lqa.model.evaluating(), lqa.model.adapters.use(None):
            peft.get_base_model().get_output_embeddings()(hidden["last"])

    times = interleaved({"to read layer": early, "full forward + logits": full}, repeats)
    head_times = interleaved({"head": head, "full": full}, repeats, warmup=0)
    share = paired_ratio(head_times["head"], head_times["full"])
    expected = (layer + 1) / n * (1 - share)
    ratio = paired_ratio(times["to read layer"], times["full forward + logits"])
    result = _timed_row(
        "early exit",
        times,
        None,
        f"~(L+1)/N x (1-head share) = {expected:.3f} (+-{tolerance:.0%})",
        read_layer=layer,
        num_layers=n,
        head_share=share,
        expected_ratio=expected,
    )
    result["met"] = abs(ratio / expected - 1) <= tolerance
    return result


# ---------------------------------------------------------------- 4b. evaluation suite


def suite_overhead(lqa, repeats: int, items: int = 16, batch_size: int = 16, heldout: Path = OFFLINE_HELDOUT) -> dict:
    """The suite's multiple-choice identification (`multiple_choice`: layout, one target pass per
    dialog batch, every candidate scored under the five conditions) vs the sum of its bare
    forwards on the same batches, laid out beforehand: the target's blocks 0..L per dialog batch,
    and per candidate batch the decoder's (or, for prompting, the target's) forward with the LM
    head on the labelled positions only; no hooks, no patching, no layout. The first `items`
    items of the `heldout` folder."""
    from latentqa.identification import CONDITIONS, choice_items, condition_write_side, multiple_choice, scoring_batches
    from latentqa.layout import IGNORE_INDEX, LaidOutExample
    from latentqa.patching import positions

    chosen = choice_items(heldout, k=4)[:items]
    layer = lqa.config.patch.read_layer
    reads = [lqa.layout.read_side(item.dialog) for item in chosen]
    first = [
        LaidOutExample(r, condition_write_side(lqa, "true", item, r, item.candidates[0]))
        for r, item in zip(reads, chosen)
    ]
    target_batches = [lqa.collate(first[i : i + batch_size]) for i in range(0, len(first), batch_size)]
    scoring = [
        (batch, adapter)
        for condition in CONDITIONS  # as the suite scores them
        for _, batch, adapter in scoring_batches(lqa, chosen, reads, condition, batch_size)
    ]
    causal = lqa.model.peft_model.get_base_model()
    inner = causal.get_decoder()
    all_layers = inner.layers
    shift = lqa.config.patch.shift_position_ids_read

    def suite():
        multiple_choice(lqa, chosen, batch_size=batch_size)

    def bare():
        with torch.no_grad():
            inner.layers = all_layers[: layer + 1]
            try:
                with lqa.model.adapters.use(None):
                    for batch in target_batches:
                        inner(
                            input_ids=batch.read_ids,
                            attention_mask=batch.read_attention,
                            position_ids=positions(batch.read_attention),
                            use_cache=False,
                        )
            finally:
                inner.layers = all_layers
            for batch, adapter in scoring:
                with lqa.model.adapters.use(adapter):
                    hidden = inner(
                        input_ids=batch.write_ids,
                        attention_mask=batch.write_attention,
                        position_ids=lqa.model.decoder_position_ids(batch, shift),
                        use_cache=False,
                    ).last_hidden_state
                    keep = batch.labels[:, 1:] != IGNORE_INDEX
                    causal.get_output_embeddings()(hidden[:, :-1][keep])

    lqa.model.eval()
    times = interleaved({"suite (multiple choice)": suite, "bare forwards": bare}, repeats)
    return _timed_row(
        "evaluation suite (multiple choice)",
        times,
        1.25,
        "<= 1.25x",
        items=len(chosen),
        candidates=4,
        conditions=len(CONDITIONS),
        scored_rows=sum(len(b) for b, _ in scoring),
        target_passes=len(target_batches),
    )


# ---------------------------------------------------------------- 5. layout


def layout_throughput(
    repeats: int, examples: int = 300, data: Path = PAPER_TRAIN, tokenizer: Path = LLAMA3_TOKENIZER, floor: float = 0.9
) -> dict:
    """Examples/s of the engine's layout (train mode) vs bare tokenizer calls on the same strings
    (each example's rendered read dialog and decoder dialog, one call per example, as the layout
    makes one per side). The bare calls must give the layout's ids, with one `?` where the
    placeholders go: otherwise the two would not tokenise the same text."""
    import random

    from transformers import AutoTokenizer

    from latentqa.chat_format import ChatFormat
    from latentqa.data import DatasetSpec, load_examples, read_dialog
    from latentqa.layout import ACKNOWLEDGEMENT, Layout

    tok = AutoTokenizer.from_pretrained(tokenizer)
    layout = Layout(ChatFormat(tok))
    fmt = layout.chat_format
    every = load_examples(DatasetSpec(path=data))
    chosen = random.Random(0).sample(every, min(examples, len(every)))
    texts = []
    for ex in chosen:
        dialog = read_dialog(ex.record)
        read_text = fmt.render(dialog.messages, add_generation_prompt=dialog.add_generation_prompt).text
        role = fmt.decoder_role
        write = [
            {"role": "user", "content": "?"},
            {"role": role, "content": ACKNOWLEDGEMENT},
            {"role": "user", "content": ex.question},
            {"role": role, "content": ex.answer},
        ]
        texts.append([read_text, fmt.render(write).text])
        laid = layout.example(ex, "train")
        start, end = laid.write.patched_span
        write_ids = [*laid.write.ids[:start], fmt.placeholder_first_id, *laid.write.ids[end:]]
        if tok(texts[-1], add_special_tokens=False)["input_ids"] != [laid.read.ids, write_ids]:
            raise RuntimeError(
                f"layout benchmark: the bare tokenizer's ids differ from the layout's ({ex.record.label})"
            )

    def engine():
        for ex in chosen:
            layout.example(ex, "train")

    def bare():
        for pair in texts:
            tok(pair, add_special_tokens=False)

    times = interleaved({"layout": engine, "bare tokenizer": bare}, repeats)
    rates = {
        "Layout.example (train)": [len(chosen) / t for t in times["layout"]],
        "tokenizer(pair) per example": [len(chosen) / t for t in times["bare tokenizer"]],
    }
    return _rate_row(
        "layout", rates, "examples/s", floor, examples=len(chosen), data=str(data), tokenizer=str(tokenizer)
    )


# ---------------------------------------------------------------- 3. memory (fresh subprocesses)


def _synthetic_batch(vocab: int, batch_size: int, read_len: int, write_len: int, answer_len: int):
    from latentqa.layout import LaidOutExample, ReadSide, WriteSide, collate

    g = torch.Generator().manual_seed(0)
    n = read_len - 1
    out = []
    for _ in range(batch_size):
        read_ids = torch.randint(6, vocab, (read_len,), generator=g).tolist()
        write_ids = torch.randint(6, vocab, (write_len + n,), generator=g).tolist()
        labels = [-100] * (len(write_ids) - answer_len) + write_ids[-answer_len:]
        out.append(LaidOutExample(ReadSide(read_ids, (1, 1), (1, read_len)), WriteSide(write_ids, (5, 5 + n), labels)))
    return collate(out, 5)


def _status_mb(*fields: str) -> list[float]:
    """Fields of /proc/self/status (Linux) in MiB, e.g. VmHWM, RssAnon."""
    with open("/proc/self/status") as status:
        values = dict(line.split(":", 1) for line in status)
    return [int(values[field].split()[0]) / 1024 for field in fields]  # kB


def _rss_mb() -> float:
    """This process's peak RSS: VmHWM, not ru_maxrss, which exec carries over from the process it
    replaced, so that a fresh subprocess would start at its parent's peak."""
    try:
        return _status_mb("VmHWM")[0]
    except OSError:  # no /proc: macOS, where ru_maxrss is in bytes
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def memory_setup(setup: str, config_file: str, batch_file: str, steps: int = 2) -> dict:
    """One training setup, in this (fresh) process: its peak RSS after `steps` train steps of the
    saved batch, with the model, LoRA settings and read layer of the saved LatentQA config."""
    import torch.nn.functional as F
    from peft import get_peft_model

    from latentqa.config import LatentQAConfig
    from latentqa.layout import Batch
    from latentqa.models import AdapterSet, _lora_config, load_base
    from latentqa.patching import LatentQAModel
    from latentqa.strategy import Strategy, StrategyConfig

    torch.set_num_threads(1)  # more threads than free cores stall on a shared machine
    after_import = _rss_mb()
    config = LatentQAConfig.model_validate_json(Path(config_file).read_text())
    cfg, lora, read_layer = config.model, config.lora, config.patch.read_layer
    base = load_base(cfg)
    batch = Batch(**torch.load(batch_file))
    n_params = sum(p.numel() for p in base.parameters())

    def loss_of(model, ids, attention, labels):
        hidden = (
            model.get_base_model()
            .get_decoder()(input_ids=ids, attention_mask=attention, use_cache=False)
            .last_hidden_state
        )
        keep = labels[:, 1:] != -100
        logits = model.get_base_model().get_output_embeddings()(hidden[:, :-1][keep])
        return F.cross_entropy(logits.float(), labels[:, 1:][keep])

    if setup == "engine":  # one base: target = adapters off, decoder = base + adapter
        model = LatentQAModel(AdapterSet.create(base, None, lora, train_decoder=True))
        strategy = Strategy.create(StrategyConfig(kind="local"))
        strategy.prepare(model, lambda ps: torch.optim.AdamW(ps, lr=1e-4))
        for _ in range(steps):
            strategy.model.train()
            strategy.backward(strategy.model(batch, read_layer, True))
            strategy.optimizer_step()
    elif setup == "base+adapter":  # the floor: one base model, its adapter and the optimizer state
        model = get_peft_model(base, _lora_config(lora), adapter_name="decoder")
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        model.train()
        for _ in range(steps):
            loss_of(model, batch.write_ids, batch.write_attention, batch.labels).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    elif setup == "two copies":  # the paper's layout: a frozen target copy and a decoder copy
        torch.manual_seed(1)
        decoder = get_peft_model(load_base(cfg), _lora_config(lora), adapter_name="decoder")
        opt = torch.optim.AdamW([p for p in decoder.parameters() if p.requires_grad], lr=1e-4)
        decoder.train()
        for _ in range(steps):
            with torch.no_grad():
                base(
                    input_ids=batch.read_ids,
                    attention_mask=batch.read_attention,
                    output_hidden_states=True,
                    use_cache=False,
                )
            loss_of(decoder, batch.write_ids, batch.write_attention, batch.labels).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    else:
        raise ValueError(f"unknown memory setup {setup!r}")
    return {"setup": setup, "peak_rss_mb": _rss_mb(), "after_import_mb": after_import, "base_parameters": n_params}


def memory(
    repeats: int,
    size: ModelSize = MEMORY_DEFAULT,
    read_layer: int | None = None,
    limit: float = 1.15,
    config=None,
    batch_size: int = 4,
) -> dict:
    """Peak RSS of the engine's training setup vs one base model + adapter + optimizer, each in a
    fresh subprocess (interleaved: engine, floor, two copies, engine, ...); also vs two copies.
    The model: a random Llama of `size` on a synthetic batch of one example; or, given a LatentQA
    `config`, its model (on the CPU) and LoRA settings on `batch_size` of its training examples."""
    from latentqa.config import load_config
    from latentqa.session import layout_for

    with tempfile.TemporaryDirectory() as tmp:
        if config is None:
            vocab = size.vocab or 32000
            model_dir = write_model_dir(size, vocab, Path(tmp) / "model")
            model = {"path": str(model_dir), "weights": "random", "device": "cpu"}
            layer = size.layers // 2 if read_layer is None else read_layer
            config = load_config(overrides={"model": model, "patch": {"read_layer": layer}})
            batch = _synthetic_batch(vocab, 1, 32, 24, 8)
        else:
            config = config.model_copy(update={"model": config.model.model_copy(update={"device": "cpu"})})
            batch = example_batch(layout_for(config), config.data.train, batch_size)
        config_file, batch_file = Path(tmp) / "config.json", Path(tmp) / "batch.pt"
        config_file.write_text(config.model_dump_json())
        torch.save(vars(batch), batch_file)
        peaks: dict[str, list[dict]] = {"engine": [], "base+adapter": [], "two copies": []}
        for _ in range(repeats):
            for setup in peaks:
                env = {
                    **os.environ,
                    "PYTHONPATH": os.pathsep.join([str(PROJECT_ROOT / "platform"), os.environ.get("PYTHONPATH", "")]),
                }
                out = subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "latentqa_platform.benchmarks",
                        "memory-setup",
                        setup,
                        str(config_file),
                        str(batch_file),
                    ],
                    capture_output=True,
                    text=True,
                    env=env,
                    check=False,
                )
                if out.returncode != 0:
                    raise RuntimeError(f"memory setup {setup!r} failed:\n{out.stderr[-3000:]}")
                peaks[setup].append(json.loads(out.stdout.strip().splitlines()[-1]))
    engine = [p["peak_rss_mb"] for p in peaks["engine"]]
    floor = [p["peak_rss_mb"] for p in peaks["base+adapter"]]
    two = [p["peak_rss_mb"] for p in peaks["two copies"]]
    ratio = paired_ratio(engine, floor)
    imports = statistics.median(p["after_import_mb"] for v in peaks.values() for p in v)
    net_floor = [f - imports for f in floor]
    net = paired_ratio([e - imports for e in engine], net_floor) if min(net_floor) > 0 else None
    return row(
        "memory",
        statistics.median(engine),
        statistics.median(floor),
        "MB peak RSS",
        ratio,
        f"<= {limit:g}x",
        ratio <= limit,
        measured_is="engine (one base, target + decoder + AdamW)",
        baseline_is="one base + adapter + AdamW",
        base_parameters=peaks["engine"][0]["base_parameters"],
        two_copies_mb=statistics.median(two),
        ratio_vs_two_copies=paired_ratio(engine, two),
        after_import_mb=imports,
        net_ratio_above_imports=net,
        read_layer=config.patch.read_layer,
        batch_tokens=int(batch.read_attention.sum() + batch.write_attention.sum()),
        repeats=repeats,
    )


# ---------------------------------------------------------------- 3b. FSDP2 loading (fresh rank processes)

LOADING_WORLD = 2
LOADING_WAYS = {
    "whole": "every rank loads the whole model, then shards it",
    "rank0": "Strategy.model_loading: rank 0 loads it, the other rank gets its shards",
}
LOADING_DTYPES = {  # the model's dtype; the checkpoint is fp32
    "float32": "fp32 model: the checkpoint's own tensors, mapped from the file and read lazily",
    "bfloat16": "bf16 model: converted while loading, so held whole in memory",
}


class _ResidentPeaks(threading.Thread):
    """Peaks of this process's private (RssAnon) and file-backed (RssFile: the mapped checkpoint)
    resident memory in MiB, sampled by a thread; the kernel keeps only the peak of their sum."""

    def __init__(self, interval: float = 0.002):
        super().__init__(daemon=True)
        self.interval, self.private, self.mapped = interval, 0.0, 0.0
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            private, mapped = _status_mb("RssAnon", "RssFile")
            self.private, self.mapped = max(self.private, private), max(self.mapped, mapped)


def fsdp_loading_rank(way: str, dtype: str, model_dir: str, rank: int, rendezvous: str) -> dict:
    """One rank of a 2-rank FSDP2 run (gloo, CPU), in this fresh process: load the pretrained
    model as `dtype` in `way` and shard it (`prepare`). Its peak resident memory by then above
    what it held after its imports (RSS; private; the checkpoint's mapped pages), and the train
    objective of the sharded model on one example (eval mode: no dropout)."""
    import torch.distributed as dist

    from latentqa.config import load_config
    from latentqa.data import load_examples
    from latentqa.paths import OFFLINE_MODEL
    from latentqa.session import LatentQA
    from latentqa.strategy import Strategy, StrategyConfig
    from latentqa.training import adamw_factory

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=LOADING_WORLD)
    try:
        after_import, (private_after_import, mapped_after_import) = _rss_mb(), _status_mb("RssAnon", "RssFile")
        peaks = _ResidentPeaks()
        peaks.start()
        model = {"path": model_dir, "tokenizer": str(OFFLINE_MODEL), "weights": "pretrained", "dtype": dtype}
        data = {"train": {"path": str(OFFLINE_TRAIN)}, "eval": None}
        config = load_config(overrides={"model": {**model, "device": "cpu"}, "data": data})
        strategy = Strategy.create(StrategyConfig(kind="fsdp"))
        torch.manual_seed(0)
        with strategy.model_loading() if way == "rank0" else contextlib.nullcontext():
            lqa = LatentQA.load(config, train_decoder=True)
        strategy.prepare(lqa.model, adamw_factory(config.train))
        peak = _rss_mb()
        peaks.stopped.set()
        peaks.join()
        batch = lqa.collate(lqa.lay_out(load_examples(config.data.train)[:1], "train"))
        with torch.no_grad():
            loss = strategy.all_reduce_mean(strategy.model(batch, config.patch.read_layer, True).item())
    finally:
        dist.destroy_process_group()
    return {
        "rss_mb": peak - after_import,
        "private_mb": peaks.private - private_after_import,
        "mapped_mb": peaks.mapped - mapped_after_import,
        "after_import_mb": after_import,
        "loss": loss,
    }


def _fsdp_loading_run(way: str, dtype: str, model_dir: Path, rendezvous: Path) -> list[dict]:
    """Both ranks of one run, each a fresh process (no peak carries over); their results by rank."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(PROJECT_ROOT / "platform"), os.environ.get("PYTHONPATH", "")]),
    }
    command = [sys.executable, "-m", "latentqa_platform.benchmarks", "fsdp-loading-rank", way, dtype, str(model_dir)]
    ranks = [
        subprocess.Popen(
            [*command, str(rank), f"file://{rendezvous}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for rank in range(LOADING_WORLD)
    ]
    results = []
    for rank, process in enumerate(ranks):
        stdout, stderr = process.communicate()
        if process.returncode != 0:
            raise RuntimeError(f"fsdp loading {way!r} ({dtype}), rank {rank} failed:\n{stderr[-3000:]}")
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    return results


def fsdp_loading(repeats: int, size: ModelSize = MEMORY_DEFAULT) -> list[dict]:
    """Peak resident memory of each rank while 2 FSDP2 ranks (gloo, CPU) load a pretrained model of
    `size` (an fp32 safetensors checkpoint) and shard it: rank 0 loading it and sending the other
    rank its shards (`Strategy.model_loading`) against every rank loading it whole, as before.
    Net of the process's size after its imports, in ratios to the model's bytes; one row per
    model dtype and rank. The ways and dtypes alternate, `repeats` runs each, medians. Also the
    train objective after each way, which must not change."""
    from latentqa.config import ModelConfig
    from latentqa.models import load_base

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_model_dir(size, size.vocab or 32000, Path(tmp) / "model")
        base = load_base(ModelConfig(path=str(model_dir), weights="random", device="cpu"))
        parameters = sum(p.numel() for p in base.parameters())  # tied embeddings: once
        base.save_pretrained(model_dir)
        del base
        runs: dict[tuple[str, str], list[list[dict]]] = {(d, w): [] for d in LOADING_DTYPES for w in LOADING_WAYS}
        for repeat in range(repeats):
            for dtype, way in runs:
                rendezvous = Path(tmp) / f"rendezvous-{dtype}-{way}-{repeat}"
                runs[dtype, way].append(_fsdp_loading_run(way, dtype, model_dir, rendezvous))
    rows = []
    for dtype, loaded_as in LOADING_DTYPES.items():
        model_mb = parameters * torch.finfo(getattr(torch, dtype)).bits / 8 / 2**20
        pairs = zip(runs[dtype, "rank0"], runs[dtype, "whole"])
        loss_gap = max(abs(new[0]["loss"] - old[0]["loss"]) for new, old in pairs)
        for rank in range(LOADING_WORLD):
            rss, private, mapped = (
                {w: [r[rank][key] for r in runs[dtype, w]] for w in LOADING_WAYS}
                for key in ("rss_mb", "private_mb", "mapped_mb")
            )
            # What the rank must hold: rank 0 reads the whole model, the other rank its shard.
            limit = (1.0 if rank == 0 else 1 / LOADING_WORLD) + 0.25
            private_to_model = {way: statistics.median(mb) / model_mb for way, mb in private.items()}
            rows.append(
                row(
                    f"fsdp loading {dtype} rank {rank}",
                    statistics.median(rss["rank0"]),
                    statistics.median(rss["whole"]),
                    "MB peak RSS above imports",
                    paired_ratio(rss["rank0"], rss["whole"]),
                    f"private peak <= {limit:g}x the model",
                    private_to_model["rank0"] <= limit,
                    measured_is=LOADING_WAYS["rank0"],
                    baseline_is=LOADING_WAYS["whole"],
                    model=loaded_as,
                    model_mb=model_mb,
                    parameters=parameters,
                    shard_to_model=1 / LOADING_WORLD,
                    rss_to_model={way: statistics.median(mb) / model_mb for way, mb in rss.items()},
                    private_to_model=private_to_model,
                    mapped_to_model={way: statistics.median(mb) / model_mb for way, mb in mapped.items()},
                    after_import_mb=statistics.median(run[rank]["after_import_mb"] for run in runs[dtype, "whole"]),
                    max_loss_difference=loss_gap,
                    repeats=repeats,
                )
            )
    return rows


# ---------------------------------------------------------------- 6. Ray Train overhead


def _train_step_times(ctx: dict) -> list[float]:
    """The engine's `fit` loop for ctx["steps"] steps; seconds between optimizer steps."""
    from latentqa.config import LatentQAConfig
    from latentqa.session import LatentQA
    from latentqa.strategy import Strategy, StrategyConfig
    from latentqa.training import StepPlan, TrainProgress, adamw_factory, fit

    torch.set_num_threads(ctx["threads"])
    config = LatentQAConfig.model_validate_json(ctx["config"])
    torch.manual_seed(0)
    strategy = Strategy.create(StrategyConfig(kind=ctx["kind"]))
    lqa = LatentQA.load(config, train_decoder=True)
    strategy.prepare(lqa.model, adamw_factory(config.train))
    batches = [train_batch(lqa, config.train.batch_size, seed=s) for s in range(4)]
    stamps = [time.perf_counter()]

    def epoch_batches(epoch: int, skip: int):
        for i in range(skip, ctx["steps"]):
            yield batches[i % len(batches)].to(strategy.device)

    fit(
        strategy,
        epoch_batches,
        StepPlan(ctx["steps"], ctx["steps"]),
        config.train,
        config.patch,
        TrainProgress(),
        on_step=lambda progress, metrics: stamps.append(time.perf_counter()),
    )
    return [b - a for a, b in zip(stamps, stamps[1:])]


def _ray_worker(ctx: dict) -> None:
    import ray.train

    times = _train_step_times(ctx)
    if ray.train.get_context().get_world_rank() == 0:
        Path(ctx["out"]).write_text(json.dumps(times))


def ray_overhead(config, repeats: int, steps: int = 12, warmup: int = 3, threads: int = 1, limit: float = 1.1) -> dict:
    """Steady-state step time of the engine's `fit` under Ray Train (1 worker, ddp as the job
    runs it) vs the same loop in this process (local strategy), same batch and torch threads.
    Rounds alternate Ray, local, Ray, local; the first `warmup` steps of each run are dropped."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    config = config.model_copy(deep=True)
    config.train.max_steps = steps
    config.train.epochs = 10**6
    base_ctx = {"config": config.model_dump_json(), "steps": steps, "threads": threads}
    ray_medians, local_medians = [], []
    with tempfile.TemporaryDirectory(prefix="latentqa-bench-ray-") as storage:
        for r in range(repeats):
            out = Path(storage) / f"times-{r}.json"
            trainer = TorchTrainer(
                _ray_worker,
                train_loop_config={**base_ctx, "kind": "ddp", "out": str(out)},
                scaling_config=ScalingConfig(num_workers=1, use_gpu=False, resources_per_worker={"CPU": 1}),
                run_config=RunConfig(name=f"bench-{os.getpid()}-{r}", storage_path=storage),
            )
            trainer.fit()
            ray_medians.append(statistics.median(json.loads(out.read_text())[warmup:]))
            previous = torch.get_num_threads()
            try:
                local_medians.append(statistics.median(_train_step_times({**base_ctx, "kind": "local"})[warmup:]))
            finally:
                torch.set_num_threads(previous)
    ratio = paired_ratio(ray_medians, local_medians)
    return row(
        "Ray Train overhead",
        statistics.median(ray_medians),
        statistics.median(local_medians),
        "s/step",
        ratio,
        f"<= {limit:g}x",
        ratio <= limit,
        measured_is="fit under Ray Train, 1 worker (ddp)",
        baseline_is="fit in one process (local)",
        steps=steps,
        warmup_steps=warmup,
        threads=threads,
        batch_size=config.train.batch_size,
        repeats=repeats,
        measured_all=ray_medians,
        baseline_all=local_medians,
        ray_initialized=ray.is_initialized(),
    )


def start_ray(num_cpus: int = 4) -> None:
    """One local cluster (num_cpus > cores on purpose: Ray Data must not starve, PLATFORM-NOTES)."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    path = os.pathsep.join([str(PROJECT_ROOT), str(PROJECT_ROOT / "platform")])
    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": path}},
    )


# ---------------------------------------------------------------- GPU preset (one shot)


def gpu_preset(
    size: ModelSize,
    device: str,
    repeats: int,
    tokenizer: Path,
    batch_size: int = 4,
    read_layer: int = 15,
    peak_tflops: float = 989.0,
    dtype: str = "bfloat16",
) -> list[dict]:
    """A randomly initialised model of `size` (e.g. Llama-3-8B) in `dtype` on `device`: train-step
    tokens/s and model FLOPs utilisation, read latency (1 dialog x 15 questions x 64 tokens) and
    peak device memory. FLOPs per step (matmuls only; B the blocks' weights, H the LM head's):
    2*B*(L+1)/N per target token (no head), plus 4*B per decoder token and 4*H per label token
    (forward and the input-gradient backward; the LoRA weight gradients are negligible)."""
    from latentqa.layout import IGNORE_INDEX
    from latentqa.reading import read
    from latentqa.session import LatentQA
    from latentqa.strategy import Strategy
    from latentqa.training import adamw_factory, strategy_config, train_step

    cuda = device.startswith("cuda")
    with tempfile.TemporaryDirectory() as tmp:
        vocab = vocabulary_size(tokenizer)
        model_dir = write_model_dir(size, vocab, Path(tmp))
        layer = min(read_layer, size.layers - 1)
        config = engine_config(model_dir, tokenizer, layer, device=device, dtype=dtype, batch_size=batch_size)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        lqa = LatentQA.load(config, train_decoder=True)
    strategy = Strategy.create(strategy_config(config, "local"))
    strategy.prepare(lqa.model, adamw_factory(config.train))
    batch = train_batch(lqa, batch_size)
    params = sum(p.numel() for n, p in lqa.model.peft_model.named_parameters() if "lora_" not in n)
    causal = lqa.model.peft_model.get_base_model()
    embed = causal.get_input_embeddings().weight.numel()
    head = causal.get_output_embeddings().weight.numel()
    block_params = params - embed - (0 if size.tie_embeddings else head)  # the embedding is a lookup, not a matmul
    read_tokens, write_tokens = int(batch.read_attention.sum()), int(batch.write_attention.sum())
    label_tokens = int((batch.labels[:, 1:] != IGNORE_INDEX).sum())  # the engine runs the head on these only
    flops = 2 * block_params * read_tokens * (layer + 1) / size.layers + 4 * (
        block_params * write_tokens + head * label_tokens
    )

    def step():
        strategy.model.train()
        train_step(strategy, batch, layer, True)
        strategy.optimizer_step()

    step_times = interleaved({"step": step}, repeats, warmup=2)["step"]
    t_step = statistics.median(step_times)
    fast = no_stop(lqa)
    read_times = interleaved({"read": lambda: read(fast, [DIALOG], QUESTIONS, max_new_tokens=64)}, repeats)["read"]
    peak_mb = torch.cuda.max_memory_allocated() / 2**20 if cuda else _rss_mb()
    achieved = flops / t_step
    return [
        row(
            "gpu train step",
            (read_tokens + write_tokens) / t_step,
            None,
            "tokens/s",
            None,
            "report",
            None,
            step_s=t_step,
            batch_size=batch_size,
            read_layer=layer,
            parameters=params,
            dtype=dtype,
            device=device,
        ),
        row(
            "gpu MFU",
            achieved / 1e12,
            peak_tflops,
            "TFLOP/s",
            achieved / (peak_tflops * 1e12),
            "report",
            None,
            flops_per_step=flops,
        ),
        row(
            "gpu read latency",
            statistics.median(read_times),
            None,
            "s (1 dialog x 15 q x 64 tokens)",
            None,
            "report",
            None,
        ),
        row("gpu peak memory", peak_mb, None, "MiB" + (" allocated" if cuda else " RSS"), None, "report", None),
    ]


# ---------------------------------------------------------------- reports


def format_figure(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def print_row(r: dict) -> dict:
    """One figure as a line, as soon as it is measured."""
    figures = {k: format_figure(r[k]) for k in ("measured", "baseline", "ratio", "met")}
    print(
        f"{r['name']}: measured {figures['measured']} vs baseline {figures['baseline']} {r['unit']}, "
        f"ratio {figures['ratio']} (target {r['target']}: {figures['met']})",
        flush=True,
    )
    return r


def write_results(out: Path, command: str, info: dict, seconds: float, args: dict, rows: list[dict]) -> list[Path]:
    """`results.json`, `results.md` and (with matplotlib) `ratios.png` in `out`."""
    result = {"command": command, "machine": info, "seconds": seconds, "args": args, "results": rows}
    (out / "results.json").write_text(json.dumps(result, indent=2, default=str))
    table = markdown_table(rows)
    (out / "results.md").write_text(
        f"# Benchmarks\n\n`{command}` in {seconds:.0f} s on {json.dumps(info)}\n\n{table}\n"
    )
    picture = plot(rows, out)
    return [out / "results.json", out / "results.md", *([picture] if picture else [])]


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| figure | measured | baseline | unit | ratio | target | met |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            "| "
            + " | ".join(
                format_figure(r[k]) for k in ("name", "measured", "baseline", "unit", "ratio", "target", "met")
            )
            + " |"
        )
    return "\n".join(lines)


def machine() -> dict:
    import platform

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average_at_start": load,
    }


def plot(rows: list[dict], out: Path) -> Path | None:
    """Per-repeat ratios of every timed figure: a strip per figure, a bar at its median."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    timed = [r for r in rows if r["details"].get("measured_all") and r["details"].get("baseline_all")]
    if not timed:
        return None
    fig, ax = plt.subplots(figsize=(7, 0.6 + 0.5 * len(timed)))
    for i, r in enumerate(timed):
        ratios = [m / b for m, b in zip(r["details"]["measured_all"], r["details"]["baseline_all"])]
        ax.scatter(ratios, [i] * len(ratios), s=12, alpha=0.6)
        ax.scatter([r["ratio"]], [i], marker="|", s=300, color="black")
    ax.set_yticks(range(len(timed)), [r["name"] for r in timed])
    ax.set_xlabel("measured / baseline, per repeat (bar: median)")
    fig.tight_layout()
    fig.savefig(out / "ratios.png", dpi=120)
    plt.close(fig)
    return out / "ratios.png"


if __name__ == "__main__":  # the memory subprocesses
    if sys.argv[1] == "memory-setup":
        print(json.dumps(memory_setup(*sys.argv[2:5])))
    elif sys.argv[1] == "fsdp-loading-rank":
        print(json.dumps(fsdp_loading_rank(*sys.argv[2:5], int(sys.argv[5]), sys.argv[6])))
