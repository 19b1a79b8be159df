"""The data plane: the served model, its lifecycle, and the one path every request takes. Transport-free.

REST (serving.rest) and gRPC (serving.grpc_server) are thin adapters: each parses its wire format into a Job and
calls Service.run, which does, for every request alike:
  parse + reserve + decode (a decoding thread): the job's samples are reserved from the service-wide budget
      (serve.max_inflight_samples; none left: 503 + Retry-After at once), then decoded, the deadline checked
      between images;
  infer (the micro-batcher): pieces of at most max_batch samples through ONNX Runtime;
  respond (a worker thread): the transport's answer built off the event loop;
and releases the reservation once the answer is built. Every answered sample feeds the drift monitor; with
serve.log_inputs a keyed sample of the inputs is kept for adaptation (serving.input_log).

The model loads in the background after startup: liveness answers at once, readiness waits until a model has passed
its sha256 check and a warm-up run. Reloads (SIGHUP, or the source changing on a poll every serve.reload_s) load,
verify and warm the new model off the request path and swap it in with one assignment; a model that fails is
rejected and the old one keeps serving.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from serving import inputs
from serving.batcher import Closed, MicroBatcher, QueueFull
from serving.input_log import InputLog
from serving.limits import Budget, BudgetSpent, Deadline, DeadlineExceeded, Ticket, TooLarge, Trimmer
from serving.prometheus import Metrics
from serving.protocol import FILE_INPUT, IMAGE_INPUT, TEXT_INPUT, ApiError, InferRequest, shown, wants_explanation
from serving.served_model import LoadedModel, ModelSource, Outputs, file_key, load_model, warm_up
from tlops.core.config import ServeParams
from tlops.core.secrets import redact
from tlops.onnx import drift, metadata

log = logging.getLogger("serving")

T = TypeVar("T")
NOT_LOADED = "model not loaded"  # all a client is told while no model serves; the reason goes to the server log


class Job:
    """One request's work as a transport hands it over: how many samples it declares, how to decode them."""

    samples: int
    explain: bool = False  # whether the client asked for the explanation (the model computes it only then)

    def decode(self, model: LoadedModel, limits: inputs.Limits, deadline: Deadline) -> np.ndarray:
        raise NotImplementedError

    def keep(self, log_: InputLog) -> None:
        """serve.log_inputs: offer the decoded request's inputs to the log (which keeps a sample of them)."""


@dataclass
class TensorJob(Job):
    """A v2 inference request (REST or gRPC)."""

    req: InferRequest

    def __post_init__(self) -> None:
        self.samples = self.req.declared_samples()
        self.explain = wants_explanation(self.req)

    def decode(self, model: LoadedModel, limits: inputs.Limits, deadline: Deadline) -> np.ndarray:
        return inputs.decode_request(self.req, model, limits, deadline)

    def keep(self, log_: InputLog) -> None:
        for t in self.req.inputs:
            if t.name in (FILE_INPUT, TEXT_INPUT):
                for data in t.data.ravel():
                    log_.keep_file(bytes(data), text=t.name == TEXT_INPUT)
            elif t.name == IMAGE_INPUT:
                shape = [1, *t.shape] if len(t.shape) == 3 else t.shape
                for img in t.data.reshape(shape).astype(np.uint8, copy=False):
                    log_.keep_pixels(img)


@dataclass
class FileJob(Job):
    """POST /predict: image files, or texts for a text model; each (what to call it in an error, bytes)."""

    files: list[tuple[str, bytes]]
    text: bool
    explain: bool = False
    ids: np.ndarray | None = None  # a text request's token ids, kept to name the tokens of an explanation

    def __post_init__(self) -> None:
        self.samples = len(self.files)

    def decode(self, model: LoadedModel, limits: inputs.Limits, deadline: Deadline) -> np.ndarray:
        if self.text:
            self.ids = inputs.decode_texts(self.files, model.spec, limits.max_text_chars, deadline)
            return self.ids
        return inputs.decode_files(self.files, model.spec, limits, deadline)

    def keep(self, log_: InputLog) -> None:
        for _, data in self.files:
            log_.keep_file(data, text=self.text)


