"""Pytest plugin: GPU skipping and the implementation-under-test options.

Loaded by the repository's root ``conftest.py``; from elsewhere use
``pytest -p conformance.plugin --pyargs conformance``.

Options (each has an ``NSA_CONFORMANCE_*`` environment fallback, see ``conformance.impl``):

--nsa-impl=pkg.mod:fn          full NSA, ``fn(q, k, v, gates, cfg, cu_seqlens=None) -> out``
--nsa-cmp-impl=pkg.mod:fn      cmp branch, ``fn(q, k_cmp, v_cmp, cfg, cu_seqlens=None) -> out | (out, lse)``
--nsa-sel-impl=pkg.mod:fn      sel branch, ``fn(q, k, v, block_idx, cfg, cu_seqlens=None) -> out``
--nsa-win-impl=pkg.mod:fn      win branch, ``fn(q, k, v, cfg, cu_seqlens=None) -> out``
--nsa-select-impl=pkg.mod:fn   block selection, ``fn(q, k_cmp, cfg, cu_seqlens=None) -> block_idx``
--nsa-compress-impl=pkg.mod:fn compression, ``fn(x, cfg, cu_seqlens=None) -> x_cmp | (x_cmp, cu_cmp)``
--nsa-backend=NAME             backend for nsa_ref where no impl is given (default auto)
--nsa-device=DEV               device the implementation gets its tensors on (default cpu)
--nsa-dtype=fp64|fp32|bf16|fp16  dtype of those tensors (default fp64: exact comparisons)
--nsa-compute-dtype=fp32       the precision the implementation computes in (judges verdicts at it)
--nsa-capabilities=pkg.mod:OBJ a ``conformance.capabilities.Capabilities`` for every user slot
--nsa-cap KEY=VALUE            one capability field (repeatable), e.g. ``--nsa-cap backward=false``
--nsa-known-deviations=FILE    reviewed deviations of the implementation (strict xfails, see conformance.known_deviations)
--nsa-report=DIR               write the per-rule conformance report (report.md + report.json) to DIR

Tests outside what an implementation declares (``conformance.capabilities``) are reported as
"not applicable: <reason>" (a skip with that prefix), never as passed or failed; the terminal
summary counts applicable / passed / failed / not applicable, and per rule (``nsa_rule`` marks).
"""
from __future__ import annotations

import contextlib
import traceback

import pytest

from conformance.capabilities import NOT_APPLICABLE  # stdlib only: no torch at plugin import

#: Fixture name -> the implementation slot a test calls through it.
SLOT_FIXTURES = {"nsa_impl": "nsa", "cmp_impl": "cmp", "sel_impl": "sel", "win_impl": "win",
                 "select_impl": "select", "compress_impl": "compress"}

GPU_SKIP_REASON = (
    "GPU part skipped: no CUDA device on this machine. "
    "Run `python -m pytest -m gpu` on a machine with an NVIDIA GPU (sm80 or newer)."
)


def _cuda_available() -> bool:
    # torch.cuda.is_available() asks the driver without creating a CUDA context.
    import torch

    return torch.cuda.is_available()


def pytest_addoption(parser: pytest.Parser) -> None:
    from conformance.impl import DTYPES, ENV_VARS, IMPL_OPTIONS, env_defaults

    env = env_defaults()
    group = parser.getgroup("nsa-conformance", "NSA conformance: implementation under test")
    for slot, flag, what in IMPL_OPTIONS:
        group.addoption(
            flag, dest=f"nsa_{slot}_impl", metavar="MODULE:FUNCTION", default=env[slot],
            help=f"{what}. Default: nsa_ref's own (env {ENV_VARS[slot]})",
        )
    group.addoption(
        "--nsa-backend", dest="nsa_backend", default=env["backend"] or "auto",
        help="backend passed to nsa_ref where no implementation is given: auto, reference, sdpa, fa2 (default auto)",
    )
    group.addoption(
        "--nsa-device", dest="nsa_device", default=env["device"] or "cpu",
        help="device the implementation under test gets its tensors on (default cpu; e.g. cuda)",
    )
    group.addoption(
        "--nsa-dtype", dest="nsa_dtype", default=env["dtype"] or "fp64", choices=list(DTYPES),
        help="dtype of the inputs; fp64 (default) compares against the brute force almost exactly, "
        "lower precisions use the tolerances.yaml rule against a same-precision brute-force baseline",
    )
    group.addoption(
        "--nsa-compute-dtype", dest="nsa_compute_dtype", default=env["compute_dtype"], choices=list(DTYPES),
        help="precision the implementation under test computes in (e.g. fp32 for a kernel that upcasts fp64 "
        "inputs to fp32); verdicts use that tolerance row when it is coarser than --nsa-dtype",
    )
    group.addoption(
        "--nsa-capabilities", dest="nsa_capabilities", metavar="MODULE:OBJ", default=env["capabilities"],
        help="a conformance.capabilities.Capabilities object declaring what the implementation supports "
        "(default: the callable's own .capabilities attribute, else everything)",
    )
    group.addoption(
        "--nsa-cap", dest="nsa_cap", metavar="KEY=VALUE", action="append", default=[],
        help="override one capability field, repeatable: e.g. --nsa-cap tied_blocks=true --nsa-cap min_group=16 "
        "--nsa-cap backward=false (fields: see conformance/capabilities.py)",
    )
    group.addoption(
        "--nsa-known-deviations", dest="nsa_known_deviations", metavar="FILE", default=env["known_deviations"],
        help="YAML file of reviewed deviations of the implementation under test (rule, test globs, why, "
        "upstream link): matching tests become strict xfails, so CI stays green on known bugs and turns red "
        "when one is fixed (see conformance/known_deviations.py)",
    )
    group.addoption(
        "--nsa-report", dest="nsa_report", metavar="DIR", default=None,
        help="write the per-rule conformance report (report.md, report.json) into DIR",
    )


