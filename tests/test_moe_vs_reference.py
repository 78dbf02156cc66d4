"""Forward and every gradient of kt_ops.moe_sft against kt_ops.reference, on every path."""
import pytest
import torch

import kt_ops
from kt_ops import Gate
from moe_case import assert_close, make_case, run_kt, run_reference

GRAD_NAMES = ["x", "topk_weights", "lora_gate_a", "lora_gate_b", "lora_up_a", "lora_up_b",
              "lora_down_a", "lora_down_b"]

# (hidden, intermediate, experts, top_k, tokens, rank, extra make_case arguments)
CASES = {
    "no_tokens": (70, 45, 6, 2, 0, 8, {}),
    "one_token": (70, 45, 6, 2, 1, 16, {}),
    "odd_sizes_no_lora": (70, 45, 6, 2, 7, None, {}),
    "k8_rank1": (33, 17, 8, 8, 7, 1, {"ids_dtype": torch.int32}),
    "k1": (130, 100, 10, 1, 7, 16, {"weights_dtype": torch.bfloat16}),
    "idle_experts": (64, 32, 12, 2, 7, 8, {"used_experts": 4}),
    # Slots of id -1 (computed elsewhere): nothing added, no gradient to their weights.
    "unrouted_slots": (70, 45, 6, 2, 33, 8, {"unrouted_share": 0.3}),
    "unrouted_slots_biases_two_slices": (64, 96, 6, 3, 17, 8, {"unrouted_share": 0.4, "biases": True,
                                                               "numa_nodes": 2}),
    "t513_rank16": (96, 64, 16, 4, 513, 16, {}),
    "t513_rank64_odd": (40, 72, 5, 3, 513, 64, {"ids_dtype": torch.int32}),
    "bf16_lora": (48, 40, 4, 2, 33, 8, {"lora_dtype": torch.bfloat16, "weights_dtype": torch.bfloat16}),
    # Experts split into NUMA slices along I (whatever this machine's node count).
    "two_numa_slices": (70, 100, 6, 2, 33, 8, {"numa_nodes": 2}),
    "three_numa_slices_idle": (64, 96, 8, 3, 65, 16, {"numa_nodes": 3, "used_experts": 5}),
    # The gates of kt_ops.Gate; clamped ones with a limit that cuts a few percent of the
    # pre-activations and lies in a gap between them (moe_case.limit_in_a_gap).
    "biases": (70, 45, 6, 2, 33, 8, {"biases": True}),
    "biases_two_slices_no_lora": (64, 96, 6, 2, 17, None, {"biases": True, "numa_nodes": 2}),
    "clamped_swiglu": (70, 45, 6, 2, 13, 8, {"clamped_share": 0.05}),
    "gpt_oss_gate": (70, 45, 6, 2, 9, 8, {"gate": Gate(alpha=1.702, up_offset=1.0), "biases": True,
                                          "clamped_share": 0.05}),
    "gelu": (48, 40, 4, 2, 21, 8, {"gate": Gate(activation="gelu")}),
    "gelu_tanh_clamped": (48, 40, 4, 2, 13, 8, {"gate": Gate(activation="gelu_tanh"), "clamped_share": 0.05}),
}


