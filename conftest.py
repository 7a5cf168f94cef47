"""Test session set-up shared by every test module: environment first, then the fixture plugins."""

import os

# Ray must stay on loopback and quiet; torch one thread per process (2-core machines).
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

pytest_plugins = ["tests.fixtures_models", "tests.fixtures_milvus", "tests.fixtures_ray"]


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    """The reliability figures (load, faults, fuzzing, bind) the tests measured, in the order they ran."""
    from tests.figures import FIGURES

    if FIGURES:
        terminalreporter.section("reliability figures")
        for line in FIGURES:
            terminalreporter.write_line(line)
