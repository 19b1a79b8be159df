"""`python -m serving [--params P] [--model M] [--host H] [--port N]`: the service without the tlops CLI.

Used by the tests and the benchmark to run the server in its own process; `tlops serve` is the user entry.
"""

from __future__ import annotations

import argparse
import sys

from serving.app import serve
from tlops.core.config import load_params
from tlops.core.errors import TlopsError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m serving", description=__doc__.splitlines()[0])
    ap.add_argument("--params", default=None, help="params.yaml (default: $TLOPS_PARAMS or ./params.yaml)")
    ap.add_argument("--model", default=None, help="model path or models:/<name>@<alias> (default: serve.model)")
    ap.add_argument("--host", default=None)
    ap.add_argument("--port", type=int, default=None)
    ap.add_argument("--grpc-port", type=int, default=None, help="0: no gRPC (default: serve.grpc_port)")
    args = ap.parse_args(argv)
    try:
        params = load_params(args.params).serve
        overrides = {k: v for k, v in {"host": args.host, "port": args.port}.items() if v is not None}
        if args.grpc_port is not None:
            overrides["grpc_port"] = args.grpc_port or None
        serve(params.model_copy(update=overrides), model=args.model)
    except TlopsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
