"""Unit tests of conformance.impl (loading "module:function" specs) and the plugin options."""
from __future__ import annotations

import sys
import textwrap

import pytest
import torch

from conformance import impl
from conformance.impl import ImplLoadError, build, env_defaults, load_callable, parse_spec, split_out_lse

pytest_plugins = ["pytester"]


# --- parse_spec ---------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, expected", [
    ("math:sqrt", ("math", "sqrt")),
    ("pkg.sub.mod:fn", ("pkg.sub.mod", "fn")),
    ("pkg.mod:Class.method", ("pkg.mod", "Class.method")),
    ("  math:sqrt  ", ("math", "sqrt")),
])
def test_parse_spec_accepts(spec, expected):
    assert parse_spec(spec) == expected


@pytest.mark.parametrize("spec", ["math", "math.sqrt", "a:b:c", ":fn", "mod:", "1mod:fn", "mod.:fn",
                                  "mod:fn()", "my-mod:fn", ""])
def test_parse_spec_rejects_bad_format(spec):
    with pytest.raises(ImplLoadError, match=r"expected 'package\.module:function'") as info:
        parse_spec(spec, "--nsa-cmp-impl")
    assert "--nsa-cmp-impl" in str(info.value)
    assert "e.g. --nsa-cmp-impl=my_nsa.api:nsa_attention" in str(info.value)


# --- load_callable ------------------------------------------------------------------------------

