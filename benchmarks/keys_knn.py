"""Which key input makes better neighbours: the raw sentence or the templated prompt?

For each task: encode seeded random subsets of `--n-train` training and `--n-test` test examples,
retrieve the k nearest by squared L2 on normalised keys (exactly what a FLAT L2 exit database returns,
computed here in numpy so both key inputs see the same candidates) and report
- the weighted kNN label vote (Eq. 5 weights): how often the neighbourhood alone gets the label right;
- with `--backbone`, RAEE itself: exit sets from the backbone's per-layer probabilities (Alg. 3.1), exit
  layers from the policy (Eq. 4-6, tau 0.9, k 12), the score at those layers and the mean exit layer.
  Per-layer probabilities are computed once per task and shared by both key inputs.
Prints one JSON line per (task, key input).

    python benchmarks/keys_knn.py --tasks sst2,subj,trec --n-train 2000 --n-test 500
    python benchmarks/keys_knn.py --tasks sst2,trec --n-train 2000 --n-test 300 --backbone gemma-3-270m
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from raee.exit_policy import ExitPolicy, knn_vote
from raee.keys import SentenceEncoder
from raee.records import Neighbours
from raee.tasks import Dataset, load_split, parse_tasks, score


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="sst2,subj,trec")
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--n-test", type=int, default=500)
    parser.add_argument("--k", type=int, default=12)
    parser.add_argument("--tau", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--encoder", default="all-minilm-l6-v2")
    parser.add_argument("--backbone", default=None, help="also score RAEE with this backbone (registry name)")
    parser.add_argument("--cache-dir", default=None, help="converted-model cache (default: raee's)")
    args = parser.parse_args()
    backbone = None
    if args.backbone:
        from raee.models import load_backbone

        backbone = load_backbone(args.backbone, cache_dir=args.cache_dir, device="cpu")
    style = backbone.style if backbone is not None else "causal"
    encoders = {key_input: SentenceEncoder(args.encoder, key_input=key_input, style=style)
                for key_input in ("sentence", "prompt")}
    policy = ExitPolicy(tau=args.tau, k=args.k)
    for task in parse_tasks(args.tasks):
        train, full_test = load_split(task, "train"), load_split(task, "test")
        rng = np.random.default_rng(args.seed)  # seeded subsets: several test files are sorted by label
        pick = np.sort(rng.permutation(len(train))[: args.n_train])
        keep = np.sort(rng.permutation(len(full_test))[: args.n_test])
        test = Dataset(task, "test", tuple(full_test.texts[i] for i in keep), full_test.labels[keep])
        train_texts, train_labels = [train.texts[i] for i in pick], train.labels[pick]
        raee: dict[str, float] = {}
        if backbone is not None:
            start = time.perf_counter()
            train_probs = backbone.layer_probs(train_texts, task)  # (N, L+1, C)
            test_probs = backbone.layer_probs(list(test.texts), task)  # (Q, L+1, C)
            correct = train_probs.argmax(2) == train_labels[:, None]  # (N, L+1)
            exit_probs = np.where(correct, np.take_along_axis(train_probs, train_labels[:, None, None], 2)[..., 0], 0)
            full = score(task, test_probs[:, -1].argmax(1), test.labels)
            raee = {"full_model_score": round(full, 4), "backbone_s": round(time.perf_counter() - start, 1)}
        for key_input, encoder in encoders.items():
            start = time.perf_counter()
            db = encoder.encode(train_texts, task)  # (N, D) normalised
            queries = encoder.encode(list(test.texts), task)  # (Q, D)
            d = np.maximum(2.0 - 2.0 * queries @ db.T, 0.0)  # (Q, N) squared L2 of unit vectors
            nearest = np.argsort(d, axis=1, kind="stable")[:, : args.k]  # (Q, k)
            dist = np.take_along_axis(d, nearest, axis=1).astype(np.float32)
            votes = knn_vote(dist, train_labels[nearest], task.n_classes)
            row = {
                "task": task.name, "key_input": key_input, "encoder": encoder.name, "n_train": len(pick),
                "n_test": len(test), "k": args.k, "knn_vote_score": round(score(task, votes.argmax(1), test.labels), 4),
                "neighbour_label_agreement": round(float(np.mean(train_labels[nearest] == test.labels[:, None])), 4),
            }
            if backbone is not None:
                found = Neighbours(ids=nearest.astype(np.int64), distances=dist, exit_probs=exit_probs[nearest],
                                   labels=train_labels[nearest])
                exits = policy.exit_layers(found)  # (Q,)
                preds = test_probs[np.arange(len(test)), exits].argmax(1)  # = predict at those layers (exactness)
                row |= {"backbone": backbone.name, "tau": args.tau, **raee,
                        "raee_score": round(score(task, preds, test.labels), 4),
                        "mean_exit_layer": round(float(exits.mean()), 2), "n_layers": backbone.n_layers}
            row["seconds"] = round(time.perf_counter() - start, 1)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
