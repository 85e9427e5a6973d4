"""``nsa-fa2``: the environment, the conformance check, the timing sweep and the probes, one command.

    nsa-fa2 env [--json]                  GPU, driver, CUDA, torch, FA-2 providers, NSA_* settings
    nsa-fa2 check [--quick] [--impl MODULE:FUNCTION] [--nsa-dtype D] [--nsa-device DEV]
                  [--nsa-compute-dtype D] [--nsa-cap KEY=VALUE] [--nsa-known-deviations FILE] [-k EXPR] [--out DIR] [-- PYTEST_ARGS...]
                                          run the conformance suite, write a Markdown + JSON report
                                          and the per-rule report (DIR/rules/report.md + .json)
    nsa-fa2 bench [bench options]         the timing sweep (conformance.tools.bench; needs CUDA)
    nsa-fa2 repro NAME [ARGS...]          run conformance/tools/probes/NAME.py in its own process
    nsa-fa2 repro --list                  the probes there are

The same as ``python -m conformance ...``. Exit codes: 0 all good; 1 ``check`` found failures or
errors; 2 bad input (unknown subcommand or probe, bad --out, bad --impl); otherwise the exit code of
pytest, the sweep or the probe (128 + N when a child process was killed by signal N).
"""
from __future__ import annotations

import argparse
import ast
import codecs
import datetime as _dt
import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence
from conformance.tools.subprocesses import signal_name, stop_group

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
PYTEST_NO_TESTS = 5  # pytest's exit code when nothing was selected

#: ``--quick``: the by-hand checks of the brute force plus a few whole-NSA properties (CPU), and
#: the full NSA plus packed sequences with empty ones through both providers (GPU).
QUICK_CPU = "test_brute or one_hot or do_not_leak or empty_rows_exactly_zero"
QUICK_GPU = "test_full_nsa_through_router or test_packed_sequences_with_empty_ones"

GPU_HOW = (
    "on a machine with an NVIDIA GPU (sm80 or newer) run `nsa-fa2 check` (it adds the `-m gpu` part), "
    "or `python -m pytest conformance -m gpu`; `bash conformance/tools/device/gpu_run.sh pytest` also "
    "records env.json and the parity verdicts for artifacts/"
)

_PROBE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class CLIError(Exception):
    """Bad input or an environment problem; printed as one line, exit code ``code``."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


def suite_dir() -> Path:
    """The conformance package directory (the suite ``check`` runs by default)."""
    return Path(__file__).resolve().parents[1]


def repo_root() -> Path:
    """The directory holding the contracts, nsa_ref and conformance packages."""
    return suite_dir().parent


def probes_dir() -> Path:
    """Where ``repro`` looks for probe scripts."""
    return suite_dir() / "probes"


def _say(text: str = "") -> None:
    print(text, flush=True)


def _child_env() -> dict[str, str]:
    """The environment for child processes: ours, unbuffered, with the repository importable."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    root = str(repo_root())
    parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if root not in parts:
        env["PYTHONPATH"] = os.pathsep.join([root, *parts])
    return env


def _show(cmd: Sequence[str]) -> str:
    """A command line to read or paste, with the interpreter path shortened to ``python``."""
    return shlex.join(["python", *cmd[1:]] if cmd and cmd[0] == sys.executable else list(cmd))


# --- env -----------------------------------------------------------------------------------------

def _providers(cuda: bool) -> dict[str, dict[str, Any]]:
    from nsa_ref.fa2 import PROVIDERS

    found: dict[str, dict[str, Any]] = {}
    for name, prov in PROVIDERS.items():
        try:
            usable = bool(prov.is_available())
        except Exception as exc:  # a broken install must not break `env`
            usable, why = False, f"{type(exc).__name__}: {exc}"
        else:
            why = ""
        version = prov.version()
        if not usable and not why:
            if version == "not installed":
                why = "package not installed"
            elif not cuda:
                why = "no CUDA device"
            else:
                why = "not usable on this build"
        found[name] = {"usable": usable, "version": version, "why_not": why}
    return found


def _nsa_settings() -> dict[str, Any]:
    from nsa_ref.settings import NSASettings

    try:
        return NSASettings().model_dump()
    except Exception as exc:  # pydantic ValidationError: say which variable is wrong
        return {"error": f"invalid NSA_* environment: {' '.join(str(exc).split())}"}


