"""Run every FA-2 probe in a fresh subprocess, classify what happened, write a JSON and a Markdown table.

    python -m conformance.tools.probes.runner [--out DIR] [--timeout S] [--provider flash_attn,torch]
                                        [--only NAME[,NAME]] [--jobs N]

One subprocess per (probe, provider, variant): ``python conformance/tools/probes/<name>.py --provider P
--variant V --json``, with a timeout. A probe that kills its process (SIGFPE), hangs, or poisons
its CUDA context takes only that subprocess with it. Classification (``classify``):

- negative return code: ``killed_by_signal`` (the signal's name in the detail);
- timeout: ``timeout``;
- otherwise the outcome of the probe's last ``"stage": "result"`` JSON line;
- non-zero exit with no result: ``cuda_error`` when stderr names a CUDA failure, else ``probe_error``.

Writes ``fa2_probes.json`` and ``fa2_probes.md`` under ``--out`` (default
``artifacts/<today>/fa2_harden/``). Without CUDA every probe reports ``skipped: no CUDA`` after
its contract verdict, and the table is still written.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from conformance.tools.probes._common import KERNEL_FAILURES
from conformance.tools.subprocesses import RunRecord, run_command, signal_name

PROBES_DIR = Path(__file__).resolve().parent
REPO_ROOT = PROBES_DIR.parents[2]
NOT_PROBES = {"__init__", "_common", "runner"}
CUDA_TEXT = ("cuda error", "illegal memory access", "invalid configuration argument", "cudaerror",
             "device-side assert", "unspecified launch failure", "misaligned address")


@dataclass
class ProbeInfo:
    name: str
    path: str
    title: str
    rules: tuple[str, ...]
    providers: tuple[str, ...]
    variants: tuple[str, ...]
    exploratory: dict = field(default_factory=dict)
    not_applicable: object = None  # the probe's not_applicable(provider, variant), if any


def discover(only: list[str] | None = None) -> list[ProbeInfo]:
    """The probe scripts in this folder (imported for their constants; nothing runs at import)."""
    names = sorted(p.stem for p in PROBES_DIR.glob("*.py") if p.stem not in NOT_PROBES)
    if only:
        unknown = sorted(set(only) - set(names))
        if unknown:
            raise SystemExit(f"unknown probe(s) {', '.join(unknown)}; known: {', '.join(names)}")
        names = [n for n in names if n in only]
    infos = []
    for name in names:
        mod = importlib.import_module(f"conformance.tools.probes.{name}")
        infos.append(ProbeInfo(name=mod.NAME, path=str(PROBES_DIR / f"{name}.py"), title=mod.TITLE,
                               rules=tuple(mod.RULES), providers=tuple(mod.PROVIDERS),
                               variants=tuple(mod.VARIANTS), exploratory=dict(getattr(mod, "EXPLORATORY", {})),
                               not_applicable=getattr(mod, "not_applicable", None)))
    return infos


def json_lines(text: str) -> list[dict]:
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{") and '"probe"' in line:
            try:
                found.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return found




def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def classify(run: RunRecord, timeout: float | None = None) -> tuple[str, str, dict]:
    """(outcome, detail, the probe's last JSON payload or {}) for one finished subprocess."""
    payloads = json_lines(run.stdout)
    last = payloads[-1] if payloads else {}
    if run.timed_out:
        return "timeout", f"no result within {timeout if timeout is not None else '?'} s (process group killed)", last
    rc = run.returncode
    if rc is not None and rc < 0:
        name = signal_name(rc)
        where = " after the contract verdict, in the kernel call" if last.get("stage") == "contract" else ""
        return "killed_by_signal", f"{name} (signal {-rc}){where}", last
    if last.get("stage") == "result":
        detail = str(last.get("detail", ""))
        if rc:
            detail += f" (then exited {rc})"
        return str(last.get("outcome", "probe_error")), detail, last
    low = run.stderr.lower()
    if rc and any(t in low for t in CUDA_TEXT):
        return "cuda_error", f"exited {rc}: {_last_line(run.stderr)}", last
    if rc:
        return "probe_error", f"exited {rc} without a result: {_last_line(run.stderr)}", last
    return "probe_error", "exited 0 without a result line", last


def soundness(outcome: str, rejected: list[str], exploratory: bool = False) -> str:
    """How the contract's verdict relates to what the kernel did."""
    if outcome in KERNEL_FAILURES:
        if rejected:
            return "rejected by the contract"
        return "NOT REJECTED (new fact for this provider?)" if exploratory else "NOT REJECTED"
    if outcome == "ok":
        return "contract stricter than the kernel" if rejected else "accepted and ran"
    return "-"


def probe_command(info: ProbeInfo, provider: str, variant: str) -> list[str]:
    return [sys.executable, info.path, "--provider", provider, "--variant", variant, "--json"]


def run_probe(info: ProbeInfo, provider: str, variant: str, timeout: float) -> dict:
    reason = info.not_applicable(provider, variant) if info.not_applicable else None
    if reason:  # no API to call for this provider: nothing to isolate, no subprocess
        run = RunRecord(command=[], returncode=0, timed_out=False, wall_s=0.0, stdout="", stderr="")
        outcome, detail, payload = "not_applicable", reason, {}
    else:
        run = run_command(probe_command(info, provider, variant), timeout, cwd=REPO_ROOT)
        outcome, detail, payload = classify(run, timeout)
    rejected = payload.get("contract_strict", [])
    exploratory = provider in info.exploratory
    return {
        "probe": info.name, "provider": provider, "variant": variant, "title": info.title,
        "expected_rules": [] if exploratory else list(info.rules), "exploratory": exploratory,
        "contract_meta": payload.get("contract_meta", []), "contract_strict": rejected,
        "outcome": outcome, "detail": detail, "soundness": soundness(outcome, rejected, exploratory),
        "call": payload.get("call"), "caps": payload.get("caps"),
        "returncode": run.returncode,
        "signal": signal_name(run.returncode) if (run.returncode or 0) < 0 else None,
        "timed_out": run.timed_out, "wall_s": run.wall_s, "command": run.command,
        "stdout_tail": run.stdout[-4000:], "stderr_tail": run.stderr[-2000:],
    }


def markdown(report: dict) -> str:
    env = report.get("env", {})
    lines = [
        "# FA-2 crash/corruption probes",
        "",
        f"Generated {report['generated']} by `python -m conformance.tools.probes.runner` "
        f"(timeout {report['timeout_s']} s per probe).",
        "",
        f"Environment: GPU {env.get('gpu', 'n/a')} (cc {env.get('compute_capability', 'n/a')}), "
        f"driver {env.get('driver', 'n/a')}, torch {env.get('torch', 'n/a')} (CUDA "
        f"{env.get('cuda_runtime', 'n/a')}), flash_attn {env.get('flash_attn', 'n/a')}, "
        f"python {env.get('python', 'n/a')}.",
        "",
        "| probe | provider | contract rule ids that reject it (strict) | outcome | detail |",
        "|---|---|---|---|---|",
    ]
    for r in report["results"]:
        name = r["probe"] if r["variant"] in ("dense", "varlen", "kvcache") else f"{r['probe']} [{r['variant']}]"
        rules = ", ".join(f"`{x}`" for x in r["contract_strict"]) or "none"
        outcome = r["outcome"] if r["outcome"] != "skipped" else f"skipped: {r['detail']}"
        detail = "" if r["outcome"] == "skipped" else str(r["detail"]).replace("|", "\\|").replace("\n", " ")
        if r["soundness"] != "-":
            detail = f"{detail} — {r['soundness']}"
        lines.append(f"| {name} | {r['provider']} | {rules} | {outcome} | {detail} |")
    s = report["summary"]
    lines += [
        "",
        f"{s['runs']} runs: " + ", ".join(f"{k} {v}" for k, v in sorted(s["outcomes"].items())) + ".",
        f"Kernel failures (crash, CUDA error, corruption, clean error, timeout) not rejected by the "
        f"contract: {', '.join(s['not_rejected']) or 'none'}.",
        "",
        "Outcomes: `ok` ran and matched the reference; `clean_error` Python exception with a message; "
        "`cuda_error` CUDA error / illegal memory access / invalid configuration; `silent_corruption` "
        "returned, but differs from the reference (or is non-finite); `killed_by_signal` the process "
        "died (seen only by the runner); `not_applicable` / `skipped` with the reason.",
        "",
    ]
    return "\n".join(lines)


def summarize(results: list[dict]) -> dict:
    outcomes: dict[str, int] = {}
    for r in results:
        outcomes[r["outcome"]] = outcomes.get(r["outcome"], 0) + 1
    not_rejected = [f"{r['probe']}[{r['variant']}]/{r['provider']}" for r in results
                    if r["outcome"] in KERNEL_FAILURES and not r["contract_strict"]]
    return {"runs": len(results), "outcomes": outcomes, "not_rejected": not_rejected}


def default_out() -> Path:
    return REPO_ROOT / "artifacts" / _dt.date.today().isoformat() / "fa2_harden"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m conformance.tools.probes.runner", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="output folder (default artifacts/<today>/fa2_harden/)")
    ap.add_argument("--timeout", type=float, default=180.0, help="seconds per probe subprocess (default 180)")
    ap.add_argument("--provider", default="flash_attn,torch", help="comma-separated providers (default both)")
    ap.add_argument("--only", default=None, help="comma-separated probe names")
    ap.add_argument("--jobs", type=int, default=1, help="probes run at once (default 1)")
    args = ap.parse_args(argv)
    from conformance.tools.envinfo import collect

    providers = [p.strip() for p in args.provider.split(",") if p.strip()]
    infos = discover([n.strip() for n in args.only.split(",")] if args.only else None)
    jobs = [(info, p, v) for info in infos for p in info.providers if p in providers for v in info.variants]
    out = Path(args.out) if args.out else default_out()
    out.mkdir(parents=True, exist_ok=True)
    env = collect()
    print(f"FA-2 probes: {len(jobs)} runs of {len(infos)} probes, timeout {args.timeout:g} s, "
          f"CUDA {'yes' if env.get('cuda_available') else 'no'}, out {out}", flush=True)
    results: list[dict | None] = [None] * len(jobs)
    done = 0

    def one(i):
        nonlocal done
        info, provider, variant = jobs[i]
        r = run_probe(info, provider, variant, args.timeout)
        results[i] = r
        done += 1
        rules = ",".join(r["contract_strict"]) or "accepts"
        print(f"[{done}/{len(jobs)}] {info.name}[{variant}] {provider}: {r['outcome']} ({r['wall_s']:.1f} s) "
              f"contract: {rules} -- {str(r['detail'])[:160]}", flush=True)

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        list(pool.map(one, range(len(jobs))))
    final = [r for r in results if r is not None]
    report = {"generated": _dt.datetime.now().isoformat(timespec="seconds"), "timeout_s": args.timeout,
              "env": env, "results": final, "summary": summarize(final)}
    (out / "fa2_probes.json").write_text(json.dumps(report, indent=1, default=str), encoding="utf-8")
    (out / "fa2_probes.md").write_text(markdown(report), encoding="utf-8")
    s = report["summary"]
    print(f"wrote {out / 'fa2_probes.json'} and {out / 'fa2_probes.md'}: "
          + ", ".join(f"{k} {v}" for k, v in sorted(s["outcomes"].items()))
          + (f"; NOT rejected: {', '.join(s['not_rejected'])}" if s["not_rejected"] else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
