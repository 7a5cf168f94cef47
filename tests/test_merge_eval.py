"""scripts/merge_eval.py: runs of `raee eval` merged into one report only when their settings agree."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "merge_eval.py"
spec = importlib.util.spec_from_file_location("merge_eval", SCRIPT)
merge_eval = importlib.util.module_from_spec(spec)
spec.loader.exec_module(merge_eval)


def _run(command: str, db: str, tasks: dict[str, float], k: int = 12) -> dict:
    return {"header": {"model": "m", "encoder": "e", "command": command, "k": k, "db_uri": db},
            "tasks": [{"task": name, "score": score} for name, score in tasks.items()]}


def test_runs_with_the_same_settings_merge_and_a_repeated_task_comes_from_the_last_run():
    merged = merge_eval.merge([_run("a", "one.db", {"sst2": 0.1, "trec": 0.2}), _run("b", "two.db", {"trec": 0.3})])
    assert [(t["task"], t["score"]) for t in merged["tasks"]] == [("sst2", 0.1), ("trec", 0.3)]
    assert merged["header"]["command"] == "a ; b"


def test_runs_with_another_setting_are_refused_naming_it():
    with pytest.raises(ValueError, match=r"differs from run 1 in k \(12 vs 8\)"):
        merge_eval.merge([_run("a", "one.db", {"sst2": 0.1}), _run("b", "one.db", {"trec": 0.2}, k=8)])


def test_the_command_line_says_what_is_wrong_in_one_line(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(_run("a", "x.db", {"sst2": 0.1})))
    done = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "a.json"), str(tmp_path / "missing.json"),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "missing.json" in done.stderr and "Traceback" not in done.stderr
