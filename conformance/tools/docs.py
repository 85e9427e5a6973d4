"""Generated parts of the Markdown documentation, so they cannot drift from the code or the artifacts.

Each block lies between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->`` and is rewritten from data:

- ``rules``, ``guards``, ``thresholds`` (Documentation/Architecture/FA2_Integration_Guide_for_NSA.md):
  the FA-2 contract rules from ``contracts.RULES`` (each linked to its entry in
  Documentation/Troubleshooting_FA2.md), the rules to keep on in production from
  ``contracts.spec.GUARD_RECOMMENDATIONS``, and the router's minimum lengths from
  ``nsa_ref/fa2_thresholds.yaml``;
- ``flags`` (Documentation/Rollout.md): every field of ``nsa_ref.settings.NSASettings`` as its
  ``NSA_*`` variable, type and default, with the rollout note from ``FLAG_NOTES`` below;
- ``known-good`` (Documentation/Rollout.md): each GPU environment recorded in a committed
  ``artifacts/**/env.json``, with the test, verdict and timing files lying next to it.

Whole files generated from data (``GENERATED_FILES``):

- Documentation/nsa_conformance_rules.md: the implementer's document, from the NSA rule catalog
  (``conformance.nsa_rules.RULES``), the slot signatures (``conformance.plugin``), the config fields
  (``nsa_ref.NSAConfig``) and the capability fields (``conformance.capabilities.Capabilities``).

    python -m conformance.tools.docs           # rewrite the blocks in place
    python -m conformance.tools.docs --check   # exit 1 naming the stale files (tests/docs runs the same check)
"""
from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import types
import typing
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GUIDE = "Documentation/Architecture/FA2_Integration_Guide_for_NSA.md"
ROLLOUT = "Documentation/Rollout.md"
NSA_RULES_DOC = "Documentation/nsa_conformance_rules.md"
TROUBLESHOOTING = "Documentation/Troubleshooting_FA2.md"

#: What each NSA_* flag means for a rollout. A new NSASettings field without a note here makes
#: ``flags_block`` raise, so the flag table always covers every flag.
FLAG_NOTES: dict[str, str] = {
    "use_fa2": "Master switch for every FA-2 fast path; `0` sends every branch to SDPA (the one-flag rollback).",
    "use_fa2_win": "FA-2 for the sliding-window branch: one causal call with window (w - 1, 0).",
    "use_fa2_cmp": "FA-2 for the compressed branch: one dense causal call over the stride-0 fold.",
    "use_fa2_sel": "FA-2 varlen gather for the selected branch, at every T (no minimum length). With "
                   "autograd, chunks are recomputed in backward; the committed GPU parity run checks its "
                   "output, not its gradients (guide, section 9).",
    "use_triton": "Triton kernels for block selection (fused scoring + top-n) and the selected branch "
                  "(group-centric, with backward), on CUDA sm80+ for fp16/bf16/fp32 and head dims <= 256. "
                  "`0` sends sel back to the FA-2 gather and selection to the chunked torch scoring.",
    "fa2_min_len_win": "Shortest T (tokens) that `backend=\"auto\"` sends to FA-2 for win; unset = "
                       "`nsa_ref/fa2_thresholds.yaml`. An explicit `backend=\"fa2\"` ignores it.",
    "fa2_min_len_cmp": "The same for cmp.",
    "fa2_pref_fp16": "fp32 inputs run FA-2 in fp16 (`1`) instead of bf16 (`0`); the output is cast back to fp32.",
    "fa2_provider": "`auto` takes the flash_attn package when it is usable, else torch's built-in kernels. "
                    "Naming a provider that is not usable sends the calls to SDPA (with that reason).",
    "fa2_contracts": "Contract before each FA-2 call: `off`; `meta` (shapes, dtypes, strides, devices; "
                     "no device sync); `strict` (also index values: one host copy per call). "
                     "`contracts.guarded` reads it too.",
    "debug_timing": "Log branch, path, shape, dtype (and CUDA-event milliseconds) of every branch call on "
                    "the `nsa_ref` logger at INFO, and keep them in `telemetry.snapshot()[\"timings\"]`.",
    "sdpa_audit": "Recompute a prefix sample of every non-SDPA branch call on SDPA and keep "
                  "max|fast - sdpa| in `telemetry.snapshot()[\"audits\"]`.",
    "sdpa_audit_rows": "Rows recomputed per audited call (a prefix of the first sequence).",
}


