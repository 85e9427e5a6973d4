"""FA-2's own test grids (flash-attention v2.8.3 ``tests/test_flash_attn.py``) as data, and the calls
those tests make, rebuilt on any device (``"meta"`` in CI: shapes only, no memory, no GPU).

The parametrize lists are written down here as data (``GRIDS``); ``build`` makes the call one
configuration makes, the way the test makes it: the same batch sizes and head counts, windows
drawn in ``[0, seqlen_k)``, varlen lengths drawn like ``generate_random_padding_mask(mode="random")``
(each in ``[max(1, L - 20), L]``) with ``max_seqlen`` the true maximum, paged caches laid out like
``_generate_block_kvcache`` (``3 * ceil(seqlen_k / page) * batch`` pages, ``block_table`` of shape
(batch, pages / batch)), rotary tables of ``floor(fraction * d / 16) * 16`` columns / 2. Random
draws come from a per-configuration ``random.Random``, so a configuration always builds the same
call. Index tensors carry no values on ``"meta"``; meta-mode rules never read them.

Each ``GridCall`` says whether the test runs a backward on a given arch (``backward_on``) and, for
configurations the test skips for an API reason, which contract rule explains the skip
(``skip_rule``; for the backward the test skips on sm86/sm89/sm120: ``backward_skip_rule``).
Not imported by ``import contracts``; used by tests/contracts/test_fa2_grid.py and the GPU fuzzer.
"""
from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass, field
from typing import Any

import torch

F16, BF16 = torch.float16, torch.bfloat16
I32, F32 = torch.int32, torch.float32
MAX_HEADDIM_SM8X = 192  # the tests run large-head backwards with dropout only on sm80 / sm90

_DT = (F16, BF16)
_FLAGS = (False, True)
_MHA = ("mha", "mqa", "gqa")
_OUTPUT_SEQLENS = ((113, 203), (128, 217), (113, 211), (108, 256), (256, 512), (512, 256), (1024, 1024),
                   (1023, 1024), (1024, 1023), (2048, 2048))
_CAUSAL_SEQLENS = ((1, 239), (3, 799), (127, 512), (127, 513), (113, 203), (128, 217), (113, 211), (108, 256),
                   (256, 512), (1023, 1024))
_D_ALL = (32, 40, 59, 64, 80, 96, 111, 128, 160, 192, 224, 256)