def pytest_configure(config: pytest.Config) -> None:
    # Registered here too, so the suite also runs outside this repository (no pyproject markers):
    # pytest -p conformance.plugin --pyargs conformance -m "not slow and not bench"
    for line in (
        "nsa_ref_only: checks nsa_ref itself (e.g. sdpa vs reference); skipped when a user implementation is under test",
        "slow: long-running; deselect with -m 'not slow'",
        "gpu: needs a CUDA GPU; skipped with a message where there is none",
        "bench: pytest-benchmark timing; deselect with -m 'not bench'",
    ):
        known = {m.split(":")[0].split("(")[0].strip() for m in config.getini("markers")}
        if line.split(":")[0] not in known:
            config.addinivalue_line("markers", line)
    config.addinivalue_line("markers", "nsa_rule(*ids): the NSA rule ids (conformance.nsa_rules) a test checks")
    config.addinivalue_line("markers", "nsa_needs(*features): optional capabilities a test needs "
                            "(varlen, empty_sequences, backward, decode, lse)")
    from conformance.capabilities import parse_cap_flags
    from conformance.impl import IMPL_OPTIONS, ImplLoadError, build

    specs = {slot: config.getoption(f"nsa_{slot}_impl", None) for slot, _, _ in IMPL_OPTIONS}
    device = config.getoption("nsa_device", "cpu")
    if str(device).startswith("cuda") and not _cuda_available():
        raise pytest.UsageError(f"--nsa-device={device}: no CUDA device on this machine")
    try:
        config._nsa_impl = build(
            specs,
            backend=config.getoption("nsa_backend", "auto"),
            device=device,
            dtype=config.getoption("nsa_dtype", "fp64"),
            capabilities=config.getoption("nsa_capabilities", None),
            cap_overrides=parse_cap_flags(config.getoption("nsa_cap", None) or []),
            compute_dtype=config.getoption("nsa_compute_dtype", None),
        )
    except (ImplLoadError, ValueError) as exc:
        raise pytest.UsageError(f"nsa-conformance: {exc}") from None
    config._nsa_outcomes = {}
    config._nsa_item_rules = {}
    from conformance.known_deviations import KnownDeviationsError, load

    path = config.getoption("nsa_known_deviations", None)
    try:
        config._nsa_known = load(path) if path else None
    except KnownDeviationsError as exc:
        raise pytest.UsageError(f"nsa-conformance: {exc}") from None


def pytest_report_header(config: pytest.Config) -> list[str]:
    impl = getattr(config, "_nsa_impl", None)
    return impl.describe() if impl is not None else []


@pytest.hookimpl(trylast=True)  # after -m/-k deselection, so the count is what is skipped
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    impl = getattr(config, "_nsa_impl", None)
    if impl is not None and impl.user_given:
        skip_ref = pytest.mark.skip(
            reason=f"checks nsa_ref itself; a user implementation is under test ({', '.join(impl.user_given)})"
        )
        for item in items:
            if item.get_closest_marker("nsa_ref_only") is not None:
                item.add_marker(skip_ref)

    if impl is not None:
        for item in items:
            reasons = applicability(item, impl)
            if reasons:
                item.add_marker(pytest.mark.skip(reason=NOT_APPLICABLE + "; ".join(reasons)))
    known = getattr(config, "_nsa_known", None)
    if known is not None:
        for item in items:
            entry = known.match(item.nodeid)
            if entry is not None:
                item.add_marker(pytest.mark.xfail(reason=entry.reason(), strict=True, raises=AssertionError))

    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    config._nsa_gpu_skipped = 0
    if not gpu_items or _cuda_available():
        return
    skip = pytest.mark.skip(reason=GPU_SKIP_REASON)
    for item in gpu_items:
        item.add_marker(skip)
    config._nsa_gpu_skipped = len(gpu_items)


