"""List every torch.compile graph break of ``nsa_attention`` on this machine's fast path.

``torch._dynamo.explain`` traces the call without ``fullgraph`` and reports each break with its
reason and user frame, so one run names all of them (``fullgraph=True`` stops at the first).
The call is run eagerly first, as a model's first step would, so that the router's decisions
exist before the trace (``nsa_ref.router``). Forward, and forward with inputs that require grad.

    python conformance/tools/device/compile_breaks.py [--T 2048] [--out DIR]

Writes ``compile_breaks.json`` to --out (when given) and prints one line per break.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

import torch


def _inputs(T: int, device: str, dtype: torch.dtype, grad: bool):
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(T, h, 128, device=device, dtype=dtype, generator=gen).requires_grad_(grad)
               for h in (16, 2, 2))
    gates = torch.rand(T, 16, 3, device=device, dtype=dtype, generator=gen)
    return q, k, v, gates


def explain(T: int, device: str, grad: bool) -> dict:
    from nsa_ref import NSAConfig, nsa_attention

    cfg = NSAConfig()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32

    def call(q, k, v, gates):
        return nsa_attention(q, k, v, gates, cfg, validate="shapes")

    args = _inputs(T, device, dtype, grad)
    call(*args)  # eager first: the route decisions exist before the trace
    torch._dynamo.reset()
    result = torch._dynamo.explain(call)(*args)
    breaks = []
    for r in result.break_reasons:
        frames = [f"{f.filename.rsplit('/', 2)[-1]}:{f.lineno} {f.name}" for f in (r.user_stack or [])][-4:]
        breaks.append({"reason": r.reason.splitlines()[0][:300], "where": frames})
    return {"grad": grad, "graphs": result.graph_count, "graph_breaks": result.graph_break_count, "breaks": breaks}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, default=2048)
    ap.add_argument("--out", type=pathlib.Path)
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    report = {"torch": torch.__version__, "device": device, "runs": []}
    for grad in (False, True):
        try:
            run = explain(args.T, device, grad)
        except Exception as e:  # noqa: BLE001 - the report says what stopped the trace
            run = {"grad": grad, "error": f"{type(e).__name__}: {str(e)[:2000]}"}
        report["runs"].append(run)
        print(f"grad={grad}: " + (run.get("error") or f"{run['graph_breaks']} graph break(s), {run['graphs']} graph(s)"))
        for b in run.get("breaks", []):
            print(f"  - {b['reason']}  @ {' <- '.join(reversed(b['where']))}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "compile_breaks.json").write_text(json.dumps(report, indent=1))
    return 0 if all(r.get("graph_breaks") == 0 for r in report["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
