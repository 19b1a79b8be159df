"""The command-line entry of every stage flow (`python -m flows.<stage>`, what dvc.yaml runs)."""

from __future__ import annotations

import gc
import sys
from collections.abc import Callable
from typing import Any

from tlops.config import load_params
from tlops.errors import ConfigError, TlopsError


def stage_main(flow: Callable[..., Any]) -> None:
    """Entry point of `python -m flows.<stage>`: validate params first, then run the stage flow.

    A config error exits 2 and any other tlops error exits 1, each with one line naming the problem,
    before Prefect or any model is started.
    """
    try:
        load_params()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    from orchestration.prefect_server import prefect_api

    try:
        with prefect_api():  # under plain `dvc repro` each stage process needs a Prefect API of its own
            flow()
    except TlopsError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        gc.freeze()  # the interpreter's last collection over torch & co. would add 1.5 s to the stage's exit
