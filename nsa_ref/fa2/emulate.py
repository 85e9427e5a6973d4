"""A CPU stand-in for an FA-2 provider that computes FA-2's mask in plain torch.

It lets the FA-2 layouts (the cmp fold with stride-0 K/V, windows, packed sequences) be tested on
a machine without a GPU. The mask is FA-2's own model, ``contracts.fa2_mask.fa2_mask`` (the max_k
clamp, the max_q == 1 causal drop, bottom-right alignment), applied per sequence with the call's
max_seqlen. Fully masked rows give out 0 and lse +inf, as FA-2 does.
"""
from __future__ import annotations

import math

import torch

from contracts.fa2_mask import fa2_mask


def _attend(q, k, v, mask, scale):
    """q: (Sq, Hq, D), k/v: (Sk, Hkv, D), mask (Sq, Sk) -> out (Sq, Hq, D), lse (Hq, Sq)."""
    g = q.shape[1] // max(k.shape[1], 1)
    kf = k.float().repeat_interleave(g, dim=1)
    vf = v.float().repeat_interleave(g, dim=1)
    s = torch.einsum("qhd,khd->hqk", q.float(), kf) * scale
    s = s.masked_fill(~mask, -math.inf)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)
    out = torch.einsum("hqk,khd->qhd", p, vf)
    return out.to(q.dtype), torch.where(torch.isinf(lse), math.inf, lse)


class EmulatedFA2:
    """Provider with FA-2's interface and mask semantics, computed in fp32 on any device."""

    name = "emulated"
    contract_provider = "flash_attn"

    def version(self) -> str:
        return "emulated"

    def is_available(self) -> bool:
        return True

    def dense(self, q, k, v, *, causal, window, scale):
        B, Sq = q.shape[:2]
        Sk = k.shape[1]
        mask = fa2_mask(Sq, Sk, causal, window, device=q.device)
        outs, lses = zip(*(_attend(q[b], k[b], v[b], mask, scale) for b in range(B)))
        return torch.stack(outs), torch.stack(lses)

    def varlen(self, q, k, v, cu_q, cu_k, max_q, max_k, *, causal, window, scale):
        cq, ck = cu_q.tolist(), cu_k.tolist()
        outs, lses = [], []
        for b in range(len(cq) - 1):
            sq, sk = cq[b + 1] - cq[b], ck[b + 1] - ck[b]
            mask = fa2_mask(sq, sk, causal, window, max_q, max_k, device=q.device)
            o, lse = _attend(q[cq[b] : cq[b + 1]], k[ck[b] : ck[b + 1]], v[ck[b] : ck[b + 1]], mask, scale)
            outs.append(o)
            lses.append(lse)
        return torch.cat(outs), torch.cat(lses, dim=1)
