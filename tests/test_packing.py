"""kt.pack_experts: layout facts the kernels rely on and the memory contract."""
import pytest
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
    assert packed.gate_up.nbytes + packed.down.nbytes == bf16_bytes
    assert packed.nbytes == bf16_bytes + packed.layout.nbytes == bf16_bytes + 48


def test_the_build_has_bf16_and_packs_it_by_name():
    assert "bf16" in kt_ops.weight_formats()
    w = _weights(2, 64, 32)
    named = kt_ops.pack_experts(*w, numa_nodes=1, format="bf16")
    default = kt_ops.pack_experts(*w, numa_nodes=1)
    assert named.format == default.format == "bf16"
    assert len(named.tensors) == 3 and named.gate_up.dtype == torch.bfloat16
    assert all(torch.equal(a, b) for a, b in zip(named.tensors, default.tensors))
    assert int(named.layout[1]) == 0, "format code of bf16 in the layout"


@pytest.mark.parametrize("numa_nodes", [1, 2])
def test_int8_packing_is_the_reference_quantization(numa_nodes):
    """Codes and per-channel scales of kt_ops.reference.quantize_int8, exactly: the dequantized
    weights come back (rounded to bf16, as unpack returns them), and the scale tensors hold the
    reference's scales in the packed row order."""
    from kt_ops.reference import dequantize_int8, quantize_int8

    w = _weights(3, 96, 64, seed=3)
    w[0][1].zero_()  # expert 1's gate rows are zero: scale 1
    packed = kt_ops.pack_experts(*w, numa_nodes, format="int8")
    assert packed.format == "int8" and [t.dtype for t in packed.tensors] == [
        torch.int8, torch.int8, torch.int64, torch.float32, torch.float32]
    for got, want in zip(packed.unpack(), w):
        assert torch.equal(got, dequantize_int8(*quantize_int8(want)).bfloat16())
    gate_scale, up_scale, down_scale = (quantize_int8(t)[1] for t in w)
    assert (gate_scale[1] == 1.0).all()
    s, width = packed.numa_slices, packed.gate_up.shape[2] // 2
    fused = packed.tensors[3]  # [S, E, 2 * width]: 16 gate rows, then 16 up rows, ...
    for sl in range(s):
        for c in range(min(width, 96 - sl * width)):
            row = (c // 16) * 32 + c % 16
            assert fused[sl, :, row].equal(gate_scale[:, sl * width + c])
            assert fused[sl, :, row + 16].equal(up_scale[:, sl * width + c])
        assert packed.tensors[4][sl, :, :64].equal(down_scale)  # a down row's scale spans the slices


def test_int8_resident_bytes_are_at_most_0_53_of_bf16():
    w = _weights(8, 256, 512)
    bf16 = kt_ops.pack_experts(*w).nbytes
    int8 = kt_ops.pack_experts(*w, format="int8").nbytes
    assert int8 <= 0.53 * bf16, int8 / bf16


def test_odd_sizes_pad_to_32():
    packed = kt_ops.pack_experts(*_weights(3, 45, 70), numa_nodes=1)
    assert packed.gate_up.shape == (1, 3, 2 * 64, 96)
    assert packed.down.shape == (1, 3, 96, 64)
    assert packed.intermediate_size == 45 and packed.num_experts == 3 and packed.numa_slices == 1
    assert packed.hidden_size == 70


@pytest.mark.parametrize("intermediate,nodes,slices,width", [
    (128, 2, 2, 64),   # even split, no padding
    (45, 2, 2, 32),    # 32 + 13 columns
    (100, 3, 2, 64),   # a third slice would hold padding only
    (20, 4, 1, 32),    # too narrow to split
])
def test_numa_slices_split_the_intermediate_dimension(intermediate, nodes, slices, width):
    packed = kt_ops.pack_experts(*_weights(3, intermediate, 70), numa_nodes=nodes)
    assert packed.numa_slices == slices
    assert packed.gate_up.shape == (slices, 3, 2 * width, 96)
    assert packed.down.shape == (slices, 3, 96, width)


def test_numa_slices_cost_no_memory_for_model_sizes():
    w = _weights(4, 128, 64)
    packed = kt_ops.pack_experts(*w, numa_nodes=2)
    assert packed.gate_up.nbytes + packed.down.nbytes == sum(t.nbytes for t in w)


@pytest.mark.parametrize("numa_nodes", [1, 2])
def test_packing_is_a_permutation_of_the_weights(numa_nodes):
    """Every weight appears once; the rest is zero padding."""
    w_gate, w_up, w_down = _weights(2, 40, 36)
    packed = kt_ops.pack_experts(w_gate, w_up, w_down, numa_nodes)
    got = torch.cat([packed.gate_up.flatten(), packed.down.flatten()]).float()
    want = torch.cat([w_gate.flatten(), w_up.flatten(), w_down.flatten()]).float()
    assert (got != 0).sum() == (want != 0).sum()
    assert torch.equal(got[got != 0].sort().values, want[want != 0].sort().values)


@pytest.mark.parametrize("numa_nodes", [0, 2])
def test_meta_shapes_match_cpu(numa_nodes):
    w = _weights(3, 45, 70)
    cpu = torch.ops.kt.pack_experts(*w, numa_nodes)
    meta = torch.ops.kt.pack_experts(*[t.to("meta") for t in w], numa_nodes)
    for a, b in zip(cpu, meta):
        assert a.shape == b.shape and a.dtype == b.dtype and b.device.type == "meta"


@pytest.mark.parametrize("numa_nodes", [1, 2])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_packing_is_the_reference_quantization(numa_nodes, group_size):
    """Codes and group scales of kt_ops.reference.quantize_int4, exactly: the dequantized weights
    come back, and the scale tensors hold the reference's scales, one per row of each packed
    block (a group of 64 or 128 is 2 or 4 blocks), in the packed order; the codes sit two per
    byte."""
    from kt_ops.reference import dequantize_int4, quantize_int4

    w = _weights(3, 128, 256, seed=4)  # [E, I, H] = [3, 128, 256]
    w[0][1, :, :group_size].zero_()  # a group of zeros: scale 1
    packed = kt_ops.pack_experts(*w, numa_nodes, format="int4", group_size=group_size)
    assert packed.format == "int4" and [t.dtype for t in packed.tensors] == [
        torch.uint8, torch.uint8, torch.int64, torch.bfloat16, torch.bfloat16]
    for got, want in zip(packed.unpack(), w):
        assert torch.equal(got, dequantize_int4(*quantize_int4(want, group_size), group_size).bfloat16())
    gate_scale, up_scale, down_scale = (quantize_int4(t, group_size)[1] for t in w)
    assert (gate_scale[1, :, 0] == 1.0).all()
    s, width = packed.numa_slices, packed.gate_up.shape[2] // 2
    gu_blocks, d_blocks = 256 // 32, width // 32
    # [S, E, panels, blocks, 16]: panel p holds 16 fused rows (gate, then up, alternating).
    fused = packed.tensors[3].unflatten(-1, (2 * width // 16, gu_blocks, 16))
    for sl in range(s):
        for c in range(min(width, 128 - sl * width)):
            panel = (c // 16) * 2
            for b in range(gu_blocks):
                assert fused[sl, :, panel, b, c % 16].equal(gate_scale[:, sl * width + c, b * 32 // group_size])
                assert fused[sl, :, panel + 1, b, c % 16].equal(up_scale[:, sl * width + c, b * 32 // group_size])
        down = packed.tensors[4][sl].unflatten(-1, (256 // 16, d_blocks, 16))  # [E, panels of h, blocks, 16]
        for b in range(d_blocks):
            col = sl * width + b * 32
            want = down_scale[:, :, col // group_size] if col < 128 else torch.zeros(3, 256, dtype=torch.bfloat16)
            assert down[:, :, b, :].flatten(1).equal(want)


def test_int4_resident_bytes_are_at_most_0_30_of_bf16():
    w = _weights(8, 256, 512)
    bf16 = kt_ops.pack_experts(*w).nbytes
    for group_size in (32, 64, 128):
        int4 = kt_ops.pack_experts(*w, format="int4", group_size=group_size).nbytes
        assert int4 <= 0.30 * bf16, (group_size, int4 / bf16)


def test_an_in_place_write_repacks_int4_in_the_group_it_was_packed_with():
    """PEFT's merge and load_state_dict write the experts' stand-ins in place; the repack keeps
    the format and the group size (64 here, not int4's default of 32)."""
    from kt_ops.packed_weights import ExpertsLayout, PackedExpertWeight

    w = _weights(2, 64, 128, seed=5)
    packed = kt_ops.pack_experts(*w, 1, format="int4", group_size=64)
    assert packed.group_size == 64
    down = PackedExpertWeight(packed, "down", ExpertsLayout(), torch.bfloat16)
    new_down = _weights(2, 64, 128, seed=6)[2]
    with torch.no_grad():
        down.copy_(new_down)
    want = kt_ops.pack_experts(w[0], w[1], new_down, 1, format="int4", group_size=64)
    assert all(torch.equal(a, b) for a, b in zip(packed.tensors, want.tensors))


@pytest.mark.parametrize("numa_nodes", [1, 2, 3])
def test_fp8_packing_is_the_reference_quantization(numa_nodes):
    """Codes and block scales of kt_ops.reference.quantize_fp8, exactly: the dequantized weights
    come back (also for blocks split between slices: I = 320 in 3 slices of 128 straddles the
    128-blocks), a block of zeros has scale 1, and each packed 16 x 32 block carries the scale
    of the 128 x 128 block it lies in, in the packed order; the codes are the reference's
    e4m3 bytes."""
    from kt_ops.reference import dequantize_fp8, quantize_fp8

    w = list(_weights(3, 320, 200, seed=7))  # [E, I, H] = [3, 320, 200]: partial edge blocks both ways
    w[1] = (w[1].float() * 1e-3).bfloat16()  # small weights: codes of every binade, subnormals too
    w[0][1, :128, :128].zero_()
    packed = kt_ops.pack_experts(*w, numa_nodes, format="fp8")
    assert packed.format == "fp8" and [t.dtype for t in packed.tensors] == [
        torch.uint8, torch.uint8, torch.int64, torch.float32, torch.float32]
    for got, want in zip(packed.unpack(), w):
        assert torch.equal(got, dequantize_fp8(*quantize_fp8(want)).bfloat16())
    (gate_q, gate_scale), (up_q, up_scale), (down_q, down_scale) = (quantize_fp8(t) for t in w)
    assert gate_scale[1, 0, 0] == 1.0
    s, width, hp = packed.numa_slices, packed.gate_up.shape[2] // 2, packed.gate_up.shape[3]
    fused = packed.tensors[3].unflatten(-1, (2 * width // 16, hp // 32))  # [S, E, panels, blocks]
    for sl in range(s):
        for c in range(0, min(width, 320 - sl * width), 16):
            for b in range(hp // 32):
                want = (gate_scale[:, (sl * width + c) // 128, b // 4], up_scale[:, (sl * width + c) // 128, b // 4])
                if b * 32 >= 200:
                    want = (torch.zeros(3), torch.zeros(3))
                assert fused[sl, :, (c // 16) * 2, b].equal(want[0]) and fused[sl, :, (c // 16) * 2 + 1, b].equal(want[1])
        down = packed.tensors[4][sl].unflatten(-1, (hp // 16, width // 32))  # [E, panels of h, blocks]
        for b in range(width // 32):
            col = sl * width + b * 32
            for h in range(0, 200, 16):
                want = down_scale[:, h // 128, col // 128] if col < 320 else torch.zeros(3)
                assert down[:, h // 16, b].equal(want)
    # The bytes are the reference's e4m3 codes: the code multiset of gate and up equals theirs.
    got_codes = packed.gate_up[packed.gate_up != 0].sort().values
    want_codes = torch.cat([gate_q.view(torch.uint8).flatten(), up_q.view(torch.uint8).flatten()])
    assert torch.equal(got_codes, want_codes[want_codes != 0].sort().values)


def test_fp8_resident_bytes_are_at_most_0_53_of_bf16():
    w = _weights(8, 256, 512)
    bf16 = kt_ops.pack_experts(*w).nbytes
    fp8 = kt_ops.pack_experts(*w, format="fp8").nbytes
    assert fp8 <= 0.53 * bf16, fp8 / bf16


def test_fp8_quantization_saturates_instead_of_making_nan():
    """A quotient a rounding above 448 must become the code for 448, never the NaN code."""
    w = torch.full((1, 32, 32), 0.3).bfloat16()
    w[0, 0, 0] = 1.0234375  # the block's maximum m: in fp32, m / (m / 448) is 448.00003
    assert (w[0, 0, 0].float() / (w[0, 0, 0].float() / 448)) > 448
    packed = kt_ops.pack_experts(w, w, w.transpose(1, 2).contiguous(), 1, format="fp8")
    assert not ((packed.gate_up & 0x7F) == 0x7F).any()
    assert packed.unpack()[0][0, 0, 0] == w[0, 0, 0]


def _quantized(weights, fmt, group_size):
    """Codes and scales of each matrix as kt_ops.reference.quantize_<fmt> returns them."""
    from kt_ops import reference as ref

    quantize = {"int8": ref.quantize_int8, "int4": lambda w: ref.quantize_int4(w, group_size),
                "fp8": ref.quantize_fp8}[fmt]
    return zip(*(quantize(w) for w in weights))


@pytest.mark.parametrize("numa_nodes", [1, 2, 3])
@pytest.mark.parametrize("fmt, group_size", [("int8", 0), ("int4", 32), ("int4", 128), ("fp8", 0)])
def test_packing_codes_equals_packing_the_weights_they_quantize_to(fmt, group_size, numa_nodes):
    """pack_expert_codes of the reference's codes and scales is pack_experts of the weights,
    tensor for tensor (I = 384 in 3 slices of 128, in 2 of 192: slices that split 128-blocks
    and int4 groups of 128)."""
    w = _weights(3, 384, 256, seed=8)
    codes, scales = _quantized(w, fmt, group_size)
    got = kt_ops.pack_expert_codes(*codes, list(scales), numa_nodes, format=fmt)
    want = kt_ops.pack_experts(*w, numa_nodes, format=fmt, group_size=group_size)
    assert got.format == fmt and got.group_size == group_size
    assert all(torch.equal(a, b) for a, b in zip(got.tensors, want.tensors))


def test_int4_codes_may_use_minus_8():
    """Checkpoints use the code -8, which kt_ops' own quantization never makes: it is packed as
    it is and reads as -8 steps."""
    from kt_ops.reference import dequantize_int4, quantize_int4

    w = _weights(2, 64, 96, seed=9)
    (q_g, s_g), (q_u, s_u), (q_d, s_d) = (quantize_int4(t, 32) for t in w)
    q_g[0, 0, :5] = -8
    packed = kt_ops.pack_expert_codes(q_g, q_u, q_d, [s_g, s_u, s_d], 1, format="int4")
    got = packed.unpack()[0]
    assert torch.equal(got, dequantize_int4(q_g, s_g, 32).bfloat16())
    assert (got[0, 0, :5] == -8 * s_g[0, 0, 0]).all()


@pytest.mark.parametrize("fmt", ["int8", "int4", "fp8"])
def test_packing_codes_on_meta_has_the_shapes_of_cpu(fmt):
    codes, scales = _quantized(_weights(2, 96, 64, seed=10), fmt, 32)
    codes = [c.view(torch.uint8) if c.dtype == torch.float8_e4m3fn else c for c in codes]
    cpu = torch.ops.kt.pack_expert_codes(*codes, list(scales), fmt, 2, 32 if fmt == "int4" else 0)
    meta = torch.ops.kt.pack_expert_codes(*[t.to("meta") for t in codes], [t.to("meta") for t in scales], fmt, 2,
                                          32 if fmt == "int4" else 0)
    for a, b in zip(cpu, meta):
        assert a.shape == b.shape and a.dtype == b.dtype and b.device.type == "meta"


@pytest.mark.parametrize("fmt", kt_ops.weight_formats())
@pytest.mark.parametrize("numa_nodes", [1, 2])
def test_copy_packed_experts_copies_every_tensor(fmt, numa_nodes):
    """What kt_ops.distributed writes into shared memory: the same packed experts."""
    packed = kt_ops.pack_experts(*_weights(3, 64, 96, seed=4), numa_nodes=numa_nodes, format=fmt)
    out = [torch.full_like(t, 7) for t in packed.tensors]
    torch.ops.kt.copy_packed_experts(list(packed.tensors), out)
    assert all(torch.equal(a, b) for a, b in zip(out, packed.tensors))


@pytest.mark.parametrize("edit, message", [
    (lambda out: out[:2], "out must hold as many tensors as experts (3), got 2"),
    (lambda out: [out[0][:, :1].contiguous(), *out[1:]], "out[0] must be a contiguous tensor of the dtype and shape"),
    (lambda out: [out[0].float(), *out[1:]], "out[0] must be a contiguous tensor of the dtype and shape"),
    (lambda out: [out[0], out[1].transpose(2, 3), out[2]], "out[1] must be a contiguous tensor"),
])
@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_copy_packed_experts_refuses_other_outputs_and_writes_nothing(edit, message, device):
    import re

    packed = kt_ops.pack_experts(*_weights(2, 64, 64), numa_nodes=1)
    out = [torch.zeros_like(t) for t in packed.tensors]
    bad = [t.to(device) for t in edit(out)]
    with pytest.raises(RuntimeError, match=re.escape("kt.copy_packed_experts: " + message)):
        torch.ops.kt.copy_packed_experts([t.to(device) for t in packed.tensors], bad)
    assert all(not t.any() for t in out)
