"""A task is data: a TOML spec (data files, columns, template, label words, metric) and readers for its files.

    name = "reviews"                               # [a-z0-9_-]+; names collections and the HTTP "task"
    metric = "accuracy"                            # accuracy | macro_f1 | mcc
    template = "Review: {text} Sentiment:"         # causal LMs; {text}, and {text_pair} for pairs
    mlm_template = "{text} It was {mask} ."        # optional, masked LMs
    [data]                                         # paths relative to the spec file; ${VAR} from the environment
    train = "reviews/train.jsonl"                  # .csv .tsv .jsonl .parquet (format from the suffix)
    test = "reviews/test.jsonl"                    # optional
    text = "review"                                # column names
    text_pair = "context"                          # optional second text column
    label = "stars"
    [labels]                                       # label value as written in the data -> label word
    "1" = "bad"                                    # (order = class index)
    "5" = "great"
    [mlm_labels]                                   # optional, the words for masked LMs (same keys)

The 8 LM-BFF tasks of the RAEE paper ship as specs of this same format (`raee/task_specs/`, paper Table 7
templates for causal LMs and Table 6 for masked LMs); their files come from `${RAEE_DATA_DIR}`. A `Task` is a
frozen dataclass of strings, so it pickles to Ray actors and Serve replicas as it is: nothing is looked up
by name on the other side. `Task.digest(style)` covers everything that changes the exit records (template,
label values, label words and their order); exit databases store it and refuse another.

Files are read with pyarrow in record batches (`iter_split`), all columns as strings, so `1` and `"1"` are
the same label. Rows whose text is empty or whitespace only are skipped with a count, keeping the file
positions that record ids are made from.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Literal

import numpy as np
import tomllib

Style = Literal["causal", "mlm"]
Split = Literal["train", "test"]
Metric = Literal["accuracy", "macro_f1", "mcc"]

DATA_DIR_ENV = "RAEE_DATA_DIR"
METRICS: tuple[str, ...] = ("accuracy", "macro_f1", "mcc")
FORMATS: dict[str, str] = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}
BUILTIN_TASKS: tuple[str, ...] = ("sst2", "sst5", "mr", "cr", "mpqa", "subj", "trec", "cola")  # `--tasks all`
PAIR_SEPARATOR = "\n"  # joins text and text_pair where one string is needed (keys, stored texts)

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[a-z0-9_-]+$")
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_TOP_KEYS = {"name", "metric", "template", "mlm_template", "data", "labels", "mlm_labels", "description"}
_DATA_KEYS = {"train", "test", "text", "text_pair", "label", "columns", "quoting", "format"}


class TaskError(ValueError):
    """A task spec, data file or label that cannot be used; the message says what and how to fix it."""


@dataclass(frozen=True)
class DataSpec:
    """Where a task's examples live and which columns hold what."""

    text: str
    label: str
    train: str | None = None  # as written in the spec: relative to the spec's folder, ${VAR}s expanded at read time
    test: str | None = None
    text_pair: str | None = None
    columns: tuple[str, ...] | None = None  # csv/tsv without a header row: the names of its columns
    quoting: bool = True  # csv/tsv: '"' quotes fields (false: quotes are text, as in GLUE tsv files)
    format: str | None = None  # csv | tsv | jsonl | parquet; None: from the file suffix


