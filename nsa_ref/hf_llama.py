"""NSA as a drop-in attention for Hugging Face Llama-family models (transformers >= 5, optional).

``nsa_llama(config_or_model, nsa_cfg, backend)`` replaces the ``self_attn`` module of every
decoder layer with an ``NSALlamaAttention`` that reuses the layer's q/k/v/o projections (and
Qwen3-style ``q_norm`` / ``k_norm``), applies RoPE with the model's own ``apply_rotary_pos_emb``
and the ``position_embeddings`` the model passes down, adds learned per-head sigmoid gates
(cmp, sel, win) and, for ``cfg.compress == "mlp"``, the learned compressors; the model code
itself is not forked. Batches:

- ``input_ids (B, T)`` without ``position_ids``: B sequences of T tokens.
- packed (HF's flash-attention convention): a new sequence starts wherever ``position_ids``
  is 0, and every row starts one; inside a sequence the ids count up by 1.
- padding (an ``attention_mask`` with zeros) is refused with ``ValueError``: NSA's blocks are
  positions in the packed sequence, so pack instead of padding.
- HF's KV cache (``use_cache=True`` / ``cache=``) is refused: decode goes through nsa_ref's
  ``NSAKVCache`` (``generate_greedy``, or ``nsa_caches=`` in the forward kwargs).

transformers is imported only inside functions; without it they raise an ImportError that says
``pip install -e ".[hf]"``.
"""
from __future__ import annotations

import sys
from typing import Mapping

import torch
from torch import nn

from nsa_ref.compress import MLPCompressor
from nsa_ref.config import NSAConfig
from nsa_ref.decode import decode_step
from nsa_ref.kv_cache import NSAKVCache
from nsa_ref.module import nsa_prefill
from nsa_ref.packing import Packing
from nsa_ref.router import check_backend

__all__ = ["NSALlamaAttention", "generate_greedy", "nsa_layers", "nsa_llama", "packing_from_position_ids"]

_NO_HF_CACHE = (
    "NSA layers do not use Hugging Face's KV cache; run the forward with use_cache=False (nsa_llama sets "
    "config.use_cache=False) and decode through nsa_ref's NSAKVCache: nsa_ref.hf_llama.generate_greedy(model, "
    "input_ids, max_new_tokens), or model.generate(..., use_cache=False) which re-runs the whole prefix"
)


def _transformers():
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            'nsa_ref.hf_llama needs Hugging Face transformers >= 5: pip install -e ".[hf]" '
            '(or pip install "transformers>=5")'
        ) from e
    return transformers


# --- packing ------------------------------------------------------------------------------------

def packing_from_position_ids(position_ids: torch.Tensor | None, batch_size: int, seq_len: int,
                              device: torch.device | str | None = None) -> Packing:
    """position_ids: (B, T) or (1, T) integer, or None -> the ``Packing`` of the B*T flattened tokens.

    None: B sequences of T tokens. Otherwise a sequence starts at every row start and wherever
    the id is 0 (HF's flash-attention rule for packed batches); each row must start at 0 and
    ids must count up by 1 inside a sequence, else ``ValueError`` (a row that starts later has
    earlier tokens NSA cannot see: left padding, or a decode step without an ``NSAKVCache``).
    Reads the ids to the host once.
    """
    B, T = int(batch_size), int(seq_len)
    if position_ids is None:
        offsets = [b * T for b in range(B + 1)]
        return Packing.of(torch.tensor(offsets, dtype=torch.int32, device=device), B * T, cu_seqlens_cpu=offsets,
                          device=None if device is None else torch.device(device))
    if position_ids.dim() != 2 or position_ids.shape[1] != T or position_ids.shape[0] not in (1, B):
        raise ValueError(
            f"position_ids must be (B={B}, T={T}) or (1, T), got shape={tuple(position_ids.shape)}"
        )
    pos = position_ids.expand(B, T).to(torch.long)
    flat = pos.reshape(-1)
    starts = flat == 0
    prev = torch.cat([flat.new_full((1,), -2), flat[:-1]])
    row_start = torch.zeros_like(starts).view(B, T)
    row_start[:, 0] = True
    row_start = row_start.reshape(-1)
    bad = (row_start & ~starts) | (~starts & (flat != prev + 1))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        b, t = divmod(i, T)
        got = int(flat[i])
        if t == 0:
            raise ValueError(
                f"position_ids[{b}, 0] = {got}: every row must start a sequence at position 0 (NSA sees only "
                "the tokens of the call); for left padding pack the sequences instead, for decode pass "
                "nsa_caches (see nsa_ref.hf_llama.generate_greedy)"
            )
        raise ValueError(
            f"position_ids[{b}, {t}] = {got} after {int(flat[i - 1])}: inside a packed sequence ids must count "
            "up by 1 and a new sequence must start at 0 (HF's packed-batch convention)"
        )
    offsets = starts.nonzero().flatten().tolist() + [B * T]
    cu = torch.tensor(offsets, dtype=torch.int32, device=flat.device)
    return Packing.of(cu, B * T, cu_seqlens_cpu=offsets, device=flat.device)


