"""The `raee` console script as a user runs it: real process, real exit codes, stdout vs stderr.

The real-model tests replay a new user's first hour (the "first hour" issue): build once, then explain with
any policy and no repeated build options, one JSON document per --json, one `error:` line per mistake.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def raee(*args: str, env: dict | None = None, cwd: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestration.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=900, check=False, cwd=cwd)


def one_line(out: subprocess.CompletedProcess) -> str:
    """A known failure's stderr: exactly one `error:` line."""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr[-2000:]
    assert out.returncode == 1 and "Traceback" not in out.stderr
    return lines[0]


def usage(out: subprocess.CompletedProcess) -> str:
    """A usage error's message (typer draws a box and wraps the line)."""
    assert out.returncode == 2, out.stderr
    return " ".join(out.stderr.replace("│", " ").split())


def test_help_lists_the_commands_with_examples():
    out = raee("layers", "--help")
    assert out.returncode == 0
    assert "raee layers --task sst2" in out.stdout
    top = raee("--help").stdout
    for command in ("layers", "build", "explain", "score", "eval", "serve", "tasks"):
        assert command in top
    serve_help = " ".join(raee("serve", "--help").stdout.replace("│", " ").split())
    assert "--max-text-chars" in serve_help and "--max-texts" in serve_help and "/healthz" in serve_help


def test_version():
    out = raee("--version")
    assert out.returncode == 0 and out.stdout.startswith("raee ")


def test_unknown_task_is_one_line_and_exit_code_1():
    out = raee("layers", "--task", "imdb", "--quiet")
    assert one_line(out) == (
        "error: unknown task 'imdb': not a built-in task (sst2, sst5, mr, cr, mpqa, subj, trec, cola) and not a "
        "spec file (path/to/spec.toml; `raee tasks init` writes one) (check the task name or spec and --data-dir; "
        "RAEE_DEBUG=1 shows the traceback)")
    assert out.stdout == ""


def test_missing_data_dir_names_the_path(tmp_path):
    out = raee("layers", "--task", "sst2", "--data-dir", str(tmp_path), "--quiet")
    assert f"{tmp_path}/SST-2/test.tsv of task sst2 not found" in one_line(out)


def test_debug_shows_the_traceback(tmp_path):
    out = raee("layers", "--task", "imdb", env={"RAEE_DEBUG": "1"})
    assert out.returncode == 1 and "Traceback" in out.stderr


def test_bad_usage_is_exit_code_2():
    assert raee("layers", "--limit", "0").returncode == 2
    assert "0.0 is not in (0, 1]" in usage(raee("build", "--fraction", "0"))
    assert "1.5 is not in (0, 1]" in usage(raee("explain", "a gem", "--fraction", "1.5"))
    assert "unknown index 'ivf_pq'; use auto, flat, hnsw, ivf_flat" in usage(raee("build", "--index", "ivf_pq"))


def test_bad_policy_options_are_usage_errors():
    assert "unknown exit policy 'nope'; known: confident, fused, raee, raee-cal" in usage(raee("explain", "a gem",
                                                                                                 "--policy", "nope"))
    assert "policy 'raee' has no beta" in usage(raee("explain", "a gem", "--policy", "raee", "--beta", "2"))
    # bad text is refused before any model loads
    assert "text 1 is empty or whitespace only" in usage(raee("explain", "a gem", "   "))


def test_a_missing_database_is_one_line_naming_the_build_command(tmp_path):
    out = raee("explain", "a gem", "--task", "sst2", "--db", str(tmp_path / "none.db"), "--quiet")
    assert f"no exit database at {tmp_path}/none.db; build one with: raee build --task sst2 --db" in one_line(out)


def test_tasks_lists_the_built_ins_and_init_writes_a_spec(tmp_path):
    out = raee("tasks")
    assert out.returncode == 0 and out.stdout.splitlines()[0].split()[:2] == ["sst2", "accuracy"]
    assert len(json.loads(raee("tasks", "--json").stdout)) == 8
    data = tmp_path / "tickets.jsonl"
    data.write_text("".join(json.dumps({"body": f"ticket {i}", "queue": q}) + "\n"
                            for i, q in enumerate(["billing", "bugs", "billing", "access"])))
    out = raee("tasks", "init", str(data), "--text", "body", "--label", "queue", "--out", str(tmp_path / "t.toml"))
    assert out.returncode == 0, out.stderr
    spec = (tmp_path / "t.toml").read_text()
    assert '"access" = "access"' in spec and 'train = "tickets.jsonl"' in spec
    again = raee("tasks", "init", str(data), "--text", "body", "--label", "queue", "--out", str(tmp_path / "t.toml"))
    assert "exists; pass --force" in usage(again)
    bad = raee("tasks", "init", str(data), "--text", "text", "--label", "queue", "--out", str(tmp_path / "u.toml"))
    assert "no column(s) ['text']; its columns are ['body', 'queue']" in one_line(bad)


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
    (record,) = json.loads(as_json.stdout)
    assert len(record["scores"]) == 19 and record["n_examples"] == 4 and record["scores_calibrated"] is None


