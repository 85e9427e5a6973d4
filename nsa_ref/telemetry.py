"""Counters of which path each NSA branch took and why, plus optional timing and SDPA audits.

    >>> from nsa_ref import telemetry
    >>> telemetry.reset(); telemetry.record("win", "sdpa", "inputs on cpu")
    >>> telemetry.snapshot()["counts"]
    {('win', 'sdpa', 'inputs on cpu'): 1}
"""
from __future__ import annotations

import logging
import threading
from collections import Counter
from contextlib import contextmanager
from typing import Iterator

log = logging.getLogger("nsa_ref")


def _compiling() -> bool:
    import torch

    return torch.compiler.is_compiling()

_lock = threading.Lock()
_counts: Counter[tuple[str, str, str]] = Counter()
_audits: list[dict] = []
_timings: list[dict] = []


def record(branch: str, path: str, reason: str) -> None:
    """Count one call of `branch` that ran on `path` for `reason`. Not inside a graph that
    torch.compile traces: the graph replays without Python, so a count there would be one per
    compilation, not per call (and the lock would break the graph)."""
    if _compiling():
        return
    with _lock:
        _counts[(branch, path, reason)] += 1


def record_audit(branch: str, path: str, max_abs_diff: float, rows: int) -> None:
    """Keep the difference between a fast path and SDPA on a sample of rows."""
    with _lock:
        _audits.append({"branch": branch, "path": path, "max_abs_diff": max_abs_diff, "rows": rows})
    log.info("nsa audit %s/%s: max|fast - sdpa| = %.3e over %d rows", branch, path, max_abs_diff, rows)


def snapshot() -> dict:
    """A copy of everything recorded: counts, per-path fractions per branch, audits, timings."""
    with _lock:
        counts = dict(_counts)
        audits = list(_audits)
        timings = list(_timings)
    totals: Counter[str] = Counter()
    per_path: Counter[tuple[str, str]] = Counter()
    for (branch, path, _), n in counts.items():
        totals[branch] += n
        per_path[(branch, path)] += n
    fractions = {key: n / totals[key[0]] for key, n in per_path.items()}
    return {"counts": counts, "path_fractions": fractions, "audits": audits, "timings": timings}


def reset() -> None:
    """Forget everything recorded so far."""
    with _lock:
        _counts.clear()
        _audits.clear()
        _timings.clear()


@contextmanager
def timed(branch: str, path: str, q, enabled: bool) -> Iterator[None]:
    """Log path, shape and dtype of one branch call; on CUDA also its CUDA-event time in ms. Not
    inside a graph torch.compile traces (as ``record``): a time there would be the trace's, and the
    lock and events would break the graph (settings read eagerly with NSA_DEBUG_TIMING=1 stand in
    a later trace)."""
    if not enabled or _compiling():
        yield
        return
    import torch

    use_cuda = q.is_cuda
    if use_cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    yield
    ms = None
    if use_cuda:
        end.record()
        end.synchronize()
        ms = start.elapsed_time(end)
    entry = {"branch": branch, "path": path, "shape": tuple(q.shape), "dtype": str(q.dtype), "ms": ms}
    with _lock:
        _timings.append(entry)
    log.info(
        "nsa %s via %s: q%s %s%s",
        branch, path, tuple(q.shape), q.dtype, "" if ms is None else f" {ms:.3f} ms",
    )