# --- the attention module -----------------------------------------------------------------------

class NSALlamaAttention(nn.Module):
    """NSA in place of a Llama-family ``self_attn``; same call and return as HF's attention.

    forward(hidden_states (B, T, hidden), position_embeddings (cos, sin) each (B or 1, T, head_dim),
    attention_mask (ignored: padding is refused at the model, see ``nsa_llama``), ...,
    position_ids (B or 1, T), nsa_packing (a ``Packing`` of the B*T tokens, computed once per
    model forward by ``nsa_llama``'s hook), nsa_caches ({layer_idx: NSAKVCache})) ->
    (out (B, T, hidden), None).

    q = RoPE(q_norm(q_proj x)) (T, Hq, D), k = RoPE(k_norm(k_proj x)) (T, Hkv, D),
    v = v_proj x (T, Hkv, D), gates = sigmoid(gate_proj x) (T, Hq, 3) in order (cmp, sel, win);
    out = o_proj(nsa_prefill(q, k, v, gates)) over the packed tokens. The projections (and
    norms) are the wrapped layer's own modules, so its weights are kept and trained.
    """

    def __init__(self, attn: nn.Module, cfg: NSAConfig = NSAConfig(), backend: str = "auto") -> None:
        super().__init__()
        missing = [n for n in ("q_proj", "k_proj", "v_proj", "o_proj") if not hasattr(attn, n)]
        if missing:
            raise TypeError(
                f"{type(attn).__name__} has no {', '.join(missing)}: NSALlamaAttention wraps Llama-family "
                "attention modules with separate q/k/v/o projections"
            )
        config = attn.config
        self.layer_idx = getattr(attn, "layer_idx", None)
        self.n_heads = int(config.num_attention_heads)
        self.n_kv_heads = int(getattr(config, "num_key_value_heads", None) or self.n_heads)
        self.head_dim = int(getattr(attn, "head_dim", config.hidden_size // self.n_heads))
        self.v_head_dim = attn.v_proj.out_features // self.n_kv_heads
        scaling = float(getattr(attn, "scaling", self.head_dim ** -0.5))
        if cfg.scale is None and abs(scaling - self.head_dim ** -0.5) > 1e-12:
            cfg = cfg.model_copy(update={"scale": scaling})  # the model's own softmax scale
        self.cfg, self.backend = cfg, check_backend(backend)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        self.q_norm = getattr(attn, "q_norm", None)
        self.k_norm = getattr(attn, "k_norm", None)
        rope = getattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb", None)
        if rope is None:
            from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as rope
        object.__setattr__(self, "_rope", rope)  # a function (transformers may wrap it in a Module): not a submodule
        w = attn.q_proj.weight
        self.gate_proj = nn.Linear(config.hidden_size, 3 * self.n_heads, device=w.device, dtype=w.dtype)
        if cfg.compress == "mlp":
            self.k_compressor: nn.Module | None = MLPCompressor(cfg.block_len, self.head_dim).to(w.device, w.dtype)
            self.v_compressor: nn.Module | None = MLPCompressor(cfg.block_len, self.v_head_dim).to(w.device, w.dtype)
        else:
            self.k_compressor = self.v_compressor = None
        self.config = config

    def extra_repr(self) -> str:
        return (f"layer_idx={self.layer_idx}, heads={self.n_heads}/{self.n_kv_heads}, head_dim={self.head_dim}, "
                f"backend={self.backend!r}, cfg={self.cfg!r}")

    def _project(self, x: torch.Tensor, position_embeddings):
        """x: (B, T, hidden) -> q (B, T, Hq, D), k (B, T, Hkv, D), v (B, T, Hkv, Dv), gates (B, T, Hq, 3)."""
        B, T = x.shape[:2]
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.v_head_dim)
        if self.q_norm is not None:
            q = self.q_norm(q)
        if self.k_norm is not None:
            k = self.k_norm(k)
        cos, sin = position_embeddings
        q, k = self._rope(q, k, cos, sin, unsqueeze_dim=2)  # (B, T, H, D): cos (B, T, D) -> (B, T, 1, D)
        # Under autocast the projections are bf16 but cos/sin fp32, so RoPE promotes q, k to fp32;
        # back to the projections' dtype (what HF's attention kernels compute in, and FA-2 needs).
        q, k = q.to(v.dtype), k.to(v.dtype)
        gates = torch.sigmoid(self.gate_proj(x)).view(B, T, self.n_heads, 3)
        return q, k, v, gates

    def allocate_cache(self, batch_size: int, capacity: int, *, dtype: torch.dtype | None = None,
                       device=None) -> NSAKVCache:
        """-> an empty ``NSAKVCache`` for this layer: B sequences of up to ``capacity`` tokens, raw
        pages (B, capacity, Hkv, D), in the projections' dtype / device unless given, compressing
        with this layer's phi (its ``MLPCompressor``s for "mlp")."""
        w = self.q_proj.weight
        kw = dict(n_kv_heads=self.n_kv_heads, head_dim=self.head_dim, cfg=self.cfg, v_head_dim=self.v_head_dim,
                  dtype=w.dtype if dtype is None else dtype, device=w.device if device is None else device)
        if self.k_compressor is not None:
            kw.update(phi_k=self.k_compressor, phi_v=self.v_compressor)
        return NSAKVCache.allocate(batch_size, capacity, **kw)

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None, cache=None, *,
                past_key_values=None, position_ids: torch.Tensor | None = None, nsa_packing: Packing | None = None,
                nsa_caches: Mapping[int, NSAKVCache] | None = None, **kwargs):
        if cache is not None or past_key_values is not None:
            raise ValueError(_NO_HF_CACHE)
        if hidden_states.dim() != 3:
            raise ValueError(f"hidden_states must be (B, T, hidden), got shape={tuple(hidden_states.shape)}")
        if position_embeddings is None:
            raise ValueError("NSALlamaAttention needs the model's position_embeddings (cos, sin) for RoPE")
        B, T = hidden_states.shape[:2]
        q, k, v, gates = self._project(hidden_states, position_embeddings)
        nsa_cache = None if nsa_caches is None else nsa_caches[self.layer_idx]
        if nsa_cache is not None and any(nsa_cache.lengths):
            if T != 1:
                raise ValueError(f"decode through an NSAKVCache takes one token per sequence, got T={T}")
            out = decode_step(q[:, 0], k[:, 0], v[:, 0], gates[:, 0], nsa_cache, self.cfg, backend=self.backend)
            return self.o_proj(out.reshape(B, 1, self.n_heads * self.v_head_dim)), None
        packing = nsa_packing if nsa_packing is not None else packing_from_position_ids(
            position_ids, B, T, hidden_states.device)
        qf, kf, vf = (x.reshape(B * T, *x.shape[2:]) for x in (q, k, v))
        out = nsa_prefill(qf, kf, vf, gates.reshape(B * T, self.n_heads, 3), self.cfg, packing, self.backend,
                          self.k_compressor, self.v_compressor)
        if nsa_cache is not None:
            nsa_cache.prefill(kf, vf, packing)
        return self.o_proj(out.reshape(B, T, self.n_heads * self.v_head_dim)), None


