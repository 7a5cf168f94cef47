"""Plain data that crosses package boundaries: batches of exit records and retrieved neighbours.

numpy only, so `raee/` stays free of storage and Ray imports while `milvus/`, `collectors/` and
`inference_workers/` agree on one shape for what they exchange.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ExitRecords:
    """A batch of N build-time records (paper Algorithm 3.1), one per labelled training example."""

    ids: np.ndarray  # (N,) int64, deterministic from (task, split, example index): see record_ids
    vectors: np.ndarray  # (N, D) float32 key embeddings
    exit_probs: np.ndarray  # (N, L+1) float32 gold-label prob per layer, 0 where that layer is wrong
    labels: np.ndarray  # (N,) int64 gold labels
    texts: tuple[str, ...]  # (N,) source sentences, for explanations
    layer_probs: np.ndarray | None = None  # (N, L+1, C) float32 label distribution per layer (fused policy)

    def __post_init__(self) -> None:
        n = len(self.ids)
        sizes = {"vectors": len(self.vectors), "exit_probs": len(self.exit_probs), "labels": len(self.labels),
                 "texts": len(self.texts)}
        if self.layer_probs is not None:
            sizes["layer_probs"] = len(self.layer_probs)
        bad = {name: size for name, size in sizes.items() if size != n}
        if bad:
            raise ValueError(f"ExitRecords fields disagree on N: ids has {n}, {bad}")

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class Neighbours:
    """Top-K retrieval results for N queries, batch-first, ready for Eq. 4-6 without loops.

    Queries with fewer than K hits are padded: ids -1, distances +inf, exit_probs 0, labels -1.
    """

    ids: np.ndarray  # (N, K) int64
    distances: np.ndarray  # (N, K) float32, smaller is closer (similarities are converted)
    exit_probs: np.ndarray  # (N, K, L+1) float32 gold-label prob per layer, 0 where wrong
    labels: np.ndarray  # (N, K) int64
    texts: tuple[tuple[str, ...], ...] | None = None  # (N, K) source texts when asked for
    layer_probs: np.ndarray | None = None  # (N, K, L+1, C) float32 label distribution per layer, when stored

    @property
    def valid(self) -> np.ndarray:
        """(N, K) bool: True where a real hit (not padding) sits."""
        return self.ids >= 0


_SPLIT_CODES = {"train": 0, "test": 1, "dev": 2}


def record_ids(task: str, split: str, example_idx: np.ndarray) -> np.ndarray:
    """ids[i] = hash(task) * 2**32 + split_code * 2**28 + example_idx[i]; stable across runs and machines.

    example_idx (N,) non-negative ints < 2**28 -> (N,) int64. The task hash is a fixed 31-bit digest, so
    ids from different tasks never collide and a re-run of a build writes the same ids (idempotent upserts).
    """
    import zlib

    if split not in _SPLIT_CODES:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(_SPLIT_CODES)}")
    idx = np.asarray(example_idx, dtype=np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= 2**28):
        raise ValueError("example indices must lie in [0, 2**28)")
    task_code = np.int64(zlib.crc32(task.encode()) & 0x7FFFFFFF)
    return (task_code << np.int64(32)) + (np.int64(_SPLIT_CODES[split]) << np.int64(28)) + idx
