"""The exit database on Milvus: schema, metadata guard, idempotent upserts, batched top-k search.

Milvus Lite (`./raee.db`) by default; a Milvus server URI for several processes or millions of records.
"""

from milvus.exit_db import ExitDB, ExitDBError, ExitDBMeta, MetadataMismatchError, collection_name
from milvus.index import IndexConfig

__all__ = ["ExitDB", "ExitDBError", "ExitDBMeta", "IndexConfig", "MetadataMismatchError", "collection_name"]
