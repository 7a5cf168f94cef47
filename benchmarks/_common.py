"""Shared benchmark plumbing: one JSON provenance line per run, medians of alternated repeats."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable

import numpy as np


def provenance(**fields) -> dict:
    """Git SHA, device and library versions: never compare numbers across runs without these."""
    import torch
    import transformers

    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             check=False).stdout.strip()
    except OSError:
        sha = "unknown"
    device = "cuda:" + torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {"git_sha": sha or "unknown", "device": device, "torch": torch.__version__,
            "transformers": transformers.__version__, "torch_threads": torch.get_num_threads(), **fields}


def timed_alternating(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, np.ndarray]:
    """Seconds per call of each fn, alternating them in every repeat so machine noise hits all alike."""
    import torch

    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return {name: np.array(t) for name, t in times.items()}


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def search_latency_ms(db, queries: np.ndarray, batch: int, repeats: int, k: int) -> tuple[float, float]:
    """p50, p99 in ms of one `db.search` call with `batch` queries, over `repeats` calls after 3 warm-ups."""
    for i in range(3):
        db.search(queries[i * batch : (i + 1) * batch], k=k)
    times = []
    for r in range(repeats):
        start = (r * batch) % (len(queries) - batch + 1)
        t0 = time.perf_counter()
        db.search(queries[start : start + batch], k=k)
        times.append(time.perf_counter() - t0)
    ms = np.array(times) * 1000
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))