# test name -> {parameter: values}, in the order of the test's parametrize decorators.
GRIDS: dict[str, dict[str, tuple]] = {
    "test_flash_attn_qkvpacked": {
        "dtype": _DT, "deterministic": _FLAGS, "alibi": _FLAGS, "local": _FLAGS, "causal": _FLAGS, "d": _D_ALL,
        "seqlen": (97, 128, 200, 384, 768, 1024, 1025, 2048), "dropout_p": (0.0, 0.17)},
    "test_flash_attn_varlen_qkvpacked": {
        "dtype": _DT, "deterministic": _FLAGS, "alibi": _FLAGS, "local": _FLAGS, "causal": _FLAGS,
        "d": (32, 59, 64, 80, 96, 128, 160, 192, 224, 256), "seqlen": (97, 128, 200, 257, 384, 512, 768, 1025, 2048),
        "dropout_p": (0.0, 0.17)},
    "test_flash_attn_output": {
        "kvpacked": _FLAGS, "dtype": _DT, "mha_type": _MHA, "deterministic": _FLAGS, "alibi": _FLAGS,
        "local": _FLAGS, "causal": _FLAGS, "d": (32, 40, 59, 64, 96, 111, 128, 160, 192, 224, 256),
        "seqlens": _OUTPUT_SEQLENS, "dropout_p": (0.0, 0.17), "softcap": (0.0, 50.0)},
    "test_flash_attn_varlen_output": {
        "kvpacked": _FLAGS, "dtype": _DT, "mha_type": _MHA, "deterministic": _FLAGS, "alibi": _FLAGS,
        "local": _FLAGS, "causal": _FLAGS, "d": (32, 59, 64, 80, 96, 111, 128, 160, 192, 224, 256),
        "seqlens": ((1, 147),) + _OUTPUT_SEQLENS, "dropout_p": (0.0, 0.17), "softcap": (0.0, 50.0)},
    "test_flash_attn_causal": {
        "dtype": _DT, "local": _FLAGS, "d": _D_ALL, "swap_sq_sk": _FLAGS, "seqlens": _CAUSAL_SEQLENS},
    "test_flash_attn_varlen_causal": {
        "dtype": _DT, "local": _FLAGS, "d": _D_ALL, "swap_sq_sk": _FLAGS, "seqlens": _CAUSAL_SEQLENS,
        "paged_kv_block_size": (None, 256, 512)},
    "test_flash_attn_splitkv": {
        "dtype": _DT, "deterministic": _FLAGS, "alibi": _FLAGS, "local": _FLAGS, "causal": _FLAGS, "d": _D_ALL,
        "swap_sq_sk": _FLAGS,
        "seqlens": ((3, 1024), (1, 339), (64, 800), (3, 799), (64, 2048), (16, 20000), (16, 100000), (128, 128),
                    (256, 256))},
    "test_flash_attn_kvcache": {
        "dtype": (F16,), "num_splits": (1, 0), "mha_type": _MHA, "new_kv": _FLAGS, "alibi": _FLAGS,
        "local": _FLAGS, "causal": _FLAGS, "seqlen_new_eq_seqlen_q": (True, False),
        "rotary_interleaved": _FLAGS, "rotary_fraction": (0.0, 0.5, 1.0), "paged_kv_block_size": (None, 256),
        "has_leftpad": _FLAGS, "has_batch_idx": (False,), "d": (32, 59, 64, 80, 128, 256),
        "seqlens": ((1, 128), (1, 339), (3, 1024), (64, 800), (64, 256), (3, 799), (64, 2048), (16, 20000),
                    (1, 128 * 1024), (16, 128 * 1024), (128, 128))},
    "test_flash_attn_race_condition": {
        "dtype": (F16,), "causal": _FLAGS, "d": _D_ALL,
        "seqlens": ((1, 239), (239, 1), (3, 799), (799, 3), (1024, 128), (97, 97), (128, 128), (200, 200),
                    (256, 256), (257, 257), (384, 384), (512, 512), (768, 768), (1024, 1024)),
        "dropout_p": (0.0, 0.17)},
    "test_flash_attn_bwd_overflow": {"dtype": (F16,), "causal": _FLAGS, "d": (16, 32, 64), "seqlen": (1, 2, 5, 17, 128)},
    "test_flash_attn_bwd_transpose": {"dtype": _DT, "causal": _FLAGS, "d": (64, 128), "seqlen": (97, 128, 200, 256)},
    "test_flash_attn_bwd_varlen_overflow": {"dtype": (F16,), "causal": _FLAGS, "d": (16, 32, 64)},
    "test_flash_attn_deterministic": {
        "dtype": _DT, "local": _FLAGS, "causal": _FLAGS, "d": _D_ALL, "swap_sq_sk": _FLAGS, "seqlens": _CAUSAL_SEQLENS},
    "test_flash_attn_varlen_deterministic": {
        "dtype": _DT, "local": _FLAGS, "causal": _FLAGS, "d": _D_ALL, "swap_sq_sk": _FLAGS, "seqlens": _CAUSAL_SEQLENS},
}

# Tests whose backward runs only when (d <= 192 or dropout_p == 0) or on sm80 / sm90.
_BACKWARD_GATED = {"test_flash_attn_qkvpacked", "test_flash_attn_varlen_qkvpacked", "test_flash_attn_output",
                   "test_flash_attn_varlen_output", "test_flash_attn_race_condition"}


@dataclass
class GridCall:
    """One configuration of one FA-2 test: the guard kind and bound arguments of the call it makes.

    ``args`` uses the parameter names of the kind's flash_attn 2.8 signature (``contracts.guard``),
    so ``guarded(fn, kind)(**args)`` and ``contracts.guard.call_facts(kind, args, ...)`` take it as is.
    """

    test: str
    index: int
    params: dict[str, Any]
    kind: str
    args: dict[str, Any]
    runs_backward: bool = True  # on sm80 / sm90
    skip_rule: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def backward_on(self, arch: tuple[int, int]) -> bool:
        """Whether the test runs a backward for this configuration on ``arch`` (major, minor)."""
        if not self.runs_backward:
            return False
        if self.test in _BACKWARD_GATED and arch not in ((8, 0), (9, 0)):
            return self.params["d"] <= MAX_HEADDIM_SM8X or self.params["dropout_p"] == 0.0
        return True

    @property
    def label(self) -> str:
        shown = ", ".join(f"{k}={_short(v)}" for k, v in self.params.items())
        return f"{self.test}[{self.index}]({shown})"


