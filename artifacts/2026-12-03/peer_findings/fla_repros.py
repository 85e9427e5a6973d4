"""Minimal repros of FLA NSA (fla-core 0.6.0) differences from nsa_spec.md, on the CPU.

python artifacts/2026-12-03/peer_findings/fla_repros.py   (from the repository root, fla-core installed)
"""
import sys, warnings
warnings.simplefilter("ignore")
sys.path.insert(0, ".")
import torch
from fla.ops.nsa.naive import naive_nsa_selection, naive_nsa_topk
from conformance import brute
from conformance.adapters import fla as A
from nsa_ref import NSAConfig

print("== 1. window branch ignores an explicit scale (NSA-WIN) ==")
cfg = NSAConfig(block_len=16, block_stride=16, sel_block=16, n_sel=4, n_init=1, n_local=2, window=20, scale=0.2)
g = torch.Generator().manual_seed(0)
T, D = 2, 16
q = torch.randn(T, 16, D, generator=g, dtype=torch.float64)
k = torch.randn(T, 1, D, generator=g, dtype=torch.float64)
v = torch.randn(T, 1, D, generator=g, dtype=torch.float64)
gates = torch.zeros(T, 16, 3, dtype=torch.float64); gates[..., 2] = 1  # window branch only
out = A.nsa_attention(q, k, v, gates, cfg)
want = brute.win_attention(q, k, v, cfg)
want_default = brute.win_attention(q, k, v, cfg.model_copy(update={"scale": None}))
print("t=1 head 0 dims 0..2: fla", [round(x, 6) for x in out[1, 0, :3].tolist()],
      "| spec (scale 0.2)", [round(x, 6) for x in want[1, 0, :3].tolist()],
      "| with 1/sqrt(D)", [round(x, 6) for x in want_default[1, 0, :3].tolist()])

print("== 2. selected attention: a row with no visible token is NaN, spec says 0 (NSA-SEL / NSA-FINITE) ==")
q1, k1, v1 = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
idx = torch.full((1, 1, 1, 1), -1, dtype=torch.long)  # t=0 selects no block (or only future blocks)
print("naive_nsa_selection, T=1, block_indices=[-1]:", naive_nsa_selection(q1, k1, v1, idx, block_size=16)[0, 0, 0, :3].tolist())
idx_future = torch.ones((1, 1, 1, 1), dtype=torch.long)
print("naive_nsa_selection, T=1, block_indices=[1] (future):", naive_nsa_selection(q1, k1, v1, idx_future, block_size=16)[0, 0, 0, :3].tolist())

print("== 3. exact score ties: FLA picks the higher index, spec says lower (NSA-SELECT ties) ==")
Dk, bs = 8, 4
u = torch.linspace(-1, 1, Dk, dtype=torch.float64)
T = 17  # t=16: current block c=4; forced 0, 3, 4; one free pick among blocks 1 and 2
qt = u.expand(1, T, 16, Dk).clone()
kc = torch.stack([0.3 * u.flip(0), u, u, -u, -u]).view(1, 5, 1, Dk)  # blocks 1 and 2 identical -> equal scores
got = naive_nsa_topk(qt, kc, block_counts=4, block_size=bs, scale=Dk ** -0.5)[0, 16, 0]
cfg4 = NSAConfig(block_len=bs, block_stride=bs, sel_block=bs, n_sel=4, n_init=1, n_local=2, window=4)
print("t=16: naive_nsa_topk", got.tolist(), "-> sorted", sorted(got.tolist()), "| brute",
      brute.select_blocks(qt[0], kc[0, :4], cfg4)[16, 0].tolist())

print("== 4. naive_nsa_selection crashes on an empty sequence in cu_seqlens (NSA-VARLEN) ==")
qv, kv = torch.randn(1, 3, 16, 8), torch.randn(1, 3, 1, 8)
try:
    naive_nsa_selection(qv, kv, kv, torch.zeros(1, 3, 1, 1, dtype=torch.long), block_size=4,
                        cu_seqlens=torch.tensor([0, 3, 3]))
    print("no error")
except Exception as exc:
    print(type(exc).__name__, exc)