def environment() -> dict[str, Any]:
    """``conformance.tools.envinfo.collect()`` plus the FA-2 providers and the effective NSA_* settings."""
    from conformance.tools import envinfo

    info = envinfo.collect()
    info["providers"] = _providers(bool(info.get("cuda_available")))
    info["nsa_settings"] = _nsa_settings()
    try:
        import contracts

        info["contract_mode"] = contracts.contract_mode()
    except ValueError as exc:
        info["contract_mode"] = f"invalid: {exc}"
    return info


def env_table(info: dict[str, Any]) -> str:
    """A two-column text table of ``environment()``."""
    rows: list[tuple[str, str]] = []
    for key, value in info.items():
        if key == "providers":
            for name, p in value.items():
                state = f"usable, {p['version']}" if p["usable"] else f"not usable: {p['why_not']} ({p['version']})"
                if p["version"] == "not installed":
                    state = "not installed"
                rows.append((f"provider {name}", state))
        elif key == "nsa_settings":
            if "error" in value:
                rows.append(("NSA_* settings", value["error"]))
            else:
                rows += [(f"NSA_{name.upper()}", str(v)) for name, v in value.items()]
        else:
            rows.append((key, str(value)))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def cmd_env(args: argparse.Namespace) -> int:
    info = environment()
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        print(env_table(info))
    return EXIT_OK


# --- check: run pytest, read its JUnit XML, write the report --------------------------------------

@dataclass
class Phase:
    """One pytest run of the check."""

    name: str
    marker: str | None
    keyword: str | None
    command: list[str] = field(default_factory=list)
    returncode: int | None = None
    duration_s: float = 0.0
    junit: str = ""
    log: str = ""
    note: str = ""


def _combine_k(*exprs: str | None) -> str | None:
    parts = [e for e in exprs if e]
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else " and ".join(f"({e})" for e in parts)


def plan_phases(cuda: bool, quick: bool, keyword: str | None) -> list[Phase]:
    """The pytest runs for this machine.

    CPU: one run with the suite's default selection; the GPU tests are collected and skipped by
    the plugin, so they show up in the report with the reason. CUDA: the non-GPU tests, then
    ``-m gpu``.
    """
    if cuda:
        return [
            Phase("cpu", "not gpu and not slow and not bench", _combine_k(QUICK_CPU if quick else None, keyword)),
            Phase("gpu", "gpu", _combine_k(QUICK_GPU if quick else None, keyword)),
        ]
    quick_k = f"{QUICK_CPU} or {QUICK_GPU}" if quick else None
    return [Phase("cpu", None, _combine_k(quick_k, keyword))]


def pytest_command(phase: Phase, target: Path, junit: Path, impl: str | None, extra: Sequence[str], *,
                   report_dir: Path | None = None, nsa_flags: Sequence[str] = ()) -> list[str]:
    """The pytest command line of one phase: selection, the per-rule report directory, the
    implementation flags (``nsa_flags``, then ``--nsa-impl``), then the user's own pytest args."""
    cmd = [sys.executable, "-m", "pytest", str(target), "-q", "-p", "conformance.plugin", f"--junitxml={junit}"]
    if phase.marker:
        cmd += ["-m", phase.marker]
    if phase.keyword:
        cmd += ["-k", phase.keyword]
    if report_dir is not None:
        cmd.append(f"--nsa-report={report_dir}")
    cmd += list(nsa_flags)
    if impl:
        cmd.append(f"--nsa-impl={impl}")
    return cmd + list(extra)


def nsa_flags(args: argparse.Namespace) -> list[str]:
    """The implementation options of ``check`` as the plugin's pytest flags."""
    flags = [f"--{name.replace('_', '-')}={getattr(args, name)}"
             for name in ("nsa_dtype", "nsa_device", "nsa_compute_dtype", "nsa_known_deviations")
             if getattr(args, name, None)]
    return flags + [f"--nsa-cap={cap}" for cap in getattr(args, "nsa_cap", None) or []]


