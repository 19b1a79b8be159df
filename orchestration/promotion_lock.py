"""The promotion gate's lock when several workers share one registry: a Prefect global concurrency limit of 1."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def promotion_lock(model: str, timeout_s: float = 1800) -> Iterator[None]:
    """A server-side lock around the promotion gate: a Prefect global concurrency limit of 1 named after the
    registered model, on the Prefect server every worker talks to, so two runs finishing at once never both compare
    against the same champion and then both move the alias. Without a configured Prefect API (one machine, a
    temporary server) runs are serialised by the workspace lock already."""
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        yield
        return
    from prefect import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    limit = f"tlops-promotion-{model}"
    with get_client(sync_client=True) as client:
        try:
            found = client.read_global_concurrency_limit_by_name(limit)
            if found.limit != 1 or not found.active:  # someone widened or paused it: a lock admits one
                client.update_global_concurrency_limit(limit, GlobalConcurrencyLimitUpdate(limit=1, active=True))
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=limit, limit=1))
            except ObjectAlreadyExists:  # another run created it first
                pass
    with concurrency(limit, occupy=1, timeout_seconds=timeout_s, strict=True):
        yield
