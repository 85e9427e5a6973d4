"""Minimal CPU repros: native-sparse-attention-triton torch references vs conformance.brute.

Run from the repository root: PYTHONPATH=.:/path/to/native-sparse-attention-triton python artifacts/2026-12-03/peer_findings/nsa_triton_repros.py
"""
import torch
from conformance import brute
from nsa_ref import NSAConfig
from native_sparse_attention.ops.torch.compressed_attention import compressed_attention_torch
from native_sparse_attention.ops.torch.topk_sparse_attention import topk_sparse_attention_torch
from native_sparse_attention.ops.torch.compress_key_value import avgpool_compress_torch
torch.manual_seed(0)

print("R2: zero-score current block loses to future blocks (n_local=0)")
cfg = NSAConfig(block_len=4, block_stride=4, sel_block=4, n_sel=2, n_init=1, n_local=0, window=4)
for T in range(5, 20):
    q = torch.randn(T, 1, 8, dtype=torch.float64); k = torch.randn(T, 1, 8, dtype=torch.float64)
    kc, _ = brute.compress(k, cfg); cu = torch.tensor([0, T], dtype=torch.int32)
    cuc = torch.tensor([0, kc.shape[0]], dtype=torch.int32)
    _, idx = compressed_attention_torch(q, kc, kc, 4, 4, 4, 2, cu, cuc, T, kc.shape[0], None, 1, 0)
    ref = brute.select_blocks(q, kc, cfg)
    got = idx.permute(1, 0, 2)
    bad = [t for t in range(T) if got[t, 0].tolist() != ref[t, 0, :got.shape[-1]].tolist()]
    if bad:
        t = bad[0]
        print(f"  T={T} t={t}: library {got[t,0].tolist()} brute {ref[t,0].tolist()} scores {brute.selection_scores(q,kc,cfg)[0][t,0].tolist()}")
        break

print("R3: topk_sparse_attention_torch treats -1 padding as block 0")
T, bs = 65, 64
q = torch.randn(T, 1, 8, dtype=torch.float64); k = torch.randn(T, 1, 8, dtype=torch.float64); v = torch.randn(T, 1, 8, dtype=torch.float64)
idx = torch.full((1, T, 2), -1, dtype=torch.int32); idx[0, 64, 0] = 1   # t=64 selects block 1 only
out = topk_sparse_attention_torch(q, k, v, idx, bs, torch.tensor([0, T], dtype=torch.int32))
c = NSAConfig(block_len=64, block_stride=64, sel_block=64, n_sel=2, n_init=0, n_local=1, window=4)
ref = brute.sel_attention(q, k, v, idx.permute(1, 0, 2), c)
print(f"  t=64 (block_idx [1, -1]): |lib - brute| = {(out[64]-ref[64]).abs().max().item():.3f}; "
      f"lib equals attention over keys 0..64: {torch.allclose(out[64], torch.softmax(q[64,0]@k[:65,0].T/8**.5, -1)@v[:65,0])}")
print(f"  t=0 (block_idx [-1, -1], nothing selected): lib |out| = {out[0].abs().max().item():.3f} (brute: exactly 0)")

print("R4: avgpool_compress_torch crashes when every sequence is shorter than kernel_size")
from conformance.adapters.nsa_triton import _CudaFactoriesOnInputDevice  # its hard-coded device="cuda" -> cpu
try:
    x = torch.randn(31, 1, 8).bfloat16()
    with _CudaFactoriesOnInputDevice(torch.device("cpu")):
        avgpool_compress_torch(x, None, torch.tensor([0, 31], dtype=torch.int32), 32, 16)
except Exception as e:
    print("  T=31, kernel 32:", type(e).__name__, str(e).splitlines()[0])

print("R5: compressed_attention_torch scores the partial last selection block as 0")
cfg = NSAConfig(block_len=32, block_stride=16, sel_block=64, n_sel=1, n_init=0, n_local=0, window=4)
T = 96 + 15
k = torch.randn(T, 1, 8, dtype=torch.float64)
kc, _ = brute.compress(k, cfg)
q = torch.randn(T, 1, 8, dtype=torch.float64) * 0.1
q[T - 1, 0] = 40 * kc[4, 0] / kc[4, 0].norm()   # last query points at cmp block 4 = tokens 64..95 (selection block 1)
cu = torch.tensor([0, T], dtype=torch.int32); cuc = torch.tensor([0, kc.shape[0]], dtype=torch.int32)
_, idx = compressed_attention_torch(q, kc, kc, 32, 16, 64, 1, cu, cuc, T, kc.shape[0], None, 0, 0)
ref = brute.select_blocks(q, kc, cfg)
sc = brute.selection_scores(q, kc, cfg)[0][T - 1, 0]
print(f"  T={T} t={T-1}: library {idx[0, T-1].tolist()} brute {ref[T-1, 0].tolist()} (spec scores {[round(x, 3) for x in sc.tolist()]})")

print("R6: nothing visible yet (t < l-1, n_init=n_local=0): future zero-score blocks win the top-k -> row of -1")
cfg = NSAConfig(block_len=2, block_stride=2, sel_block=2, n_sel=1, n_init=0, n_local=0, window=1)
for T in range(1, 12):
    q = torch.randn(T, 1, 4, dtype=torch.float64); k = torch.randn(T, 1, 4, dtype=torch.float64)
    kc, _ = brute.compress(k, cfg)
    cu = torch.tensor([0, T], dtype=torch.int32); cuc = torch.tensor([0, kc.shape[0]], dtype=torch.int32)
    _, idx = compressed_attention_torch(q, kc, kc, 2, 2, 2, 1, cu, cuc, T, kc.shape[0], None, 0, 0)
    ref = brute.select_blocks(q, kc, cfg)
    if idx[0, 0].tolist() != ref[0, 0].tolist():
        print(f"  T={T} t=0: library {idx[0, 0].tolist()} brute {ref[0, 0].tolist()} (all scores 0; spec: lowest index)")
        break

print("R7: topk_sparse_attention_torch: a row whose selected blocks all start after t -> NaN (spec: 0)")
T = 65
q = torch.randn(T, 1, 8, dtype=torch.float64); k = torch.randn(T, 1, 8, dtype=torch.float64); v = torch.randn(T, 1, 8, dtype=torch.float64)
idx = torch.zeros((1, T, 1), dtype=torch.int32); idx[0, 0, 0] = 1   # t=0 selects only block 1 (tokens 64..)
out = topk_sparse_attention_torch(q, k, v, idx, 64, torch.tensor([0, T], dtype=torch.int32))
print(f"  t=0 block_idx [1]: library out[0] = {out[0, 0, :3].tolist()} (brute: 0)")
