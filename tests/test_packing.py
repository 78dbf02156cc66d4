"""kt.pack_experts: layout facts the kernels rely on and the memory contract."""
import torch

import kt_ops


def _weights(e, i, h, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g).bfloat16() for s in [(e, i, h), (e, i, h), (e, h, i)]]


def test_packed_bytes_equal_bf16_bytes_for_model_sizes():
    """Resident packed weights <= 1.1x the bf16 bytes; multiples of 32 (all real models) pad nothing."""
    w = _weights(4, 96, 128)
    packed = kt_ops.pack_experts(*w)
    bf16_bytes = sum(t.nbytes for t in w)
    assert packed.nbytes <= 1.1 * bf16_bytes
    assert packed.nbytes == bf16_bytes


def test_odd_sizes_pad_to_32():
    packed = kt_ops.pack_experts(*_weights(3, 45, 70))
    assert packed.gate_up.shape == (3, 2 * 64, 96)
    assert packed.down.shape == (3, 96, 64)
    assert packed.intermediate_size == 45 and packed.num_experts == 3


def test_packing_is_a_permutation_of_the_weights():
    """Every weight appears once; the rest is zero padding."""
    w_gate, w_up, w_down = _weights(2, 40, 36)
    packed = kt_ops.pack_experts(w_gate, w_up, w_down)
    got = torch.cat([packed.gate_up.flatten(), packed.down.flatten()]).float()
    want = torch.cat([w_gate.flatten(), w_up.flatten(), w_down.flatten()]).float()
    assert (got != 0).sum() == (want != 0).sum()
    assert torch.equal(got[got != 0].sort().values, want[want != 0].sort().values)


def test_meta_shapes_match_cpu():
    w = _weights(3, 45, 70)
    cpu = torch.ops.kt.pack_experts(*w)
    meta = torch.ops.kt.pack_experts(*[t.to("meta") for t in w])
    for a, b in zip(cpu, meta):
        assert a.shape == b.shape and a.dtype == b.dtype and b.device.type == "meta"
