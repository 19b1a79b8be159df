"""Serving benchmark: the ONNX Runtime service under load on loopback, against eager PyTorch, fp32 against int8.

    python bench/serving.py [--requests 400] [--concurrency 1,8,32] [--max-seconds 60]

The model is the pipeline's own when it exists (models/model.onnx, models/finetuned for eager PyTorch,
models/int8/model.int8.onnx); otherwise a stand-in is built in a temp dir with the same code path:
efficientnet_lite0 (random init) + linear head, 96 px, 10 classes, exported by tlops.export and quantized by
tlops.export.quantize_int8. The images are the test split when prepared, else generated 64x64 PNGs.
The server runs in one process (`python -m serving`), the load generator in another (a lean asyncio
HTTP/1.1 client, one keep-alive connection per concurrent user); both on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tlops import paths  # noqa: E402

STANDIN_CLASSES = 10
STANDIN_SIZE = 96


@dataclass
class Models:
    fp32: Path
    int8: Path | None
    eager: object  # torch nn.Module in eval mode, the same weights as fp32
    note: str


# ---------------------------------------------------------------- models and images


def pipeline_models() -> Models | None:
    """The pipeline's exported model and its fine-tuned PyTorch original, when both exist."""
    if not (paths.ONNX.exists() and paths.FINETUNE_WEIGHTS.exists()):
        return None
    from tlops.model import load_classifier

    model, _ = load_classifier(paths.FINETUNE_DIR)
    int8 = paths.INT8_ONNX if paths.INT8_ONNX.exists() else None
    return Models(paths.ONNX, int8, model, f"pipeline model {paths.ONNX} (eager: {paths.FINETUNE_DIR})")


def standin_models(workdir: Path, calibration: list[bytes]) -> Models:
    """efficientnet_lite0 (random init) + linear head, exported and quantized with the pipeline's functions."""
    import torch

    from tlops import onnx_meta
    from tlops.backbones import create_backbone
    from tlops.export import build_metadata, export_onnx, quantize_int8, write_metadata
    from tlops.model import Classifier, build_head
    from tlops.preprocess import load_image, preprocess

    torch.manual_seed(0)
    bb = create_backbone("efficientnet_lite0", weights="random", image_size=STANDIN_SIZE)
    model = Classifier(bb.model, build_head("linear", bb.num_features, STANDIN_CLASSES, 256, 0.0)).eval()
    fp32 = workdir / "model.onnx"
    export_onnx(model, bb.spec.input_size, fp32, opset=17)
    meta = build_metadata([f"class_{i}" for i in range(STANDIN_CLASSES)], bb.spec, bb.name, None, None, None, "bench")
    write_metadata(fp32, meta)
    onnx_meta.write_sha256(fp32)
    batches = [np.stack([preprocess(load_image(b, 10**8), bb.spec) for b in calibration[i:i + 8]])
               for i in range(0, min(len(calibration), 64), 8)]
    int8 = quantize_int8(fp32, workdir / "model.int8.onnx", batches)
    onnx_meta.write_sha256(int8)
    note = (f"stand-in: {bb.name} random init + linear head, {STANDIN_SIZE} px, {STANDIN_CLASSES} classes "
            "(no models/model.onnx + models/finetuned here; run `tlops run` for the real one)")
    return Models(fp32, int8, model, note)


def bench_images(n: int) -> tuple[list[bytes], str]:
    """PNG/JPEG bytes: the prepared test split when there is one, else generated 64x64 PNGs."""
    if paths.MANIFEST.exists():
        from tlops.data import load_manifest

        rows = load_manifest(paths.MANIFEST).rows_in("test")[:n]
        if rows:
            return [Path(r.path).read_bytes() for r in rows], f"{len(rows)} test-split images from {paths.MANIFEST}"
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        a = rng.integers(0, 60, (64, 64, 3), dtype=np.uint8)
        a[..., i % 3] += 150
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out, f"{n} generated 64x64 PNGs"


# ---------------------------------------------------------------- server and load generator


def start_server(model: Path, workdir: Path, serve: dict) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    params = workdir / f"params-{model.stem}.yaml"
    params.write_text(json.dumps({"serve": {**serve, "host": "127.0.0.1", "reload_s": 0}}))  # JSON is YAML
    log = open(workdir / f"server-{model.stem}.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "serving", "--params", str(params), "--model", str(model),
                             "--port", str(port)], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    url = f"http://127.0.0.1:{port}"
    _wait_ready(url, proc)
    return proc, url


