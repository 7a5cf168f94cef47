"""The exit database on Milvus: schema, metadata guard, idempotent upserts, batched top-k search.

Milvus Lite (`./raee.db`) by default; a Milvus server URI for several processes or millions of records.
"""

from milvus.exit_db import (
    BuildVariant,
    ExitDB,
    ExitDBError,
    ExitDBMeta,
    MetadataMismatchError,
    StoredBuild,
    collection_name,
    list_exit_dbs,
    setup_meta,
)
from milvus.index import IndexConfig

__all__ = ["BuildVariant", "ExitDB", "ExitDBError", "ExitDBMeta", "IndexConfig", "MetadataMismatchError", "StoredBuild",
           "collection_name", "list_exit_dbs", "setup_meta"]
