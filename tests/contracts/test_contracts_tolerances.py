"""contracts.tolerances: lookups, verdicts, and clear errors for bad tolerance files."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from contracts import tolerances
from contracts.tolerances import ToleranceFileError, ToleranceRule, Verdict, load, lookup

REPO_FILE = Path(tolerances.__file__).resolve().with_name("tolerances.yaml")  # root tolerances.yaml links here


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv(tolerances.ENV_VAR, raising=False)


def test_default_file_has_every_entry_with_a_source():
    table = load()
    assert table.path == str(REPO_FILE)
    for d in tolerances.DTYPES:
        for q in tolerances.QUANTITIES:
            rule = table.lookup(d, q)
            assert (rule.dtype, rule.quantity) == (d, q) and rule.source
    assert "flash-attn" in REPO_FILE.read_text() and "test_transformers" in REPO_FILE.read_text()


@pytest.mark.parametrize("dtype", [torch.bfloat16, "bf16", "bfloat16", "torch.bfloat16", " BF16 "])
def test_dtype_aliases(dtype):
    assert lookup(dtype, "out").dtype == "bf16"


def test_anchor_constants():
    out, dq = lookup(torch.float16, "out"), lookup("fp16", "dq")
    assert (out.m, out.c, out.floor) == (2.0, 1e-5, 1e-3)
    assert (dq.m, dq.c, dq.floor) == (3.0, 1e-5, 4e-3)
    assert lookup("double", "dv").floor == 2e-7 and lookup("float", "lse").c == 0.0


def test_unknown_dtype_or_quantity():
    with pytest.raises(ValueError, match="fp16/float16/half"):
        lookup(torch.int8, "out")
    with pytest.raises(ValueError, match="fp8"):
        lookup("fp8", "out")
    with pytest.raises(ValueError, match="out, lse, dq, dk, dv"):
        lookup("bf16", "dx")


def test_allowed_is_m_base_plus_c_with_floor():
    rule = ToleranceRule(dtype="bf16", quantity="out", m=2, c=1e-5, floor=1e-3, source="t")
    assert rule.allowed(1.6e-3) == pytest.approx(3.21e-3)
    assert rule.allowed(0.0) == 1e-3


def test_check_pass_and_fail_and_str():
    rule = ToleranceRule(dtype="bf16", quantity="out", m=2, c=1e-5, floor=1e-3, source="t")
    ref = torch.zeros(4, dtype=torch.float64)
    base = torch.tensor([0.0, 1.6e-3, 0.0, 0.0], dtype=torch.float64)
    ok = rule.check(torch.tensor([0.0, 3.1e-3, 0.0, 0.0]), ref, base)
    assert isinstance(ok, Verdict) and ok and ok.passed
    assert ok.err == pytest.approx(3.1e-3, rel=1e-6) and ok.base_err == pytest.approx(1.6e-3)
    assert str(ok) == "out bf16: max|x-ref| = 3.1e-03 <= 2 * 1.6e-03 + 1e-05 = 3.2e-03 (pass)"
    bad = rule.check(torch.tensor([0.0, 4e-3, 0.0, 0.0]), ref, base)
    assert not bad and str(bad).endswith("(FAIL)") and " > " in str(bad)
    floored = rule.check(torch.full((4,), 5e-4), ref, ref)
    assert floored and "floor 0.001" in str(floored)


def test_check_compares_low_precision_in_fp64():
    torch.manual_seed(0)
    ref = torch.randn(256, dtype=torch.float64)
    base = ref.to(torch.bfloat16)
    verdict = lookup("bf16", "out").check(base, ref, base)
    assert verdict and verdict.err == verdict.base_err > 0


def test_non_finite_values():
    rule = lookup("fp16", "lse")
    ref = torch.tensor([0.0, 1.0, -math.inf], dtype=torch.float64)
    good = rule.check(torch.tensor([0.0, 1.0, -math.inf]), ref, ref)
    assert good and good.n_nonfinite == 0
    nan_out = rule.check(torch.tensor([math.nan, 1.0, -math.inf]), ref, ref)
    assert not nan_out and nan_out.n_nonfinite == 1 and "non-finite" in str(nan_out)
    wrong_inf = rule.check(torch.tensor([0.0, 1.0, math.inf]), ref, ref)
    assert not wrong_inf and wrong_inf.n_nonfinite == 1
    # A non-finite baseline does not make the bound infinite.
    loose = rule.check(torch.tensor([0.5, 1.0, -math.inf]), ref, torch.tensor([math.inf, 1.0, -math.inf]))
    assert not loose


def test_check_shape_mismatch():
    with pytest.raises(ValueError, match="shapes differ"):
        lookup("fp32", "out").check(torch.zeros(3), torch.zeros(4), torch.zeros(4))


def test_empty_tensors_pass():
    assert lookup("fp32", "dq").check(torch.zeros(0), torch.zeros(0), torch.zeros(0))


def _write(tmp_path, data, name="t.yaml"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def _valid_data():
    return yaml.safe_load(REPO_FILE.read_text())


def test_malformed_yaml_names_the_file(tmp_path):
    path = _write(tmp_path, "rules: [unclosed\n")
    with pytest.raises(ToleranceFileError, match="t.yaml.*not valid YAML"):
        load(path)


def test_missing_file(tmp_path):
    with pytest.raises(ToleranceFileError, match="nope.yaml"):
        load(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda d: d["rules"]["bf16"]["out"].update(m=-1), "rules.bf16.out.m"),
        (lambda d: d["rules"]["bf16"]["dq"].update(c="small"), "rules.bf16.dq.c"),
        (lambda d: d["rules"]["fp16"]["out"].update(atol=1), "rules.fp16.out.atol"),
        (lambda d: d["rules"]["fp16"]["out"].pop("source"), "rules.fp16.out.source"),
        (lambda d: d["rules"].update(fp8=d["rules"]["fp16"]), "rules.fp8"),
        (lambda d: d["rules"]["fp32"].pop("lse"), "rules.fp32.lse"),
        (lambda d: d.update(version=2), "version"),
    ],
)
def test_wrong_fields_are_named(tmp_path, mutate, field):
    data = _valid_data()
    mutate(data)
    path = _write(tmp_path, data)
    with pytest.raises(ToleranceFileError) as info:
        load(path)
    assert str(path) in str(info.value) and field in str(info.value)


def test_top_level_not_a_mapping(tmp_path):
    with pytest.raises(ToleranceFileError, match="t.yaml"):
        load(_write(tmp_path, "- 1\n- 2\n"))


def test_env_overrides_default_path(tmp_path, monkeypatch):
    data = _valid_data()
    data["rules"]["bf16"]["out"]["m"] = 7.0
    path = _write(tmp_path, data, "mine.yaml")
    monkeypatch.setenv(tolerances.ENV_VAR, str(path))
    assert load().path == str(path)
    assert lookup("bf16", "out").m == 7.0
    monkeypatch.delenv(tolerances.ENV_VAR)
    assert lookup("bf16", "out").m == 2.0


def test_head_dim_overrides(tmp_path):
    data = _valid_data()
    data["rules"]["bf16"]["dq"]["by_head_dim"] = [{"max_head_dim": 64, "m": 4.0, "c": 0.0, "floor": 0.0, "source": "x"}]
    table = load(_write(tmp_path, data))
    assert lookup("bf16", "dq", head_dim=64, table=table).m == 4.0
    assert lookup("bf16", "dq", head_dim=128, table=table).m == 3.0
    assert lookup("bf16", "dq", table=table).m == 3.0