def _wait_ready(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}; see its log")
        try:
            if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"server at {url} not ready within {timeout}s")


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def run_load(url: str, images_dir: Path, concurrency: int, requests: int, max_seconds: float) -> dict:
    """The load generator in its own process, so its CPU use is not the server's event loop's."""
    out = subprocess.run([sys.executable, __file__, "--loadgen", url, "--images-dir", str(images_dir),
                          "--concurrency", str(concurrency), "--requests", str(requests),
                          "--max-seconds", str(max_seconds)], capture_output=True, text=True, cwd=ROOT,
                         timeout=max_seconds + 60)
    if out.returncode != 0:
        raise SystemExit(f"load generator failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


class _Conn:
    """One keep-alive HTTP/1.1 connection speaking just enough protocol to POST and read a sized reply.

    A hand-rolled client on asyncio streams costs a fraction of httpx's CPU per request, so on a small
    machine the load generator measures the server rather than itself.
    """

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        head = (f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                f"Content-Type: application/octet-stream\r\nContent-Length: {len(body)}\r\n\r\n")
        self.writer.write(head.encode() + body)
        status_line = await self.reader.readline()
        length, close = 0, False
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            if name.lower() == "content-length":
                length = int(value)
            elif name.lower() == "connection" and value.strip().lower() == "close":
                close = True
        payload = await self.reader.readexactly(length)
        if close:
            self.writer.close()
            self.writer = None
        return int(status_line.split()[1]), payload


async def _loadgen(url: str, images: list[bytes], concurrency: int, requests: int, max_seconds: float) -> dict:
    host, port = url.removeprefix("http://").split(":")
    conns = [_Conn(host, int(port)) for _ in range(concurrency)]
    # open every connection before timing: connection setup is not what is measured
    await asyncio.gather(*(c.post("/predict", images[i % len(images)]) for i, c in enumerate(conns)))
    latencies: list[float] = []
    errors: list[str] = []
    next_i = 0
    t_start = time.perf_counter()
    deadline = t_start + max_seconds

    async def worker(conn: _Conn) -> None:
        nonlocal next_i
        while next_i < requests and time.perf_counter() < deadline:
            i, next_i = next_i, next_i + 1
            t0 = time.perf_counter()
            try:
                status, payload = await conn.post("/predict", images[i % len(images)])
                if status != 200:
                    errors.append(f"{status} {payload[:100]!r}")
            except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as e:
                errors.append(repr(e))
                conn.writer = None
            latencies.append(time.perf_counter() - t0)

    await asyncio.gather(*(worker(c) for c in conns))
    elapsed = time.perf_counter() - t_start
    lat = np.array(latencies) * 1000
    return {"concurrency": concurrency, "requests": len(latencies), "seconds": elapsed,
            "throughput": len(latencies) / elapsed, "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)), "errors": len(errors), "error_examples": errors[:3]}


def batch_stats(url: str) -> tuple[float, float]:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=10).text
    got = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
           if s.name in ("tlops_batch_size_sum", "tlops_batch_size_count")}
    return got.get("tlops_batch_size_sum", 0.0), got.get("tlops_batch_size_count", 0.0)


# ---------------------------------------------------------------- eager PyTorch and direct ORT


def eager_torch(model: object, images: list[bytes], spec: object, batch: int, max_seconds: float) -> dict:
    """Images/s of eager PyTorch doing the same work per request: decode + preprocess + forward."""
    import torch

    from tlops.preprocess import load_image, preprocess

    def step(chunk: list[bytes]) -> None:
        x = torch.from_numpy(np.stack([preprocess(load_image(b, 10**8), spec) for b in chunk]))
        with torch.inference_mode():
            model(x)

    step(images[:batch])  # warm-up
    done, t0 = 0, time.perf_counter()
    while done < len(images) and time.perf_counter() - t0 < max_seconds:
        chunk = images[done:done + batch]
        step(chunk)
        done += len(chunk)
    return {"batch": batch, "throughput": done / (time.perf_counter() - t0)}


def ort_direct(fp32: Path, int8: Path | None, spec: object, images: list[bytes]) -> dict:
    from tlops.export import benchmark
    from tlops.preprocess import load_image, preprocess

    x = np.stack([preprocess(load_image(b, 10**8), spec) for b in images[:32]])
    out = {"fp32": benchmark(fp32, x, repeats=40)}
    if int8 is not None:
        out["int8"] = benchmark(int8, x, repeats=40)
    return out


# ---------------------------------------------------------------- main


