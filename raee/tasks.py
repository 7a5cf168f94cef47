"""The 8 LM-BFF sentence-classification tasks: data loading, prompt templates, label words, metrics.

Templates and label words follow the RAEE paper (Table 7 for causal LMs, Table 6 for masked LMs).
Data comes from a directory in the LM-BFF `data/original/` layout (see `../shared/datasets/`).
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

Style = Literal["causal", "mlm"]
Split = Literal["train", "test"]

DATA_DIR_ENV = "RAEE_DATA_DIR"

log = logging.getLogger(__name__)

_SENTIMENT = "What is the sentiment of the sentence {x} ? Print negative or positive. The answer is"
_LAYOUT_HINT = (
    "expected the LM-BFF layout: <data-dir>/SST-2/{train,test}.tsv, <data-dir>/sst-5/{train,test}.csv, "
    "mr/ cr/ mpqa/ subj/ trec/ (csv: label,sentence) and CoLA/{train,test}.tsv"
)


class TaskError(ValueError):
    """A task name, data file or label word that cannot be used; the message says how to fix it."""


@dataclass(frozen=True)
class Task:
    """One classification task: where its data lives and how it is put to a language model."""

    name: str
    folder: str
    causal_template: str  # "{x}" is the sentence
    causal_words: tuple[str, ...]  # predicted as the next token, after a space
    mlm_template: str  # "{x}" the sentence, "{mask}" the tokenizer's mask token
    mlm_words: tuple[str, ...]
    metric: Literal["accuracy", "mcc"] = "accuracy"

    @property
    def n_classes(self) -> int:
        return len(self.causal_words)

    def prompt(self, text: str, style: Style = "causal", mask_token: str = "<mask>") -> str:
        """The templated input the backbone reads for `text`."""
        if style == "causal":
            return self.causal_template.format(x=text)
        return self.mlm_template.format(x=text, mask=mask_token)

    def label_words(self, style: Style = "causal") -> tuple[str, ...]:
        return self.causal_words if style == "causal" else self.mlm_words

    def template_hash(self, style: Style = "causal") -> str:
        """Short digest of template + label words: an exit database is only valid for the prompt it was built with."""
        text = "\x1f".join([self.prompt("{x}", style, "{mask}"), *self.label_words(style)])
        return hashlib.sha256(text.encode()).hexdigest()[:16]


TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        Task("sst2", "SST-2", _SENTIMENT, ("negative", "positive"),
             "{x} It was {mask} .", ("terrible", "great")),
        Task("sst5", "sst-5",
             "What is the sentiment of the sentence {x} ? Print terrible, bad, okay, good or great. The answer is",
             ("terrible", "bad", "okay", "good", "great"),
             "{x} It was {mask} .", ("terrible", "bad", "okay", "good", "great")),
        Task("mr", "mr", _SENTIMENT, ("negative", "positive"), "{x} It was {mask} .", ("terrible", "great")),
        Task("cr", "cr", _SENTIMENT, ("negative", "positive"), "{x} It was {mask} .", ("terrible", "great")),
        Task("mpqa", "mpqa", _SENTIMENT, ("negative", "positive"), "{x} It was {mask} .", ("terrible", "great")),
        Task("subj", "subj",
             "What is the subjectivity of the sentence {x} ? Print subjective or objective. The answer is",
             ("subjective", "objective"), "{x} This is {mask} .", ("subjective", "objective")),
        Task("trec", "trec",
             "Print the category for the sentence {x} : description, entity, expression, person, location or "
             "quantity. The answer is",
             ("description", "entity", "expression", "person", "location", "quantity"),
             "{mask} : {x}", ("Description", "Entity", "Expression", "Human", "Location", "Number")),
        Task("cola", "CoLA",
             "Is the sentence {x} grammatically acceptable? Print no or yes. The answer is", ("no", "yes"),
             "{x} It was {mask} .", ("incorrect", "correct"), metric="mcc"),
    ]
}


def get_task(name: str) -> Task:
    """Look a task up by name, forgiving case and the LM-BFF folder spelling ("SST-2", "sst-5")."""
    key = name.strip().lower().replace("-", "")
    if key not in TASKS:
        raise TaskError(f"unknown task {name!r} (known tasks: {', '.join(TASKS)})")
    return TASKS[key]


def parse_tasks(spec: str) -> list[Task]:
    """'all' or a comma-separated list of task names -> tasks, in the order given."""
    if spec.strip().lower() == "all":
        return list(TASKS.values())
    return [get_task(name) for name in spec.split(",") if name.strip()]


@dataclass(frozen=True)
class Dataset:
    """One split of one task: texts and integer labels, in file order."""

    task: Task
    split: str
    texts: tuple[str, ...]
    labels: np.ndarray  # (N,) int64
    indices: np.ndarray | None = None  # (N,) positions in the split's file; None = 0..N-1

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def example_idx(self) -> np.ndarray:
        """(N,) int64 position of each example in its file: what record ids are made from."""
        return np.arange(len(self)) if self.indices is None else self.indices

    def head(self, limit: int | None) -> Dataset:
        """The first `limit` examples (all when None), in file order."""
        if limit is None or limit >= len(self):
            return self
        return self._take(np.arange(limit))

    def sample(self, limit: int | None, seed: int = 0) -> Dataset:
        """A seeded random subset of `limit` examples, kept in file order (all when None).

        Not a head: the LM-BFF mr/cr/mpqa/subj files are grouped by label, so their first rows are one class."""
        if limit is None or limit >= len(self):
            return self
        return self._take(np.sort(np.random.default_rng(seed).permutation(len(self))[:limit]))

    def _take(self, rows: np.ndarray) -> Dataset:
        return Dataset(self.task, self.split, tuple(self.texts[i] for i in rows), self.labels[rows],
                       self.example_idx[rows])


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """Explicit argument, else $RAEE_DATA_DIR, else ./datasets."""
    chosen = data_dir or os.environ.get(DATA_DIR_ENV) or "datasets"
    return Path(chosen).expanduser()


def load_split(task: Task | str, split: Split, data_dir: str | os.PathLike[str] | None = None) -> Dataset:
    """Read one split from an LM-BFF data directory; a missing or malformed file names the path and the layout."""
    task = get_task(task) if isinstance(task, str) else task
    if split not in ("train", "test"):
        raise TaskError(f"unknown split {split!r} (expected 'train' or 'test')")
    folder = resolve_data_dir(data_dir) / task.folder
    path = folder / f"{split}.tsv" if task.name in ("sst2", "cola") else folder / f"{split}.csv"
    if not path.is_file():
        raise TaskError(f"data file {path} not found (set --data-dir or ${DATA_DIR_ENV}; {_LAYOUT_HINT})")
    try:
        rows = _read_rows(path, task.name)
        labels = np.array([int(label) for label, _ in rows], dtype=np.int64)
    except (ValueError, IndexError, UnicodeDecodeError, csv.Error) as exc:
        raise TaskError(f"cannot parse {path}: {exc} ({_LAYOUT_HINT})") from exc
    if labels.size and (labels.min() < 0 or labels.max() >= task.n_classes):
        raise TaskError(f"{path} has labels outside 0..{task.n_classes - 1} for task {task.name}")
    full = Dataset(task, split, tuple(text for _, text in rows), labels)
    keep = np.array([bool(text.strip()) for text in full.texts], dtype=bool)
    if keep.all():
        return full
    # Nothing to retrieve or classify in an empty sentence (CR has 4 such rows): skip them, keep file positions.
    log.warning("%s: skipping %d whitespace-only rows of %s", task.name, int((~keep).sum()), path)
    return full._take(np.flatnonzero(keep))


def _read_rows(path: Path, task_name: str) -> list[tuple[str, str]]:
    """(label, sentence) pairs in file order, for the three LM-BFF file formats."""
    with path.open(encoding="utf-8", newline="") as f:
        if task_name == "sst2":  # tsv with header sentence\tlabel
            reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            header = next(reader)
            if header != ["sentence", "label"]:
                raise ValueError(f"expected header 'sentence<TAB>label', got {header!r}")
            return [(row[1], row[0]) for row in reader if row]
        if task_name == "cola":  # GLUE tsv, no header: source, label, author mark, sentence
            reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            return [(row[1], row[3]) for row in reader if row]
        return [(row[0], row[1]) for row in csv.reader(f) if row]  # csv, no header: label,sentence


def matthews_corrcoef(preds: np.ndarray, labels: np.ndarray) -> np.ndarray | float:
    """MCC = (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) for binary labels; 0 when undefined.

    preds (N,) or (N, M) and labels (N,) -> a float, or (M,) with one MCC per column of preds."""
    p = np.asarray(preds) == 1
    y = (np.asarray(labels) == 1).reshape((-1,) + (1,) * (p.ndim - 1))  # broadcast over columns
    tp, tn = np.sum(p & y, axis=0, dtype=float), np.sum(~p & ~y, axis=0, dtype=float)
    fp, fn = np.sum(p & ~y, axis=0, dtype=float), np.sum(~p & y, axis=0, dtype=float)
    denom = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    mcc = np.where(denom > 0, (tp * tn - fp * fn) / np.where(denom > 0, denom, 1.0), 0.0)
    return float(mcc) if mcc.ndim == 0 else mcc


def score(task: Task, preds: np.ndarray, labels: np.ndarray) -> float:
    """The task's metric in [0, 1] (accuracy) or [-1, 1] (Matthews correlation for CoLA)."""
    preds, labels = np.asarray(preds), np.asarray(labels)
    if preds.shape != labels.shape:
        raise ValueError(f"preds {preds.shape} and labels {labels.shape} differ in shape")
    if task.metric == "mcc":
        return float(matthews_corrcoef(preds, labels))
    return float(np.mean(preds == labels)) if labels.size else float("nan")


def score_per_layer(task: Task, layer_preds: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """scores[l] = metric(layer_preds[:, l], labels). layer_preds (N, L+1) -> (L+1,)."""
    if task.metric == "mcc":
        return matthews_corrcoef(layer_preds, labels)
    return (layer_preds == np.asarray(labels)[:, None]).mean(axis=0)


def layer_stats(task: Task, layer_probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(score of each layer's argmax, share of examples given the layer's commonest class), each (L+1,).

    layer_probs (N, L+1, C). A share near 1 means the layer says the same class for every input."""
    preds = layer_probs.argmax(-1)  # (N, L+1)
    counts = (preds[..., None] == np.arange(task.n_classes)).sum(axis=0)  # (L+1, C)
    return score_per_layer(task, preds, labels), counts.max(axis=1) / max(len(preds), 1)
