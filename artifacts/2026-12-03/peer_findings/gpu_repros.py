"""Minimal GPU repros of the differences the H200 runs of the suite found (bf16, CUDA kernels).

Run from the repository root on a CUDA machine with flash_attn, fla-core and a checkout of
native-sparse-attention-triton on PYTHONPATH (conformance/tools/device/peer_suite.sh sets that up):

    python artifacts/2026-12-03/peer_findings/gpu_repros.py

Each repro calls the library's own entry point (not this project's adapter) where it can, so the
difference is the library's. Every block is in its own try/except: an exception is printed as the
result, the next repro still runs.
"""
import sys
import traceback
import warnings

warnings.simplefilter("ignore")
sys.path.insert(0, ".")
import torch  # noqa: E402

dev = "cuda"
torch.manual_seed(0)


def run(title, fn):
    print(f"== {title} ==")
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - the exception is the result
        print(f"raised {type(exc).__name__}: {exc}".splitlines()[0][:300])
        print("  at", traceback.extract_tb(exc.__traceback__)[-1].filename.split("site-packages/")[-1],
              "line", traceback.extract_tb(exc.__traceback__)[-1].lineno)


# --- FLA -----------------------------------------------------------------------------------------

def fla_empty_sequence():
    """parallel_nsa on cu_seqlens [0, 0, 64] vs [0, 64]: the same 64 tokens, an empty sequence in front."""
    from fla.ops.nsa.parallel import parallel_nsa
    T, Hq, Hkv, D = 64, 16, 1, 32
    q = torch.randn(1, T, Hq, D, device=dev, dtype=torch.bfloat16)
    k = torch.randn(1, T, Hkv, D, device=dev, dtype=torch.bfloat16)
    v = torch.randn(1, T, Hkv, D, device=dev, dtype=torch.bfloat16)
    g = torch.rand(1, T, Hq, 3, device=dev, dtype=torch.bfloat16)
    kw = dict(g_cmp=g[..., 0], g_slc=g[..., 1], g_swa=g[..., 2], block_counts=4, block_size=32, window_size=48)
    outs = {}
    for name, cu in (("[0, 64]", [0, 64]), ("[0, 0, 64]", [0, 0, 64]), ("[0, 64, 64]", [0, 64, 64])):
        cu_t = torch.tensor(cu, device=dev, dtype=torch.int32)
        outs[name] = parallel_nsa(q, k, v, cu_seqlens=cu_t, **kw).float()
        print(f"parallel_nsa cu_seqlens={name}: finite={bool(outs[name].isfinite().all())}")
    for name in ("[0, 0, 64]", "[0, 64, 64]"):
        diff = (outs[name] - outs["[0, 64]"]).abs()
        print(f"max|out({name}) - out([0, 64])| = {diff.max().item():.4g} "
              f"(rows differing: {int((diff.amax(dim=(0, 2, 3)) > 0).sum())} of {T}; the spec says 0)")
    from fla.ops.nsa.compression import parallel_nsa_compression
    kc = k.view(1, 2, 32, Hkv, D).float().mean(2).to(k.dtype)
    vc = v.view(1, 2, 32, Hkv, D).float().mean(2).to(v.dtype)
    res = {}
    for name, cu in (("[0, 64]", [0, 64]), ("[0, 0, 64]", [0, 0, 64])):
        cu_t = torch.tensor(cu, device=dev, dtype=torch.int32)
        res[name] = parallel_nsa_compression(q, kc, vc, TK=T, block_size=32, scale=D ** -0.5, cu_seqlens=cu_t)[0].float()
    diff = (res["[0, 0, 64]"] - res["[0, 64]"]).abs()
    print(f"parallel_nsa_compression: max|out([0, 0, 64]) - out([0, 64])| = {diff.max().item():.4g}")