# --- the model ----------------------------------------------------------------------------------

def nsa_layers(model: nn.Module) -> list[NSALlamaAttention]:
    """-> the model's ``NSALlamaAttention`` modules, in layer order."""
    return [m for m in model.modules() if isinstance(m, NSALlamaAttention)]


def _check_mask(mask) -> None:
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        raise ValueError(
            f"NSA models take a 2-D attention_mask (B, T) of ones or none, got "
            f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}; express packing "
            "with position_ids instead of a custom mask"
        )
    if not bool(mask.bool().all()):
        raise ValueError(
            "attention_mask has zeros (padding): NSA layers do not support padded batches, their blocks are "
            "positions in the sequence; pack the sequences into one row with position_ids restarting at 0 "
            "(HF's DataCollatorWithFlattening) or batch equal lengths"
        )


def _prepare_forward(module: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook of the decoder model: refuse padding and HF's cache, compute the packing
    once (``nsa_packing``, read by every layer), check decode positions against the caches."""
    _check_mask(kwargs.get("attention_mask", args[1] if len(args) > 1 else None))
    if kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None or kwargs.get("use_cache"):
        raise ValueError(_NO_HF_CACHE)
    x = kwargs.get("input_ids", args[0] if args else None)
    if x is None:
        x = kwargs.get("inputs_embeds")
    if x is None:
        return args, kwargs
    B, T = x.shape[:2]
    position_ids = kwargs.get("position_ids")
    caches = kwargs.get("nsa_caches")
    if caches:
        first = next(iter(caches.values()))
        if any(first.lengths):  # decode: no packing; positions must continue each cached sequence
            expect = torch.tensor(first.lengths, device=x.device).view(B, 1)
            if position_ids is None or position_ids.shape != (B, 1) or not bool((position_ids == expect).all()):
                raise ValueError(
                    f"decode through NSAKVCache: position_ids must be (B={B}, 1) equal to the cached lengths "
                    f"{first.lengths}, got {None if position_ids is None else position_ids.tolist()}"
                )
            return args, kwargs
    kwargs["nsa_packing"] = packing_from_position_ids(position_ids, B, T, x.device)
    return args, kwargs


def nsa_llama(config_or_model, nsa_cfg: NSAConfig = NSAConfig(), backend: str = "auto"):
    """config (a transformers ``PretrainedConfig``) or model -> the model with NSA attention.

    A config builds a randomly initialised ``AutoModelForCausalLM.from_config(config)`` (nothing
    is downloaded); a model is changed in place and returned. Every decoder layer's
    ``self_attn`` becomes an ``NSALlamaAttention(self_attn, nsa_cfg, backend)`` (projections
    reused, gates and "mlp" compressors new); ``config.use_cache`` is set False (HF's cache is
    refused: decode with ``generate_greedy``); a pre-hook on the decoder model refuses padding
    masks and derives the packing from ``position_ids`` once per forward.
    """
    transformers = _transformers()
    if not isinstance(nsa_cfg, NSAConfig):
        raise TypeError(f"nsa_cfg must be an nsa_ref.NSAConfig, got {type(nsa_cfg).__name__}")
    if isinstance(config_or_model, transformers.PretrainedConfig):
        model = transformers.AutoModelForCausalLM.from_config(config_or_model)
    elif isinstance(config_or_model, nn.Module):
        model = config_or_model
    else:
        raise TypeError(
            f"nsa_llama takes a transformers PretrainedConfig or a model, got {type(config_or_model).__name__}"
        )
    if nsa_layers(model):
        raise ValueError("this model already has NSA attention (nsa_llama was applied to it)")
    layers = [m for m in model.modules() if isinstance(getattr(m, "self_attn", None), nn.Module)]
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no decoder layer with a self_attn module: nsa_llama supports "
            "Llama-family models (Llama, Mistral, Qwen2/3, ...)"
        )
    for layer in layers:
        layer.self_attn = NSALlamaAttention(layer.self_attn, nsa_cfg, backend)
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    decoder.register_forward_pre_hook(_prepare_forward, with_kwargs=True)
    model.config.use_cache = False
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.use_cache = False
    return model


@torch.no_grad()
def generate_greedy(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int,
                    capacity: int | None = None) -> torch.Tensor:
    """input_ids (B, T0) -> (B, T0 + max_new_tokens): greedy decoding through one ``NSAKVCache``
    per layer (prefill of the B prompts, then one ``decode_step`` per new token).

    No padding: the B prompts have the same length. ``capacity`` (default T0 + max_new_tokens)
    sizes the caches. Equals greedy decoding that re-runs the whole prefix each step.
    """
    layers = nsa_layers(model)
    if not layers:
        raise ValueError("generate_greedy needs a model with NSA attention: build it with nsa_llama(...)")
    if input_ids.dim() != 2 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids must be (B, T0 >= 1), got shape={tuple(input_ids.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    B, T0 = input_ids.shape
    capacity = T0 + max_new_tokens if capacity is None else capacity
    caches = {layer.layer_idx: layer.allocate_cache(B, capacity) for layer in layers}
    out = input_ids
    if max_new_tokens == 0:
        return out
    logits = model(input_ids=input_ids, nsa_caches=caches, use_cache=False).logits
    for step in range(max_new_tokens):
        tok = logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
        out = torch.cat([out, tok], dim=1)
        if step + 1 == max_new_tokens:
            break
        pos = torch.full((B, 1), T0 + step, dtype=torch.long, device=input_ids.device)
        logits = model(input_ids=tok, position_ids=pos, nsa_caches=caches, use_cache=False).logits
    return out
