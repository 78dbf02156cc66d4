"""Every argument check: the op and argument are named, with what was expected and what came."""
import re

import pytest
import torch

import kt_ops
from moe_case import make_case

H, I, E, K, T, R = 70, 45, 6, 2, 7, 8


@pytest.fixture
def case():
    return make_case(H, I, E, K, T, R, numa_nodes=1)  # one slice: the messages below name shapes


def call(case, **override):
    """torch.ops.kt.moe_sft_forward with the case's arguments, some replaced."""
    args = dict(x=case.x, topk_ids=case.topk_ids, topk_weights=case.topk_weights,
                gate_up=case.experts.gate_up, down=case.experts.down, layout=case.experts.layout,
                intermediate_size=I, lora=list(case.lora), lora_scaling=case.scaling, gate_up_bias=None,
                down_bias=None, activation="silu", activation_alpha=1.0, activation_limit=None, up_offset=0.0)
    args.update(override)
    return torch.ops.kt.moe_sft_forward(
        args["x"], args["topk_ids"], args["topk_weights"], [args["gate_up"], args["down"], args["layout"]],
        args["intermediate_size"], list(args["lora"]), args["lora_scaling"], args["gate_up_bias"], args["down_bias"],
        args["activation"], args["activation_alpha"], args["activation_limit"], args["up_offset"])


SWIGLU_ARGS = [None, None, "silu", 1.0, None, 0.0, False]  # the ops' gate arguments (SwiGLU, no biases), w8a8


def with_field(layout, index, value):
    out = layout.clone()
    out[index] = value
    return out


def lora_with(case, index, tensor):
    lora = list(case.lora)
    lora[index] = tensor
    return lora


