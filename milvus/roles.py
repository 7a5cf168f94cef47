"""Milvus roles for a shared exit database: inference workers read, collectors write, only root administers.

With authentication on (docker-compose.milvus.yml, or the embedded test server), give every process the
least it needs instead of the root token:

- **reader** (`raee_reader` role): open an existing exit database and search it. What `raee serve` / the
  inference workers need: describe, load, index details, search, query (count). No insert, upsert, delete,
  create or drop.
- **writer** (`raee_writer` role): the reader's privileges, plus create an exit database and upsert/flush
  records into it. What `raee build` / the collectors need. No drop: dropping stays with root.

    from milvus.roles import create_roles
    tokens = create_roles("http://127.0.0.1:19530", root_token, reader_password=..., writer_password=...)
    ExitDB(uri, collection=..., meta=..., token=tokens["reader"])   # search works, upsert -> ExitDBError

or from a shell, with the passwords in the environment (not on the command line, where `ps` shows them):

    RAEE_MILVUS_ROOT_TOKEN=root:... RAEE_READER_PASSWORD=... RAEE_WRITER_PASSWORD=... \
        python -m milvus.roles --uri http://127.0.0.1:19530

Privilege names are Milvus 2.3's (users_and_roles.md); `collection` narrows the collection privileges
to one collection instead of all ("*"). Re-running is safe: grants are idempotent and existing users keep
their passwords.

Teams on one server (`create_team`): each team gets its own Milvus database and a reader and a writer scoped
to it (grants carry the database), and its URI names the database: `http://host:19530/team_a`. Milvus' built-in
`public` role, which every user holds, may list and describe the collections of *every* database (2.3.5
grants it DescribeCollection, ShowCollections and IndexDetail on db "*"), so `create_team` revokes those
(`restrict_public_role`); then a team's reader cannot list, describe, search or read another team's
collections. 2.3.5 grants them again **every time the server starts**: run `python -m milvus.roles
--restrict-public` (or `create_team` again) after each restart; `public_role_restricted` checks.

    RAEE_MILVUS_ROOT_TOKEN=root:... RAEE_READER_PASSWORD=... RAEE_WRITER_PASSWORD=... \
        python -m milvus.roles --uri http://127.0.0.1:19530 --team team_a
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

import grpc
from pymilvus import MilvusClient
from pymilvus.exceptions import MilvusException
from pymilvus.grpc_gen import milvus_pb2

READER_ROLE, WRITER_ROLE = "raee_reader", "raee_writer"
READER_USER, WRITER_USER = "raee_reader", "raee_writer"

# (object type, privilege): what ExitDB's open / search / count call on a server. create_roles waits until the
# proxy applies each of them (see _PRIVILEGE_RPCS).
READER_PRIVILEGES: tuple[tuple[str, str], ...] = (
    ("Global", "DescribeCollection"),  # has_collection, describe_collection (metadata guard)
    ("Global", "ShowCollections"),
    ("Collection", "Load"),  # load_collection is idempotent, but still checked
    ("Collection", "GetLoadState"),
    ("Collection", "GetLoadingProgress"),
    ("Collection", "IndexDetail"),  # describe_index
    ("Collection", "Search"),
    ("Collection", "Query"),  # count(*) and get
    ("Collection", "GetStatistics"),
)
# ... plus what a build calls: create the collection with its index, upsert, flush, wait for the index.
WRITER_PRIVILEGES: tuple[tuple[str, str], ...] = (
    ("Global", "CreateCollection"),  # also what 2.3.5 checks to alter collection properties (version bookkeeping)
    ("Global", "CreateAlias"),  # point a versioned build's alias at the version it finished (create/alter alias)
    ("Collection", "CreateIndex"),
    ("Collection", "Insert"),
    ("Collection", "Upsert"),
    ("Collection", "Delete"),  # an upsert is a delete plus an insert on 2.3
    ("Collection", "Flush"),
    ("Collection", "GetFlushState"),
    *READER_PRIVILEGES,
)
_PROBE_COLLECTION = "raee_roles_probe_missing"  # never created: privilege checks run before the lookup
# What 2.3.5 grants the built-in `public` role (every user) on every database, and team isolation revokes.
PUBLIC_ROLE = "public"
PUBLIC_PRIVILEGES: tuple[tuple[str, str], ...] = (
    ("Global", "DescribeCollection"), ("Global", "ShowCollections"), ("Collection", "IndexDetail"))
_TEAM = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,24}$")  # leaves room for "_reader"/"_writer" in Milvus' 32


class RolesError(RuntimeError):
    """Creating or granting the roles failed; says which step."""


def create_roles(uri: str, root_token: str, *, reader_password: str, writer_password: str,
                 reader_user: str = READER_USER, writer_user: str = WRITER_USER, reader_role: str = READER_ROLE,
                 writer_role: str = WRITER_ROLE, collection: str = "*", db_name: str = "", timeout_s: float = 10.0,
                 effective_timeout_s: float = 120.0) -> dict[str, str]:
    """Create the reader and writer roles and users (idempotent); {"reader": token, "writer": token}.

    root_token is "root:<password>" (any user allowed to manage users and roles). db_name scopes every grant
    to one Milvus database ("" the default database). Returns once both tokens hold their privileges on the
    proxy: a grant is acknowledged before the proxy applies it (measured: tens of seconds later on a busy
    2.3.5 server), and a build started in between would be refused half-way."""
    client = _client(uri, root_token, timeout_s, db_name)
    try:
        tokens = {}
        for kind, role, user, password, privileges in (
            ("reader", reader_role, reader_user, reader_password, READER_PRIVILEGES),
            ("writer", writer_role, writer_user, writer_password, WRITER_PRIVILEGES),
        ):
            _step(f"create role {role}", lambda r=role: role_missing(client, r) and client.create_role(r))
            _step(f"create user {user}", lambda u=user, p=password: (
                u not in client.list_users() and client.create_user(u, p)))
            _step(f"grant role {role} to {user}", lambda u=user, r=role: client.grant_role(u, r))
            for object_type, privilege in privileges:
                name = "*" if object_type == "Global" else collection
                _step(f"grant {privilege} on {object_type} {name} to {role}",
                      lambda r=role, o=object_type, p=privilege, n=name: client.grant_privilege(
                          r, o, p, n, db_name=db_name))
            tokens[kind] = (f"{user}:{password}", privileges)
    finally:
        client.close()
    if collection == "*":  # a named collection may not exist yet, so there is nothing to probe
        for token, privileges in tokens.values():
            _wait_effective(uri, token, timeout_s, effective_timeout_s, db_name, privileges)
    return {kind: token for kind, (token, _) in tokens.items()}


def team_uri(uri: str, team: str) -> str:
    """The URI of a team's database on the server at uri: "http://host:19530" + "team_a"."""
    return f"{uri.rstrip('/')}/{team}"


