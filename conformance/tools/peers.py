"""Other NSA implementations, timed beside ours by ``nsa-fa2 bench`` (the ``nsa`` branch's peer paths).

A peer path names a whole NSA forward with the suite's calling convention,
``fn(q (T, Hq, Dk), k (T, Hkv, Dk), v (T, Hkv, Dv), gates (T, Hq, 3), cfg, cu_seqlens) -> (T, Hq, Dv)``:

==================  =======================================================================
``peer:fla``        FLA's ``parallel_nsa`` through ``conformance.adapters.fla`` (tied layouts only,
                    l = d = l', so run it with ``--family fla``)
``peer:nsa_triton`` native-sparse-attention-triton through ``conformance.adapters.nsa_triton``
``peer:flash_nsa``  Scalable-Flash-NSA (github mdy666/Scalable-Flash-Native-Sparse-Attention), its
                    ``flash_nsa.NSACore`` (Megatron level: fused sigmoid combine of gate logits)
``impl:MOD:FN``     any callable with the convention above (your own NSA)
==================  =======================================================================

Peers are imported from wherever the user put them (``--peer-path DIR`` adds DIR to sys.path);
nothing of theirs is vendored here. A peer that cannot run a case raises ``LookupError`` with the
reason, and the sweep records the row as skipped. What each peer computes differs in details
(Documentation, peer findings): Scalable-Flash-NSA's window holds w + 1 keys and it applies the
sigmoid to its gate inputs itself, so its timings are of a near-identical, not the same, NSA.
"""
from __future__ import annotations

import importlib
import sys
from typing import Any, Callable

PEER_PATHS = ("peer:fla", "peer:nsa_triton", "peer:flash_nsa")


def add_peer_paths(paths: list[str]) -> None:
    """Put the peers' source folders first on sys.path (``--peer-path``)."""
    for p in reversed(paths):
        if p and p not in sys.path:
            sys.path.insert(0, p)


def _version(module: str) -> str:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:  # noqa: BLE001 - a source checkout has no distribution metadata
        mod = sys.modules.get(module.replace("-", "_"))
        return str(getattr(mod, "__file__", "source")).rsplit("/", 2)[0] if mod else "source"


def _adapter(name: str) -> tuple[Callable, str]:
    """The suite's adapter of a third-party NSA -> (its nsa_attention, the peer's version)."""
    adapter = importlib.import_module(f"conformance.adapters.{name}")
    why = adapter.unavailable_reason("cuda") if hasattr(adapter, "unavailable_reason") else None
    if why:
        raise LookupError(why)
    if name == "fla":
        return adapter.nsa_attention, f"fla-core {_version('fla-core')}"
    return adapter.nsa_attention, f"native-sparse-attention-triton {_version('native_sparse_attention')}"


def _flash_nsa(cfg, hq: int, hkv: int, dk: int, dv: int) -> tuple[Callable, str]:
    """Scalable-Flash-NSA's ``NSACore`` for this layout (its config is process-global state)."""
    try:
        flash_nsa = importlib.import_module("flash_nsa")
    except Exception as exc:  # noqa: BLE001 - any import failure makes the column a skip
        raise LookupError(f"flash_nsa not importable ({type(exc).__name__}: {exc}); pass --peer-path "
                          "<checkout of Scalable-Flash-Native-Sparse-Attention>") from exc
    if cfg.compress != "mean" or cfg.scale is not None:
        raise LookupError("flash_nsa is timed with mean compression and the default scale only")
    core = flash_nsa.NSACore(flash_nsa.NSAConfig(
        head_dim=dk, qk_head_dim=dk, v_head_dim=dv, num_heads=hq, num_kv_heads=hkv,
        kernel_size=cfg.block_len, stride=cfg.block_stride, block_size=cfg.sel_block, top_n=cfg.n_sel,
        num_init_blocks=cfg.n_init, num_local_blocks=cfg.n_local, window_size=cfg.window))

    def run(q, k, v, gates, cfg_, cu_seqlens=None):
        if cu_seqlens is None:
            import torch

            cu_seqlens = torch.tensor([0, q.shape[0]], dtype=torch.int32, device=q.device)
        return core(q, k, v, gates, cu_seqlens)
    return run, "flash_nsa " + _version("flash_nsa")


def peer_fn(path: str, cfg, hq: int, hkv: int, dk: int, dv: int) -> tuple[Callable[..., Any], str]:
    """A peer path -> (fn(q, k, v, gates, cfg, cu_seqlens), version string), or LookupError(reason)."""
    if path == "peer:fla":
        if not cfg.block_len == cfg.block_stride == cfg.sel_block:
            raise LookupError("FLA's parallel_nsa expresses tied layouts only (l = d = l'): use --family fla")
        return _adapter("fla")
    if path == "peer:nsa_triton":
        return _adapter("nsa_triton")
    if path == "peer:flash_nsa":
        return _flash_nsa(cfg, hq, hkv, dk, dv)
    if path.startswith("impl:"):
        mod, _, fn = path[5:].rpartition(":")
        if not mod:
            raise LookupError(f"{path!r}: write impl:<module>:<function>")
        return getattr(importlib.import_module(mod), fn), mod
    raise LookupError(f"unknown peer path {path!r}; use one of {', '.join(PEER_PATHS)} or impl:MOD:FN")


def is_peer(path: str) -> bool:
    return path.startswith(("peer:", "impl:"))
