"""GPU: differential fuzzing of the FA-2 contract against both providers' kernels (conformance.tools.fuzz).

    python -m pytest conformance/test_fuzz_gpu.py -m gpu -q                           # ci profile, ~1 min
    NSA_FUZZ_PROFILE=device python -m pytest conformance/test_fuzz_gpu.py -m gpu -q   # >= 2000 cases, ~5 min

Properties: every call the contract accepts runs, is finite and within contracts.tolerances of the
float64 reference (no unexplained false accept); every kernel error, crash, hang or corruption was
rejected. False rejects are listed, not failed (each names its rule, for a justification or a fix).
NSA_FUZZ_OUT=dir writes fuzz.json and fuzz.md there. NSA_REQUIRE_PROVIDERS=flash_attn,torch turns
a missing provider into a failure.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu


def _providers() -> list[str]:
    from conformance.tools.probes._common import BOTH, provider_usable

    required = [p for p in os.environ.get("NSA_REQUIRE_PROVIDERS", "").split(",") if p]
    usable = [p for p in BOTH if provider_usable(p) is None]
    missing = [p for p in required if p not in usable]
    if missing:
        pytest.fail(f"provider(s) {missing} required (NSA_REQUIRE_PROVIDERS) but not usable")
    if not usable:
        pytest.skip("no FA-2 provider usable here")
    return usable


def test_contract_against_the_kernels():
    from conformance.tools import fuzz
    from conformance.tools.envinfo import collect

    profile = fuzz.profile_from_env()
    summary, records = fuzz.run_fuzz(profile, _providers())
    md = fuzz.markdown(summary, collect())
    print(md)
    out = os.environ.get("NSA_FUZZ_OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "fuzz.json").write_text(json.dumps({"summary": summary, "records": records}, indent=1, default=str))
        (Path(out) / "fuzz.md").write_text(md)
    total = summary["total"]
    assert total["ran"] > 0, "no case reached the kernel"
    if profile.name == "device":
        assert total["cases"] >= 2000, f"only {total['cases']} cases generated"
    false_accepts = summary["false_accepts"]
    assert not false_accepts, "the contract accepted calls the kernel got wrong:\n" + "\n".join(
        f"{fa['label']} -> {fa['outcome']}: {fa['detail']}" for fa in false_accepts[:20])
