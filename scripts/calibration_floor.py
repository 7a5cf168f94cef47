"""Which layers of a backbone give some label less than the calibration floor (1e-6) on average, per task.

Where they do, contextual calibration cannot divide the layer's bias out (docs/exit-policies.md, "Known limit of
the floor"). Reads a seeded sample of each task's training split through the backbone once. Run from the
repository root:

    python scripts/calibration_floor.py sst2 sst5 mr cr mpqa subj trec cola examples/movie-reviews/movie-reviews.toml
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from raee.calibration import MIN_BIAS as FLOOR
from raee.models import DEFAULT_BACKBONE, load_backbone
from raee.tasks import get_task, load_split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("tasks", nargs="+", help="built-in task names or spec paths")
    parser.add_argument("--model", default=DEFAULT_BACKBONE)
    parser.add_argument("--sample", type=int, default=32, help="training examples per task (seeded)")
    args = parser.parse_args()
    backbone = load_backbone(args.model)
    for name in args.tasks:
        task = get_task(name)
        data = load_split(task, "train").sample(args.sample, seed=0)
        probs = backbone.layer_probs(list(data.texts), task, pairs=list(data.pairs) if data.pairs else None)
        q = probs.mean(axis=0)  # (L+1, C): the calibration's q, each layer's mean label distribution
        below = np.flatnonzero((q < FLOOR).any(axis=1)).tolist()
        print(f"{task.name}: smallest mean label probability {q.min():.3g}; layers below the floor: {below}",
              flush=True)


if __name__ == "__main__":
    main()