class DocsError(ValueError):
    """A document lacks a marker pair, or a generator lacks the data it needs."""


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


# --- rules ---------------------------------------------------------------------------------------

def rules_block() -> str:
    """The contract rules as one Markdown table (id linked to its troubleshooting entry)."""
    from contracts import RULES

    lines = [
        "_Generated from `contracts.RULES` by `python -m conformance.tools.docs`; edit `contracts/catalog.py`, "
        "not this table._",
        "",
        "| rule | kind | mode | calls | the contract checks | fix |",
        "|---|---|---|---|---|---|",
    ]
    for rule in RULES.values():
        link = f"[`{rule.id}`](../Troubleshooting_FA2.md#{rule.id.lower()})"
        lines.append(f"| {link} | {rule.kind} | {rule.mode} | {', '.join(rule.applies_to)} | "
                     f"{_cell(rule.title)} | {_cell(rule.fix)} |")
    kinds: dict[str, int] = {}
    for rule in RULES.values():
        kinds[rule.kind] = kinds.get(rule.kind, 0) + 1
    summary = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
    strict = sum(r.mode == "strict" for r in RULES.values())
    lines += ["", f"{len(RULES)} rules: {summary}; {strict} of them need `strict` mode."]
    return "\n".join(lines)


# --- flags ---------------------------------------------------------------------------------------

