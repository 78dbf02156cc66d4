"""torch.library.opcheck on every kt op, with all of its checks (exemptions in conftest.py)."""
import pytest
import torch

from conftest import OPCHECK_EXEMPT
import kt_ops
from kt_ops import Gate
from moe_case import format_sizes, make_case


def _forward_args(case):
    return (case.x, case.topk_ids, case.topk_weights, list(case.experts.tensors), case.experts.intermediate_size,
            list(case.lora or []), case.scaling, case.gate_up_bias, case.down_bias, *case.gate.op_args(), case.w8a8)


# Every weight format with its default numerics, and int8 with W8A8.
NUMERICS = [(f, False) for f in kt_ops.weight_formats()] + [("int8", True)]
NUMERICS_IDS = [f + ("_w8a8" if w8a8 else "") for f, w8a8 in NUMERICS]


# SwiGLU without biases, and gpt-oss's clamped gate with biases.
GATES = {"swiglu": {}, "gpt_oss": {"gate": Gate(alpha=1.702, limit=0.75, up_offset=1.0), "biases": True}}


def test_every_op_is_covered():
    tested = {"kt::pack_experts", "kt::pack_expert_codes", "kt::unpack_experts", "kt::copy_packed_experts",
              "kt::moe_sft_forward", "kt::moe_sft_backward"}
    ops = {name for name in torch._C._dispatch_get_all_op_names() if name.startswith("kt::")}
    assert ops == tested | set(OPCHECK_EXEMPT), ops


@pytest.mark.parametrize("weight_format", kt_ops.weight_formats())
def test_opcheck_pack_experts(weight_format):
    g = torch.Generator().manual_seed(0)
    h, i = format_sizes(weight_format, 70, 45)
    w = [torch.randn(*s, generator=g).bfloat16() for s in [(3, i, h), (3, i, h), (3, h, i)]]
    torch.library.opcheck(torch.ops.kt.pack_experts.default, (*w, 0, weight_format, 0))


@pytest.mark.parametrize("weight_format", [f for f in kt_ops.weight_formats() if f != "bf16"])
def test_opcheck_pack_expert_codes(weight_format):
    from kt_ops import reference as ref

    g = torch.Generator().manual_seed(0)
    h, i = format_sizes(weight_format, 70, 45)
    w = [torch.randn(*s, generator=g) for s in [(3, i, h), (3, i, h), (3, h, i)]]
    quantize = {"int8": ref.quantize_int8, "int4": lambda t: ref.quantize_int4(t, 32), "fp8": ref.quantize_fp8}
    codes, scales = zip(*(quantize[weight_format](t) for t in w))
    codes = [c.view(torch.uint8) if c.dtype == torch.float8_e4m3fn else c for c in codes]
    group = 32 if weight_format == "int4" else 0
    torch.library.opcheck(torch.ops.kt.pack_expert_codes.default, (*codes, list(scales), weight_format, 2, group))


@pytest.mark.parametrize("weight_format", kt_ops.weight_formats())
@pytest.mark.parametrize("numa_nodes", [1, 2])
def test_opcheck_unpack_experts(numa_nodes, weight_format):
    g = torch.Generator().manual_seed(0)
    h, i = format_sizes(weight_format, 70, 96 if weight_format == "int4" else 45)  # int4: two slices of 32 and more
    w = [torch.randn(*s, generator=g).bfloat16() for s in [(3, i, h), (3, i, h), (3, h, i)]]
    experts = torch.ops.kt.pack_experts(*w, numa_nodes, weight_format, 0)
    torch.library.opcheck(torch.ops.kt.unpack_experts.default, (experts, h, i))
    torch.library.opcheck(torch.ops.kt.unpack_experts.default, (experts, h, i, [2, 0]))


@pytest.mark.parametrize("weight_format", kt_ops.weight_formats())
def test_opcheck_copy_packed_experts(weight_format):
    g = torch.Generator().manual_seed(0)
    h, i = format_sizes(weight_format, 70, 96 if weight_format == "int4" else 45)
    w = [torch.randn(*s, generator=g).bfloat16() for s in [(3, i, h), (3, i, h), (3, h, i)]]
    experts = torch.ops.kt.pack_experts(*w, 2, weight_format, 0)
    torch.library.opcheck(torch.ops.kt.copy_packed_experts.default, (experts, [torch.empty_like(t) for t in experts]))


@pytest.mark.parametrize("weight_format, w8a8", NUMERICS, ids=NUMERICS_IDS)
@pytest.mark.parametrize("gate", list(GATES))
@pytest.mark.parametrize("rank", [None, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_opcheck_moe_sft_forward(rank, dtype, gate, weight_format, w8a8):
    case = make_case(70, 45, 6, 2, 11, rank, dtype=dtype, weight_format=weight_format, w8a8=w8a8, **GATES[gate])
    torch.library.opcheck(torch.ops.kt.moe_sft_forward.default, _forward_args(case))


@pytest.mark.parametrize("weight_format, w8a8", NUMERICS, ids=NUMERICS_IDS)
@pytest.mark.parametrize("gate", list(GATES))
def test_opcheck_moe_sft_backward(gate, weight_format, w8a8):
    case = make_case(70, 45, 6, 2, 11, 8, weight_format=weight_format, w8a8=w8a8, **GATES[gate])
    with torch.no_grad():
        _, gate_up_act, lora_act = torch.ops.kt.moe_sft_forward.default(*_forward_args(case))
    detached = [a.detach() if isinstance(a, torch.Tensor) else [t.detach() for t in a] if isinstance(a, list) else a
                for a in _forward_args(case)]
    args = (case.grad_y, *detached, gate_up_act, lora_act)
    torch.library.opcheck(torch.ops.kt.moe_sft_backward.default, args)
