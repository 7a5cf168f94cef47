"""Move or back up one exit database as a parquet file: `raee db export NAME FILE.parquet`, `raee db import FILE`.

The file holds every record as a row (id, key vector, exit set, per-layer label distributions, label, text)
and, in the parquet file's key-value metadata, everything else that makes the collection answer as it did:
the setup and build variant (`raee.meta`), the index it was built with, the calibration, the text cap, the
training-data digest, the build's stable name and any stored blob (a trained exit head, base64). Import
recreates the collection from that alone, so Lite -> server -> Lite gives back the same records and answers.

Import writes a version of the build named in the file (or `name`): a new one, switched in after its count is
checked, or - for the same file imported again - the version it wrote before. It refuses to mix: a build of
that name with another setup or variant, or an unversioned collection of that name, is an error naming
`--name` as the way out; nothing is overwritten.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from milvus.added import stored_ids
from milvus.exit_db import (
    META_PROPERTY,
    VERSION_OF_PROPERTY,
    ExitDB,
    ExitDBError,
    _meta_json,
    database_label,
    is_lite_uri,
    open_client,
    parse_meta,
    raee_collections,
    resolve_alias,
)
from milvus.index import IndexConfig
from milvus.versions import DATA_DIGEST_PROPERTY, begin_version, finish_version
from raee.calibration import Calibration
from raee.records import ExitRecords

FORMAT = "raee-exit-db/1"
BLOB_NAMES = ("head",)  # the blobs raee stores beside a collection (a trained exit head)
_KEY = "raee."  # metadata keys


class TransferError(ExitDBError):
    """An export or import that cannot be done: an unreadable file, or a target it would have to overwrite."""


@dataclass(frozen=True)
class Transfer:
    """What one export or import moved."""

    name: str  # the build's stable name
    collection: str  # the collection read (export) or written (import)
    path: str
    n_records: int
    switched: bool = False  # import: the name now points at the collection written

    def to_dict(self) -> dict:
        return asdict(self)


def export_build(uri: str, name: str, path: str | os.PathLike[str], *, token: str | None = None,
                 batch_rows: int = 1000) -> Transfer:
    """Write the build `name` (the version an alias points at, or a collection) to a parquet file at path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    with ExitDB(uri, collection=name, meta=None, create=False, token=token) as db:
        ids = stored_ids(uri, db.collection, token=token)
        metadata = {
            "format": FORMAT, "name": db.alias or db.collection, "collection": db.collection,
            "meta": _meta_json(db.meta, db.variant), "index": json.dumps(asdict(db.index)),
            "text_max_bytes": str(db.text_max_bytes), "n_records": str(len(ids)),
            **({"calibration": db.calibration.to_json()} if db.calibration is not None else {}),
            **({"data_digest": db.properties[DATA_DIGEST_PROPERTY]} if DATA_DIGEST_PROPERTY in db.properties else {}),
            **{f"blob.{b}": base64.b64encode(data).decode("ascii") for b in BLOB_NAMES
               if (data := db.get_blob(b)) is not None},
        }
        schema = _schema(db.meta.dim, db.meta.n_layers + 1, metadata)
        partial = path.with_name(path.name + ".partial")
        written = 0
        with pq.ParquetWriter(partial, schema) as writer:
            for start in range(0, len(ids), batch_rows):
                records = db.get(ids[start : start + batch_rows])
                writer.write_table(pa.Table.from_batches([_to_batch(records, schema)]))
                written += len(records)
        if written != len(ids):
            partial.unlink(missing_ok=True)
            raise TransferError("export", db.collection, f"read {written} records of {len(ids)}; the collection "
                                                        "changed during the export, run it again")
        partial.replace(path)  # whole or not at all
        return Transfer(metadata["name"], db.collection, str(path), written)


