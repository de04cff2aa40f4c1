"""Register a cohort on Dask: ``python -m cnnreg batch``.

Every pair runs the same code as ``cnnreg register`` (in a Dask worker process) and writes the
same verified output folder, ``OUT/<name>/``.  A pair whose folder already holds a result made
from the same input files (SHA-256 in its ``summary.json``) is skipped, so a rerun resumes a
cohort; a failed pair is retried once by Dask (``retries=1``; a pair whose worker dies is
rescheduled by Dask on another worker) and then recorded as failed without stopping the others.
``OUT/batch.csv`` and ``OUT/batch.json`` list every pair: status, seconds, device, similarity
before/after, folding, Dice against ``fixed_labels`` when given, the message of a failure.
Exit code 0 only when every pair succeeded (or was already done), 4 otherwise.

Where the pairs run: a local Dask cluster sized to the machine by default (workers x threads
within the CPU count, and no more workers than the memory estimate of the largest pair allows),
an existing scheduler (``--scheduler tcp://HOST:PORT``), or SLURM/PBS workers started through
``dask-jobqueue`` (``--cluster slurm|pbs``, an optional extra).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .errors import InputError
from .progress import ProgressReporter, add_progress_argument, bar_text
from .settings import EXIT_NUMERIC, OUTPUT_FILES

#: columns of ``--pairs`` (``fixed`` and ``moving`` required; ``options``: extra register
#: arguments for that pair, e.g. ``--weight 2``)
PAIR_COLUMNS = ("fixed", "moving", "moving_labels", "fixed_labels", "name", "options")
#: columns of ``batch.csv``
RESULT_COLUMNS = (
    "name",
    "status",
    "seconds",
    "device",
    "similarity_before",
    "similarity_after",
    "folding_percent",
    "dice_mean",
    "fixed",
    "moving",
    "out",
    "message",
)
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


class PairFailed(RuntimeError):
    """One pair's registration failed: its exit code and message (Dask retries it once)."""


# ----------------------------------------------------------------------------- the pairs


def _stem(path: str) -> str:
    name = os.path.basename(path)
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def read_pairs(path: str | os.PathLike) -> list[dict]:
    """Rows of a pairs CSV (header with at least ``fixed`` and ``moving``; see :data:`PAIR_COLUMNS`);
    relative paths are read from the CSV's folder; names default to ``<moving>_to_<fixed>``."""
    base = os.path.dirname(os.path.abspath(path))
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    except OSError as error:
        raise InputError(f"cannot read the pairs file {path}: {error.strerror or error}") from None
    if not rows:
        raise InputError(f"the pairs file {path} lists no pairs (a header line, then one line per pair)")
    unknown = set(rows[0]) - set(PAIR_COLUMNS)
    if unknown or not {"fixed", "moving"} <= set(rows[0]):
        raise InputError(
            f"the pairs file {path} needs the columns fixed and moving (optional: {', '.join(PAIR_COLUMNS[2:])}); "
            f"it has {list(rows[0])}"
        )
    pairs = []
    for number, row in enumerate(rows, start=2):
        pair = {key: (value or "").strip() for key, value in row.items() if key in PAIR_COLUMNS}
        if not pair.get("fixed") or not pair.get("moving"):
            raise InputError(f"the pairs file {path}, line {number}: fixed and moving are required")
        for key in ("fixed", "moving", "moving_labels", "fixed_labels"):
            if pair.get(key):
                pair[key] = os.path.normpath(os.path.join(base, pair[key]))
        pairs.append(pair)
    return _named(pairs)


def _images_in(folder: str) -> list[str]:
    from .image import expand_paths  # the folder listing `atlas` and `train` use

    if not os.path.isdir(folder):
        raise InputError(f"{folder} is not a folder")
    return expand_paths([folder])