@pytest.mark.parametrize("weight_format", kt_ops.weight_formats())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("case_name", list(CASES))
def test_forward_and_gradients_match_reference(isa_path, case_name, dtype, weight_format):
    """Quantized formats against the reference on their dequantized weights, at the same
    tolerances: the weights are the truth, whatever they are stored as."""
    h, i, e, k, t, r, extra = CASES[case_name]
    case = make_case(h, i, e, k, t, r, dtype=dtype, weight_format=weight_format, **extra)
    y, grads = run_kt(case)
    y_ref, grads_ref = run_reference(case)
    assert y.dtype == dtype and y.shape == (t, case.x.shape[1])
    assert_close("y", y, y_ref, dtype)
    names = (GRAD_NAMES if r is not None else GRAD_NAMES[:2]) + (["gate_up_bias", "down_bias"] if case.biases() else [])
    assert len(names) == len(grads)
    for name, g, g_ref, inp in zip(names, grads, grads_ref, case.inputs_requiring_grad()):
        assert g.dtype == inp.dtype, f"grad of {name} has dtype {g.dtype}, input {inp.dtype}"
        # LoRA gradients accumulate over all of an expert's tokens; bf16 LoRA tensors round them.
        tol_dtype = torch.bfloat16 if inp.dtype == torch.bfloat16 else dtype
        assert_close(f"grad {name}", g, g_ref, tol_dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("case_name", list(CASES))
def test_w8a8_matches_its_reference(isa_path, case_name, dtype):
    """int8 experts with W8A8 numerics against moe_sft_w8a8_reference, every case and path."""
    h, i, e, k, t, r, extra = CASES[case_name]
    case = make_case(h, i, e, k, t, r, dtype=dtype, weight_format="int8", w8a8=True, **extra)
    y, grads = run_kt(case)
    y_ref, grads_ref = run_reference(case)
    assert y.dtype == dtype and y.shape == (t, case.x.shape[1])
    assert_close("y", y, y_ref, "w8a8")
    names = (GRAD_NAMES if r is not None else GRAD_NAMES[:2]) + (["gate_up_bias", "down_bias"] if case.biases() else [])
    assert len(names) == len(grads)
    for name, g, g_ref, inp in zip(names, grads, grads_ref, case.inputs_requiring_grad()):
        assert g.dtype == inp.dtype, f"grad of {name} has dtype {g.dtype}, input {inp.dtype}"
        assert_close(f"grad {name}", g, g_ref, "w8a8")


@pytest.mark.parametrize("case_name", ["t513_rank16", "two_numa_slices", "biases"])
def test_w8a8_reference_stays_near_weight_only(case_name):
    """What quantizing the activations costs, bounded: the W8A8 reference against the weight-only
    reference on the same int8 weights (TOLERANCES["w8a8_vs_weight_only"])."""
    h, i, e, k, t, r, extra = CASES[case_name]
    case = make_case(h, i, e, k, t, r, dtype=torch.float32, weight_format="int8", w8a8=True, **extra)
    y_w8a8, grads_w8a8 = run_reference(case, w8a8=True)
    y_weights, grads_weights = run_reference(case, w8a8=False)
    assert not torch.equal(y_w8a8, y_weights)  # the activations were quantized
    assert_close("y", y_w8a8, y_weights, "w8a8_vs_weight_only")
    for n, (g, g_ref) in enumerate(zip(grads_w8a8, grads_weights)):
        assert_close(f"grad {n}", g, g_ref, "w8a8_vs_weight_only")


def test_w8a8_experts_format_makes_w8a8_the_default():
    """pack_experts(format="w8a8") stores int8 and makes moe_sft compute with W8A8 unless told
    otherwise; W8A8 on other formats is refused."""
    case = make_case(64, 48, 6, 2, 9, 4, weight_format="int8")
    weights = [case.int8_codes[n][0].float() * case.int8_codes[n][1][..., None] for n in range(3)]
    w8a8 = kt_ops.pack_experts(*(w.bfloat16() for w in weights), format="w8a8")
    assert (w8a8.format, w8a8.w8a8, w8a8.experts_format) == ("int8", True, "w8a8")
    assert all(torch.equal(a, b) for a, b in zip(w8a8.tensors, case.experts.tensors))
    assert not case.experts.w8a8 and case.experts.experts_format == "int8"

    def y(experts, **kw):
        return kt_ops.moe_sft(case.x.detach(), case.topk_ids, case.topk_weights.detach(), experts,
                              [t.detach() for t in case.lora], case.scaling, **kw)

    assert torch.equal(y(w8a8), y(case.experts, w8a8=True))
    assert torch.equal(y(w8a8, w8a8=False), y(case.experts))
    assert not torch.equal(y(w8a8), y(case.experts))
    with pytest.raises(ValueError, match="w8a8 needs int8 experts, got bf16"):
        kt_ops.PackedExperts(case.experts.tensors, "bf16", 48, 64, w8a8=True)
    assert "w8a8" in kt_ops.experts_formats() and "w8a8" not in kt_ops.weight_formats()


def test_gradients_reach_only_inputs_that_require_them():
    case = make_case(40, 24, 4, 2, 9, 4)
    case.x.requires_grad_(False)
    for t in case.lora[:2]:
        t.requires_grad_(False)
    import kt_ops
    y = kt_ops.moe_sft(case.x, case.topk_ids, case.topk_weights, case.experts, case.lora, case.scaling)
    y.float().sum().backward()
    assert case.x.grad is None
    assert case.lora[0].grad is None and case.lora[1].grad is None
    assert case.topk_weights.grad is not None
    assert all(t.grad is not None for t in case.lora[2:])


def test_lora_on_some_projections_only(isa_path):
    """A projection may go without LoRA: pass None for its A and B."""
    case = make_case(48, 40, 4, 2, 21, 8)
    for idx in (2, 3):  # no LoRA on up
        case.lora[idx] = None
    import kt_ops
    y = kt_ops.moe_sft(case.x, case.topk_ids, case.topk_weights, case.experts, case.lora, case.scaling)
    leaves = [case.x, case.topk_weights] + [t for t in case.lora if t is not None]
    grads = torch.autograd.grad(y, leaves, case.grad_y)
    from kt_ops.reference import moe_sft_reference
    ref_leaves = [t.detach().float().requires_grad_() for t in leaves]
    lora_ref = ref_leaves[2:4] + [None, None] + ref_leaves[4:]
    y_ref = moe_sft_reference(ref_leaves[0], case.topk_ids, ref_leaves[1], case.w_gate, case.w_up,
                              case.w_down, lora_ref, case.scaling)
    grads_ref = torch.autograd.grad(y_ref, ref_leaves, case.grad_y.float())
    assert_close("y", y, y_ref, torch.bfloat16)
    for g, g_ref in zip(grads, grads_ref):
        assert_close("grad", g, g_ref, torch.bfloat16)