@dataclass(frozen=True)
class Task:
    """One classification task: how its examples are put to a language model and where they come from."""

    name: str
    template: str  # causal LMs: "{text}" (and "{text_pair}") is replaced by the example
    label_values: tuple[str, ...]  # label values as written in the data, in class order
    words: tuple[str, ...]  # causal LMs: the label word of each class, predicted after a space
    data: DataSpec
    mlm_template: str | None = None  # masked LMs: also "{mask}", where the label word goes
    mlm_words: tuple[str, ...] | None = None
    metric: Metric = "accuracy"
    base_dir: str = "."  # relative data paths resolve against it (the spec file's folder)
    source: str = field(default="", compare=False)  # where the spec came from, for messages

    def __post_init__(self) -> None:
        _check_task(self)

    @property
    def n_classes(self) -> int:
        return len(self.label_values)

    @property
    def has_pairs(self) -> bool:
        return self.data.text_pair is not None

    def prompt(self, text: str, style: Style = "causal", mask_token: str = "<mask>", pair: str | None = None) -> str:
        """The templated input the backbone reads for one example."""
        if style == "causal":
            template = self.template
        else:
            if self.mlm_template is None:
                raise TaskError(f"task {self.name} has no mlm_template, so it cannot run on a masked LM; add "
                                f"mlm_template and [mlm_labels] to {self.source or 'its spec'}")
            template = self.mlm_template.replace("{mask}", mask_token)
        if self.has_pairs and pair is None:
            raise TaskError(f"task {self.name} classifies text pairs: give text_pair for every text")
        # replace, not str.format: a template may hold other braces
        return template.replace("{text_pair}", pair or "").replace("{text}", text)

    def label_words(self, style: Style = "causal") -> tuple[str, ...]:
        if style == "causal":
            return self.words
        if self.mlm_words is None:
            raise TaskError(f"task {self.name} has no [mlm_labels], so it cannot run on a masked LM; add them to "
                            f"{self.source or 'its spec'}")
        return self.mlm_words

    def digest(self, style: Style = "causal") -> str:
        """Digest of what changes the exit records for `style`: template, label values, label words and their order."""
        template = self.template if style == "causal" else (self.mlm_template or "")
        words = self.words if style == "causal" else (self.mlm_words or ())
        text = "\x1e".join([style, template, "\x1f".join(self.label_values), "\x1f".join(words)])
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    template_hash = digest  # the name exit databases of schema 2 used

    def path(self, split: Split, data_dir: str | os.PathLike[str] | None = None) -> Path:
        """The split's data file: ${VAR}s expanded (data_dir overrides $RAEE_DATA_DIR), relative to base_dir."""
        raw = self.data.train if split == "train" else self.data.test
        if raw is None:
            raise TaskError(f"task {self.name} has no {split} file ([data] {split} = ... in "
                            f"{self.source or 'its spec'})")
        expanded = _expand(raw, data_dir, self)
        path = Path(expanded).expanduser()
        return path if path.is_absolute() else Path(self.base_dir) / path

    def to_toml(self) -> str:
        """The spec as TOML text (round-trips through `task_from_toml`)."""
        lines = [f"name = {_q(self.name)}", f"metric = {_q(self.metric)}", f"template = {_q(self.template)}"]
        if self.mlm_template is not None:
            lines.append(f"mlm_template = {_q(self.mlm_template)}")
        lines += ["", "[data]"]
        for key in ("train", "test", "text", "text_pair", "label", "format"):
            value = getattr(self.data, key)
            if value is not None:
                lines.append(f"{key} = {_q(value)}")
        if self.data.columns is not None:
            lines.append("columns = [" + ", ".join(_q(c) for c in self.data.columns) + "]")
        if not self.data.quoting:
            lines.append("quoting = false")
        lines += ["", "[labels]", *(f"{_q(v)} = {_q(w)}" for v, w in zip(self.label_values, self.words, strict=True))]
        if self.mlm_words is not None:
            lines += ["", "[mlm_labels]",
                      *(f"{_q(v)} = {_q(w)}" for v, w in zip(self.label_values, self.mlm_words, strict=True))]
        return "\n".join(lines) + "\n"