@pytest.fixture(scope="module")
def first_hour_db(tmp_path_factory, data_dir, model_cache_dir):
    """An SST-2 build with --fraction 0.003 (21 examples) by the CLI with the real Gemma: (db path, common args)."""
    db = str(tmp_path_factory.mktemp("first-hour") / "sst2.db")
    common = ("--quiet", "--cache-dir", model_cache_dir, "--db", db)
    built = raee("build", "--task", "sst2", "--data-dir", str(data_dir), "--fraction", "0.003", "--json", *common)
    assert built.returncode == 0, built.stderr
    (summary,) = json.loads(built.stdout)
    assert summary["n_records"] == summary["n_in_db"] == 21 and summary["variant"] == "fraction 0.003 (seed 0)"
    assert summary["index"] == "FLAT (exact)"  # --index auto: exact while small, and the summary says so
    return db, common


@pytest.mark.real_model
def test_one_build_serves_every_policy_without_repeating_build_options(first_hour_db):
    _, common = first_hour_db
    out = raee("explain", "a gorgeous , witty , seductive movie .", "a dull mess", "--json", *common)
    assert out.returncode == 0, out.stderr
    document = json.loads(out.stdout)  # ONE JSON document for several texts
    assert document["policy"] == "fused" and len(document["predictions"]) == 2
    answer = document["predictions"][0]
    assert 0 <= answer["exit_layer"] <= 18 and answer["label_word"] in ("negative", "positive")
    assert len(answer["neighbours"]) == 12 and abs(sum(answer["probs"]) - 1) < 1e-5
    for policy in ("raee", "raee-cal"):  # the same build, another policy: no rebuild, no options to repeat
        out = raee("explain", "a gem", "--policy", policy, "--json", *common)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["predictions"][0]["policy"] == policy
    text = raee("explain", " ".join(["great"] * 1000), "--policy", "raee", *common)
    assert text.returncode == 0 and "TRUNCATED" in text.stdout  # visible without --json


@pytest.mark.real_model
def test_several_builds_are_listed_with_how_to_pick_one(first_hour_db, data_dir):
    _, common = first_hour_db
    built = raee("build", "--task", "sst2", "--data-dir", str(data_dir), "--fraction", "0.002", "--seed", "1",
                 "--json", *common)
    assert built.returncode == 0, built.stderr
    error = one_line(raee("explain", "a gem", *common))
    assert "2 exit databases for task sst2" in error and "fraction 0.003 (seed 0)" in error
    assert "pick one with --collection NAME (or --fraction / --only-correct / --head)" in error
    out = raee("explain", "a gem", "--fraction", "0.002", "--json", *common)
    assert out.returncode == 0, out.stderr
    name = json.loads(built.stdout)[0]["collection"]
    assert raee("explain", "a gem", "--collection", name, *common).returncode == 0
    assert "no build of task sst2" in one_line(raee("explain", "a gem", "--fraction", "0.5", *common))


@pytest.mark.real_model
def test_a_spec_of_your_own_goes_from_build_to_explain(tmp_path, model_cache_dir):
    """A JSONL file with string labels, a spec over it: build then explain by path, with the real Gemma."""
    rows = [("the food was cold and late", "complaint"), ("thanks , the refund arrived", "praise"),
            ("my parcel never came", "complaint"), ("great support , very quick", "praise"),
            ("the app crashes on start", "complaint"), ("lovely staff and fast delivery", "praise")]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text("".join(json.dumps({"msg": t, "kind": k}) + "\n" for t, k in rows))
    (tmp_path / "feedback.toml").write_text(
        'name = "feedback"\ntemplate = "Message: {text}\\nIs this a complaint or praise? Answer:"\n'
        '[data]\ntrain = "data/train.jsonl"\ntext = "msg"\nlabel = "kind"\n'
        '[labels]\ncomplaint = "complaint"\npraise = "praise"\n')
    common = ("--task", "feedback.toml", "--quiet", "--cache-dir", model_cache_dir, "--db", "fb.db")
    built = raee("build", *common, cwd=str(tmp_path))
    assert built.returncode == 0, built.stderr
    out = raee("explain", "where is my order ?", "--json", "--k", "3", *common, cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr
    answer = json.loads(out.stdout)["predictions"][0]
    assert answer["label_word"] in ("complaint", "praise") and len(answer["neighbours"]) == 3
    # editing the label words after the build is refused with both digests named
    spec = (tmp_path / "feedback.toml").read_text().replace('praise = "praise"', 'praise = "thanks"')
    (tmp_path / "feedback.toml").write_text(spec)
    error = one_line(raee("explain", "where is my order ?", *common, cwd=str(tmp_path)))
    assert "built for another version of task feedback" in error
    assert "rebuild it: raee build --task feedback.toml" in error


@pytest.mark.real_model
@pytest.mark.milvus_server
def test_a_wrong_milvus_token_is_one_line_and_exit_code_1(data_dir, model_cache_dir, milvus_server_uri):
    out = raee("build", "--task", "sst2", "--fraction", "0.001", "--quiet", "--data-dir", str(data_dir),
               "--cache-dir", model_cache_dir, "--db", milvus_server_uri, env={"RAEE_MILVUS_TOKEN": "root:wrong"})
    one_line(out)
