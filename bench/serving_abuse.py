"""The service against a hostile client, before and after: the probes of the hardening issue, as figures.

    python bench/serving_abuse.py [--before PATH] [--model models/model.onnx]

Runs each probe against `python -m serving` from this tree and, with --before, from another checkout of tlops (an
older commit: `git worktree add /tmp/before <commit>`), one server at a time on loopback, both with
serve.timeout_ms 2000 and a 20 MB body limit, and prints one table: each probe's status codes, response bytes,
seconds, and the server's RSS (psutil) where memory is the point. The probes:
  dicom rows     a DICOM whose Rows holds a name: the status, and whether the name reached the server's log
  amplification  one v2 request, 256 1x1 images, asking for `probabilities` 20,000 times
  tiny burst     32 clients x 4 requests of 256 1x1 images; meanwhile a 33rd client's plain /predict; RSS 10 s on
  bombs          200 PNGs of 6000x6000 zeros (35 kB each) in one /predict; then a plain /predict
  16-bit TIFFs   50 deflated 16-bit TIFFs of 2000x2000 in one /predict; then a plain /predict
  slow decode    4 concurrent /predict of 100 bomb PNGs each; then a plain /predict
The model is the pipeline's (make run); the plain image is a 64 px PNG.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import psutil
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MIB = 2**20
NAME = "DOE^JOHNATHAN"


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG", optimize=True)
    return buf.getvalue()


def tiff16(side: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((side, side), np.uint16)).save(buf, "TIFF", compression="tiff_deflate")
    return buf.getvalue()


def text_rows_dicom() -> bytes:
    import pydicom
    from pydicom.dataelem import DataElement

    from tlops.inputs import dicom

    ds = pydicom.dcmread(io.BytesIO(dicom.encode(np.zeros((8, 8), np.uint16))), force=True)
    ds[0x00280010] = DataElement(0x00280010, "LO", NAME)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


class Server:
    """`python -m serving` from `tree`, on a free port, its log in a file; RSS by psutil."""

    def __init__(self, tree: Path, model: Path, workdir: Path) -> None:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        cfg = workdir / "params.yaml"
        cfg.write_text(yaml.safe_dump({"serve": {"timeout_ms": 2000, "max_body_bytes": 20_000_000, "reload_s": 0,
                                                 "grpc_port": None}}))
        self.log = workdir / f"server-{self.port}.log"
        env = {**os.environ, "PYTHONPATH": str(tree)}
        self.proc = subprocess.Popen([sys.executable, "-m", "serving", "--params", str(cfg), "--model", str(model),
                                      "--port", str(self.port)], cwd=workdir, env=env, stdout=self.log.open("w"),
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{self.url}/v2/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server from {tree} did not start:\n{self.log.read_text()[-2000:]}")
            time.sleep(0.3)
        self.model_name = model.stem
        self.ps = psutil.Process(self.proc.pid)

    def rss(self) -> int:
        return self.ps.memory_info().rss

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def post(url: str, timeout: float = 120, **kw) -> tuple[int, int, float]:
    t0 = time.perf_counter()
    try:
        r = httpx.post(url, timeout=timeout, **kw)
        return r.status_code, len(r.content), time.perf_counter() - t0
    except httpx.HTTPError as e:
        return -1, 0, time.perf_counter() - t0 if not isinstance(e, httpx.TimeoutException) else timeout


def files(blobs: list[bytes]) -> dict:
    return {"files": [("file", (f"f{i}", b, "application/octet-stream")) for i, b in enumerate(blobs)]}


def probes(s: Server, plain: bytes) -> dict[str, str]:
    infer = f"{s.url}/v2/models/{s.model_name}/infer"
    tiny = {"name": "image", "datatype": "UINT8", "shape": [256, 1, 1, 3], "data": [128] * 768}
    out: dict[str, str] = {}

    status, size, _ = post(f"{s.url}/predict", content=text_rows_dicom())
    logged = NAME in s.log.read_text(errors="replace")
    out["dicom rows"] = f"{status}; the name in the server log: {'yes' if logged else 'no'}"

    # amplification
    rss0 = s.rss()
    body = json.dumps({"inputs": [tiny], "outputs": [{"name": "probabilities"}] * 20_000}).encode()
    status, size, secs = post(infer, content=body)
    out["amplification"] = (f"{status}, {size / 1e6:.1f} MB back in {secs:.1f} s, RSS +{(s.rss() - rss0) / MIB:.0f} "
                            f"MiB ({len(body) / 1e3:.0f} kB sent)")

    # tiny burst, and a 33rd client meanwhile
    time.sleep(2)
    idle, peak, done = s.rss(), s.rss(), threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, s.rss())
            time.sleep(0.01)

    burst_body = json.dumps({"inputs": [tiny]}).encode()

    def client(_: int) -> list[int]:
        with httpx.Client(timeout=300) as c:
            return [c.post(infer, content=burst_body).status_code for _ in range(4)]

    sampler = threading.Thread(target=sample)
    sampler.start()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(32) as pool:
        burst = pool.map(client, range(32))
        time.sleep(0.5)
        p_status, _, p_secs = post(f"{s.url}/predict", content=plain, timeout=300)
        statuses = [x for answers in burst for x in answers]
    busy = time.perf_counter() - t0
    done.set()
    sampler.join()
    time.sleep(10)
    counts = ", ".join(f"{statuses.count(c)} x {c}" for c in sorted(set(statuses)))
    out["tiny burst"] = (f"{counts} in {busy:.1f} s; RSS peak +{(peak - idle) / MIB:.0f} MiB, 10 s after "
                         f"+{(s.rss() - idle) / MIB:.0f} MiB; 33rd client {p_status} in {p_secs * 1000:.0f} ms")

    bomb = png(np.zeros((6000, 6000), np.uint8))
    for label, blobs in (("bombs", [bomb] * 200), ("16-bit TIFFs", [tiff16(2000)] * 50)):
        status, _, secs = post(f"{s.url}/predict", **files(blobs))
        after, _, after_secs = post(f"{s.url}/predict", content=plain)
        out[label] = f"{status} in {secs:.1f} s; next plain request {after} in {after_secs * 1000:.0f} ms"

    with ThreadPoolExecutor(4) as pool:
        slow = list(pool.map(lambda _: post(f"{s.url}/predict", **files([bomb] * 100)), range(4)))
    after, _, after_secs = post(f"{s.url}/predict", content=plain)
    out["slow decode"] = (f"{[r[0] for r in slow]} in {max(r[2] for r in slow):.1f} s; next plain request {after} "
                          f"in {after_secs * 1000:.0f} ms")

    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", type=Path, help="another checkout of tlops, measured first")
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "model.onnx")
    args = ap.parse_args()
    if not args.model.exists():
        sys.exit(f"{args.model} missing: run `make run` first")
    plain = png(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    trees = ([("before", args.before.resolve())] if args.before else []) + [("after", ROOT)]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, tree in trees:
            work = Path(tmp) / label
            work.mkdir()
            server = Server(tree, args.model.resolve(), work)
            try:
                results[label] = probes(server, plain)
            finally:
                server.stop()
    print(f"serving under a hostile client ({args.model}, timeout_ms 2000, {os.cpu_count()} cores)")
    for probe in results[trees[-1][0]]:
        print(f"\n{probe}:")
        for label, _ in trees:
            print(f"  {label:6s} {results[label][probe]}")


if __name__ == "__main__":
    main()
