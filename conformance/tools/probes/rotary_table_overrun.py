"""kvcache rotary past the table: q's rotary reads cos/sin rows cache_seqlens[b] + i, unchecked.

    python conformance/tools/probes/rotary_table_overrun.py [--json]

flash_attn_with_kvcache with rotary_cos / rotary_sin, one new token per sequence, 16 causal query
rows. FA-2 checks only that the table has as many rows as the cache (64); under a causal mask
query row i of sequence b is rotated with table row cache_seqlens[b] + i. Sequence 0 holds 60
tokens, so its rows 4..15 read rows 64..75, past the table (garbage rotation or a fault);
sequence 1 (10 tokens) stays inside and is the control. The reference rotates with a longer
table built by the same formula, whose first 64 rows are the ones passed.
"""
from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as a file: import from the repository root, not this folder
    sys.path[0] = str(Path(__file__).resolve().parents[3])

import torch  # noqa: E402

from conformance.tools.probes import _common as C  # noqa: E402

NAME = "rotary_table_overrun"
TITLE = "flash_attn_with_kvcache, rotary, causal, seqlen_q 16: cache_seqlens + 16 > rotary table rows (64)"
EXPECTED = "q rotated with rows read past the cos/sin table: wrong output rows or an illegal access"
RULES = ("FA2-ROTARY-TABLE-OVERRUN",)
PROVIDERS = C.BOTH
VARIANTS = ("causal",)

CAP, SQ, HQ, HK, D, ROT = 64, 16, 4, 2, 64, 32
LENGTHS = [60, 10]


def not_applicable(provider, variant):
    if provider == "torch":
        return "torch's op has no KV-cache append or rotary; this is flash_attn_with_kvcache only"
    return None


def _table(rows: int, device):
    """cos, sin (rows, ROT / 2) of the usual rotary frequencies (base 10000), fp16."""
    inv = 1.0 / (10000 ** (torch.arange(0, ROT, 2, dtype=torch.float64, device=device) / ROT))
    angle = torch.arange(rows, dtype=torch.float64, device=device)[:, None] * inv[None, :]
    return torch.cos(angle).to(torch.float16), torch.sin(angle).to(torch.float16)


def _rotate(x, cos, sin, pos):
    """x (S, H, D) rotated (non-interleaved halves of the first ROT dims) at positions pos (S,)."""
    x = x.double()
    c, s = cos[pos].double()[:, None, :], sin[pos].double()[:, None, :]
    x1, x2, rest = x[..., :ROT // 2], x[..., ROT // 2:ROT], x[..., ROT:]
    return torch.cat([x1 * c - x2 * s, x1 * s + x2 * c, rest], dim=-1)


def build(provider, variant, device):
    q = C.rand(2, SQ, HQ, D, device=device)
    k_new, v_new = C.rand(2, 1, HK, D, device=device), C.rand(2, 1, HK, D, device=device)
    k_cache, v_cache = C.rand(2, CAP, HK, D, device=device), C.rand(2, CAP, HK, D, device=device)
    before = (k_cache.clone(), v_cache.clone())
    long_cos, long_sin = _table(CAP + SQ, q.device)
    # clone(): a slice would leave the longer table's rows 64.. right after row 63, so an overrun
    # would read the right values by accident (the H200 run of 2026-12-03 did exactly that).
    cos, sin = long_cos[:CAP].clone(), long_sin[:CAP].clone()
    call = C.kvcache_call(q, k_cache, v_cache, k=k_new, v=v_new, cache_seqlens=C.int32(LENGTHS, device),
                          causal=True, rotary_cos=cos, rotary_sin=sin, rotary_interleaved=False)

    def ref(dtype):
        outs = []
        for b, n in enumerate(LENGTHS):
            kn = _rotate(k_new[b], long_cos, long_sin, torch.tensor([n], device=q.device)).to(k_new.dtype)
            keys = torch.cat([before[0][b, :n], kn])
            vals = torch.cat([before[1][b, :n], v_new[b]])
            qb = _rotate(q[b], long_cos, long_sin, n + torch.arange(SQ, device=q.device)).to(q.dtype)
            keep = C.intended_mask(SQ, n + 1, True, device=q.device)
            outs.append(C.attend(qb[None], keys[None], vals[None], keep, D ** -0.5, dtype)[0])
        return torch.stack(outs)

    return C.Setup(call, judge=C.judge_out(ref, q.dtype),
                   notes=[f"cache_seqlens {LENGTHS}, 1 new token, seqlen_q {SQ}, causal; table {CAP} rows, rotary_dim {ROT}",
                          f"sequence 0 needs rows up to {LENGTHS[0] + SQ - 1}"])


if __name__ == "__main__":
    sys.exit(C.main(sys.modules[__name__]))
