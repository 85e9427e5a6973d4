"""Every probe script runs as a file with CUDA absent, prints its verdict, and exits 0."""
from __future__ import annotations

import json
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

from probes_testkit import PROBE_NAMES, PROBES_DIR, PYTHON, cpu_env, probe_module


@pytest.fixture(scope="module")
def script_runs(tmp_path_factory):
    """Each script once (both providers, every variant), two at a time, from a directory outside
    the repository (a probe must find its imports from its own path)."""
    cwd = tmp_path_factory.mktemp("probe_cwd")

    def run(name):
        return name, subprocess.run([PYTHON, str(PROBES_DIR / f"{name}.py"), "--json"], cwd=cwd, env=cpu_env(),
                                    capture_output=True, text=True, timeout=120)

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(run, PROBE_NAMES))


@pytest.mark.parametrize("name", PROBE_NAMES)
def test_probe_script_without_cuda(name, script_runs):
    res = script_runs[name]
    assert res.returncode == 0, res.stderr[-2000:]
    out = res.stdout
    assert out.startswith("environment: ") and "torch" in out.splitlines()[0]
    mod = probe_module(name)
    results = [json.loads(line) for line in out.splitlines() if line.startswith("{") and '"stage": "result"' in line]
    runs = [(p, v) for p in mod.PROVIDERS for v in mod.VARIANTS]
    assert [(r["provider"], r["variant"]) for r in results] == runs
    for r in results:
        if r["outcome"] == "not_applicable":
            continue
        assert (r["outcome"], r["detail"]) == ("skipped", "no CUDA")
        assert r["inputs"] and r["call"] and r["env"]["cuda_available"] is False
        if r["provider"] not in getattr(mod, "EXPLORATORY", {}):
            assert set(mod.RULES) <= set(r["contract_strict"])
    assert out.count("no CUDA: kernel not run; contract verdict: ") == sum(r["outcome"] == "skipped" for r in results)
    assert "inputs:" in out and "call (" in out and "contract (strict)" in out
