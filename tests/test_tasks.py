"""The 8 tasks: loaders against the LM-BFF files (counts from PROVENANCE.md), templates, metrics, errors."""

from __future__ import annotations

import numpy as np
import pytest

from raee.tasks import TASKS, TaskError, get_task, load_split, matthews_corrcoef, parse_tasks, score, score_per_layer

# (train rows, test rows, test label counts) from ../shared/datasets/PROVENANCE.md
EXPECTED = {
    "sst2": (6920, 872, [428, 444]), "sst5": (8544, 2210, [279, 633, 389, 510, 399]),
    "mr": (8662, 2000, [1000, 1000]), "cr": (1772, 1999, [999, 1000]),  # CR: 4 whitespace-only rows skipped
    "mpqa": (8603, 2000, [1000, 1000]),  # MPQA: 3 whitespace-only training rows skipped
    "subj": (8000, 2000, [1000, 1000]), "trec": (5452, 500, [138, 94, 9, 65, 81, 113]),
    "cola": (8551, 1043, [322, 721]),
}


@pytest.mark.parametrize("name", list(TASKS))
def test_every_task_loads_with_the_published_counts(name, data_dir):
    train, test = load_split(name, "train", data_dir), load_split(name, "test", data_dir)
    n_train, n_test, test_counts = EXPECTED[name]
    assert (len(train), len(test)) == (n_train, n_test)
    assert np.bincount(test.labels, minlength=TASKS[name].n_classes).tolist() == test_counts
    assert all(isinstance(t, str) for t in train.texts)


def test_whitespace_only_rows_are_skipped_but_keep_their_file_positions(data_dir):
    test = load_split("cr", "test", data_dir)
    assert all(t.strip() for t in test.texts)
    skipped = sorted(set(range(2000)) - set(test.example_idx.tolist()))
    assert len(skipped) == 1 and test.example_idx[skipped[0]] == skipped[0] + 1


def test_first_rows_are_read_from_the_right_columns(data_dir):
    assert load_split("sst2", "test", data_dir).texts[0] == "one long string of cliches ."
    cola = load_split("cola", "test", data_dir)
    assert cola.texts[0] == "The sailors rode the breeze clear of the rocks." and cola.labels[0] == 1
    assert load_split("trec", "test", data_dir).texts[0] == "How far is it from Denver to Aspen ?"


def test_missing_file_names_the_path_and_the_layout(tmp_path):
    with pytest.raises(TaskError, match=r"SST-2/train.tsv not found.*LM-BFF layout"):
        load_split("sst2", "train", tmp_path)


def test_malformed_file_is_a_clear_error(tmp_path):
    (tmp_path / "mr").mkdir()
    (tmp_path / "mr" / "test.csv").write_text("positive,some text\n")
    with pytest.raises(TaskError, match="cannot parse"):
        load_split("mr", "test", tmp_path)
    (tmp_path / "mr" / "test.csv").write_text("7,some text\n")
    with pytest.raises(TaskError, match=r"outside 0\.\.1"):
        load_split("mr", "test", tmp_path)
    (tmp_path / "mr" / "test.csv").write_bytes(b"1,caf\xe9 latin-1 bytes\n")  # not UTF-8
    with pytest.raises(TaskError, match=r"cannot parse .*utf-8"):
        load_split("mr", "test", tmp_path)


def test_task_names_are_forgiving_and_unknown_ones_list_the_choices():
    assert get_task("SST-2") is get_task("sst2") is get_task(" Sst2 ")
    with pytest.raises(TaskError, match="known tasks: sst2, sst5"):
        get_task("imdb")
    assert [t.name for t in parse_tasks("all")] == list(TASKS)
    assert [t.name for t in parse_tasks("cola,trec")] == ["cola", "trec"]


def test_templates_follow_the_paper():
    assert get_task("sst2").prompt("great film") == (
        "What is the sentiment of the sentence great film ? Print negative or positive. The answer is")
    assert get_task("trec").prompt("Who?", "mlm", "<mask>") == "<mask> : Who?"
    assert get_task("cola").label_words("mlm") == ("incorrect", "correct")
    assert get_task("sst2").template_hash() == get_task("mr").template_hash()  # same prompt, same words
    assert get_task("sst2").template_hash() != get_task("sst2").template_hash("mlm")


def test_matthews_correlation_by_hand():
    # preds 1 1 0 0 1, labels 1 0 0 1 1: TP=2 FP=1 TN=1 FN=1 -> (2*1 - 1*1) / sqrt(3*3*2*2) = 1/6
    assert matthews_corrcoef(np.array([1, 1, 0, 0, 1]), np.array([1, 0, 0, 1, 1])) == pytest.approx(1 / 6)
    assert matthews_corrcoef(np.ones(4), np.array([0, 1, 0, 1])) == 0.0  # undefined -> 0
    cola = get_task("cola")
    assert score(cola, np.array([1, 0]), np.array([1, 0])) == pytest.approx(1.0)
    per_layer = score_per_layer(cola, np.array([[1, 1], [1, 0], [0, 1], [0, 0]]), np.array([1, 1, 0, 0]))
    np.testing.assert_allclose(per_layer, [1.0, 0.0])


def test_accuracy_per_layer():
    sst2 = get_task("sst2")
    np.testing.assert_allclose(score_per_layer(sst2, np.array([[0, 1], [1, 1]]), np.array([1, 1])), [0.5, 1.0])
    with pytest.raises(ValueError, match="shape"):
        score(sst2, np.array([1]), np.array([1, 0]))


def test_sample_is_seeded_keeps_file_order_and_covers_both_classes(data_dir):
    mr = load_split("mr", "test", data_dir)  # grouped by label: the first 1000 rows are all negative
    assert set(mr.head(100).labels.tolist()) == {0}
    sample = mr.sample(100, seed=0)
    assert len(sample) == 100 and set(sample.labels.tolist()) == {0, 1}
    assert np.all(np.diff(sample.example_idx) > 0)
    np.testing.assert_array_equal(sample.example_idx, mr.sample(100, seed=0).example_idx)
    assert [mr.texts[i] for i in sample.example_idx] == list(sample.texts)
    assert mr.sample(None) is mr and mr.sample(10**6) is mr
