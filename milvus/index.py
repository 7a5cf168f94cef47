"""Vector index choices for the exit database, limited to the ones both Milvus Lite and 2.3.5 build.

Why an allow-list: Milvus Lite 3.2.2 accepts IVF_PQ, DISKANN or SCANN in `create_index` and then never
builds them (its background build raises and `describe_index` still reports every row as indexed), and
Milvus 2.3.5 mis-handles HNSW_SQ and DISKANN. Refusing them here is cheaper than discovering a silent
brute-force scan or a crash in production. FLAT (exact) is the default: it is what the authors' FAISS
code used and it is fast enough on Lite up to a few hundred thousand records. HNSW or IVF_FLAT are for
large collections on a server; their search-time knob (`ef` / `nprobe`) is sent with every search.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

IndexKind = Literal["FLAT", "HNSW", "IVF_FLAT"]
_KINDS: tuple[str, ...] = ("FLAT", "HNSW", "IVF_FLAT")


@dataclass(frozen=True)
class IndexConfig:
    """How the key-vector field is indexed and searched.

    kind      FLAT (exact), HNSW (graph: `m`, `ef_construction` at build, `ef` at search) or
              IVF_FLAT (`nlist` clusters at build, `nprobe` probed at search).
    """

    kind: IndexKind = "FLAT"
    m: int = 16
    ef_construction: int = 200
    ef: int = 64
    nlist: int = 1024
    nprobe: int = 32

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(
                f"index kind {self.kind!r} is not supported; use one of {list(_KINDS)} "
                "(Milvus Lite never builds IVF_PQ/DISKANN/SCANN, 2.3.5 mis-handles HNSW_SQ/DISKANN)"
            )
        for name in ("m", "ef_construction", "ef", "nlist", "nprobe"):
            if getattr(self, name) < 1:
                raise ValueError(f"IndexConfig.{name} must be >= 1, got {getattr(self, name)}")

    def build_params(self) -> dict[str, int]:
        """Parameters for `create_index`, in Milvus' names."""
        if self.kind == "HNSW":
            return {"M": self.m, "efConstruction": self.ef_construction}
        if self.kind == "IVF_FLAT":
            return {"nlist": self.nlist}
        return {}

    def search_params(self, k: int) -> dict[str, int]:
        """Parameters for `search`; HNSW needs ef >= k, so ef is raised to k when smaller."""
        if self.kind == "HNSW":
            return {"ef": max(self.ef, k)}
        if self.kind == "IVF_FLAT":
            return {"nprobe": min(self.nprobe, self.nlist)}
        return {}