def _q(value: str) -> str:
    """A TOML basic string."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
    return f'"{escaped}"'


def _expand(raw: str, data_dir: str | os.PathLike[str] | None, task: Task) -> str:
    def value(match: re.Match[str]) -> str:
        var = match.group(1)
        if var == DATA_DIR_ENV:
            return str(data_dir or os.environ.get(DATA_DIR_ENV) or "datasets")
        if var not in os.environ:
            raise TaskError(f"task {task.name}: data path {raw!r} uses ${{{var}}}, which is not set in the environment")
        return os.environ[var]

    return _VAR.sub(value, raw)


def _check_task(task: Task) -> None:
    where = task.source or f"task {task.name!r}"
    if not isinstance(task.name, str) or not _NAME.match(task.name):
        raise TaskError(f"{where}: name {task.name!r} must match [a-z0-9_-]+ (it names collections and the HTTP task)")
    if task.metric not in METRICS:
        raise TaskError(f"{where}: metric {task.metric!r} is not one of {', '.join(METRICS)}")
    if len(task.label_values) < 2:
        raise TaskError(f"{where}: [labels] needs at least 2 labels, got {len(task.label_values)}")
    if len(set(task.label_values)) != len(task.label_values):
        raise TaskError(f"{where}: label values repeat in [labels]: {list(task.label_values)}")
    for style, words in (("labels", task.words), ("mlm_labels", task.mlm_words)):
        if words is None:
            continue
        if len(words) != len(task.label_values):
            raise TaskError(f"{where}: [{style}] must give a word for each of the labels {list(task.label_values)}")
        if any(not isinstance(w, str) or not w.strip() for w in words):
            raise TaskError(f"{where}: [{style}] has an empty label word: {list(words)}")
        if len(set(words)) != len(words):
            raise TaskError(f"{where}: two labels share a label word in [{style}]: {list(words)}")
    if "{text}" not in task.template:
        raise TaskError(f"{where}: template must contain {{text}}, got {task.template!r}")
    pair_in_template = "{text_pair}" in task.template
    if task.has_pairs != pair_in_template:
        raise TaskError(f"{where}: template must contain {{text_pair}} exactly when [data] text_pair is set")
    if (task.mlm_template is None) != (task.mlm_words is None):
        raise TaskError(f"{where}: give mlm_template and [mlm_labels] together (masked LMs need both)")
    if task.mlm_template is not None:
        if "{text}" not in task.mlm_template or "{mask}" not in task.mlm_template:
            raise TaskError(f"{where}: mlm_template must contain {{text}} and {{mask}}, got {task.mlm_template!r}")
        if task.has_pairs != ("{text_pair}" in task.mlm_template):
            raise TaskError(f"{where}: mlm_template must contain {{text_pair}} exactly when [data] text_pair is set")
    if task.data.format is not None and task.data.format not in set(FORMATS.values()):
        raise TaskError(f"{where}: [data] format {task.data.format!r} is not one of csv, tsv, jsonl, parquet")
    for raw in (task.data.train, task.data.test):
        if raw is not None and task.data.format is None:
            file_format(Path(raw))  # an unknown suffix fails when the spec is read, not at the first build


# ---- reading specs --------------------------------------------------------------------------------------------


def task_from_toml(text: str, *, base_dir: str | os.PathLike[str] = ".", source: str = "") -> Task:
    """Parse a spec's TOML text; every problem is a TaskError naming the key and the source."""
    where = source or "task spec"
    try:
        spec = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise TaskError(f"{where} is not valid TOML: {exc}") from exc
    _no_unknown(spec, _TOP_KEYS, where, "")
    for key in ("name", "template", "data", "labels"):
        if key not in spec:
            raise TaskError(f"{where}: missing {key!r} (see `raee tasks init` for a starter spec)")
    data, labels = spec["data"], spec["labels"]
    if not isinstance(data, dict) or not isinstance(labels, dict):
        raise TaskError(f"{where}: [data] and [labels] must be tables")
    _no_unknown(data, _DATA_KEYS, where, "[data] ")
    for key in ("text", "label"):
        if key not in data:
            raise TaskError(f"{where}: [data] needs {key!r}, the name of the column that holds it")
    if "train" not in data and "test" not in data:
        raise TaskError(f"{where}: [data] needs a train file (and optionally a test file)")
    mlm = spec.get("mlm_labels")
    if mlm is not None and (not isinstance(mlm, dict) or set(mlm) != set(labels)):
        raise TaskError(f"{where}: [mlm_labels] must have the same label values as [labels] ({list(labels)})")
    strings = {key: data[key] for key in ("train", "test", "text", "text_pair", "label", "format") if key in data}
    for key, value in [*strings.items(), ("name", spec["name"]), ("template", spec["template"]),
                       *[(f"label {v!r}", w) for v, w in labels.items()]]:
        if not isinstance(value, str):
            raise TaskError(f"{where}: {key} must be a string, got {value!r}")
    columns = data.get("columns")
    if columns is not None and (not isinstance(columns, list) or not all(isinstance(c, str) for c in columns)):
        raise TaskError(f"{where}: [data] columns must be a list of column names")
    quoting = data.get("quoting", True)
    if not isinstance(quoting, bool):
        raise TaskError(f"{where}: [data] quoting must be true or false")
    values = tuple(labels)
    return Task(
        name=spec["name"], template=spec["template"], label_values=values, words=tuple(labels[v] for v in values),
        data=DataSpec(**strings, columns=tuple(columns) if columns is not None else None, quoting=quoting),
        mlm_template=spec.get("mlm_template"), mlm_words=tuple(mlm[v] for v in values) if mlm else None,
        metric=spec.get("metric", "accuracy"), base_dir=str(Path(base_dir).resolve()), source=where)


