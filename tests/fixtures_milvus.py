"""Milvus fixtures: a Milvus Lite database under tmp_path and, where it can start, a real server.

`exit_db_backend` is parametrised over "lite" and "server", so every test that uses `exit_db` (or
`exit_db_uri`) runs once on Milvus Lite and once on a real Milvus 2.3.5 server. The server is started once
per session (`milvus_server_uri`, ~10-20 s) from `.milvus-server-venv` (scripts/setup_milvus_server.sh);
set RAEE_MILVUS_URI (and RAEE_MILVUS_TOKEN) to use an existing server instead, e.g. the one from
docker-compose.milvus.yml. Where no server can start, the server half is skipped with the reason.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator

import numpy as np
import pytest

from milvus.exit_db import ExitDB, ExitDBError, ExitDBMeta
from milvus.server import EmbeddedMilvusServer, MilvusServerUnavailable
from raee.records import ExitRecords

TEST_META = ExitDBMeta(backbone="tiny-llama", encoder="test-enc", task="sst2", task_digest="t0", n_layers=3,
                       dim=8, n_classes=2, metric="L2")


def make_exit_records(ids: np.ndarray, meta: ExitDBMeta = TEST_META) -> ExitRecords:
    """Deterministic records: the same id always gets the same vector, exit probs, label and text."""
    ids = np.asarray(ids, dtype=np.int64)
    x = ids[:, None].astype(np.float64)
    vectors = np.sin(x * (np.arange(meta.dim) + 1) * 0.37).astype(np.float32)  # (N, D)
    probs = ((np.cos(x * (np.arange(meta.n_layers + 1) + 2)) + 1) / 2).astype(np.float32)  # (N, L+1)
    return ExitRecords(ids=ids, vectors=vectors, exit_probs=probs, labels=ids % 2,
                       texts=tuple(f"text {i}" for i in ids.tolist()))


EMBEDDED_ROOT_TOKEN = "root:Milvus"  # 2.3.5's default root credentials (the session server has auth on)


@pytest.fixture(scope="session")
def milvus_server_token() -> str | None:
    """Token for `milvus_server_uri`: RAEE_MILVUS_TOKEN with RAEE_MILVUS_URI, else the embedded root's."""
    return os.environ.get("RAEE_MILVUS_TOKEN") if os.environ.get("RAEE_MILVUS_URI") else EMBEDDED_ROOT_TOKEN


@pytest.fixture(scope="session")
def milvus_server_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URI of a real Milvus server for the whole session; skips (with the reason) where none can start.

    The embedded server runs with authorization on, like docker-compose.milvus.yml, so every server test
    also exercises the token path.
    """
    if os.environ.get("RAEE_MILVUS_URI"):
        yield os.environ["RAEE_MILVUS_URI"]
        return
    server = EmbeddedMilvusServer(tmp_path_factory.mktemp("milvus-server"), authorization=True)
    try:
        server.start()
    except MilvusServerUnavailable as exc:
        pytest.skip(f"real Milvus server unavailable: {exc}")
    try:
        yield server.uri
    finally:
        server.cleanup()


@pytest.fixture(params=["lite", pytest.param("server", marks=pytest.mark.milvus_server)])
def exit_db_backend(request: pytest.FixtureRequest) -> str:
    """"lite" or "server": which Milvus the store tests run against."""
    return request.param


@pytest.fixture
def exit_db_uri(exit_db_backend: str, request: pytest.FixtureRequest, tmp_path) -> str:
    """A fresh Milvus Lite file under tmp_path, or the session's server."""
    if exit_db_backend == "lite":
        return str(tmp_path / "raee.db")
    return request.getfixturevalue("milvus_server_uri")


@pytest.fixture
def exit_db_token(exit_db_backend: str, request: pytest.FixtureRequest) -> str | None:
    """None for Lite, the server's token otherwise."""
    return None if exit_db_backend == "lite" else request.getfixturevalue("milvus_server_token")


@pytest.fixture
def exit_db_collection(request: pytest.FixtureRequest) -> str:
    """A collection name unique to the test (the server is shared by the whole session)."""
    return re.sub(r"[^0-9a-zA-Z_]", "_", f"t_{request.node.name}")[:200]


@pytest.fixture
def exit_db(exit_db_backend: str, exit_db_uri: str, exit_db_collection: str,
            exit_db_token: str | None) -> Iterator[ExitDB]:
    """An empty ExitDB with TEST_META (dim 8, 3 layers, L2) on Lite or the server; dropped afterwards.

    On the server one collection is reused and emptied per test: loading a new collection on 2.3.5 takes
    ~3 s (its load observer ticks once a second), which would triple the suite's run time.
    """
    if exit_db_backend == "server":
        db = ExitDB(exit_db_uri, collection="store_suite", meta=TEST_META, token=exit_db_token)
        db._client.delete(db.collection, filter="id >= 0")  # test record ids are non-negative
        if db.count() != 0:
            pytest.fail("could not empty the shared server collection 'store_suite'")
        yield db
        db.close()
        return
    db = ExitDB(exit_db_uri, collection=exit_db_collection, meta=TEST_META, token=exit_db_token)
    try:
        yield db
    finally:
        if db._client is not None:
            try:
                db.drop()
            except ExitDBError:
                pass  # the test may have dropped it already
        db.close()
