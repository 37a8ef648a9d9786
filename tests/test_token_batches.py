"""Token-budget batches (`train.batch_tokens`): what they hold, that ranks can agree on their
count, that the fixed-count order of existing runs is unchanged, and that an example's loss does
not depend on the batch it lands in."""

from __future__ import annotations

import random

import pytest
import torch

from latentqa.config import TrainConfig
from latentqa.paths import OFFLINE_TRAIN
from latentqa.training import (
    ExampleSize,
    StepPlan,
    length_grouped_order,
    padded_tokens,
    ranks_batches_per_epoch,
    sort_window,
    split_to,
)


def _sizes(n: int = 700, seed: int = 0) -> list[ExampleSize]:
    """Read and write lengths that vary independently, as a dialog's and its question's do."""
    rng = random.Random(seed)
    return [ExampleSize(rng.randint(30, 270), rng.randint(90, 240)) for _ in range(n)]


def _padding_share(sizes: list[ExampleSize], batches: list[list[int]]) -> float:
    padded = sum(padded_tokens([sizes[i] for i in batch]) for batch in batches)
    return 1 - sum(s.total for s in sizes) / padded


def test_budget_batches_hold_every_example_once_within_the_budget():
    sizes, train = _sizes(), TrainConfig(batch_size=8, batch_tokens=2400)
    batches = length_grouped_order(sizes, train, seed=3)
    assert sorted(i for batch in batches for i in batch) == list(range(len(sizes)))
    assert all(padded_tokens([sizes[i] for i in batch]) <= 2400 for batch in batches)
    assert len({len(batch) for batch in batches}) > 3  # short examples come many to a batch, long ones few
    assert batches == length_grouped_order(sizes, train, seed=3)  # deterministic, so resumable
    assert batches != length_grouped_order(sizes, train, seed=4)
    # An example longer than the budget alone is a batch of one, not an error.
    alone = length_grouped_order([ExampleSize(500, 500), *sizes[:20]], TrainConfig(batch_tokens=900), seed=0)
    assert [0] in alone


def test_budget_batches_pad_far_less_than_fixed_count_batches():
    sizes = _sizes(2048)
    fixed = length_grouped_order(sizes, TrainConfig(batch_size=8), seed=0)
    budget = length_grouped_order(sizes, TrainConfig(batch_size=8, batch_tokens=2400), seed=0)
    fixed_share, budget_share = _padding_share(sizes, fixed), _padding_share(sizes, budget)
    print(f"padding: fixed-count {fixed_share:.3f}, token budget {budget_share:.3f}")
    assert budget_share < 0.06 < 0.15 < fixed_share


def test_the_fixed_count_order_of_existing_runs_is_unchanged():
    """A run resumes by skipping the batches it did: the order without a budget must stay the
    one earlier versions drew (sorted by the longer side in windows of 64 batches)."""
    sizes, train = _sizes(1100), TrainConfig(batch_size=8)
    rng = random.Random("7/1/0")
    order = list(range(len(sizes)))
    rng.shuffle(order)
    expected = []
    for start in range(0, len(order), 512):
        chunk = sorted(order[start : start + 512], key=lambda i: max(sizes[i].read, sizes[i].write))
        expected += [chunk[i : i + 8] for i in range(0, len(chunk), 8)]
    rng.shuffle(expected)
    assert sort_window(train) == 512
    assert length_grouped_order(sizes, train, seed="7/1/0") == expected


def test_split_to_halves_the_costliest_batches_until_ranks_agree():
    sizes = _sizes(60)
    batches = length_grouped_order(sizes, TrainConfig(batch_size=4, batch_tokens=2000), seed=0)
    costliest = max(batches, key=lambda b: padded_tokens([sizes[i] for i in b]))
    split = split_to(batches, sizes, len(batches) + 1)
    assert len(split) == len(batches) + 1
    half = len(costliest) // 2
    assert costliest[:half] in split and costliest[half:] in split and costliest not in split
    more = split_to(batches, sizes, 60)
    assert sorted(i for b in more for i in b) == list(range(60)) and all(len(b) == 1 for b in more)
    assert split_to(batches, sizes, 2) == batches  # never fewer: a rank with more keeps its own
    with pytest.raises(ValueError, match="60 examples cannot make 61 batches"):
        split_to(batches, sizes, 61)


