"""Which optional packages (flash_attn, triton) this process can import, and their versions: asked
once per package and process. The answers cannot change while the process runs, and routing asks
on every branch call: a ``find_spec`` costs about 50 us, a package-metadata read 0.3-1.5 ms (the
H200 host profile of ``nsa_attention``, artifacts/2026-12-04/prefill_profile_h200)."""
from __future__ import annotations

import functools
import importlib.metadata
import importlib.util


@functools.lru_cache(maxsize=None)
def installed(module: str) -> bool:
    """Whether ``module`` can be imported (found on sys.path; not imported here)."""
    return importlib.util.find_spec(module) is not None


@functools.lru_cache(maxsize=None)
def version(dist: str) -> str | None:
    """The installed distribution's version, or None when it is not installed."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None
