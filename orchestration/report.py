"""Evaluation reports: markdown tables like the paper's Tables 1, 3, 4 and 8, and the figures (PNG)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from orchestration.methods import METHOD_TITLES, METHODS, PEERS
from raee.records import Neighbours
from raee.tasks import Task


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def _table(lines: list[str], title: str, tasks: list[str], rows: list[tuple[str, list[float]]], fmt: str,
           avg: bool = True) -> None:
    lines += ["", title, "", "| | " + " | ".join(tasks) + (" | avg |" if avg else " |"),
              "|---" * (len(tasks) + 1 + avg) + "|"]
    for name, row in rows:
        lines.append(f"| {name} | " + " | ".join(format(v, fmt) for v in row)
                     + (f" | {format(_mean(row), fmt)} |" if avg else " |"))


def _table1(lines: list[str], results: list[dict], methods: list[str]) -> None:
    """The paper's Table 1 shape: score and mean exit layer per method, 8-task average, and where each wins."""
    tasks = [r["task"] for r in results]
    shown = [m for m in methods if m not in ("fixed_trunc", "confidence", "raee_wo", "full_cal_or")]
    lines += ["", "### Table 1 shape: every method, score x100 (mean exit layer)", "",
              "| method | " + " | ".join(tasks) + " | avg score | avg exit |", "|---" * (len(tasks) + 3) + "|"]
    for m in shown:
        cells = [f"{100 * r['scores'][m]:.1f} ({r['mean_exit'][m]:.1f})" for r in results]
        average = _mean([100 * r["scores"][m] for r in results])
        lines.append(f"| {METHOD_TITLES[m]} | " + " | ".join(cells) + f" | {average:.1f}"
                     f" | {_mean([r['mean_exit'][m] for r in results]):.2f} |")
    best = [max((m for m in shown if not m.startswith("oracle")), key=lambda m, r=r: r["scores"][m]) for r in results]
    lines.append("| best (not the oracle) | " + " | ".join(METHOD_TITLES[b] for b in best) + " | | |")


