"""Versioned builds behind a Milvus alias: a rebuild is written beside the served version and switched in atomically.

A build named NAME (`collection_name(meta, variant)`, or `raee build --collection NAME`) writes collections
NAME_v1, NAME_v2, ...; NAME itself is a Milvus alias, and queries, serving and `list_exit_dbs` use NAME. Milvus
resolves an alias on every request and `alter_alias` moves it in one metadata operation, so a reader sees
the old version or the new one, never a half-written one: a build writes a version nobody reads, checks its
exact record count, marks it complete and only then moves the alias. The old version stays for `rollback`
until it is dropped (`raee db drop NAME --version N`).

Each version's collection properties record `raee.version_of` (the alias, written when it is created),
`raee.data_digest` (the training examples it is built from), `raee.complete` (its checked record count, once
its build finished) and `raee.previous` (the version the alias pointed at before this one was switched in).

Which collection a build writes (`begin_version`):
1. the version the alias points at, when it holds the same setup, variant and training data: a re-run rewrites
   identical records in place (idempotent, as builds were before versions);
2. else the newest other version with the same setup, variant and data (a crashed build resumes there);
3. else a new version N+1.
A collection named NAME that is not an alias (built before versions, or by hand) is written in place, as before.

Milvus Lite 3.2 and the 2.3.5 server both support aliases (`create_alias`, `alter_alias`); on 2.3.5 with
pymilvus 3.0.2, `describe_alias`/`list_aliases` ignore the client's database, so aliases are resolved with
`describe_collection`, which follows an alias in any database.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pymilvus import MilvusClient

from milvus.exit_db import (
    META_PROPERTY,
    VERSION_OF_PROPERTY,
    BuildVariant,
    ExitDBError,
    ExitDBMeta,
    database_label,
    milvus_errors,
    open_client,
    parse_meta,
    raee_collections,
    resolve_alias,
)

DATA_DIGEST_PROPERTY = "raee.data_digest"  # the training examples a version was built from
COMPLETE_PROPERTY = "raee.complete"  # its checked record count, written once its build finished
PREVIOUS_PROPERTY = "raee.previous"  # the version the alias pointed at before this one was switched in


class VersionError(ExitDBError):
    """A version cannot be written, switched to, rolled back to or dropped; says why and what to do."""


@dataclass(frozen=True)
class Version:
    """One collection of a versioned build, as its properties describe it."""

    collection: str
    number: int
    active: bool  # the alias points at it
    complete: int | None  # the record count its build checked; None while (or if) its build never finished
    data_digest: str | None
    previous: str | None
    meta: ExitDBMeta | None
    variant: BuildVariant


@dataclass(frozen=True)
class BuildTarget:
    """Where a build writes: `collection` under the stable `name`, created with `properties` when it is new."""

    name: str
    collection: str
    properties: dict[str, str]
    active: str | None  # what the alias points at when the build starts

    @property
    def versioned(self) -> bool:
        return self.collection != self.name


@dataclass(frozen=True)
class Switch:
    """An alias move: `name` pointed at `before` (None: nothing) and now points at `after`."""

    name: str
    before: str | None
    after: str


def version_collection(name: str, number: int) -> str:
    """The collection of version `number` of the build `name`: "<name>_v<number>"."""
    return f"{name}_v{number}"


def version_number(name: str, collection: str) -> int | None:
    """N for "<name>_vN", else None."""
    match = re.fullmatch(re.escape(name) + r"_v(\d+)", collection)
    return int(match.group(1)) if match else None


def list_versions(uri: str, name: str, *, token: str | None = None, timeout_s: float = 10.0) -> list[Version]:
    """The versions of the build `name` in the database at uri, oldest first ([] for none)."""
    with open_client(uri, token=token, timeout_s=timeout_s, operation="versions") as client:
        stored = raee_collections(client, timeout_s=timeout_s, where=f"{database_label(uri)}.*")
        return _versions(client, name, stored, timeout_s)


def begin_version(uri: str, name: str, meta: ExitDBMeta, variant: BuildVariant, *, data_digest: str,
                  token: str | None = None, timeout_s: float = 10.0) -> BuildTarget:
    """The collection a build of `name` writes (rules 1-3 of the module docstring); creates nothing."""
    with open_client(uri, token=token, timeout_s=timeout_s, operation="begin build") as client:
        stored = raee_collections(client, timeout_s=timeout_s, where=f"{database_label(uri)}.*")
        if name in stored:  # a collection, not an alias: built before versions, written in place
            return BuildTarget(name, name, {}, None)
        versions = _versions(client, name, stored, timeout_s)
    active = next((v.collection for v in versions if v.active), None)
    same = [v for v in versions if (v.meta, v.variant, v.data_digest) == (meta, variant, data_digest)]
    if same:
        chosen = next((v for v in same if v.active), same[-1])
        return BuildTarget(name, chosen.collection, {}, active)
    number = max((v.number for v in versions), default=0) + 1
    properties = {VERSION_OF_PROPERTY: name, DATA_DIGEST_PROPERTY: data_digest}
    return BuildTarget(name, version_collection(name, number), properties, active)


def finish_version(uri: str, target: BuildTarget, *, expected: int, counted: int, token: str | None = None,
                   timeout_s: float = 10.0) -> Switch | None:
    """After a build: check the version holds exactly `expected` records, mark it complete, point the alias at it.

    counted is the version's Strong count. Nothing to do for an unversioned collection. A wrong count leaves
    the alias where it was and raises VersionError."""
    if not target.versioned:
        return None
    if counted != expected:
        raise VersionError("switch", target.name, f"version {target.collection} holds {counted} records but the "
                                                  f"build wrote {expected}; the alias still points at "
                                                  f"{target.active or 'nothing'}: re-run the build")
    with open_client(uri, token=token, timeout_s=timeout_s, operation="switch") as client:
        with milvus_errors("mark complete", target.collection):
            client.alter_collection_properties(target.collection, properties={COMPLETE_PROPERTY: str(counted)},
                                               timeout=timeout_s)
        return _switch(client, target.name, target.collection, timeout_s, record_previous=True)


def activate(uri: str, name: str, version: int | str, *, token: str | None = None, force: bool = False,
             timeout_s: float = 10.0) -> Switch:
    """Point the alias `name` at a version (its number or collection) in one step; the move is recorded for
    `rollback`. An incomplete version (its build never finished) is refused unless `force`."""
    with open_client(uri, token=token, timeout_s=timeout_s, operation="activate") as client:
        versions = _versions_or_error(client, name, timeout_s, database_label(uri))
        wanted = version_collection(name, version) if isinstance(version, int) else version
        chosen = next((v for v in versions if v.collection == wanted or str(v.number) == str(version)), None)
        if chosen is None:
            raise VersionError("activate", name, f"no version {version}; versions: {_names(versions)}")
        if chosen.complete is None and not force:
            raise VersionError("activate", name, f"version {chosen.collection} is incomplete (its build did not "
                                                 "finish); re-run the build, or pass --force to switch anyway")
        return _switch(client, name, chosen.collection, timeout_s, record_previous=True)


def rollback(uri: str, name: str, *, token: str | None = None, timeout_s: float = 10.0) -> Switch:
    """Point the alias `name` back at the version it pointed at before the last switch to the current one.

    Repeated rollbacks walk further back through the recorded switches."""
    with open_client(uri, token=token, timeout_s=timeout_s, operation="rollback") as client:
        versions = _versions_or_error(client, name, timeout_s, database_label(uri))
        active = next((v for v in versions if v.active), None)
        if active is None:
            raise VersionError("rollback", name, "no version is active, so there is nothing to roll back from; "
                                                 f"activate one of: {_names(versions)}")
        if active.previous is None:
            raise VersionError("rollback", name, f"{active.collection} was the first version switched in; there "
                                                 "is no earlier one to roll back to")
        if active.previous not in {v.collection for v in versions}:
            raise VersionError("rollback", name, f"the version before {active.collection}, {active.previous}, was "
                                                 f"dropped; activate one of: {_names(versions)}")
        return _switch(client, name, active.previous, timeout_s, record_previous=False)


def _switch(client: MilvusClient, name: str, collection: str, timeout_s: float, *, record_previous: bool) -> Switch:
    before = resolve_alias(client, name, timeout_s=timeout_s)
    if before == collection:
        return Switch(name, before, collection)
    if record_previous and before is not None:  # history first: a crash in between leaves the alias as it was
        with milvus_errors("record previous", collection):
            client.alter_collection_properties(collection, properties={PREVIOUS_PROPERTY: before}, timeout=timeout_s)
    with milvus_errors("switch", name):
        if before is None:
            client.create_alias(collection, name, timeout=timeout_s)
        else:
            client.alter_alias(collection, name, timeout=timeout_s)  # atomic: one metadata operation
    return Switch(name, before, collection)


def _versions_or_error(client: MilvusClient, name: str, timeout_s: float, database: str) -> list[Version]:
    stored = raee_collections(client, timeout_s=timeout_s, where=f"{database}.*")
    if name in stored and VERSION_OF_PROPERTY not in stored[name]:
        raise VersionError("versions", name, "it is a collection built before versioned builds, so it has no "
                                             "versions to switch between; rebuild it under another name "
                                             "(raee build --collection NEW) to get versions")
    versions = _versions(client, name, stored, timeout_s)
    if not versions:
        raise VersionError("versions", name, "no versioned build of that name here (raee db list shows what is)")
    return versions


def _versions(client: MilvusClient, name: str, stored: dict[str, dict[str, str]], timeout_s: float) -> list[Version]:
    active = resolve_alias(client, name, timeout_s=timeout_s)
    found = []
    for collection, properties in stored.items():
        number = version_number(name, collection)
        if properties.get(VERSION_OF_PROPERTY) != name or number is None:
            continue
        try:
            meta, variant = parse_meta(properties[META_PROPERTY])
        except (ValueError, TypeError):
            meta, variant = None, BuildVariant()
        complete = properties.get(COMPLETE_PROPERTY)
        found.append(Version(collection, number, collection == active, int(complete) if complete else None,
                             properties.get(DATA_DIGEST_PROPERTY), properties.get(PREVIOUS_PROPERTY), meta, variant))
    return sorted(found, key=lambda v: v.number)


def _names(versions: list[Version]) -> str:
    return ", ".join(f"{v.number} ({v.collection}{', active' if v.active else ''}"
                     f"{'' if v.complete is not None else ', incomplete'})" for v in versions) or "none"