@pytest.fixture
def user_modules(tmp_path, monkeypatch):
    """A directory on sys.path with a few small user modules."""
    (tmp_path / "good_nsa.py").write_text(textwrap.dedent("""
        VALUE = 3
        def fn(*args, **kwargs):
            return "called"
        class Impl:
            @staticmethod
            def run(*args):
                return "method"
    """))
    (tmp_path / "needs_missing_dep.py").write_text("import surely_not_installed_pkg_xyz\n")
    (tmp_path / "raises_on_import.py").write_text("raise RuntimeError('no GPU here')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in ("good_nsa", "needs_missing_dep", "raises_on_import"):
        sys.modules.pop(name, None)


def test_load_callable_function_and_method(user_modules):
    assert load_callable("good_nsa:fn")() == "called"
    assert load_callable("good_nsa:Impl.run")() == "method"
    assert load_callable("math:sqrt")(9.0) == 3.0


def test_load_callable_module_not_found():
    with pytest.raises(ImplLoadError, match=r"module 'no_such_module_abc' not found.*PYTHONPATH"):
        load_callable("no_such_module_abc:fn")


def test_load_callable_missing_dependency_is_named(user_modules):
    with pytest.raises(ImplLoadError, match=r"dependency 'surely_not_installed_pkg_xyz' is not installed"):
        load_callable("needs_missing_dep:fn")


def test_load_callable_import_error_is_quoted(user_modules):
    with pytest.raises(ImplLoadError, match=r"importing 'raises_on_import' raised RuntimeError: no GPU here"):
        load_callable("raises_on_import:fn")


def test_load_callable_attribute_missing_lists_what_exists(user_modules):
    with pytest.raises(ImplLoadError, match=r"'good_nsa' has no attribute 'nsa_attention' \(it has: Impl, VALUE, fn\)"):
        load_callable("good_nsa:nsa_attention", "--nsa-impl")


def test_load_callable_not_callable(user_modules):
    with pytest.raises(ImplLoadError, match=r"good_nsa\.VALUE is a int, not callable"):
        load_callable("good_nsa:VALUE")


# --- build / calling conventions ----------------------------------------------------------------

def test_build_defaults_to_nsa_ref_with_backend():
    uut = build({}, backend="reference")
    assert uut.user_given == []
    assert uut.slots["cmp"].describe() == "nsa_ref.cmp_attention(backend='reference')"
    assert uut.slots["select"].describe() == "nsa_ref.select_blocks(backend='reference')"
    assert uut.slots["compress"].describe() == "nsa_ref.compress"
    assert uut.dtype is torch.float64
    lines = uut.describe()
    assert "nsa_ref (this project's reference)" in lines[0] and "device=cpu dtype=fp64" in lines[0]


def test_build_loads_user_specs_eagerly(user_modules):
    uut = build({"win": "good_nsa:fn"}, dtype="bf16")
    assert uut.user_given == ["win"]
    assert uut.dtype is torch.bfloat16
    assert "user implementation" in uut.describe()[0]
    assert any("win" in line and "good_nsa:fn" in line for line in uut.describe())
    with pytest.raises(ImplLoadError, match="--nsa-sel-impl='good_nsa:nope'"):
        build({"sel": "good_nsa:nope"})


def test_build_rejects_unknown_slot_and_dtype():
    with pytest.raises(ImplLoadError, match="unknown slot"):
        build({"attention": "math:sqrt"})
    with pytest.raises(ImplLoadError, match="--nsa-dtype='fp8'"):
        build({}, dtype="fp8")


def test_reference_slot_binds_backend(monkeypatch):
    import nsa_ref

    seen = {}

    def fake_win(q, k, v, cfg, cu_seqlens=None, backend="auto"):
        seen["backend"] = backend
        return q

    monkeypatch.setattr(nsa_ref, "win_attention", fake_win)
    uut = build({}, backend="sdpa")
    x = torch.zeros(2, 1, 1)
    assert uut.win(x, x, x, None) is x
    assert seen["backend"] == "sdpa"


def test_split_out_lse_conventions():
    out, lse = torch.zeros(2, 1, 3), torch.zeros(2, 1)
    assert split_out_lse(out) == (out, None)
    got = split_out_lse((out, lse))
    assert got[0] is out and got[1] is lse
    got = split_out_lse([out])
    assert got[0] is out and got[1] is None
    with pytest.raises(TypeError, match="expected a tensor out"):
        split_out_lse({"out": out})


def test_env_defaults_read_in_one_place():
    env = env_defaults({"NSA_CONFORMANCE_IMPL": "a:b", "NSA_CONFORMANCE_DEVICE": "cuda", "NSA_CONFORMANCE_WIN_IMPL": ""})
    assert env["nsa"] == "a:b" and env["device"] == "cuda"
    assert env["win"] is None and env["cmp"] is None
    assert set(env) == set(impl.ENV_VARS)


# --- the plugin, end to end (in-process pytest runs) --------------------------------------------

USER_IMPL = """
from conformance import brute

def my_win(q, k, v, cfg, cu_seqlens=None):
    return brute.win_attention(q, k, v, cfg, cu_seqlens)
"""

PROBE_TESTS = """
import pytest

def test_win_is_the_users(win_impl, impl_under_test):
    assert impl_under_test.slots["win"].spec == "my_user_impl:my_win"
    assert impl_under_test.slots["win"].resolve().__name__ == "my_win"

@pytest.mark.nsa_ref_only
def test_reference_only():
    pass
"""


def test_plugin_header_and_user_impl(pytester):
    pytester.makepyfile(my_user_impl=USER_IMPL, test_probe=PROBE_TESTS)
    pytester.syspathinsert()
    result = pytester.runpytest("-p", "conformance.plugin", "--nsa-win-impl=my_user_impl:my_win", "-rs")
    result.stdout.fnmatch_lines([
        "nsa-conformance: implementation under test: user implementation; device=cpu dtype=fp64",
        "*nsa*-> nsa_ref.nsa_attention(backend='auto')",
        "*win*-> my_user_impl:my_win",
        "*checks nsa_ref itself; a user implementation is under test (win)*",
    ])
    result.assert_outcomes(passed=1, skipped=1)


def test_plugin_env_fallback(pytester, monkeypatch):
    pytester.makepyfile(my_user_impl=USER_IMPL, test_probe=PROBE_TESTS)
    pytester.syspathinsert()
    monkeypatch.setenv("NSA_CONFORMANCE_WIN_IMPL", "my_user_impl:my_win")
    result = pytester.runpytest("-p", "conformance.plugin")
    result.assert_outcomes(passed=1, skipped=1)


def test_plugin_bad_spec_is_a_usage_error(pytester):
    pytester.makepyfile(test_probe=PROBE_TESTS)
    result = pytester.runpytest("-p", "conformance.plugin", "--nsa-impl=nowhere_pkg_q:nsa")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*nsa-conformance: --nsa-impl='nowhere_pkg_q:nsa': module 'nowhere_pkg_q' not found*"])


def test_plugin_backend_option_reaches_reference(pytester):
    pytester.makepyfile(test_probe="""
def test_backend(impl_under_test):
    assert impl_under_test.slots["sel"].backend == "reference"
""")
    result = pytester.runpytest("-p", "conformance.plugin", "--nsa-backend=reference")
    result.stdout.fnmatch_lines(["*sel*-> nsa_ref.sel_attention(backend='reference')"])
    result.assert_outcomes(passed=1)
