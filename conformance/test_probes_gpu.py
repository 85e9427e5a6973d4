"""GPU: run every crash/corruption probe through the runner; every class gets a classified outcome and
every kernel failure (crash, CUDA error, corruption, clean error, hang) is rejected by the contract.

    python -m pytest conformance/test_probes_gpu.py -m gpu -q      (about 1-3 minutes on an H100)

NSA_PROBES_OUT=dir keeps fa2_probes.json / fa2_probes.md there (default: a temporary folder);
NSA_PROBES_JOBS (default 4) probes run at once, each in its own process.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu

REPO = Path(__file__).resolve().parents[1]
from conformance.tools.probes._common import KERNEL_FAILURES


@pytest.fixture(scope="module")
def probe_report(tmp_path_factory):
    out = Path(os.environ.get("NSA_PROBES_OUT") or tmp_path_factory.mktemp("fa2_harden"))
    cmd = [sys.executable, "-m", "conformance.tools.probes.runner", "--out", str(out),
           "--jobs", os.environ.get("NSA_PROBES_JOBS", "4"), "--timeout", "300"]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800)
    print(res.stdout[-6000:])
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads((out / "fa2_probes.json").read_text())


def test_every_probe_run_has_a_classified_outcome(probe_report):
    from conformance.tools.probes.runner import discover

    expected = {(i.name, p, v) for i in discover() for p in i.providers for v in i.variants}
    got = {(r["probe"], r["provider"], r["variant"]) for r in probe_report["results"]}
    assert got == expected
    unclassified = [(r["probe"], r["provider"], r["variant"], r["detail"]) for r in probe_report["results"]
                    if r["outcome"] == "probe_error"]
    assert not unclassified, unclassified
    assert probe_report["env"]["cuda_available"]
    no_cuda = [r for r in probe_report["results"] if r["outcome"] == "skipped" and r["detail"] == "no CUDA"]
    assert not no_cuda, "the probes did not see the GPU"


def test_every_kernel_failure_was_rejected_by_the_contract(probe_report):
    unsound = [f"{r['probe']}[{r['variant']}] {r['provider']}: {r['outcome']} -- {r['detail']}"
               for r in probe_report["results"] if r["outcome"] in KERNEL_FAILURES and not r["contract_strict"]]
    assert not unsound, "kernel failures the contract accepted:\n" + "\n".join(unsound)


def test_expected_rules_fire_on_the_gpu_inputs(probe_report):
    missing = [f"{r['probe']} {r['provider']}: {sorted(set(r['expected_rules']) - set(r['contract_strict']))}"
               for r in probe_report["results"]
               if r["outcome"] != "not_applicable" and not set(r["expected_rules"]) <= set(r["contract_strict"])]
    assert not missing, missing