def _short(value) -> str:
    return str(value).replace("torch.", "")


def size(test: str) -> int:
    """Number of configurations of ``test``'s grid."""
    return math.prod(len(values) for values in GRIDS[test].values())


def params_at(test: str, index: int) -> dict[str, Any]:
    """The ``index``-th configuration of ``test`` (itertools.product order)."""
    grid = GRIDS[test]
    out = {}
    for name in reversed(list(grid)):
        values = grid[name]
        index, at = divmod(index, len(values))
        out[name] = values[at]
    return {name: out[name] for name in grid}


def indices(test: str, limit: int | None, seed: int = 0) -> list[int]:
    """Every index of ``test``'s grid, or ``limit`` of them drawn without replacement (sorted)."""
    n = size(test)
    if limit is None or limit >= n:
        return list(range(n))
    return sorted(random.Random(f"{test}:{seed}").sample(range(n), limit))


def all_configs(test: str) -> list[dict[str, Any]]:
    """Every configuration of ``test`` (for small grids)."""
    grid = GRIDS[test]
    return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]


# --- building the calls ------------------------------------------------------------------------------


class _Maker:
    """Tensor factory on one device; ``grad`` leaves require grad like the tests' inputs."""

    def __init__(self, device: str, grad: bool):
        self.device, self.grad = device, grad

    def t(self, *shape, dtype, grad: bool = False) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device=self.device, requires_grad=grad and self.grad)

    def index(self, values) -> torch.Tensor:
        if self.device == "meta":
            return torch.empty(len(values), dtype=I32, device="meta")
        return torch.tensor(values, dtype=I32, device=self.device)


def _window(rng: random.Random, local: bool, seqlen_k: int) -> tuple[int, int]:
    return (rng.randrange(seqlen_k), rng.randrange(seqlen_k)) if local else (-1, -1)


def _lengths(rng: random.Random, max_seqlen: int, batch: int) -> list[int]:
    return [rng.randint(max(1, max_seqlen - 20), max_seqlen) for _ in range(batch)]


def _cu(lengths) -> list[int]:
    return [0] + list(itertools.accumulate(lengths))


def _heads_k(mha_type: str, nheads: int, gqa: int) -> int:
    return nheads if mha_type == "mha" else (1 if mha_type == "mqa" else gqa)


def _alibi(m: _Maker, use: bool, batch: int, nheads: int):
    return m.t(batch, nheads, dtype=F32) if use else None


def _paged(m: _Maker, seqlen_k: int, page: int, batch: int, hk: int, d: int, dtype):
    """(k_cache, v_cache, block_table, num_blocks) laid out like the tests' _generate_block_kvcache."""
    num_blocks = math.ceil(seqlen_k / page) * batch * 3
    k = m.t(num_blocks, page, hk, d, dtype=dtype)
    v = m.t(num_blocks, page, hk, d, dtype=dtype)
    table = list(range(num_blocks))
    random.Random(num_blocks).shuffle(table)
    per = num_blocks // batch
    if m.device == "meta":
        block_table = torch.empty(batch, per, dtype=I32, device="meta")
    else:
        block_table = torch.tensor(table, dtype=I32, device=m.device).reshape(batch, per)
    return k, v, block_table, num_blocks


def build(test: str, index: int, device: str = "meta", grad: bool = True) -> GridCall:
    """The call configuration ``index`` of ``test`` makes, with tensors on ``device``."""
    p = params_at(test, index)
    rng = random.Random(f"{test}#{index}")
    m = _Maker(device, grad)
    call = _BUILDERS[test](p, rng, m)
    call.test, call.index, call.params = test, index, p
    return call


def _seqlens(p) -> tuple[int, int]:
    sq, sk = p["seqlens"]
    return (sk, sq) if p.get("swap_sq_sk") else (sq, sk)


def _qkvpacked(p, rng, m):
    b, h, s, d, dt = 4, 9, p["seqlen"], p["d"], p["dtype"]
    args = dict(qkv=m.t(b, s, 3, h, d, dtype=dt, grad=True), dropout_p=p["dropout_p"], causal=p["causal"],
                window_size=_window(rng, p["local"], s), alibi_slopes=_alibi(m, p["alibi"], b, h),
                deterministic=p["deterministic"], return_attn_probs=True)
    return GridCall("", 0, {}, "qkvpacked", args)


