"""Merge the results.json of several `raee eval` runs into one report: tasks evaluated in separate runs
(another session, another machine) land in one table, as if one run had done them all.

    python scripts/merge_eval.py runs/table1/results.json runs/table1b/results.json --out runs/table1-all

The runs must agree on every setting that changes a figure (model, encoder, k, tau, tuning, heads, peers, ...);
only the command, the database path and the cache folder may differ. A task in several runs is taken from the
last one given. Writes OUT/results.json (the commands of every run in its header) and OUT/results.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from orchestration.report import markdown

UNCHANGED_BY = ("command", "db_uri", "cache_dir")  # header keys that may differ between merged runs


def merge(runs: list[dict]) -> dict:
    """One results document from several; ValueError naming the setting where two runs differ."""
    if not runs:
        raise ValueError("nothing to merge")
    first = {k: v for k, v in runs[0]["header"].items() if k not in UNCHANGED_BY}
    for i, run in enumerate(runs[1:], start=2):
        other = {k: v for k, v in run["header"].items() if k not in UNCHANGED_BY}
        diffs = sorted(k for k in first.keys() | other.keys() if first.get(k) != other.get(k))
        if diffs:
            named = ", ".join(f"{k} ({first.get(k)!r} vs {other.get(k)!r})" for k in diffs)
            raise ValueError(f"run {i} differs from run 1 in {named}: its figures are not comparable")
    tasks: dict[str, dict] = {}
    for run in runs:
        tasks.update({result["task"]: result for result in run["tasks"]})
    commands = [run["header"]["command"] for run in runs]
    return {"header": {**runs[0]["header"], "command": " ; ".join(commands)}, "tasks": list(tasks.values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", type=Path, help="results.json files of `raee eval` runs")
    parser.add_argument("--out", required=True, type=Path, help="folder for the merged results.json and results.md")
    args = parser.parse_args()
    try:
        merged = merge([json.loads(path.read_text()) for path in args.results])
    except (OSError, ValueError, KeyError) as exc:
        parser.exit(2, f"error: {exc}\n")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(merged, indent=1))
    (args.out / "results.md").write_text(markdown(merged["tasks"], header=merged["header"]))
    print(f"{len(merged['tasks'])} tasks ({', '.join(r['task'] for r in merged['tasks'])}) -> {args.out}")


if __name__ == "__main__":
    main()
