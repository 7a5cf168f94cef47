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
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import grpc
from pymilvus import MilvusClient
from pymilvus.exceptions import MilvusException

READER_ROLE, WRITER_ROLE = "raee_reader", "raee_writer"
READER_USER, WRITER_USER = "raee_reader", "raee_writer"

# (object type, privilege): what ExitDB's open / search / count call on a server. GetStatistics comes last in
# both lists: it is the sentinel create_roles waits for (see _wait_effective).
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
    ("Global", "CreateCollection"),
    ("Collection", "CreateIndex"),
    ("Collection", "Insert"),
    ("Collection", "Upsert"),
    ("Collection", "Delete"),  # an upsert is a delete plus an insert on 2.3
    ("Collection", "Flush"),
    ("Collection", "GetFlushState"),
    *READER_PRIVILEGES,
)
_PROBE_COLLECTION = "raee_roles_probe_missing"  # never created: privilege checks run before the lookup


class RolesError(RuntimeError):
    """Creating or granting the roles failed; says which step."""


def create_roles(uri: str, root_token: str, *, reader_password: str, writer_password: str,
                 reader_user: str = READER_USER, writer_user: str = WRITER_USER, reader_role: str = READER_ROLE,
                 writer_role: str = WRITER_ROLE, collection: str = "*", timeout_s: float = 10.0,
                 effective_timeout_s: float = 120.0) -> dict[str, str]:
    """Create the reader and writer roles and users (idempotent); {"reader": token, "writer": token}.

    root_token is "root:<password>" (any user allowed to manage users and roles). Returns once both tokens
    hold their privileges on the proxy: a grant is acknowledged before the proxy applies it (measured: tens
    of seconds later on a busy 2.3.5 server), and a build started in between would be refused half-way."""
    client = MilvusClient(uri=uri, token=root_token, timeout=timeout_s)
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
            for object_type, privilege in privileges:  # the sentinel (GetStatistics) last
                name = "*" if object_type == "Global" else collection
                _step(f"grant {privilege} on {object_type} {name} to {role}",
                      lambda r=role, o=object_type, p=privilege, n=name: client.grant_privilege(r, o, p, n))
            tokens[kind] = f"{user}:{password}"
    finally:
        client.close()
    if collection == "*":  # a named collection may not exist yet, so there is nothing to probe
        for token in tokens.values():
            _wait_effective(uri, token, timeout_s, effective_timeout_s)
    return tokens


def _wait_effective(uri: str, token: str, timeout_s: float, effective_timeout_s: float) -> None:
    """Block until the proxy lets `token` use its role's last grant (GetStatistics), probed on a missing
    collection: refused -> not applied yet; "collection not found" (or stats) -> applied, with the grants
    before it (the server applies them in order)."""
    client = MilvusClient(uri=uri, token=token, timeout=timeout_s)
    deadline = time.monotonic() + effective_timeout_s
    try:
        while True:
            try:
                client.get_collection_stats(_PROBE_COLLECTION, timeout=timeout_s)
                return
            except (MilvusException, grpc.RpcError) as exc:  # pymilvus lets some refusals through raw
                if "permission" not in str(exc).lower():
                    return  # past the privilege check
            if time.monotonic() > deadline:
                raise RolesError(f"milvus roles: grants for {token.split(':', 1)[0]} not in effect after "
                                 f"{effective_timeout_s:.0f} s")
            time.sleep(0.5)
    finally:
        client.close()


def drop_roles(uri: str, root_token: str, *, reader_user: str = READER_USER, writer_user: str = WRITER_USER,
               reader_role: str = READER_ROLE, writer_role: str = WRITER_ROLE, collection: str = "*",
               timeout_s: float = 10.0) -> None:
    """Undo create_roles: revoke, drop the roles and users (missing ones are skipped)."""
    client = MilvusClient(uri=uri, token=root_token, timeout=timeout_s)
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
                      lambda r=role, o=object_type, p=privilege, n=name: client.revoke_privilege(r, o, p, n))
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
    """`python -m milvus.roles --uri URI`: tokens and passwords from the environment, never argv."""
    parser = argparse.ArgumentParser(description="Create the raee reader/writer roles on a Milvus server.")
    parser.add_argument("--uri", default="http://127.0.0.1:19530")
    parser.add_argument("--collection", default="*", help="limit collection privileges to this collection")
    args = parser.parse_args(argv)
    names = ("RAEE_MILVUS_ROOT_TOKEN", "RAEE_READER_PASSWORD", "RAEE_WRITER_PASSWORD")
    missing = [n for n in names if not os.environ.get(n)]
    if missing:
        print(f"error: set {', '.join(missing)} in the environment", file=sys.stderr)
        return 2
    try:
        create_roles(args.uri, os.environ[names[0]], reader_password=os.environ[names[1]],
                     writer_password=os.environ[names[2]], collection=args.collection)
    except (RolesError, MilvusException) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"roles {READER_ROLE} (user {READER_USER}) and {WRITER_ROLE} (user {WRITER_USER}) ready on {args.uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