def _no_unknown(table: dict, known: set[str], where: str, prefix: str) -> None:
    unknown = sorted(set(table) - known)
    if unknown:
        raise TaskError(f"{where}: unknown {prefix}key(s) {unknown}; known: {sorted(known)}")


def load_task_spec(path: str | os.PathLike[str]) -> Task:
    """A task from its TOML file; data paths are relative to the file's folder."""
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TaskError(f"cannot read task spec {path}: {exc}") from exc
    return task_from_toml(text, base_dir=path.resolve().parent, source=str(path))


def builtin_task(name: str) -> Task:
    """One of the 8 built-in LM-BFF tasks (forgiving case and the LM-BFF folder spelling, "SST-2")."""
    key = name.strip().lower().replace("-", "")
    if key not in BUILTIN_TASKS:
        raise TaskError(f"unknown task {name!r}: not a built-in task ({', '.join(BUILTIN_TASKS)}) and not a "
                        "spec file (path/to/spec.toml; `raee tasks init` writes one)")
    return _builtin(key)


@cache
def _builtin(key: str) -> Task:
    text = resources.files("raee").joinpath("task_specs", f"{key}.toml").read_text(encoding="utf-8")
    return task_from_toml(text, source=f"built-in task {key}")


def builtin_tasks() -> dict[str, Task]:
    """The 8 built-in tasks by name, in the paper's order."""
    return {name: builtin_task(name) for name in BUILTIN_TASKS}


def get_task(task: Task | str) -> Task:
    """A Task, given one, a built-in name, or the path of a spec file (*.toml)."""
    if isinstance(task, Task):
        return task
    if task.endswith(".toml") or os.sep in task or Path(task).is_file():
        if not Path(task).expanduser().is_file():
            raise TaskError(f"task spec {task} not found")
        return load_task_spec(task)
    return builtin_task(task)


def parse_tasks(spec: str | Sequence[Task | str]) -> list[Task]:
    """'all' (the built-in tasks) or a comma-separated list of names and spec paths -> tasks, in order."""
    if not isinstance(spec, str):
        return [get_task(t) for t in spec]
    if spec.strip().lower() == "all":
        return [builtin_task(name) for name in BUILTIN_TASKS]
    tasks = [get_task(part.strip()) for part in spec.split(",") if part.strip()]
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise TaskError(f"two tasks share a name in {spec!r}: {names}")
    if not tasks:
        raise TaskError("no task given")
    return tasks