def validate_nsa_flags(args: argparse.Namespace) -> None:
    """Refuse bad ``--impl`` / dtype / ``--nsa-cap`` values before any pytest run starts."""
    from conformance.capabilities import ANYTHING, parse_cap_flags
    from conformance.impl import DTYPES, ImplLoadError, load_callable

    if args.impl:
        try:
            load_callable(args.impl, "--impl")  # fail here with the reason, not inside pytest
        except ImplLoadError as exc:
            raise CLIError(str(exc)) from None
    for name in ("nsa_dtype", "nsa_compute_dtype"):
        value = getattr(args, name, None)
        if value is not None and value not in DTYPES:
            raise CLIError(f"--{name.replace('_', '-')}={value}: expected one of {', '.join(DTYPES)}")
    try:
        ANYTHING.with_overrides(parse_cap_flags(args.nsa_cap or []))
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    if getattr(args, "nsa_known_deviations", None):
        from conformance.known_deviations import KnownDeviationsError, load

        try:
            load(args.nsa_known_deviations)
        except KnownDeviationsError as exc:
            raise CLIError(str(exc)) from None


# --- the per-rule report of the check ------------------------------------------------------------------

RULES_DIR = "rules"


def rule_report_dirs(out: Path, phases: list[Phase]) -> dict[str, Path]:
    """Where each phase writes its per-rule report: ``out/rules`` for a single run, else
    ``out/rules/<phase>`` (merged into ``out/rules`` afterwards). Stale reports are removed."""
    rules = out / RULES_DIR
    dirs = {ph.name: rules if len(phases) == 1 else rules / ph.name for ph in phases}
    for folder in {rules, *dirs.values()}:
        for name in ("report.json", "report.md"):
            (folder / name).unlink(missing_ok=True)  # never show a previous run's verdicts
    return dirs


def collect_rule_report(out: Path, dirs: dict[str, Path]) -> dict[str, Any]:
    """Merge the phases' per-rule reports into ``out/rules`` and summarize it for check_report."""
    from conformance import rule_report

    found = [json.loads((d / "report.json").read_text(encoding="utf-8"))
             for d in dirs.values() if (d / "report.json").exists()]
    rules = out / RULES_DIR
    summary: dict[str, Any] = {"dir": RULES_DIR, "markdown": f"{RULES_DIR}/report.md",
                               "json": f"{RULES_DIR}/report.json"}
    if not found:
        return {**summary, "written": False, "why": "no pytest run wrote a per-rule report (see the logs)"}
    report = rule_report.merge_reports(found)
    if len(dirs) > 1:  # a single run wrote its report into out/rules itself
        rule_report.write_files(rules, report)
    missing = [name for name, d in dirs.items() if not (d / "report.json").exists()]
    return {**summary, "written": True, "rule_counts": report["rule_counts"], "totals": report["totals"],
            "failed_rules": [r["id"] for r in report["rules"] if r["status"] == "failed"],
            "phases_missing": missing}


def _pump(stream, sinks) -> None:
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for chunk in iter(lambda: os.read(stream.fileno(), 4096), b""):
        for sink in sinks:
            sink(chunk, decoder)


def run_streaming(cmd: list[str], log_path: Path, *, echo: bool, timeout: float | None) -> tuple[int, float, str]:
    """Run ``cmd``, copy its output to ``log_path`` (and to stdout when ``echo``) as it comes.

    Returns (exit code, seconds, note). Killed by signal N: 128 + N. Past ``timeout``: the
    process group is terminated and 124 is returned.
    """
    start = time.monotonic()
    note = ""
    with open(log_path, "wb") as log:
        def to_log(chunk, _decoder):
            log.write(chunk)

        def to_stdout(chunk, decoder):
            sys.stdout.write(decoder.decode(chunk))
            sys.stdout.flush()

        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=_child_env(),
                                start_new_session=True)
        reader = threading.Thread(target=_pump, args=(proc.stdout, [to_log] + ([to_stdout] if echo else [])),
                                  daemon=True)
        reader.start()
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop_group(proc)
            rc, note = 124, f"timed out after {timeout:g} s; the process group was terminated"
        except KeyboardInterrupt:
            stop_group(proc)
            raise
        reader.join(timeout=10)
    if rc < 0:
        note = f"killed by {signal_name(rc)}" + _where_it_died(log_path)
        rc = 128 - rc
    return rc, time.monotonic() - start, note