class Service:
    """One running service: the model being served, the batcher, the budget, the metrics, and how to reload."""

    def __init__(self, params: ServeParams, source: ModelSource) -> None:
        self.params, self.source = params, source
        self.model: LoadedModel | None = None
        self.status = "loading"  # why the service is not ready, for the server log; clients get NOT_LOADED
        self.metrics = Metrics()
        self.batcher = MicroBatcher(params.max_batch, params.max_wait_ms / 1000, params.max_queue,
                                    on_batch=self.metrics.observe_batch)
        self.limits = inputs.Limits(params.max_pixels, params.max_request_pixels, params.max_text_chars)
        self.budget = Budget(params.max_inflight_samples, headroom=params.max_batch)
        self.trimmer = Trimmer(self.budget, min_samples=params.max_batch)
        # Decoding runs here, a few at a time, so decompressed images in memory stay bounded.
        self.decode_pool = ThreadPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 2)),
                                              thread_name_prefix="tlops-decode")
        self._lock: asyncio.Lock | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._rejected_key: tuple | None = None
        self._last_error: str | None = None
        self._tasks: set[asyncio.Task] = set()
        self.drift: drift.Monitor | None = None  # of the model being served (its reference statistics)
        self.input_log = (InputLog(params.log_inputs, params.log_sample, params.log_max_bytes)
                          if params.log_inputs else None)

    @property
    def ready(self) -> bool:
        return self.model is not None

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Start the batcher and the first load (in the background), and the poller when serve.reload_s > 0."""
        self._loop, self._lock = asyncio.get_running_loop(), asyncio.Lock()
        await self.batcher.start()
        self.spawn(self.reload(force=True))
        if self.params.reload_s > 0:
            self.spawn(self._poll())

    async def stop(self) -> None:
        """Cancel the background tasks, finish what the batcher holds, stop the decoding threads."""
        for task in self._tasks:
            task.cancel()
        await self.batcher.close()
        self.decode_pool.shutdown(wait=False, cancel_futures=True)

    def spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def reload(self, force: bool = False) -> bool:
        """Load, verify and warm what the source names now and swap it in; keep the old model if that fails.

        Without `force` (the poller), an unchanged file or the same file that was already rejected is skipped.
        Returns True when a new model was swapped in.
        """
        async with self._lock:
            key = None
            try:
                path = await asyncio.to_thread(self.source.resolve)
                key = file_key(path)
                if not force and key is not None and key in (self.model and self.model.key, self._rejected_key):
                    return False
                new = await asyncio.to_thread(self._load_and_warm, path)
                monitor = (drift.Monitor.from_metadata(new.metadata, self.params.drift_window,
                                                       self.params.drift_threshold)
                           if self.params.drift_window else None)
            except Exception as e:  # anything wrong with the new model: reject it, keep serving
                self._reject(key, e)
                return False
            old, self.model = self.model, new  # the swap: in-flight batches keep the session they started with
            self.drift = monitor
            self.status, self._rejected_key, self._last_error = "ready", None, None
            self.metrics.model_loaded(new.name, new.version, new.sha256, new.metadata)
            log.info("serving %s version %s%s", new.name, new.version, f" (was {old.version})" if old else "")
            if old is not None and old.task != new.task:  # clients' label indices and inputs change meaning
                self.metrics.task_changes.inc()
                log.warning("model %s version %s is of another task than version %s it replaces: %s -> %s",
                            new.name, new.version, old.version, metadata.describe_task(old.task),
                            metadata.describe_task(new.task))
            return True

    def _load_and_warm(self, path: Path) -> LoadedModel:
        model = load_model(path, name=self.source.name, threads=self.params.threads,
                           verify=self.source.must_verify(path))
        warm_up(model, tuple(sorted({1, self.params.max_batch})))
        return model

    def _reject(self, key: tuple | None, e: Exception) -> None:
        error = redact(str(e))
        repeated = error == self._last_error  # a poller retrying a missing file logs it once, not every poll
        self._rejected_key, self._last_error = key, error
        self.metrics.model_rejected()
        if self.model is None:
            self.status = f"no model loaded: {error}"
        if not repeated:
            keeps = f"still serving version {self.model.version}" if self.model else "not ready"
            log.error("model from %s rejected: %s (%s)", redact(self.source.ref), error, keeps)

    def request_reload(self) -> concurrent.futures.Future:
        """Schedule a forced reload from another thread (tests, embedders); the future gives reload()'s result."""
        if self._loop is None:
            raise RuntimeError("the service is not running")
        return asyncio.run_coroutine_threadsafe(self.reload(force=True), self._loop)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.params.reload_s)
            await self.reload(force=False)

    # ------------------------------------------------------------ requests

    def model_for(self, name: str, version: str | None = None) -> LoadedModel:
        """The served model if `name` (and `version`) name it; 404 for another model, 503 while not ready."""
        if name != self.source.name:
            raise ApiError(404, f"model {shown(name)} not found; this server serves {self.source.name!r}")
        model = self.model
        if model is None:
            raise ApiError(503, f"model {name!r} is not ready ({NOT_LOADED})", reason="not_ready")
        if version is not None and version != model.version:
            raise ApiError(404, f"version {shown(version)} of {name!r} not found; serving version {model.version}")
        return model

    async def run(self, model: LoadedModel, parse: Callable[[], Job],
                  respond: Callable[[Job, LoadedModel, Outputs], T]) -> T:
        """The one path of every request: parse, reserve and decode in a decoding thread, infer through the batcher
        (with the explanation output only when the job asks for it), respond in a worker thread. 503 when the budget
        or the queue is full, 413 for a request larger than the whole budget, 504 past serve.timeout_ms (the decoding
        thread stops at its next image)."""
        loop = asyncio.get_running_loop()
        deadline = Deadline(self.params.timeout_ms / 1000)
        ticket = Ticket(self.budget, on_release=lambda: self.trimmer.after_release(loop))
        try:
            async with asyncio.timeout(self.params.timeout_ms / 1000):
                job, x = await loop.run_in_executor(self.decode_pool, self._prepare, model, parse, ticket, deadline)
                self.metrics.queue_depth.set(self.batcher.depth + 1)
                y, used = await self.batcher.submit(model, x, job.explain)
                del x
                monitor = self.drift
                if monitor is not None and used is self.model:
                    monitor.observe(y.logits, y.embedding, used.unknown(y.ood_score))
                return await loop.run_in_executor(None, respond, job, used, y)
        except BudgetSpent as e:
            raise ApiError(503, f"server busy: {e}; retry shortly", reason="busy") from None
        except TooLarge as e:
            raise ApiError(413, str(e), reason="too_many_samples") from None
        except QueueFull as e:
            raise ApiError(503, f"server busy: {e}; retry shortly", reason="queue_full") from None
        except Closed as e:
            raise ApiError(503, str(e), reason="shutting_down") from None
        except (TimeoutError, DeadlineExceeded):
            raise ApiError(504, f"no answer within serve.timeout_ms={self.params.timeout_ms:g}",
                           reason="timeout") from None
        finally:
            deadline.cancel()
            ticket.done()
            self.metrics.queue_depth.set(self.batcher.depth)

    def _prepare(self, model: LoadedModel, parse: Callable[[], Job], ticket: Ticket, deadline: Deadline
                 ) -> tuple[Job, np.ndarray]:
        """In a decoding thread: parse, reserve the declared samples, decode them, offer them to the input log."""
        try:
            job = parse()
            inputs.check_samples(job.samples)
            ticket.reserve(job.samples)
            x = job.decode(model, self.limits, deadline)
            if self.input_log is not None:
                try:
                    job.keep(self.input_log)
                except Exception as e:  # keeping inputs is a side job: it never fails the request
                    log.warning("serve.log_inputs: could not keep a request's inputs (%s)", type(e).__name__)
            return job, x
        finally:
            ticket.done()

    # ------------------------------------------------------------ drift

    def drift_scores(self) -> dict[str, Any]:
        """GET /drift's answer; the gauges are set from it too. No path or other server detail is in it."""
        monitor = self.drift
        if monitor is None:
            why = ("drift monitoring is off (serve.drift_window: 0)" if not self.params.drift_window else
                   NOT_LOADED if self.model is None else "the model carries no drift reference (re-export it)")
            scores = {"window": 0, "prediction": None, "embedding": None, "confidence": None, "unknown": None,
                      "threshold": self.params.drift_threshold, "drifted": False, "error": why}
        else:
            scores = monitor.scores()
        scores["logging"] = self.input_log is not None
        if self.input_log is not None:
            scores["logged"] = self.input_log.kept
        if self.model is not None:
            scores["input_kind"] = metadata.input_kind_of(self.model.metadata)
        self.metrics.drift_scores(scores)
        return scores
