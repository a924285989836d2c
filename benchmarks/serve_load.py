"""stx serve under load, on loopback: 1, 8 and 50 concurrent clients each POSTing a 1024×680 image
to /stylize/<model> (a default-width TransformerNet, untrained: the cost is what matters), while
/health is polled. Prints per client count: status codes, median and 95th-percentile latency of
the answered requests, the slowest /health answer and the server's peak resident memory.

    python benchmarks/serve_load.py [--clients 1 8 50] [--workers 2] [--queue 8]
"""

from __future__ import annotations

import argparse
import io
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import requests
import torch
from PIL import Image

from stx.fast import export
from stx.fast.transformer import TransformerNet


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 50])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--queue", type=int, default=8)
    args = parser.parse_args()
    buffer = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((680, 1024, 3)) * 255).astype(np.uint8)).save(buffer, "PNG")
    upload = buffer.getvalue()
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        model = export.export_torchscript(TransformerNet(), Path(folder) / export.TORCHSCRIPT_FILE)
        port = free_port()
        server = subprocess.Popen(
            [str(Path(sys.executable).with_name("stx")), "serve", "--model", f"m={model}", "--port", str(port),
             "--device", "cpu", "--workers", str(args.workers), "--queue", str(args.queue)],
            cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        try:
            while True:
                try:
                    requests.get(f"{url}/health", timeout=2)
                    break
                except requests.ConnectionError:
                    time.sleep(0.5)
            print(f"stx serve --workers {args.workers} --queue {args.queue}; 1024×680 PNG uploads, CPU")
            for clients in args.clients:
                measure(url, upload, clients, psutil.Process(server.pid))
        finally:
            server.terminate()
            server.wait(30)


def measure(url: str, upload: bytes, clients: int, server: psutil.Process) -> None:
    done = threading.Event()
    peak, health = [0], [0.0]

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], server.memory_info().rss)
            started = time.perf_counter()
            requests.get(f"{url}/health", timeout=60)
            health[0] = max(health[0], time.perf_counter() - started)
            time.sleep(0.1)

    def post(_: int) -> tuple[int, float]:
        started = time.perf_counter()
        response = requests.post(f"{url}/stylize/m", files={"image": ("x.png", upload)}, timeout=600)
        return response.status_code, time.perf_counter() - started

    watcher = threading.Thread(target=watch)
    watcher.start()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(post, range(clients)))
    done.set()
    watcher.join()
    answered = sorted(seconds for status, seconds in results if status == 200)
    p95 = answered[min(len(answered) - 1, int(0.95 * len(answered)))] if answered else float("nan")
    print(f"{clients:3d} clients: {dict(Counter(status for status, _ in results))}  latency of 200s: median "
          f"{statistics.median(answered) if answered else float('nan'):.2f} s, p95 {p95:.2f} s  | slowest /health "
          f"{health[0] * 1000:.0f} ms | server peak RSS {peak[0] / 2**30:.2f} GiB", flush=True)


if __name__ == "__main__":
    main()