_FAULT_FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+) in (?P<fn>test\w*)')


def _where_it_died(log_path: Path) -> str:
    """' in test_x (path:line)' from the faulthandler dump pytest writes on a fatal signal, or ''."""
    try:
        text = log_path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    start = text.find("Fatal Python error")
    match = _FAULT_FRAME.search(text, max(start, 0))
    return f" in {match['fn']} ({match['file']}:{match['line']})" if match else ""




def parse_junit(path: Path) -> list[dict[str, Any]]:
    """One dict per testcase: test, outcome (passed|failed|error|skipped), message, details."""
    cases = []
    for tc in ET.parse(path).iter("testcase"):
        name = tc.get("name", "?")
        classname = tc.get("classname", "")
        case = {"test": f"{classname}::{name}" if classname else name, "outcome": "passed",
                "message": "", "details": "", "time_s": float(tc.get("time") or 0.0)}
        for tag, outcome in (("failure", "failed"), ("error", "error"), ("skipped", "skipped")):
            node = tc.find(tag)
            if node is not None:
                case["outcome"] = outcome
                case["message"] = (node.get("message") or "").strip()
                case["details"] = (node.text or "").strip()
                if outcome == "skipped" and node.get("type") == "pytest.xfail":
                    case["outcome"] = "xfailed"
                break
        cases.append(case)
    return cases


def _tail(text: str, limit: int = 3000) -> str:
    return text if len(text) <= limit else "...\n" + text[-limit:]


def build_report(env: dict[str, Any], phases: list[Phase], cases_by_phase: dict[str, list[dict]],
                 options: dict[str, Any], cuda: bool, started: str, duration_s: float,
                 rule_report: dict[str, Any] | None = None) -> dict[str, Any]:
    """The check's outcome as one JSON-able dict (the Markdown is rendered from it);
    ``rule_report`` is ``collect_rule_report``'s summary of the per-rule report."""
    counts = {"tests": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0, "xfailed": 0}
    key = {"passed": "passed", "failed": "failed", "error": "errors", "skipped": "skipped", "xfailed": "xfailed"}
    failures, skips = [], {}
    phase_rows = []
    for ph in phases:
        cases = cases_by_phase.get(ph.name, [])
        pc = {k: 0 for k in counts}
        for c in cases:
            pc["tests"] += 1
            pc[key[c["outcome"]]] += 1
            if c["outcome"] in ("failed", "error"):
                failures.append({"phase": ph.name, "test": c["test"], "kind": c["outcome"],
                                 "message": c["message"], "details": _tail(c["details"])})
            elif c["outcome"] == "skipped":
                reason = c["message"] or "(no reason given)"
                entry = skips.setdefault(reason, {"reason": reason, "count": 0, "examples": []})
                entry["count"] += 1
                if len(entry["examples"]) < 3:
                    entry["examples"].append(c["test"])
        for k in counts:
            counts[k] += pc[k]
        phase_rows.append({"name": ph.name, "command": ph.command, "returncode": ph.returncode,
                           "duration_s": round(ph.duration_s, 2), "junit": ph.junit, "log": ph.log,
                           "note": ph.note, "counts": pc})
    not_run = []
    if not cuda:
        not_run.append({"part": "GPU parity (`-m gpu`: FA-2 fast paths on both providers vs the fp64 reference)",
                        "why": "no CUDA device on this machine (torch.cuda.is_available() is False)",
                        "how": GPU_HOW})
    problems = [f"{p['name']}: pytest exit code {p['returncode']}" + (f" ({p['note']})" if p["note"] else "")
                for p in phase_rows if p["returncode"] not in (0, 1, PYTEST_NO_TESTS)]
    if counts["failed"] or counts["errors"]:
        status, exit_code = "failed", EXIT_FAILED
    elif problems:
        status = "error"
        exit_code = next(p["returncode"] for p in phase_rows if p["returncode"] not in (0, 1, PYTEST_NO_TESTS))
    elif any(p["returncode"] == 1 for p in phase_rows):
        # pytest said "failed" but the JUnit file holds no failure (e.g. it was not written).
        status, exit_code = "error", EXIT_FAILED
        problems.append("pytest reported failures that the JUnit XML does not show; see the logs")
    elif counts["tests"] == 0:
        status, exit_code = "no tests", PYTEST_NO_TESTS
        problems.append("no test was selected (check -k / --quick / --target)")
    else:
        status, exit_code = "passed", EXIT_OK
    return {
        "tool": "nsa-fa2 check",
        "status": status,
        "exit_code": exit_code,
        "started": started,
        "duration_s": round(duration_s, 2),
        "options": options,
        "environment": env,
        "counts": counts,
        "phases": phase_rows,
        "failures": failures,
        "skipped": sorted(skips.values(), key=lambda s: -s["count"]),
        "not_run": not_run,
        "problems": problems,
        "rule_report": rule_report,
    }


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _rule_report_md(summary: dict[str, Any] | None) -> list[str]:
    """The check report's pointer to the per-rule report (rule -> passed / failed / not applicable)."""
    if summary is None:
        return []
    lines = ["", "## Per-rule report", ""]
    if not summary.get("written"):
        return lines + [f"Not written: {summary.get('why', 'unknown reason')}."]
    rc, t = summary["rule_counts"], summary["totals"]
    fraction = "n/a" if t["applicable_fraction"] is None else f"{100 * t['applicable_fraction']:.1f}%"
    lines += [f"[`{summary['markdown']}`]({summary['markdown']}) (and `{summary['json']}`): each NSA rule "
              "(Documentation/nsa_conformance_rules.md) as passed / failed / not applicable / not tested, with "
              "the first failing example of each failed rule and a command that reproduces it.", "",
              f"Rules: {rc['failed']} failed, {rc['passed']} passed, {rc['not applicable']} not applicable, "
              f"{rc['not tested']} not tested. Conformance tests: {t['applicable']} applicable "
              f"({t['passed']} passed, {t['failed']} failed), {t['not applicable']} not applicable "
              f"(applicable fraction {fraction})."]
    if summary["failed_rules"]:
        lines += ["", "Failed rules: " + ", ".join(f"`{r}`" for r in summary["failed_rules"]) + "."]
    if summary.get("phases_missing"):
        missing = ", ".join(summary["phases_missing"])
        lines += ["", f"Runs that wrote no per-rule report (see their logs): {missing}."]
    return lines