def team_names(team: str) -> dict[str, str]:
    """The user and role names `create_team` gives a team: {"reader_user", "writer_user", "reader_role", ...}."""
    if not _TEAM.match(team):
        raise RolesError(f"milvus roles: team {team!r} must be a Milvus database name of at most 25 characters "
                         "(letters, digits, _; starting with a letter)")
    return {"reader_user": f"{team}_reader", "writer_user": f"{team}_writer",
            "reader_role": f"raee_{team}_reader", "writer_role": f"raee_{team}_writer"}


def create_team(uri: str, root_token: str, team: str, *, reader_password: str, writer_password: str,
                restrict_public: bool = True, timeout_s: float = 10.0,
                effective_timeout_s: float = 120.0) -> dict[str, str]:
    """A team's own Milvus database (`team`) with a reader and a writer scoped to it; idempotent.

    Returns {"reader": token, "writer": token, "uri": the team's database URI}. restrict_public revokes what
    the built-in public role may see in every database (`restrict_public_role`), without which any user can
    list and describe every team's collections."""
    names = team_names(team)
    client = _client(uri, root_token, timeout_s)
    try:
        _step(f"create database {team}", lambda: team in client.list_databases() or client.create_database(team))
    finally:
        client.close()
    if restrict_public:
        restrict_public_role(uri, root_token, timeout_s=timeout_s)
    tokens = create_roles(uri, root_token, reader_password=reader_password, writer_password=writer_password,
                          db_name=team, timeout_s=timeout_s, effective_timeout_s=effective_timeout_s, **names)
    return {**tokens, "uri": team_uri(uri, team)}


def drop_team(uri: str, root_token: str, team: str, *, drop_database: bool = False, timeout_s: float = 10.0) -> None:
    """Undo create_team: its users and roles (and, with drop_database, its database, which must be empty)."""
    drop_roles(uri, root_token, db_name=team, timeout_s=timeout_s, **team_names(team))
    if drop_database:
        client = _client(uri, root_token, timeout_s)
        try:
            _step(f"drop database {team}", lambda: team not in client.list_databases() or client.drop_database(team))
        finally:
            client.close()


