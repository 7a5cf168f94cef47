"""Bring your own task: a spec over csv / tsv / jsonl / parquet files - text pairs, string labels, multi-token label
words - goes end to end with tiny models: build, explain, serve over HTTP and eval, in process and on Ray actors.
The task exists only in a file on the driver; actors and replicas receive it as an object."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests

from milvus.exit_db import ExitDB, setup_meta
from orchestration.pipelines import RayOptions, build, choose_build, explain, open_engine
from raee.records import record_ids
from raee.spec import ModelSpec
from raee.tasks import Task, get_task, load_split
from tests.fixtures_models import SENTENCES
from tests.fixtures_ray import ACTOR_CPUS, serve_config, tiny_llama_models

MODEL = ModelSpec(factory=tiny_llama_models)
# Words the tiny word-level tokenizer knows (tests/fixtures_models.py), so label words are real tokens.
SPEC = """
name = "NAME"
metric = "macro_f1"
template = "the sentence {text} ? {text_pair} The answer is"
[data]
train = "data/train.FMT"
test = "data/test.FMT"
text = "review"
text_pair = "context"
label = "stars"
[labels]
"1" = "bad"
"3" = "okay"
"5" = "good"
"""
# Label words of two tokens that share their first ("not"): scored by the sum of their tokens' log-probabilities.
MULTI_TOKEN = SPEC.replace('"1" = "bad"', '"1" = "not good"').replace('"5" = "good"', '"5" = "not bad"')
PAIRS = list(itertools.permutations(SENTENCES, 2))  # 56 (review, context) pairs


def write_task(folder, fmt: str, *, name: str = "reviews", spec: str = SPEC, n_train: int = 40,
               n_test: int = 12) -> Task:
    """A pair task over seeded rows in `fmt` (stars as numbers where the format has types); its spec path."""
    rng = np.random.default_rng(0)
    stars = rng.choice(["1", "3", "5"], size=len(PAIRS))
    rows = [(r, c, s) for (r, c), s in zip(PAIRS, stars, strict=True)]
    (folder / "data").mkdir(parents=True, exist_ok=True)
    for split, part in (("train", rows[:n_train]), ("test", rows[n_train : n_train + n_test])):
        path = folder / "data" / f"{split}.{fmt}"
        if fmt == "jsonl":
            lines = (json.dumps({"review": r, "context": c, "stars": int(s)}) for r, c, s in part)
            path.write_text("".join(line + "\n" for line in lines))
        elif fmt == "parquet":
            pq.write_table(pa.table({"review": [r for r, _, _ in part], "context": [c for _, c, _ in part],
                                     "stars": [int(s) for _, _, s in part]}), path)
        else:
            sep = "," if fmt == "csv" else "\t"
            quote = (lambda t: '"' + t.replace('"', '""') + '"') if fmt == "csv" else (lambda t: t)
            path.write_text("\n".join([sep.join(["review", "context", "stars"]),
                                       *(sep.join([quote(r), quote(c), s]) for r, c, s in part)]) + "\n")
    spec_path = folder / f"{name}.toml"
    spec_path.write_text(spec.replace("NAME", name).replace("FMT", fmt))
    return get_task(str(spec_path))


@pytest.fixture(scope="module")
def models_reused():
    return tiny_llama_models()


def test_each_format_builds_the_same_records_and_explains(tmp_path, models_reused):
    stored = {}
    for fmt in ("csv", "tsv", "jsonl", "parquet"):
        task = write_task(tmp_path / fmt, fmt)
        uri = str(tmp_path / f"{fmt}.db")
        (summary,) = build([task], model=MODEL, db_uri=uri, quiet=True)
        assert summary.n_in_db == 40 and summary.task == "reviews"
        with ExitDB(uri, collection=summary.collection, meta=setup_meta(*models_reused, task)) as db:
            stored[fmt] = db.get(record_ids("reviews", "train", np.arange(40)))
        test = load_split(task, "test")
        answers = explain(list(test.texts[:3]), task, pairs=list(test.pairs[:3]), model=MODEL, db_uri=uri,
                          knobs={"k": 4})
        assert all(a.label_word in ("bad", "okay", "good") and len(a.neighbours) == 4 for a in answers)
        assert all("\n" in n.text for n in answers[0].neighbours)  # a neighbour's text shows both halves
    first = stored["csv"]
    assert first.texts[0] == f"{PAIRS[0][0]}\n{PAIRS[0][1]}"
    for fmt, records in stored.items():  # 1 in a parquet int column and "1" in a csv are the same label
        np.testing.assert_array_equal(records.labels, first.labels, err_msg=fmt)
        np.testing.assert_allclose(records.exit_probs, first.exit_probs, atol=1e-6, err_msg=fmt)
        assert records.texts == first.texts


def test_a_task_only_in_a_file_builds_on_ray_and_serves_over_http(tmp_path, models_reused, ray_cluster_reused,
                                                                  serve_url_reused):
    from inference_workers.deployment import build_app, delete_app, run_app

    task = write_task(tmp_path, "jsonl", name="pairs-only", spec=MULTI_TOKEN)
    assert models_reused[0].label_tokens(task).summed  # the multi-token rule is what runs below
    local_uri, ray_uri = str(tmp_path / "local.db"), str(tmp_path / "ray.db")
    (local,) = build([task], model=MODEL, db_uri=local_uri, quiet=True)
    (distributed,) = build([task], model=MODEL, db_uri=ray_uri, engine="ray", quiet=True,
                           ray_options=RayOptions(num_actors=2, cpus_per_actor=ACTOR_CPUS))
    assert distributed.collection == local.collection and distributed.n_in_db == local.n_in_db == 40
    ids = record_ids(task.name, "train", np.arange(40))
    meta = setup_meta(*models_reused, task)
    with ExitDB(local_uri, collection=local.collection, meta=meta) as a, \
         ExitDB(ray_uri, collection=local.collection, meta=meta) as b:
        np.testing.assert_allclose(b.get(ids).layer_probs, a.get(ids).layer_probs, atol=1e-5)
        np.testing.assert_allclose(b.calibration.bias, a.calibration.bias, atol=1e-6)

    test = load_split(task, "test")
    texts, pairs = list(test.texts), list(test.pairs)
    with open_engine([task], model=MODEL, db_uri=local_uri, knobs={"k": 4},
                     backbone_and_encoder=models_reused) as engine:
        expected = engine.classify(texts, task, pairs=pairs)
    collection = choose_build(local_uri, task).collection
    config = serve_config(local_uri, {task: collection}, knobs={"k": 4})
    run_app(build_app(MODEL, config, cpus_per_replica=ACTOR_CPUS), name="raee-custom", route_prefix="/custom")
    try:
        url = f"{serve_url_reused}/custom/v1/classify"
        reply = requests.post(url, json={"task": "pairs-only", "texts": texts, "text_pairs": pairs}, timeout=60)
        assert reply.status_code == 200, reply.text
        got = reply.json()["predictions"]
        assert [p["label_word"] for p in got] == [r.label_word for r in expected]
        assert [p["exit_layer"] for p in got] == [r.exit_layer for r in expected]
        np.testing.assert_allclose([p["probs"] for p in got], [r.probs for r in expected], atol=1e-5)
        # an exit decided during the forward reads one row per example: not with summed label words (a 4xx)
        dynamic = requests.post(url, json={"task": "pairs-only", "texts": texts[:1], "text_pairs": pairs[:1],
                                           "policy": "confident"}, timeout=60)
        assert dynamic.status_code == 422 and "policy 'confident' is not available" in dynamic.json()["detail"]
        assert "raee build --head offramp" in dynamic.json()["detail"]
        missing = requests.post(url, json={"task": "pairs-only", "texts": texts[:1]}, timeout=60)
        assert missing.status_code == 422 and "send text_pairs" in missing.json()["detail"]
        tasks = requests.get(f"{serve_url_reused}/custom/v1/tasks", timeout=60).json()
        assert tasks[0]["pairs"] is True and tasks[0]["label_words"] == ["not good", "okay", "not bad"]
    finally:
        delete_app("raee-custom")


def test_eval_scores_a_spec_task_with_its_metric(tmp_path, models_reused):
    from orchestration.evaluate import EvalConfig, evaluate_task
    from raee.tasks import score

    task = write_task(tmp_path, "parquet", spec=MULTI_TOKEN, n_train=44, n_test=12)
    config = EvalConfig(db_uri=str(tmp_path / "eval.db"), k=4, tau=0.6, tune_examples=8, latency_examples=2,
                        latency_repeats=1, latency_batch_sizes=(1,), fused_betas=(1.0,), fused_slacks=(0.0, 0.1),
                        curve_slacks=(0.0,))
    result = evaluate_task(task, *models_reused, config, quiet=True)
    assert result.metric == "macro_f1" and (result.n_train, result.n_tune, result.n_test) == (36, 8, 12)
    assert set(result.engine_mismatches.values()) == {0}
    assert "confident" not in result.scores and "sum rule" in result.peer_params["confident"]["unavailable"]
    test = load_split(task, "test")
    preds = models_reused[0].predict(test.texts, task, models_reused[0].n_layers, pairs=test.pairs).labels
    assert result.scores["full"] == pytest.approx(score(task, preds, test.labels))


def test_a_bad_data_file_is_one_error_line_and_nothing_is_written(tmp_path):
    write_task(tmp_path, "csv", name="broken")
    train = tmp_path / "data" / "train.csv"
    train.write_text(train.read_text() + "a review,a context,4\n")  # 4 stars: not in [labels]
    out = subprocess.run([sys.executable, "-m", "orchestration.cli", "build", "--task", "broken.toml", "--db",
                          "x.db", "--quiet"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**os.environ}, check=False)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 1 and len(lines) == 1, out.stderr
    assert "train.csv, row 41: label '4' is not one of the task's labels ['1', '3', '5']" in lines[0]
    assert not (tmp_path / "x.db").exists()
