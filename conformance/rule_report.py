"""The per-rule conformance report: every NSA rule -> passed / failed / not applicable / not tested.

Written by the pytest plugin when ``--nsa-report=DIR`` is given (``nsa-fa2 check`` always gives
it), from what the plugin recorded during the run:

- ``outcomes``: nodeid -> ``{"outcome": "passed" | "failed" | "not applicable" | "skipped",
  "detail": failure text or skip reason}``;
- ``rules_of``: nodeid -> ``(rule ids of its nsa_rule marks, implementation slots it calls)``.

Only tests that call an implementation slot count (nsa_ref's own checks do not). A test counts
for every rule it is marked with; a failing test also counts against every rule its message
quotes as ``[NSA-...]``. A rule is **failed** when any of its tests failed, **passed** when at
least one applied and all of those passed, **not applicable** when every test of it was outside
the declared capabilities, **not tested** otherwise (no test ran, or all were skipped for other
reasons, e.g. no GPU).

``report.json`` (stable: sorted keys, rules in catalog order) and ``report.md`` (a table, then
each failed rule's first failure with a copy-paste repro, then the not-applicable reasons, then
the applicable share of each test function's cases).

Reports of several runs of one implementation (e.g. shards of one suite run in parallel) merge
into one: ``python -m conformance.rule_report merge OUT_DIR IN_DIR...``.
"""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any, Iterable, Mapping

from conformance.capabilities import NOT_APPLICABLE
from conformance.nsa_rules import RULES, ids_in

STATUSES = ("failed", "known deviation", "passed", "not applicable", "not tested")
#: Per-test outcome kinds counted per rule (the plugin's outcome strings).
OUTCOMES = ("passed", "failed", "known deviation", "not applicable", "skipped")
MAX_REASONS = 5
MAX_MESSAGE = 400
RULES_DOC = "Documentation/nsa_conformance_rules.md"

_E_LINE = re.compile(r"^E\s+(.*\S)\s*$", re.M)


# --- reading one test's record ---------------------------------------------------------------------

def error_lines(detail: str) -> list[str]:
    """The ``E   ...`` lines of a pytest failure text (the exception and its notes), or, when the
    text has none (e.g. ``--tb=line``), its non-empty lines."""
    found = _E_LINE.findall(detail or "")
    return found or [line.strip() for line in (detail or "").splitlines() if line.strip()]


def failure_message(detail: str, limit: int = MAX_MESSAGE) -> str:
    """The one-line message of a failure: its first exception line without the ``AssertionError: ``
    prefix, trimmed to ``limit`` characters."""
    lines = error_lines(detail)
    if not lines:
        return "(no message)"
    first = next((ln for ln in lines if re.match(r"^[\w.]+(Error|Exception|Failed)\b.*:", ln)), lines[0])
    first = first.removeprefix("AssertionError: ")
    return first if len(first) <= limit else first[: limit - 3] + "..."


def failure_rules(detail: str) -> list[str]:
    """Rule ids a failure message quotes as ``[NSA-...]`` (only in its exception lines, never in
    the source lines of the traceback)."""
    return ids_in("\n".join(error_lines(detail)))


def not_applicable_reasons(detail: str) -> list[str]:
    """``"not applicable: win: a; win: b"`` -> ``["win: a", "win: b"]``."""
    text = (detail or "").split(NOT_APPLICABLE, 1)[-1].strip()
    return [part.strip() for part in text.split("; ") if part.strip()]


# --- the repro command -------------------------------------------------------------------------------

def _slot_flag(slot: str) -> str:
    from conformance.impl import IMPL_OPTIONS

    return {name: flag for name, flag, _ in IMPL_OPTIONS}[slot]