# ---- reading data ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dataset:
    """One split (or part of one) of a task: texts, optional second texts, and class indices, in file order."""

    task: Task
    split: str
    texts: tuple[str, ...]
    labels: np.ndarray  # (N,) int64 class index (position of the label value in task.label_values)
    indices: np.ndarray | None = None  # (N,) positions in the split's file; None = 0..N-1
    pairs: tuple[str, ...] | None = None  # (N,) the text_pair column, for pair tasks

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def example_idx(self) -> np.ndarray:
        """(N,) int64 position of each example in its file: what record ids are made from."""
        return np.arange(len(self)) if self.indices is None else self.indices

    @property
    def inputs(self) -> list[str]:
        """One string per example, for keys and explanations: the text, joined to its pair when there is one."""
        return join_pairs(self.texts, self.pairs)

    def head(self, limit: int | None) -> Dataset:
        """The first `limit` examples (all when None), in file order."""
        if limit is None or limit >= len(self):
            return self
        return self.take(np.arange(limit))

    def sample(self, limit: int | None, seed: int = 0) -> Dataset:
        """A seeded random subset of `limit` examples, kept in file order (all when None).

        Not a head: the LM-BFF mr/cr/mpqa/subj files are grouped by label, so their first rows are one class."""
        if limit is None or limit >= len(self):
            return self
        return self.take(np.sort(np.random.default_rng(seed).permutation(len(self))[:limit]))

    def take(self, rows: np.ndarray) -> Dataset:
        """The examples at `rows` (positions in this dataset), in that order."""
        rows = np.asarray(rows, dtype=np.int64)
        pairs = None if self.pairs is None else tuple(self.pairs[i] for i in rows)
        return Dataset(self.task, self.split, tuple(self.texts[i] for i in rows), self.labels[rows],
                       self.example_idx[rows], pairs)

    _take = take  # older name


def join_pairs(texts: Sequence[str], pairs: Sequence[str] | None) -> list[str]:
    """texts[i] + PAIR_SEPARATOR + pairs[i] (texts alone when pairs is None)."""
    if pairs is None:
        return list(texts)
    return [f"{t}{PAIR_SEPARATOR}{p}" for t, p in zip(texts, pairs, strict=True)]


def concat(parts: Sequence[Dataset]) -> Dataset:
    """Datasets of one task and split, end to end."""
    if not parts:
        raise ValueError("concat needs at least one dataset")
    first = parts[0]
    pairs = None if first.pairs is None else tuple(p for d in parts for p in (d.pairs or ()))
    return Dataset(first.task, first.split, tuple(t for d in parts for t in d.texts),
                   np.concatenate([d.labels for d in parts]).astype(np.int64),
                   np.concatenate([d.example_idx for d in parts]).astype(np.int64), pairs)


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """Explicit argument, else $RAEE_DATA_DIR, else ./datasets."""
    chosen = data_dir or os.environ.get(DATA_DIR_ENV) or "datasets"
    return Path(chosen).expanduser()


def load_split(task: Task | str, split: Split, data_dir: str | os.PathLike[str] | None = None) -> Dataset:
    """A whole split in memory (`iter_split` reads it in batches)."""
    task = get_task(task)
    parts = list(iter_split(task, split, data_dir))
    if not parts:
        return Dataset(task, split, (), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64),
                       () if task.has_pairs else None)
    return concat(parts)


