"""Prometheus metrics of the service, in a registry of its own (two apps in one process never collide)."""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """Request counts and latency by route, batch sizes, queue depth, the model served and its reloads."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("tlops_http_requests", "HTTP requests by route template, method and status",
                                ["route", "method", "status"], registry=r)
        self.latency = Histogram("tlops_http_request_duration_seconds", "HTTP request latency by route template",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("tlops_http_requests_in_flight", "HTTP requests being handled now", registry=r)
        self.batch_size = Histogram("tlops_batch_size", "Samples per model run (micro-batch size)",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.inference = Histogram("tlops_inference_duration_seconds", "Seconds per model run",
                                   buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("tlops_queue_depth", "Requests waiting for a model run", registry=r)
        self.ready = Gauge("tlops_model_ready", "1 when a verified, warmed-up model is serving", registry=r)
        self.model_info = Gauge("tlops_model_info", "The model being served (value is always 1)",
                                ["name", "version", "sha256", "backbone", "mlflow_run_id"], registry=r)
        self.loads = Counter("tlops_model_loads", "Model load attempts by result (loaded, rejected)",
                             ["result"], registry=r)
        self.last_rejected = Gauge("tlops_model_last_rejected_timestamp_seconds",
                                   "When a model last failed to load or verify (0: never)", registry=r)
        self.task_changes = Counter("tlops_model_task_changes", "Swaps to a model of other labels or input kind",
                                    registry=r)
        self.loaded_at = Gauge("tlops_model_loaded_timestamp_seconds", "When the serving model was swapped in",
                               registry=r)
        self.drift_prediction = Gauge("tlops_drift_prediction", "Jensen-Shannon divergence of the window's predicted "
                                      "classes from the reference's (held-out source images)", registry=r)
        self.drift_embedding = Gauge("tlops_drift_embedding", "Shift of the window's embeddings from the "
                                     "reference's, in within-class standard deviations", registry=r)
        self.drift_confidence = Gauge("tlops_drift_confidence", "Mean top-1 confidence drop of the window from the "
                                      "reference's", registry=r)
        self.drift_window = Gauge("tlops_drift_window", "Samples in the drift window", registry=r)
        self.drift_unknown = Gauge("tlops_drift_unknown", "Share of the window's inputs the model called unknown "
                                   "(OOD score above its threshold; about 0.05 on in-domain traffic)",
                                   registry=r)
        self.drifted = Gauge("tlops_drift_drifted", "1 when the embedding shift exceeds serve.drift_threshold",
                             registry=r)

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.inference.observe(seconds)

    def model_loaded(self, name: str, version: str, sha256: str, metadata: dict[str, str]) -> None:
        self.model_info.clear()
        self.model_info.labels(name, version, sha256, metadata.get("tlops.backbone", ""),
                               metadata.get("tlops.mlflow_run_id", "")).set(1)
        self.loads.labels("loaded").inc()
        self.loaded_at.set(time.time())
        self.ready.set(1)

    def model_rejected(self) -> None:
        self.loads.labels("rejected").inc()
        self.last_rejected.set(time.time())

    def drift_scores(self, scores: dict) -> None:
        """Set the drift gauges from a /drift answer (NaN where a score is not known yet)."""
        nan = float("nan")
        for gauge, key in ((self.drift_prediction, "prediction"), (self.drift_embedding, "embedding"),
                           (self.drift_confidence, "confidence"), (self.drift_unknown, "unknown")):
            gauge.set(nan if scores.get(key) is None else scores[key])
        self.drift_window.set(scores.get("window", 0))
        self.drifted.set(float(bool(scores.get("drifted"))))

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