def cpu_line() -> str:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((ln.split(":", 1)[1].strip() for ln in flags.splitlines() if ln.startswith("model name")),
                 platform.processor())
    vnni = "avx512_vnni" in flags or "avx_vnni" in flags
    return f"{model}, {os.cpu_count()} cores, VNNI {'yes' if vnni else 'no'}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=400, help="requests per concurrency level")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--max-seconds", type=float, default=60.0, help="cap per concurrency level")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None, help="override serve.threads (ORT intra-op threads)")
    ap.add_argument("--no-int8", action="store_true", help="skip the int8 server run")
    ap.add_argument("--loadgen", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--images-dir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.loadgen:
        images = [p.read_bytes() for p in sorted(Path(args.images_dir).iterdir())]
        print(json.dumps(asyncio.run(_loadgen(args.loadgen, images, int(args.concurrency), args.requests,
                                              args.max_seconds))))
        return
    os.chdir(ROOT)
    levels = [int(c) for c in args.concurrency.split(",")]
    from tlops import onnx_meta
    from tlops.config import load_params
    from tlops.preprocess import PreprocessSpec

    serve = load_params().serve.model_dump(exclude={"model", "host", "port"})
    if args.threads:
        serve["threads"] = args.threads
    with tempfile.TemporaryDirectory(prefix="tlops-bench-") as tmp:
        work = Path(tmp)
        images, images_note = bench_images(args.images)
        models = pipeline_models() or standin_models(work, images)
        spec = PreprocessSpec.from_json(onnx_meta.read_metadata(models.fp32)[onnx_meta.PREPROCESS])
        (work / "images").mkdir()
        for i, b in enumerate(images):
            (work / "images" / f"{i:04d}.img").write_bytes(b)
        print(f"model:  {models.note}")
        print(f"images: {images_note}; input {spec.input_size} px")
        print(f"cpu:    {cpu_line()}")
        print(f"server: max_batch={serve['max_batch']} max_wait_ms={serve['max_wait_ms']} threads={serve['threads']}")

        results = {}
        for name, path in (("fp32", models.fp32), ("int8", models.int8)):
            if path is None or (name == "int8" and args.no_int8):
                continue
            proc, url = start_server(path, work, serve)
            try:
                for c in levels if name == "fp32" else [8]:
                    before = batch_stats(url)
                    r = run_load(url, work / "images", c, args.requests, args.max_seconds)
                    after = batch_stats(url)
                    r["mean_batch"] = (after[0] - before[0]) / max(1.0, after[1] - before[1])
                    results[(name, c)] = r
            finally:
                stop_server(proc)

        print(f"\nHTTP POST /predict, one image per request, {args.requests} requests per level")
        print(f"{'model':<6}{'conc':>5}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}{'batch':>7}")
        for (name, c), r in results.items():
            print(f"{name:<6}{c:>5}{r['throughput']:>9.1f}{r['p50_ms']:>9.1f}{r['p99_ms']:>9.1f}{r['errors']:>8}"
                  f"{r['mean_batch']:>7.1f}")
            for e in r["error_examples"]:
                print(f"      error: {e}")

        import torch

        # Eager PyTorch at its best thread count: OpenMP threads can thrash when cores are shared.
        print(f"\neager PyTorch {torch.__version__}, decode + preprocess + forward in one process, no HTTP:")
        eager = {}
        for b in (1, 8):
            for threads in sorted({1, os.cpu_count() or 1}):
                torch.set_num_threads(threads)
                r = eager_torch(models.eager, images * 4, spec, b, min(20.0, args.max_seconds))
                print(f"  batch {b:>2}, {threads} threads: {r['throughput']:.1f} images/s")
                if r["throughput"] > eager.get(b, {"throughput": 0.0})["throughput"]:
                    eager[b] = r
        if ("fp32", 8) in results:
            s8 = results[("fp32", 8)]["throughput"]
            print(f"service at concurrency 8 / best eager PyTorch batch 1: {s8 / eager[1]['throughput']:.2f}x"
                  f"   (/ best eager batch 8: {s8 / eager[8]['throughput']:.2f}x)")

        direct = ort_direct(models.fp32, models.int8, spec, images)
        print("\nONNX Runtime directly (tlops.export.benchmark, 32 preprocessed images):")
        for name, r in direct.items():
            print(f"  {name}: batch-1 latency {r['latency_ms']:.2f} ms, batch-32 throughput {r['throughput_ips']:.0f}"
                  " images/s")
        if "int8" in direct:
            speed = direct["int8"]["throughput_ips"] / direct["fp32"]["throughput_ips"]
            lat = direct["fp32"]["latency_ms"] / direct["int8"]["latency_ms"]
            print(f"  int8 / fp32: {speed:.2f}x throughput, {lat:.2f}x batch-1 latency")
            if ("int8", 8) in results and ("fp32", 8) in results:
                http = results[("int8", 8)]["throughput"] / results[("fp32", 8)]["throughput"]
                print(f"  through the service at concurrency 8: {http:.2f}x")
        total_errors = sum(r["errors"] for r in results.values())
        print(f"\nerrors in total: {total_errors}")


if __name__ == "__main__":
    main()
