"""The `raee` console script as a user runs it: real process, real exit codes, stdout vs stderr."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def raee(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestration.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600, check=False)


def test_help_lists_the_commands_with_examples():
    out = raee("layers", "--help")
    assert out.returncode == 0
    assert "raee layers --task sst2" in out.stdout


def test_unknown_task_is_one_line_and_exit_code_1():
    out = raee("layers", "--task", "imdb", "--quiet")
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        "error: unknown task 'imdb' (known tasks: sst2, sst5, mr, cr, mpqa, subj, trec, cola) "
        "(check the task name and --data-dir; RAEE_DEBUG=1 shows the traceback)"
    ]
    assert out.stdout == ""


def test_missing_data_dir_names_the_path(tmp_path):
    out = raee("layers", "--task", "sst2", "--data-dir", str(tmp_path), "--quiet")
    assert out.returncode == 1
    assert f"{tmp_path}/SST-2/test.tsv not found" in out.stderr
    assert "Traceback" not in out.stderr


def test_debug_shows_the_traceback(tmp_path):
    out = raee("layers", "--task", "imdb", env={"RAEE_DEBUG": "1"})
    assert out.returncode == 1 and "Traceback" in out.stderr


def test_bad_usage_is_exit_code_2():
    assert raee("layers", "--limit", "0").returncode == 2


@pytest.mark.real_model
def test_layers_prints_one_row_per_layer_for_gemma(data_dir, model_cache_dir):
    out = raee("layers", "--task", "sst2", "--limit", "4", "--quiet", "--data-dir", str(data_dir),
               "--cache-dir", model_cache_dir)
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.splitlines() if line.strip()[:2].strip().isdigit()]
    assert len(rows) == 19 and rows[-1].endswith("(full model)")
    as_json = raee("layers", "--task", "sst2", "--limit", "4", "--quiet", "--json", "--data-dir", str(data_dir),
                   "--cache-dir", model_cache_dir)
    record = json.loads(as_json.stdout)
    assert len(record["scores"]) == 19 and record["n_examples"] == 4
