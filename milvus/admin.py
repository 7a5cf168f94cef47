"""What `raee db list|describe|drop` read and do: every exit-database collection of a Milvus database, as plain data.

`list_exit_dbs` lists what a query may open (one entry per build); `list_collections` lists every collection
behind them - each version of a versioned build with its number, whether the alias points at it and whether
its build finished - so an operator sees what takes space and what can be switched to. Reads properties and
statistics only; nothing is loaded. `describe_build` also opens the active collection for its exact count,
index state and added examples. `drop_build` deletes a whole build or one version (never the active one).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from milvus.added import count_added
from milvus.exit_db import (
    BLOB_SUFFIX,
    CALIBRATION_PROPERTY,
    INDEX_PROPERTY,
    META_PROPERTY,
    VERSION_OF_PROPERTY,
    BuildVariant,
    ExitDB,
    ExitDBError,
    ExitDBMeta,
    database_label,
    milvus_errors,
    open_client,
    parse_meta,
    raee_collections,
    resolve_alias,
)
from milvus.versions import COMPLETE_PROPERTY, PREVIOUS_PROPERTY, VersionError, version_number


@dataclass(frozen=True)
class CollectionInfo:
    """One collection holding exit records: what `raee db list` prints per row."""

    collection: str
    name: str  # the stable name queries use: the alias of a versioned build, else the collection itself
    version: int | None  # None: an unversioned collection
    active: bool  # queries opening `name` read this collection
    complete: bool  # its build finished and its count was checked (always True when unversioned)
    meta: ExitDBMeta | None  # None: written by an older raee (problem says why)
    variant: BuildVariant
    n_rows: int  # Milvus' statistics (flushed rows; may lag the latest writes)
    index: str  # the vector index kind it was built with
    calibrated: bool
    problem: str | None = None

    def to_dict(self) -> dict:
        out = asdict(self)
        out["meta"] = None if self.meta is None else asdict(self.meta)
        out["variant"] = self.variant.describe()
        return out


def list_collections(uri: str, *, token: str | None = None, timeout_s: float = 10.0) -> list[CollectionInfo]:
    """Every exit-database collection of the database at uri, by stable name then version; [] for none."""
    with open_client(uri, token=token, timeout_s=timeout_s, operation="list") as client:
        stored = raee_collections(client, timeout_s=timeout_s, where=f"{database_label(uri)}.*")
        aliases = {p[VERSION_OF_PROPERTY] for p in stored.values() if VERSION_OF_PROPERTY in p}
        targets = {alias: resolve_alias(client, alias, timeout_s=timeout_s) for alias in aliases}
        found = []
        for collection, properties in stored.items():
            with milvus_errors("statistics", collection):
                n_rows = int(client.get_collection_stats(collection, timeout=timeout_s).get("row_count", 0))
            found.append(_info(collection, properties, n_rows, targets))
    return sorted(found, key=lambda c: (c.name, c.version or 0))


def describe_build(uri: str, name: str, *, token: str | None = None, timeout_s: float = 10.0) -> dict:
    """Everything about the build `name` (an alias or a collection): its collections, and of the one queries
    read: exact count, index state, calibration, exit head, added examples, the version before it."""
    infos = [c for c in list_collections(uri, token=token, timeout_s=timeout_s) if name in (c.name, c.collection)]
    if not infos:
        raise ExitDBError("describe", name, f"no exit database of that name in {uri} (raee db list shows them)")
    active = next((c for c in infos if c.active and c.name == name), None) or infos[0]
    with ExitDB(uri, collection=active.collection, meta=None, create=False, token=token, timeout_s=timeout_s) as db:
        out = {
            "name": name, "uri": uri, "collection": db.collection, "meta": asdict(db.meta),
            "variant": db.variant.describe(), "n_records": db.count(), "index": asdict(db.index),
            "index_state": db.index_state(), "text_max_bytes": db.text_max_bytes,
            "calibration": None if db.calibration is None else {"examples": db.calibration.n_examples},
            "head": db.meta.head, "head_stored": db.meta.head == "lm" or db.get_blob("head") is not None,
            "previous": db.properties.get(PREVIOUS_PROPERTY),
        }
    out["n_added"] = count_added(uri, active.collection, token=token)
    out["collections"] = [c.to_dict() for c in infos]
    return out


def drop_build(uri: str, name: str, *, version: int | None = None, token: str | None = None,
               timeout_s: float = 30.0) -> list[str]:
    """Delete the build `name` (its alias, every version and their blobs), or only its inactive `version`;
    the collections dropped. Milvus roles: only root may drop (milvus/roles.py)."""
    with open_client(uri, token=token, timeout_s=timeout_s, operation="drop") as client:
        stored = raee_collections(client, timeout_s=timeout_s, where=f"{database_label(uri)}.*")
        versions = {c: version_number(name, c) for c, p in stored.items() if p.get(VERSION_OF_PROPERTY) == name}
        active = resolve_alias(client, name, timeout_s=timeout_s)
        if version is not None:
            chosen = [c for c, n in versions.items() if n == version]
            if not chosen:
                raise VersionError("drop", name, f"no version {version}; versions: "
                                                 f"{', '.join(str(n) for n in sorted(versions.values())) or 'none'}")
            if chosen[0] == active:
                raise VersionError("drop", name, f"version {version} is the one queries read; switch to another "
                                                 "first (raee db activate / raee db rollback)")
            doomed = chosen
        elif name in stored and VERSION_OF_PROPERTY not in stored[name]:
            doomed = [name]  # an unversioned collection
        elif versions:
            doomed = sorted(versions)
            if active is not None:
                with milvus_errors("drop alias", name):
                    client.drop_alias(name, timeout=timeout_s)
        else:
            raise ExitDBError("drop", name, f"no exit database of that name in {uri} (raee db list shows them)")
        for collection in doomed:
            with milvus_errors("drop", collection):
                client.drop_collection(collection, timeout=timeout_s)
                if client.has_collection(collection + BLOB_SUFFIX, timeout=timeout_s):
                    client.drop_collection(collection + BLOB_SUFFIX, timeout=timeout_s)
    return doomed


def _info(collection: str, properties: dict[str, str], n_rows: int, targets: dict[str, str | None]) -> CollectionInfo:
    try:
        meta, variant = parse_meta(properties[META_PROPERTY])
        problem = None
    except (ValueError, TypeError) as exc:
        meta, variant, problem = None, BuildVariant(), str(exc)
    index = json.loads(properties.get(INDEX_PROPERTY, "{}")).get("kind", "FLAT")
    calibrated = CALIBRATION_PROPERTY in properties
    alias = properties.get(VERSION_OF_PROPERTY)
    if alias is None:
        return CollectionInfo(collection, collection, None, True, True, meta, variant, n_rows, index, calibrated,
                              problem)
    return CollectionInfo(collection, alias, version_number(alias, collection), targets.get(alias) == collection,
                          COMPLETE_PROPERTY in properties, meta, variant, n_rows, index, calibrated, problem)