def _varlen_qkvpacked(p, rng, m):
    b, h, s, d, dt = 5, 6, p["seqlen"], p["d"], p["dtype"]
    window = _window(rng, p["local"], s)
    lengths = _lengths(rng, s, b)
    args = dict(qkv=m.t(sum(lengths), 3, h, d, dtype=dt, grad=True), cu_seqlens=m.index(_cu(lengths)),
                max_seqlen=max(lengths), dropout_p=p["dropout_p"], causal=p["causal"], window_size=window,
                alibi_slopes=_alibi(m, p["alibi"], b, h), deterministic=p["deterministic"], return_attn_probs=True)
    return GridCall("", 0, {}, "varlen_qkvpacked", args, extra={"lengths": lengths})


def _output(p, rng, m):
    b, (sq, sk), d, dt = 4, p["seqlens"], p["d"], p["dtype"]
    h = 6 if p["softcap"] == 0.0 else 4
    hk = _heads_k(p["mha_type"], h, 2)
    window = _window(rng, p["local"], sk)
    common = dict(dropout_p=p["dropout_p"], causal=p["causal"], window_size=window, softcap=p["softcap"],
                  alibi_slopes=_alibi(m, p["alibi"], b, h), deterministic=p["deterministic"], return_attn_probs=True)
    q = m.t(b, sq, h, d, dtype=dt, grad=True)
    if p["kvpacked"]:
        call = GridCall("", 0, {}, "kvpacked", dict(q=q, kv=m.t(b, sk, 2, hk, d, dtype=dt, grad=True), **common))
    else:
        call = GridCall("", 0, {}, "dense", dict(q=q, k=m.t(b, sk, hk, d, dtype=dt, grad=True),
                                                  v=m.t(b, sk, hk, d, dtype=dt, grad=True), **common))
    if p["softcap"] > 0.0 and p["dropout_p"] > 0.0:
        call.skip_rule = "FA2-SOFTCAP-DROPOUT"
    return call


def _varlen_output(p, rng, m):
    b, (sq, sk), d, dt = 4, p["seqlens"], p["d"], p["dtype"]
    h = 6 if p["softcap"] == 0.0 else 4
    hk = _heads_k(p["mha_type"], h, 2)
    window = _window(rng, p["local"], sk)
    lq, lk = _lengths(rng, sq, b), _lengths(rng, sk, b)
    common = dict(cu_seqlens_q=m.index(_cu(lq)), cu_seqlens_k=m.index(_cu(lk)), max_seqlen_q=max(lq),
                  max_seqlen_k=max(lk), dropout_p=p["dropout_p"], causal=p["causal"], window_size=window,
                  softcap=p["softcap"], alibi_slopes=_alibi(m, p["alibi"], b, h), deterministic=p["deterministic"],
                  return_attn_probs=True)
    q = m.t(sum(lq), h, d, dtype=dt, grad=True)
    if p["kvpacked"]:
        call = GridCall("", 0, {}, "varlen_kvpacked", dict(q=q, kv=m.t(sum(lk), 2, hk, d, dtype=dt, grad=True), **common))
    else:
        call = GridCall("", 0, {}, "varlen", dict(q=q, k=m.t(sum(lk), hk, d, dtype=dt, grad=True),
                                                   v=m.t(sum(lk), hk, d, dtype=dt, grad=True), **common))
    call.extra = {"lengths_q": lq, "lengths_k": lk}
    if p["softcap"] > 0.0 and p["dropout_p"] > 0.0:
        call.skip_rule = "FA2-SOFTCAP-DROPOUT"
    return call


def _dense_qkv(m, b, sq, sk, h, d, dt):
    return dict(q=m.t(b, sq, h, d, dtype=dt, grad=True), k=m.t(b, sk, h, d, dtype=dt, grad=True),
                v=m.t(b, sk, h, d, dtype=dt, grad=True))


def _causal(p, rng, m):
    sq, sk = _seqlens(p)
    args = dict(**_dense_qkv(m, 8, sq, sk, 9, p["d"], p["dtype"]), dropout_p=0.0, causal=True,
                window_size=_window(rng, p["local"], sk))
    return GridCall("", 0, {}, "dense", args)


