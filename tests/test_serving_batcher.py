"""MicroBatcher on its own: grouping, limits, withdrawal and draining, with a fake model that records batches."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from serving.batcher import Closed, MicroBatcher, QueueFull


class Recorder:
    """A 'model' returning each row's sum and remembering the batch sizes it was called with."""

    def __init__(self, delay: float = 0.0) -> None:
        self.sizes: list[int] = []
        self.delay = delay

    def run(self, x: np.ndarray) -> np.ndarray:
        time.sleep(self.delay)
        self.sizes.append(len(x))
        return x.reshape(len(x), -1).sum(axis=1, keepdims=True)


def rows(*values: float) -> np.ndarray:
    return np.array(values, np.float32).reshape(-1, 1)


def run(coro):
    return asyncio.run(coro)


def test_concurrent_requests_share_batches_up_to_max_batch_and_get_their_own_rows():
    async def main():
        model, b = Recorder(), MicroBatcher(max_batch=4, max_wait_s=0.05, max_queue=100)
        await b.start()
        outs = await asyncio.gather(*(b.submit(model, rows(i)) for i in range(10)))
        await b.close()
        return model, outs

    model, outs = run(main())
    assert [float(y[0, 0]) for y, _ in outs] == list(range(10))
    assert max(model.sizes) == 4 and sum(model.sizes) == 10 and len(model.sizes) == 3


class Gated(Recorder):
    """A Recorder whose first run waits until released: what queues meanwhile shows how batches form."""

    def __init__(self) -> None:
        super().__init__()
        self.started, self.gate = threading.Event(), threading.Event()
        self.rows: list[list[float]] = []

    def run(self, x: np.ndarray) -> np.ndarray:
        if not self.sizes:
            self.started.set()
            self.gate.wait(10)
        self.rows.append(x.ravel().tolist())
        return super().run(x)


def test_a_lone_request_runs_at_once_and_requests_that_wait_meanwhile_share_the_next_run():
    async def main():
        model, b = Gated(), MicroBatcher(max_batch=8, max_wait_s=0, max_queue=10)
        await b.start()
        first = asyncio.create_task(b.submit(model, rows(1)))
        while not model.started.is_set():  # taken at once, alone: nothing waits for company
            await asyncio.sleep(0.001)
        later = [asyncio.create_task(b.submit(model, rows(v))) for v in (2, 3, 4)]
        while b.depth < 3:
            await asyncio.sleep(0.001)
        model.gate.set()
        await asyncio.gather(first, *later)
        await b.close()
        return model

    assert run(main()).rows == [[1], [2, 3, 4]]


def test_a_request_larger_than_max_batch_runs_in_pieces_taking_turns_with_a_small_one():
    async def main():
        model, b = Gated(), MicroBatcher(max_batch=2, max_wait_s=0, max_queue=10)
        await b.start()
        big = asyncio.create_task(b.submit(model, rows(1, 2, 3, 4, 5)))
        while not model.started.is_set():
            await asyncio.sleep(0.001)
        small = asyncio.create_task(b.submit(model, rows(9)))
        while not b.depth:
            await asyncio.sleep(0.001)
        model.gate.set()
        (y, _), _ = await asyncio.gather(big, small)
        await b.close()
        return model, y

    model, y = run(main())
    assert y.ravel().tolist() == [1, 2, 3, 4, 5]  # the pieces' outputs joined in order
    assert max(model.sizes) == 2  # never a run larger than max_batch
    assert model.rows == [[1, 2], [9], [3, 4], [5]]  # the small request ran after one piece, not after all


def test_jobs_for_different_models_never_share_a_batch():
    async def main():
        a, c = Recorder(), Recorder()
        b = MicroBatcher(max_batch=8, max_wait_s=0.05, max_queue=10)
        await b.start()
        outs = await asyncio.gather(b.submit(a, rows(1)), b.submit(c, rows(2)), b.submit(a, rows(3)))
        await b.close()
        return a, c, outs

    a, c, outs = run(main())
    assert a.sizes == [2] and c.sizes == [1]
    assert [m for _, m in outs] == [a, c, a]


def test_full_queue_refuses_at_once():
    async def main():
        model, b = Recorder(), MicroBatcher(max_batch=8, max_wait_s=0.5, max_queue=2)
        await b.start()
        waiting = [asyncio.create_task(b.submit(model, rows(i))) for i in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(QueueFull):
            await b.submit(model, rows(9))
        pending_at_refusal = [not t.done() for t in waiting]  # refused without waiting for their batch window
        await asyncio.gather(*waiting)
        await b.close()
        return pending_at_refusal, model.sizes

    pending, sizes = run(main())
    assert pending == [True, True] and sizes == [2]


def test_a_caller_that_gives_up_is_withdrawn_before_the_run():
    async def main():
        model, b = Recorder(), MicroBatcher(max_batch=8, max_wait_s=0.2, max_queue=10)
        await b.start()
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await b.submit(model, rows(1))
        assert b.depth == 0
        y, _ = await b.submit(model, rows(2))
        await b.close()
        return model, y

    model, y = run(main())
    assert model.sizes == [1] and float(y[0, 0]) == 2


def test_close_finishes_queued_work_then_refuses_new_work():
    async def main():
        model, b = Recorder(delay=0.02), MicroBatcher(max_batch=1, max_wait_s=0.0, max_queue=10)
        await b.start()
        tasks = [asyncio.create_task(b.submit(model, rows(i))) for i in range(3)]
        await asyncio.sleep(0)
        await b.close()
        ran_before_close_returned = list(model.sizes)
        with pytest.raises(Closed):
            await b.submit(model, rows(9))
        return ran_before_close_returned, [float(y[0, 0]) for y, _ in await asyncio.gather(*tasks)]

    assert run(main()) == ([1, 1, 1], [0, 1, 2])


def test_a_failing_run_fails_only_its_batch():
    class Flaky(Recorder):
        def run(self, x):
            if (x == 13).any():
                raise RuntimeError("boom")
            return super().run(x)

    async def main():
        model, b = Flaky(), MicroBatcher(max_batch=1, max_wait_s=0.0, max_queue=10)
        await b.start()
        with pytest.raises(RuntimeError):
            await b.submit(model, rows(13))
        y, _ = await b.submit(model, rows(2))
        await b.close()
        return y

    assert float(run(main())[0, 0]) == 2
