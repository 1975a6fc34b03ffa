"""Load on the web server: N concurrent clients on loopback, batching on and off, same model.

    python -m bench.serve_load --checkpoint outputs/synthetic [--clients 8] [--requests 64]
    python -m bench.serve_load --url http://127.0.0.1:7860 [--clients 8]   # a running server

With --checkpoint it starts ``python -m m2sa_jax.serve`` twice on free loopback ports, once
with ``--max-batch 8`` (batching on) and once with ``--max-batch 1`` (off), waits for
/api/health, sends ``--requests`` POST /api/segment from ``--clients`` threads (a bounded count,
each with a timeout), stops the server by its pid, and prints for each: p50/p95 latency,
requests/s (after one unmeasured round of --clients requests), and how many were answered, refused with 503, or failed (anything else; must be 0),
then the throughput ratio. Images and questions are the model's val-split examples when its
run config names them, else a generated synthetic val split.
"""

from __future__ import annotations

import argparse
import io
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time



def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _examples(checkpoint: str | None, tmp: str) -> list[tuple[bytes, str]]:
    from m2sa_jax.data import synthetic
    from m2sa_jax.inference.service import examples_from, find_examples

    pairs = find_examples(checkpoint)[0] if checkpoint else []
    if not pairs:
        synthetic.write_split(tmp, "val", 8, seed=1)
        pairs = examples_from(tmp, limit=8)
    return [(open(path, "rb").read(), question) for path, question in pairs]


def _wait_ready(url: str, proc: subprocess.Popen | None, timeout_s: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/api/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url} not ready in {timeout_s:.0f} s")


def load(url: str, pairs, clients: int, requests: int, timeout_s: float) -> dict:
    import httpx

    latencies, codes, lock = [], {"ok": 0, "503": 0, "failed": 0}, threading.Lock()
    errors: dict[str, int] = {}
    counter = iter(range(requests))

    def client():
        with httpx.Client(timeout=timeout_s) as http:
            for k in counter:
                image, question = pairs[k % len(pairs)]
                t0 = time.perf_counter()
                try:
                    r = http.post(url + "/api/segment", data={"question": question, "masks": "rle"},
                                  files={"image": ("image.png", io.BytesIO(image), "image/png")})
                    status, why = r.status_code, r.text[:200]
                except httpx.HTTPError as e:
                    status, why = -1, f"{type(e).__name__}: {e}"
                dt = time.perf_counter() - t0
                with lock:
                    if status == 200:
                        codes["ok"] += 1
                        latencies.append(dt)
                    elif status == 503:
                        codes["503"] += 1
                    else:
                        codes["failed"] += 1
                        errors[f"{status} {why}"] = errors.get(f"{status} {why}", 0) + 1

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    import numpy as np

    lat = np.array(latencies) if latencies else np.array([np.nan])
    return dict(p50=float(np.percentile(lat, 50)), p95=float(np.percentile(lat, 95)),
                rps=codes["ok"] / wall, wall=wall, errors=errors, **codes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", help="start servers for this model (batching on and off)")
    ap.add_argument("--url", help="or load a server that is already running")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    ap.add_argument("--max-batch", type=int, default=8, help="batch size of the 'on' server")
    ap.add_argument("--server-args", default="", help="extra flags for the servers, one string")
    args = ap.parse_args()
    if bool(args.checkpoint) == bool(args.url):
        raise SystemExit("give --checkpoint (start servers) or --url (a running server)")

    tmp = tempfile.mkdtemp(prefix="serve-load-")
    pairs = _examples(args.checkpoint, tmp)
    print(f"{args.requests} requests from {args.clients} clients, {len(pairs)} image/question pairs")
    if args.url:
        _wait_ready(args.url, None, 60)
        runs = {"running server": load(args.url, pairs, args.clients, args.requests, args.timeout)}
    else:
        runs = {}
        for name, batch in (("batching on", args.max_batch), ("batching off", 1)):
            port = _free_port()
            url = f"http://127.0.0.1:{port}"
            cmd = [sys.executable, "-m", "m2sa_jax.serve", "--checkpoint", args.checkpoint,
                   "--port", str(port), "--max-batch", str(batch),
                   "--max-queue", str(max(64, args.clients * 2)), "--log-level", "warning",
                   *args.server_args.split()]
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                _wait_ready(url, proc, 600)
                load(url, pairs, args.clients, min(args.clients, args.requests), args.timeout)
                runs[name] = load(url, pairs, args.clients, args.requests, args.timeout)
            finally:
                os.kill(proc.pid, signal.SIGTERM)
                proc.wait(timeout=60)
    print(f"{'':16s} {'p50 s':>8s} {'p95 s':>8s} {'req/s':>8s} {'answered':>9s} {'503':>5s} "
          f"{'failed':>7s}")
    for name, r in runs.items():
        print(f"{name:16s} {r['p50']:8.3f} {r['p95']:8.3f} {r['rps']:8.2f} {r['ok']:9d} "
              f"{r['503']:5d} {r['failed']:7d}")
    if len(runs) == 2:
        on, off = runs["batching on"], runs["batching off"]
        print(f"throughput, batching on / off: {on['rps'] / max(off['rps'], 1e-9):.2f}×")
    for name, r in runs.items():
        for why, n in r["errors"].items():
            print(f"{name}: {n} × {why}")
    if any(r["failed"] for r in runs.values()):
        raise SystemExit("some requests failed")


if __name__ == "__main__":
    main()
