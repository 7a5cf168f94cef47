"""Evaluation reports: markdown tables like the paper's Tables 1, 3, 4 and 8, and the figures (PNG)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from raee.records import Neighbours
from raee.tasks import Task


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def markdown(results: list[dict], *, header: dict) -> str:
    """Score table (Table 1), mean exit layer table (Table 8), latency table and sweeps, as markdown."""
    from orchestration.evaluate import METHOD_TITLES, METHODS

    tasks = [r["task"] for r in results]
    lines = [f"Backbone `{header['model']}`, key encoder `{header['encoder']}`, k={header['k']}, tau={header['tau']}, "
             f"confidence threshold {header['confidence_threshold']}; command: `{header['command']}`.", ""]
    lines += ["### Scores (accuracy; Matthews correlation for CoLA), x100", "",
              "| method | " + " | ".join(tasks) + " | avg |", "|---" * (len(tasks) + 2) + "|"]
    for method in METHODS:
        row = [100 * r["scores"][method] for r in results]
        lines.append(f"| {METHOD_TITLES[method]} | " + " | ".join(f"{v:.1f}" for v in row) + f" | {_mean(row):.1f} |")
    lines += ["", f"### Mean exit layer (of {results[0]['n_layers']}; 0 = embeddings, kNN runs no backbone)", "",
              "| method | " + " | ".join(tasks) + " | avg |", "|---" * (len(tasks) + 2) + "|"]
    for method in METHODS:
        row = [r["mean_exit"][method] for r in results]
        lines.append(f"| {METHOD_TITLES[method]} | " + " | ".join(f"{v:.2f}" for v in row) + f" | {_mean(row):.2f} |")
    lines += ["", "### End-to-end latency per example (ms; RAEE includes encoder, retrieval and policy)", "",
              "| task | batch | full model | RAEE | speedup |", "|---|---|---|---|---|"]
    for r in results:
        for batch, lat in r["latency_ms"].items():
            lines.append(f"| {r['task']} | {batch} | {lat['full_ms']:.1f} | {lat['raee_ms']:.1f} | "
                         f"{lat['speedup']:.2f}x |")
    lines += ["", "### Checks", "", "| task | train / test examples | train share with no correct layer | "
              "RAEE engine vs recorded-layer mismatches |", "|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['task']} | {r['n_train']} / {r['n_test']} | {r['share_train_no_correct_layer']:.3f} | "
                     f"{r['raee_engine_mismatches']} |")
    lines += ["", "### Per-layer score on the test split (x100; the last row is the full model)", "",
              "| layer | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    for layer in range(results[0]["n_layers"] + 1):
        lines.append(f"| {layer} | " + " | ".join(f"{100 * r['layer_scores'][layer]:.1f}" for r in results) + " |")
    for key, title in (("k_sweep", "k"), ("fraction_sweep", "database fraction")):
        if any(r[key] for r in results):
            lines += ["", f"### RAEE vs {title} (score x100 / mean exit layer)", "",
                      f"| task | {title} | score | mean exit |", "|---|---|---|---|"]
            for r in results:
                for value, point in r[key].items():
                    lines.append(f"| {r['task']} | {value} | {100 * point['score']:.1f} | {point['mean_exit']:.2f} |")
    return "\n".join(lines) + "\n"


def plot_task_figures(folder: str, task: Task, layer_probs: np.ndarray, labels: np.ndarray, found: Neighbours,
                      exit_histogram: list[int], k: int) -> list[Path]:
    """Figure 2 (gold-label prob per layer: a test example vs its k neighbours) and the exit-layer histogram."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    n_layers = layer_probs.shape[1] - 1
    layers = np.arange(n_layers + 1)
    example = 0
    gold = layer_probs[example, :, labels[example]]  # (L+1,)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for j in range(min(k, found.exit_probs.shape[1])):
        if found.ids[example, j] >= 0:
            ax.plot(layers, found.exit_probs[example, j], color="tab:blue", alpha=0.35, lw=1,
                    label="neighbours (0 where wrong)" if j == 0 else None)
    ax.plot(layers, gold, color="tab:red", lw=2.5, label="test example (gold-label prob)")
    ax.set(xlabel="layer", ylabel="probability of the gold label", ylim=(0, 1.02),
           title=f"{task.name}: test example 0 vs its {k} nearest training examples")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig2_path = out / f"{task.name}_figure2.png"
    fig.savefig(fig2_path, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 3))
    ax.bar(layers, exit_histogram, color="tab:green")
    ax.set(xlabel="exit layer", ylabel="test examples", title=f"{task.name}: RAEE exit layers")
    fig.tight_layout()
    hist_path = out / f"{task.name}_exit_hist.png"
    fig.savefig(hist_path, dpi=110)
    plt.close(fig)
    return [fig2_path, hist_path]