OP = "kt.moe_sft_forward: "
BAD = {
    "x_dtype": (lambda c: dict(x=c.x.double()),
                "x must be bfloat16 or float32 of shape [T, H], got float64 [7, 70]"),
    "x_rank": (lambda c: dict(x=c.x.unsqueeze(0)),
               "x must be bfloat16 or float32 of shape [T, H], got bfloat16 [1, 7, 70]"),
    "ids_dtype": (lambda c: dict(topk_ids=c.topk_ids.float()),
                  "topk_ids must be int32 or int64 of shape [T, K], got float32 [7, 2]"),
    "ids_rows": (lambda c: dict(topk_ids=c.topk_ids[:3]),
                 "topk_ids must have one row per token of x (T = 7), got int64 [3, 2]"),
    "weights_shape": (lambda c: dict(topk_weights=c.topk_weights[:, :1]),
                      "topk_weights must be float32 or bfloat16 of the shape of topk_ids int64 [7, 2], got float32 [7, 1]"),
    "weights_dtype": (lambda c: dict(topk_weights=c.topk_ids),
                      "topk_weights must be float32 or bfloat16 of the shape of topk_ids int64 [7, 2], got int64 [7, 2]"),
    "hidden_mismatch": (lambda c: dict(x=torch.randn(T, 100).bfloat16(), lora=[None] * 6),
                        "gate_up must be packed for H = 100 and I = 45 (shape [1, E, 128, 128]), got bfloat16 [1, 6, 128, 96]"),
    "intermediate_mismatch": (lambda c: dict(intermediate_size=100),
                              "gate_up must be packed for H = 70 and I = 100 (shape [1, E, 256, 96]), got bfloat16 [1, 6, 128, 96]"),
    "intermediate_nonpositive": (lambda c: dict(intermediate_size=0), "intermediate_size must be positive, got 0"),
    "gate_up_dtype": (lambda c: dict(gate_up=c.experts.gate_up.float()),
                      "gate_up must be the bfloat16 [S, E, 2*Is, Hp] tensor made by kt.pack_experts, got float32 [1, 6, 128, 96]"),
    "gate_up_no_slices": (lambda c: dict(gate_up=c.experts.gate_up[:0]),
                          "gate_up must be the bfloat16 [S, E, 2*Is, Hp] tensor made by kt.pack_experts, got bfloat16 [0, 6, 128, 96]"),
    "down_experts": (lambda c: dict(down=c.experts.down[:, :4]),
                     "down must be the bfloat16 tensor made by kt.pack_experts with gate_up for E = 6, H = 70, I = 45 (shape [1, 6, 96, 64]), got bfloat16 [1, 4, 96, 64]"),
    "down_slices": (lambda c: dict(down=c.experts.down.expand(2, -1, -1, -1)),
                    "down must be the bfloat16 tensor made by kt.pack_experts with gate_up for E = 6, H = 70, I = 45 (shape [1, 6, 96, 64]), got bfloat16 [2, 6, 96, 64]"),
    "lora_a_without_b": (lambda c: dict(lora=lora_with(c, 1, None)),
                         "lora_gate_a and lora_gate_b must be given together, got only lora_gate_a"),
    "lora_a_experts": (lambda c: dict(lora=lora_with(c, 2, c.lora[2][:3])),
                       "lora_up_a must be float32 or bfloat16 of shape [E, r, in] = [6, r, 70], got float32 [3, 8, 70]"),
    "lora_a_dtype": (lambda c: dict(lora=lora_with(c, 4, c.lora[4].long())),
                     "lora_down_a must be float32 or bfloat16 of shape [E, r, in] = [6, r, 45], got int64 [6, 8, 45]"),
    "lora_b_rank": (lambda c: dict(lora=lora_with(c, 5, c.lora[5][..., :4])),
                    "lora_down_b must be float32 or bfloat16 of shape [E, out, r] = [6, 70, 8], got float32 [6, 70, 4]"),
    "lora_b_out": (lambda c: dict(lora=lora_with(c, 1, c.lora[1][:, :40])),
                   "lora_gate_b must be float32 or bfloat16 of shape [E, out, r] = [6, 45, 8], got float32 [6, 40, 8]"),
    "scaling_nan": (lambda c: dict(lora_scaling=float("nan")), "lora_scaling must be finite, got nan"),
    "layout_dtype": (lambda c: dict(layout=c.experts.layout.int()),
                     "layout must be the int64 [6] tensor made by kt.pack_experts with gate_up and down, got int32 [6]"),
    "layout_values": (lambda c: dict(layout=torch.arange(6)),
                      "layout must be the tensor made by kt.pack_experts with gate_up and down; this one holds other values"),
    "layout_format": (lambda c: dict(layout=with_field(c.experts.layout, 1, 7)),
                      "layout names weight format 7, which this build of kt_ops cannot compute (it has: bf16, int8, int4, fp8)"),
    "layout_experts": (lambda c: dict(layout=with_field(c.experts.layout, 2, 5)),
                       "gate_up must hold the 5 experts in 1 slices that layout describes, got bfloat16 [1, 6, 128, 96]"),
    "activation_name": (lambda c: dict(activation="relu"),
                        'activation must be "silu", "gelu" or "gelu_tanh", got "relu"'),
    "activation_alpha_nan": (lambda c: dict(activation_alpha=float("nan")),
                             "activation_alpha must be finite and positive, got nan"),
    "activation_alpha_gelu": (lambda c: dict(activation="gelu", activation_alpha=1.702),
                              "activation_alpha scales the sigmoid of silu; it must be 1 for gelu, got 1.702"),
    "activation_limit": (lambda c: dict(activation_limit=0.0),
                         "activation_limit must be positive (or None: no clamp), got 0"),
    "activation_limit_nan": (lambda c: dict(activation_limit=float("nan")),
                             "activation_limit must be positive (or None: no clamp), got nan"),
    "up_offset_inf": (lambda c: dict(up_offset=float("inf")), "up_offset must be finite, got inf"),
    "gate_up_bias_shape": (lambda c: dict(gate_up_bias=torch.zeros(E, I)),
                           "gate_up_bias must be float32 or bfloat16 of shape [E, 2I] = [6, 90] (gate columns, then "
                           "up columns), got float32 [6, 45]"),
    "down_bias_dtype": (lambda c: dict(down_bias=torch.zeros(E, H, dtype=torch.float64)),
                        "down_bias must be float32 or bfloat16 of shape [E, H] = [6, 70], got float64 [6, 70]"),
    "down_bias_on_meta": (lambda c: dict(down_bias=torch.zeros(E, H, device="meta")),
                          "down_bias must be on x's device (cpu), got a tensor on meta; the kt ops compute on CPU tensors"),
    "ids_huge_k": (lambda c: dict(topk_ids=torch.empty(T, 2**41, dtype=torch.long, device="meta"),
                                  topk_weights=torch.empty(T, 2**41, device="meta")),
                   "top-k (topk_ids' dim 1) must be at most 2^40, got 2199023255552"),
    "ids_on_meta": (lambda c: dict(topk_ids=c.topk_ids.to("meta")),
                    "topk_ids must be on x's device (cpu), got a tensor on meta; the kt ops compute on CPU tensors"),
    "x_on_meta": (lambda c: dict(x=c.x.detach().to("meta")),
                  "topk_ids must be on x's device (meta), got a tensor on cpu; the kt ops compute on CPU tensors"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_forward_argument_checks(case, name):
    make_override, message = BAD[name]
    with pytest.raises(RuntimeError, match=re.escape(OP + message)):
        call(case, **make_override(case))


@pytest.mark.parametrize("experts, lora, message", [
    (lambda c: list(c.experts.tensors[:2]), None,
     "experts must be the tensors kt.pack_experts returned (gate_up, down, layout, then the format's scales), got 2 "
     "tensors"),
    (lambda c: list(c.experts.tensors) + [torch.zeros(3)], None,
     "experts must be the 3 tensors kt.pack_experts returns for format bf16, got 4"),
    (lambda c: list(c.experts.tensors), lambda c: list(c.lora[:4]),
     "lora must be empty (no LoRA) or the six tensors [A_gate, B_gate, A_up, B_up, A_down, B_down] (a pair may be "
     "None), got 4 entries"),
])
def test_list_argument_checks(case, experts, lora, message):
    args = [case.x, case.topk_ids, case.topk_weights, experts(case), I, lora(case) if lora else list(case.lora),
            case.scaling, *SWIGLU_ARGS]
    with pytest.raises(RuntimeError, match=re.escape(OP + message)):
        torch.ops.kt.moe_sft_forward(*args)


@pytest.mark.parametrize("edit, message", [
    (lambda t: t[:3], "experts must be the 5 tensors kt.pack_experts returns for format int8, got 3"),
    (lambda t: t[:3] + [t[3].double(), t[4]],
     "gate_up_scale (experts[3]) must be the float32 [1, 6, 128] tensor made by kt.pack_experts with gate_up, got "
     "float64 [1, 6, 128]"),
    (lambda t: t[:3] + [t[3][:, :, :64], t[4]],
     "gate_up_scale (experts[3]) must be the float32 [1, 6, 128] tensor made by kt.pack_experts with gate_up, got "
     "float32 [1, 6, 64]"),
    (lambda t: t[:4] + [t[4][:, :5]],
     "down_scale (experts[4]) must be the float32 [1, 6, 96] tensor made by kt.pack_experts with down, got "
     "float32 [1, 5, 96]"),
    (lambda t: [t[0].view(torch.int16)] + t[1:],
     "gate_up must be the int8 [S, E, 2*Is, Hp] tensor made by kt.pack_experts, got int16 [1, 6, 128, 48]"),
])
@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_int8_experts_are_checked(edit, message, device):
    case = make_case(H, I, E, K, T, R, numa_nodes=1, weight_format="int8")
    experts = [t.to(device) for t in edit(list(case.experts.tensors))]
    if device == "meta" and "int16" in message:
        message = "gate_up must be the [S, E, 2*Is, Hp] tensor made by kt.pack_experts, in a weight format"
    args = [t.detach().to(device) for t in (case.x, case.topk_ids, case.topk_weights)]
    with pytest.raises(RuntimeError, match=re.escape(OP + message)):
        torch.ops.kt.moe_sft_forward(*args, experts, I, [], 1.0)


@pytest.mark.parametrize("edit, message", [
    (lambda t: t[:3], "experts must be the 5 tensors kt.pack_experts returns for format int4, got 3"),
    (lambda t: t[:3] + [t[3].float(), t[4]],
     "gate_up_scale (experts[3]) must be the bfloat16 [1, 6, 384] tensor made by kt.pack_experts with gate_up, got "
     "float32 [1, 6, 384]"),
    (lambda t: t[:4] + [t[4][:, :, :10]],
     "down_scale (experts[4]) must be the bfloat16 [1, 6, 192] tensor made by kt.pack_experts with down, got "
     "bfloat16 [1, 6, 10]"),
    (lambda t: [t[0][..., :40]] + t[1:],
     "gate_up must be packed for H = 96 and I = 64 (shape [1, E, 128, 48]), got uint8 [1, 6, 128, 40]"),
])
@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_int4_experts_are_checked(edit, message, device):
    """int4: codes two per byte (gate_up's last dimension is Hp / 2), bf16 scales per block."""
    case = make_case(96, 64, E, K, T, R, numa_nodes=1, weight_format="int4")
    experts = [t.to(device) for t in edit(list(case.experts.tensors))]
    if device == "meta" and "got float32" in message:  # uint8 codes with fp32 scales are fp8's, one byte each
        message = "gate_up must be packed for H = 96 and I = 64 (shape [1, E, 128, 96]), got uint8 [1, 6, 128, 48]"
    args = [t.detach().to(device) for t in (case.x, case.topk_ids, case.topk_weights)]
    with pytest.raises(RuntimeError, match=re.escape(OP + message)):
        torch.ops.kt.moe_sft_forward(*args, experts, 64, [], 1.0)


def test_meta_experts_of_an_unknown_weight_dtype_are_refused(case):
    meta = [t.to("meta") for t in (case.x.detach(), case.topk_ids, case.topk_weights.detach())]
    experts = [case.experts.gate_up.float().to("meta"), case.experts.down.to("meta"), case.experts.layout.to("meta")]
    with pytest.raises(RuntimeError, match=re.escape(
            OP + "gate_up must be the [S, E, 2*Is, Hp] tensor made by kt.pack_experts, in a weight format this build "
            "has (bf16, int8, int4, fp8), got float32 [1, 6, 128, 96]")):
        torch.ops.kt.moe_sft_forward(*meta, experts, I, [], 1.0)


@pytest.mark.parametrize("fmt", ["bf16", "int4", "fp8"])
@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_w8a8_needs_int8_experts(fmt, device):
    case = make_case(64, 32, 4, 2, 5, 4, weight_format=fmt)
    experts = [t.to(device) for t in case.experts.tensors]
    x, ids, w = (t.detach().to(device) for t in (case.x, case.topk_ids, case.topk_weights))
    with pytest.raises(RuntimeError, match=re.escape(
            f'{OP}w8a8 needs int8 experts (pack_experts(..., format="int8")), got {fmt} experts')):
        torch.ops.kt.moe_sft_forward(x, ids, w, experts, 32, [], 1.0, w8a8=True)
    if device == "cpu":
        with pytest.raises(RuntimeError, match="w8a8 needs int8 experts"):
            kt_ops.moe_sft(case.x, case.topk_ids, case.topk_weights, case.experts, w8a8=True)
        with pytest.raises(RuntimeError, match="kt.isa: w8a8 needs int8 experts"):
            kt_ops.isa(fmt, w8a8=True)
    assert kt_ops.isa("int8", w8a8=True) == kt_ops.isa("int8")


@pytest.mark.parametrize("fmt, group_size, message", [
    ("bf17", 0, 'format must be one of bf16, int8, int4, fp8 (the weight formats this build has), got "bf17"'),
    ("", 0, 'format must be one of bf16, int8, int4, fp8 (the weight formats this build has), got ""'),
    ("bf16", 32, "format bf16 has no quantization groups: group_size must be 0, got 32"),
    ("int8", 64, "format int8 has no quantization groups: group_size must be 0, got 64"),
    ("int4", 48, "format int4 takes group_size 32, 64 or 128 (0: 32), got 48"),
    ("int4", 0, "format int4 groups of 32 must divide the hidden size H = 8 and the intermediate size I = 32"),
    ("int4", 64, "format int4 groups of 64 must divide the hidden size H = 8 and the intermediate size I = 32"),
])
@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_pack_experts_checks_the_format(fmt, group_size, message, device):
    w = [torch.zeros(2, 32, 8).bfloat16(), torch.zeros(2, 32, 8).bfloat16(), torch.zeros(2, 8, 32).bfloat16()]
    with pytest.raises(RuntimeError, match=re.escape("kt.pack_experts: " + message)):
        torch.ops.kt.pack_experts(*[t.to(device) for t in w], 1, fmt, group_size)


@pytest.mark.parametrize("bad_id", [-2, E])
def test_expert_id_out_of_range(case, bad_id):
    ids = case.topk_ids.clone()
    ids[3, 1] = bad_id
    msg = (f"kt.moe_sft_forward: topk_ids must be in [0, {E}) (the number of experts) or -1 (no expert), got "
           f"{bad_id} at [3, 1]")
    with pytest.raises(RuntimeError, match=re.escape(msg)):
        call(case, topk_ids=ids)


def test_backward_checks_saved_tensors(case):
    y, gate_up_act, lora_act = call(case)
    args = [case.grad_y, case.x.detach(), case.topk_ids, case.topk_weights.detach(), list(case.experts.tensors), I,
            [t.detach() for t in case.lora], case.scaling, *SWIGLU_ARGS]
    with pytest.raises(RuntimeError, match=re.escape(
            "kt.moe_sft_backward: gate_up_act must be the bfloat16 [7, 2, 90] tensor returned by "
            "kt.moe_sft_forward, got bfloat16 [7, 2, 45]")):
        torch.ops.kt.moe_sft_backward(*args, gate_up_act[..., :I], lora_act)
    with pytest.raises(RuntimeError, match=re.escape(
            "kt.moe_sft_backward: lora_act must be the float32 [7, 2, 24] tensor returned by "
            "kt.moe_sft_forward, got bfloat16 [7, 2, 24]")):
        torch.ops.kt.moe_sft_backward(*args, gate_up_act, lora_act.bfloat16())
    with pytest.raises(RuntimeError, match=re.escape(
            "kt.moe_sft_backward: grad_y must match x (bfloat16 [7, 70]), got float32 [7, 70]")):
        torch.ops.kt.moe_sft_backward(case.grad_y.float(), *args[1:], gate_up_act, lora_act)


@pytest.mark.parametrize("which,tensor_fn,message", [
    ("w_gate", lambda w: w[0].float(), "w_gate must be bfloat16 of shape [E, I, H], got float32 [3, 45, 70]"),
    ("w_up", lambda w: w[1][:, :44], "w_up must be bfloat16 of the shape of w_gate [3, 45, 70], got bfloat16 [3, 44, 70]"),
    ("w_down", lambda w: w[2].transpose(1, 2), "w_down must be bfloat16 of shape [E, H, I] = [3, 70, 45], got bfloat16 [3, 45, 70]"),
    ("w_down", lambda w: w[2].to("meta"),
     "w_down must be on w_gate's device (cpu), got a tensor on meta; the kt ops compute on CPU tensors"),
])
def test_pack_experts_checks(which, tensor_fn, message):
    w = [torch.randn(3, 45, 70).bfloat16(), torch.randn(3, 45, 70).bfloat16(), torch.randn(3, 70, 45).bfloat16()]
    args = dict(zip(["w_gate", "w_up", "w_down"], w))
    args[which] = tensor_fn(w)
    with pytest.raises(RuntimeError, match=re.escape("kt.pack_experts: " + message)):
        torch.ops.kt.pack_experts(args["w_gate"], args["w_up"], args["w_down"])


@pytest.mark.parametrize("numa_nodes", [-1, 1025, 2**40, 2**62])
def test_pack_experts_bounds_numa_nodes(numa_nodes):
    w = [torch.zeros(2, 32, 8).bfloat16(), torch.zeros(2, 32, 8).bfloat16(), torch.zeros(2, 8, 32).bfloat16()]
    with pytest.raises(RuntimeError, match=re.escape(
            f"kt.pack_experts: numa_nodes must be in [0, 1024] (0: one slice per NUMA node), got {numa_nodes}")):
        torch.ops.kt.pack_experts(*w, numa_nodes)


def test_pack_experts_at_the_numa_bound_is_fast_and_gives_one_slice_per_32_columns():
    w = [torch.zeros(2, 100, 8).bfloat16(), torch.zeros(2, 100, 8).bfloat16(), torch.zeros(2, 8, 100).bfloat16()]
    assert kt_ops.pack_experts(*w, numa_nodes=1024).numa_slices == 4


@pytest.mark.parametrize("shape, message", [
    ((1, 2**61, 1), "the intermediate size (w_gate's dim 1) must be at most 2^40, got 2305843009213693952"),
    ((2**41, 32, 32), "the expert count (w_gate's dim 0) must be at most 2^40, got 2199023255552"),
    ((2**21, 2**20, 2**20), "gate_up would be of shape [1, 2097152, 2097152, 1048576], 2^62 elements or more"),
])
def test_pack_experts_refuses_sizes_that_overflow(shape, message):
    """Shape inference (meta tensors) takes any size; the arithmetic must not wrap around."""
    e, i, h = shape
    w = [torch.empty(e, i, h, dtype=torch.bfloat16, device="meta"),
         torch.empty(e, i, h, dtype=torch.bfloat16, device="meta"),
         torch.empty(e, h, i, dtype=torch.bfloat16, device="meta")]
    with pytest.raises(RuntimeError, match=re.escape("kt.pack_experts: " + message)):
        torch.ops.kt.pack_experts(*w, 1)


def packed_case(hidden, intermediate, numa_nodes=1):
    return make_case(hidden, intermediate, E, K, T, R, numa_nodes=numa_nodes)


@pytest.mark.parametrize("call_hidden, call_intermediate, packed_hidden, packed_intermediate, numa_nodes, message", [
    # sizes that agree with the packed shapes only after padding
    (64, 40, 64, 64, 1, "intermediate_size must be the I the experts were packed with (64), got 40"),
    (60, 64, 64, 64, 1, "x must have the hidden size the experts were packed with (H = 64), got 60"),
    (64, 40, 64, 33, 2, "intermediate_size must be the I the experts were packed with (33), got 40"),
])
def test_sizes_that_agree_only_after_padding_are_refused(call_hidden, call_intermediate, packed_hidden,
                                                         packed_intermediate, numa_nodes, message):
    packed = packed_case(packed_hidden, packed_intermediate, numa_nodes)
    case = make_case(call_hidden, call_intermediate, E, K, T, R)
    with pytest.raises(RuntimeError, match=re.escape(OP + message)):
        call(case, gate_up=packed.experts.gate_up, down=packed.experts.down, layout=packed.experts.layout,
             intermediate_size=call_intermediate)
    with pytest.raises(RuntimeError, match=re.escape("kt.moe_sft_backward: " + message)):
        torch.ops.kt.moe_sft_backward(case.grad_y, case.x.detach(), case.topk_ids, case.topk_weights.detach(),
                                      list(packed.experts.tensors), call_intermediate,
                                      [t.detach() for t in case.lora], case.scaling,
                                      *SWIGLU_ARGS, torch.zeros(T, K, 2 * call_intermediate, dtype=case.x.dtype),
                                      torch.zeros(T, K, 3 * R))


def test_pack_experts_rejects_empty_dimensions():
    w = [torch.zeros(2, 0, 8).bfloat16(), torch.zeros(2, 0, 8).bfloat16(), torch.zeros(2, 8, 0).bfloat16()]
    with pytest.raises(RuntimeError, match=re.escape(
            "kt.pack_experts: w_gate must have non-empty I and H, got bfloat16 [2, 0, 8]")):
        torch.ops.kt.pack_experts(*w)


def test_python_api_rejects_wrong_lora_length(case):
    with pytest.raises(ValueError, match=re.escape("kt_ops.moe_sft: lora must be None or six tensors")):
        kt_ops.moe_sft(case.x, case.topk_ids, case.topk_weights, case.experts, case.lora[:4])


def test_invalid_isa_cap(case, monkeypatch):
    monkeypatch.setenv("KT_OPS_MAX_ISA", "sse9")
    with pytest.raises(RuntimeError, match=re.escape("KT_OPS_MAX_ISA must be one of amx, avx512, avx2, scalar; got 'sse9'")):
        kt_ops.moe_sft(case.x, case.topk_ids, case.topk_weights, case.experts)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_input_names_the_argument(case):
    with pytest.raises(RuntimeError, match=re.escape(
            "kt.moe_sft_forward: x must be a CPU tensor (kt_ops runs the experts on the CPU), got a tensor on cuda:0")):
        call(case, x=case.x.detach().cuda(), topk_ids=case.topk_ids.cuda(), topk_weights=case.topk_weights.detach().cuda())


def test_non_contiguous_inputs_are_accepted(case):
    """Strided inputs are copied to contiguous ones: same result as contiguous inputs."""
    x_wide = torch.zeros(T, 2 * H, dtype=case.x.dtype)
    x_wide[:, ::2] = case.x.detach()
    ids_t = case.topk_ids.t().contiguous().t()
    w_t = case.topk_weights.detach().t().contiguous().t()
    lora_t = [t.detach().transpose(1, 2).contiguous().transpose(1, 2) for t in case.lora]
    assert not (x_wide[:, ::2].is_contiguous() or ids_t.is_contiguous() or lora_t[0].is_contiguous())
    got = kt_ops.moe_sft(x_wide[:, ::2], ids_t, w_t, case.experts, lora_t, case.scaling)
    want = kt_ops.moe_sft(case.x.detach(), case.topk_ids, case.topk_weights.detach(), case.experts,
                          [t.detach() for t in case.lora], case.scaling)
    assert torch.equal(got, want)


def test_saved_activations_that_would_overflow_are_refused():
    """Shape inference takes any size: T * K * 2I past 2^62 elements is an error, not a wrap."""
    t, k, i, h = 2**39, 8, 2**20, 64
    meta = dict(device="meta")
    x = torch.empty(t, h, dtype=torch.bfloat16, **meta)
    ids = torch.empty(t, k, dtype=torch.long, **meta)
    weights = torch.empty(t, k, **meta)
    gate_up = torch.empty(1, 2, 2 * i, h, dtype=torch.bfloat16, **meta)
    down = torch.empty(1, 2, h, i, dtype=torch.bfloat16, **meta)
    layout = torch.empty(6, dtype=torch.long, **meta)
    with pytest.raises(RuntimeError, match=re.escape(
            "kt.moe_sft_forward: gate_up_act would be of shape [549755813888, 8, 2097152], 2^62 elements or more")):
        torch.ops.kt.moe_sft_forward(x, ids, weights, [gate_up, down, layout], i, [], 1.0)


def _codes(fmt):
    """Codes and scales of a [2, 64, 32] / [2, 32, 64] layer in ``fmt`` for kt.pack_expert_codes."""
    from kt_ops import reference as ref

    g = torch.Generator().manual_seed(3)
    w = [torch.randn(*s, generator=g) for s in [(2, 64, 32), (2, 64, 32), (2, 32, 64)]]
    quantize = {"int8": ref.quantize_int8, "int4": lambda t: ref.quantize_int4(t, 32), "fp8": ref.quantize_fp8}[fmt]
    codes, scales = zip(*(quantize(t) for t in w))
    return [c.view(torch.uint8) if c.dtype == torch.float8_e4m3fn else c for c in codes], list(scales)


def _edited(codes, scales, index, value):
    out = list(codes) + list(scales)
    out[index] = value
    return out[:3], out[3:]


@pytest.mark.parametrize("fmt, edit, message", [
    ("fp8", lambda c, s: _edited(c, s, 3, s[0][:, :, :0]),
     "scales[0] (gate) must be float32 [2, 1, 1] (one per 128 x 128 block, as kt_ops.reference.quantize_fp8 returns "
     "them), got float32 [2, 1, 0]"),
    ("fp8", lambda c, s: _edited(c, s, 5, s[2].double()),
     "scales[2] (down) must be float32 [2, 1, 1] (one per 128 x 128 block, as kt_ops.reference.quantize_fp8 returns "
     "them), got float64 [2, 1, 1]"),
    ("int4", lambda c, s: _edited(c, s, 4, s[1].float()),
     "scales[1] (up) must be bfloat16 [2, 64, 1] (one per group of a row, as kt_ops.reference.quantize_int4 returns "
     "them), got float32 [2, 64, 1]"),
    ("int8", lambda c, s: _edited(c, s, 5, s[2][:, :3]),
     "scales[2] (down) must be float32 [2, 32] (one per output row, as kt_ops.reference.quantize_int8 returns them), "
     "got float32 [2, 3]"),
    ("int8", lambda c, s: (c, s[:2]), "scales must be the three scale tensors [gate, up, down] of format int8, got 2"),
    ("fp8", lambda c, s: _edited(c, s, 0, c[0].view(torch.int8)),
     "w_gate must be uint8 of shape [E, I, H], got int8 [2, 64, 32]"),
    ("int4", lambda c, s: _edited(c, s, 2, c[2][:, :, :32]),
     "w_down must be int8 of shape [E, H, I] = [2, 32, 64], got int8 [2, 32, 32]"),
    ("int8", lambda c, s: _edited(c, s, 3, s[0].to("meta")),  # the dispatcher picks the Meta kernel
     "scales[0] (gate) must be on w_gate's device (cpu), got a tensor on meta; the kt ops compute on CPU tensors"),
])
def test_pack_expert_codes_checks_its_arguments(fmt, edit, message):
    codes, scales = edit(*_codes(fmt))
    with pytest.raises(RuntimeError, match=re.escape("kt.pack_expert_codes: " + message)):
        torch.ops.kt.pack_expert_codes(*codes, scales, fmt, 1, 32 if fmt == "int4" else 0)


@pytest.mark.parametrize("fmt, message", [
    ("bf16", "format bf16 has no codes (kt.pack_experts packs bf16 weights as they are)"),
    ("int3", 'format must be one of bf16, int8, int4, fp8 (the weight formats this build has), got "int3"'),
])
def test_pack_expert_codes_needs_a_format_with_codes(fmt, message):
    codes, scales = _codes("int8")
    with pytest.raises(RuntimeError, match=re.escape("kt.pack_expert_codes: " + message)):
        torch.ops.kt.pack_expert_codes(*codes, scales, fmt, 1, 0)


def test_pack_expert_codes_refuses_values_the_kernels_cannot_read():
    codes, scales = _codes("int4")
    codes[1][0, 0, 0] = 8
    with pytest.raises(RuntimeError, match=re.escape(
            "kt.pack_expert_codes: w_up must hold int4 codes in [-8, 7], got values in [-7, 8]")):
        torch.ops.kt.pack_expert_codes(*codes, scales, "int4", 1, 32)
    codes, scales = _codes("fp8")
    codes[2][1, 3, 4] = 0xFF
    with pytest.raises(RuntimeError, match=re.escape(
            "kt.pack_expert_codes: w_down holds the e4m3 NaN code (0x7f or 0xff); fp8 expert weights must be finite")):
        torch.ops.kt.pack_expert_codes(*codes, scales, "fp8", 1, 0)
    codes, scales = _codes("int8")
    scales[0][1, 5] = float("inf")
    with pytest.raises(RuntimeError, match=re.escape(
            "kt.pack_expert_codes: scales[0] must be finite, got a NaN or infinite scale")):
        torch.ops.kt.pack_expert_codes(*codes, scales, "int8", 1, 0)
