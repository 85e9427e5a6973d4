"""Child processes for the tools: one way to run a command in isolation and name how it ended.

A CUDA fault poisons the process that hit it, so every probe, fuzz worker and suite run that may
crash runs as a child in its own process group (``start_new_session``). Return codes follow
``subprocess``: ``-N`` means killed by signal N.

    rec = run_command([sys.executable, "probe.py"], timeout=60)   # RunRecord; never raises for the child
    how_it_ended(rec.returncode)                                  # "exit 0", "SIGSEGV", ...
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass


def signal_name(returncode: int) -> str:
    """``-11`` -> ``"SIGSEGV"``; an unknown signal -> ``"signal N"`` (``returncode`` < 0)."""
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


def how_it_ended(returncode: int) -> str:
    """``"exit N"`` for a normal exit, the signal's name for a kill."""
    return signal_name(returncode) if returncode < 0 else f"exit {returncode}"


def stop_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """Terminate the child's process group (started with ``start_new_session``), then kill it."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace_s)
            return
        except subprocess.TimeoutExpired:
            continue


@dataclass
class RunRecord:
    """What one isolated child did: its command, return code, whether it timed out, wall time, output."""

    command: list[str]
    returncode: int | None
    timed_out: bool
    wall_s: float
    stdout: str
    stderr: str


def run_command(command: list[str], timeout: float, cwd: str | os.PathLike | None = None,
                env: dict | None = None) -> RunRecord:
    """Run one child in its own process group; on timeout kill that group. Never raises for the child."""
    start = time.monotonic()
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, errors="replace", start_new_session=True)
    timed_out = False
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        out, err = proc.communicate()
    return RunRecord(command=list(command), returncode=proc.returncode, timed_out=timed_out,
                     wall_s=round(time.monotonic() - start, 2), stdout=out or "", stderr=err or "")
