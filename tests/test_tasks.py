"""Tasks as data: the 8 built-in specs against the LM-BFF files, spec parsing, the four formats, errors, metrics."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raee.tasks import (
    BUILTIN_TASKS,
    TaskError,
    builtin_tasks,
    get_task,
    init_spec,
    iter_split,
    load_split,
    load_task_spec,
    macro_f1,
    matthews_corrcoef,
    parse_tasks,
    score,
    score_per_layer,
    task_from_toml,
)

# (train rows, test rows, test label counts) from ../shared/datasets/PROVENANCE.md
EXPECTED = {
    "sst2": (6920, 872, [428, 444]), "sst5": (8544, 2210, [279, 633, 389, 510, 399]),
    "mr": (8662, 2000, [1000, 1000]), "cr": (1772, 1999, [999, 1000]),  # CR: 4 whitespace-only rows skipped
    "mpqa": (8603, 2000, [1000, 1000]),  # MPQA: 3 whitespace-only training rows skipped
    "subj": (8000, 2000, [1000, 1000]), "trec": (5452, 500, [138, 94, 9, 65, 81, 113]),
    "cola": (8551, 1043, [322, 721]),
}

REVIEWS = [  # (review, context, stars): a pair task with string labels, some numeric in the files
    ("a gripping , funny film", "seen at a festival", "5"),
    ("a dull mess", "rented it", "1"),
    ("fine but forgettable", "on a plane", "3"),
    ("   ", "empty review", "5"),  # whitespace only: skipped, keeps its position
    ("the best thing this year", "with friends", "5"),
]
SPEC = """
name = "reviews"
metric = "macro_f1"
template = "Review: {text} Context: {text_pair} Sentiment:"
[data]
train = "data/train.FORMAT"
test = "data/train.FORMAT"
text = "review"
text_pair = "context"
label = "stars"
[labels]
"1" = "bad"
"3" = "so so"
"5" = "great"
"""


def write_reviews(folder, fmt: str, rows=REVIEWS) -> None:
    """The REVIEWS rows as data/train.<fmt>, with stars as numbers where the format has types."""
    data = folder / "data"
    data.mkdir(parents=True, exist_ok=True)
    path = data / f"train.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps({"review": r, "context": c, "stars": int(s)}) + "\n" for r, c, s in rows))
    elif fmt == "parquet":
        pq.write_table(pa.table({"review": [r for r, _, _ in rows], "context": [c for _, c, _ in rows],
                                 "stars": [int(s) for _, _, s in rows]}), path)
    else:
        sep = "," if fmt == "csv" else "\t"
        lines = [sep.join(["review", "context", "stars"])] + [sep.join([f'"{r}"' if fmt == "csv" else r, c, s])
                                                               for r, c, s in rows]
        path.write_text("\n".join(lines) + "\n")
    (folder / "reviews.toml").write_text(SPEC.replace("FORMAT", fmt))


@pytest.mark.parametrize("name", BUILTIN_TASKS)
def test_every_built_in_task_loads_with_the_published_counts(name, data_dir):
    train, test = load_split(name, "train", data_dir), load_split(name, "test", data_dir)
    n_train, n_test, test_counts = EXPECTED[name]
    assert (len(train), len(test)) == (n_train, n_test)
    assert np.bincount(test.labels, minlength=get_task(name).n_classes).tolist() == test_counts
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


def test_a_split_read_in_small_batches_equals_the_whole_file(data_dir):
    whole = load_split("sst5", "test", data_dir)
    parts = list(iter_split("sst5", "test", data_dir, batch_rows=300))
    assert len(parts) == 8 and max(len(p) for p in parts) <= 300
    assert tuple(t for p in parts for t in p.texts) == whole.texts
    np.testing.assert_array_equal(np.concatenate([p.example_idx for p in parts]), whole.example_idx)


def test_missing_data_names_the_path_and_the_variable(tmp_path):
    with pytest.raises(TaskError, match=r"SST-2/train.tsv of task sst2 not found.*RAEE_DATA_DIR"):
        load_split("sst2", "train", tmp_path)


def test_malformed_built_in_file_is_a_clear_error(tmp_path):
    (tmp_path / "mr").mkdir()
    (tmp_path / "mr" / "test.csv").write_text("positive,some text\n")
    with pytest.raises(TaskError, match=r"row 1: label 'positive' is not one of the task's labels \['0', '1'\]"):
        load_split("mr", "test", tmp_path)
    (tmp_path / "mr" / "test.csv").write_text("7,some text\n")
    with pytest.raises(TaskError, match="label '7'"):
        load_split("mr", "test", tmp_path)
    (tmp_path / "mr" / "test.csv").write_bytes(b"1,caf\xe9 latin-1 bytes\n")  # not UTF-8
    with pytest.raises(TaskError, match=r"cannot read .*test.csv as csv.*(utf-8|UTF8|UTF-8)"):
        load_split("mr", "test", tmp_path)


def test_task_names_are_forgiving_and_unknown_ones_list_the_choices(tmp_path):
    assert get_task("SST-2") is get_task("sst2") is get_task(" Sst2 ")
    with pytest.raises(TaskError, match=r"unknown task 'imdb'.*sst2, sst5.*spec file"):
        get_task("imdb")
    with pytest.raises(TaskError, match=r"spec .*nope\.toml not found"):
        get_task(str(tmp_path / "nope.toml"))
    assert [t.name for t in parse_tasks("all")] == list(BUILTIN_TASKS)
    assert [t.name for t in parse_tasks("cola,trec")] == ["cola", "trec"]
    with pytest.raises(TaskError, match="share a name"):
        parse_tasks("sst2,SST-2")


def test_templates_follow_the_paper():
    assert get_task("sst2").prompt("great film") == (
        "What is the sentiment of the sentence great film ? Print negative or positive. The answer is")
    assert get_task("trec").prompt("Who?", "mlm", "<mask>") == "<mask> : Who?"
    assert get_task("cola").label_words("mlm") == ("incorrect", "correct")
    assert get_task("sst2").digest() == get_task("mr").digest()  # same prompt, same words, same values
    assert get_task("sst2").digest() != get_task("sst2").digest("mlm")


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "parquet"])
def test_a_spec_over_each_format_reads_pairs_and_string_labels(tmp_path, fmt):
    write_reviews(tmp_path, fmt)
    task = get_task(str(tmp_path / "reviews.toml"))
    assert task.name == "reviews" and task.has_pairs and task.metric == "macro_f1"
    assert task.label_values == ("1", "3", "5") and task.words == ("bad", "so so", "great")
    data = load_split(task, "train")
    assert data.texts == ("a gripping , funny film", "a dull mess", "fine but forgettable", "the best thing this year")
    assert data.pairs == ("seen at a festival", "rented it", "on a plane", "with friends")
    assert data.labels.tolist() == [2, 0, 1, 2] and data.example_idx.tolist() == [0, 1, 2, 4]
    assert task.prompt(data.texts[1], pair=data.pairs[1]) == "Review: a dull mess Context: rented it Sentiment:"
    assert data.inputs[1] == "a dull mess\nrented it"


def test_a_task_travels_by_value(tmp_path):
    write_reviews(tmp_path, "jsonl")
    task = get_task(str(tmp_path / "reviews.toml"))
    copy = pickle.loads(pickle.dumps(task))
    assert copy == task and copy.digest() == task.digest()
    again = task_from_toml(task.to_toml(), base_dir=task.base_dir)
    assert again == task  # to_toml round-trips


def test_the_digest_follows_everything_that_changes_the_records(tmp_path):
    base = task_from_toml(SPEC.replace("FORMAT", "csv"))
    variants = [SPEC.replace('"3" = "so so"', '"3" = "okay"'),  # a word
                SPEC.replace('"1" = "bad"\n"3" = "so so"', '"3" = "so so"\n"1" = "bad"'),  # the order
                SPEC.replace('"5" = "great"', '"4" = "great"'),  # a value
                SPEC.replace("Sentiment:", "Stars:")]  # the template
    for text in variants:
        assert task_from_toml(text.replace("FORMAT", "csv")).digest() != base.digest()
    moved = task_from_toml(SPEC.replace("FORMAT", "parquet"))  # where the data lives does not change records
    assert moved.digest() == base.digest()


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.replace('name = "reviews"', 'name = "My Reviews"'), r"name 'My Reviews' must match"),
    (lambda s: s.replace('metric = "macro_f1"', 'metric = "auc"'), "metric 'auc' is not one of"),
    (lambda s: s.replace(" Context: {text_pair}", ""), "text_pair"),
    (lambda s: s.replace('"3" = "so so"', '"3" = "bad"'), "share a label word"),
    (lambda s: s.replace('text = "review"\n', ""), "needs 'text'"),
    (lambda s: s.replace("[data]", "[data]\nlabels = 1"), r"unknown \[data\] key\(s\) \['labels'\]"),
    (lambda s: s.replace("[labels]", "[labels]\n\"9\" = 9"), "must be a string"),
    (lambda s: s + "\n[mlm_labels]\n\"1\" = \"bad\"\n", r"\[mlm_labels\] must have the same label values"),
    (lambda s: s.replace("template =", "template = ="), "not valid TOML"),
])
def test_bad_specs_are_clear_errors(tmp_path, edit, message):
    path = tmp_path / "spec.toml"
    path.write_text(edit(SPEC.replace("FORMAT", "csv")))
    with pytest.raises(TaskError, match=message):
        load_task_spec(path)


def test_data_errors_name_the_file_the_row_and_what_exists(tmp_path):
    write_reviews(tmp_path, "csv", [*REVIEWS, ("meh", "at home", "2")])
    task = get_task(str(tmp_path / "reviews.toml"))
    with pytest.raises(TaskError, match=r"train.csv, row 6: label '2' is not one of the task's labels "
                                        r"\['1', '3', '5'\]"):
        load_split(task, "train")
    write_reviews(tmp_path, "jsonl")
    (tmp_path / "reviews.toml").write_text(SPEC.replace("FORMAT", "jsonl").replace('"review"', '"body"'))
    with pytest.raises(TaskError, match=r"no column\(s\) \['body'\]; its columns are \['review', 'context', "
                                        r"'stars'\]"):
        load_split(get_task(str(tmp_path / "reviews.toml")), "train")
    (tmp_path / "reviews.toml").write_text(SPEC.replace("FORMAT", "txt"))
    with pytest.raises(TaskError, match="cannot tell the format"):
        load_split(get_task(str(tmp_path / "reviews.toml")), "train")


def test_init_writes_a_starter_spec_with_the_labels_it_found(tmp_path):
    write_reviews(tmp_path, "jsonl")
    task = init_spec(tmp_path / "data" / "train.jsonl", text="review", label="stars", text_pair="context",
                     spec_path=tmp_path / "starter.toml")
    assert task.label_values == ("1", "3", "5") and task.data.train == "data/train.jsonl"
    assert task.name == "data"  # a split's file names its folder's task, not a task called "train"
    (tmp_path / "starter.toml").write_text(task.to_toml())
    loaded = load_task_spec(tmp_path / "starter.toml")
    assert len(load_split(loaded, "train")) == 4 and loaded.has_pairs


def test_matthews_correlation_by_hand():
    # preds 1 1 0 0 1, labels 1 0 0 1 1: TP=2 FP=1 TN=1 FN=1 -> (2*1 - 1*1) / sqrt(3*3*2*2) = 1/6
    assert matthews_corrcoef(np.array([1, 1, 0, 0, 1]), np.array([1, 0, 0, 1, 1])) == pytest.approx(1 / 6)
    assert matthews_corrcoef(np.ones(4), np.array([0, 1, 0, 1])) == 0.0  # undefined -> 0
    cola = get_task("cola")
    assert score(cola, np.array([1, 0]), np.array([1, 0])) == pytest.approx(1.0)
    per_layer = score_per_layer(cola, np.array([[1, 1], [1, 0], [0, 1], [0, 0]]), np.array([1, 1, 0, 0]))
    np.testing.assert_allclose(per_layer, [1.0, 0.0])


def test_multiclass_matthews_correlation_by_hand():
    # labels 0 1 2 2, preds 0 2 2 2: c=3, s=4, p=(1,0,3), t=(1,1,2)
    # (3*4 - (1*1 + 0*1 + 3*2)) / sqrt((16 - 10) * (16 - 6)) = 5 / sqrt(60)
    got = matthews_corrcoef(np.array([0, 2, 2, 2]), np.array([0, 1, 2, 2]), 3)
    assert got == pytest.approx(5 / np.sqrt(60))


def test_macro_f1_by_hand():
    # labels 0 0 1 2, preds 0 1 1 1: F1_0 = 2/3, F1_1 = 2*1/(1+3) = 1/2, F1_2 = 0 -> mean 7/18
    assert macro_f1(np.array([0, 1, 1, 1]), np.array([0, 0, 1, 2]), 3) == pytest.approx(7 / 18)
    np.testing.assert_allclose(macro_f1(np.array([[0, 0], [1, 0]]), np.array([0, 1]), 2), [1.0, 1 / 3])


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


def test_built_in_specs_are_the_shipped_files():
    tasks = builtin_tasks()
    assert list(tasks) == list(BUILTIN_TASKS)
    assert tasks["trec"].words == ("description", "entity", "expression", "person", "location", "quantity")
    assert tasks["cola"].metric == "mcc" and tasks["cola"].data.columns == ("source", "label", "mark", "sentence")