def render_markdown(report: dict[str, Any]) -> str:
    """The human report: status, environment, counts, failures, skips, what did not run and how to run it."""
    from conformance.tools.report import env_table as artifact_env_table

    c = report["counts"]
    lines = [
        "# nsa-fa2 check",
        "",
        f"**{report['status'].upper()}**: {c['passed']} passed, {c['failed']} failed, {c['errors']} errors, "
        f"{c['skipped']} skipped" + (f", {c['xfailed']} xfailed" if c["xfailed"] else "")
        + f" ({c['tests']} tests) in {report['duration_s']:.1f} s; started {report['started']}.",
        "",
        "Options: " + (", ".join(f"`{k}={v}`" for k, v in report["options"].items()
                                if v not in (None, False, [], "")) or "defaults") + ".",
        "",
        "## Environment",
        "",
        artifact_env_table(report["environment"]).rstrip(),
        f"| cuda_available | {report['environment'].get('cuda_available')} |",
    ]
    for name, p in report["environment"].get("providers", {}).items():
        state = f"usable, {p['version']}" if p["usable"] else f"not usable ({p['why_not']})"
        lines.append(f"| provider {name} | {_md_escape(state)} |")
    lines += ["", "## Runs", "", "| part | passed | failed | errors | skipped | exit code | seconds | command |",
              "|---|---|---|---|---|---|---|---|"]
    for p in report["phases"]:
        pc = p["counts"]
        rc = f"{p['returncode']}" + (f" ({p['note']})" if p["note"] else "")
        cmd = _show(p["command"])
        lines.append(f"| {p['name']} | {pc['passed']} | {pc['failed']} | {pc['errors']} | {pc['skipped']} | "
                     f"{_md_escape(rc)} | {p['duration_s']:.1f} | `{_md_escape(cmd)}` |")
    if report["problems"]:
        lines += ["", "## Problems", ""] + [f"- {p}" for p in report["problems"]]
    lines += ["", f"## Failures ({len(report['failures'])})", ""]
    if not report["failures"]:
        lines.append("None.")
    for f in report["failures"]:
        lines += [f"### {f['kind']}: `{f['test']}` ({f['phase']})", "", f"{_md_escape(f['message']) or '(no message)'}", ""]
        if f["details"]:
            lines += ["```text", f["details"], "```", ""]
    lines += ["", f"## Skipped ({c['skipped']})", ""]
    if not report["skipped"]:
        lines.append("None.")
    for s in report["skipped"]:
        lines.append(f"- {s['count']} x {_md_escape(s['reason'])} (e.g. `{s['examples'][0]}`)")
    lines += _rule_report_md(report.get("rule_report"))
    lines += ["", "## Not run here", ""]
    if not report["not_run"]:
        lines.append("Nothing: every part of the suite ran on this machine.")
    for n in report["not_run"]:
        lines.append(f"- **{n['part']}**: {n['why']}. How to run it: {n['how']}.")
    lines += ["", "Logs and JUnit XML of each run lie next to this file.", ""]
    return "\n".join(lines)


