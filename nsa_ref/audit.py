"""NSA_SDPA_AUDIT: re-run a sample of a fast-path call on SDPA and record the difference.

The sample is a prefix of the first sequence: every NSA branch is causal, so the outputs of rows
0..r-1 depend only on tokens 0..r-1 and SDPA can recompute them from that prefix alone, at a cost
independent of T. The result goes to ``telemetry.record_audit`` (and the ``nsa_ref`` logger).
"""
from __future__ import annotations

import torch

from nsa_ref import masks, sdpa, telemetry
from nsa_ref.packing import as_packing


def _prefix_rows(cu_seqlens, T: int, rows: int) -> int:
    bounds = as_packing(cu_seqlens, T).bounds  # the call's packing: no second host read
    first = bounds[0][1] if bounds else 0
    return min(rows, first)


def audit_against_sdpa(branch: str, path: str, args: tuple, cu_seqlens, out: torch.Tensor, rows: int) -> float:
    """args: the branch call's positional arguments (q first, cfg last); out: its (T, Hq, Dv) result.

    Returns max|out - sdpa| over the sampled rows (0.0 when the sample is empty).
    """
    q, cfg = args[0], args[-1]
    r = _prefix_rows(cu_seqlens, q.shape[0], rows)
    if r == 0:
        return 0.0
    with torch.no_grad():
        if branch == "cmp":
            _, k_cmp, v_cmp, _ = args
            tc = masks.num_cmp_blocks(r, cfg)
            ref, _ = sdpa.cmp_attention(q[:r], k_cmp[:tc], v_cmp[:tc], cfg)
        elif branch == "sel":
            _, k, v, block_idx, _ = args
            ref = sdpa.sel_attention(q[:r], k[:r], v[:r], block_idx[:r], cfg)
        else:
            _, k, v, _ = args
            ref = sdpa.win_attention(q[:r], k[:r], v[:r], cfg)
        diff = (out[:r].detach().float() - ref.float()).abs().max().item()
    telemetry.record_audit(branch, path, diff, r)
    return diff
