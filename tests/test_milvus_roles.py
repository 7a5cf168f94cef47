"""Milvus roles on the real server with authentication: the inference workers' reader role searches but cannot
write, the collectors' writer role builds, neither can drop (milvus/roles.py)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from pymilvus import MilvusClient

from milvus.exit_db import ExitDB, ExitDBError
from milvus.roles import READER_PRIVILEGES, WRITER_PRIVILEGES, create_roles, drop_roles, main
from tests.fixtures_milvus import TEST_META, make_exit_records

pytestmark = pytest.mark.reliability

NAMES = {"reader_user": "t_reader", "writer_user": "t_writer", "reader_role": "t_reader_role",
         "writer_role": "t_writer_role"}  # not the default names: leave a shared server's real roles alone


@pytest.fixture
def role_tokens(milvus_server_uri: str, milvus_server_token: str | None) -> Iterator[dict[str, str]]:
    """{"reader": token, "writer": token, "root": token} on the session server; roles and users dropped after."""
    if milvus_server_token is None:
        pytest.skip("the server under test has no authentication")
    drop_roles(milvus_server_uri, milvus_server_token, **NAMES)  # a crashed earlier run may have left them
    tokens = create_roles(milvus_server_uri, milvus_server_token, reader_password="reader-pw-1",
                          writer_password="writer-pw-1", **NAMES)
    try:
        yield {**tokens, "root": milvus_server_token}
    finally:
        drop_roles(milvus_server_uri, milvus_server_token, **NAMES)


@pytest.mark.milvus_server
def test_reader_searches_but_cannot_write_and_writer_builds(milvus_server_uri: str, role_tokens: dict[str, str]):
    uri, collection = milvus_server_uri, "roles_shared"
    queries = make_exit_records(np.arange(3)).vectors
    with ExitDB(uri, collection=collection, meta=TEST_META, token=role_tokens["writer"]) as db:  # writer creates
        assert db.upsert(make_exit_records(np.arange(30))) == 30
        db.flush()
        expected = db.search(queries, k=4)

    with ExitDB(uri, collection=collection, meta=TEST_META, token=role_tokens["reader"]) as db:
        assert db.count() == 30
        np.testing.assert_array_equal(db.search(queries, k=4).ids, expected.ids)
        with pytest.raises(ExitDBError, match=r"upsert on collection 'roles_shared'.*permission denied.*Upsert"):
            db.upsert(make_exit_records(np.arange(30, 35)))
        with pytest.raises(ExitDBError, match=r"drop.*permission denied.*DropCollection"):
            db.drop()
        assert db.count() == 30  # nothing written
    with pytest.raises(ExitDBError, match=r"open on collection 'roles_reader_new'.*permission denied.*Create"):
        ExitDB(uri, collection="roles_reader_new", meta=TEST_META, token=role_tokens["reader"])

    with ExitDB(uri, collection=collection, meta=TEST_META, token=role_tokens["writer"]) as db:
        assert db.upsert(make_exit_records(np.arange(25, 40))) == 15  # re-running part of a build is fine
        assert db.count() == 40
        with pytest.raises(ExitDBError, match=r"permission denied.*DropCollection"):
            db.drop()  # only root drops
    with ExitDB(uri, collection=collection, meta=TEST_META, token=role_tokens["root"]) as db:
        db.drop()
    client = MilvusClient(uri=uri, token=role_tokens["root"])
    try:
        assert not client.has_collection("roles_reader_new")
    finally:
        client.close()


@pytest.mark.milvus_server
def test_roles_are_idempotent_and_hold_exactly_their_privileges(milvus_server_uri: str, role_tokens: dict[str, str]):
    again = create_roles(milvus_server_uri, role_tokens["root"], reader_password="reader-pw-1",
                         writer_password="writer-pw-1", **NAMES)
    assert again == {"reader": role_tokens["reader"], "writer": role_tokens["writer"]}
    client = MilvusClient(uri=milvus_server_uri, token=role_tokens["root"])
    try:
        for role, privileges in (("t_reader_role", READER_PRIVILEGES), ("t_writer_role", WRITER_PRIVILEGES)):
            grants = client.describe_role(role)["privileges"]
            assert {(g["object_type"], g["privilege"]) for g in grants} == set(privileges)
    finally:
        client.close()


def test_command_line_takes_secrets_from_the_environment_only(monkeypatch, capsys):
    for name in ("RAEE_MILVUS_ROOT_TOKEN", "RAEE_READER_PASSWORD", "RAEE_WRITER_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    assert main(["--uri", "http://127.0.0.1:1"]) == 2
    assert "RAEE_MILVUS_ROOT_TOKEN" in capsys.readouterr().err
