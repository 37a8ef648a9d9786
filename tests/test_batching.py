"""The read batcher (`latentqa_platform.batching`) on a plain event loop, with a fake worker that
records its batches: no Ray, no model."""

import asyncio

import pytest

from latentqa_platform.batching import Batcher


class Worker:
    """Answers each item with itself doubled after `seconds` (and, given `gate`, once the gate is
    open); records the batches it got."""

    def __init__(self, seconds: float = 0.05, fail_on=None, gate: asyncio.Event | None = None):
        self.seconds, self.fail_on, self.gate, self.batches = seconds, fail_on, gate, []

    async def __call__(self, items: list) -> list:
        self.batches.append(list(items))
        await asyncio.sleep(self.seconds)
        if self.gate is not None:
            await self.gate.wait()
        if self.fail_on in items:
            raise ValueError(f"bad item {self.fail_on}")
        return [2 * item for item in items]


def test_a_lone_item_on_an_idle_worker_starts_at_once():
    async def main():
        batcher = Batcher(Worker(0.0), max_size=8, wait_s=10.0)
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await batcher(3) == 6
        assert await batcher(4) == 8  # a lone caller coming back: still no wait
        return loop.time() - started

    assert asyncio.run(main()) < 1.0


def test_items_that_queue_while_a_batch_runs_are_the_next_batch_at_once():
    """The callers of a batch of 16 come back one by one, over six times the batch wait, while a
    lone read runs: they form one batch, not a batch per timer (Serve's @serve.batch would close
    one every 5 ms here)."""

    async def main():
        gate = asyncio.Event()
        worker = Worker(0.0, gate=gate)
        batcher = Batcher(worker, max_size=16, wait_s=0.005)
        first = asyncio.create_task(batcher(-1))
        await asyncio.sleep(0.01)  # the lone item is running, held at the gate
        rest = []
        for i in range(16):
            rest.append(asyncio.create_task(batcher(i)))
            await asyncio.sleep(0.002)
        gate.set()
        assert await first == -2
        assert await asyncio.gather(*rest) == [2 * i for i in range(16)]
        return worker.batches

    assert asyncio.run(main()) == [[-1], list(range(16))]


def test_after_a_full_batch_an_idle_worker_waits_for_its_callers_up_to_wait_s():
    async def main():
        worker = Worker(0.0)
        batcher = Batcher(worker, max_size=4, wait_s=0.3)
        await asyncio.gather(*(batcher(i) for i in range(4)))  # a batch of four
        loop = asyncio.get_running_loop()
        started = loop.time()
        comeback = [asyncio.create_task(batcher(10))]
        await asyncio.sleep(0.05)
        comeback += [asyncio.create_task(batcher(i)) for i in (11, 12, 13)]  # the batch fills: no more wait
        await asyncio.gather(*comeback)
        filled = loop.time() - started
        started = loop.time()
        await asyncio.gather(batcher(20), batcher(21))  # two of four: the wait runs out
        return worker.batches, filled, loop.time() - started

    batches, filled, timed_out = asyncio.run(main())
    assert batches == [[0, 1, 2, 3], [10, 11, 12, 13], [20, 21]]
    assert filled < 0.25 and 0.25 < timed_out < 1.0, (filled, timed_out)


def test_batches_hold_at_most_max_size_items_in_arrival_order():
    async def main():
        worker = Worker(0.02)
        batcher = Batcher(worker, max_size=3, wait_s=0.0)
        return await asyncio.gather(*(batcher(i) for i in range(8))), worker.batches

    results, batches = asyncio.run(main())
    assert results == [2 * i for i in range(8)]
    assert batches == [[0, 1, 2], [3, 4, 5], [6, 7]]


def test_a_cancelled_caller_is_left_out_and_a_failing_batch_fails_only_its_callers():
    async def main():
        worker = Worker(0.05, fail_on=1)
        batcher = Batcher(worker, max_size=2, wait_s=0.0)
        running = asyncio.create_task(batcher(0))
        await asyncio.sleep(0.01)
        gone = asyncio.create_task(batcher(5))  # queued behind the running batch, then its client leaves
        await asyncio.sleep(0)
        gone.cancel()
        failing = [asyncio.create_task(batcher(i)) for i in (1, 2)]
        after = asyncio.create_task(batcher(3))
        outcomes = await asyncio.gather(running, *failing, after, return_exceptions=True)
        return outcomes, worker.batches

    outcomes, batches = asyncio.run(main())
    assert outcomes[0] == 0 and outcomes[3] == 6
    assert all(isinstance(o, ValueError) and "bad item 1" in str(o) for o in outcomes[1:3]), outcomes
    assert 5 not in [item for batch in batches for item in batch]
    assert batches == [[0], [1, 2], [3]]


def test_a_stopped_worker_leaves_no_caller_waiting():
    """A batch interrupted by something other than an error (the worker task cancelled, as when
    the replica stops): its callers and those queued behind it get an error, not a wait forever."""

    async def main():
        async def cancelled(items):
            raise asyncio.CancelledError

        batcher = Batcher(cancelled, max_size=1, wait_s=0.0)
        callers = [asyncio.create_task(batcher(i)) for i in range(3)]
        return await asyncio.wait_for(asyncio.gather(*callers, return_exceptions=True), 5)

    outcomes = asyncio.run(main())
    assert all(isinstance(o, RuntimeError) and "worker stopped" in str(o) for o in outcomes), outcomes


@pytest.mark.parametrize("max_size", [1, 4])
def test_every_caller_gets_its_own_answer_under_load(max_size):
    async def main():
        batcher = Batcher(Worker(0.001), max_size=max_size, wait_s=0.01)

        async def client(c: int) -> list:
            return [await batcher(100 * c + i) for i in range(10)]

        return await asyncio.gather(*(client(c) for c in range(16)))

    answers = asyncio.run(main())
    assert answers == [[2 * (100 * c + i) for i in range(10)] for c in range(16)]
