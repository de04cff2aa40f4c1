"""Run the ``cnnreg`` backend as a child process and follow its progress.

No Slicer, VTK or Qt here: the GUI drains :meth:`BackendProcess.poll` from a ``QTimer``,
scripts call :meth:`BackendProcess.wait`. The child writes one JSON object per line on
stdout (``--progress jsonl``); a thread per stream reads lines into a queue so that the
GUI never blocks on the pipe. Cancel kills the whole process tree (the backend may start
worker processes), with psutil when available and a process-group kill otherwise.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

#: Folder holding ``CNNRegistration.py``; the ``cnnreg`` package lives in it.
MODULE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def insideSlicer() -> bool:
    """True when running in the Slicer application (not in a plain Python with slicer-core)."""
    slicerModule = sys.modules.get("slicer")
    return slicerModule is not None and hasattr(slicerModule, "app")


def pythonExecutable() -> str:
    """Python interpreter for the backend: ``PythonSlicer`` inside Slicer (Slicer's own
    Python with its site-packages), else the interpreter running this code."""
    if insideSlicer():
        found = shutil.which("PythonSlicer")
        if found:
            return found
    return sys.executable


def backendEnvironment(extraPythonPath: Sequence[str] = (), base: dict | None = None) -> dict:
    """Environment for the child: ``MODULE_DIR`` (and ``extraPythonPath``) first on
    ``PYTHONPATH`` so ``import cnnreg`` finds the bundled backend; unbuffered output so
    progress lines arrive as they are printed."""
    environment = dict(os.environ if base is None else base)
    paths = [*extraPythonPath, MODULE_DIR]
    if environment.get("PYTHONPATH"):
        paths.append(environment["PYTHONPATH"])
    environment["PYTHONPATH"] = os.pathsep.join(paths)
    environment["PYTHONUNBUFFERED"] = "1"
    environment.setdefault("PYTHONIOENCODING", "utf-8")
    return environment


def parseLine(line: str) -> dict:
    """One stdout line -> event dict. JSON objects with an ``event`` key are returned as
    they are; anything else becomes ``{"event": "log", "message": line}``."""
    text = line.strip()
    if text.startswith("{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = None
        if isinstance(value, dict) and "event" in value:
            return value
    return {"event": "log", "message": text}


def progressPercent(event: dict) -> int | None:
    """The progress bar's value (0-100) of a progress event's ``fraction``, or None when it has
    none or it is not a finite number (a malformed line must not stop the panel)."""
    try:
        fraction = float(event.get("fraction"))
    except (TypeError, ValueError):
        return None
    if fraction != fraction or fraction in (float("inf"), float("-inf")):
        return None
    return int(round(100 * min(1.0, max(0.0, fraction))))


def killProcessTree(pid: int, timeout: float = 5.0, popen: subprocess.Popen | None = None) -> None:
    """Terminate process ``pid`` and all its descendants; kill those still alive after
    ``timeout`` seconds. Uses psutil when importable, else the process group (POSIX,
    the child must have been started in its own session) or ``taskkill /T`` (Windows).
    ``popen``, when ``pid`` is our child, lets the group wait reap it as soon as it exits."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            parent = psutil.Process(pid)
        except psutil.NoSuchProcess:
            return
        children = parent.children(recursive=True)
        # our own child is reaped by its Popen (psutil would reap it first, and Popen would then
        # report exit code 0 for a killed process)
        processes = children if popen is not None else [*children, parent]
        for process in [*children, parent]:
            try:
                process.terminate()
            except psutil.NoSuchProcess:
                pass
        if popen is not None:
            try:
                popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.wait()
        _, alive = psutil.wait_procs(processes, timeout=timeout)
        for process in alive:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=timeout)
        return
    if os.name == "posix":
        try:
            groupId = os.getpgid(pid)
            os.killpg(groupId, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if popen is not None:
                    popen.poll()  # reap our exited child, else it stays in the group as a zombie
                os.killpg(groupId, 0)  # raises once the whole group is gone
                time.sleep(0.05)
            os.killpg(groupId, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        return
    subprocess.run(["taskkill", "/F", "/T", "/PID", str(pid)], capture_output=True, check=False)


class BackendProcess:
    """One child process (normally ``python -m cnnreg register ...``) with line-based progress.

    Usage::

        process = BackendProcess(["-m", "cnnreg", "register", ...])
        process.start()
        while process.running:
            for event in process.poll(): ...
            time.sleep(0.1)
        events = process.poll()  # the last events, ending with {"event": "exit", ...}

    Events are dicts: the backend's JSON lines (``start``, ``progress``, ``done``, ``error``),
    ``{"event": "log", "message": ...}`` for other stdout lines, ``{"event": "stderr",
    "message": ...}`` for stderr lines, and a final ``{"event": "exit", "returncode": rc,
    "cancelled": bool}`` once the process has ended and both pipes are drained.
    """

    def __init__(
        self,
        arguments: Sequence[str],
        python: str | None = None,
        extraPythonPath: Sequence[str] = (),
        workingDirectory: str | None = None,
    ):
        self.command = [python or pythonExecutable(), *[str(a) for a in arguments]]
        self.environment = backendEnvironment(extraPythonPath)
        self.workingDirectory = workingDirectory
        self.process: subprocess.Popen | None = None
        self.cancelled = False
        self.returncode: int | None = None
        self.stderrLines: list = []
        self._queue: queue.Queue = queue.Queue()
        self._threads: list = []
        self._exitReported = False
        self._exitedAt: float | None = None

    # -- life cycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Start the child (in its own process group/session so that cancel reaches its children)."""
        if self.process is not None:
            raise RuntimeError("the process was already started")
        logging.info("Starting backend: %s", subprocess.list2cmdline(self.command))
        options = {}
        if os.name == "posix":
            options["start_new_session"] = True
        else:
            options["creationflags"] = getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0) | getattr(
                subprocess, "CREATE_NO_WINDOW", 0
            )
        self.process = subprocess.Popen(
            self.command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=self.environment,
            cwd=self.workingDirectory,
            text=True,
            encoding="utf-8",
            errors="replace",
            bufsize=1,
            **options,
        )
        self._threads = [
            threading.Thread(target=self._readStdout, name="cnnreg-stdout", daemon=True),
            threading.Thread(target=self._readStderr, name="cnnreg-stderr", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    @property
    def started(self) -> bool:
        return self.process is not None

    #: seconds the output of an exited process is still read (a leftover grandchild that keeps the
    #: pipes open must not keep the job "running" forever)
    DRAIN_SECONDS = 2.0

    @property
    def running(self) -> bool:
        """True from start until the process has exited and its output has been read (for at most
        :data:`DRAIN_SECONDS` after the exit; leftover processes of its group are then stopped)."""
        if self.process is None:
            return False
        if self.process.poll() is None:
            return True
        if not any(thread.is_alive() for thread in self._threads):
            return False
        if self._exitedAt is None:
            self._exitedAt = time.monotonic()
        if time.monotonic() - self._exitedAt < self.DRAIN_SECONDS:
            return True
        self._stopLeftovers()
        return False

    def _stopLeftovers(self) -> None:
        """Stop what is left of the child's process group (it ran in its own session), e.g. a
        grandchild that still holds the output pipes after the child exited."""
        if os.name == "posix" and self.process is not None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def poll(self) -> list:
        """Events received since the last call (never blocks). The last call after the
        process ended returns the ``exit`` event (once)."""
        events = []
        while True:
            try:
                events.append(self._queue.get_nowait())
            except queue.Empty:
                break
        if self.process is not None and not self._exitReported and not self.running:
            while True:  # lines queued between the first drain and the exit check
                try:
                    events.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            self.returncode = self.process.returncode
            self._exitReported = True
            events.append({"event": "exit", "returncode": self.returncode, "cancelled": self.cancelled})
        return events

    def wait(self, timeout: float | None = None) -> int:
        """Block until the process has ended and its pipes are drained; returns the exit code.
        Raises ``subprocess.TimeoutExpired`` after ``timeout`` seconds."""
        if self.process is None:
            raise RuntimeError("the process was not started")
        self.process.wait(timeout=timeout)
        for thread in self._threads:
            thread.join(timeout=self.DRAIN_SECONDS)
        if any(thread.is_alive() for thread in self._threads):  # a leftover holds the pipes
            self._stopLeftovers()
            for thread in self._threads:
                thread.join(timeout=self.DRAIN_SECONDS)
        self.returncode = self.process.returncode
        return self.returncode

    def cancel(self, timeout: float = 5.0) -> None:
        """Stop the child and all its descendants (terminate, then kill after ``timeout`` s); after
        the child has exited, what is left of its process group."""
        if self.process is None:
            return
        if self.process.poll() is not None:
            self._stopLeftovers()
            return
        self.cancelled = True
        logging.info("Cancelling backend process %d", self.process.pid)
        try:
            killProcessTree(self.process.pid, timeout=timeout, popen=self.process)
        except Exception as error:  # last resort: at least the direct child
            logging.warning("Could not kill the process tree (%s); terminating the child only", error)
            self.process.terminate()
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        for thread in self._threads:
            thread.join(timeout=timeout)

    def stderrTail(self, lines: int = 20) -> str:
        """The last ``lines`` lines the child wrote on stderr."""
        return "\n".join(self.stderrLines[-lines:])

    # -- reader threads -----------------------------------------------------------------

    def _readStdout(self) -> None:
        stream = self.process.stdout
        for line in iter(stream.readline, ""):
            if line.strip():
                self._queue.put(parseLine(line))
        stream.close()

    def _readStderr(self) -> None:
        stream = self.process.stderr
        for line in iter(stream.readline, ""):
            text = line.rstrip("\n")
            self.stderrLines.append(text)
            if text.strip():
                self._queue.put({"event": "stderr", "message": text})
        stream.close()