def fla_topk_pow2():
    """parallel_nsa_topk with block_counts = 3 returns how many indices per row?"""
    from fla.ops.nsa.parallel import parallel_nsa_topk
    T, Hq, D, bs = 256, 16, 32, 32
    q = torch.randn(1, T, Hq, D, device=dev, dtype=torch.bfloat16)
    kc = torch.randn(1, T // bs, 1, D, device=dev, dtype=torch.bfloat16)
    for n in (3, 4, 5):
        idx = parallel_nsa_topk(q, kc, TK=T, lse=None, block_counts=n, block_size=bs, scale=D ** -0.5)
        row = idx[0, T - 1, 0].tolist()
        print(f"block_counts={n}: index tensor {tuple(idx.shape)}, row t={T - 1}: {row} "
              f"({sum(j >= 0 for j in row)} blocks selected; the spec selects {n})")


# --- native-sparse-attention-triton -------------------------------------------------------------

def xunhao_compress_bf16():
    """avgpool_compress in bf16 vs the exact mean: which arithmetic reproduces it bit for bit?"""
    from native_sparse_attention.ops.triton.weighted_pool import avgpool_compress
    T, H, D, l, d = 97, 2, 32, 32, 16
    x = torch.randn(T, H, D, device=dev, dtype=torch.bfloat16)
    cu = torch.tensor([0, T], device=dev, dtype=torch.int32)
    got = avgpool_compress(x, None, cu, l, d, None)
    got = got[0] if isinstance(got, tuple) else got
    n = (T - l) // d + 1
    win = torch.stack([x[i * d:i * d + l] for i in range(n)])  # (n, l, H, D)
    exact = win.double().mean(1)
    fp32_acc = (win.float().sum(1) / l).to(torch.bfloat16)
    # bf16 accumulation, pairwise (a tree over the l rows), rounding after every add
    acc = win.clone()
    while acc.shape[1] > 1:
        acc = (acc[:, 0::2] + acc[:, 1::2]).to(torch.bfloat16)
    bf16_tree = (acc[:, 0] / l).to(torch.bfloat16)
    print(f"output {tuple(got.shape)} dtype {got.dtype}")
    for name, ref in (("fp32 sum -> bf16", fp32_acc), ("bf16 pairwise sum", bf16_tree)):
        same = (got.float() == ref.float()).float().mean().item()
        print(f"vs {name:18s}: {100 * same:.1f}% of values bitwise equal, max|diff| = "
              f"{(got.float() - ref.float()).abs().max().item():.3g}")
    print(f"max|got - exact| = {(got.double() - exact).abs().max().item():.3g}; "
          f"max|fp32 sum -> bf16 - exact| = {(fp32_acc.double() - exact).abs().max().item():.3g}; "
          f"max|bf16 tree - exact| = {(bf16_tree.double() - exact).abs().max().item():.3g}")


def xunhao_all_empty():
    """compressed_attention on a batch whose every sequence is empty (cu_seqlens [0, 0, 0])."""
    from native_sparse_attention.ops import compressed_attention
    D = 32
    q = torch.zeros(0, 16, D, device=dev, dtype=torch.bfloat16)
    kc = torch.zeros(0, 1, D, device=dev, dtype=torch.bfloat16)
    cu = torch.tensor([0, 0, 0], device=dev, dtype=torch.int32)
    out, idx = compressed_attention(q, kc, kc, 32, 32, 32, 4, cu, cu, 0, 0, D ** -0.5, 1, 2)
    print("returned", tuple(out.shape), tuple(idx.shape))


def xunhao_block_one():
    """l = d = 1 (Tc = T compressed blocks, legal in the spec)."""
    from native_sparse_attention.ops import compressed_attention
    T, D = 40, 32
    q = torch.randn(T, 16, D, device=dev, dtype=torch.bfloat16)
    kc = torch.randn(T, 1, D, device=dev, dtype=torch.bfloat16)
    cu = torch.tensor([0, T], device=dev, dtype=torch.int32)
    out, idx = compressed_attention(q, kc, kc, 1, 1, 32, 4, cu, cu, T, T, D ** -0.5, 1, 2)
    print("returned", tuple(out.shape), tuple(idx.shape))


for title, fn in (("FLA: an empty sequence in cu_seqlens", fla_empty_sequence),
                  ("FLA: parallel_nsa_topk selects next_pow2(block_counts) blocks", fla_topk_pow2),
                  ("native-sparse-attention-triton: avgpool_compress bf16 arithmetic", xunhao_compress_bf16),
                  ("native-sparse-attention-triton: compressed_attention on an all-empty batch", xunhao_all_empty),
                  ("native-sparse-attention-triton: compressed_attention with l = d = 1", xunhao_block_one)):
    run(title, fn)
print(f"torch {torch.__version__}, device {torch.cuda.get_device_name()}")
