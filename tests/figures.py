"""Figures measured by the reliability tests, printed once more at the end of the run.

`report(line)` prints the line (visible with `pytest -s`) and keeps it; conftest.py's pytest_terminal_summary
lists every kept line under "reliability figures", so `pytest -m reliability` shows them even without -s.
"""

from __future__ import annotations

FIGURES: list[str] = []


def report(line: str) -> None:
    print("\n" + line, flush=True)
    FIGURES.append(line)
