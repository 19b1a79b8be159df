"""MicroBatcher on its own: grouping, limits, withdrawal and draining, with a fake model that records batches."""

from __future__ import annotations

import asyncio
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


def test_a_request_larger_than_max_batch_runs_alone():
    async def main():
        model, b = Recorder(), MicroBatcher(max_batch=2, max_wait_s=0.01, max_queue=10)
        await b.start()
        y, _ = await b.submit(model, rows(1, 2, 3, 4, 5))
        await b.close()
        return model, y

    model, y = run(main())
    assert model.sizes == [5] and y.ravel().tolist() == [1, 2, 3, 4, 5]


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