def restrict_public_role(uri: str, root_token: str, *, timeout_s: float = 10.0) -> None:
    """Revoke the built-in public role's DescribeCollection, ShowCollections and IndexDetail on every database.

    Every user holds `public`; with them, anyone may list and describe every database's collections. raee's
    roles grant these themselves. Idempotent; 2.3.5 grants them again whenever the server starts."""
    client = _client(uri, root_token, timeout_s)
    try:
        for object_type, privilege in PUBLIC_PRIVILEGES:
            _step(f"revoke {privilege} from {PUBLIC_ROLE}", lambda o=object_type, p=privilege: client.revoke_privilege(
                PUBLIC_ROLE, o, p, "*", db_name="*"))
    finally:
        client.close()


def open_public_role(uri: str, root_token: str, *, timeout_s: float = 10.0) -> None:
    """Give the public role back what 2.3.5 starts it with (undoes restrict_public_role)."""
    client = _client(uri, root_token, timeout_s)
    try:
        for object_type, privilege in PUBLIC_PRIVILEGES:
            _step(f"grant {privilege} to {PUBLIC_ROLE}", lambda o=object_type, p=privilege: client.grant_privilege(
                PUBLIC_ROLE, o, p, "*", db_name="*"))
    finally:
        client.close()


def public_role_restricted(uri: str, root_token: str, *, timeout_s: float = 10.0) -> bool:
    """True when the public role holds none of PUBLIC_PRIVILEGES (teams cannot see each other's collections)."""
    client = _client(uri, root_token, timeout_s)
    try:
        grants = client.describe_role(PUBLIC_ROLE, timeout=timeout_s).get("privileges", [])
    finally:
        client.close()
    return not {(g["object_type"], g["privilege"]) for g in grants} & set(PUBLIC_PRIVILEGES)


def _client(uri: str, token: str, timeout_s: float, db_name: str = "") -> MilvusClient:
    return MilvusClient(uri=uri, token=token, timeout=timeout_s, **({"db_name": db_name} if db_name else {}))


# Each privilege a role holds is probed on its own, with the RPC that Milvus checks it on, sent raw to a
# collection that does not exist: the proxy checks the privilege before it looks the collection up. The proxy
# applies grants in no promised order (CI saw a writer past GetStatistics refused GetFlushState at its first
# flush, and later one past every probe then refused Upsert), so probing a few sentinels is not enough. Raw
# requests, not MilvusClient calls: the client describes the collection before an upsert, which would stop at
# DescribeCollection. A create with an empty schema is refused for its schema after the check; nothing is made.
_PRIVILEGE_RPCS: dict[str, tuple[str, str, dict[str, object]]] = {  # privilege -> (RPC, request, fields)
    "DescribeCollection": ("DescribeCollection", "DescribeCollectionRequest", {}),
    "ShowCollections": ("ShowCollections", "ShowCollectionsRequest", {"collection_name": None}),
    "Load": ("LoadCollection", "LoadCollectionRequest", {}),
    "GetLoadState": ("GetLoadState", "GetLoadStateRequest", {}),
    "GetLoadingProgress": ("GetLoadingProgress", "GetLoadingProgressRequest", {}),
    "IndexDetail": ("DescribeIndex", "DescribeIndexRequest", {}),
    "Search": ("Search", "SearchRequest", {}),
    "Query": ("Query", "QueryRequest", {"expr": "id >= 0"}),
    "GetStatistics": ("GetCollectionStatistics", "GetCollectionStatisticsRequest", {}),
    "CreateCollection": ("CreateCollection", "CreateCollectionRequest", {}),
    "CreateAlias": ("CreateAlias", "CreateAliasRequest", {"alias": _PROBE_COLLECTION + "_alias"}),
    "CreateIndex": ("CreateIndex", "CreateIndexRequest", {"field_name": "vector"}),
    "Insert": ("Insert", "InsertRequest", {}),
    "Upsert": ("Upsert", "UpsertRequest", {}),
    "Delete": ("Delete", "DeleteRequest", {"expr": "id in [0]"}),
    "Flush": ("Flush", "FlushRequest", {"collection_name": None, "collection_names": [_PROBE_COLLECTION]}),
    "GetFlushState": ("GetFlushState", "GetFlushStateRequest", {}),
}