def test_the_step_plan_counts_every_epoch_and_estimates_ranks_windows():
    budget = TrainConfig(batch_size=8, batch_tokens=2400, epochs=2, grad_accum=2)
    plan = StepPlan.of([9, 10], budget)  # epochs of 9 and 10 micro-batches, 2 a step
    assert (plan.steps_per_epoch, plan.total_steps) == (5, 10)
    assert StepPlan.of([9, 10], budget.model_copy(update={"max_steps": 3})).total_steps == 3
    # Ray's workers cut their own windows, whose examples Ray's split draws: whichever deal it
    # makes, the epoch's agreed count (each window's largest) is within a few batches of the estimate.
    sizes, ranks = _sizes(6000), 2
    estimate = ranks_batches_per_epoch(sizes, budget, ranks)
    window, per_rank = sort_window(budget), len(sizes) // ranks
    for deal in range(3):
        order = list(range(len(sizes)))
        random.Random(f"ray-{deal}").shuffle(order)
        shards = [order[r * per_rank : (r + 1) * per_rank] for r in range(ranks)]
        agreed = sum(
            max(len(length_grouped_order([sizes[i] for i in s[w : w + window]], budget, deal)) for s in shards)
            for w in range(0, per_rank, window)
        )
        assert abs(agreed - estimate) <= 0.02 * estimate, (agreed, estimate)
    assert ranks_batches_per_epoch(sizes, TrainConfig(batch_size=8), ranks) == 375  # exact without a budget


def test_an_example_loses_the_same_in_any_batch(offline_session):
    """Per example, the decoder's loss with true activations is the same alone, in today's
    fixed-count batch and in a token-budget batch (left padding changes nothing)."""
    lqa = offline_session
    laid = lqa.lay_out(_examples(lqa), "train")
    sizes = [ExampleSize.of(e) for e in laid]
    layer = lqa.config.patch.read_layer

    def per_example(batches: list[list[int]]) -> dict[int, float]:
        losses = {}
        with torch.no_grad(), lqa.model.evaluating():
            for indices in batches:
                batch = lqa.collate([laid[i] for i in indices])
                acts = lqa.model.target_activations(batch, [layer])[layer]
                losses.update(zip(indices, lqa.model.example_losses(batch, acts, True).tolist(), strict=True))
        return losses

    fixed = per_example(length_grouped_order(sizes, TrainConfig(batch_size=8), seed=0))
    budget_batches = length_grouped_order(sizes, TrainConfig(batch_size=8, batch_tokens=1200), seed=0)
    assert any(len(b) > 8 for b in budget_batches) or any(len(b) < 8 for b in budget_batches[:-1])
    budget = per_example(budget_batches)
    alone = per_example([[i] for i in range(len(laid))])
    assert fixed.keys() == budget.keys() == alone.keys()
    for i in alone:
        assert budget[i] == pytest.approx(alone[i], rel=1e-4, abs=1e-5)
        assert fixed[i] == pytest.approx(alone[i], rel=1e-4, abs=1e-5)


def _examples(lqa):
    from latentqa.data import load_examples

    examples = load_examples(lqa.config.data.train)
    random.Random(0).shuffle(examples)
    return examples[:24]


def test_the_resume_check_covers_the_token_budget_and_the_mix():
    from latentqa.config import load_config
    from latentqa.training import strategy_config
    from latentqa_platform.raytrain import WorkerPlan
    from latentqa_platform.settings import RaySettings

    def plan(data: dict | None = None, **train) -> WorkerPlan:
        config = load_config(overrides={"train": train, **({"data": data} if data else {})})
        steps = StepPlan.of([10], config.train)
        return WorkerPlan(
            config=config,
            strategy=strategy_config(config, "ddp"),
            steps=steps,
            ray=RaySettings(),
            mlflow=None,
            train_files={},
        )

    before, after = plan().data_order(), plan(batch_tokens=560).data_order()
    assert [key for key in after if after[key] != before[key]] == ["batch tokens"]
    # A training mix is part of the order (absent without one: older checkpoints still resume).
    source = {"kind": "yes_no", "path": str(OFFLINE_TRAIN / "system.json"), "examples": 8}
    mixed = plan(data={"mix": [source]}).data_order()
    assert "mix" not in before and mixed["mix"][0]["examples"] == 8
    assert plan(data={"mix": [{**source, "examples": 9}]}).data_order()["mix"] != mixed["mix"]