def import_build(path: str | os.PathLike[str], uri: str, *, name: str | None = None, token: str | None = None,
                 batch_rows: int = 1000) -> Transfer:
    """Load an exported parquet file into the database at uri as a version of the build `name` (default: the
    name in the file), switched in once its count matches the file's."""
    import pyarrow.parquet as pq

    path = Path(path)
    try:
        parquet = pq.ParquetFile(path)
    except (OSError, ValueError) as exc:
        raise TransferError("import", str(path), f"cannot read it as parquet: {exc}") from exc
    info = {k.decode()[len(_KEY):]: v.decode() for k, v in (parquet.schema_arrow.metadata or {}).items()
            if k.decode().startswith(_KEY)}
    if info.get("format") != FORMAT:
        raise TransferError("import", str(path), f"not a raee export (format {info.get('format')!r}, expected "
                                                 f"{FORMAT!r}); write one with `raee db export`")
    meta, variant = parse_meta(info["meta"])
    expected = int(info["n_records"])
    if parquet.metadata.num_rows != expected:
        raise TransferError("import", str(path), f"the file holds {parquet.metadata.num_rows} rows but says "
                                                 f"{expected}; it is truncated or was edited")
    name = name or info["name"]
    _refuse_to_mix(uri, name, info["meta"], token=token)
    digest = info.get("data_digest") or "file:" + _file_digest(path)
    target = begin_version(uri, name, meta, variant, data_digest=digest, token=token)
    calibration = Calibration.from_json(info["calibration"]) if "calibration" in info else None
    with ExitDB(uri, collection=target.collection, meta=meta, variant=variant, token=token,
                index=IndexConfig(**json.loads(info["index"])), text_max_bytes=int(info["text_max_bytes"]),
                calibration=calibration, properties=target.properties) as db:
        for key, value in info.items():
            if key.startswith("blob."):
                db.put_blob(key[len("blob."):], base64.b64decode(value))
        for batch in parquet.iter_batches(batch_size=batch_rows):
            db.upsert(_from_batch(batch, meta.dim, meta.n_layers + 1, meta.n_classes))
        db.flush()
        counted = db.count()
    switch = finish_version(uri, target, expected=expected, counted=counted, token=token)
    if not target.versioned and counted != expected:
        raise TransferError("import", target.collection, f"holds {counted} records after importing {expected}")
    return Transfer(name, target.collection, str(path), expected, switched=switch is not None)


def _refuse_to_mix(uri: str, name: str, meta_json: str, *, token: str | None) -> None:
    """TransferError when `name` in uri is an unversioned collection, or a build of another setup or variant."""
    if is_lite_uri(uri) and not os.path.exists(uri):
        return
    with open_client(uri, token=token, operation="import") as client:
        stored = raee_collections(client, where=f"{database_label(uri)}.*")
        active = resolve_alias(client, name)
    if name in stored and VERSION_OF_PROPERTY not in stored[name]:
        raise TransferError("import", name, f"{uri} has an unversioned collection of that name; import under "
                                            "another name with --name NEW")
    current = stored.get(active) if active else None
    if current is not None and parse_meta(current[META_PROPERTY]) != parse_meta(meta_json):
        stored_meta, stored_variant = parse_meta(current[META_PROPERTY])
        raise TransferError("import", name, f"{uri} holds a build of that name for task {stored_meta.task} "
                                            f"(backbone {stored_meta.backbone}, {stored_variant.describe()}) that "
                                            "differs from the file's; import under another name with --name NEW")


def _schema(dim: int, n_probs: int, metadata: dict[str, str]):
    import pyarrow as pa

    fields = [pa.field("id", pa.int64(), nullable=False), pa.field("vector", pa.list_(pa.float32(), dim)),
              pa.field("exit_probs", pa.list_(pa.float32(), n_probs)), pa.field("label", pa.int64()),
              pa.field("text", pa.string()), pa.field("layer_probs", pa.list_(pa.float32()))]
    return pa.schema(fields, metadata={f"{_KEY}{k}": v for k, v in metadata.items()})


def _to_batch(records: ExitRecords, schema):
    import pyarrow as pa

    n = len(records)
    layer_probs = (pa.nulls(n, pa.list_(pa.float32())) if records.layer_probs is None else
                   pa.array(list(np.asarray(records.layer_probs, np.float32).reshape(n, -1)), pa.list_(pa.float32())))
    columns = [pa.array(records.ids, pa.int64()),
               pa.FixedSizeListArray.from_arrays(pa.array(records.vectors.reshape(-1), pa.float32()),
                                                 records.vectors.shape[1]),
               pa.FixedSizeListArray.from_arrays(pa.array(records.exit_probs.reshape(-1), pa.float32()),
                                                 records.exit_probs.shape[1]),
               pa.array(records.labels, pa.int64()), pa.array(list(records.texts), pa.string()), layer_probs]
    return pa.RecordBatch.from_arrays(columns, schema=schema)


def _from_batch(batch, dim: int, n_probs: int, n_classes: int) -> ExitRecords:
    n = batch.num_rows
    layer_probs = batch.column("layer_probs")
    if layer_probs.null_count:
        dists = None
    else:
        dists = layer_probs.flatten().to_numpy(zero_copy_only=False).reshape(n, n_probs, n_classes)
    return ExitRecords(
        ids=batch.column("id").to_numpy(),
        vectors=batch.column("vector").flatten().to_numpy(zero_copy_only=False).reshape(n, dim),
        exit_probs=batch.column("exit_probs").flatten().to_numpy(zero_copy_only=False).reshape(n, n_probs),
        labels=batch.column("label").to_numpy(),
        texts=tuple(batch.column("text").to_pylist()),
        layer_probs=dists,
    )


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]