def pairs_from_arguments(args: argparse.Namespace) -> list[dict]:
    """The pairs of ``--pairs``, or of a shorthand: one moving image onto every image of
    ``--fixed-folder`` (a phantom onto patients), or every image of ``--moving-folder`` onto one
    ``--fixed`` (subjects onto a template)."""
    shapes = [bool(args.pairs), bool(args.fixed_folder), bool(args.moving_folder)]
    if sum(shapes) != 1:
        raise InputError("give one of --pairs CSV, --moving M --fixed-folder DIR, or --fixed F --moving-folder DIR")
    if args.pairs:
        return read_pairs(args.pairs)
    if args.fixed_folder:
        if not args.moving:
            raise InputError("--fixed-folder needs --moving (the one image registered onto each)")
        pairs = [
            {"fixed": f, "moving": os.path.abspath(args.moving), "moving_labels": args.moving_labels or ""}
            for f in _images_in(args.fixed_folder)
        ]
        return _named([{**p, "name": _stem(p["fixed"])} for p in pairs])
    if not args.fixed:
        raise InputError("--moving-folder needs --fixed (the one image every moving image is registered onto)")
    return _named(
        [{"fixed": os.path.abspath(args.fixed), "moving": m, "name": _stem(m)} for m in _images_in(args.moving_folder)]
    )


def _named(pairs: list[dict]) -> list[dict]:
    seen = set()
    for pair in pairs:
        name = pair.get("name") or f"{_stem(pair['moving'])}_to_{_stem(pair['fixed'])}"
        if name in seen or os.sep in name or name in (".", "..") or name.startswith("."):
            raise InputError(f"pair name {name!r} is repeated or not a plain folder name; give each pair its own name")
        seen.add(name)
        pair["name"] = name
    return pairs


# ----------------------------------------------------------------------------- one pair


def register_arguments(pair: dict, out: str, method: Sequence[str], threads: int) -> list[str]:
    """The ``cnnreg register`` command line of one pair (without the program name)."""
    arguments = ["register", "--fixed", pair["fixed"], "--moving", pair["moving"]]
    if pair.get("moving_labels"):
        arguments += ["--moving-labels", pair["moving_labels"]]
    arguments += [*method, *(pair.get("options") or "").split(), "--threads", str(threads)]
    return arguments + ["--progress", "none", "--out", out]