def _varlen_causal(p, rng, m):
    sq, sk = _seqlens(p)
    b, h, d, dt, page = 8, 9, p["d"], p["dtype"], p["paged_kv_block_size"]
    window = _window(rng, p["local"], sk)
    lq, lk = _lengths(rng, sq, b), _lengths(rng, sk, b)
    args = dict(q=m.t(sum(lq), h, d, dtype=dt, grad=True))
    if page is None:
        args.update(k=m.t(sum(lk), h, d, dtype=dt, grad=True), v=m.t(sum(lk), h, d, dtype=dt, grad=True))
        block_table = None
    else:
        k, v, block_table, _ = _paged(m, sk, page, b, h, d, dt)
        args.update(k=k, v=v)
    args.update(cu_seqlens_q=m.index(_cu(lq)), cu_seqlens_k=m.index(_cu(lk)), max_seqlen_q=max(lq),
                max_seqlen_k=max(lk), dropout_p=0.0, causal=True, window_size=window, block_table=block_table)
    return GridCall("", 0, {}, "varlen", args, runs_backward=page is None,
                    extra={"lengths_q": lq, "lengths_k": lk})


def _splitkv(p, rng, m):
    sq, sk = _seqlens(p)
    b, h = 1, 12
    args = dict(**_dense_qkv(m, b, sq, sk, h, p["d"], p["dtype"]), dropout_p=0.0, causal=p["causal"],
                window_size=_window(rng, p["local"], sk), alibi_slopes=_alibi(m, p["alibi"], b, h),
                deterministic=p["deterministic"], return_attn_probs=True)
    return GridCall("", 0, {}, "dense", args)