def _prepare_out(out: str | None) -> Path:
    path = Path(out) if out else Path("artifacts") / _dt.date.today().isoformat() / "check"
    if path.exists() and not path.is_dir():
        raise CLIError(f"--out {path}: exists and is not a directory; give a directory for the reports")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".nsa-fa2-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise CLIError(f"--out {path}: cannot write reports there ({exc.strerror or exc})") from None
    return path


def cmd_check(args: argparse.Namespace) -> int:
    import torch

    validate_nsa_flags(args)
    target = Path(args.target) if args.target else suite_dir()
    if not target.exists():
        raise CLIError(f"--target {target}: no such file or directory")
    out = _prepare_out(args.out)
    cuda = torch.cuda.is_available()
    phases = plan_phases(cuda, args.quick, args.k)
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    t0 = time.monotonic()
    _say(f"nsa-fa2 check: {len(phases)} pytest run(s) on {'CUDA' if cuda else 'CPU only (GPU parts are skipped)'}"
         f"; reports -> {out}")
    cases_by_phase: dict[str, list[dict]] = {}
    report_dirs = rule_report_dirs(out, phases)
    for i, ph in enumerate(phases, 1):
        junit, log = out / f"junit_{ph.name}.xml", out / f"pytest_{ph.name}.log"
        if junit.exists():
            junit.unlink()  # never read a previous run's results
        ph.command = pytest_command(ph, target.resolve(), junit.resolve(), args.impl, args.pytest_args,
                                    report_dir=report_dirs[ph.name].resolve(), nsa_flags=nsa_flags(args))
        ph.junit, ph.log = junit.name, log.name
        _say(f"[{i}/{len(phases)}] {ph.name} part: {_show(ph.command)}")
        ph.returncode, ph.duration_s, ph.note = run_streaming(ph.command, log, echo=not args.quiet,
                                                             timeout=args.timeout)
        try:
            cases_by_phase[ph.name] = parse_junit(junit) if junit.exists() else []
        except ET.ParseError as exc:
            cases_by_phase[ph.name] = []
            ph.note = (ph.note + "; " if ph.note else "") + f"unreadable JUnit XML ({exc})"
        if not junit.exists():
            ph.note = (ph.note + "; " if ph.note else "") + "no JUnit XML written (see the log)"
        done = cases_by_phase[ph.name]
        _say(f"[{i}/{len(phases)}] {ph.name} part done in {ph.duration_s:.1f} s: exit code {ph.returncode}, "
             f"{len(done)} tests" + (f" ({ph.note})" if ph.note else ""))
    env = environment()
    options = {"quick": args.quick, "impl": args.impl, "k": args.k, "target": str(target),
               "pytest_args": list(args.pytest_args), "nsa_dtype": args.nsa_dtype, "nsa_device": args.nsa_device,
               "nsa_compute_dtype": args.nsa_compute_dtype, "nsa_cap": list(args.nsa_cap or []),
               "nsa_known_deviations": args.nsa_known_deviations}
    rules = collect_rule_report(out, report_dirs)
    report = build_report(env, phases, cases_by_phase, options, cuda, started, time.monotonic() - t0, rules)
    (out / "env.json").write_text(json.dumps(env, indent=2, default=str) + "\n", encoding="utf-8")
    (out / "check_report.json").write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    (out / "check_report.md").write_text(render_markdown(report), encoding="utf-8")
    c = report["counts"]
    _say(f"nsa-fa2 check: {report['status']}: {c['passed']} passed, {c['failed']} failed, {c['errors']} errors, "
         f"{c['skipped']} skipped in {report['duration_s']:.1f} s")
    for problem in report["problems"]:
        _say(f"  problem: {problem}")
    for n in report["not_run"]:
        _say(f"  not run here: {n['part']}: {n['why']}")
    _say(f"  report: {out / 'check_report.md'} and {out / 'check_report.json'}")
    if rules["written"]:
        rc = rules["rule_counts"]
        _say(f"  per-rule report: {out / rules['markdown']} ({rc['failed']} rules failed, {rc['passed']} passed, "
             f"{rc['not applicable']} not applicable, {rc['not tested']} not tested)")
    return report["exit_code"]