def markdown(results: list[dict], *, header: dict) -> str:
    """Score table (Table 1), mean exit layer table (Table 8), latency, tuning, diagnostics and sweeps."""
    tasks = [r["task"] for r in results]
    n_layers = results[0]["n_layers"]
    lines = [f"Backbone `{header['model']}`, key encoder `{header['encoder']}`, k={header['k']}, tau={header['tau']}, "
             f"confidence threshold {header['confidence_threshold']}; command: `{header['command']}`."]
    methods = [m for m in METHODS if all(m in r["scores"] for r in results)]  # e.g. no confident on T5
    _table(lines, "### Scores (accuracy; Matthews correlation for CoLA), x100", tasks,
           [(METHOD_TITLES[m], [100 * r["scores"][m] for r in results]) for m in methods], ".1f")
    _table(lines, f"### Mean exit layer (of {n_layers}; 0 = embeddings, kNN runs no backbone)", tasks,
           [(METHOD_TITLES[m], [r["mean_exit"][m] for r in results]) for m in methods], ".2f")

    if any(m in results[0]["scores"] for m in (*PEERS, "fused_or")):
        _table1(lines, results, methods)

    lines += ["", "### Fused policy: knobs chosen on the held-out training slice (never on test)", "",
              "| task | head | tuning examples | beta | slack | tuning score | tuning mean exit | test score "
              "| test mean exit |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for head, p, grid, method in (("lm", r.get("fused_params") or {}, r.get("tune_grid", []), "fused"),
                                      ("offramp", (r.get("offramp") or {}).get("fused_params") or {},
                                       (r.get("offramp") or {}).get("tune_grid", []), "fused_or")):
            chosen = [g for g in grid if g["beta"] == p.get("beta") and g["slack"] == p.get("slack")]
            if chosen and method in r["scores"]:
                g = chosen[0]
                lines.append(f"| {r['task']} | {head} | {r['n_tune']} | {p['beta']:g} | {p['slack']:g} | "
                             f"{100 * g['score']:.1f} | {g['mean_exit']:.2f} | {100 * r['scores'][method]:.1f} | "
                             f"{r['mean_exit'][method]:.2f} |")

    timed = [m for m in methods if all(f"{m}_ms" in lat for r in results for lat in r["latency_ms"].values())]
    for batch in results[0]["latency_ms"]:
        lines += ["", f"### Latency per example at batch {batch}: ms (speed-up vs the full model, measured side by "
                      "side; retrieval policies end to end incl. keys and search; peers as truncated forwards to "
                      "their exits)",
                  "", "| | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
        for m in timed:
            cells = [f"{r['latency_ms'][batch][f'{m}_ms']:.1f}" + (f" ({r['latency_ms'][batch][f'{m}_speedup']:.2f}x)"
                                                                   if m != "full" else "") for r in results]
            lines.append(f"| {METHOD_TITLES[m]} | " + " | ".join(cells) + " |")
    lines += ["", "### Checks", "", "| task | database / tuning / test examples | train share with no correct layer | "
              "engine vs recorded-layer mismatches (RAEE / RAEE cal. / fused; off-ramp head the same; examples "
              "checked) |", "|---|---|---|---|"]
    for r in results:
        mm = r.get("engine_mismatches", {})
        off = (f"; off-ramp head {mm.get('raee_or', '-')} / {mm.get('raee_cal_or', '-')} / {mm.get('fused_or', '-')}"
               if "fused_or" in mm else "")
        lines.append(f"| {r['task']} | {r['n_train']} / {r['n_tune']} / {r['n_test']} | "
                     f"{r['share_train_no_correct_layer']:.3f} | {mm.get('raee', '-')} / {mm.get('raee_cal', '-')} / "
                     f"{mm.get('fused', '-')}{off}; {r.get('engine_checked', '-')} |")
    layers = range(n_layers + 1)
    _table(lines, "### Per-layer score on the test split, raw (x100; the last row is the full model)", tasks,
           [(str(layer), [100 * r["layer_scores"][layer] for r in results]) for layer in layers], ".1f", avg=False)
    if all(r.get("offramp") for r in results):
        _table(lines, "### Per-layer score of the off-ramps on the test split (x100)", tasks,
               [(str(layer), [100 * r["offramp"]["layer_scores"][layer] for r in results]) for layer in layers],
               ".1f", avg=False)
    if results[0].get("layer_scores_calibrated"):
        _table(lines, "### Per-layer score on the test split after calibration (x100)", tasks,
               [(str(layer), [100 * r["layer_scores_calibrated"][layer] for r in results]) for layer in layers],
               ".1f", avg=False)
        _table(lines, "### Constant-class share per layer, raw / calibrated (share of test examples given the "
                      "layer's commonest class)", tasks,
               [(str(layer), [f"{r['constant_share'][layer]:.2f} / {r['constant_share_calibrated'][layer]:.2f}"
                              for r in results]) for layer in layers], "s", avg=False)
    for key, title in (("k_sweep", "k"), ("fraction_sweep", "database fraction")):
        if any(r[key] for r in results):
            lines += ["", f"### RAEE vs {title} (score x100 / mean exit layer)", "",
                      f"| task | {title} | score | mean exit |", "|---|---|---|---|"]
            for r in results:
                for value, point in r[key].items():
                    lines.append(f"| {r['task']} | {value} | {100 * point['score']:.1f} | {point['mean_exit']:.2f} |")
    return "\n".join(lines) + "\n"


def plot_depth_accuracy(folder: str, result: dict) -> Path:
    """Score vs mean exit layer on test: the fused policy's slack sweep (chosen beta) beside the other methods."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    curve = result["depth_curve"]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot([p["mean_exit"] for p in curve], [100 * p["score"] for p in curve], "o-", color="tab:purple",
            label=f"fused, beta={result['fused_params']['beta']:g}, slack 0..1")
    markers = {"fused": "*", "full": "s", "raee": "^", "raee_cal": "v", "raee_wo": "<", "knn": "D",
               "fixed_trunc": "x"}
    for method, marker in markers.items():
        if method in result["scores"]:
            ax.plot(result["mean_exit"][method], 100 * result["scores"][method], marker, ms=10 if marker == "*" else 7,
                    label=METHOD_TITLES[method] + (" (tuned)" if method == "fused" else ""))
    ax.axvline(0.6 * result["n_layers"], color="grey", ls=":", lw=1, label="60% of the layers")
    ax.set(xlabel="mean exit layer", ylabel="test score x100", title=f"{result['task']}: depth vs accuracy",
           xlim=(-0.5, result["n_layers"] + 0.5))
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path = out / f"{result['task']}_depth_accuracy.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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