def _kvcache(p, rng, m):
    sq, sk = p["seqlens"]
    b, h, d, dt = 2, 6, p["d"], p["dtype"]
    new_kv, page = p["new_kv"], p["paged_kv_block_size"]
    hk = _heads_k(p["mha_type"], h, 3)
    rotary_dim = math.floor(int(p["rotary_fraction"] * d) / 16) * 16
    window = _window(rng, p["local"], sk)
    s_new = sq if p["seqlen_new_eq_seqlen_q"] else rng.randint(1, sq)
    args: dict[str, Any] = dict(q=m.t(b, sq, h, d, dtype=dt))
    if page is None:
        args.update(k_cache=m.t(b, sk, hk, d, dtype=dt), v_cache=m.t(b, sk, hk, d, dtype=dt), block_table=None)
        rows = sk
    else:
        k, v, table, num_blocks = _paged(m, sk, page, b, hk, d, dt)
        args.update(k_cache=k, v_cache=v, block_table=table)
        rows = num_blocks * page
    args.update(k=m.t(b, s_new, hk, d, dtype=dt) if new_kv else None,
                v=m.t(b, s_new, hk, d, dtype=dt) if new_kv else None)
    if rotary_dim > 0:
        args.update(rotary_cos=m.t(rows, rotary_dim // 2, dtype=dt), rotary_sin=m.t(rows, rotary_dim // 2, dtype=dt))
    top = (sk - (sq if (p["causal"] or p["local"]) and rotary_dim > 1 else s_new) + 1) if new_kv else sk + 1
    lens = [rng.randrange(0 if new_kv else 1, max(top, 1)) for _ in range(b)]
    args["cache_seqlens"] = m.index(lens)
    if p["has_leftpad"]:
        args["cache_leftpad"] = m.index([rng.randrange(n) if n > 0 else 0 for n in lens])
    args.update(causal=p["causal"], window_size=window, rotary_interleaved=p["rotary_interleaved"],
                alibi_slopes=_alibi(m, p["alibi"], b, h), num_splits=p["num_splits"])
    call = GridCall("", 0, {}, "kvcache", args, runs_backward=False, extra={"cache_seqlens": lens})
    if sq > sk and new_kv:
        call.skip_rule = "FA2-KVCACHE-APPEND"
    elif not new_kv and p["rotary_fraction"] > 0.0:
        call.skip_rule = "FA2-ROTARY-NEW-KV"
    elif p["has_leftpad"] and page is not None:
        call.skip_rule = "FA2-PAGED-COMBINATION"
    return call


def _race(p, rng, m):
    sq, sk = p["seqlens"]
    args = dict(**_dense_qkv(m, 60, sq, sk, 4, p["d"], p["dtype"]), dropout_p=p["dropout_p"], causal=p["causal"],
                return_attn_probs=True)
    return GridCall("", 0, {}, "dense", args)


def _bwd_overflow(p, rng, m):
    s = p["seqlen"]
    return GridCall("", 0, {}, "dense", dict(**_dense_qkv(m, 2, s, s, 5, p["d"], p["dtype"]), causal=p["causal"]))


def _bwd_transpose(p, rng, m):
    s = p["seqlen"]
    return GridCall("", 0, {}, "dense", dict(**_dense_qkv(m, 5, s, s, 2, p["d"], p["dtype"]), causal=p["causal"]))


def _bwd_varlen_overflow(p, rng, m):
    d, dt = p["d"], p["dtype"]
    args = dict(q=m.t(256, 5, d, dtype=dt, grad=True), k=m.t(3, 5, d, dtype=dt, grad=True),
                v=m.t(3, 5, d, dtype=dt, grad=True), cu_seqlens_q=m.index([0, 76, 110, 256]),
                cu_seqlens_k=m.index([0, 1, 2, 3]), max_seqlen_q=256, max_seqlen_k=3, causal=p["causal"])
    return GridCall("", 0, {}, "varlen", args, extra={"lengths_q": [76, 34, 146], "lengths_k": [1, 1, 1]})


def _deterministic(p, rng, m):
    sq, sk = _seqlens(p)
    args = dict(**_dense_qkv(m, 4, sq, sk, 9, p["d"], p["dtype"]), dropout_p=0.0, causal=p["causal"],
                window_size=_window(rng, p["local"], sk), deterministic=True)
    return GridCall("", 0, {}, "dense", args)


def _varlen_deterministic(p, rng, m):
    sq, sk = _seqlens(p)
    b, h, d, dt = 2, 9, p["d"], p["dtype"]
    window = _window(rng, p["local"], sk)
    lq, lk = _lengths(rng, sq, b), _lengths(rng, sk, b)
    args = dict(q=m.t(sum(lq), h, d, dtype=dt, grad=True), k=m.t(sum(lk), h, d, dtype=dt, grad=True),
                v=m.t(sum(lk), h, d, dtype=dt, grad=True), cu_seqlens_q=m.index(_cu(lq)),
                cu_seqlens_k=m.index(_cu(lk)), max_seqlen_q=max(lq), max_seqlen_k=max(lk), dropout_p=0.0,
                causal=p["causal"], window_size=window, deterministic=True)
    return GridCall("", 0, {}, "varlen", args, extra={"lengths_q": lq, "lengths_k": lk})


_BUILDERS = {
    "test_flash_attn_qkvpacked": _qkvpacked,
    "test_flash_attn_varlen_qkvpacked": _varlen_qkvpacked,
    "test_flash_attn_output": _output,
    "test_flash_attn_varlen_output": _varlen_output,
    "test_flash_attn_causal": _causal,
    "test_flash_attn_varlen_causal": _varlen_causal,
    "test_flash_attn_splitkv": _splitkv,
    "test_flash_attn_kvcache": _kvcache,
    "test_flash_attn_race_condition": _race,
    "test_flash_attn_bwd_overflow": _bwd_overflow,
    "test_flash_attn_bwd_transpose": _bwd_transpose,
    "test_flash_attn_bwd_varlen_overflow": _bwd_varlen_overflow,
    "test_flash_attn_deterministic": _deterministic,
    "test_flash_attn_varlen_deterministic": _varlen_deterministic,
}
assert set(_BUILDERS) == set(GRIDS)


def backward_skip_rule(call: GridCall, arch: tuple[int, int]) -> str | None:
    """The rule that explains why ``call``'s test skips its backward on ``arch`` (flash_attn 2.8.3):
    paged varlen calls have no backward; large heads with dropout give garbage on sm86/sm89/sm120."""
    if call.test == "test_flash_attn_varlen_causal" and call.params["paged_kv_block_size"] is not None:
        return "FA2-INFERENCE-ONLY"
    if call.runs_backward and not call.backward_on(arch) and arch in ((8, 6), (8, 9), (12, 0)):
        return "FA2-BWD-GARBAGE-GRADS"
    return None
