"""Progress of a long command: JSON lines on standard output and a bar on standard error.

Events are dicts with an ``event`` key: ``start``, ``progress`` (stage, iteration, iterations,
fraction 0..1, loss, ...), ``done`` (summary) or ``error`` (message); the Slicer module reads
the JSON lines of the backend process.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

#: values of ``--progress``
PROGRESS_STYLES = ("auto", "jsonl", "bar", "none")


class ProgressReporter:
    """Writes progress events as JSON lines (stdout) and a bar (stderr, terminals only)."""

    def __init__(self, style: str = "auto", stream=None, bar_stream=None):
        self.stream = stream or sys.stdout
        self.bar_stream = bar_stream or sys.stderr
        self.jsonl = wants_jsonl(style, self.stream)
        self.bar = wants_bar(style, self.bar_stream)
        self.summary = wants_summary(style, self.stream)
        self.started = time.perf_counter()

    def __call__(self, event: dict) -> None:
        if self.jsonl:
            self.stream.write(json.dumps(event, default=float) + "\n")
            self.stream.flush()
        if self.bar and event.get("event") == "progress":
            fraction = float(event.get("fraction", 0.0))
            self.bar_stream.write(
                f"\r{bar_text(fraction)} {100 * fraction:5.1f}% "
                f"{event.get('stage', '')} it {event.get('iteration')}/{event.get('iterations')} "
                f"loss {event.get('loss', float('nan')):.5f} {time.perf_counter() - self.started:6.1f}s"
            )
            self.bar_stream.flush()
        if self.bar and event.get("event") in ("done", "error"):
            self.bar_stream.write("\n")


def wants_jsonl(style: str, stream=None) -> bool:
    """JSON lines for programs: asked for, or ``auto`` with ``stream`` (stdout) piped; a terminal
    gets a bar and a human summary instead."""
    return style == "jsonl" or (style == "auto" and not _isatty(stream or sys.stdout))


def wants_summary(style: str, stream=None) -> bool:
    """A one-line human summary on standard error at the end: whenever JSON lines are not wanted,
    unless ``--progress none``."""
    return style != "none" and not wants_jsonl(style, stream)


def bar_text(fraction: float, width: int = 30) -> str:
    """``[####......]``: ``fraction`` (0..1) of ``width`` characters filled."""
    filled = int(width * min(max(fraction, 0.0), 1.0))
    return f"[{'#' * filled}{'.' * (width - filled)}]"


def wants_bar(style: str, stream=None) -> bool:
    """A progress bar: asked for, or ``auto`` with ``stream`` (stderr) a terminal."""
    return style == "bar" or (style == "auto" and _isatty(stream or sys.stderr))


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or unusual stream: treat as a pipe
        return False


def add_progress_argument(parser: argparse.ArgumentParser) -> None:
    """``--progress`` of every command that reports progress (read by :class:`ProgressReporter`)."""
    parser.add_argument(
        "--progress",
        default="auto",
        choices=PROGRESS_STYLES,
        help="JSON lines on standard output and/or a bar on standard error (auto: in a terminal a bar and a "
        "summary, JSON lines when standard output is piped)",
    )


def set_threads(threads: int | None) -> None:
    """CPU threads for torch (``--threads``), when given."""
    if threads:
        import torch

        torch.set_num_threads(threads)
