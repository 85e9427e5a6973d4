"""Differential fuzzing of the FA-2 contract over every entry point of both providers (GPU).

    python conformance/tools/device/contract_fuzz.py --calls 12000 --out "$OUT/contract_fuzz"   # one H200: < 8 min
    python conformance/tools/device/contract_fuzz.py --dry-run --calls 120 --out /tmp/cf         # CPU: the plumbing
    bash conformance/tools/device/gpu_run.sh contract_fuzz       # the lent GPUs (wheels from .device-wheels/)

Calls, drawn from a seeded ``random.Random`` (no hypothesis): flash_attn's seven entry points
(``flash_attn_func``, ``_varlen_func``, ``_qkvpacked_func``, ``_kvpacked_func``,
``_varlen_qkvpacked_func``, ``_varlen_kvpacked_func``, ``flash_attn_with_kvcache`` with rotary,
paged caches, cache_leftpad, new k/v, num_splits) and torch's
``aten._flash_attention_forward`` (dense and varlen). About 70% are legal calls (small shapes,
every argument: causal, windows, softcap, alibi, softmax_scale, GQA, odd head dims, strides);
the rest break one thing (dtype, head dims, heads, packing, rotary table, scale, softcap with
dropout, index dtype, ...).

For each call: the contract's verdict (strict mode, CPU copies of the tensors, the GPU's caps),
then the kernel in a worker subprocess, then the output against a float64 reference of what the
arguments say (``contracts.fa2_mask.intended_mask`` per sequence, softcap, ALiBi, rotary applied
to the new keys and q), within ``contracts.tolerances`` (``conformance.tools.probes._common.compare``).
Workers (``--workers``, default 4) each take batches of calls; a CUDA error poisons a process, so a
worker exits after one and is restarted, as after a signal or a hang (``--case-timeout``). Calls a
crash-kind rule rejects are not run (the probes show those one at a time) unless
``--run-crash-calls``.

Classification: accepted and ok = true accept; accepted and the kernel failed (error, signal,
hang, wrong or non-finite numbers) = FALSE ACCEPT (must be 0); rejected and the kernel failed =
true reject; rejected and the kernel ran and matched = false reject, listed by rule (semantics
rules are expected there when the asked and the computed mask agree on these shapes only).
Writes ``calls.csv``, ``summary.json`` and ``summary.md`` to ``--out`` (default ``$OUT``) and prints a
short table last. ``--dry-run`` replaces the kernels by a CPU stand-in (the reference, refusing
the calls the contract calls clean errors, dying by SIGFPE on zero KV heads) to test the logic.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import queue
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[3]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
from conformance.tools.subprocesses import how_it_ended  # noqa: E402
from contracts.fa2_mask import intended_mask  # noqa: E402

PREFIX = "CFUZZ "
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
FLASH_ENTRIES = ("dense", "varlen", "qkvpacked", "kvpacked", "varlen_qkvpacked", "varlen_kvpacked", "kvcache")
TORCH_ENTRIES = ("aten_dense", "aten_varlen")
FLASH_FN = {"dense": "flash_attn_func", "varlen": "flash_attn_varlen_func", "qkvpacked": "flash_attn_qkvpacked_func",
            "kvpacked": "flash_attn_kvpacked_func", "varlen_qkvpacked": "flash_attn_varlen_qkvpacked_func",
            "varlen_kvpacked": "flash_attn_varlen_kvpacked_func", "kvcache": "flash_attn_with_kvcache"}
HEAD_DIMS = (16, 32, 40, 59, 64, 72, 80, 96, 111, 128, 160, 192, 224, 256)
MUTATIONS = {
    "common": ("fp32", "k_dtype", "head_dim_big", "heads_not_divisible", "heads_kv_zero", "scale_nan",
               "scale_negative"),
    "dropout": ("softcap_dropout", "dropout_one"),
    "varlen": ("cu_int64", "max_q_zero"),
    "packed": ("pack_n",),
    "kvcache": ("rotary_no_new_kv", "rotary_dim_odd", "rotary_short", "rotary_dtype", "paged_leftpad",
                "num_splits_big", "page_128"),
    "torch": ("head_dim_odd", "debug_mask_no_dropout"),
}


@dataclass
class Spec:
    """One call, as data (JSON-able). Shapes: see ``build``."""

    id: int
    provider: str
    entry: str
    dtype: str = "fp16"
    b: int = 2
    hq: int = 4
    hk: int = 2
    d: int = 64
    sq: int = 16
    sk: int = 16
    lens_q: list = field(default_factory=list)
    lens_k: list = field(default_factory=list)
    causal: bool = False
    window: list = field(default_factory=lambda: [-1, -1])
    softcap: float = 0.0
    dropout: float = 0.0
    scale: float | None = None
    alibi: bool = False
    k_dtype: str | None = None
    pack_n: int | None = None
    index_dtype: str = "int32"
    max_q: int | None = None
    # kvcache
    s_new: int = 0
    cache_lens: list = field(default_factory=list)
    page: int | None = None
    leftpad: list | None = None
    rotary_dim: int = 0
    rotary_rows: int | None = None
    rotary_dtype: str | None = None
    rotary_interleaved: bool = True
    num_splits: int = 0
    debug_mask: bool = False
    mutation: str | None = None
    seed: int = 0

    def label(self) -> str:
        shape = (f"b={self.b} lens_q={self.lens_q} lens_k={self.lens_k}" if self.lens_q
                 else f"b={self.b} sq={self.sq} sk={self.sk}")
        extra = []
        for name in ("causal", "softcap", "dropout", "scale", "alibi", "s_new", "page", "rotary_dim", "num_splits"):
            value = getattr(self, name)
            if value not in (False, 0, 0.0, None):
                extra.append(f"{name}={value}")
        if self.window != [-1, -1]:
            extra.append(f"window={tuple(self.window)}")
        return (f"#{self.id} {self.provider}.{self.entry} {self.dtype} hq={self.hq} hk={self.hk} d={self.d} {shape} "
                f"{' '.join(extra)}" + (f" [{self.mutation}]" if self.mutation else ""))


# --- drawing calls -------------------------------------------------------------------------------


def _lens(rng: random.Random, b: int, top: int, low: int = 1) -> list[int]:
    return [rng.randint(low, top) for _ in range(b)]


def draw(rng: random.Random, cid: int, provider: str, entry: str, p_mutate: float = 0.3) -> Spec:
    """A legal call of ``entry`` (then, with probability ``p_mutate``, one broken thing)."""
    s = Spec(id=cid, provider=provider, entry=entry, seed=rng.randrange(2**31))
    s.dtype = rng.choice(("fp16", "bf16"))
    s.b = rng.randint(1, 3)
    s.hk = rng.choice((1, 2, 3, 4))
    s.hq = s.hk * rng.choice((1, 2, 3)) if entry not in ("qkvpacked", "varlen_qkvpacked") else s.hk
    s.d = rng.choice(HEAD_DIMS if provider == "flash_attn" else tuple(d for d in HEAD_DIMS if d % 8 == 0))
    s.causal = rng.random() < 0.4
    if rng.random() < 0.3:
        s.scale = rng.choice((0.05, 0.125, 0.3))
    varlen = entry in ("varlen", "varlen_qkvpacked", "varlen_kvpacked", "aten_varlen")
    if varlen:
        s.lens_q = _lens(rng, s.b, 96)
        s.lens_k = list(s.lens_q) if entry == "varlen_qkvpacked" else _lens(rng, s.b, 128)
        s.sq, s.sk = max(s.lens_q), max(s.lens_k)
    elif entry == "kvcache":
        s.sq = rng.choice((1, 1, 2, 7, 16))
        s.s_new = rng.choice((0, 0, 1, s.sq))
        s.page = rng.choice((None, None, 256))
        s.sk = 256 * rng.choice((1, 2)) if s.page else rng.choice((64, 100, 200))
        s.cache_lens = [rng.randint(0 if s.s_new else 1, s.sk - s.s_new) for _ in range(s.b)]
        if s.s_new and rng.random() < 0.5:
            s.rotary_dim = rng.choice([r for r in (16, 32, 48, 64) if r <= s.d] or [0])
            s.rotary_interleaved = rng.random() < 0.5
        if s.page is None and not s.rotary_dim and rng.random() < 0.2:  # rotary positions with leftpad: not modelled here
            s.leftpad = [rng.randint(0, max(n - 1, 0)) for n in s.cache_lens]
        s.num_splits = rng.choice((0, 0, 1, 3))
    else:
        s.sq = rng.randint(1, 160)
        s.sk = s.sq if entry == "qkvpacked" else rng.randint(1, 192)
    if rng.random() < 0.25:
        sk = s.sk
        s.window = [rng.randint(0, sk), rng.randint(0, sk)] if not s.causal else [rng.randint(0, sk), -1]
    if provider == "flash_attn" and rng.random() < 0.15:
        s.softcap = rng.choice((5.0, 30.0))
    if rng.random() < 0.15:
        s.alibi = True
    if rng.random() < p_mutate:
        _mutate(rng, s)
    return s


def _mutate(rng: random.Random, s: Spec) -> None:
    options = list(MUTATIONS["common"]) + list(MUTATIONS["dropout"] if s.entry != "kvcache" else ())
    if "packed" in s.entry:  # q, k, v share one tensor: no dtype or head-count mismatch to make
        options = [o for o in options if o not in ("k_dtype", "heads_not_divisible")]
    if s.lens_q:
        options += MUTATIONS["varlen"]
    if "packed" in s.entry:
        options += MUTATIONS["packed"]
    if s.entry == "kvcache":
        options += MUTATIONS["kvcache"]
    if s.provider == "torch":
        options = [o for o in options if o not in ("softcap_dropout",)] + list(MUTATIONS["torch"])
    m = rng.choice(options)
    s.mutation = m
    if m == "fp32":
        s.dtype = "fp32"
    elif m == "k_dtype":
        s.k_dtype = "bf16" if s.dtype == "fp16" else "fp16"
    elif m == "head_dim_big":
        s.d = rng.choice((264, 288))
    elif m == "heads_not_divisible":
        s.hk, s.hq = 2, 3
    elif m == "heads_kv_zero":
        s.hk = 0
        if "qkv" in s.entry:
            s.hq = 0
    elif m == "scale_nan":
        s.scale = float("nan")
    elif m == "scale_negative":
        s.scale = -0.125
    elif m == "softcap_dropout":
        s.softcap, s.dropout = 10.0, 0.1
    elif m == "dropout_one":
        s.dropout = 1.0
    elif m == "cu_int64":
        s.index_dtype = "int64"
    elif m == "max_q_zero":
        s.max_q = 0
    elif m == "pack_n":
        s.pack_n = 2 if "qkv" in s.entry else 1
    elif m == "rotary_no_new_kv":
        s.s_new, s.rotary_dim = 0, 16
        s.cache_lens = [max(n, 1) for n in s.cache_lens]
    elif m == "rotary_dim_odd":
        s.s_new, s.rotary_dim = max(s.s_new, 1), 24
    elif m == "rotary_short":
        s.s_new, s.rotary_dim, s.rotary_rows = max(s.s_new, 1), 16, 8
    elif m == "rotary_dtype":
        s.s_new, s.rotary_dim, s.rotary_dtype = max(s.s_new, 1), 16, "fp32"
    elif m == "paged_leftpad":
        s.page, s.sk, s.rotary_dim = 256, 256, 0
        s.cache_lens = [min(n, 256 - s.s_new) for n in s.cache_lens]
        s.leftpad = [0] * s.b
    elif m == "num_splits_big":
        s.num_splits = 200
    elif m == "page_128":
        s.page, s.sk = 128, 256
        s.cache_lens = [min(n, s.sk - s.s_new) for n in s.cache_lens]
        s.leftpad = None
    elif m == "head_dim_odd":
        s.d = 60
    elif m == "debug_mask_no_dropout":
        s.debug_mask, s.dropout = True, 0.0
    if s.entry == "kvcache" and s.s_new == 0:
        s.cache_lens = [max(n, 1) for n in s.cache_lens]


def draw_calls(n: int, seed: int, providers: list[str]) -> list[Spec]:
    """``n`` calls, entry points in turn (flash_attn's seven, torch's two), seeded."""
    rng = random.Random(seed)
    entries = [("flash_attn", e) for e in FLASH_ENTRIES if "flash_attn" in providers]
    entries += [("torch", e) for e in TORCH_ENTRIES if "torch" in providers]
    return [draw(rng, i, *entries[i % len(entries)]) for i in range(n)]


# --- building tensors and the call -----------------------------------------------------------------


def _cu(lengths) -> list[int]:
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return out


def build(s: Spec, device: str, fill: bool):
    """(kind for contracts.guard, bound arguments, plain tensors for the reference) of ``s`` on ``device``.

    dense q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D); varlen q (Tq, Hq, D), k/v (Tk, Hkv, D); packed qkv
    (B, S, 3, H, D) / (T, 3, H, D), kv (B, Sk, 2, Hkv, D) / (Tk, 2, Hkv, D); kvcache q (B, Sq, Hq, D),
    caches (B, S_cache, Hkv, D) or paged (pages, page, Hkv, D), new k/v (B, S_new, Hkv, D),
    rotary cos/sin (rows, rotary_dim / 2).
    """
    gen = torch.Generator(device="cpu").manual_seed(s.seed)
    qd = DTYPES[s.dtype]
    kd = DTYPES[s.k_dtype] if s.k_dtype else qd

    def t(*shape, dtype=qd):
        x = torch.randn(*shape, generator=gen, dtype=torch.float32) if fill else torch.empty(*shape)
        return x.to(dtype=dtype, device=device)

    def idx(values, dtype=None):
        return torch.tensor(values, dtype=dtype or getattr(torch, s.index_dtype), device=device)

    plain: dict = {}
    a: dict = {"causal": s.causal, "window_size": tuple(s.window)}
    if s.scale is not None:
        a["softmax_scale"] = s.scale
    alibi = t(s.b, s.hq, dtype=torch.float32).abs() * 0.3 if s.alibi else None
    plain["alibi"] = alibi
    if s.entry.startswith("aten"):
        return _build_aten(s, t, idx, alibi, plain)
    if s.entry == "kvcache":
        return _build_kvcache(s, t, idx, alibi, plain, kd)
    a.update(dropout_p=s.dropout, softcap=s.softcap, alibi_slopes=alibi)
    if s.entry in ("dense", "kvpacked", "qkvpacked"):
        q, k, v = t(s.b, s.sq, s.hq, s.d), t(s.b, s.sk, s.hk, s.d, dtype=kd), t(s.b, s.sk, s.hk, s.d, dtype=kd)
        plain.update(q=q, k=k, v=v)
        if s.entry == "dense":
            a.update(q=q, k=k, v=v)
        elif s.entry == "kvpacked":
            a.update(q=q, kv=torch.stack([k, v] + [v] * ((s.pack_n or 2) - 2), dim=2)[:, :, : s.pack_n or 2])
        else:
            a["qkv"] = torch.stack([q, k, v], dim=2)[:, :, : s.pack_n or 3]
        return s.entry, a, plain
    tq, tk = sum(s.lens_q), sum(s.lens_k)
    q, k, v = t(tq, s.hq, s.d), t(tk, s.hk, s.d, dtype=kd), t(tk, s.hk, s.d, dtype=kd)
    plain.update(q=q, k=k, v=v, cu_q=_cu(s.lens_q), cu_k=_cu(s.lens_k))
    max_q = max(s.lens_q) if s.max_q is None else s.max_q
    if s.entry == "varlen_qkvpacked":
        a.update(qkv=torch.stack([q, k, v], dim=1)[:, : s.pack_n or 3], cu_seqlens=idx(_cu(s.lens_q)), max_seqlen=max_q)
        return s.entry, a, plain
    a.update(q=q, cu_seqlens_q=idx(_cu(s.lens_q)), cu_seqlens_k=idx(_cu(s.lens_k)), max_seqlen_q=max_q,
             max_seqlen_k=max(s.lens_k))
    if s.entry == "varlen":
        a.update(k=k, v=v)
    else:
        a["kv"] = torch.stack([k, v] + [v] * ((s.pack_n or 2) - 2), dim=1)[:, : s.pack_n or 2]
    return s.entry, a, plain


def _build_aten(s: Spec, t, idx, alibi, plain):
    qd = DTYPES[s.dtype]
    kd = DTYPES[s.k_dtype] if s.k_dtype else qd
    a = {"dropout_p": s.dropout, "is_causal": s.causal, "return_debug_mask": s.debug_mask, "scale": s.scale,
         "window_size_left": s.window[0], "window_size_right": s.window[1], "alibi_slopes": alibi}
    if s.entry == "aten_dense":
        q, k, v = t(s.b, s.sq, s.hq, s.d), t(s.b, s.sk, s.hk, s.d, dtype=kd), t(s.b, s.sk, s.hk, s.d, dtype=kd)
        a.update(query=q, key=k, value=v, cum_seq_q=None, cum_seq_k=None, max_q=s.sq, max_k=s.sk)
    else:
        q, k, v = t(sum(s.lens_q), s.hq, s.d), t(sum(s.lens_k), s.hk, s.d, dtype=kd), t(sum(s.lens_k), s.hk, s.d, dtype=kd)
        plain.update(cu_q=_cu(s.lens_q), cu_k=_cu(s.lens_k))
        a.update(query=q, key=k, value=v, cum_seq_q=idx(_cu(s.lens_q)), cum_seq_k=idx(_cu(s.lens_k)),
                 max_q=max(s.lens_q) if s.max_q is None else s.max_q, max_k=max(s.lens_k))
    plain.update(q=q, k=k, v=v)
    return "aten", a, plain


def _build_kvcache(s: Spec, t, idx, alibi, plain, kd):
    b, hk, d = s.b, s.hk, s.d
    q = t(b, s.sq, s.hq, d)
    a = {"q": q, "causal": s.causal, "window_size": tuple(s.window), "softcap": s.softcap, "alibi_slopes": alibi,
         "num_splits": s.num_splits, "rotary_interleaved": s.rotary_interleaved}
    if s.scale is not None:
        a["softmax_scale"] = s.scale
    if s.page:
        pages_per_seq = s.sk // s.page
        num_pages = b * pages_per_seq + 1
        kc, vc = t(num_pages, s.page, hk, d, dtype=kd), t(num_pages, s.page, hk, d, dtype=kd)
        order = list(range(num_pages))
        random.Random(s.seed).shuffle(order)
        table = [order[i * pages_per_seq:(i + 1) * pages_per_seq] for i in range(b)]
        a["block_table"] = idx(table, torch.int32)
        plain["table"] = table
    else:
        kc, vc = t(b, s.sk, hk, d, dtype=kd), t(b, s.sk, hk, d, dtype=kd)
    a.update(k_cache=kc, v_cache=vc, cache_seqlens=idx(s.cache_lens))
    plain.update(q=q, k_cache=kc.clone(), v_cache=vc.clone())
    if s.s_new:
        kn, vn = t(b, s.s_new, hk, d, dtype=kd), t(b, s.s_new, hk, d, dtype=kd)
        a.update(k=kn, v=vn)
        plain.update(k_new=kn, v_new=vn)
    if s.rotary_dim:
        rows = s.rotary_rows or (s.sk if not s.page else (b * (s.sk // s.page) + 1) * s.page)
        angle = t(rows, s.rotary_dim // 2, dtype=torch.float32) * math.pi
        rd = DTYPES[s.rotary_dtype] if s.rotary_dtype else DTYPES[s.dtype]
        a.update(rotary_cos=torch.cos(angle).to(rd), rotary_sin=torch.sin(angle).to(rd))
        plain.update(cos=a["rotary_cos"], sin=a["rotary_sin"])
    if s.leftpad is not None:
        a["cache_leftpad"] = idx(s.leftpad, torch.int32)
    return "kvcache", a, plain


# --- verdict -----------------------------------------------------------------------------------------


def verdict(s: Spec, caps: str | None) -> list:
    """The contract's strict-mode reasons for ``s`` (CPU tensors; the GPU's caps)."""
    from contracts import FA2ContractError
    from contracts.guard import check_call

    kind, a, _ = build(s, "cpu", fill=False)
    provider = "torch" if s.provider == "torch" else "flash_attn"
    try:
        check_call(kind, a, strict=True, provider=provider, caps=caps, backward=False)
    except FA2ContractError as err:
        return err.reasons
    return []


# --- reference -----------------------------------------------------------------------------------------


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor, interleaved: bool):
    """x (S, H, D) with its first 2 * cos.shape[1] dims rotated at ``positions`` (S,)."""
    rd = cos.shape[1] * 2
    c, s_ = cos[positions][:, None, :].to(x.dtype), sin[positions][:, None, :].to(x.dtype)
    head, tail = x[..., :rd], x[..., rd:]
    if interleaved:
        x1, x2 = head[..., 0::2], head[..., 1::2]
        rot = torch.stack([x1 * c - x2 * s_, x1 * s_ + x2 * c], dim=-1).flatten(-2)
    else:
        x1, x2 = head[..., : rd // 2], head[..., rd // 2:]
        rot = torch.cat([x1 * c - x2 * s_, x1 * s_ + x2 * c], dim=-1)
    return torch.cat([rot, tail], dim=-1)


def _attend(q, k, v, keep, scale, softcap, slopes, dtype):
    """One sequence: q (Sq, Hq, D), k/v (Sk, Hkv, D), keep (Sq, Sk), slopes (Hq,) or None -> (Sq, Hq, D)."""
    sq, hq, _ = q.shape
    sk, hk, dv = v.shape
    if sq == 0 or sk == 0:
        return torch.zeros(sq, hq, dv, dtype=dtype, device=q.device)
    g = hq // hk
    kx, vx = k.to(dtype).repeat_interleave(g, dim=1), v.to(dtype).repeat_interleave(g, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.to(dtype), kx) * scale
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    if slopes is not None:
        i = torch.arange(sq, device=q.device)[:, None]
        j = torch.arange(sk, device=q.device)[None, :]
        scores = scores - slopes.to(dtype)[:, None, None] * (i + sk - sq - j).abs().to(dtype)
    scores = scores.masked_fill(~keep.to(q.device)[None], -math.inf)
    return torch.einsum("hqk,khd->qhd", torch.softmax(scores, dim=-1).nan_to_num(0.0), vx)


def reference(s: Spec, p: dict, dtype) -> torch.Tensor:
    """What the arguments say, computed in ``dtype``: (B, Sq, Hq, D) or (Tq, Hq, D)."""
    scale = s.scale if s.scale is not None else s.d ** -0.5
    window = tuple(s.window)
    slopes = p.get("alibi")
    q, k, v = p["q"], p.get("k"), p.get("v")
    if s.entry == "kvcache":
        return _reference_kvcache(s, p, scale, slopes, dtype)
    if s.lens_q:
        cu_q, cu_k = p["cu_q"], p["cu_k"]
        out = torch.zeros(q.shape[0], s.hq, s.d, dtype=dtype, device=q.device)
        for i in range(s.b):
            qs, ks, vs = q[cu_q[i]:cu_q[i + 1]], k[cu_k[i]:cu_k[i + 1]], v[cu_k[i]:cu_k[i + 1]]
            keep = intended_mask(qs.shape[0], ks.shape[0], s.causal, window)
            out[cu_q[i]:cu_q[i + 1]] = _attend(qs, ks, vs, keep, scale, s.softcap,
                                               None if slopes is None else slopes[i], dtype)
        return out
    keep = intended_mask(s.sq, s.sk, s.causal, window)
    return torch.stack([_attend(q[i], k[i], v[i], keep, scale, s.softcap, None if slopes is None else slopes[i], dtype)
                        for i in range(s.b)])


def _reference_kvcache(s: Spec, p: dict, scale, slopes, dtype) -> torch.Tensor:
    q = p["q"]
    out = []
    causal_rope = s.causal or s.window != [-1, -1]
    for i in range(s.b):
        if s.page:
            kc = torch.cat([p["k_cache"][page] for page in p["table"][i]])
            vc = torch.cat([p["v_cache"][page] for page in p["table"][i]])
        else:
            kc, vc = p["k_cache"][i], p["v_cache"][i]
        n = s.cache_lens[i]
        qi = q[i]
        if s.s_new:
            kn, vn = p["k_new"][i], p["v_new"][i]
            if s.rotary_dim:
                pos = torch.arange(n, n + s.s_new, device=kn.device)
                kn = _rotate(kn.float(), p["cos"].float(), p["sin"].float(), pos, s.rotary_interleaved).to(kn.dtype)
            kc, vc = kc.clone(), vc.clone()
            kc[n:n + s.s_new], vc[n:n + s.s_new] = kn, vn
            n += s.s_new
        if s.rotary_dim:
            pos = (torch.arange(s.sq, device=q.device) + s.cache_lens[i]) if causal_rope else \
                torch.full((s.sq,), s.cache_lens[i], device=q.device)
            qi = _rotate(qi.float(), p["cos"].float(), p["sin"].float(), pos, s.rotary_interleaved).to(qi.dtype)
        start = s.leftpad[i] if s.leftpad else 0
        ks, vs = kc[start:n], vc[start:n]
        keep = intended_mask(s.sq, ks.shape[0], s.causal, tuple(s.window))
        out.append(_attend(qi, ks, vs, keep, scale, s.softcap, None if slopes is None else slopes[i], dtype))
    return torch.stack(out)


# --- running one call (in a worker) -------------------------------------------------------------------


def _kernel(s: Spec):
    if s.provider == "torch":
        return torch.ops.aten._flash_attention_forward
    import flash_attn

    return getattr(flash_attn, FLASH_FN[s.entry])


def _call(s: Spec, fn, kind: str, a: dict):
    if kind == "aten":
        names = ("query", "key", "value", "cum_seq_q", "cum_seq_k", "max_q", "max_k", "dropout_p", "is_causal",
                 "return_debug_mask")
        kw = {n: a[n] for n in ("scale", "window_size_left", "window_size_right", "alibi_slopes")}
        return fn(*[a[n] for n in names], **kw)
    return fn(**a)


def _fake(s: Spec, reasons: list, p: dict, dtype):
    """The CPU stand-in: dies like FA-2 on zero KV heads, refuses what the contract calls clean errors."""
    if s.hk == 0:
        os.kill(os.getpid(), signal.SIGFPE)
    if any(r["kind"] == "clean-error" for r in reasons):
        raise RuntimeError("stand-in kernel refuses: " + ", ".join(r["rule"] for r in reasons))
    return reference(s, p, dtype)


def run_one(s: Spec, backend: str, reasons: list) -> dict:
    """Build, call and judge ``s`` in this process; ``backend``: "cuda" or "fake"."""
    from conformance.tools.probes import _common as C

    device = "cuda" if backend == "cuda" else "cpu"
    try:
        kind, a, plain = build(s, device, fill=True)
    except Exception as exc:  # noqa: BLE001 - a call that cannot even be built is not a kernel outcome
        return {"id": s.id, "outcome": "unbuildable", "detail": f"{type(exc).__name__}: {exc}"[:300]}
    qd = DTYPES[s.dtype]
    try:
        if backend == "cuda":
            result = _call(s, _kernel(s), kind, a)
            torch.cuda.synchronize()
        else:
            result = _fake(s, reasons, plain, qd)
    except ImportError as exc:
        return {"id": s.id, "outcome": "skipped", "detail": f"{s.provider} not importable: {exc}"}
    except Exception as exc:  # noqa: BLE001 - every kernel failure is data
        outcome, detail = C.classify_exception(exc)
        return {"id": s.id, "outcome": outcome, "detail": detail}
    if s.dropout > 0:
        out = C.first_tensor(result)
        finite = bool(torch.isfinite(out.float()).all())
        return {"id": s.id, "outcome": "ok" if finite else "silent_corruption",
                "detail": "dropout: not compared, finite" if finite else "non-finite output with dropout"}
    try:
        out = C.first_tensor(result)
        ref, base = reference(s, plain, torch.float64), reference(s, plain, qd if qd != torch.float32 else torch.float16)
    except Exception as exc:  # noqa: BLE001
        outcome, detail = C.classify_exception(exc)
        if outcome == "cuda_error":
            return {"id": s.id, "outcome": outcome, "detail": detail}
        return {"id": s.id, "outcome": "unverified", "detail": f"kernel returned; no reference: {detail}"[:300]}
    outcome, detail = C.compare(out, ref, base, qd if qd != torch.float32 else torch.float16)
    if outcome == "ok" and not bool(torch.isfinite(out.float()).all()):
        outcome, detail = "silent_corruption", "non-finite output where the reference is finite"
    return {"id": s.id, "outcome": outcome, "detail": detail[:300]}


def worker_main(backend: str) -> int:
    """Read (spec, reasons) JSON lines from stdin, answer one ``CFUZZ {json}`` line each; exit after a CUDA error."""
    if backend == "cuda":
        torch.cuda.init()
    print(PREFIX + json.dumps({"ready": True, "pid": os.getpid()}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        msg = json.loads(line)
        s = Spec(**msg["spec"])
        reply = run_one(s, backend, msg["reasons"])
        print(PREFIX + json.dumps(reply, default=str), flush=True)
        if reply["outcome"] == "cuda_error":
            return 3
    return 0


class Worker:
    """One worker subprocess, restarted after it dies (CUDA error, signal, hang)."""

    def __init__(self, backend: str, timeout_s: float):
        self.backend, self.timeout_s = backend, timeout_s
        self.proc = None
        self.starts = 0

    def start(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(x for x in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if x)
        self.err = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", "--backend", self.backend],
                                     cwd=REPO_ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.err, text=True, bufsize=1, start_new_session=True)
        self.lines: queue.Queue = queue.Queue()
        proc, lines = self.proc, self.lines

        def read():
            for line in proc.stdout:
                if line.startswith(PREFIX):
                    lines.put(line[len(PREFIX):])
            lines.put(None)

        threading.Thread(target=read, daemon=True).start()
        self.starts += 1
        first = self._get(300)
        if not first or first == "TIMEOUT":
            self.kill()
            raise RuntimeError(f"worker did not start: {self._tail()}")

    def _get(self, timeout):
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            return "TIMEOUT"

    def _tail(self) -> str:
        try:
            self.err.seek(0)
            return self.err.read()[-600:]
        except (OSError, ValueError):
            return ""

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # the worker's own session: only its processes
            except (ProcessLookupError, PermissionError):
                pass
            self.proc.wait()
        self.proc = None

    def run(self, s: Spec, reasons: list) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        try:
            self.proc.stdin.write(json.dumps({"spec": dataclasses.asdict(s), "reasons": reasons}) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            self.kill()
            return {"id": s.id, "outcome": "killed_by_signal", "detail": "worker gone before the call"}
        line = self._get(self.timeout_s)
        if line == "TIMEOUT":
            self.kill()
            return {"id": s.id, "outcome": "timeout", "detail": f"no answer in {self.timeout_s} s"}
        if line is None:
            rc = self.proc.wait()
            tail = self._tail().strip().splitlines()[-1:] or [""]
            self.proc = None
            how = how_it_ended(rc)
            return {"id": s.id, "outcome": "killed_by_signal", "detail": f"worker died ({how}) {tail[0][:200]}"}
        reply = json.loads(line)
        if reply["outcome"] == "cuda_error":
            self.proc.wait()
            self.proc = None
        return reply

    def close(self) -> None:
        if self.proc is not None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.kill()
        self.proc = None


# --- the run -------------------------------------------------------------------------------------------

FAILURES = ("clean_error", "cuda_error", "silent_corruption", "killed_by_signal", "timeout")


def classify(rejected: bool, outcome: str | None, detail: str = "") -> str:
    """Contract verdict x kernel outcome -> true/false accept/reject, not run, or unverified."""
    if detail.startswith("unbuildable"):
        return "unbuildable"
    if outcome is None:
        return "rejected_not_run" if rejected else "accepted_not_run"
    if outcome not in FAILURES and outcome != "ok":
        return "unverified"
    failed = outcome in FAILURES
    if rejected:
        return "true_reject" if failed else "false_reject"
    return "false_accept" if failed else "true_accept"


def run(specs: list[Spec], *, backend: str, caps: str | None, workers: int, timeout_s: float,
        run_crash: bool, budget_s: float, log=print) -> list[dict]:
    """Verdict, kernel and class of every spec; ``workers`` subprocesses share the calls."""
    started = time.monotonic()
    todo: queue.Queue = queue.Queue()
    records: dict[int, dict] = {}
    lock = threading.Lock()
    for s in specs:
        rec = {"id": s.id, "provider": s.provider, "entry": s.entry, "mutation": s.mutation or "",
               "label": s.label(), "rules": [], "outcome": None, "detail": "", "class": ""}
        records[s.id] = rec
        try:
            reasons = [{"rule": r.rule, "kind": r.kind} for r in verdict(s, caps)]
        except Exception as exc:  # noqa: BLE001 - a generator bug, reported, not run
            rec["detail"] = f"unbuildable: {type(exc).__name__}: {exc}"[:300]
            continue
        rec["rules"] = [r["rule"] for r in reasons]
        rec["kinds"] = {r["rule"]: r["kind"] for r in reasons}
        if any(r["kind"] == "crash" for r in reasons) and not run_crash:
            rec["detail"] = "rejected by a crash rule (not run)"
        else:
            todo.put((s, reasons))
    pool = [Worker(backend, timeout_s) for _ in range(max(1, workers))]

    def drain(worker: Worker):
        while True:
            try:
                s, reasons = todo.get_nowait()
            except queue.Empty:
                return
            if time.monotonic() - started > budget_s:
                records[s.id]["detail"] = "time budget"
                continue
            reply = worker.run(s, reasons)
            with lock:
                rec = records[s.id]
                rec["outcome"], rec["detail"] = reply["outcome"], reply.get("detail", "")
                done = sum(r["outcome"] is not None for r in records.values())
            if done % 1000 == 0:
                log(f"[contract_fuzz] {done} calls run, {time.monotonic() - started:.0f} s, "
                    f"worker starts {sum(w.starts for w in pool)}")

    threads = [threading.Thread(target=drain, args=(w,)) for w in pool]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for w in pool:
        w.close()
    out = [records[s.id] for s in specs]
    for rec in out:
        rec["class"] = classify(bool(rec["rules"]), rec["outcome"], str(rec["detail"]))
    run.worker_starts = sum(w.starts for w in pool)
    return out


#: A rule of these kinds refuses what corrupts silently on some draws: one draw that ran clean does
#: not show the rule wrong (a negative softmax_scale is harmless until the scores overflow).
HAZARD_KINDS = ("corruption", "semantics")


def false_reject_class(kind: str) -> str:
    """How a false reject by a rule of ``kind`` reads: a hazard one draw missed, or a contract bug
    (an error/crash rule refused a call the kernel ran correctly)."""
    if kind in HAZARD_KINDS:
        return "hazard: silent-corruption rule, this draw happened to run clean"
    return "contract bug: the kernel ran this call correctly"


def summarize(records: list[dict], meta: dict) -> dict:
    def counts(rs):
        out = {"calls": len(rs), "accepted": sum(not r["rules"] for r in rs), "rejected": sum(bool(r["rules"]) for r in rs),
               "ran": sum(r["outcome"] is not None for r in rs)}
        for cls in ("true_accept", "false_accept", "true_reject", "false_reject", "rejected_not_run",
                    "accepted_not_run", "unverified", "unbuildable"):
            out[cls] = sum(r["class"] == cls for r in rs)
        return out

    by_entry = {}
    for r in records:
        by_entry.setdefault(f"{r['provider']}.{r['entry']}", []).append(r)
    false_rejects: dict = {}
    kinds: dict = {}
    for r in records:
        if r["class"] == "false_reject":
            for rule in r["rules"]:
                false_rejects.setdefault(rule, []).append(r["label"])
                kinds[rule] = r.get("kinds", {}).get(rule, "?")
    return {**meta, "total": counts(records), "by_entry": {k: counts(v) for k, v in sorted(by_entry.items())},
            "false_accepts": [{"label": r["label"], "outcome": r["outcome"], "detail": r["detail"]}
                              for r in records if r["class"] == "false_accept"],
            "false_rejects_by_rule": {k: {"count": len(v), "examples": v[:5], "kind": kinds[k],
                                          "class": false_reject_class(kinds[k])}
                                      for k, v in sorted(false_rejects.items())},
            "unverified": [{"label": r["label"], "detail": r["detail"]} for r in records
                           if r["class"] in ("unverified", "unbuildable")][:30]}


def table(summary: dict) -> str:
    cols = ("calls", "accepted", "rejected", "ran", "true_accept", "false_accept", "true_reject", "false_reject",
            "rejected_not_run", "unverified")
    rows = [("entry", *cols)] + [(name, *(str(c[k]) for k in cols)) for name, c in summary["by_entry"].items()]
    rows.append(("ALL", *(str(summary["total"][k]) for k in cols)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.rjust(widths[i]) if i else cell.ljust(widths[i]) for i, cell in enumerate(r))
                     for r in rows)


def markdown(summary: dict) -> str:
    lines = ["# FA-2 contract differential fuzzing, every entry point", "",
             f"{summary['total']['calls']} calls, caps {summary['caps']}, backend {summary['backend']}, "
             f"{summary['elapsed_s']} s, {summary['worker_starts']} worker start(s), seed {summary['seed']}.", "",
             "```", table(summary), "```", "", "## False accepts", ""]
    lines += [f"- `{x['label']}` -> {x['outcome']}: {x['detail']}" for x in summary["false_accepts"][:50]] or ["None."]
    lines += ["", "## False rejects by rule", ""]
    lines += [f"- `{rule}` ({v.get('kind', '?')}; {v.get('class', '?')}): {v['count']}, e.g. `{v['examples'][0]}`"
              for rule, v in summary["false_rejects_by_rule"].items()] \
        or ["None."]
    if summary["unverified"]:
        lines += ["", "## Unverified", ""] + [f"- `{u['label']}`: {u['detail']}" for u in summary["unverified"]]
    return "\n".join(lines) + "\n"


def _providers(backend: str) -> list[str]:
    if backend == "fake":
        return ["flash_attn", "torch"]
    found = []
    try:
        import flash_attn  # noqa: F401

        found.append("flash_attn")
    except ImportError:
        print("[contract_fuzz] flash_attn not importable: its entry points are skipped")
    if hasattr(torch.ops.aten, "_flash_attention_forward"):
        found.append("torch")
    return found


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=12000)
    ap.add_argument("--seed", type=int, default=20261203)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--out", default=os.environ.get("OUT"))
    ap.add_argument("--case-timeout", type=float, default=60.0)
    ap.add_argument("--budget", type=float, default=420.0, help="stop running kernels after this many seconds")
    ap.add_argument("--run-crash-calls", action="store_true")
    ap.add_argument("--dry-run", action="store_true", help="CPU stand-in kernel (tests the logic, no GPU)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--backend", default=None, choices=("cuda", "fake"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    backend = args.backend or ("fake" if args.dry_run else "cuda")
    if args.worker:
        return worker_main(backend)
    if backend == "cuda" and not torch.cuda.is_available():
        print("[contract_fuzz] no CUDA device; use --dry-run on a CPU")
        return 2
    caps = None
    if backend == "cuda":
        major, minor = torch.cuda.get_device_capability(0)
        caps = f"sm{major}{minor}"
    providers = _providers(backend)
    specs = draw_calls(args.calls, args.seed, providers)
    started = time.monotonic()
    records = run(specs, backend=backend, caps=caps, workers=args.workers, timeout_s=args.case_timeout,
                  run_crash=args.run_crash_calls, budget_s=args.budget)
    meta = {"caps": caps, "backend": backend, "seed": args.seed, "providers": providers,
            "elapsed_s": round(time.monotonic() - started, 1), "worker_starts": run.worker_starts}
    if backend == "cuda":
        import importlib.metadata as md

        meta["torch"] = torch.__version__
        meta["gpu"] = torch.cuda.get_device_name(0)
        try:
            meta["flash_attn"] = md.version("flash_attn")
        except md.PackageNotFoundError:
            meta["flash_attn"] = None
    summary = summarize(records, meta)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "calls.csv", "w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=["id", "provider", "entry", "mutation", "class", "outcome", "rules",
                                               "label", "detail"])
            w.writeheader()
            for r in records:
                w.writerow({**{k: r[k] for k in ("id", "provider", "entry", "mutation", "class", "outcome", "label")},
                            "rules": " ".join(r["rules"]), "detail": str(r["detail"])[:300]})
        (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str), encoding="utf-8")
        (out / "summary.md").write_text(markdown(summary), encoding="utf-8")
    print(markdown(summary).split("## False accepts")[1][:3000])
    print(table(summary))
    return 1 if summary["false_accepts"] else 0


if __name__ == "__main__":
    sys.exit(main())