def iter_split(task: Task | str, split: Split, data_dir: str | os.PathLike[str] | None = None, *,
               batch_rows: int = 65536) -> Iterator[Dataset]:
    """The split's examples in file order, about batch_rows per Dataset, never the whole file in memory at once.

    A label value not in the spec, a missing column or a file that does not parse is a TaskError naming the
    file (and the row and the known labels for a bad label); empty texts are skipped with one warning."""
    task = get_task(task)
    if split not in ("train", "test"):
        raise TaskError(f"unknown split {split!r} (expected 'train' or 'test')")
    path = task.path(split, data_dir)
    if not path.is_file():
        hint = (f"set --data-dir or ${DATA_DIR_ENV} to the LM-BFF data folder" if "${" in
                (task.data.train if split == "train" else task.data.test or "") else
                f"paths in [data] are relative to {task.base_dir}")
        raise TaskError(f"data file {path} of task {task.name} not found ({hint})")
    lookup = {value: i for i, value in enumerate(task.label_values)}
    skipped = 0
    position = 0
    for columns in _read_batches(path, task.data, batch_rows):
        texts, labels = columns[task.data.text], columns[task.data.label]
        pairs = columns[task.data.text_pair] if task.data.text_pair else None
        n = len(texts)
        classes = np.empty(n, dtype=np.int64)
        for i, value in enumerate(labels):  # a dict lookup per row: the rows are already Python strings
            cls = lookup.get(value.strip() if isinstance(value, str) else value)
            if cls is None:
                raise TaskError(f"{path}, row {position + i + 1}: label {value!r} is not one of the task's labels "
                                f"{list(task.label_values)} (add it to [labels] in {task.source or 'the spec'})")
            classes[i] = cls
        keep = np.array([bool(t.strip()) and (pairs is None or bool(pairs[i].strip()))
                         for i, t in enumerate(texts)], dtype=bool)
        skipped += int((~keep).sum())
        rows = np.flatnonzero(keep)
        if len(rows):
            yield Dataset(task, split, tuple(texts[i] for i in rows), classes[rows], position + rows,
                          None if pairs is None else tuple(pairs[i] for i in rows))
        position += n
    if skipped:  # nothing to retrieve or classify in an empty text (CR has 4 such rows)
        log.warning("%s: skipped %d rows with an empty text in %s", task.name, skipped, path)


def file_format(path: Path, data: DataSpec | None = None) -> str:
    """csv | tsv | jsonl | parquet, from [data] format or the file suffix."""
    if data is not None and data.format:
        return data.format
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise TaskError(f"cannot tell the format of {str(path)!r} from its suffix; use .csv, .tsv, .jsonl or "
                        ".parquet (or set [data] format)")
    return fmt


def _read_batches(path: Path, data: DataSpec, batch_rows: int) -> Iterator[dict[str, list[str]]]:
    """{column: values as str} per record batch, only the columns the task uses."""
    wanted = [c for c in (data.text, data.text_pair, data.label) if c]
    for batch in read_table_batches(path, data=data, batch_rows=batch_rows):
        missing = [c for c in wanted if c not in batch.schema.names]
        if missing:
            raise TaskError(f"{path} has no column(s) {missing}; its columns are {batch.schema.names} "
                            "(fix [data] text / text_pair / label in the spec)")
        yield {c: _as_strings(batch.column(c), path, c) for c in wanted}


def read_table_batches(path: Path, *, data: DataSpec | None = None, batch_rows: int = 65536):
    """pyarrow RecordBatches of a csv/tsv/jsonl/parquet file (csv/tsv columns as strings); TaskError if unreadable."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.json as pajson
    import pyarrow.parquet as pq

    fmt = file_format(path, data)
    try:
        if fmt == "parquet":
            yield from pq.ParquetFile(path).iter_batches(batch_size=batch_rows)
            return
        if fmt == "jsonl":
            reader = pajson.open_json(path, read_options=pajson.ReadOptions(block_size=1 << 22))
        else:
            columns = list(data.columns) if data is not None and data.columns else None
            quoting = data.quoting if data is not None else True
            read = pacsv.ReadOptions(column_names=columns, block_size=1 << 22)
            parse = pacsv.ParseOptions(delimiter="\t" if fmt == "tsv" else ",", quote_char='"' if quoting else False,
                                       newlines_in_values=quoting)
            names = columns
            if names is None:  # the header decides; every column is text, so labels stay as written
                names = next(iter(pacsv.open_csv(path, read_options=read, parse_options=parse))).schema.names
            convert = pacsv.ConvertOptions(column_types=dict.fromkeys(names, pa.string()),
                                           strings_can_be_null=False, quoted_strings_can_be_null=False)
            reader = pacsv.open_csv(path, read_options=read, parse_options=parse, convert_options=convert)
        for batch in reader:
            for start in range(0, batch.num_rows, batch_rows):
                yield batch.slice(start, batch_rows)
    except StopIteration:
        return
    except (pa.ArrowInvalid, pa.ArrowTypeError, OSError, UnicodeDecodeError) as exc:
        raise TaskError(f"cannot read {path} as {fmt}: {exc}") from exc


def _as_strings(column, path: Path, name: str) -> list[str]:
    """A pyarrow column as Python strings (numbers and booleans cast: 1 and "1" are the same label)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if column.null_count:
        first = next(i for i, v in enumerate(column.is_null().to_pylist()) if v)
        raise TaskError(f"{path}, row {first + 1}: column {name!r} is empty (null)")
    if not pa.types.is_string(column.type) and not pa.types.is_large_string(column.type):
        try:
            column = pc.cast(column, pa.string())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise TaskError(f"{path}: column {name!r} of type {column.type} cannot be read as text") from exc
    return column.to_pylist()