def _cap_text(value: Any) -> str:
    """A capability value as ``--nsa-cap`` parses it back (``(1, 2)`` -> ``1,2``, True -> ``true``)."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def cap_flags(impl) -> list[str]:
    """``--nsa-cap KEY=VALUE`` for every capability field a user slot runs with that its callable
    does not declare itself (what ``--nsa-cap``, ``--nsa-compute-dtype`` or ``--nsa-capabilities``
    changed), so a repro judges, and draws hypothesis examples, in the same space."""
    import dataclasses

    from conformance.capabilities import ANYTHING, declared

    changed: dict[str, Any] = {}
    for name in impl.user_given:
        used = impl.capabilities(name)
        try:
            own = declared(impl.slots[name].resolve(), impl.device) or ANYTHING
        except Exception:  # a callable that cannot be loaded here: every field counts as given
            own = ANYTHING
        for f in dataclasses.fields(used):
            if f.compare and getattr(used, f.name) != getattr(own, f.name):
                changed.setdefault(f.name, getattr(used, f.name))
    return [f"--nsa-cap={key}={_cap_text(value)}" for key, value in sorted(changed.items())]


def impl_flags(impl) -> list[str]:
    """The pytest flags that select ``impl`` (``conformance.impl.ImplUnderTest``) again: each user
    slot's ``--nsa-*-impl``, the backend of nsa_ref's slots when not ``auto``, device, dtype, and
    the capability fields given on the command line."""
    flags = [f"{_slot_flag(name)}={slot.spec}" for name, slot in impl.slots.items() if not slot.is_reference]
    backends = {slot.backend for slot in impl.slots.values() if slot.is_reference}
    if backends - {"auto"}:
        flags.append(f"--nsa-backend={sorted(backends)[0]}")
    return flags + [f"--nsa-device={impl.device}", f"--nsa-dtype={impl.dtype_name}", *cap_flags(impl)]


def repro_command(nodeid: str, flags: Iterable[str]) -> str:
    """``python -m pytest '<nodeid>' <flags>``, quoted for a POSIX shell."""
    return shlex.join(["python", "-m", "pytest", nodeid, *flags])


# --- tallying -----------------------------------------------------------------------------------------

def _empty_rule(rule_id: str) -> dict[str, Any]:
    r = RULES[rule_id]
    return {"id": r.id, "title": r.title, "slots": list(r.slots), "counts": dict.fromkeys(OUTCOMES, 0),
            "failures_naming_rule": 0, "first_failure": None, "reasons": []}


def conformance_tests(outcomes: Mapping[str, dict], rules_of: Mapping[str, tuple],
                      slots=None) -> dict[str, dict]:
    """The outcomes of tests that call an implementation slot (nsa_ref's own checks left out);
    with ``slots`` (the user-given ones), only tests that call at least one of them: a test of
    nsa_ref's win slot says nothing about a user's nsa."""
    wanted = set(slots) if slots else None
    out = {}
    for nodeid, entry in outcomes.items():
        called = set(rules_of.get(nodeid, ((), ()))[1])
        if called and (wanted is None or called & wanted):
            out[nodeid] = entry
    return out


def _rules_of_test(nodeid: str, entry: dict, rules_of: Mapping[str, tuple]) -> list[str]:
    """The rules a test outcome counts for: its marks; for a failure whose message names rules,
    exactly those (a window failure of a test marked NSA-WIN and NSA-SCALE says nothing about
    the scale)."""
    marked = list(rules_of.get(nodeid, ((), ()))[0])
    if entry["outcome"] == "known deviation":  # the reviewed entry names its rule: "known deviation [NSA-..]"
        quoted = ids_in(entry.get("detail", ""))
    else:
        quoted = failure_rules(entry.get("detail", "")) if entry["outcome"] == "failed" else []
    return quoted if quoted else marked


def _note_failure(row: dict, nodeid: str, detail: str, flags: list[str]) -> None:
    """Count a failure of ``row``'s rule; its example is the first failure whose message names the
    rule, else the first failure (a test marked with the rule whose message names another)."""
    names = row["id"] in failure_rules(detail)
    row["failures_naming_rule"] += names
    first = row["first_failure"]
    if first is None or (names and not first["names_rule"]):
        row["first_failure"] = {"test": nodeid, "message": failure_message(detail), "names_rule": names,
                                "repro": repro_command(nodeid, flags)}


def tally(tests: Mapping[str, dict], rules_of: Mapping[str, tuple], flags: list[str]) -> tuple[dict, list, list]:
    """(rule id -> counts, first failure, reasons; failing tests naming no rule; unknown rule ids)."""
    rows = {rule_id: _empty_rule(rule_id) for rule_id in RULES}
    unattributed, unknown = [], set()
    for nodeid, entry in tests.items():
        outcome = entry["outcome"]
        ids = _rules_of_test(nodeid, entry, rules_of)
        unknown.update(i for i in ids if i not in RULES)
        ids = [i for i in ids if i in RULES]
        if outcome == "failed" and not ids:
            unattributed.append(nodeid)
        for rule_id in ids:
            row = rows[rule_id]
            row["counts"][outcome] += 1
            if outcome == "failed":
                _note_failure(row, nodeid, entry.get("detail", ""), flags)
            elif outcome == "not applicable":
                new = not_applicable_reasons(entry.get("detail", ""))
                row["reasons"] += [r for r in new if r not in row["reasons"]]
    return rows, unattributed, sorted(unknown)


def rule_status(counts: Mapping[str, int]) -> str:
    """failed > known deviation > passed > not applicable > not tested, from one rule's counts."""
    if counts["failed"]:
        return "failed"
    if counts.get("known deviation"):
        return "known deviation"
    if counts["passed"]:
        return "passed"
    if counts["not applicable"]:
        return "not applicable"
    return "not tested"


def _finish_rule(row: dict) -> dict:
    """Status and the shown reasons (at most MAX_REASONS, plus how many distinct there were)."""
    reasons = row.pop("reasons")
    row["status"] = rule_status(row["counts"])
    row["not_applicable_reasons"] = reasons[:MAX_REASONS]
    row["not_applicable_reasons_total"] = len(reasons)
    return row


def suite_counts(outcomes: dict) -> dict[str, int]:
    """{applicable, passed, failed, known deviation, not applicable, skipped} over recorded
    conformance outcomes (a known deviation is applicable: it ran and missed, as recorded)."""
    counts = {"applicable": 0, "passed": 0, "failed": 0, "known deviation": 0, "not applicable": 0, "skipped": 0}
    for entry in outcomes.values():
        counts[entry["outcome"]] += 1
        if entry["outcome"] in ("passed", "failed", "known deviation"):
            counts["applicable"] += 1
    return counts


def totals(tests: Mapping[str, dict]) -> dict[str, Any]:
    """Applicable / passed / failed / not applicable / skipped over the conformance tests, and the
    applicable fraction (applicable / (applicable + not applicable); None when both are 0)."""
    counts = suite_counts(tests)
    judged = counts["applicable"] + counts["not applicable"]
    counts["tests"] = len(tests)
    counts["applicable_fraction"] = round(counts["applicable"] / judged, 4) if judged else None
    return counts


def by_test(tests: Mapping[str, dict]) -> dict[str, dict[str, int]]:
    """Per test function (``file::name``, parameters dropped): how many of its cases applied and how
    many were not applicable. The measure behind "a test applies to an implementation": a function
    whose grid lies mostly outside the declared space judges little of it."""
    out: dict[str, dict[str, int]] = {}
    for nodeid, entry in tests.items():
        row = out.setdefault(nodeid.split("[", 1)[0], {"applicable": 0, "not applicable": 0})
        if entry["outcome"] in ("passed", "failed", "known deviation"):
            row["applicable"] += 1
        elif entry["outcome"] == "not applicable":
            row["not applicable"] += 1
    return dict(sorted(out.items()))


def _rule_counts(rules: list[dict]) -> dict[str, int]:
    return {status: sum(r["status"] == status for r in rules) for status in STATUSES}


# --- the report ----------------------------------------------------------------------------------------

def _header(impl) -> dict[str, Any]:
    return {
        "implementation": impl.describe(),
        "user_slots": list(impl.user_given),
        "device": impl.device,
        "dtype": impl.dtype_name,
        "capabilities": {slot: impl.capabilities(slot).summary() for slot in impl.user_given},
        "flags": impl_flags(impl),
    }


def build_rule_report(impl, outcomes: Mapping[str, dict], rules_of: Mapping[str, tuple]) -> dict[str, Any]:
    """The per-rule report of one pytest run as a JSON-able dict (``report.md`` is rendered from it)."""
    header = _header(impl)
    tests = conformance_tests(outcomes, rules_of, impl.user_given)
    rows, unattributed, unknown = tally(tests, rules_of, header["flags"])
    rules = [_finish_rule(rows[rule_id]) for rule_id in RULES]
    return {"tool": "nsa-conformance rule report", "rules_doc": RULES_DOC, **header, "totals": totals(tests),
            "rule_counts": _rule_counts(rules), "rules": rules, "unattributed_failures": unattributed,
            "unknown_rule_ids": unknown, "by_test": by_test(tests)}


def merge_reports(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """One report from several runs of the same implementation (e.g. the CPU and GPU parts of
    ``nsa-fa2 check``): counts add up, a rule's first failure is the earliest run's."""
    if not reports:
        raise ValueError("merge_reports needs at least one report")
    merged = json.loads(json.dumps(reports[0]))
    for other in reports[1:]:
        for key in ("passed", "failed", "known deviation", "not applicable", "skipped", "applicable", "tests"):
            merged["totals"][key] += other["totals"][key]
        for row, more in zip(merged["rules"], other["rules"]):
            for key in OUTCOMES:
                row["counts"][key] += more["counts"][key]
            first, other_first = row["first_failure"], more["first_failure"]
            if first is None or (other_first and other_first["names_rule"] and not first["names_rule"]):
                row["first_failure"] = other_first
            row["failures_naming_rule"] += more["failures_naming_rule"]
            reasons = list(dict.fromkeys(row["not_applicable_reasons"] + more["not_applicable_reasons"]))
            row["not_applicable_reasons"] = reasons[:MAX_REASONS]
            row["not_applicable_reasons_total"] = max(len(reasons), row["not_applicable_reasons_total"],
                                                      more["not_applicable_reasons_total"])
            row["status"] = rule_status(row["counts"])
        for name, more in other.get("by_test", {}).items():
            row = merged.setdefault("by_test", {}).setdefault(name, {"applicable": 0, "not applicable": 0})
            for key in row:
                row[key] += more[key]
        merged["unattributed_failures"] += other["unattributed_failures"]
        merged["unknown_rule_ids"] = sorted(set(merged["unknown_rule_ids"]) | set(other["unknown_rule_ids"]))
    t = merged["totals"]
    judged = t["applicable"] + t["not applicable"]
    t["applicable_fraction"] = round(t["applicable"] / judged, 4) if judged else None
    merged["rule_counts"] = _rule_counts(merged["rules"])
    if "by_test" in merged:
        merged["by_test"] = dict(sorted(merged["by_test"].items()))
    return merged


# --- Markdown -------------------------------------------------------------------------------------------

def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _totals_line(t: dict) -> str:
    fraction = "n/a" if t["applicable_fraction"] is None else f"{100 * t['applicable_fraction']:.1f}%"
    known = f", {t['known deviation']} known deviation(s)" if t.get("known deviation") else ""
    return (f"**{t['applicable']} applicable** ({t['passed']} passed, {t['failed']} failed{known}), "
            f"{t['not applicable']} not applicable, {t['skipped']} skipped otherwise; "
            f"applicable fraction {fraction} ({t['applicable']} of {t['applicable'] + t['not applicable']}).")


def _header_md(report: dict) -> list[str]:
    caps = [f"- `{slot}`: " + (", ".join(f"`{c}`" for c in summary) or "nothing declared (the whole suite applies)")
            for slot, summary in report["capabilities"].items()]
    rc = report["rule_counts"]
    return [
        "# NSA conformance: per-rule report", "",
        f"Rules: `{report['rules_doc']}` (what each id means and how to comply).", "",
        "Implementation under test:", "", "```text", *report["implementation"], "```", "",
        f"Device `{report['device']}`, input dtype `{report['dtype']}`.", "",
        "Declared capabilities:" if caps else "Declared capabilities: none (no user slot; nsa_ref under test).",
        *([""] + caps if caps else []), "",
        _totals_line(report["totals"]), "",
        "Rules: " + ", ".join(f"{rc[s]} {s}" for s in STATUSES) + ".", "",
    ]


def _table_md(report: dict) -> list[str]:
    lines = ["| rule | title | status | passed | failed | known deviation | n/a |",
             "|---|---|---|---|---|---|---|"]
    for r in report["rules"]:
        status = f"**{r['status']}**" if r["status"] in ("failed", "known deviation") else r["status"]
        c = r["counts"]
        lines.append(f"| `{r['id']}` | {_cell(r['title'])} | {status} | {c['passed']} | {c['failed']} | "
                     f"{c.get('known deviation', 0)} | {c['not applicable']} |")
    return lines + [""]


def _failure_intro(r: dict) -> str:
    """The line above a failed rule's example: how many tests failed (and, when not all of them
    name this rule in their message, how many do) and which one the example is."""
    failed, naming, first = r["counts"]["failed"], r["failures_naming_rule"], r["first_failure"]
    if naming == failed:
        return f"{failed} failing test(s); the first: `{first['test']}`"
    return (f"{failed} failing test(s), {naming} of them naming this rule in their message (the others are "
            f"marked with it but their message names another rule); the first{' naming it' if naming else ''}: "
            f"`{first['test']}`")


def _failures_md(report: dict) -> list[str]:
    failed = [r for r in report["rules"] if r["status"] == "failed"]
    lines = [f"## Failures ({len(failed)} rules)", ""]
    if not failed:
        lines += ["None.", ""]
    for r in failed:
        f = r["first_failure"]
        lines += [f"### `{r['id']}`: {r['title']}", "",
                  _failure_intro(r), "",
                  "```text", f["message"], "```", "", "Repro:", "", "```bash", f["repro"], "```", ""]
    if report["unattributed_failures"]:
        lines += ["Failing tests whose marks and message name no rule (a suite bug: every failure should "
                  "name one):", ""] + [f"- `{n}`" for n in report["unattributed_failures"]] + [""]
    if report["unknown_rule_ids"]:
        unknown = ", ".join(f"`{i}`" for i in report["unknown_rule_ids"])
        lines += [f"Unknown rule ids in nsa_rule marks (not in conformance.nsa_rules): {unknown}", ""]
    return lines


def _not_applicable_md(report: dict) -> list[str]:
    rows = [r for r in report["rules"] if r["not_applicable_reasons"]]
    lines = ["## Not applicable", ""]
    if not rows:
        lines += ["No test was outside the declared capabilities.", ""]
    for r in rows:
        more = r["not_applicable_reasons_total"] - len(r["not_applicable_reasons"])
        lines += [f"### `{r['id']}` ({r['counts']['not applicable']} tests, status {r['status']})", ""]
        lines += [f"- {_cell(reason)}" for reason in r["not_applicable_reasons"]]
        lines += ([f"- ... and {more} more distinct reason(s)"] if more > 0 else []) + [""]
    return lines


def _by_test_md(report: dict) -> list[str]:
    rows = report.get("by_test") or {}
    judged = {name: c for name, c in rows.items() if c["applicable"] + c["not applicable"]}
    if not judged:
        return []
    low = sum(c["applicable"] < 0.8 * (c["applicable"] + c["not applicable"]) for c in judged.values())
    lines = ["## Applicability per test", "",
             f"{len(judged)} test functions judged; {low} with fewer than 80% of their cases applicable.", "",
             "| test | applicable | not applicable | applicable % |", "|---|---|---|---|"]
    for name, c in judged.items():
        n = c["applicable"] + c["not applicable"]
        lines.append(f"| `{name}` | {c['applicable']} | {c['not applicable']} | {100 * c['applicable'] / n:.0f}% |")
    return lines + [""]


def render_markdown(report: dict[str, Any]) -> str:
    """``report.md``: header, the per-rule table, failures with repros, not-applicable reasons,
    applicability per test function."""
    return "\n".join(_header_md(report) + _table_md(report) + _failures_md(report) + _not_applicable_md(report)
                     + _by_test_md(report))


# --- files ----------------------------------------------------------------------------------------------

def write_files(out_dir: str | Path, report: dict[str, Any]) -> list[Path]:
    """Write ``report.json`` and ``report.md`` of ``report`` into ``out_dir`` (created)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "report.json", out / "report.md"
    json_path.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    md_path.write_text(render_markdown(report), encoding="utf-8")
    return [json_path, md_path]


def write_report(out_dir: str | Path, impl, outcomes: Mapping[str, dict], rules_of: Mapping[str, tuple]) -> list[Path]:
    """Build the per-rule report of one run and write ``report.json`` + ``report.md`` into ``out_dir``."""
    return write_files(out_dir, build_rule_report(impl, outcomes, rules_of))


def main(argv: list[str] | None = None) -> int:
    """``python -m conformance.rule_report merge OUT_DIR IN_DIR...``: merge the ``report.json`` of
    each IN_DIR (runs of one implementation) into OUT_DIR/report.json + report.md."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m conformance.rule_report", description=main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    merge = sub.add_parser("merge", help="merge per-rule reports of several runs into one")
    merge.add_argument("out_dir")
    merge.add_argument("in_dirs", nargs="+")
    args = parser.parse_args(argv)
    reports, missing = [], []
    for d in args.in_dirs:
        path = Path(d) / "report.json"
        if path.is_file():
            reports.append(json.loads(path.read_text(encoding="utf-8")))
        else:
            missing.append(str(path))
    for path in missing:
        print(f"rule_report merge: no {path} (that run wrote no report); left out")
    if not reports:
        print("rule_report merge: no report to merge")
        return 1
    for path in write_files(args.out_dir, merge_reports(reports)):
        print(f"rule_report merge: wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