# --- repro: one probe script in its own process ----------------------------------------------------

def list_probes(folder: Path | None = None) -> list[tuple[str, str]]:
    """(name, first line of its docstring) for each ``*.py`` probe, without importing any of them."""
    folder = probes_dir() if folder is None else folder
    found = []
    for path in sorted(folder.glob("*.py")):
        if path.name.startswith("_"):
            continue
        try:
            doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
            summary = doc.strip().splitlines()[0] if doc.strip() else "(no description)"
        except (SyntaxError, UnicodeDecodeError, OSError) as exc:
            summary = f"(cannot read: {type(exc).__name__})"
        found.append((path.stem, summary))
    return found


def _probe_listing(folder: Path) -> str:
    probes = list_probes(folder)
    if not probes:
        return f"no probes in {folder} yet"
    width = max(len(n) for n, _ in probes)
    return "available probes:\n" + "\n".join(f"  {n.ljust(width)}  {s}" for n, s in probes)


def cmd_repro(args: argparse.Namespace) -> int:
    folder = probes_dir()
    if not folder.is_dir():
        raise CLIError(
            f"{folder} is not there yet: the probes (one script per FA-2 crash or corruption) are being "
            "written in another change; update your checkout, then `nsa-fa2 repro --list`"
        )
    if args.list or not args.name:
        print(_probe_listing(folder))
        return EXIT_OK if args.list else EXIT_USAGE
    name = args.name[:-3] if args.name.endswith(".py") else args.name
    path = folder / f"{name}.py"
    if not _PROBE_NAME.match(name) or name.startswith("_") or not path.is_file():
        print(f"nsa-fa2 repro: unknown probe {args.name!r}\n{_probe_listing(folder)}", file=sys.stderr)
        return EXIT_USAGE
    cmd = [sys.executable, str(path), *args.probe_args]
    _say(f"nsa-fa2 repro: running {path} in its own process")
    start = time.monotonic()
    rc = subprocess.call(cmd, env=_child_env())
    elapsed = time.monotonic() - start
    if rc < 0:
        _say(f"nsa-fa2 repro: probe {name} was killed by {signal_name(rc)} after {elapsed:.1f} s "
             "(a crash: the probe's docstring says whether that is the one it reproduces)")
        return 128 - rc
    _say(f"nsa-fa2 repro: probe {name} exited with {rc} after {elapsed:.1f} s")
    return rc


# --- parser and entry point --------------------------------------------------------------------------