# ---- starter specs --------------------------------------------------------------------------------------------


_SPLIT_STEMS = frozenset({"train", "training", "test", "testing", "dev", "valid", "validation", "val", "data"})


def init_spec(data_file: str | os.PathLike[str], *, text: str, label: str, text_pair: str | None = None,
              name: str | None = None, spec_path: str | os.PathLike[str] | None = None,
              test_file: str | os.PathLike[str] | None = None) -> Task:
    """A starter Task over `data_file` with the label values found in it (sorted), each its own label word.

    The words and the template are placeholders for the user to edit; data paths are written relative to
    where the spec will live (spec_path's folder, default: the data file's)."""
    data_path = Path(data_file).expanduser().resolve()
    fmt = file_format(data_path)
    spec_dir = Path(spec_path).expanduser().resolve().parent if spec_path else data_path.parent
    probe = DataSpec(text=text, label=label, text_pair=text_pair)
    values: set[str] = set()
    for columns in _read_batches(data_path, probe, 65536):
        values.update(v.strip() for v in columns[label])
    values.discard("")
    if len(values) < 2:
        raise TaskError(f"{data_path}: column {label!r} holds {len(values)} distinct label value(s); a task needs 2+")
    numeric = all(re.fullmatch(r"-?\d+", v) for v in values)
    ordered = sorted(values, key=int) if numeric else sorted(values)
    words = [v if re.fullmatch(r"[A-Za-z][A-Za-z_-]*", v) else f"label{i}" for i, v in enumerate(ordered)]
    default = data_path.stem  # "train.jsonl" names its folder's task, not a task called "train"
    if default.lower() in _SPLIT_STEMS and data_path.resolve().parent.name:
        default = data_path.resolve().parent.name
    stem = re.sub(r"[^a-z0-9_-]", "-", (name or default).lower()).strip("-") or "task"
    template = "Text: {text}" + (" Context: {text_pair}" if text_pair else "") + " Label:"
    rel = os.path.relpath(data_path, spec_dir)
    test_rel = os.path.relpath(Path(test_file).expanduser().resolve(), spec_dir) if test_file else None
    return Task(name=stem, template=template, label_values=tuple(ordered), words=tuple(words),
                data=DataSpec(text=text, label=label, text_pair=text_pair, train=rel, test=test_rel,
                              format=None if fmt == FORMATS.get(data_path.suffix.lower()) else fmt),
                base_dir=str(spec_dir), source=str(spec_path or "starter spec"))


# ---- metrics --------------------------------------------------------------------------------------------------


def _one_hot_counts(preds: np.ndarray, labels: np.ndarray, n_classes: int) -> tuple[np.ndarray, ...]:
    """Per column of preds: (correct, predicted count per class, true count per class, true positives per class).

    preds (N, M), labels (N,) -> (M,), (M, C), (C,), (M, C)."""
    classes = np.arange(n_classes)
    pred_1h = preds[..., None] == classes  # (N, M, C)
    true_1h = labels[:, None] == classes  # (N, C)
    correct = (preds == labels[:, None]).sum(axis=0).astype(float)  # (M,)
    tp = (pred_1h & true_1h[:, None, :]).sum(axis=0).astype(float)  # (M, C)
    return correct, pred_1h.sum(axis=0).astype(float), true_1h.sum(axis=0).astype(float), tp