def _type_text(annotation) -> str:
    if annotation is bool:
        return "bool"
    if annotation is int:
        return "int"
    if annotation is str:
        return "str"
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " / ".join(f"`{a}`" for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return " or ".join(_type_text(a) for a in args) + " or unset"
    return getattr(annotation, "__name__", str(annotation))


def _bounds(field) -> str:
    out = []
    for meta in field.metadata:
        for attr, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            value = getattr(meta, attr, None)
            if value is not None:
                out.append(f"{sign} {value}")
    return f" ({', '.join(out)})" if out else ""


def _default_text(value) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "`1`" if value else "`0`"
    return f"`{value}`"


def flags_block() -> str:
    """Every NSASettings field as its environment variable, type, default and rollout note."""
    from nsa_ref.settings import NSASettings

    prefix = NSASettings.model_config.get("env_prefix", "")
    missing = [name for name in NSASettings.model_fields if name not in FLAG_NOTES]
    if missing:
        raise DocsError(f"NSASettings has field(s) {missing} without a note in conformance.tools.docs.FLAG_NOTES; add one")
    lines = [
        "_Generated from `nsa_ref.settings.NSASettings` by `python -m conformance.tools.docs`._",
        "",
        "| variable | type | default | what it does |",
        "|---|---|---|---|",
    ]
    for name, field in NSASettings.model_fields.items():
        var = f"{prefix}{name}".upper()
        lines.append(f"| `{var}` | {_cell(_type_text(field.annotation))}{_cell(_bounds(field))} | "
                     f"{_default_text(field.default)} | {_cell(FLAG_NOTES[name])} |")
    return "\n".join(lines)


# --- known-good environments ---------------------------------------------------------------------

def _junit_counts(folder: Path) -> dict[str, int]:
    from conformance.tools.cli import parse_junit

    counts = {"tests": 0, "passed": 0, "failed": 0, "error": 0, "skipped": 0, "xfailed": 0}
    for path in sorted(folder.glob("*junit*.xml")):
        for case in parse_junit(path):
            counts["tests"] += 1
            counts[case["outcome"]] += 1
    return counts


def _canary_verdict(folder: Path) -> str | None:
    """'passed' / 'FAILED' / 'partial (...)' of a training canary's canary.json in folder (or its
    canary/ subfolder, where ``gpu_run.sh canary`` writes it); None when there is none."""
    for path in (folder / "canary.json", folder / "canary" / "canary.json"):
        if path.exists():
            verdict = json.loads(path.read_text(encoding="utf-8")).get("verdict", {})
            return {True: "passed", False: "FAILED"}.get(verdict.get("passed"),
                                                         f"partial ({verdict.get('partial', '?')})")
    return None


def _evidence(folder: Path) -> tuple[list[str], str]:
    """(what lies next to env.json, the row's status: a passing test run, a passing canary, or
    timings / smoke only)."""
    notes: list[str] = []
    junit = _junit_counts(folder)
    if junit["tests"]:
        notes.append(f"pytest: {junit['passed']} passed, {junit['failed']} failed, {junit['error']} errors, "
                     f"{junit['skipped']} skipped")
    parity = folder / "gpu_parity.json"
    if parity.exists():
        verdicts = json.loads(parity.read_text(encoding="utf-8"))
        notes.append(f"parity: {sum(bool(v.get('passed')) for v in verdicts)} of {len(verdicts)} verdicts within tolerance")
    for name in ("bench.csv", "smoke.csv"):
        path = folder / name
        if path.exists():
            with path.open(newline="", encoding="utf-8") as fh:
                rows = list(csv.DictReader(fh))
            ok = sum(r.get("status") == "ok" for r in rows)
            notes.append(f"{name}: {ok} of {len(rows)} rows ok")
    canary = _canary_verdict(folder)
    if canary is not None:
        notes.append(f"training canary: {canary}")
    if junit["tests"] > 0 and junit["failed"] == 0 and junit["error"] == 0:
        status = "**known good** (tests passed)"
    elif canary == "passed":
        status = "training canary passed"
    else:
        status = "timings / smoke only"
    return notes, status


def committed_env_files(root: Path = ROOT) -> list[Path]:
    """``artifacts/**/env.json`` tracked by git (files a local run just wrote do not count);
    every such file on disk when git cannot be asked (e.g. an unpacked source archive)."""
    try:
        res = subprocess.run(["git", "ls-files", "-z", "--", "artifacts"], cwd=root, capture_output=True,
                             timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        res = None
    if res is not None and res.returncode == 0:
        names = [n for n in res.stdout.decode("utf-8", "replace").split("\0") if n.endswith("/env.json")]
        return sorted(root / n for n in names)
    return sorted((root / "artifacts").glob("**/env.json"))


def known_good_block(root: Path = ROOT) -> str:
    """One row per GPU env.json under artifacts/, with the evidence lying next to it."""
    lines = [
        "_Generated from `artifacts/**/env.json` and the files next to each by `python -m conformance.tools.docs`._",
        "",
        "| artifact | GPU (cc) | driver | CUDA runtime | torch | flash_attn | triton | python | evidence | status |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = 0
    for env_path in committed_env_files(root):
        env = json.loads(env_path.read_text(encoding="utf-8"))
        if not env.get("cuda_available"):
            continue
        folder = env_path.parent
        notes, status = _evidence(folder)
        rel = folder.relative_to(root).as_posix()
        lines.append(
            f"| [`{rel}`](../{rel}/) | {_cell(env.get('gpu', '?'))} ({env.get('compute_capability', '?')}) | "
            f"{env.get('driver', '?')} | {env.get('cuda_runtime', '?')} | {env.get('torch', '?')} | "
            f"{env.get('flash_attn', '?')} | {env.get('triton', '?')} | {env.get('python', '?')} | "
            f"{_cell('; '.join(notes) or 'env.json only')} | {status} |"
        )
        rows += 1
    if not rows:
        lines.append("| (none yet) | | | | | | | | | |")
    return "\n".join(lines)


# --- thresholds and guard recommendations ---------------------------------------------------------

def thresholds_block() -> str:
    """The router's minimum lengths from nsa_ref/fa2_thresholds.yaml, one row per GPU/branch/head dim."""
    import yaml

    from nsa_ref.fa2 import thresholds

    data = yaml.safe_load(thresholds.THRESHOLDS_FILE.read_text(encoding="utf-8")) or {}
    lines = [
        "_Generated from `nsa_ref/fa2_thresholds.yaml` by `python -m conformance.tools.docs`._",
        "",
        "| GPU | branch | head dim | FA-2 from T >= |",
        "|---|---|---|---|",
    ]
    entries = [("default (any GPU not listed)", data.get("default") or {})]
    entries += [(f"`{name}`", entry or {}) for name, entry in (data.get("gpus") or {}).items()]
    for gpu, entry in entries:
        for branch, value in entry.items():
            dims = value.items() if isinstance(value, dict) else [("any", value)]
            for dim, min_t in sorted(dims, key=lambda kv: (kv[0] == "any", int(kv[0]) if kv[0] != "any" else 0)):
                shown = "never (SDPA stays)" if int(min_t) >= 1 << 30 else str(min_t)
                lines.append(f"| {gpu} | {branch} | {dim} | {shown} |")
    return "\n".join(lines)


def guards_block() -> str:
    """``contracts.spec.GUARD_RECOMMENDATIONS``: the rules to keep on in production, and why."""
    from contracts.spec import GUARD_RECOMMENDATIONS

    lines = [
        "_Generated from `contracts.spec.GUARD_RECOMMENDATIONS` by `python -m conformance.tools.docs`._",
        "",
        "| rule | action | mode | providers | versions | archs | when | evidence |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for g in GUARD_RECOMMENDATIONS:
        link = f"[`{g.rule}`](../Troubleshooting_FA2.md#{g.rule.lower()})"
        lines.append(f"| {link} | {g.action} | {g.mode} | {', '.join(g.providers)} | {g.versions} | "
                     f"{', '.join(g.archs) or 'all'} | {_cell(g.condition)} | {_cell(g.evidence)} |")
    return "\n".join(lines)


# --- the implementer's document: NSA conformance rules ----------------------------------------------

_NSA_INTRO = """\
# NSA conformance rules (for implementers)

_Generated by `python -m conformance.tools.docs` from `conformance/nsa_rules.py` (the rules),
`conformance/plugin.py` (the slot signatures), `nsa_ref.NSAConfig` and
`conformance/capabilities.py`; edit those, not this file (`tests/docs/test_generated_docs.py`
fails when they differ)._

The conformance suite judges any implementation of Native Sparse Attention (Yuan et al. 2025,
arXiv 2502.11089) against one reading of the paper, written down below as rules with stable ids.
Every conformance test names the rules it checks (`@pytest.mark.nsa_rule`), every failure message
starts with `[NSA-...] title`, and the per-rule report groups the results by rule. Where public
implementations disagree (window w or w + 1, a compressed block visible one token late, which
blocks are forced) the rule says which reading this suite pins.
"""

_NSA_RUN = """\
## Run the suite on your implementation

```bash
python -m pytest conformance --nsa-impl=your_pkg.module:nsa_attention
```

Your module must be importable (installed, or on `PYTHONPATH`). You can also hand in single
parts; every slot you do not name runs this project's `nsa_ref`, so a branch is judged on its own:

{slots}

Other options (`--nsa-dtype`, `--nsa-device`, `--nsa-compute-dtype` and `--nsa-capabilities` also
read `NSA_CONFORMANCE_*` variables, see `conformance/impl.py`):

| option | what it does |
|---|---|
| `--nsa-dtype=fp64\\|fp32\\|bf16\\|fp16` | dtype of the inputs. fp64 (default) compares with the fp64 brute force almost exactly (floor 1e-7); lower precisions use the `tolerances.yaml` rule against a brute force run in the same precision. |
| `--nsa-device=cuda` | device your implementation gets its tensors on (default `cpu`). |
| `--nsa-compute-dtype=fp32` | the precision you compute in; verdicts use that tolerance row when it is coarser than `--nsa-dtype`, so a kernel that computes fp64 inputs in fp32 is not failed for being exactly as accurate as it says. |
| `--nsa-capabilities=pkg.mod:OBJ` | a `Capabilities` object for every slot you give (wins over the callable's own). |
| `--nsa-cap KEY=VALUE` | one capability field, repeatable: `--nsa-cap tied_blocks=true --nsa-cap backward=false`. |
| `--nsa-backend=NAME` | the `nsa_ref` backend behind the slots you do not give (default `auto`). |
| `--nsa-report=DIR` | write the per-rule report, `DIR/report.md` and `DIR/report.json`: each rule passed / failed / not applicable / not tested, the first failure of each failed rule with a command that reproduces it, and the applicable share of each test function's cases. Reports of several runs merge: `python -m conformance.rule_report merge OUT DIR...`. |
| `--nsa-known-deviations=FILE` | reviewed differences (YAML: rule, why, upstream, test ids with `*`) become strict xfails: a listed test must still fail with its rule, and fails the day it passes. |

Every failure starts with the id of the rule it breaks (`[NSA-WIN] ...`). When your code raises
instead (an `assert` inside a kernel wrapper, a crash), the failure still starts with the test's
rule ids and says where it was raised: `[NSA-VARLEN] ...: the test raised AssertionError: (no
message) (raised at your_pkg/kernel.py:558)`.

`nsa-fa2 check --impl your_pkg.module:nsa_attention` runs the same suite in a subprocess (plus the
`-m gpu` part on a CUDA machine) and writes `artifacts/<date>/check/check_report.md` with the
per-rule report in `artifacts/<date>/check/rules/`; it takes `--nsa-dtype`, `--nsa-device`,
`--nsa-compute-dtype` and `--nsa-cap` too, and passes anything after `--` to pytest.

A typical GPU run of a bf16 kernel:

```bash
python -m pytest conformance --nsa-impl=your_pkg.module:nsa_attention \\
    --nsa-device=cuda --nsa-dtype=bf16 --nsa-report=reports/your_nsa
```
"""

_NSA_CAPS = """\
## Declare what you support

An implementation is judged only inside the space it declares. A test outside it is reported as
`not applicable: <reason>` (a pytest skip with that prefix): never passed, never failed; the
hypothesis properties draw their examples only from inside it. Declare the space next to the
callable (or as a callable `device -> Capabilities` when it depends on the device):

```python
import nsa_ref
from conformance.capabilities import Capabilities


def nsa_attention(q, k, v, gates, cfg, cu_seqlens=None):
    return nsa_ref.nsa_attention(q, k, v, gates, cfg, cu_seqlens)


nsa_attention.capabilities = Capabilities(tied_blocks=True, n_init=(1,), n_local=(2,),
                                          min_group=16, group_power_of_two=True,
                                          compute_dtype="fp32")
```

The fields, as `Capabilities` documents them (every default means "anything"). On the command
line: `--nsa-cap FIELD=VALUE`, booleans as `true` / `false`, tuples comma-separated (`1,2`),
`none` for None.

```text
{doc}
```

{fields}
"""

_NSA_CONVENTIONS = """\
## Conventions your implementation must follow

These are not rules of NSA but of the interface: without them the suite cannot compare.

- **Layout** (FA-2 varlen, no batch dimension): `q (T, Hq, Dk)`, `k (T, Hkv, Dk)`,
  `v (T, Hkv, Dv)`, `gates (T, Hq, 3)`, output `(T, Hq, Dv)`. G = Hq / Hkv; query head h uses
  KV head h // G. Dk and Dv may differ.
- **cu_seqlens**: `None` for one sequence, else a `(B + 1,)` int32 tensor on the inputs' device in
  FA-2's layout: `cu_seqlens[0] = 0`, non-decreasing, `cu_seqlens[-1] = T`; sequence b is rows
  `cu_seqlens[b]:cu_seqlens[b + 1]`. Positions restart at 0 in every sequence, and a sequence of
  length 0 is legal.
- **Compressed-block count**: per sequence of length T, Tc = floor((T - l) / d) + 1 compressed
  blocks when T >= l, none when T < l; block i covers tokens [i*d, i*d + l).
- **Varlen packing of compressed blocks**: `k_cmp`, `v_cmp` are `(sum of Tc, Hkv, D)`, the
  sequences' blocks one after the other in sequence order, so `cu_seqlens_cmp[b + 1] =
  cu_seqlens_cmp[b] + Tc(T_b)` (sequences shorter than l add none). The `cmp` and `select` slots
  get the packed `k_cmp` with the *token* `cu_seqlens` and derive this packing themselves; the
  `compress` slot may return `(x_cmp, cu_seqlens_cmp)`.
- **block_idx**: an integer tensor (int32 preferred) `(T, Hkv, n_sel)`, one row per (query, KV
  head) shared by the G query heads: the selected block indices first, strictly ascending, inside
  0..c with c = t // l' (local to the sequence), then `-1` padding; min(n_sel, c + 1) valid entries.
- **Empty rows**: a query that sees no compressed block (t < l - 1) gets a cmp output of exactly
  0 (never NaN), a log-sum-exp of `-inf` (FA-2 reports `+inf` there: convert), and no gradient.
- **Log-sum-exp** (optional second return value of `cmp`): `(T, Hq)`, natural log, of the scaled
  scores over the visible blocks.
- **Gates**: `gates[..., 0]`, `gates[..., 1]`, `gates[..., 2]` weight the cmp, sel and win
  outputs in that order, used as given: the function applies no sigmoid (a module computes
  `gates = sigmoid(x W_g)` before calling it).
- **Scale**: `cfg.scale` when set, else 1 / sqrt(Dk), in every branch.

`cfg` is an `nsa_ref.NSAConfig`:

{config}
"""


def _nsa_slots_table() -> str:
    from conformance.impl import IMPL_OPTIONS

    lines = ["| slot | flag | your callable |", "|---|---|---|"]
    for slot, flag, what in IMPL_OPTIONS:
        lines.append(f"| `{slot}` | `{flag}=pkg.mod:fn` | {_cell(what)} |")
    return "\n".join(lines)


def _capability_fields_table() -> str:
    import dataclasses

    from conformance.capabilities import Capabilities

    lines = ["| field | type | default |", "|---|---|---|"]
    for f in dataclasses.fields(Capabilities):
        lines.append(f"| `{f.name}` | `{_cell(f.type)}` | `{f.default!r}` |")
    return "\n".join(lines)


def _config_table() -> str:
    from nsa_ref import NSAConfig

    lines = ["| field | default | meaning |", "|---|---|---|"]
    for name, field in NSAConfig.model_fields.items():
        lines.append(f"| `{name}` | `{field.default!r}` | {_cell(field.description or '')} |")
    return "\n".join(lines)


def _prose(text: str) -> str:
    """Formula text as literal Markdown (``i*d + l`` must not turn into emphasis)."""
    return text.replace("*", "\\*")


def _rule_sections() -> str:
    from conformance.nsa_rules import RULES

    lines = ["## The rules", "", "| id | rule | slots |", "|---|---|---|"]
    lines += [f"| [`{r.id}`](#{r.id.lower()}) | {_cell(_prose(r.title))} | {', '.join(r.slots)} |"
              for r in RULES.values()]
    for r in RULES.values():
        lines += ["", f"### {r.id}", "", f"**{_prose(r.title)}**", "", _prose(r.statement), "",
                  f"Checked through the slot(s): {', '.join(f'`{s}`' for s in r.slots)}. "
                  f"A failure starts with `{r.tag()}`."]
    return "\n".join(lines)


def nsa_rules_document() -> str:
    """Documentation/nsa_conformance_rules.md: how to run the suite on an implementation, how to
    declare capabilities, the interface conventions, then one section per NSA rule."""
    import inspect

    from conformance.capabilities import Capabilities

    parts = [
        _NSA_INTRO,
        _NSA_RUN.format(slots=_nsa_slots_table()),
        _NSA_CAPS.format(doc=inspect.getdoc(Capabilities), fields=_capability_fields_table()),
        _NSA_CONVENTIONS.format(config=_config_table()),
        _rule_sections(),
    ]
    return "\n".join(p.rstrip("\n") + "\n" for p in parts)


#: Documents generated whole (path -> generator).
GENERATED_FILES = {NSA_RULES_DOC: nsa_rules_document}


def regenerate_file(doc: str, root: Path = ROOT) -> tuple[str, str]:
    """(committed text or "" when missing, generated text) of one of ``GENERATED_FILES``."""
    path = root / doc
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    return old, GENERATED_FILES[doc]()


# --- marker blocks -------------------------------------------------------------------------------

GENERATORS = {"rules": rules_block, "guards": guards_block, "thresholds": thresholds_block,
              "flags": flags_block, "known-good": known_good_block}
DOCUMENTS: dict[str, tuple[str, ...]] = {GUIDE: ("rules", "guards", "thresholds"), ROLLOUT: ("flags", "known-good")}


def replace_block(text: str, name: str, body: str) -> str:
    """``text`` with the lines between ``<!-- name:begin -->`` and ``<!-- name:end -->`` set to ``body``."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    if text.count(begin) != 1 or text.count(end) != 1:
        raise DocsError(f"expected exactly one {begin} and one {end}, found {text.count(begin)} and {text.count(end)}")
    i, j = text.index(begin) + len(begin), text.index(end)
    if j < i:
        raise DocsError(f"{end} comes before {begin}")
    return text[:i] + "\n" + body.rstrip("\n") + "\n" + text[j:]


def regenerate(doc: str, root: Path = ROOT) -> tuple[str, str]:
    """(committed text, regenerated text) of one document of ``DOCUMENTS``."""
    path = root / doc
    if not path.exists():
        raise DocsError(f"{doc} is missing")
    text = path.read_text(encoding="utf-8")
    new = text
    for name in DOCUMENTS[doc]:
        body = known_good_block(root) if name == "known-good" else GENERATORS[name]()
        try:
            new = replace_block(new, name, body)
        except DocsError as exc:
            raise DocsError(f"{doc}: {exc}") from None
    return text, new


def _all_generated(root: Path) -> list[tuple[str, str, str]]:
    """(document, committed text, regenerated text) for every generated block and file."""
    found = [(doc, *regenerate(doc, root)) for doc in DOCUMENTS]
    return found + [(doc, *regenerate_file(doc, root)) for doc in GENERATED_FILES]


def stale(root: Path = ROOT) -> list[str]:
    """The documents whose generated blocks (or whole generated files) differ from the data now."""
    return [doc for doc, old, new in _all_generated(root) if old != new]


def write(root: Path = ROOT) -> list[str]:
    """Rewrite every generated block and file; returns the documents that changed."""
    changed = []
    for doc, old, new in _all_generated(root):
        if old != new:
            (root / doc).write_text(new, encoding="utf-8")
            changed.append(doc)
    return changed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m conformance.tools.docs", description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only report stale documents (exit 1 when any)")
    args = ap.parse_args(argv)
    try:
        if args.check:
            bad = stale()
            for doc in bad:
                print(f"{doc}: generated blocks are stale; run `python -m conformance.tools.docs`")
            return 1 if bad else 0
        for doc in write():
            print(f"rewrote the generated blocks of {doc}")
        return 0
    except DocsError as exc:
        print(f"conformance.tools.docs: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