def item_slots(item) -> list[str]:
    """Implementation slots a collected test calls: its slot fixtures, or its ``slot`` parameter."""
    slots = [SLOT_FIXTURES[name] for name in getattr(item, "fixturenames", ()) if name in SLOT_FIXTURES]
    params = getattr(getattr(item, "callspec", None), "params", {})
    if "slot" in params:
        slots.append(params["slot"])
    return list(dict.fromkeys(slots))


def item_rules(item) -> list[str]:
    """Rule ids a test declares with ``@pytest.mark.nsa_rule(...)`` (all marks, in order)."""
    ids: list[str] = []
    for mark in item.iter_markers("nsa_rule"):
        ids += [i for i in mark.args if i not in ids]
    return ids


def applicability(item, impl) -> list[str]:
    """Why a collected test is outside the implementation's declared space (empty: it applies).

    Judged from the test's slots, its ``case`` parameter (config, heads, dims, lengths) and its
    ``nsa_needs`` features; tests that build their case inside call
    ``conformance.applicable.require`` instead."""
    slots = item_slots(item)
    if not slots or not impl.user_given:
        return []
    params = getattr(getattr(item, "callspec", None), "params", {})
    case = params.get("case")
    if case is not None and not hasattr(case, "cfg_fields"):
        case = None
    features = [f for mark in item.iter_markers("nsa_needs") for f in mark.args]
    reasons: list[str] = []
    for slot in slots:
        if impl.slots[slot].is_reference:
            continue
        for reason in impl.not_applicable(slot, case, features):
            text = f"{slot}: {reason}"
            if text not in reasons:
                reasons.append(text)
    return reasons


def _outcome(report) -> tuple[str, str]:
    """(outcome, detail) of one test report: passed / failed / known deviation / not applicable / skipped."""
    if report.skipped and hasattr(report, "wasxfail"):
        return "known deviation", report.wasxfail
    if report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        return ("not applicable" if NOT_APPLICABLE in reason else "skipped"), reason.split("Skipped: ", 1)[-1]
    if report.failed:
        return "failed", str(report.longrepr)
    return "passed", ""


def _names_a_rule(exc: BaseException) -> bool:
    """The failure text already quotes a rule id (an exception group: every member does)."""
    from conformance.nsa_rules import ids_in

    members = getattr(exc, "exceptions", None)
    if members:
        return all(_names_a_rule(e) for e in members)
    return bool(ids_in(str(exc)))


