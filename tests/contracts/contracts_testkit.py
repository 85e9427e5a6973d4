"""Valid FA-2 inputs and, per rule, inputs that break only that rule.

Big shapes use ``device="meta"`` so nothing is allocated. ``BREAKING`` must name every rule in
``contracts.RULES``; the catalog test fails when a rule has no breaking case.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from contracts import (
    dense_reasons,
    kvcache_reasons,
    kvpacked_reasons,
    qkvpacked_reasons,
    varlen_kvpacked_reasons,
    varlen_qkvpacked_reasons,
    varlen_reasons,
)

F16, BF16, F32, I32, I64 = torch.float16, torch.bfloat16, torch.float32, torch.int32, torch.int64
REASONS = {"dense": dense_reasons, "varlen": varlen_reasons, "kvcache": kvcache_reasons,
           "qkvpacked": qkvpacked_reasons, "kvpacked": kvpacked_reasons,
           "varlen_qkvpacked": varlen_qkvpacked_reasons, "varlen_kvpacked": varlen_kvpacked_reasons}


def dense_inputs(b=2, sq=16, sk=16, hq=4, hk=2, d=64, dv=None, dtype=F16, device="cpu") -> dict:
    """q: (b, sq, hq, d), k: (b, sk, hk, d), v: (b, sk, hk, dv)."""
    dv = d if dv is None else dv
    return {
        "q": torch.empty(b, sq, hq, d, dtype=dtype, device=device),
        "k": torch.empty(b, sk, hk, d, dtype=dtype, device=device),
        "v": torch.empty(b, sk, hk, dv, dtype=dtype, device=device),
    }


def cu(lengths, device="cpu", dtype=I32) -> torch.Tensor:
    """(B+1,) cumulative lengths starting at 0."""
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=dtype, device=device)


def varlen_inputs(lq=(5, 11), lk=None, hq=4, hk=2, d=64, dtype=F16, device="cpu") -> dict:
    """q: (sum lq, hq, d), k/v: (sum lk, hk, d), cu_seqlens (B+1,) int32, true max lengths."""
    lk = lq if lk is None else lk
    return {
        "q": torch.empty(sum(lq), hq, d, dtype=dtype, device=device),
        "k": torch.empty(sum(lk), hk, d, dtype=dtype, device=device),
        "v": torch.empty(sum(lk), hk, d, dtype=dtype, device=device),
        "cu_seqlens_q": cu(lq, device),
        "cu_seqlens_k": cu(lk, device),
        "max_seqlen_q": max(lq, default=0),
        "max_seqlen_k": max(lk, default=0),
    }


def paged_varlen_inputs(lq=(3, 4), lk=(300, 40), page=256, pages_per_seq=2, num_blocks=4, hq=4, hk=2, d=64) -> dict:
    """Varlen q with a paged k/v cache: k/v (num_blocks, page, hk, d), block_table (B, pages_per_seq)."""
    args = varlen_inputs(lq, lk, hq=hq, hk=hk, d=d)
    args["k"] = torch.empty(num_blocks, page, hk, d, dtype=F16)
    args["v"] = torch.empty(num_blocks, page, hk, d, dtype=F16)
    args["block_table"] = torch.arange(len(lq) * pages_per_seq, dtype=I32).reshape(len(lq), pages_per_seq) % num_blocks
    return args


def kvcache_inputs(b=2, sq=1, s_cache=64, hq=4, hk=2, d=64, s_new=None, cache_len=(10, 20), paged=False,
                   page=256, pages_per_seq=2, num_blocks=4) -> dict:
    """q: (b, sq, hq, d); caches (b, s_cache, hk, d) or paged (num_blocks, page, hk, d); new k/v (b, s_new, hk, d)."""
    args: dict[str, Any] = {"q": torch.empty(b, sq, hq, d, dtype=F16)}
    if paged:
        args["k_cache"] = torch.empty(num_blocks, page, hk, d, dtype=F16)
        args["v_cache"] = torch.empty(num_blocks, page, hk, d, dtype=F16)
        args["block_table"] = torch.arange(b * pages_per_seq, dtype=I32).reshape(b, pages_per_seq) % num_blocks
    else:
        args["k_cache"] = torch.empty(b, s_cache, hk, d, dtype=F16)
        args["v_cache"] = torch.empty(b, s_cache, hk, d, dtype=F16)
    args["cache_seqlens"] = torch.tensor(cache_len, dtype=I32)
    if s_new is not None:
        args["k"] = torch.empty(b, s_new, hk, d, dtype=F16)
        args["v"] = torch.empty(b, s_new, hk, d, dtype=F16)
    return args


def qkvpacked_inputs(b=2, s=16, h=4, d=64, n=3, dtype=F16, device="cpu") -> dict:
    """qkv: (b, s, n, h, d) (n = 3 is the legal packing)."""
    return {"qkv": torch.empty(b, s, n, h, d, dtype=dtype, device=device)}


def kvpacked_inputs(b=2, sq=16, sk=16, hq=4, hk=2, d=64, n=2, dtype=F16, device="cpu") -> dict:
    """q: (b, sq, hq, d), kv: (b, sk, n, hk, d)."""
    return {"q": torch.empty(b, sq, hq, d, dtype=dtype, device=device),
            "kv": torch.empty(b, sk, n, hk, d, dtype=dtype, device=device)}


def varlen_qkvpacked_inputs(lengths=(5, 11), h=4, d=64, n=3, device="cpu") -> dict:
    """qkv: (sum lengths, n, h, d), cu_seqlens (B+1,) int32, max_seqlen."""
    return {"qkv": torch.empty(sum(lengths), n, h, d, dtype=F16, device=device),
            "cu_seqlens": cu(lengths, device), "max_seqlen": max(lengths, default=0)}


def varlen_kvpacked_inputs(lq=(5, 11), lk=None, hq=4, hk=2, d=64, n=2, device="cpu") -> dict:
    """q: (sum lq, hq, d), kv: (sum lk, n, hk, d), cu_seqlens_q/k (B+1,) int32, true max lengths."""
    lk = lq if lk is None else lk
    return {"q": torch.empty(sum(lq), hq, d, dtype=F16, device=device),
            "kv": torch.empty(sum(lk), n, hk, d, dtype=F16, device=device),
            "cu_seqlens_q": cu(lq, device), "cu_seqlens_k": cu(lk, device),
            "max_seqlen_q": max(lq, default=0), "max_seqlen_k": max(lk, default=0)}


def rotary(seqlen_ro=64, rotary_dim=32, dtype=F16) -> dict:
    """rotary_cos / rotary_sin: (seqlen_ro, rotary_dim / 2)."""
    return {"rotary_cos": torch.empty(seqlen_ro, rotary_dim // 2, dtype=dtype),
            "rotary_sin": torch.empty(seqlen_ro, rotary_dim // 2, dtype=dtype)}


@dataclass
class Case:
    """One call: which check, its arguments, and a label for test ids."""

    kind: str
    args: dict
    label: str = ""
    extra: dict = field(default_factory=dict)
    providers: tuple[str, ...] = ("flash_attn", "torch")

    def reasons(self, **overrides):
        fn = REASONS[self.kind]
        return fn(**{**self.args, **self.extra, **overrides})

    def rule_ids(self, **overrides) -> list[str]:
        return [r.rule for r in self.reasons(**overrides)]


def _with(base: dict, **changes) -> dict:
    return {**base, **changes}


def _strided_cu(lengths) -> torch.Tensor:
    full = cu(lengths)
    spread = torch.zeros(2 * full.numel(), dtype=I32)
    spread[::2] = full
    return spread[::2]


def _last_dim_strided(b, s, h, d, dtype=F16) -> torch.Tensor:
    return torch.empty(b, s, d, h, dtype=dtype).transpose(-1, -2)


def _breaking_cases() -> dict[str, list[Case]]:
    dense = dense_inputs()
    var = varlen_inputs()
    cases: dict[str, list[Case]] = {
        "FA2-RANK": [
            Case("dense", _with(dense, q=torch.empty(2, 16, 64, dtype=F16)), "dense q 3-D"),
            Case("varlen", _with(var, q=torch.empty(1, 16, 4, 64, dtype=F16)), "varlen q 4-D"),
            Case("kvcache", _with(kvcache_inputs(), k_cache=[1, 2]), "kvcache cache not a tensor"),
        ],
        "FA2-DEVICE": [
            Case("dense", _with(dense, k=torch.empty(2, 16, 2, 64, dtype=F16, device="meta")), "k on meta"),
            Case("varlen", _with(var, cu_seqlens_k=torch.empty(3, dtype=I32, device="meta")), "cu_k on meta"),
        ],
        "FA2-ARCH": [
            Case("dense", dense, "sm75", {"caps": "sm75"}),
            Case("varlen", var, "flash_attn 2.7.0 on sm100", {"caps": "sm100", "provider": "flash_attn==2.7.0"}),
        ],
        "FA2-DTYPE": [Case("dense", dense_inputs(dtype=F32), "fp32"),
                      Case("kvcache", {**kvcache_inputs(), "q": torch.empty(2, 1, 4, 64, dtype=F32),
                                       "k_cache": torch.empty(2, 64, 2, 64, dtype=F32),
                                       "v_cache": torch.empty(2, 64, 2, 64, dtype=F32)}, "kvcache fp32")],
        "FA2-DTYPE-MATCH": [Case("dense", _with(dense, k=torch.empty(2, 16, 2, 64, dtype=BF16)), "k bf16")],
        "FA2-INDEX-DTYPE": [
            Case("varlen", _with(var, cu_seqlens_q=cu((5, 11), dtype=I64)), "cu int64"),
            Case("varlen", _with(var, cu_seqlens_k=None), "cu_k missing"),
            Case("kvcache", _with(kvcache_inputs(), cache_seqlens=torch.tensor([10, 20])), "cache_seqlens int64"),
        ],
        "FA2-INDEX-CONTIGUOUS": [Case("varlen", _with(var, cu_seqlens_q=_strided_cu((5, 11))), "strided cu")],
        "FA2-INDEX-SHAPE": [
            Case("varlen", _with(var, seqused_k=torch.tensor([1, 2, 3], dtype=I32)), "seqused_k (B+1,)"),
            Case("varlen", _with(var, cu_seqlens_k=cu((5, 6, 5))), "cu_k longer than cu_q"),
            Case("kvcache", _with(kvcache_inputs(), cache_seqlens=torch.tensor([1], dtype=I32)), "cache_seqlens (1,)"),
        ],
        "FA2-LAST-DIM-STRIDE": [
            Case("dense", _with(dense, q=_last_dim_strided(2, 16, 4, 64)), "torch q strided", {"provider": "torch"}),
            Case("kvcache", _with(kvcache_inputs(), k_cache=_last_dim_strided(2, 64, 2, 64)), "flash_attn k_cache strided"),
        ],
        "FA2-HEAD-DIM-MAX": [Case("dense", dense_inputs(d=264), "d=264"),
                             Case("dense", dense_inputs(d=257), "d=257 pads to 264", providers=("flash_attn",))],
        "FA2-HEAD-DIM-MULTIPLE": [Case("dense", dense_inputs(d=60), "torch d=60", {"provider": "torch"})],
        "FA2-HEAD-DIM-V": [Case("dense", dense_inputs(d=192, dv=128), "NSA dk=192 dv=128")],
        "FA2-QK-SHAPE": [Case("dense", _with(dense, k=torch.empty(3, 16, 2, 64, dtype=F16),
                                             v=torch.empty(3, 16, 2, 64, dtype=F16)), "k batch 3")],
        "FA2-KV-SHAPE": [
            Case("dense", _with(dense, v=torch.empty(2, 16, 1, 64, dtype=F16)), "v 1 head"),
            Case("kvcache", _with(kvcache_inputs(b=2), k_cache=torch.empty(1, 64, 2, 64, dtype=F16),
                                  v_cache=torch.empty(1, 64, 2, 64, dtype=F16)), "cache batch 1 < 2"),
        ],
        "FA2-HEADS-KV-ZERO": [Case("dense", dense_inputs(hk=0), "hk=0"),
                              Case("varlen", varlen_inputs(hk=0), "varlen hk=0")],
        "FA2-HEADS-DIVISIBLE": [Case("dense", dense_inputs(hq=5, hk=2), "5 % 2")],
        "FA2-BATCH-EMPTY": [Case("dense", dense_inputs(b=0), "dense b=0", providers=("flash_attn",)),
                            Case("varlen", varlen_inputs(lq=(), lk=()), "varlen b=0")],
        "FA2-DENSE-EMPTY-Q": [Case("dense", dense_inputs(sq=0), "sq=0")],
        "FA2-DENSE-EMPTY-K": [Case("dense", dense_inputs(sk=0), "sk=0")],
        "FA2-PAGED-BLOCK-SIZE": [Case("varlen", paged_varlen_inputs(page=128, lk=(200, 40)), "page 128")],
        "FA2-PAGED-COMBINATION": [Case("kvcache", _with(kvcache_inputs(paged=True), cache_batch_idx=torch.tensor([1, 0], dtype=I32)), "paged + batch idx")],
        "FA2-KVCACHE-APPEND": [
            Case("kvcache", {**kvcache_inputs(), "k": torch.empty(2, 1, 2, 64, dtype=F16)}, "k without v"),
        ],
        "FA2-NUM-SPLITS": [Case("kvcache", kvcache_inputs(), "129 splits", {"num_splits": 129})],
        "FA2-DROPOUT-RANGE": [Case("dense", dense, "p=1", {"dropout_p": 1.0}),
                              Case("varlen", var, "p<0", {"dropout_p": -0.1})],
        "FA2-RETURN-SOFTMAX": [Case("dense", dense, "torch debug mask p=0", {"provider": "torch", "return_softmax": True})],
        # torch's op has no softcap argument at all.
        "FA2-SOFTCAP-DROPOUT": [Case("dense", dense, "softcap+dropout", {"softcap": 30.0, "dropout_p": 0.1},
                                     providers=("flash_attn",))],
        # torch's FA-2 build refuses alibi_slopes altogether (FA2-ARG-UNSUPPORTED).
        "FA2-ALIBI": [Case("dense", dense, "fp16 slopes", {"alibi_slopes": torch.empty(4, dtype=F16)},
                           providers=("flash_attn",)),
                      Case("dense", dense, "slopes (3,)", {"alibi_slopes": torch.empty(3, dtype=F32)},
                           providers=("flash_attn",))],
        "FA2-GRID-LIMIT": [
            Case("dense", dense_inputs(b=65536, sq=1, sk=1, hq=1, hk=1, device="meta"), "b=65536"),
            Case("dense", dense_inputs(b=1, sq=1, sk=1, hq=65536, hk=1, device="meta"), "h=65536"),
            Case("kvcache", {"q": torch.empty(4096, 1, 32, 64, dtype=F16, device="meta"),
                             "k_cache": torch.empty(4096, 64, 32, 64, dtype=F16, device="meta"),
                             "v_cache": torch.empty(4096, 64, 32, 64, dtype=F16, device="meta")},
                 "split-KV b*h", {"num_splits": 2}),
        ],
        "FA2-INT32-OFFSET": [
            # PR #2260's repro: b=8300, seqlen 1, 16 heads, d=128.
            Case("dense", dense_inputs(b=8300, sq=1, sk=1, hq=16, hk=16, d=128, device="meta"), "PR 2260", {"backward": True}),
            Case("varlen", {**varlen_inputs(lq=(1,), hq=16, hk=16, d=128, device="meta"),
                            "q": torch.empty(2**21, 16, 128, dtype=F16, device="meta"),
                            "cu_seqlens_q": torch.empty(2, dtype=I32, device="meta"),
                            "cu_seqlens_k": torch.empty(2, dtype=I32, device="meta"),
                            "k": torch.empty(2**21, 16, 128, dtype=F16, device="meta"),
                            "v": torch.empty(2**21, 16, 128, dtype=F16, device="meta"),
                            "max_seqlen_q": 2**21, "max_seqlen_k": 2**21},
                 "varlen 2M tokens", {"backward": True}),
        ],
        "FA2-BWD-GARBAGE-GRADS": [
            Case("dense", dense_inputs(d=200), "sm86 d=200", {"caps": "sm86", "dropout_p": 0.1, "backward": True},
                 providers=("flash_attn",)),
            Case("dense", dense_inputs(d=193), "sm120 d=193 pads to 200", {"caps": "sm120", "dropout_p": 0.1, "requires_grad": True},  # the old name of backward
                 providers=("flash_attn",)),
        ],
        "FA2-VARLEN-GQA-DECODE": [Case("varlen", varlen_inputs(lq=(1, 0, 1), lk=(5, 6, 7)), "empty query seq")],
        "FA2-CAUSAL-DROPPED": [Case("varlen", _with(varlen_inputs(hq=2, hk=2), max_seqlen_q=1), "max_q=1 lies", {"causal": True})],
        "FA2-WINDOW-RIGHT-CLAMPED": [
            Case("dense", dense_inputs(sq=10, sk=2), "wr=2 >= sk=2, no left window", {"window_size": (-1, 2)}),
            Case("dense", dense_inputs(sq=5, sk=2), "wr=4 > sk=2 with left window 0", {"window_size": (0, 4)}),
        ],
        "FA2-VARLEN-EMPTY-Q": [Case("varlen", varlen_inputs(lq=(0,), lk=(5,)), "one sequence, no query")],
        "FA2-WINDOW-LEFT-ONLY": [
            Case("dense", dense_inputs(sq=10, sk=4), "left window 2, right -1, sq > sk + 1", {"window_size": (2, -1)}),
            Case("varlen", varlen_inputs(lq=(9, 3), lk=(2, 6)), "max_q 9 > max_k 6 + 1", {"window_size": (3, -1)}),
        ],
        "FA2-BWD-ARCH": [
            Case("dense", dense_inputs(d=224), "2.7.2 sm86 d=224 dropout", {"caps": "sm86", "dropout_p": 0.1, "backward": True,
                                                                            "provider": "flash_attn==2.7.2"}),
            Case("dense", dense_inputs(d=200), "2.5.0 sm86 d=200 no dropout", {"caps": "sm86", "backward": True,
                                                                               "provider": "flash_attn==2.5.0"}),
            Case("varlen", varlen_inputs(d=224), "2.6.0 sm89 d=224 no dropout", {"caps": "sm89", "backward": True,
                                                                                 "provider": "flash_attn==2.6.0"}),
        ],
        "FA2-INFERENCE-ONLY": [
            Case("varlen", paged_varlen_inputs(), "paged varlen backward", {"backward": True}, providers=("flash_attn",)),
            Case("varlen", paged_varlen_inputs(), "paged varlen backward, torch 2.13", {"backward": True,
                                                                                      "provider": "torch==2.13"}),
            Case("varlen", _with(var, seqused_k=torch.tensor([3, 11], dtype=I32)), "torch seqused_k backward",
                 {"backward": True, "provider": "torch"}),
        ],
        "FA2-SOFTMAX-SCALE": [
            Case("dense", dense, "nan", {"softmax_scale": float("nan")}),
            Case("dense", dense, "negative", {"softmax_scale": -0.125}),
            Case("kvcache", kvcache_inputs(), "inf", {"softmax_scale": float("inf")}),
        ],
        "FA2-ROTARY-NEW-KV": [Case("kvcache", {**kvcache_inputs(), **rotary()}, "cos/sin without new k/v",
                                   providers=("flash_attn",))],
        "FA2-ROTARY-DIM": [
            Case("kvcache", {**kvcache_inputs(s_new=1), **rotary(rotary_dim=24)}, "rotary_dim 24 % 16", providers=("flash_attn",)),
            Case("kvcache", {**kvcache_inputs(s_new=1, d=64), **rotary(rotary_dim=96)}, "rotary_dim 96 > d 64",
                 providers=("flash_attn",)),
        ],
        "FA2-ROTARY-TABLE": [
            Case("kvcache", {**kvcache_inputs(s_new=1), **rotary(seqlen_ro=63)}, "63 rows < cache 64", providers=("flash_attn",)),
            Case("kvcache", {**kvcache_inputs(s_new=1), **rotary(dtype=F32)}, "fp32 cos/sin", providers=("flash_attn",)),
            Case("kvcache", {**kvcache_inputs(s_new=1), **rotary(), "rotary_sin": torch.empty(64, 8, dtype=F16)},
                 "sin shape differs", providers=("flash_attn",)),
            Case("kvcache", {**kvcache_inputs(s_new=1), "rotary_sin": torch.empty(64, 16, dtype=F16)}, "sin without cos",
                 providers=("flash_attn",)),
            Case("kvcache", {**kvcache_inputs(s_new=1), **rotary(), "rotary_cos": torch.empty(16, 64, dtype=F16).t()},
                 "cos not contiguous", providers=("flash_attn",)),
        ],
        "FA2-PACKED-SHAPE": [
            Case("qkvpacked", qkvpacked_inputs(n=4), "qkv with 4 entries"),
            Case("kvpacked", kvpacked_inputs(n=1), "kv with 1 entry"),
            Case("varlen_qkvpacked", varlen_qkvpacked_inputs(n=2), "varlen qkv with 2 entries"),
            Case("varlen_kvpacked", varlen_kvpacked_inputs(n=3), "varlen kv with 3 entries"),
        ],
        "FA2-ARG-UNSUPPORTED": [
            Case("dense", dense, "softcap on 2.5.9", {"softcap": 30.0, "provider": "flash_attn==2.5.9"}),
            Case("dense", dense, "softcap on torch's op", {"softcap": 30.0, "provider": "torch"}),
            Case("varlen", paged_varlen_inputs(), "varlen block_table on 2.5.6", {"provider": "flash_attn==2.5.6"}),
            Case("kvcache", _with(kvcache_inputs(), cache_leftpad=torch.zeros(2, dtype=I32)), "cache_leftpad on 2.6.0",
                 {"provider": "flash_attn==2.6.0"}),
            Case("kvcache", kvcache_inputs(), "return_softmax_lse on 2.5.9",
                 {"return_softmax_lse": True, "provider": "flash_attn==2.5.9"}),
        ],
        # --- strict ---
        "FA2-CU-SEQLENS-START": [Case("varlen", _with(var, cu_seqlens_q=torch.tensor([1, 5, 16], dtype=I32)), "cu_q[0]=1", {"strict": True})],
        "FA2-CU-SEQLENS-DECREASING": [Case("varlen", {**varlen_inputs(lq=(5, 5, 6), lk=(10, 0, 6)),
                                                      "cu_seqlens_k": torch.tensor([0, 10, 8, 16], dtype=I32)},
                                           "cu_k drops", {"strict": True})],
        "FA2-CU-SEQLENS-OVERRUN": [Case("varlen", _with(var, cu_seqlens_q=torch.tensor([0, 5, 17], dtype=I32), max_seqlen_q=12),
                                        "cu_q[-1] > T", {"strict": True})],
        "FA2-MAX-SEQLEN-Q-LOW": [Case("varlen", _with(var, max_seqlen_q=10), "max_q 10 < 11", {"strict": True})],
        "FA2-MAX-SEQLEN-K-LOW": [Case("varlen", _with(var, max_seqlen_k=10), "max_k 10 < 11", {"strict": True})],
        "FA2-SEQUSED-K-OVERRUN": [Case("varlen", _with(var, seqused_k=torch.tensor([6, 3], dtype=I32)), "6 > 5", {"strict": True})],
        "FA2-KV-CACHE-OVERFLOW": [
            Case("kvcache", kvcache_inputs(paged=True, s_new=4, cache_len=(510, 0)), "paged 514 > 512", {"strict": True}),
            Case("kvcache", kvcache_inputs(s_new=4, cache_len=(62, 0)), "row 66 > 64", {"strict": True}),
            Case("varlen", paged_varlen_inputs(lk=(600, 40), num_blocks=8), "paged varlen 600 > 512", {"strict": True}),
        ],
        "FA2-BLOCK-TABLE-RANGE": [
            Case("kvcache", _with(kvcache_inputs(paged=True, cache_len=(300, 10)),
                                  block_table=torch.tensor([[0, 7], [1, 9]], dtype=I32)), "page 7 of 4", {"strict": True}),
        ],
        "FA2-ROTARY-TABLE-OVERRUN": [
            Case("kvcache", {**kvcache_inputs(sq=16, s_new=1, cache_len=(50, 10)), **rotary()},
                 "causal: 50 + 16 queries > 64 rows", {"causal": True, "strict": True}, providers=("flash_attn",)),
            Case("kvcache", {**kvcache_inputs(sq=16, s_new=1, cache_len=(0, 49)), **rotary()},
                 "local (0, 32): 49 + 16 > 64 rows", {"window_size": (0, 32), "strict": True}, providers=("flash_attn",)),
            Case("kvcache", {**kvcache_inputs(sq=16, s_new=1, cache_len=(0, 0)), **rotary(), "cache_seqlens": 49},
                 "int cache_seqlens 49 + 16 > 64", {"causal": True, "strict": True}, providers=("flash_attn",)),
        ],
    }
    for rid, items in cases.items():
        for case in items:
            case.label = f"{rid}: {case.label}"
            if "provider" in case.extra:
                case.providers = (case.extra["provider"].split("==")[0],)
    return cases


BREAKING: dict[str, list[Case]] = _breaking_cases()

VALID: list[Case] = [
    Case("dense", dense_inputs(), "dense GQA"),
    Case("dense", dense_inputs(d=59), "dense d=59 (flash_attn pads)", providers=("flash_attn",)),
    Case("dense", dense_inputs(b=0), "dense b=0 (torch returns empty)", providers=("torch",)),
    Case("dense", dense_inputs(sq=1, sk=97, hq=8, hk=1), "dense decode", {"causal": True}),
    Case("dense", dense_inputs(sq=113, sk=203), "dense window", {"window_size": (63, 0)}),
    Case("dense", dense_inputs(d=192), "dense d=192 dropout sm86", {"caps": "sm86", "dropout_p": 0.1, "requires_grad": True}),
    Case("dense", dense_inputs(d=256), "dense d=256 dropout sm80", {"caps": "sm80", "dropout_p": 0.1, "requires_grad": True}),
    Case("dense", dense_inputs(d=256), "dense d=256 dropout sm86 no grad", {"caps": "sm86", "dropout_p": 0.1, "requires_grad": False}),
    Case("dense", dense_inputs(sq=2, sk=2), "dense wl >= sk (no-op)", {"window_size": (5, 0)}),
    Case("dense", dense_inputs(b=8300, sq=1, sk=1, hq=16, hk=16, d=128, device="meta"), "big batch, no grad", {"requires_grad": False}),
    Case("varlen", varlen_inputs(), "varlen"),
    Case("varlen", varlen_inputs(lq=(5, 0, 11), lk=(0, 3, 12)), "varlen empty sequences", {"causal": True}),
    Case("varlen", varlen_inputs(lq=(1, 1, 1), lk=(5, 6, 7)), "varlen GQA decode", {"causal": True}),
    Case("varlen", _with(varlen_inputs(), seqused_k=torch.tensor([3, 11], dtype=I32)), "varlen seqused_k"),
    Case("varlen", paged_varlen_inputs(), "varlen paged"),
    Case("varlen", paged_varlen_inputs(), "varlen paged, forward only", {"backward": False}),
    Case("varlen", _with(varlen_inputs(), seqused_k=torch.tensor([3, 11], dtype=I32)), "flash_attn seqused_k backward",
         {"backward": True}, providers=("flash_attn",)),
    Case("varlen", varlen_inputs(device="meta"), "varlen meta"),
    Case("kvcache", kvcache_inputs(), "kvcache decode"),
    Case("kvcache", kvcache_inputs(s_new=1, sq=1), "kvcache append"),
    Case("kvcache", kvcache_inputs(paged=True, s_new=2), "kvcache paged append"),
    Case("kvcache", {**kvcache_inputs(), "cache_seqlens": 7}, "kvcache int cache_seqlens"),
    Case("dense", dense_inputs(d=256), "dense d=256 dropout sm86 forward only", {"caps": "sm86", "dropout_p": 0.1,
                                                                                  "backward": False}),
    Case("dense", dense_inputs(d=192), "2.5.0 sm86 d=192 backward", {"caps": "sm86", "backward": True,
                                                                      "provider": "flash_attn==2.5.0"},
         providers=("flash_attn",)),
    Case("dense", dense_inputs(d=256), "2.6.2 sm86 d=256 backward without dropout", {"caps": "sm86", "backward": True,
                                                                                      "provider": "flash_attn==2.6.2"},
         providers=("flash_attn",)),
    Case("dense", dense_inputs(), "explicit scale, deterministic, probs", {"softmax_scale": 0.1, "deterministic": True,
                                                                          "dropout_p": 0.1, "return_softmax": True}),
    Case("kvcache", {**kvcache_inputs(s_new=1), **rotary()}, "kvcache rotary append", {"rotary_interleaved": False},
         providers=("flash_attn",)),
    Case("kvcache", {**kvcache_inputs(s_new=1, d=59), **rotary(rotary_dim=64)}, "kvcache rotary_dim 64 <= padded d 64",
         providers=("flash_attn",)),
    Case("kvcache", {**kvcache_inputs(paged=True, s_new=2), **rotary(seqlen_ro=512)}, "kvcache paged rotary",
         {"return_softmax_lse": True}, providers=("flash_attn",)),
    Case("kvcache", {**kvcache_inputs(sq=16, s_new=1, cache_len=(48, 0)), **rotary()},
         "kvcache rotary causal sq=16 at the table's end (48 + 16 = 64 rows)", {"causal": True},
         providers=("flash_attn",)),
    Case("kvcache", {**kvcache_inputs(sq=16, s_new=1, cache_len=(63, 62)), **rotary()},
         "kvcache rotary sq=16 without a mask (one row per sequence)", providers=("flash_attn",)),
    Case("kvcache", {**kvcache_inputs(sq=16, s_new=1, cache_len=(63, 62)), **rotary()},
         "kvcache rotary window >= capacity (no mask after normalisation)", {"window_size": (64, 70)},
         providers=("flash_attn",)),
    Case("qkvpacked", qkvpacked_inputs(), "qkvpacked", {"causal": True, "softcap": 0.0}),
    Case("kvpacked", kvpacked_inputs(sq=1, sk=97), "kvpacked GQA decode", {"causal": True}),
    Case("varlen_qkvpacked", varlen_qkvpacked_inputs(), "varlen qkvpacked", {"dropout_p": 0.17, "backward": True}),
    Case("varlen_kvpacked", varlen_kvpacked_inputs(), "varlen kvpacked", {"window_size": (3, 3)}),
]
for _case in VALID:
    _case.label = f"valid: {_case.label}"


def rule_ids(fn: Callable, *args, **kwargs) -> list[str]:
    return [r.rule for r in fn(*args, **kwargs)]
