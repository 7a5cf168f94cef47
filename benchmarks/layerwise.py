"""Full forward vs the forward truncated at L/2 on the same batch of real task inputs (ideal ratio ~0.5).

    python benchmarks/layerwise.py --task sst2 --batch-size 32 --repeats 7
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, provenance, timed_alternating

from raee.models import DEFAULT_BACKBONE, load_backbone
from raee.tasks import get_task, load_split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--model", default=DEFAULT_BACKBONE)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    task = get_task(args.task)
    texts = list(load_split(task, "test", args.data_dir).texts[: args.batch_size])
    backbone = load_backbone(args.model, batch_size=args.batch_size)
    n_layers, half = backbone.n_layers, backbone.n_layers // 2
    batch = backbone.tokenizer([task.prompt(t) for t in texts], return_tensors="pt", padding=True)
    batch = {k: v.to(backbone.device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}

    def hf_forward() -> None:  # the unmodified Hugging Face model, full vocabulary logits
        with torch.no_grad():
            backbone.model(**batch, logits_to_keep=1)

    times = timed_alternating({
        "hf_forward": hf_forward,
        "raee_full": lambda: backbone.predict(texts, task, n_layers),
        "raee_half": lambda: backbone.predict(texts, task, half),
    }, repeats=args.repeats)
    med = {name: float(np.median(t)) for name, t in times.items()}
    emit(provenance(benchmark="layerwise", model=args.model, task=task.name, dtype="float32",
                    batch_size=len(texts), seed=args.seed, repeats=args.repeats, n_layers=n_layers,
                    exit_layer=half, median_s={k: round(v, 4) for k, v in med.items()},
                    ratio_half_over_full=round(med["raee_half"] / med["raee_full"], 3),
                    ratio_full_over_hf=round(med["raee_full"] / med["hf_forward"], 3)))


if __name__ == "__main__":
    main()
