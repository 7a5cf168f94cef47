"""Live growth on the storage side: ids of examples added after a build, finding them, carrying them forward.

Examples added to a served build (`raee add`, POST /v1/examples) get ids from their content, not from a file
row: a digest of (task, text, text pair, label value). Adding the same example again gives the same id, so
it changes nothing. The ids live where `raee.records.record_ids` never goes: record_ids puts the split code
(0 train, 1 test, 2 dev) in bits 28-31 of an id; added ids put 3..15 there and fill the other bits from the
digest (62.7 bits: two different added examples share an id with probability ~ n^2 / 2^63.7).

A rebuild writes a new version from the training file, which does not hold the added examples, so
`carry_added` copies them from the version being replaced - unchanged, and only when both versions have the
same setup (`ExitDBMeta`): a text's record is a function of the backbone, key encoder, task spec and exit
head alone. When the setup changed (e.g. freshly fitted off-ramps), they are not carried: add them again
(idempotent). Examples added between the copy and the switch land in the old version only.

When a write is visible: `wait_visible` polls with Milvus' "Eventually" consistency, the weakest a reader can
use, until every written id is returned. Once it returns, every reader of the collection - other processes
and other serving replicas, whose "Session" reads of writes they did not make are "Eventually" reads - finds
the records (one in-memory replica per collection, the default `load_collection`).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from milvus.exit_db import ExitDB, ExitDBError, milvus_errors, open_client

_SPLIT_SHIFT, _SPLIT_MASK = 28, 0xF  # record_ids' split code field (bits 28-31)
_FIRST_ADDED_CODE, _N_ADDED_CODES = 3, 13  # record_ids uses codes 0..2; added examples 3..15
_ITERATOR_BATCH = 16384  # Milvus' largest query page


class _NoMvccWarning(logging.Filter):
    """Milvus Lite 3.2 and the 2.3.5 server return no MVCC timestamp to pymilvus 3's query iterator, which then
    uses the client's clock (a read at least as fresh) and warns on every iterator; the warning says nothing."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "failed to get mvccTs" not in record.getMessage()


logging.getLogger("pymilvus.client.iterator.query_iterator").addFilter(_NoMvccWarning())


@dataclass(frozen=True)
class AddedExamples:
    """What adding examples to a build did: which ids, how many were new, stored already, or left out."""

    task: str
    collection: str  # the version written
    ids: tuple[int, ...]  # one per given example, in order (also those left out)
    n_new: int  # written now
    n_existing: int  # stored already with the same content: not written again
    n_skipped: int  # left out: the build keeps only examples the full model gets right (--only-correct)
    seconds_to_visible: float = 0.0  # from the write until an "Eventually" read returned every new id

    def to_dict(self) -> dict:
        return {"task": self.task, "collection": self.collection, "ids": list(self.ids), "n_new": self.n_new,
                "n_existing": self.n_existing, "n_skipped": self.n_skipped,
                "seconds_to_visible": round(self.seconds_to_visible, 3)}


def added_ids(task: str, texts: Sequence[str], pairs: Sequence[str] | None, labels: Sequence[str]) -> np.ndarray:
    """ids[i] from sha256(task, texts[i], pairs[i], labels[i]) with bits 28-31 in 3..15 -> (N,) int64 >= 0.

    labels are label values as the task spells them ("1", "positive"), so the id does not depend on class order."""
    pairs = pairs if pairs is not None else [None] * len(texts)
    ids = np.empty(len(texts), dtype=np.int64)
    for i, (text, pair, label) in enumerate(zip(texts, pairs, labels, strict=True)):
        key = "\x1e".join([task, text, "\x00" if pair is None else pair, label]).encode("utf-8")
        v = int.from_bytes(hashlib.sha256(key).digest()[:16], "big")
        code = _FIRST_ADDED_CODE + (v >> 64) % _N_ADDED_CODES  # 3..15
        high = (v >> 28) & 0x7FFFFFFF  # bits 32-62 (31 bits): the id stays positive
        ids[i] = (high << 32) | (code << _SPLIT_SHIFT) | (v & ((1 << 28) - 1))
    return ids


def is_added(ids: np.ndarray) -> np.ndarray:
    """(N,) bool: True for ids made by added_ids, False for record_ids' (task, split, row) ids."""
    ids = np.asarray(ids, dtype=np.int64)
    return ((ids >> _SPLIT_SHIFT) & _SPLIT_MASK) >= _FIRST_ADDED_CODE


def stored_ids(uri: str, collection: str, *, token: str | None = None, timeout_s: float = 60.0) -> np.ndarray:
    """Every id stored in `collection` (sorted), read page by page with Strong consistency."""
    with open_client(uri, token=token, timeout_s=timeout_s, operation="list ids") as client:
        found: list[int] = []
        with milvus_errors("list ids", collection):
            client.load_collection(collection, timeout=timeout_s)
            pages = client.query_iterator(collection, batch_size=_ITERATOR_BATCH, filter="id >= 0",
                                          output_fields=["id"], consistency_level="Strong", timeout=timeout_s)
            try:
                while page := pages.next():
                    found.extend(row["id"] for row in page)
            finally:
                pages.close()
    return np.sort(np.asarray(found, dtype=np.int64))


def count_added(uri: str, collection: str, *, token: str | None = None) -> int:
    """How many added examples `collection` holds."""
    return int(is_added(stored_ids(uri, collection, token=token)).sum())


def carry_added(uri: str, source: str | None, into: ExitDB, *, token: str | None = None, batch_rows: int = 1000) -> int:
    """Copy the added examples of collection `source` into `into` unchanged; how many were copied.

    Nothing is copied when source is None or `into` itself, or when its setup differs from into's (the records
    would not be what `into`'s setup computes; add those examples again)."""
    if source is None or source == into.collection:
        return 0
    with ExitDB(uri, collection=source, meta=None, create=False, token=token) as old:
        if old.meta != into.meta:
            return 0
        ids = stored_ids(uri, source, token=token)
        ids = ids[is_added(ids)]
        for start in range(0, len(ids), batch_rows):
            into.upsert(old.get(ids[start : start + batch_rows]))
    return len(ids)


def wait_visible(uri: str, collection: str, ids: np.ndarray, *, token: str | None = None,
                 timeout_s: float = 60.0) -> float:
    """Block until an "Eventually" read of `collection` returns every id; the seconds it took.

    ExitDBError after timeout_s (the records are written, but readers may not see them yet)."""
    wanted = sorted({int(i) for i in np.asarray(ids).reshape(-1)})
    start = time.monotonic()
    if not wanted:
        return 0.0
    with open_client(uri, token=token, timeout_s=min(timeout_s, 10.0), operation="wait visible") as client:
        while True:
            seen: set[int] = set()
            for lo in range(0, len(wanted), 1000):
                chunk = wanted[lo : lo + 1000]
                with milvus_errors("wait visible", collection):
                    rows = client.query(collection, filter=f"id in {chunk}", output_fields=["id"],
                                        consistency_level="Eventually", timeout=min(timeout_s, 10.0))
                seen.update(int(r["id"]) for r in rows)
            if len(seen) == len(wanted):
                return time.monotonic() - start
            if time.monotonic() - start > timeout_s:
                raise ExitDBError("wait visible", collection, f"{len(wanted) - len(seen)} of {len(wanted)} written "
                                                              f"records not visible to readers after {timeout_s:.0f} s")
            time.sleep(0.05)
