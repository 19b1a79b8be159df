"""Data-parallel fine-tuning: finetune.processes ranks launched by torch.distributed.run's own API (what `torchrun`
runs), gloo on CPU and NCCL on CUDA.

Every rank builds the same model from the same files and walks the same global batch order a single process with
processes x finetune.batch_size would; rank r trains on its slice of each global batch, and the gradients are
averaged over the ranks (all-reduce) before every optimizer step, so the union of the ranks' batches at each step is
the single process's batch and, with equal slices, the update is the same. A slice per step, not
DistributedSampler's per-epoch shard: the per-sample augmentation seeds (seed, view, content) are the same
whichever rank draws a sample, and a run's steps do not depend on the rank count. Checkpoints and the fine-tuned
model are written by rank 0 only; the stage's one MLflow run is logged by the launching process from the history
rank 0 returns.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import uuid
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from tlops.core.errors import ConfigError, TlopsError

log = logging.getLogger(__name__)

TIMEOUT = dt.timedelta(minutes=10)  # a rank that stops answering fails the run instead of hanging it


@dataclass(frozen=True)
class World:
    """This process's place in the run: rank `rank` of `size` (one process: rank 0 of 1)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def slice(self, batch: list[int]) -> list[int]:
        """This rank's share of a global batch: contiguous, as equal as the batch allows."""
        if self.size == 1:
            return batch
        per, extra = divmod(len(batch), self.size)
        start = self.rank * per + min(self.rank, extra)
        return batch[start : start + per + (self.rank < extra)]


def world() -> World:
    """The running process group's world, or a single process."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return World()


def processes(setting: int | str, device: str = "auto") -> int:
    """finetune.processes as a count: auto = one per visible GPU (1 without CUDA, or with finetune.device cpu)."""
    if setting == "auto":
        return 1 if device == "cpu" else max(1, torch.cuda.device_count())
    return int(setting)


def backend(device: str) -> str:
    """NCCL for CUDA ranks, gloo for CPU ranks."""
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    return "nccl" if cuda else "gloo"


def all_reduce_gradients(params: list[torch.nn.Parameter], size: int) -> None:
    """Average the gradients of `params` over the ranks, in one flat buffer (one collective per step)."""
    grads = [p.grad for p in params if p.grad is not None]
    if size == 1 or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= size
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def _collective_device() -> torch.device:
    """Where a collective's tensors must live: the rank's GPU under NCCL, the CPU under gloo."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_sum(*values: float) -> list[float]:
    """The sums over the ranks of a few numbers (epoch statistics, loss normalisers), as floats."""
    if not (dist.is_available() and dist.is_initialized()):
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t)
    return t.cpu().tolist()


def from_main(*values: float) -> list[float]:
    """Rank 0's values on every rank: decisions taken from them (best epoch, early stopping) are then the same
    everywhere, so no rank leaves the loop while another waits in a collective."""
    if not (dist.is_available() and dist.is_initialized()):
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.broadcast(t, src=0)
    return t.cpu().tolist()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(entry: Any, args: tuple, n: int, device: str) -> Any:
    """Run entry(*args) in n local processes under torch.distributed.run (rendezvous on loopback, no restarts);
    returns rank 0's result. A failing rank fails the run with its own message, on one line."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    for name in ("torch.distributed.elastic", "torchelastic-events-null"):  # a line per worker state otherwise
        logging.getLogger(name).setLevel(logging.WARNING)
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=n, run_id=f"tlops-{uuid.uuid4().hex[:8]}",
                          rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{_free_port()}", max_restarts=0,
                          monitor_interval=0.5, start_method="spawn")
    import signal

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        results = elastic_launch(config, entry)(*args, backend(device))
    except ChildFailedError as e:
        rank, failure = min(e.failures.items())
        message = failure.message if isinstance(failure.message, str) else \
            (failure.message or {}).get("message", "")
        last = str(message).strip().splitlines()[-1] if message else str(e)
        raise TlopsError(f"finetune rank {rank} of {n} failed: {last}") from None
    finally:  # the elastic agent installs its own signal handlers and leaves them: the stage's are restored
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return results[0]


def init(backend_name: str) -> World:
    """Join the process group torch.distributed.run set up (env: RANK, WORLD_SIZE, MASTER_ADDR, ...)."""
    if backend_name == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend_name, timeout=TIMEOUT)
    return world()


def check_checkpoint_world(state: dict, size: int) -> None:
    """A checkpoint resumes only with the rank count it was made with: the steps and batches would differ."""
    made = int(state.get("world_size", 1))
    if made != size:
        raise ConfigError(f"checkpoints/finetune holds epoch {state['epoch']} of a run with finetune.processes = "
                          f"{made}; this run has {size}: set finetune.processes back to {made} to resume, or delete "
                          "checkpoints/finetune to start over")
