"""Shared by the probe tests: the probe modules, and an environment with CUDA hidden."""
from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROBES_DIR = REPO / "conformance" / "tools" / "probes"
PROBE_NAMES = sorted(p.stem for p in PROBES_DIR.glob("*.py") if p.stem not in {"__init__", "_common", "runner"})


def probe_module(name: str):
    return importlib.import_module(f"conformance.tools.probes.{name}")


def cpu_env() -> dict:
    """The current environment with every GPU hidden, so a probe never calls a kernel."""
    env = dict(os.environ)
    env["CUDA_VISIBLE_DEVICES"] = ""
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def probe_cases():
    """(module, provider, variant) for every probe run that builds a call (not 'not applicable')."""
    out = []
    for name in PROBE_NAMES:
        mod = probe_module(name)
        na = getattr(mod, "not_applicable", None)
        for provider in mod.PROVIDERS:
            for variant in mod.VARIANTS:
                if na and na(provider, variant):
                    continue
                out.append((mod, provider, variant))
    return out


PYTHON = sys.executable
