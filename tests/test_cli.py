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


def test_bad_policy_options_are_usage_errors():
    def message(out: subprocess.CompletedProcess) -> str:  # typer draws a box and wraps the line
        return " ".join(out.stderr.replace("│", " ").split())

    out = raee("explain", "a gem", "--policy", "nope")
    assert out.returncode == 2 and "unknown exit policy 'nope'; known: fused, raee, raee-cal" in message(out)
    out = raee("explain", "a gem", "--policy", "raee", "--beta", "2")
    assert out.returncode == 2 and "policy 'raee' has no beta" in message(out)
    out = raee("explain", "a gem", "   ")  # bad text is refused before any model loads
    assert out.returncode == 2 and "text 1 is empty or whitespace only" in message(out)


@pytest.mark.real_model
def test_layers_prints_one_row_per_layer_for_gemma(data_dir, model_cache_dir):
    out = raee("layers", "--task", "sst2", "--limit", "4", "--quiet", "--data-dir", str(data_dir),
               "--cache-dir", model_cache_dir, "--calibration-examples", "8")
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.splitlines() if line.strip()[:2].strip().isdigit()]
    assert len(rows) == 19 and rows[-1].endswith("(full model)")
    assert "calibrated on 8 training examples" in out.stdout and len(rows[0].split()) == 5  # + calibrated columns
    as_json = raee("layers", "--task", "sst2", "--limit", "4", "--quiet", "--json", "--data-dir", str(data_dir),
                   "--cache-dir", model_cache_dir, "--calibration-examples", "0")
    record = json.loads(as_json.stdout)
    assert len(record["scores"]) == 19 and record["n_examples"] == 4 and record["scores_calibrated"] is None


@pytest.mark.real_model
def test_build_and_explain_with_the_fused_policy(data_dir, model_cache_dir, tmp_path):
    db = str(tmp_path / "cli.db")
    common = ("--task", "sst2", "--quiet", "--data-dir", str(data_dir), "--cache-dir", model_cache_dir, "--db", db)
    built = raee("build", *common, "--fraction", "0.003", "--policy", "fused", "--json")
    assert built.returncode == 0, built.stderr
    summary = json.loads(built.stdout)
    assert summary["n_records"] == summary["n_in_db"] == 21
    out = raee("explain", "a gorgeous , witty , seductive movie .", "--task", "sst2", "--quiet", "--cache-dir",
               model_cache_dir, "--db", db, "--policy", "fused", "--slack", "0.1", "--fraction", "0.003", "--json")
    assert out.returncode == 0, out.stderr
    answer = json.loads(out.stdout)
    assert 0 <= answer["exit_layer"] <= 18 and answer["label_word"] in ("negative", "positive")
    assert len(answer["neighbours"]) == 12 and abs(sum(answer["probs"]) - 1) < 1e-5
    # the paper's policy needs the uncalibrated database, which was not built: a clear error, exit 1
    out = raee("explain", "a gem", "--task", "sst2", "--quiet", "--cache-dir", model_cache_dir, "--db", db,
               "--fraction", "0.003")
    assert out.returncode == 1 and "raee build --task sst2 --policy raee" in out.stderr



@pytest.mark.real_model
@pytest.mark.milvus_server
def test_a_wrong_milvus_token_is_one_line_and_exit_code_1(data_dir, model_cache_dir, milvus_server_uri):
    out = raee("build", "--task", "sst2", "--fraction", "0.001", "--quiet", "--data-dir", str(data_dir),
               "--cache-dir", model_cache_dir, "--db", milvus_server_uri, env={"RAEE_MILVUS_TOKEN": "root:wrong"})
    assert out.returncode == 1, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in out.stderr