def matthews_corrcoef(preds: np.ndarray, labels: np.ndarray, n_classes: int | None = None) -> np.ndarray | float:
    """MCC = (c s - sum_k p_k t_k) / sqrt((s^2 - sum_k p_k^2)(s^2 - sum_k t_k^2)) (Gorodkin's R_K); 0 when undefined.

    c correct, s total, p_k / t_k predicted / true count of class k; for two classes this is the binary MCC
    (TP TN - FP FN) / sqrt(...). preds (N,) or (N, M), labels (N,) -> a float, or (M,) one per column."""
    p = np.asarray(preds)
    y = np.asarray(labels)
    cols = p.reshape(len(y), -1)
    n_classes = n_classes or int(max(cols.max(initial=0), y.max(initial=0)) + 1)
    correct, pred_counts, true_counts, _ = _one_hot_counts(cols, y, max(n_classes, 2))
    s = float(len(y))
    numerator = correct * s - pred_counts @ true_counts  # (M,)
    denom = np.sqrt((s * s - (pred_counts**2).sum(axis=1)) * (s * s - (true_counts**2).sum()))
    mcc = np.divide(numerator, denom, out=np.zeros_like(numerator), where=denom > 0)
    return float(mcc[0]) if p.ndim == 1 else mcc


def macro_f1(preds: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray | float:
    """mean over classes k of F1_k = 2 TP_k / (2 TP_k + FP_k + FN_k), over the classes that occur in labels or preds.

    preds (N,) or (N, M), labels (N,) -> a float, or (M,) one per column."""
    p = np.asarray(preds)
    y = np.asarray(labels)
    cols = p.reshape(len(y), -1)
    _, pred_counts, true_counts, tp = _one_hot_counts(cols, y, n_classes)
    denom = pred_counts + true_counts[None, :]  # (M, C) = 2 TP + FP + FN
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    present = denom > 0
    out = np.divide(f1.sum(axis=1), present.sum(axis=1), out=np.zeros(len(f1)), where=present.any(axis=1))
    return float(out[0]) if p.ndim == 1 else out


def score_per_layer(task: Task, layer_preds: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """scores[l] = metric(layer_preds[:, l], labels). layer_preds (N, L+1) -> (L+1,)."""
    layer_preds, labels = np.asarray(layer_preds), np.asarray(labels)
    if not labels.size:
        return np.full(layer_preds.shape[1], np.nan)
    if task.metric == "mcc":
        return matthews_corrcoef(layer_preds, labels, task.n_classes)
    if task.metric == "macro_f1":
        return macro_f1(layer_preds, labels, task.n_classes)
    return (layer_preds == labels[:, None]).mean(axis=0)


def score(task: Task, preds: np.ndarray, labels: np.ndarray) -> float:
    """The task's metric: accuracy and macro F1 in [0, 1], Matthews correlation in [-1, 1]; NaN for no examples."""
    preds, labels = np.asarray(preds), np.asarray(labels)
    if preds.shape != labels.shape:
        raise ValueError(f"preds {preds.shape} and labels {labels.shape} differ in shape")
    return float(score_per_layer(task, preds[:, None], labels)[0])


def layer_stats(task: Task, layer_probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(score of each layer's argmax, share of examples given the layer's commonest class), each (L+1,).

    layer_probs (N, L+1, C). A share near 1 means the layer says the same class for every input."""
    preds = layer_probs.argmax(-1)  # (N, L+1)
    counts = (preds[..., None] == np.arange(task.n_classes)).sum(axis=0)  # (L+1, C)
    return score_per_layer(task, preds, labels), counts.max(axis=1) / max(len(preds), 1)


def with_data(task: Task, **changes: str | None) -> Task:
    """The task with some [data] fields changed (e.g. another train file), everything else kept."""
    return replace(task, data=replace(task.data, **changes))
