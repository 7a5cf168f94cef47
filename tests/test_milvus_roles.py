"""Milvus roles on the real server with authentication: the inference workers' reader role searches but cannot
write, the collectors' writer role builds, neither can drop (milvus/roles.py); a team's roles reach only the
team's own database."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import numpy as np
import pytest
from pymilvus import MilvusClient

from milvus.admin import drop_build, list_collections
from milvus.exit_db import BuildVariant, ExitDB, ExitDBError, list_exit_dbs
from milvus.roles import (
    _PRIVILEGE_RPCS,
    READER_PRIVILEGES,
    WRITER_PRIVILEGES,
    _privilege_granted,
    create_roles,
    create_team,
    drop_roles,
    drop_team,
    main,
    open_public_role,
    public_role_restricted,
    team_uri,
)
from milvus.transfer import export_build
from milvus.versions import begin_version, finish_version
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
def test_create_roles_returns_once_the_proxy_applies_every_grant(milvus_server_uri: str, role_tokens: dict[str, str]):
    """The probe behind create_roles' wait tells a refused privilege from an applied one, for each privilege a
    role holds: the writer's token passes every check, the reader's is refused each writer-only one."""
    writer_only = [p for _, p in WRITER_PRIVILEGES if (_, p) not in READER_PRIVILEGES]
    assert {p for _, p in WRITER_PRIVILEGES} <= set(_PRIVILEGE_RPCS)  # every grant has a probe
    reader = {**{p: True for _, p in READER_PRIVILEGES}, **dict.fromkeys(writer_only, False)}
    for kind, expected in (("writer", {p: True for _, p in WRITER_PRIVILEGES}), ("reader", reader)):
        client = MilvusClient(uri=milvus_server_uri, token=role_tokens[kind])
        try:
            assert {p: _privilege_granted(client, p, "", 10.0) for p in expected} == expected, kind
        finally:
            client.close()
    root = MilvusClient(uri=milvus_server_uri, token=role_tokens["root"])
    try:
        assert "raee_roles_probe_missing" not in root.list_collections()  # probing creates nothing
    finally:
        root.close()


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


# ---- teams: one database each, roles scoped to it ----------------------------------------------------------

TEAMS = ("t_team_a", "t_team_b")


def _versioned_build(uri: str, name: str, ids: np.ndarray, token: str) -> str:
    """A versioned build of TEST_META records with `token` (the writer's): the version switched in."""
    target = begin_version(uri, name, TEST_META, BuildVariant(), data_digest=f"d{len(ids)}", token=token)
    with ExitDB(uri, collection=target.collection, meta=TEST_META, token=token, properties=target.properties) as db:
        n = db.upsert(make_exit_records(ids))
        db.flush()
        counted = db.count()
    return finish_version(uri, target, expected=n, counted=counted, token=token).after


@pytest.fixture
def teams(milvus_server_uri: str, milvus_server_token: str | None) -> Iterator[dict[str, dict[str, str]]]:
    """Two teams on the session server, each with its database, reader and writer; the public role restricted.

    Afterwards their builds, users, roles and databases are dropped and the public role gets back what the
    server started it with, so other tests see the server as it was."""
    if milvus_server_token is None:
        pytest.skip("the server under test has no authentication")
    uri, root = milvus_server_uri, milvus_server_token
    _drop_teams(uri, root)  # a crashed earlier run may have left them
    try:
        yield {team: create_team(uri, root, team, reader_password=f"{team}-read-1", writer_password=f"{team}-write-1")
               for team in TEAMS}
    finally:
        _drop_teams(uri, root)
        open_public_role(uri, root)


def _drop_teams(uri: str, root: str) -> None:
    for team in TEAMS:
        try:
            drop_build(team_uri(uri, team), "shared_build", token=root)
        except ExitDBError:
            pass
        drop_team(uri, root, team, drop_database=True)


@pytest.mark.milvus_server
def test_a_teams_reader_cannot_list_search_or_read_another_teams_database(milvus_server_uri: str,
                                                                         milvus_server_token: str, teams, tmp_path):
    a, b = teams["t_team_a"], teams["t_team_b"]
    assert a["uri"] == f"{milvus_server_uri}/t_team_a"
    assert public_role_restricted(milvus_server_uri, milvus_server_token)
    # Each team builds "shared_build" in its own database with its own writer (versioned: the writer switches it).
    assert _versioned_build(a["uri"], "shared_build", np.arange(10), a["writer"]) == "shared_build_v1"
    assert _versioned_build(a["uri"], "shared_build", np.arange(12), a["writer"]) == "shared_build_v2"
    assert _versioned_build(b["uri"], "shared_build", np.arange(100, 130), b["writer"]) == "shared_build_v1"
    queries = make_exit_records(np.arange(3)).vectors

    assert [x.collection for x in list_exit_dbs(a["uri"], token=a["reader"])] == ["shared_build"]
    with ExitDB(a["uri"], collection="shared_build", meta=None, create=False, token=a["reader"]) as db:
        assert db.count() == 12 and db.search(queries, k=1).ids[:, 0].tolist() == [0, 1, 2]

    refused = r"permission denied.*Privilege{}: permission deny to t_team_a_reader.*own database"
    with pytest.raises(ExitDBError, match=r"list on collection 't_team_b\.\*'.*" + refused.format("ShowCollections")):
        list_exit_dbs(b["uri"], token=a["reader"])
    with pytest.raises(ExitDBError, match=r"list on collection 't_team_b\.\*'.*" + refused.format("ShowCollections")):
        list_collections(b["uri"], token=a["reader"])
    with pytest.raises(ExitDBError, match=r"open on collection 't_team_b\.shared_build'.*"
                                          + refused.format("DescribeCollection")):
        ExitDB(b["uri"], collection="shared_build", meta=None, create=False, token=a["reader"])  # to search or read
    with pytest.raises(ExitDBError, match=refused.format("DescribeCollection")):
        export_build(b["uri"], "shared_build", tmp_path / "stolen.parquet", token=a["reader"])
    with pytest.raises(ExitDBError, match=r"permission deny to t_team_a_writer"):
        _versioned_build(b["uri"], "shared_build", np.arange(5), a["writer"])  # nor may A's writer write there
    # The data plane refuses too, for a client that skips raee's checks and knows the collection's name.
    raw = MilvusClient(uri=milvus_server_uri, token=a["reader"], db_name="t_team_b")
    try:
        for call, privilege in ((lambda: raw.search("shared_build_v1", data=[queries[0].tolist()], limit=1,
                                                    anns_field="vector"), "Search"),
                                (lambda: raw.query("shared_build_v1", filter="id >= 0", limit=1), "Query")):
            with pytest.raises(Exception, match=f"Privilege{privilege}: permission deny"):
                call()
    finally:
        raw.close()
    out = subprocess.run([sys.executable, "-m", "orchestration.cli", "db", "list", "--db", b["uri"]],
                         capture_output=True, text=True, timeout=300, check=False,
                         env={**os.environ, "RAEE_MILVUS_TOKEN": a["reader"], "RAEE_DEBUG": ""})
    assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert out.stderr.startswith("error: exit db list on collection 't_team_b.*' failed: permission denied")
    assert "t_team_a_reader:" not in out.stderr + out.stdout  # the token's password is never echoed
