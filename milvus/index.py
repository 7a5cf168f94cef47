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
from typing import Literal, get_args

IndexKind = Literal["FLAT", "HNSW", "IVF_FLAT"]
IndexChoice = Literal["auto", "flat", "hnsw", "ivf_flat"]  # `raee build --index`
_KINDS: tuple[str, ...] = ("FLAT", "HNSW", "IVF_FLAT")
INDEX_CHOICES: tuple[str, ...] = get_args(IndexChoice)
FLAT_MAX_RECORDS = 100_000  # auto: exact search up to here (Lite FLAT: ~0.2 s per query at 100k, docs/milvus.md)


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

    def describe(self) -> str:
        """The kind and every parameter that shapes its answers, e.g. "HNSW (M=16, efConstruction=200; ef=128)"."""
        if self.kind == "FLAT":
            return "FLAT (exact)"
        build = ", ".join(f"{k}={v}" for k, v in self.build_params().items())
        search = ", ".join(f"{k}={v}" for k, v in self.search_params(1).items())
        return f"{self.kind} ({build}; {search})"


# Search parameters chosen on 1M MiniLM-shaped keys (benchmarks/search_scale.py, docs/milvus.md): the smallest
# that keep recall@12 >= 0.95 and the exit layer equal to FLAT's for >= 99% of queries there. IVF_FLAT reached
# neither exit target up to nprobe=128 (recall 0.976, exits 98.2%), so "auto" never picks it.
TUNED: dict[str, IndexConfig] = {
    "hnsw": IndexConfig(kind="HNSW", m=16, ef_construction=128, ef=256),  # 1M: recall 0.9965, exits 99.6%
    "ivf_flat": IndexConfig(kind="IVF_FLAT", nlist=1024, nprobe=128),  # 1M: recall 0.976, exits 98.2%
}


def choose_index(choice: IndexConfig | str | None, n_records: int) -> IndexConfig | None:
    """The index a build of n_records gets: an IndexConfig as given; "flat" / "hnsw" / "ivf_flat" as TUNED;
    "auto" FLAT up to FLAT_MAX_RECORDS, else HNSW; None keeps an existing collection's index (FLAT when new)."""
    if choice is None or isinstance(choice, IndexConfig):
        return choice
    if choice not in INDEX_CHOICES:
        raise ValueError(f"index must be one of {list(INDEX_CHOICES)}, got {choice!r}")
    if choice == "auto":
        choice = "flat" if n_records <= FLAT_MAX_RECORDS else "hnsw"
    return IndexConfig() if choice == "flat" else TUNED[choice]
