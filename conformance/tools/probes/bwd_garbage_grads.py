"""sm86/sm89/sm120, 192 < d <= 256, dropout > 0, backward: no backward kernel is launched.

    python conformance/tools/probes/bwd_garbage_grads.py [--provider flash_attn|torch] [--json]

Only those archs have the gap; elsewhere (sm80, sm90) the probe reports "not applicable on this
arch" and shows the contract's verdict as it would be on sm86. With dropout the exact gradient is
unknown here, so the check is: gradients finite (they are computed over NaN-filled memory) and
within a loose distance of the dropout-free gradients (dropout p = 0.1 moves them by about
sqrt(p / (1 - p)) ~ 0.33 relative; never-written memory is 1.0 or worse).
"""
from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as a file: import from the repository root, not this folder
    sys.path[0] = str(Path(__file__).resolve().parents[3])

import torch  # noqa: E402

from conformance.tools.probes import _common as C  # noqa: E402

NAME = "bwd_garbage_grads"
TITLE = "dense backward, d = 256, dropout_p = 0.1 (only sm86 / sm89 / sm120 are affected)"
EXPECTED = "garbage gradients, no error: flash_bwd_launch_template.h launches nothing (since 2.7.3)"
RULES = ("FA2-BWD-GARBAGE-GRADS",)
PROVIDERS = C.BOTH
VARIANTS = ("dense",)
# Providers where the class is not a known fact, so the contract is not expected to reject yet.
EXPLORATORY = {"torch": "PyTorch's vendored backward was not shown to have this gap, so the torch spec "
                        "leaves bwd_garbage_archs empty (catalog decision); this probe finds out"}

AFFECTED = ("sm86", "sm89", "sm120")
REL_LIMIT = 0.75


def arch_not_applicable(provider, variant, caps):
    if caps not in AFFECTED:
        return f"not applicable on this arch ({caps}): the gap is on {', '.join(AFFECTED)} only"
    return None


def build(provider, variant, device):
    caps = C.device_caps() if device == "cuda" else None
    q, k, v = (C.rand(1, 128, 2, 256, device=device, requires_grad=True) for _ in range(3))
    call = C.dense_call(provider, q, k, v, dropout_p=0.1)
    dout = C.rand(1, 128, 2, 256, device=device)
    leaves = {"dq": q, "dk": k, "dv": v}

    def judge(result):
        xs = [x.detach().double().requires_grad_() for x in leaves.values()]
        C.reference_dense(*xs).backward(dout.double())
        details, outcome = [], "ok"
        for (name, x), r in zip(leaves.items(), xs):
            g = x.grad
            if g is None:
                return "silent_corruption", f"{name}: no gradient was produced"
            bad = int((~torch.isfinite(g.float())).sum())
            rel = float((g.double() - r.grad).norm() / r.grad.norm().clamp_min(1e-30))
            details.append(f"{name}: {bad} non-finite, rel. distance to dropout-free {rel:.2f}")
            if bad or rel > REL_LIMIT:
                outcome = "silent_corruption"
        return outcome, "; ".join(details) + f" (limit {REL_LIMIT})"

    return C.Setup(call, run=C.forward_backward(call, dout), judge=judge,
                   caps=caps if caps in AFFECTED else "sm86",
                   notes=["contract evaluated for sm86 unless this GPU is an affected arch"])


if __name__ == "__main__":
    sys.exit(C.main(sys.modules[__name__]))