def rule_named_error(exc: Exception, rule_ids: list[str]) -> AssertionError:
    """An exception that names no rule (the implementation raised, e.g. a bare ``assert`` inside
    it) as an AssertionError that starts with the test's rules and says where it was raised."""
    from conformance.nsa_rules import tag

    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (raised at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    text = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else "(no message)"
    return AssertionError(f"{' / '.join(tag(r) for r in rule_ids)}: the test raised "
                          f"{type(exc).__name__}: {text}{where}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    """Every failure of a rule-marked test that calls an implementation slot names its rules: an
    exception that does not (the implementation raised, a bare assert inside it) is re-raised as
    an AssertionError starting with the test's rule tags, the original chained below it."""
    outcome = yield
    exc = outcome.excinfo[1] if outcome.excinfo else None
    if not isinstance(exc, Exception) or not hasattr(outcome, "force_exception"):
        return  # passed, or a pytest outcome (skip / xfail), or a pluggy without force_exception
    rule_ids = item_rules(item)
    if not rule_ids or not item_slots(item) or _names_a_rule(exc):
        return
    new = rule_named_error(exc, rule_ids)
    new.__cause__ = exc
    outcome.force_exception(new)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Remember each test's outcome, rules and slots (the summary counts and the per-rule report).

    The call phase decides, or setup when it did not pass (a skip), or any phase that failed; a
    later failure (teardown) overrides an earlier pass."""
    report = (yield).get_result()
    config = item.config
    outcomes = getattr(config, "_nsa_outcomes", None)
    if outcomes is None:
        return
    config._nsa_item_rules[item.nodeid] = (item_rules(item), item_slots(item))
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed") or report.failed:
        outcome, detail = _outcome(report)
        previous = outcomes.get(item.nodeid)
        if previous is None or previous["outcome"] == "passed":
            outcomes[item.nodeid] = {"outcome": outcome, "detail": detail}


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    impl = getattr(config, "_nsa_impl", None)
    outcomes = getattr(config, "_nsa_outcomes", {}) or {}
    rules_of = getattr(config, "_nsa_item_rules", {}) or {}
    from conformance.rule_report import conformance_tests, suite_counts

    conf = conformance_tests(outcomes, rules_of, impl.user_given if impl is not None else None)
    if impl is not None and impl.user_given and conf:
        c = suite_counts(conf)
        known = f", {c['known deviation']} known deviation(s)" if c["known deviation"] else ""
        terminalreporter.write_line(
            f"nsa-conformance: {c['applicable']} applicable ({c['passed']} passed, {c['failed']} failed{known}), "
            f"{c['not applicable']} not applicable, {c['skipped']} skipped otherwise "
            f"[implementation under test: {', '.join(impl.user_given)}]")
    report_dir = config.getoption("nsa_report", None)
    if report_dir and impl is not None:
        from conformance.rule_report import write_report

        paths = write_report(report_dir, impl, outcomes, rules_of)
        terminalreporter.write_line(f"nsa-conformance: per-rule report -> {', '.join(str(p) for p in paths)}")
    skipped = getattr(config, "_nsa_gpu_skipped", 0)
    if skipped:
        terminalreporter.write_line(
            f"nsa-fa2: {skipped} GPU test(s) skipped (no CUDA). "
            "To run them: `python -m pytest -m gpu` on a CUDA machine."
        )


# --- fixtures: the implementation under test and where its tensors live ------------------------

@pytest.fixture(scope="session")
def impl_under_test(pytestconfig: pytest.Config):
    """The ``conformance.impl.ImplUnderTest`` built from the command line."""
    return pytestconfig._nsa_impl


@pytest.fixture(scope="session")
def nsa_impl(impl_under_test):
    """``f(q, k, v, gates, cfg, cu_seqlens=None) -> out (T, Hq, Dv)``."""
    return impl_under_test.nsa


@pytest.fixture(scope="session")
def cmp_impl(impl_under_test):
    """``f(q, k_cmp, v_cmp, cfg, cu_seqlens=None) -> (out (T, Hq, Dv), lse (T, Hq) or None)``."""
    return impl_under_test.cmp


@pytest.fixture(scope="session")
def sel_impl(impl_under_test):
    """``f(q, k, v, block_idx, cfg, cu_seqlens=None) -> out (T, Hq, Dv)``."""
    return impl_under_test.sel


@pytest.fixture(scope="session")
def win_impl(impl_under_test):
    """``f(q, k, v, cfg, cu_seqlens=None) -> out (T, Hq, Dv)``."""
    return impl_under_test.win


@pytest.fixture(scope="session")
def select_impl(impl_under_test):
    """``f(q, k_cmp, cfg, cu_seqlens=None) -> block_idx (T, Hkv, n_sel) int``."""
    return impl_under_test.select


@pytest.fixture(scope="session")
def compress_impl(impl_under_test):
    """``f(x, cfg, cu_seqlens=None) -> x_cmp (Tc, H, D)``."""
    return impl_under_test.compress


@contextlib.contextmanager
def _one_intra_op_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def one_cpu_thread():
    """One intra-op thread for one test, restored afterwards: tiny CPU tensors (and Triton's
    interpreter) gain nothing from more, and on a shared 2-core machine extra threads made a
    gradcheck 20x slower. Unit-test folders use it from an autouse fixture in their conftest."""
    with _one_intra_op_thread():
        yield


@pytest.fixture(scope="module")
def nsa_cpu_threads(impl_under_test):
    """One intra-op thread while a conformance module runs on the CPU, restored afterwards.

    The tensors here are tiny and the brute force loops per query; extra threads only add
    synchronisation, and on a shared machine (more runnable threads than cores) they made the
    brute force 5-10x slower. Use with ``pytestmark = pytest.mark.usefixtures("nsa_cpu_threads")``."""
    if impl_under_test.device != "cpu":
        yield
        return
    with _one_intra_op_thread():
        yield


@pytest.fixture(scope="session")
def nsa_device(impl_under_test) -> str:
    return impl_under_test.device


@pytest.fixture(scope="session")
def nsa_dtype(impl_under_test):
    """torch dtype of the inputs handed to the implementation under test."""
    return impl_under_test.dtype