_NOT_YET = (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def _privilege_granted(client: MilvusClient, privilege: str, db_name: str, timeout_s: float) -> bool:
    """Whether the proxy lets the client's token past `privilege`'s check: refused -> not applied yet;
    "collection not found" or any other answer -> applied."""
    method, request_type, fields = _PRIVILEGE_RPCS[privilege]
    fields = {"collection_name": _PROBE_COLLECTION, **fields, "db_name": db_name}
    request = getattr(milvus_pb2, request_type)(**{k: v for k, v in fields.items() if v is not None})
    try:
        metadata = client._generate_call_context().to_grpc_metadata()  # the proxy takes the database from here
        response = getattr(client._get_connection()._stub, method)(request, timeout=timeout_s, metadata=metadata)
    except grpc.RpcError as exc:  # refused, or the server busy or away: not known to be applied, ask again
        return exc.code() not in _NOT_YET and "permission" not in str(exc.details()).lower()
    return "permission deny" not in str(response).lower()


def _wait_effective(uri: str, token: str, timeout_s: float, effective_timeout_s: float, db_name: str,
                    privileges: tuple[tuple[str, str], ...]) -> None:
    """Block until the proxy lets `token` past the check of every privilege its role was granted."""
    client = _client(uri, token, timeout_s, db_name)
    deadline = time.monotonic() + effective_timeout_s
    try:
        for _, privilege in privileges:
            while not _privilege_granted(client, privilege, db_name, timeout_s):
                if time.monotonic() > deadline:
                    raise RolesError(f"milvus roles: grant of {privilege} to {token.split(':', 1)[0]} not in "
                                     f"effect after {effective_timeout_s:.0f} s")
                time.sleep(0.5)
    finally:
        client.close()


def drop_roles(uri: str, root_token: str, *, reader_user: str = READER_USER, writer_user: str = WRITER_USER,
               reader_role: str = READER_ROLE, writer_role: str = WRITER_ROLE, collection: str = "*",
               db_name: str = "", timeout_s: float = 10.0) -> None:
    """Undo create_roles: revoke, drop the roles and users (missing ones are skipped)."""
    client = _client(uri, root_token, timeout_s, db_name)
    try:
        users = client.list_users()
        for role, user, privileges in ((reader_role, reader_user, READER_PRIVILEGES),
                                       (writer_role, writer_user, WRITER_PRIVILEGES)):
            if user in users:
                _step(f"drop user {user}", lambda u=user: client.drop_user(u))
            if role_missing(client, role):
                continue
            for object_type, privilege in privileges:
                name = "*" if object_type == "Global" else collection
                _step(f"revoke {privilege} from {role}",
                      lambda r=role, o=object_type, p=privilege, n=name: client.revoke_privilege(
                          r, o, p, n, db_name=db_name))
            _step(f"drop role {role}", lambda r=role: client.drop_role(r))
    finally:
        client.close()


def role_missing(client: MilvusClient, role: str) -> bool:
    return role not in client.list_roles()


def _step(what: str, action) -> None:
    try:
        action()
    except MilvusException as exc:
        raise RolesError(f"milvus roles: {what} failed: {exc}") from exc


def main(argv: list[str] | None = None) -> int:
    """`python -m milvus.roles --uri URI [--team T | --restrict-public]`: secrets from the environment, never argv."""
    parser = argparse.ArgumentParser(description="Create the raee reader/writer roles on a Milvus server.")
    parser.add_argument("--uri", default="http://127.0.0.1:19530")
    parser.add_argument("--collection", default="*", help="limit collection privileges to this collection")
    parser.add_argument("--team", help="a team's own database with a reader and writer scoped to it (public role "
                                       "restricted too)")
    parser.add_argument("--restrict-public", action="store_true",
                        help="only revoke what the public role may see in every database (again after a restart)")
    args = parser.parse_args(argv)
    names = ("RAEE_MILVUS_ROOT_TOKEN",) if args.restrict_public else (
        "RAEE_MILVUS_ROOT_TOKEN", "RAEE_READER_PASSWORD", "RAEE_WRITER_PASSWORD")
    missing = [n for n in names if not os.environ.get(n)]
    if missing:
        print(f"error: set {', '.join(missing)} in the environment", file=sys.stderr)
        return 2
    root = os.environ[names[0]]
    try:
        if args.restrict_public:
            restrict_public_role(args.uri, root)
            print(f"public role restricted on {args.uri}: users see only the databases their roles are granted")
        elif args.team:
            team = create_team(args.uri, root, args.team, reader_password=os.environ[names[1]],
                               writer_password=os.environ[names[2]])
            users = team_names(args.team)
            print(f"team {args.team}: database {team['uri']}, users {users['reader_user']} (read) and "
                  f"{users['writer_user']} (build); public role restricted")
        else:
            create_roles(args.uri, root, reader_password=os.environ[names[1]], writer_password=os.environ[names[2]],
                         collection=args.collection)
            print(f"roles {READER_ROLE} (user {READER_USER}) and {WRITER_ROLE} (user {WRITER_USER}) ready on "
                  f"{args.uri}")
    except (RolesError, MilvusException) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
