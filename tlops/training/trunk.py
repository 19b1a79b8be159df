"""The frozen trunk, run once: fine-tuning computes only the part of the backbone that learns.

While the layer groups below the unfrozen top stay frozen (BatchNorm in eval mode, no dropout there), their output
is a function of the input image alone. `split` cuts the backbone there with torch.fx into a trunk and a top that
shares the backbone's parameters; `TrunkCache` runs the trunk ahead of training, in inference mode and large
batches, on the fastest engine (ONNX Runtime on CPU, PyTorch on CUDA), once per image and view; each training step
then runs only the top forward and backward. The rows are cached by content (image bytes, backbone and the trunk's
own weights, preprocessing, cut, augmentation recipe, seed and view) as shards under checkpoints/finetune/trunk, and
read back from disk, a batch at a time, when they would not fit in finetune.trunk_cache_max_gb of memory. Adaptation
trains the same top over the same trunk: it reads fine-tuning's rows and writes its own under checkpoints/adapt/trunk.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from tlops.core.config import AugmentParams, Params
from tlops.core.io import atomic_path, sha256_bytes, sha256_json
from tlops.features.frozen import Runner, make_runner
from tlops.features.working_images import DECODE_RULE
from tlops.inputs.images import PreprocessSpec

log = logging.getLogger(__name__)

EVAL_VIEW = -1  # the evaluation preprocessing (validation images), as opposed to augmented view k >= 0
TRUNK_RULE = 1  # bump when what a trunk row holds changes for the same inputs: every cached row is then stale
SHARD_BYTES = 256 * 2**20  # rows are written to disk in shards of about this size as they are computed


class SplitError(Exception):
    """The backbone cannot be cut at a group boundary (fine-tuning then runs the whole backbone every step)."""


@dataclass
class Split:
    """A backbone cut before group `cut`: trunk(x) feeds top(), and top(trunk(x)) equals backbone(x)."""

    trunk: fx.GraphModule
    top: fx.GraphModule
    cut: int


def split(model: nn.Module, groups: Sequence[nn.ModuleList], cut: int) -> Split:
    """Cut `model` after groups[cut - 1] (cut = len(groups): all groups frozen, the top only pools); SplitError if
    something below the cut also feeds the top.

    Every group module is traced as one leaf (timm's own untraceable modules too), so the cut is the call of the
    last module below it, and everything after that call becomes the top.
    """
    import timm.layers

    if not 0 < cut <= len(groups):
        raise SplitError(f"a cut at group {cut} of {len(groups)} leaves no trunk")
    names = {id(m): n for n, m in model.named_modules()}
    leaves = {id(m) for g in groups for m in g}
    below = {names[id(m)] for g in groups[:cut] for m in g}
    notrace = tuple(timm.layers.get_notrace_modules())

    class Tracer(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return id(m) in leaves or isinstance(m, notrace) or super().is_leaf_module(m, qualname)

    try:
        graph = Tracer(autowrap_functions=tuple(timm.layers.get_notrace_functions())).trace(model)
    except Exception as e:  # data-dependent control flow and the like
        raise SplitError(f"torch.fx cannot trace {type(model).__name__}: {type(e).__name__}: {e}") from None
    root = fx.GraphModule(model, graph)
    nodes = list(graph.nodes)
    calls = [i for i, n in enumerate(nodes) if n.op == "call_module" and n.target in below]
    if not calls:
        raise SplitError(f"no call of the groups below the cut in {type(model).__name__}'s graph")
    at = calls[-1]
    return Split(_subgraph(root, nodes[: at + 1], start=None, end=nodes[at]),
                 _subgraph(root, nodes[at + 1 :], start=nodes[at], end=None), cut)


def _subgraph(root: fx.GraphModule, nodes: list[fx.Node], start: fx.Node | None, end: fx.Node | None
              ) -> fx.GraphModule:
    """A GraphModule of `nodes`: fed by `start`'s value (else by the original input), returning `end`'s (else the
    original output). The modules it calls are root's own: no parameter is copied."""
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    if start is not None:
        env[start] = g.placeholder("trunk")

    def arg(a: fx.Node) -> fx.Node:
        if a not in env:
            if a.op == "get_attr":  # a constant defined above the cut
                env[a] = g.node_copy(a)
            else:
                raise SplitError(f"{a.name}, computed below the cut, is used above it")
        return env[a]

    for n in nodes:
        if n.op == "placeholder" and start is not None:
            raise SplitError("the model input is used above the cut")
        env[n] = g.node_copy(n, arg)
    if end is not None:
        g.output(env[end])
    return fx.GraphModule(root, g)


# ---------------------------------------------------------------- the cache


@dataclass(frozen=True)
class Rows:
    """Trunk outputs of a list of samples, by position: in memory, or gathered from shards on disk per batch."""

    sources: list[np.ndarray]  # one array per shard (memory-mapped, or a single in-memory array)
    where: np.ndarray  # (N, 2) int64: (source, row) of each sample

    def __len__(self) -> int:
        return len(self.where)

    def take(self, idx: Sequence[int]) -> np.ndarray:
        """The rows of samples `idx`, in that order, as one float32 array."""
        w = self.where[np.asarray(idx, dtype=np.int64)]
        out = np.empty((len(w), *self.sources[0].shape[1:]), np.float32)
        for s in np.unique(w[:, 0]):
            mask = w[:, 0] == s
            out[mask] = self.sources[s][w[mask, 1]]
        return out


class TrunkCache:
    """Content-addressed trunk outputs under `root`: computed once, read by every later epoch and run."""

    def __init__(self, root: Path, extractor: dict, max_bytes: float, read_also: Sequence[Path] = ()) -> None:
        """Rows are written under root and found there or under read_also (another stage's cache, never written)."""
        self.root, self.extractor, self.max_bytes = Path(root), extractor, max_bytes
        self.read_also = [Path(r) for r in read_also]
        self._known: dict[str, tuple[Path, int]] | None = None  # key -> (shard, row): read once, kept up to date

    def key(self, cut: int, sha256: str, view: int, recipe: dict, weights: str) -> str:
        """The address of one row: the image's content, what runs it (extractor, cut and the trunk's weights) and
        which view it is."""
        return sha256_json({"extractor": self.extractor, "cut": cut, "weights": weights, "image": sha256,
                            "view": view, "augment": recipe if view != EVAL_VIEW else None})[:40]

    def rows(self, keys: list[str], inputs: Callable[[list[int]], np.ndarray], run: Runner, batch: int = 64) -> Rows:
        """The rows of `keys`; those not cached yet are computed, run(inputs(positions)), a batch at a time with the
        next batch's inputs prepared meanwhile, and stored."""
        index = self._index()
        todo = [i for i, k in enumerate(keys) if k not in index]
        if todo:
            chunks = [todo[i : i + batch] for i in range(0, len(todo), batch)]
            done: list[int] = []
            out: list[np.ndarray] = []
            with ThreadPoolExecutor(max_workers=1) as ahead:
                upcoming = ahead.submit(inputs, chunks[0])
                for k, chunk in enumerate(chunks):
                    x = upcoming.result()
                    if k + 1 < len(chunks):
                        upcoming = ahead.submit(inputs, chunks[k + 1])
                    out.append(run(x))
                    done += chunk
                    if sum(o.nbytes for o in out) >= SHARD_BYTES or k + 1 == len(chunks):  # bounded memory
                        self._write([keys[i] for i in done], np.concatenate(out))
                        done, out = [], []
            index = self._index()
        shards = sorted({index[k][0] for k in keys})
        number = {s: n for n, s in enumerate(shards)}
        sources = [np.load(s, mmap_mode="r") for s in shards]
        where = np.array([(number[index[k][0]], index[k][1]) for k in keys], dtype=np.int64)
        rows = Rows(sources, where)
        if rows.take([0]).nbytes * len(keys) <= self.max_bytes:  # fits: read it all into memory once
            rows = Rows([rows.take(range(len(keys)))], np.stack([np.zeros(len(keys), np.int64),
                                                                 np.arange(len(keys))], axis=1))
        else:
            log.info("trunk cache: %d rows stay on disk (over finetune.trunk_cache_max_gb)", len(keys))
        return rows

    def _index(self) -> dict[str, tuple[Path, int]]:
        if self._known is not None:
            return self._known
        index = {}
        for keys_file in sorted(k for r in (*self.read_also, self.root) for k in r.glob("trunk-*.keys.npy")):
            data = keys_file.with_name(keys_file.name.replace(".keys.npy", ".npy"))
            try:
                keys = np.load(keys_file)
            except (OSError, ValueError) as e:  # a damaged shard costs a recomputation, not the stage
                log.warning("trunk cache: ignoring unreadable %s (%s)", keys_file, e)
                continue
            if data.exists():
                index.update({str(k): (data, i) for i, k in enumerate(keys)})
        self._known = index
        return index

    def _write(self, keys: list[str], rows: np.ndarray) -> None:
        name = f"trunk-{sha256_bytes(chr(10).join(keys).encode())[:16]}"
        self.root.mkdir(parents=True, exist_ok=True)
        for path, array in ((self.root / f"{name}.npy", rows.astype(np.float32, copy=False)),
                            (self.root / f"{name}.keys.npy", np.asarray(keys, dtype=str))):  # the keys last
            with atomic_path(path) as tmp, open(tmp, "wb") as f:
                np.save(f, array)
        self._index().update({k: (self.root / f"{name}.npy", i) for i, k in enumerate(keys)})


# ---------------------------------------------------------------- a fine-tuning run's trunk


class Trunk:
    """The trunk of one fine-tuning run: the backbone split at each cut it trains with, and their outputs."""

    def __init__(self, model: nn.Module, groups: Sequence[nn.ModuleList], spec: PreprocessSpec, cache: TrunkCache,
                 augment: AugmentParams, seed: int, opset: int, atol: float, batch: int = 64) -> None:
        self.model, self.groups, self.spec, self.cache = model, groups, spec, cache
        self.augment, self.seed, self.opset, self.atol, self.batch = augment, seed, opset, atol, batch
        self.recipe = {**augment.model_dump(mode="json"), "seed": seed}
        self._splits: dict[int, Split | None] = {}
        self._runners: dict[tuple[int, str], Callable[[np.ndarray], np.ndarray]] = {}  # by (cut, weights)

    @classmethod
    def for_params(cls, params: Params, backbone: Any, spec: PreprocessSpec, root: Path, batchnorm: str | None = None,
                   read_also: Sequence[Path] = ()) -> tuple[Trunk | None, str]:
        """The run's trunk, or None and why the whole backbone must run every step. backbone: a Backbone (name,
        weights_id, model, groups); batchnorm: how the training keeps BatchNorm (default finetune.batchnorm; adaptation
        trains with it frozen)."""
        ft = params.finetune
        if not ft.trunk_cache:
            return None, "finetune.trunk_cache is false"
        if (batchnorm or ft.batchnorm) != "frozen":
            return None, ("finetune.batchnorm is train: BatchNorm statistics change as training goes, so no part "
                          "of the backbone is a fixed function of the image")
        extractor = {"backbone": backbone.name, "weights_id": backbone.weights_id, "spec": spec.to_dict(),
                     "precision": "fp32", "decode": DECODE_RULE, "trunk": TRUNK_RULE}
        cache = TrunkCache(root, extractor, ft.trunk_cache_max_gb * 1e9, read_also)
        return cls(backbone.model, backbone.groups, spec, cache, ft.augment, ft.seed, params.export.opset,
                   params.export.parity_atol), "cached"

    def top(self, cut: int) -> nn.Module | None:
        """The part above `cut` (trunk outputs -> features), or None when nothing below it is frozen or the
        backbone cannot be cut there (then the whole backbone runs; the log says why)."""
        if cut <= 0:
            return None
        if cut not in self._splits:
            try:
                with torch.random.fork_rng(devices=[]):
                    self._splits[cut] = split(self.model, self.groups, cut)
            except SplitError as e:
                log.warning("finetune: the trunk cache is off at cut %d: %s", cut, e)
                self._splits[cut] = None
        found = self._splits[cut]
        return found.top if found else None

    def weights(self, cut: int) -> str:
        """sha256 of the trunk's parameters and buffers below `cut`, as they are now: rows are only reused by the
        same trunk (a fine-tuned group below an adaptation's cut, or BatchNorm statistics re-estimated, make
        another)."""
        state = self._splits[cut].trunk.state_dict()
        return sha256_bytes(b"".join(name.encode() + t.detach().cpu().contiguous().numpy().tobytes()
                                     for name, t in sorted(state.items())))

    def rows(self, ds: Any, cut: int, view: int, recipe: dict | None = None) -> Rows:
        """Trunk outputs at `cut` of a dataset's images (tlops.training.loaders.ImageDataset, or one with its
        items, images, at_view and items as (input, label)), as view `view`: the very inputs the dataset gives for
        that view. recipe: what draws the views (default: finetune.augment and finetune.seed); top(cut) first."""
        sha, weights = ds.images.sha256, self.weights(cut)
        keys = [self.cache.key(cut, sha[p], view, self.recipe if recipe is None else recipe, weights)
                for p, _ in ds.items]
        source = replace(ds, augment=None) if view == EVAL_VIEW else ds.at_view(view)
        pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1)

        def inputs(positions: list[int]) -> np.ndarray:
            return np.stack(list(pool.map(lambda i: source[i][0].numpy(), positions)))

        def run(x: np.ndarray) -> np.ndarray:
            if (cut, weights) not in self._runners:  # built on the first batch, also its parity check's example
                trunk = self._splits[cut].trunk
                self._runners[cut, weights], engine = make_runner(trunk, self.spec.input_size, "auto", None,
                                                                  example=x[:4], opset=self.opset, atol=self.atol)
                log.info("frozen trunk below group %d runs once per view on %s", cut, engine)
            return self._runners[cut, weights](x)

        with pool, torch.random.fork_rng(devices=[]):  # exporting and tracing must not move the random stream
            return self.cache.rows(keys, inputs, run, self.batch)