def _cmd_bench_placeholder(args: argparse.Namespace) -> int:  # pragma: no cover - dispatched in main()
    raise AssertionError("bench is dispatched before parsing")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nsa-fa2",
        description="FA-2 inside NSA: environment, conformance check, timing sweep, crash/corruption probes.",
        epilog="Documentation: Documentation/Architecture/FA2_Integration_Guide_for_NSA.md (runbook), "
        "Documentation/Troubleshooting_FA2.md, Documentation/Rollout.md.",
    )
    try:
        from importlib.metadata import version

        pkg_version = version("nsa-fa2-conformance")
    except Exception:
        pkg_version = "unknown"
    parser.add_argument("--version", action="version", version=f"nsa-fa2 {pkg_version}")
    sub = parser.add_subparsers(dest="command", metavar="{env,check,bench,repro}")

    p_env = sub.add_parser("env", help="GPU, driver, CUDA, torch, FA-2 providers and versions, NSA_* settings")
    p_env.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p_env.set_defaults(func=cmd_env)

    p_check = sub.add_parser(
        "check", help="run the conformance suite here (CPU or GPU) and write a Markdown + JSON report",
        description="Run the conformance suite with pytest in a subprocess (plus the `-m gpu` part when "
        "CUDA is present) and write check_report.md / check_report.json, env.json, the JUnit XML and "
        "the pytest log of each run. Exit code 1 when a test failed.",
        epilog="Arguments after `--` go to pytest unchanged, e.g. `nsa-fa2 check -- -x --maxfail=3`.",
    )
    p_check.add_argument("--quick", action="store_true",
                         help="a small selection: by-hand checks of the brute force and a few NSA properties "
                         "(plus a few GPU cases on CUDA)")
    p_check.add_argument("--impl", metavar="MODULE:FUNCTION",
                         help="your NSA implementation, forwarded as --nsa-impl (fn(q, k, v, gates, cfg, cu_seqlens=None))")
    p_check.add_argument("--nsa-dtype", metavar="DTYPE",
                         help="input dtype for the implementation: fp64 (default), fp32, bf16, fp16")
    p_check.add_argument("--nsa-device", metavar="DEV",
                         help="device the implementation gets its tensors on (e.g. cuda)")
    p_check.add_argument("--nsa-compute-dtype", metavar="DTYPE",
                         help="precision the implementation computes in (verdicts use that tolerance row)")
    p_check.add_argument("--nsa-cap", metavar="KEY=VALUE", action="append", default=[],
                         help="one declared capability field, repeatable (e.g. --nsa-cap backward=false)")
    p_check.add_argument("--nsa-known-deviations", metavar="FILE",
                         help="reviewed deviations of the implementation (YAML; strict xfails, see "
                         "conformance/known_deviations.py)")
    p_check.add_argument("-k", metavar="EXPR", help="pytest -k expression, combined with --quick by 'and'")
    p_check.add_argument("--out", metavar="DIR", help="report directory (default artifacts/<today>/check)")
    p_check.add_argument("--target", metavar="PATH", help="tests to run (default: the conformance suite)")
    p_check.add_argument("--timeout", type=float, metavar="SECONDS",
                         help="stop a pytest run after this long (its process group is terminated)")
    p_check.add_argument("-q", "--quiet", action="store_true", help="do not echo pytest's output, only the summary")
    p_check.add_argument("pytest_args", nargs="*", metavar="-- PYTEST_ARGS", help=argparse.SUPPRESS)
    p_check.set_defaults(func=cmd_check)

    p_bench = sub.add_parser("bench", add_help=False,
                             help="timing sweep (conformance.tools.bench); `nsa-fa2 bench --help` for its options")
    p_bench.set_defaults(func=_cmd_bench_placeholder)

    p_repro = sub.add_parser("repro", help="run one probe script conformance/tools/probes/NAME.py in its own process",
                             description="Run conformance/tools/probes/NAME.py with this interpreter in a new process, "
                             "so a crash it reproduces (SIGFPE, illegal memory access) cannot take this one down.")
    p_repro.add_argument("name", nargs="?", metavar="NAME", help="probe name (file name without .py)")
    p_repro.add_argument("--list", action="store_true", help="list the available probes")
    p_repro.add_argument("probe_args", nargs=argparse.REMAINDER, metavar="ARGS", help="passed to the probe")
    p_repro.set_defaults(func=cmd_repro)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``nsa-fa2`` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":  # its own argparse: `nsa-fa2 bench --help` shows the sweep's options
        from conformance.tools import bench

        try:
            return int(bench.main(argv[1:]) or 0)
        except SystemExit as exc:
            return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or argparse's own usage error (code 2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return args.func(args)
    except CLIError as exc:
        print(f"nsa-fa2 {args.command}: error: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print(f"nsa-fa2 {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
