"""The catalog of FA-2 contract rules: id -> Rule (what it catches, why, where that is written down).

Kinds:
  - crash: the call dies below Python's argument checks: process killed, CUDA error (the context
    may be poisoned), or an unrelated internal error instead of a message naming the problem.
  - corruption: the call returns wrong numbers and raises nothing.
  - clean-error: the kernel's own check raises a RuntimeError; the contract says it earlier, with
    the values and the fix, and lists it with every other problem of the call.
  - semantics: the call runs, but computes something other than what its arguments say.

Sources: "api" = flash-attention v2.8.3 csrc/flash_attn/flash_api.cpp, "iface" =
flash_attn/flash_attn_interface.py, "src" = csrc/flash_attn/src/, "sdp" = PyTorch sdp_utils /
vendored flash_api.cpp, "[H100]" = reproduced on the lent H100 (see fa2_contract.md).
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

from .reason import Kind

CallKind = Literal["dense", "varlen", "kvcache"]
ALL: tuple[CallKind, ...] = ("dense", "varlen", "kvcache")


class Rule(BaseModel):
    """One contract rule: stable id plus the facts a person needs to trust and act on it."""

    model_config = ConfigDict(frozen=True)

    id: str
    title: str
    kind: Kind
    applies_to: tuple[CallKind, ...]
    mode: Literal["meta", "strict"] = "meta"
    # "backward": checked only when a backward runs (guarded(): when it starts; *_reasons: backward=True).
    phase: Literal["forward", "backward"] = "forward"
    source: str
    symptom: str
    fix: str


def _rules(*rules: Rule) -> dict[str, Rule]:
    catalog: dict[str, Rule] = {}
    for rule in rules:
        if rule.id in catalog:
            raise ValueError(f"duplicate rule id {rule.id}")
        catalog[rule.id] = rule
    return catalog


RULES: dict[str, Rule] = _rules(
    # --- layout and types (clean errors the kernels raise themselves) ---------------------------
    Rule(
        id="FA2-RANK",
        title="q, k, v (and caches) are tensors of the layout's rank",
        kind="clean-error",
        applies_to=ALL,
        source="api mha_fwd / mha_varlen_fwd / mha_fwd_kvcache: sizes() and CHECK_SHAPE",
        symptom="RuntimeError (or IndexError) from the kernel's shape checks",
        fix="dense and kvcache: (B, S, H, D); varlen: (T, H, D), paged k/v (num_blocks, page, Hkv, D)",
    ),
    Rule(
        id="FA2-DEVICE",
        title="every tensor argument is on one device",
        kind="clean-error",
        applies_to=ALL,
        source="api CHECK_DEVICE",
        symptom="RuntimeError 'must be on CUDA' or a cross-device access",
        fix="move every tensor (q, k, v, index tensors, alibi_slopes) to q's device",
    ),
    Rule(
        id="FA2-ARCH",
        title="compute capability the provider supports",
        kind="clean-error",
        applies_to=ALL,
        source="api mha_fwd: dprops major >= 8 (since 2.7.3; earlier only 8.x and 9.0); sdp is_sm80_or_newer",
        symptom="RuntimeError 'FlashAttention only supports Ampere GPUs or newer.'",
        fix="use an sm80+ GPU, or route to another attention kernel (SDPA math / mem-efficient)",
    ),
    Rule(
        id="FA2-DTYPE",
        title="q is float16 or bfloat16",
        kind="clean-error",
        applies_to=ALL,
        source="api: 'FlashAttention only support fp16 and bf16 data type'",
        symptom="RuntimeError from the kernel's dtype check",
        fix="cast q, k, v to torch.float16 or torch.bfloat16 (and cast the output back if needed)",
    ),
    Rule(
        id="FA2-DTYPE-MATCH",
        title="k, v (and new k/v) have q's dtype",
        kind="clean-error",
        applies_to=ALL,
        source="api: 'query and key must have the same dtype'",
        symptom="RuntimeError from the kernel's dtype check",
        fix="cast k and v to q.dtype",
    ),
    Rule(
        id="FA2-INDEX-DTYPE",
        title="index arguments are int32 tensors (varlen: both cu_seqlens given)",
        kind="clean-error",
        applies_to=("varlen", "kvcache"),
        source="api: cu_seqlens_*, seqused_k, block_table, seqlens_k, cache_batch_idx, leftpad_k must have dtype int32",
        symptom="RuntimeError 'must have dtype int32'",
        fix="pass index tensors as .to(torch.int32) (torch.cumsum returns int64; FLA documents int64)",
    ),
    Rule(
        id="FA2-INDEX-CONTIGUOUS",
        title="index tensors are contiguous (block_table: last dim)",
        kind="clean-error",
        applies_to=("varlen", "kvcache"),
        source="api CHECK_CONTIGUOUS(cu_seqlens_*), seqused_k, seqlens_k, leftpad_k; block_table stride(-1) == 1",
        symptom="RuntimeError 'must be contiguous'",
        fix="call .contiguous() on the index tensor",
    ),
    Rule(
        id="FA2-INDEX-SHAPE",
        title="index tensors have the batch's shape",
        kind="clean-error",
        applies_to=("varlen", "kvcache"),
        source="api CHECK_SHAPE: cu_seqlens (b+1), seqused_k / seqlens_k / leftpad_k (b), block_table (b, n)",
        symptom="RuntimeError 'must have shape'",
        fix="cu_seqlens_q and cu_seqlens_k: (B+1,); seqused_k, cache_seqlens, cache_leftpad: (B,); block_table: (B, pages)",
    ),
    Rule(
        id="FA2-LAST-DIM-STRIDE",
        title="last-dim stride 1 where the provider does not fix it",
        kind="clean-error",
        applies_to=ALL,
        source="api: 'Input tensor must have contiguous last dimension'; iface maybe_contiguous (not for the kv cache)",
        symptom="RuntimeError from the kernel (other strides are free; batch stride 0 works [H100])",
        fix="make the last dimension contiguous (x.contiguous(), or build the view so stride(-1) == 1)",
    ),
    Rule(
        id="FA2-HEAD-DIM-MAX",
        title="head dim at most 256 (after the provider's padding)",
        kind="clean-error",
        applies_to=ALL,
        source="api: 'FlashAttention forward only supports head dimension at most 256'",
        symptom="RuntimeError from the kernel",
        fix="use head dim <= 256, or another kernel for larger heads",
    ),
    Rule(
        id="FA2-HEAD-DIM-MULTIPLE",
        title="head dim a multiple of 8 where the provider does not pad",
        kind="clean-error",
        applies_to=ALL,
        source="sdp vendored mha_fwd: 'head_size must be a multiple of 8' [H100]; iface pads instead",
        symptom="RuntimeError from torch's op",
        fix="pad q, k, v's last dim with zeros up to a multiple of 8 and slice the output back",
    ),
    Rule(
        id="FA2-HEAD-DIM-V",
        title="v's head dim equals q/k's",
        kind="clean-error",
        applies_to=ALL,
        source="api CHECK_SHAPE(v, ..., head_size) (e.g. NSA paper dk=192, dv=128 does not fit)",
        symptom="RuntimeError 'v must have shape'",
        fix="pad v with zeros to q's head dim and slice the output, or use a kernel with dv != dk",
    ),
    Rule(
        id="FA2-QK-SHAPE",
        title="q and k agree on batch and head dim",
        kind="clean-error",
        applies_to=ALL,
        source="api CHECK_SHAPE(k, batch_size, seqlen_k, num_heads_k, head_size)",
        symptom="RuntimeError 'k must have shape'",
        fix="give q and k the same batch size and head dim",
    ),
    Rule(
        id="FA2-KV-SHAPE",
        title="k and v agree on every dim but the last",
        kind="clean-error",
        applies_to=ALL,
        source="api CHECK_SHAPE(v, ...); kvcache: new k/v (B, S_new, Hkv, D), cache batch covers q's batch",
        symptom="RuntimeError 'v must have shape', or reads past the cache batch",
        fix="make k and v the same shape except the last dim (and the cache at least q's batch)",
    ),
    Rule(
        id="FA2-HEADS-KV-ZERO",
        title="at least one key/value head",
        kind="crash",
        applies_to=ALL,
        source="[H100] both providers: num_heads % num_heads_k on the host",
        symptom="SIGFPE: the process is killed (integer division by zero)",
        fix="give k and v at least one head",
    ),
    Rule(
        id="FA2-HEADS-DIVISIBLE",
        title="query heads a multiple of key/value heads",
        kind="clean-error",
        applies_to=ALL,
        source="api: 'Number of heads in key/value must divide number of heads in query'",
        symptom="RuntimeError from the kernel",
        fix="use Hq % Hkv == 0 (repeat k/v heads, or pick a grouping that divides)",
    ),
    Rule(
        id="FA2-BATCH-EMPTY",
        title="batch size positive",
        kind="clean-error",
        applies_to=ALL,
        source="api: 'batch size must be positive' (torch >= 2.10 returns empty output for dense b == 0)",
        symptom="RuntimeError from the kernel",
        fix="skip the call when there is nothing to attend (return an empty output)",
    ),
    Rule(
        id="FA2-DENSE-EMPTY-Q",
        title="dense seqlen_q > 0",
        kind="crash",
        applies_to=("dense",),
        source="[H100] both providers",
        symptom="CUDA 'invalid argument'; the context may be poisoned",
        fix="skip the call when seqlen_q == 0 (the output is empty)",
    ),
    Rule(
        id="FA2-DENSE-EMPTY-K",
        title="dense seqlen_k > 0",
        kind="semantics",
        applies_to=("dense",),
        source="api mha_fwd: 'if (seqlen_k > 0) run ... else out = 0, lse = +inf' [H100]",
        symptom="no kernel runs: out = 0 and lse = +inf (not the -inf of 'no visible key')",
        fix="handle seqlen_k == 0 before the call (out = 0, lse = -inf by our convention)",
    ),
    Rule(
        id="FA2-PAGED-BLOCK-SIZE",
        title="paged KV page size a multiple of 256",
        kind="clean-error",
        applies_to=("varlen", "kvcache"),
        source="api: 'Paged KV cache block size must be divisible by 256'",
        symptom="RuntimeError from the kernel",
        fix="allocate the paged cache with page_block_size % 256 == 0",
    ),
    Rule(
        id="FA2-PAGED-COMBINATION",
        title="paged KV without cache_leftpad or cache_batch_idx",
        kind="clean-error",
        applies_to=("kvcache",),
        source="api mha_fwd_kvcache: 'Paged KVcache does not support cache_batch_idx'; no leftpad with paging",
        symptom="RuntimeError from the kernel",
        fix="drop cache_leftpad / cache_batch_idx, or use a non-paged cache",
    ),
    Rule(
        id="FA2-KVCACHE-APPEND",
        title="new k and v come together, with cache_seqlens, and fit the cache",
        kind="clean-error",
        applies_to=("kvcache",),
        source="api mha_fwd_kvcache: 'If key is supplied, value must also be passed in', seqlens_k needed, seqlen_q <= seqlen_k",
        symptom="RuntimeError from the kernel",
        fix="pass k and v together with cache_seqlens, and keep seqlen_q <= cache capacity",
    ),
    Rule(
        id="FA2-NUM-SPLITS",
        title="num_splits at most 128",
        kind="clean-error",
        applies_to=("kvcache",),
        source="api set_params_splitkv: 'num_splits > 128 not supported'",
        symptom="RuntimeError from the kernel",
        fix="pass num_splits in [0, 128] (0 = heuristic)",
    ),
    Rule(
        id="FA2-DROPOUT-RANGE",
        title="0 <= dropout_p < 1",
        kind="clean-error",
        applies_to=("dense", "varlen"),
        source="api set_params_fprop: TORCH_CHECK(p_dropout < 1.f)",
        symptom="RuntimeError from the kernel (a negative p is not checked at all)",
        fix="pass dropout_p in [0, 1)",
    ),
    Rule(
        id="FA2-RETURN-SOFTMAX",
        title="returning the softmax needs dropout_p > 0",
        kind="clean-error",
        applies_to=("dense", "varlen"),
        source="api: 'return_softmax is only supported when p_dropout > 0.0' (iface masks it; torch's op does not)",
        symptom="RuntimeError from torch's op (return_debug_mask=True with dropout_p == 0)",
        fix="pass return_debug_mask=False, or dropout_p > 0",
    ),
    Rule(
        id="FA2-SOFTCAP-DROPOUT",
        title="no dropout together with softcap",
        kind="clean-error",
        applies_to=("dense", "varlen"),
        source="api: 'Softcapping does not support dropout for now'",
        symptom="RuntimeError from the kernel",
        fix="use softcap=0 or dropout_p=0",
    ),
    Rule(
        id="FA2-ALIBI",
        title="alibi_slopes fp32, shape (Hq,) or (B, Hq), last dim contiguous",
        kind="clean-error",
        applies_to=ALL,
        source="api set_params_alibi",
        symptom="RuntimeError from the kernel",
        fix="pass alibi_slopes as a float32 tensor of shape (Hq,) or (B, Hq) with stride(-1) == 1",
    ),
    Rule(
        id="FA2-BWD-ARCH",
        title="flash_attn < 2.7.3: large-head backwards only on sm80/sm90",
        kind="clean-error",
        applies_to=("dense", "varlen"),
        phase="backward",
        source="api mha_bwd / mha_varlen_bwd 2.5.0-2.7.2: TORCH_CHECK(is_sm80 || is_sm90, 'FlashAttention backward for head dim ...'); "
               "d > 192 (2.5.0-2.5.4), d in (192, 224] or d > 224 with dropout (2.5.5-2.6.1), d > 192 with dropout (2.6.2-2.7.2)",
        symptom="RuntimeError 'FlashAttention backward for head dim > 192 ... requires A100/A800 or H100/H800' when backward starts",
        fix="train on an sm80/sm90 GPU, use head dim <= 192 (or dropout_p=0 where the release allows it), or upgrade flash_attn",
    ),
    Rule(
        id="FA2-INFERENCE-ONLY",
        title="no backward through a paged KV cache (or torch's seqused_k)",
        kind="clean-error",
        applies_to=("varlen",),
        phase="backward",
        source="iface FlashAttnVarlenFunc.backward passes no block_table and api mha_varlen_bwd CHECK_SHAPE(k, total_k, "
               "num_heads_k, head_size) refuses the 4-D paged cache (FA-2's varlen_causal test runs the backward only "
               "unpaged); torch: _flash_attention_backward takes neither block_table nor seqused_k, and varlen_attn calls "
               "both 'an inference-only parameter'",
        symptom="RuntimeError 'k must have shape (total_k, num_heads_k, head_size)' when backward starts (torch: an error, "
                "or gradients that ignore seqused_k)",
        fix="run paged / seqused_k calls without autograd (torch.no_grad(), inference), or train on unpaged k/v",
    ),
    Rule(
        id="FA2-SOFTMAX-SCALE",
        title="softmax_scale finite and > 0",
        kind="corruption",
        applies_to=ALL,
        source="api set_params_fprop passes the float on unchecked; src softmax.h subtracts the row max of the unscaled scores "
               "(sanity rule: FA-2 itself checks nothing)",
        symptom="NaN / inf softmax_scale: NaN output, no error; a negative one makes every exponent >= 0 (the max of the unscaled "
                "scores is the min of the scaled ones): inf / NaN or wrong weights; 0 weighs every key the same",
        fix="pass softmax_scale=None (1/sqrt(head dim)) or a finite positive float",
    ),
    Rule(
        id="FA2-ROTARY-NEW-KV",
        title="rotary_cos/rotary_sin only together with new k and v",
        kind="clean-error",
        applies_to=("kvcache",),
        source="api mha_fwd_kvcache: 'If rotary cos/sin are provided, new key / value to be appended to KV cache must also be provided'",
        symptom="RuntimeError from the kernel (FA-2's own kvcache test skips rotary without new k/v)",
        fix="pass the new tokens as k and v with rotary_cos/rotary_sin, or apply the rotary embedding to q yourself and drop cos/sin",
    ),
    Rule(
        id="FA2-ROTARY-DIM",
        title="rotary_dim = 2 * rotary_cos.shape[1] is <= head dim and a multiple of 16",
        kind="clean-error",
        applies_to=("kvcache",),
        source="api mha_fwd_kvcache: 'rotary_dim must be <= headdim', 'Only rotary dimensions divisible by 16 are currently supported'",
        symptom="RuntimeError from the kernel",
        fix="build cos/sin with rotary_dim / 2 columns, rotary_dim a multiple of 16 and at most the head dim",
    ),
    Rule(
        id="FA2-ROTARY-TABLE",
        title="rotary_cos and rotary_sin: both given, (seqlen_ro, rotary_dim / 2), seqlen_ro >= cache length, contiguous, q's dtype",
        kind="clean-error",
        applies_to=("kvcache",),
        source="api mha_fwd_kvcache: 'cos/sin seqlen must be at least the seqlen of KV cache', CHECK_SHAPE / CHECK_CONTIGUOUS(rotary_cos, "
               "rotary_sin), 'rotary_cos must have the same dtype as query', 'If rotary cos is provided, rotary sin must also be provided'",
        symptom="RuntimeError from the kernel; rotary_sin without rotary_cos is silently ignored (no rotation)",
        fix="pass contiguous cos and sin of one shape (seqlen_ro >= k_cache capacity, rotary_dim / 2) in q's dtype",
    ),
    Rule(
        id="FA2-PACKED-SHAPE",
        title="packed qkv has 3 entries on its packing dim, packed kv 2",
        kind="semantics",
        applies_to=("dense", "varlen"),
        source="iface FlashAttn*QKVPackedFunc / *KVPackedFunc: q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2] (varlen: qkv[:, 0] ...)",
        symptom="IndexError when the packing dim is shorter; entries past the third (second) silently ignored when longer",
        fix="dense qkv: (B, S, 3, H, D), kv: (B, S, 2, Hkv, D); varlen qkv: (T, 3, H, D), kv: (T, 2, Hkv, D)",
    ),
    Rule(
        id="FA2-ARG-UNSUPPORTED",
        title="only arguments the installed release has",
        kind="clean-error",
        applies_to=ALL,
        source="iface signatures per release: softcap and return_softmax_lse since 2.6.0, cache_leftpad since 2.6.1, varlen "
               "block_table since 2.5.7; torch's op: no softcap, no alibi_slopes (its FA-2 build refuses them: 'This flash "
               "attention build does not support alibi', H200 fuzz 2026-12-03), block_table from torch 2.13",
        symptom="TypeError 'unexpected keyword argument', or a positional argument landing in another parameter",
        fix="drop the argument (softcap=0, no block_table / cache_leftpad; torch: no alibi_slopes, use the flash_attn "
            "package for ALiBi) or upgrade the provider",
    ),
    # --- what the kernels do not check -----------------------------------------------------------
    Rule(
        id="FA2-GRID-LIMIT",
        title="batch and heads within the CUDA grid limit",
        kind="crash",
        applies_to=ALL,
        source="src launch templates: grid (m_blocks, b, h); split-KV (m_blocks, splits, b*h)",
        symptom="CUDA 'invalid configuration argument'",
        fix="split the batch (or heads) into chunks of at most 65535 (b*h for split-KV)",
    ),
    Rule(
        id="FA2-INT32-OFFSET",
        title="backward offsets fit in int32",
        kind="crash",
        applies_to=("dense", "varlen"),
        phase="backward",
        source="api/src dq_accum row offset computed in int (issues #1311, PR #1500; fixed only on main, PR #2260)",
        symptom="illegal memory access in the backward (b * round_up(sq,128) * h * d_rounded >= 2**31)",
        fix="split the batch (or heads) so the product stays below 2**31, or run without autograd",
    ),
    Rule(
        id="FA2-BWD-GARBAGE-GRADS",
        title="no backward with dropout and 192 < d <= 256 on sm86/sm89/sm120",
        kind="corruption",
        applies_to=("dense", "varlen"),
        phase="backward",
        source="src flash_bwd_launch_template.h run_mha_bwd_hdim256 (since 2.7.3)",
        symptom="no backward kernel is launched: garbage gradients, no error",
        fix="use dropout_p=0, head dim <= 192, or an sm80/sm90 GPU for training",
    ),
    Rule(
        id="FA2-VARLEN-GQA-DECODE",
        title="varlen GQA with max_seqlen_q == 1 needs one query per sequence",
        kind="crash",
        applies_to=("varlen",),
        source="api mha_varlen_fwd seqlenq_ngroups_swapped reshape; [H100]; issues #1537, #1619",
        symptom="RuntimeError from an internal reshape (total_q != batch)",
        fix="give every sequence exactly one query, or pass the true max_seqlen_q (> 1)",
    ),
    Rule(
        id="FA2-CAUSAL-DROPPED",
        title="causal is not silently dropped by max_seqlen_q == 1",
        kind="semantics",
        applies_to=("varlen",),
        source="api: 'if (max_seqlen_q == 1 && !alibi) is_causal = false' [H100]",
        symptom="causal switched off although some sequence has > 1 query (total_q > batch)",
        fix="pass the true max_seqlen_q",
    ),
    Rule(
        id="FA2-WINDOW-RIGHT-CLAMPED",
        title="a right window >= seqlen_k that is not a no-op",
        kind="semantics",
        applies_to=ALL,
        source="api: 'if (window_size_right >= seqlen_k) window_size_right = -1' [H100]",
        symptom="the right window becomes -1 (or seqlen_k when a left window remains): some rows see other keys than asked",
        fix="pass window_size_right = -1 if unbounded was meant, or handle rows beyond the window yourself",
    ),
    Rule(
        id="FA2-VARLEN-EMPTY-Q",
        title="varlen max_seqlen_q >= 1",
        kind="crash",
        applies_to=("varlen",),
        source="[H100] differential fuzzing, both providers (artifacts/2026-11-25/fa2_harden/fuzz/)",
        symptom="CUDA error 'invalid argument' at launch (the context may be unusable afterwards)",
        fix="skip the call when no sequence has a query (return empty outputs), else pass the true max_seqlen_q",
    ),
    Rule(
        id="FA2-WINDOW-LEFT-ONLY",
        title="a left window with window_right = -1 keeps every key to the right",
        kind="semantics",
        applies_to=ALL,
        source="api: 'if (window_size_left >= 0 && window_size_right < 0) window_size_right = seqlen_k' [H100 fuzzing]",
        symptom="rows i < seqlen_q - seqlen_k - 1 silently lose their last keys (no error, finite output)",
        fix="pass window_size_right = max_seqlen_k - 1 (or larger) explicitly, or use causal=True for (w, 0) windows",
    ),
    # --- strict mode: read the index values (one host copy) -------------------------------------
    Rule(
        id="FA2-CU-SEQLENS-START",
        title="cu_seqlens starts at 0",
        kind="corruption",
        applies_to=("varlen",),
        mode="strict",
        source="[H100]",
        symptom="sequences read from the wrong offsets: non-finite or finite garbage, no error",
        fix="build cu_seqlens as a zero followed by the cumulative sum of the lengths",
    ),
    Rule(
        id="FA2-CU-SEQLENS-DECREASING",
        title="cu_seqlens non-decreasing",
        kind="corruption",
        applies_to=("varlen",),
        mode="strict",
        source="[H100]",
        symptom="negative lengths: out-of-bounds reads, garbage, no error",
        fix="lengths must be >= 0; build cu_seqlens with a cumulative sum",
    ),
    Rule(
        id="FA2-CU-SEQLENS-OVERRUN",
        title="cu_seqlens[-1] within the tokens given",
        kind="corruption",
        applies_to=("varlen",),
        mode="strict",
        source="[H100]",
        symptom="reads past the end of q / k / v: garbage, no error",
        fix="make cu_seqlens_q[-1] <= q.shape[0] and cu_seqlens_k[-1] <= k.shape[0]",
    ),
    Rule(
        id="FA2-MAX-SEQLEN-Q-LOW",
        title="max_seqlen_q at least the longest query sequence",
        kind="corruption",
        applies_to=("varlen",),
        mode="strict",
        source="[H100]",
        symptom="rows past ceil(max_seqlen_q / kBlockM) tiles are never written",
        fix="pass max_seqlen_q = max(cu_seqlens_q[1:] - cu_seqlens_q[:-1])",
    ),
    Rule(
        id="FA2-MAX-SEQLEN-K-LOW",
        title="max_seqlen_k at least the longest key sequence",
        kind="semantics",
        applies_to=("varlen",),
        mode="strict",
        source="api mha_varlen_fwd: windows >= max_seqlen_k become -1",
        symptom="a window shorter than the true key length can be dropped",
        fix="pass max_seqlen_k = the longest key sequence (seqused_k where given)",
    ),
    Rule(
        id="FA2-SEQUSED-K-OVERRUN",
        title="0 <= seqused_k <= each sequence's keys",
        kind="corruption",
        applies_to=("varlen",),
        mode="strict",
        source="src block_info.h: actual_seqlen_k = seqused_k[b], keys from cu_seqlens_k[b]",
        symptom="keys of the next sequence (or past k) are read: garbage, no error",
        fix="clamp seqused_k to cu_seqlens_k[1:] - cu_seqlens_k[:-1] (the page capacity when paged)",
    ),
    Rule(
        id="FA2-KV-CACHE-OVERFLOW",
        title="cache lengths plus new tokens fit the cache",
        kind="corruption",
        applies_to=("varlen", "kvcache"),
        mode="strict",
        source="paged: block_table read out of bounds (issue #2709, <= 2.8.3); non-paged: past seqlen_cache",
        symptom="out-of-bounds reads/writes of the cache, no error",
        fix="grow the cache (more pages per sequence) before appending, or append fewer tokens",
    ),
    Rule(
        id="FA2-BLOCK-TABLE-RANGE",
        title="used block_table entries name existing pages",
        kind="corruption",
        applies_to=("varlen", "kvcache"),
        mode="strict",
        source="src: page index from block_table, unchecked",
        symptom="pages outside the cache are read: garbage or illegal memory access",
        fix="keep the used entries of block_table in [0, num_blocks)",
    ),
    Rule(
        id="FA2-ROTARY-TABLE-OVERRUN",
        title="the rotary table has a row for every position the kernel rotates",
        kind="crash",
        applies_to=("kvcache",),
        mode="strict",
        source="src flash_fwd_kernel.h (split-KV): q reads cos/sin rows from cache_seqlens[b] (binfo.seqlen_k_cache + "
               "leftpad_k), one row per query with causal or a local window after the api's normalisation, else that "
               "row only; the copy is predicated on q rows, not on seqlen_ro; api checks only seqlen_ro >= seqlen_k. "
               "[H200] differential fuzzing, flash_attn 2.8.3",
        symptom="CUDA 'device-side assert triggered' or 'unspecified launch failure' (the context is lost), or q rotated "
                "with rows read past the table (garbage, no error)",
        fix="pass rotary_cos/rotary_sin with at least max(cache_seqlens) + seqlen_q rows (e.g. the model's maximum "
            "position), or keep cache_seqlens + seqlen_q within the table",
    ),
)


NOTES: tuple[tuple[str, str], ...] = (
    (
        "max_seqlen_q == 1 with causal",
        "FA-2 turns causal off when max_seqlen_q == 1 (no alibi). With one query per sequence "
        "that changes nothing: bottom-right causal lets the single query see every key. It only "
        "matters when some sequence has more than one query, i.e. max_seqlen_q understates the "
        "truth. Meta mode sees that without reading values when total_q > batch "
        "(FA2-CAUSAL-DROPPED); strict mode sees every case (FA2-MAX-SEQLEN-Q-LOW).",
    ),
    (
        "window >= seqlen_k",
        "FA-2 treats a window side >= seqlen_k (max_seqlen_k for varlen) as -1, and a surviving "
        "left window then gets right = seqlen_k. For the left side that keeps exactly the same "
        "keys (j >= i + Sk - Sq - wl holds for every j >= 0 once wl >= Sk), so it is not flagged. "
        "For the right side FA2-WINDOW-RIGHT-CLAMPED fires only when some row can see other keys: "
        "without a left window (no window remains) when seqlen_q > window_right + 1; with a left "
        "window (right becomes seqlen_k) when window_right > seqlen_k and seqlen_q > seqlen_k + 1. "
        "Never with causal, which sets the right window to 0. Intent is read literally "
        "(-1 = unbounded); checked exhaustively against an emulation of FA-2's normalisation "
        "for seqlen_q <= 9, seqlen_k <= 6: no miss, no false alarm.",
    ),
    (
        "left-only windows",
        "A left window with window_right = -1 gets right = seqlen_k (max_seqlen_k for varlen), so "
        "row i keeps j <= i + 2 Sk - Sq and rows i < Sq - Sk - 1 lose keys: FA2-WINDOW-LEFT-ONLY "
        "fires when seqlen_q > seqlen_k + 1 (for varlen max_seqlen_q > max_seqlen_k + 1, which "
        "bounds every sequence because the kernel uses max_seqlen_k). Found by the H100 fuzzer "
        "as false accepts before the rule existed.",
    ),
    (
        "arch rules on CPU",
        "FA2-ARCH and FA2-BWD-GARBAGE-GRADS need compute capabilities. Pass caps=DeviceCaps(8, 6) "
        "(or 'sm86') to evaluate them anywhere; with caps=None they are read from q's CUDA "
        "device (once per device index), and for CPU or meta tensors they are not evaluated.",
    ),
    (
        "strict mode cost",
        "Strict mode concatenates the index tensors that passed the meta rules and copies them "
        "to the host with one .tolist(): one device sync per call. Meta tensors have no values, "
        "so strict mode adds nothing for them.",
    ),
    (
        "backward rules",
        "The phase-backward rules (FA2-INT32-OFFSET, FA2-BWD-GARBAGE-GRADS, FA2-BWD-ARCH, "
        "FA2-INFERENCE-ONLY) are about the backward kernel. guarded() checks the forward rules before the forward and, when autograd "
        "records the call and a backward rule fails, hooks the output's grad_fn so the "
        "FA2ContractError is raised when backward starts, before the backward kernel; a forward-only "
        "call (inference, or FA-2's own forward-only tests on sm86) is never refused for them. "
        "The *_reasons functions take backward=True (check them too), False (forward only) or None "
        "(the default: whether autograd will record the call, i.e. grad mode on and an input "
        "requiring grad); requires_grad= is the old name of backward=.",
    ),
    (
        "arguments with no rule",
        "deterministic (backward only: nsplits zeroed copies of the dq accumulator, no check in "
        "FA-2), return_attn_probs (flash_attn asks for the probabilities only when dropout_p > 0; "
        "torch's return_debug_mask is FA2-RETURN-SOFTMAX), return_softmax_lse (kvcache: returns "
        "the lse too), rotary_interleaved (which pairs rotate) and num_splits <= 128 are accepted "
        "as given; each is modelled so FA2-ARG-UNSUPPORTED can say when a release lacks it.",
    ),
    (
        "versions",
        "spec_for('flash_attn') reads the installed version from package metadata and models "
        "releases 2.5.0 to 2.8.3 one by one (contracts/versions.py: signatures, arguments, the "
        "backward arch check; 2.7.3 switches FA2-BWD-ARCH to FA2-BWD-GARBAGE-GRADS and the arch "
        "allow-list to major >= 8). A newer version is checked with the 2.8.3 rules and an older "
        "one with the 2.5.0 rules, each with a UserWarning.",
    ),
    (
        "packed entry points",
        "flash_attn_qkvpacked_func, flash_attn_kvpacked_func and their varlen forms are checked "
        "as the dense / varlen call they make on the unpacked views (same rules, messages naming "
        "qkv / kv), plus FA2-PACKED-SHAPE; guarded() kinds qkvpacked, kvpacked, varlen_qkvpacked, "
        "varlen_kvpacked.",
    ),
    (
        "torch provider and FA2-BWD-GARBAGE-GRADS",
        "The sm86/sm89/sm120 gap is a flash_attn >= 2.7.3 fact. PyTorch's vendored backward "
        "was not shown to have it, so the torch spec leaves bwd_garbage_archs empty; fill it in "
        "if a GPU run shows otherwise.",
    ),
)


def rules_markdown() -> str:
    """The catalog as a Markdown document (committed as Documentation/contracts_rules.md)."""
    lines = [
        "# FA-2 contract rules",
        "",
        "Generated by `contracts.catalog.rules_markdown()`; do not edit by hand",
        "(`tests/contracts` fails when this file and the catalog differ). Regenerate with",
        "`python -c \"import contracts.catalog as c; c.write_rules_markdown()\"`.",
        "",
        "Kinds: **crash** (dies below the argument checks), **corruption** (wrong numbers, no error),",
        "**clean-error** (the kernel raises; the contract says it first, with the fix), **semantics**",
        "(runs, but computes something other than the arguments say). Mode **strict** rules read",
        "index values (one host copy); all others read only shapes, dtypes, strides and devices.",
        "Phase **backward** rules are checked when a backward runs (see the backward-rules decision).",
        "",
        "| id | kind | mode | phase | applies to | title |",
        "|---|---|---|---|---|---|",
    ]
    for rule in RULES.values():
        lines.append(
            f"| `{rule.id}` | {rule.kind} | {rule.mode} | {rule.phase} | {', '.join(rule.applies_to)} | {rule.title} |"
        )
    lines += ["", "## Decisions", ""]
    for title, text in NOTES:
        lines.append(f"- **{title}**: {text}")
    for rule in RULES.values():
        lines += [
            "",
            f"## {rule.id}",
            "",
            f"{rule.title}.",
            "",
            f"- kind: {rule.kind}; mode: {rule.mode}; phase: {rule.phase}; applies to: {', '.join(rule.applies_to)}",
            f"- source: {rule.source}",
            f"- symptom: {rule.symptom}",
            f"- fix: {rule.fix}",
        ]
    return "\n".join(lines) + "\n"


def rules_markdown_path():
    """Where the generated table is committed: <repo>/Documentation/contracts_rules.md."""
    from pathlib import Path

    return Path(__file__).resolve().parent.parent / "Documentation" / "contracts_rules.md"


def write_rules_markdown() -> None:
    """Regenerate Documentation/contracts_rules.md from the catalog."""
    rules_markdown_path().write_text(rules_markdown(), encoding="utf-8")