def finished_summary(pair: dict, out: str) -> dict | None:
    """The summary of a result folder made from these very input files (their SHA-256), with
    every image it should hold; None otherwise (the pair runs)."""
    from .checkpoint import file_sha256

    try:
        summary = json.loads(Path(out, OUTPUT_FILES["summary"]).read_text(encoding="utf-8"))
        recorded = summary["provenance"]["inputs"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    wanted = {"fixed": pair["fixed"], "moving": pair["moving"]}
    if pair.get("moving_labels"):
        wanted["moving_labels"] = pair["moving_labels"]
    names = ["warped", "displacement", "jacobian"] + (["warped_labels"] if pair.get("moving_labels") else [])
    try:
        if any(recorded[role]["sha256"] != file_sha256(path) for role, path in wanted.items()):
            return None
    except (OSError, KeyError, TypeError):
        return None
    if not all(os.path.isfile(os.path.join(out, OUTPUT_FILES[n])) for n in names):
        return None
    return summary


def worker_allocator() -> bool:
    """Undo what a Dask nanny's ``MALLOC_TRIM_THRESHOLD_`` does to glibc's allocator in its
    workers: with it every large tensor is mapped and unmapped anew (page faults on each), which
    made a 96^3 registration 3.5x slower (90 s against 26 s).  Sets glibc's defaults' ceilings
    (mmap threshold 32 MiB, trim threshold 256 MiB); True when done (glibc on Linux)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 32 * 2**20)) and bool(mallopt(m_trim_threshold, 256 * 2**20))


def run_pair(pair: dict, out: str, method: Sequence[str], threads: int) -> dict:
    """Register one pair in this process (a Dask task). Returns its row; raises
    :class:`PairFailed` when ``register`` exits non-zero (Dask then retries it)."""
    import contextlib
    import io

    from .commands import add_register_arguments, run_command, run_register

    worker_allocator()
    start = time.perf_counter()
    argv = register_arguments(pair, out, method, threads) + ["--overwrite"]
    parser = argparse.ArgumentParser(prog="cnnreg register")
    add_register_arguments(parser)
    errors = io.StringIO()
    with contextlib.redirect_stderr(errors), contextlib.redirect_stdout(io.StringIO()):
        try:
            args = parser.parse_args(argv[1:])
        except SystemExit as error:  # argparse's exit on an option register does not know
            code = error.code
        else:
            args.command, args.argv = "register", argv
            code = run_command(run_register, args)
    if code != 0:
        lines = [line for line in errors.getvalue().splitlines() if "error:" in line]
        message = lines[-1].split("error:", 1)[1].strip() if lines else errors.getvalue().strip()[-500:]
        raise PairFailed(f"exit code {code}: {message}")
    summary = json.loads(Path(out, OUTPUT_FILES["summary"]).read_text(encoding="utf-8"))
    return _row(pair, out, "done", summary, time.perf_counter() - start)


def _row(pair: dict, out: str, status: str, summary: dict | None, seconds: float | None, message: str = "") -> dict:
    summary = summary or {}
    row = {
        "name": pair["name"],
        "status": status,
        "seconds": None if seconds is None else round(seconds, 2),
        "device": summary.get("device"),
        "similarity_before": summary.get("similarity_before"),
        "similarity_after": summary.get("similarity_after"),
        "folding_percent": summary.get("folding_percent"),
        "dice_mean": None,
        "fixed": pair["fixed"],
        "moving": pair["moving"],
        "out": out,
        "message": message,
    }
    if pair.get("fixed_labels") and status in ("done", "skipped"):
        row["dice"], row["dice_mean"] = _dice(pair["fixed_labels"], os.path.join(out, OUTPUT_FILES["warped_labels"]))
    return row


def _dice(fixed_labels: str, warped_labels: str) -> tuple[dict, float | None]:
    import SimpleITK as sitk

    from .evaluate import dice_per_label

    if not os.path.isfile(warped_labels):
        return {}, None
    dice = dice_per_label(sitk.ReadImage(fixed_labels), sitk.ReadImage(warped_labels))
    values = [v for v in dice.values() if not math.isnan(v)]
    return {str(k): v for k, v in dice.items()}, (sum(values) / len(values) if values else None)


# ----------------------------------------------------------------------------- the cluster


def local_cluster_shape(pairs: Sequence[dict], method_settings, cores: int, threads: int | None) -> tuple[int, int]:
    """(workers, threads per registration) of a local cluster: threads x workers within the
    cores (2 threads each by default), and no more workers than the memory estimate of the
    largest pair allows."""
    from . import image as im
    from .device import available_memory_bytes
    from .registration import memory_needed

    threads = threads or max(1, min(2, cores))
    workers = max(1, cores // threads)
    largest = 0
    for pair in pairs:
        try:
            size, spacing = im.grid_from_header(pair["fixed"], "fixed image")
            moving = im.size_from_header(pair["moving"], "moving image")
        except InputError:
            continue  # the pair will fail with this message on its own
        largest = max(largest, memory_needed(size, moving, method_settings, spacing)[0])
    available = available_memory_bytes()
    if largest and available:
        workers = max(1, min(workers, int(available // largest)))
    return workers, threads


def _distributed():
    """The ``distributed`` package (an optional dependency: ``pip install 'dask[distributed]'``)."""
    try:
        import distributed
    except ImportError:
        raise InputError(
            "cnnreg batch needs Dask: pip install 'dask[distributed]' (or bash scripts/setup batch)"
        ) from None
    return distributed


def connect(args: argparse.Namespace, pairs: Sequence[dict], method_settings):
    """A ``distributed.Client`` for ``--scheduler``, ``--cluster`` or a local cluster; returns
    (client, cluster or None, threads per registration)."""
    distributed = _distributed()
    Client, LocalCluster = distributed.Client, distributed.LocalCluster
    if args.scheduler:
        return Client(args.scheduler), None, args.threads or 1
    if args.cluster:
        try:
            import dask_jobqueue
        except ImportError:
            raise InputError(f"--cluster {args.cluster} needs dask-jobqueue: pip install dask-jobqueue") from None
        kind = {"slurm": dask_jobqueue.SLURMCluster, "pbs": dask_jobqueue.PBSCluster}[args.cluster]
        threads = args.threads or 2
        cluster = kind(cores=threads, processes=1, memory=f"{args.worker_memory_gib}GiB")
        cluster.scale(jobs=args.workers or len(pairs))
        return Client(cluster), cluster, threads
    workers, threads = local_cluster_shape(pairs, method_settings, os.cpu_count() or 1, args.threads)
    workers = args.workers or workers
    cluster = LocalCluster(
        n_workers=workers,
        threads_per_worker=1,
        processes=True,
        dashboard_address=None if args.dashboard in ("", "none") else args.dashboard,
        host="127.0.0.1",
        silence_logs=logging.WARNING,  # the scheduler's INFO lines would bury the progress
    )
    return Client(cluster), cluster, threads


def run_batch(
    client, pairs: Sequence[dict], out_dir: str, method: Sequence[str], threads: int, report=None, retries: int = 1
) -> list[dict]:
    """Every pair through ``client`` (skipping finished ones); rows in the pairs' order. Writes
    ``batch.csv`` and ``batch.json`` after each pair, so a crash keeps what was done."""
    as_completed = _distributed().as_completed
    report = report or (lambda event: None)
    rows: dict[str, dict] = {}
    futures = {}
    for pair in pairs:
        out = os.path.join(out_dir, pair["name"])
        summary = finished_summary(pair, out)
        if summary is not None:
            rows[pair["name"]] = _row(pair, out, "skipped", summary, None, "already done with these inputs")
            continue
        future = client.submit(
            run_pair, pair, out, list(method), threads, key=f"cnnreg-{pair['name']}", retries=retries, pure=False
        )
        futures[future] = pair
    start = time.perf_counter()
    done = failed = 0
    slots = max(1, sum(client.nthreads().values()))  # pairs that can run at once
    _write_tables(out_dir, pairs, rows)
    for future in as_completed(list(futures)):
        pair = futures[future]
        out = os.path.join(out_dir, pair["name"])
        try:
            rows[pair["name"]] = future.result()
            done += 1
        except Exception as error:  # noqa: BLE001 - any failure of one pair is recorded, the others go on
            message = str(error) if isinstance(error, PairFailed) else f"{type(error).__name__}: {error}"
            rows[pair["name"]] = _row(pair, out, "failed", None, None, message)
            failed += 1
        _write_tables(out_dir, pairs, rows)
        finished = done + failed
        elapsed = time.perf_counter() - start
        report(
            {
                "event": "pair",
                "name": pair["name"],
                "status": rows[pair["name"]]["status"],
                "done": done,
                "failed": failed,
                "running": min(slots, len(futures) - finished),
                "remaining": len(futures) - finished,
                "total": len(futures),
                "eta_s": round(elapsed / finished * (len(futures) - finished), 1),
            }
        )
    return [rows[p["name"]] for p in pairs]


def _write_tables(out_dir: str, pairs: Sequence[dict], rows: dict) -> None:
    listed = [rows.get(p["name"]) or _row(p, os.path.join(out_dir, p["name"]), "pending", None, None) for p in pairs]
    for name, text in (
        ("batch.json", json.dumps({"pairs": listed}, indent=2, default=float)),
        ("batch.csv", _csv_text(listed)),
    ):
        temporary = os.path.join(out_dir, f".{name}.partial-{os.getpid()}")
        with open(temporary, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
        os.replace(temporary, os.path.join(out_dir, name))


def _csv_text(rows: Sequence[dict]) -> str:
    import io

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=RESULT_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


# ----------------------------------------------------------------------------- command line


def add_cluster_arguments(parser: argparse.ArgumentParser, title: str) -> None:
    """``--scheduler``, ``--cluster``, ``--workers``, ``--worker-memory-gib``, ``--dashboard``
    (``batch`` and ``atlas``; read by :func:`connect`)."""
    group = parser.add_argument_group("Dask", title)
    group.add_argument("--scheduler", help="address of a running Dask scheduler (tcp://HOST:PORT)")
    group.add_argument("--cluster", choices=("slurm", "pbs"), help="start Dask workers as jobs (needs dask-jobqueue)")
    group.add_argument(
        "--workers", type=int, help="workers (default: from the cores and the memory of the largest pair)"
    )
    group.add_argument("--worker-memory-gib", type=float, default=16.0, help="memory of each --cluster job, GiB")
    group.add_argument(
        "--dashboard", default=":0", help="local cluster's dashboard (:0 a free port, none: no dashboard)"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .settings import add_method_arguments

    parser.description = __doc__.split("\n\n")[0]
    parser.add_argument("--pairs", help=f"CSV with a header: {', '.join(PAIR_COLUMNS)} (fixed, moving required)")
    parser.add_argument("--moving", help="with --fixed-folder: one moving image (e.g. a phantom) onto every image")
    parser.add_argument("--moving-labels", help="with --fixed-folder: the moving image's labels")
    parser.add_argument("--fixed-folder", help="with --moving: every image of this folder is a fixed image")
    parser.add_argument("--fixed", help="with --moving-folder: the one fixed image (e.g. a template)")
    parser.add_argument("--moving-folder", help="with --fixed: every image of this folder is registered onto it")
    parser.add_argument("--out", required=True, help="output folder: one result folder per pair, batch.csv, batch.json")
    add_cluster_arguments(parser, "where the pairs run (default: a local Dask cluster sized to the machine)")
    add_method_arguments(parser)
    parser.add_argument("--no-qc", action="store_true", help="no QC picture in each pair's folder (given to register)")
    add_progress_argument(parser)


#: options that belong to the batch, not to each pair's register command
_BATCH_OPTIONS = {
    "pairs", "moving", "moving_labels", "fixed_folder", "fixed", "moving_folder", "out", "scheduler", "cluster",
    "workers", "worker_memory_gib", "dashboard", "threads", "progress", "command", "argv",
}  # fmt: skip


def method_arguments(argv: Sequence[str]) -> list[str]:
    """The register options given to ``batch`` (everything but the batch's own options)."""
    own = {"--" + name.replace("_", "-") for name in _BATCH_OPTIONS}
    kept, skip = [], False
    for index, item in enumerate(argv):
        if skip:
            skip = False
            continue
        if index == 0 and item == "batch":
            continue
        name = item.split("=", 1)[0]
        if name in own:
            skip = "=" not in item
            continue
        kept.append(item)
    return kept


def run(args: argparse.Namespace) -> int:
    from .settings import settings_from_args

    pairs = pairs_from_arguments(args)
    method = method_arguments(args.argv)
    method_settings = settings_from_args(args)
    os.makedirs(args.out, exist_ok=True)
    report = ProgressReporter(args.progress)
    client, cluster, threads = connect(args, pairs, method_settings)
    try:
        if report.bar or not report.jsonl:
            link = getattr(client, "dashboard_link", None)
            print(
                f"cnnreg batch: {len(pairs)} pairs on {client}" + (f"; dashboard {link}" if link else ""),
                file=sys.stderr,
            )
        rows = run_batch(client, pairs, os.path.abspath(args.out), method, threads, _pair_reporter(report))
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    failed = [row for row in rows if row["status"] == "failed"]
    for row in failed:
        print(f"cnnreg batch: {row['name']} failed: {row['message']}", file=sys.stderr)
    print(
        f"cnnreg batch: {sum(r['status'] == 'done' for r in rows)} registered, "
        f"{sum(r['status'] == 'skipped' for r in rows)} already done, {len(failed)} failed; "
        f"table in {os.path.join(args.out, 'batch.csv')}",
        file=sys.stderr,
    )
    return EXIT_NUMERIC if failed else 0


def _pair_reporter(report):
    """Pair events as JSON lines (piped, or asked for) or, in a terminal, one bar over the pairs."""

    def forward(event: dict) -> None:
        if report.jsonl:
            report(event)
        if report.bar:
            fraction = (event["done"] + event["failed"]) / max(event["total"], 1)
            sys.stderr.write(
                f"\r{bar_text(fraction)} pairs {event['done']} done, {event['failed']} failed, "
                f"{event['running']} running, {event['remaining']} to go, ETA {event['eta_s']:.0f} s   "
            )
            if event["remaining"] == 0:
                sys.stderr.write("\n")
            sys.stderr.flush()

    return forward
