"""One packing per call: nsa_attention reads cu_seqlens to the host at most once, and not at all
when the caller hands in host metadata (cu_seqlens_cpu), as FA-2 and FLA let callers do.

A read is any of .tolist() / .item() / .cpu() / int() / bool() / ... on a tensor sharing
cu_seqlens's storage (each one is a device sync on CUDA), counted by a TorchFunctionMode.
"""
import pytest
import torch
from torch.overrides import TorchFunctionMode

from nsa_ref import NSAConfig, nsa_attention
from nsa_ref.packing import Packing, cu_seqlens_from_lengths

CFG = NSAConfig(block_len=8, block_stride=4, sel_block=8, n_sel=3, n_init=1, n_local=1, window=6)
LENGTHS = [20, 0, 13, 9]
READS = {"tolist", "item", "cpu", "numpy", "__int__", "__index__", "__bool__", "__float__", "__iter__", "__len__"}


class HostReads(TorchFunctionMode):
    """Counts host reads of one tensor's storage (and of its views) while active."""

    def __init__(self, tensor: torch.Tensor) -> None:
        super().__init__()
        self.ptr = tensor.untyped_storage().data_ptr()
        self.where: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in READS and args and isinstance(args[0], torch.Tensor) \
                and args[0].untyped_storage().data_ptr() == self.ptr:
            import traceback

            frame = traceback.extract_stack(limit=3)[0]
            self.where.append(f"{name} at {frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}")
        return func(*args, **(kwargs or {}))


def _inputs(grad=False):
    T = sum(LENGTHS)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(T, h, 8, generator=g, requires_grad=grad) for h in (4, 2, 2))
    return q, k, v, torch.rand(T, 4, 3, generator=g)


@pytest.mark.parametrize("backend", ["auto", "sdpa", "reference"])
@pytest.mark.parametrize("grad", [False, True], ids=["fwd", "fwd+bwd"])
def test_one_host_read_of_cu_seqlens_per_call(backend, grad):
    cu = cu_seqlens_from_lengths(LENGTHS)
    q, k, v, gates = _inputs(grad)
    with HostReads(cu) as reads:
        out = nsa_attention(q, k, v, gates, CFG, cu, backend=backend)
        if grad:
            out.square().sum().backward()
    assert len(reads.where) <= 1, f"{len(reads.where)} host reads of cu_seqlens: {reads.where}"


@pytest.mark.parametrize("backend", ["auto", "sdpa", "reference"])
def test_no_host_read_with_host_metadata(backend):
    cu = cu_seqlens_from_lengths(LENGTHS)
    q, k, v, gates = _inputs(grad=True)
    want = nsa_attention(q, k, v, gates, CFG, cu, backend=backend)
    host = cu.tolist()
    with HostReads(cu) as reads:
        out = nsa_attention(q, k, v, gates, CFG, cu, backend=backend, cu_seqlens_cpu=host, max_seqlen=max(LENGTHS))
        out.square().sum().backward()
    assert reads.where == [], f"host reads of cu_seqlens despite cu_seqlens_cpu: {reads.where}"
    assert torch.equal(out, want)


def test_host_metadata_is_validated_on_the_host_copy():
    cu = cu_seqlens_from_lengths(LENGTHS)
    q, k, v, gates = _inputs()
    with pytest.raises(ValueError, match="must be non-decreasing"):
        nsa_attention(q, k, v, gates, CFG, cu, cu_seqlens_cpu=[0, 20, 10, 33, 42])
    with pytest.raises(ValueError, match="cu_seqlens_cpu has 3 entries"):
        nsa_attention(q, k, v, gates, CFG, cu, cu_seqlens_cpu=[0, 20, 42])


def test_packing_reads_once_and_derives_the_rest():
    cu = cu_seqlens_from_lengths(LENGTHS)
    with HostReads(cu) as reads:
        p = Packing.of(cu, sum(LENGTHS))
        assert p.lengths == LENGTHS and p.max_seqlen == 20 and p.num_seqs == 4
        assert p.cmp_lengths(CFG) == [CFG.num_cmp_blocks(n) for n in LENGTHS]
        assert p.cmp_packing(CFG).offsets == (0, 4, 4, 6, 7)
        p.token_positions()
    assert len(reads.where) == 1, reads.where


def test_validate_shapes_skips_the_value_checks():
    q, k, v, gates = _inputs()
    bad = gates + 1.0
    with pytest.raises(ValueError, match=r"gates must lie in \[0, 1\]"):
        nsa_attention(q, k, v, bad, CFG)
    nsa_attention(q, k, v, bad, CFG, validate="shapes")  # the caller's responsibility now
    with pytest.raises(ValueError, match="validate must be one of"):
        nsa_attention(q, k, v, gates, CFG, validate="some")


@pytest.mark.parametrize("lengths", [[0, 5, 40, 0, 97], [31], [1025, 7], []])
def test_compressed_offsets_built_by_kernels_equal_the_host_ones(lengths):
    """On a GPU cu_seqlens_cmp is computed by kernels from the device offsets (a host -> GPU copy
    would sync); the formula must give the host offsets exactly (run here on the CPU)."""
    from nsa_ref import NSAConfig
    from nsa_ref.packing import Packing, cu_seqlens_from_lengths

    for cfg in (NSAConfig(), NSAConfig(block_len=8, block_stride=4, sel_block=16, n_sel=3, n_init=1, n_local=1,
                                       window=16)):
        packed = Packing(cu_seqlens_from_lengths(lengths), sum(lengths))
        assert packed._cmp_cu_on_device(cfg, torch.device("cpu")).tolist() == packed.cmp_offsets(cfg)
        if lengths:
            one = Packing(None, sum(lengths))
            assert one._cmp_cu_on_device(cfg, torch.device("cpu")).tolist() == one.cmp_offsets(cfg)
