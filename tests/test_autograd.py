"""gradcheck, activation checkpointing, saved state and thread-count determinism of kt_ops.moe_sft."""
import pytest
import torch
from torch.utils.checkpoint import checkpoint

import kt_ops
from moe_case import CountExpertForwards, make_case, run_kt


@pytest.mark.filterwarnings("ignore:Input #\\d+ requires gradient and is not a double:UserWarning")
def test_gradcheck_fp32_scalar_path(monkeypatch):
    """Finite differences against the analytic backward, in fp32 on the scalar path.

    The scalar path keeps fp32 activations end to end (no bf16 rounding of x, g, u, z), so
    the op is a smooth function of its fp32 inputs; only the base weights are bf16
    constants. With eps = 1e-2 the central-difference truncation error is ~eps^2 = 1e-4
    and fp32 round-off ~1e-7 / eps = 1e-5 of the O(1) outputs, hence atol = rtol = 2e-3.
    """
    monkeypatch.setenv("KT_OPS_MAX_ISA", "scalar")
    case = make_case(hidden=12, intermediate=10, experts=3, top_k=2, tokens=4, rank=2,
                     dtype=torch.float32, seed=3)

    def f(x, w, *lora):
        return kt_ops.moe_sft(x, case.topk_ids, w, case.experts, list(lora), case.scaling)

    assert torch.autograd.gradcheck(f, tuple(case.inputs_requiring_grad()), eps=1e-2, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("weight_format", kt_ops.weight_formats())
def test_checkpointing_gives_the_same_gradients(weight_format):
    case = make_case(64, 48, 8, 2, 37, 8, weight_format=weight_format)
    _, plain = run_kt(case)

    def fn(x, w, *lora):
        return kt_ops.moe_sft(x, case.topk_ids, w, case.experts, list(lora), case.scaling)

    y = checkpoint(fn, *case.inputs_requiring_grad(), use_reentrant=False)
    ckpt = torch.autograd.grad(y, case.inputs_requiring_grad(), case.grad_y)
    for a, b in zip(plain, ckpt):
        assert torch.equal(a, b)


def _layer(case, inputs_seen=None):
    """A layer whose ops around the experts save tensors, so a checkpoint's recompute has to
    run through the experts to rebuild them."""
    def layer(x, w, *lora):
        h = torch.tanh(x)
        if inputs_seen is not None:
            h = h + inputs_seen.pop(0)
        y = kt_ops.moe_sft(h, case.topk_ids, w, case.experts, list(lora), case.scaling)
        return torch.sigmoid(y) * y
    return layer


@pytest.mark.parametrize("weight_format", kt_ops.weight_formats())
def test_checkpointing_runs_the_experts_forward_once_with_the_same_gradients(weight_format):
    case = make_case(64, 48, 8, 2, 37, 8, dtype=torch.float32, weight_format=weight_format)
    inputs = case.inputs_requiring_grad()
    layer = _layer(case)
    plain = torch.autograd.grad(layer(*inputs), inputs, case.grad_y)
    with CountExpertForwards() as counter:
        y = checkpoint(layer, *inputs, use_reentrant=False)
        ckpt = torch.autograd.grad(y, inputs, case.grad_y)
    assert counter.calls == 1
    for a, b in zip(plain, ckpt):
        assert torch.equal(a, b)


def test_a_recompute_with_other_inputs_computes_the_experts_again():
    """Reuse needs equal inputs: a layer that recomputes differently (here by design) gets the
    experts computed on what it passes them."""
    case = make_case(64, 48, 8, 2, 37, 8, dtype=torch.float32)
    inputs = case.inputs_requiring_grad()
    with CountExpertForwards() as counter:
        y = checkpoint(_layer(case, inputs_seen=[0.0, 0.5]), *inputs, use_reentrant=False)
        torch.autograd.grad(y, inputs, case.grad_y)
    assert counter.calls == 2


def test_an_output_changed_in_place_is_not_handed_out_again():
    case = make_case(64, 48, 8, 2, 37, 8, dtype=torch.float32)
    inputs = case.inputs_requiring_grad()

    def layer(x, w, *lora):
        y = kt_ops.moe_sft(torch.tanh(x), case.topk_ids, w, case.experts, list(lora), case.scaling)
        return torch.sigmoid(y.mul_(2.0))

    plain = torch.autograd.grad(layer(*inputs), inputs, case.grad_y)
    with CountExpertForwards() as counter:
        ckpt = torch.autograd.grad(checkpoint(layer, *inputs, use_reentrant=False), inputs, case.grad_y)
    assert counter.calls == 2
    for a, b in zip(plain, ckpt):
        assert torch.equal(a, b)


def test_an_input_changed_in_place_after_the_forward_is_an_error():
    case = make_case(40, 24, 4, 2, 9, 4, dtype=torch.float32)
    x = case.x * 1.0
    y = kt_ops.moe_sft(x, case.topk_ids, case.topk_weights, case.experts, case.lora, case.scaling)
    x.add_(1.0)
    with pytest.raises(RuntimeError, match="x of this kt experts call was modified in place"):
        y.sum().backward()


def test_a_second_backward_needs_retain_graph():
    case = make_case(40, 24, 4, 2, 9, 4, dtype=torch.float32)
    y = kt_ops.moe_sft(case.x, case.topk_ids, case.topk_weights, case.experts, case.lora, case.scaling)
    once = torch.autograd.grad(y, case.x, case.grad_y, retain_graph=True)[0]
    twice = torch.autograd.grad(y, case.x, case.grad_y)[0]
    assert torch.equal(once, twice)
    with pytest.raises(RuntimeError, match="retain_graph=True"):
        torch.autograd.grad(y, case.x, case.grad_y)


@pytest.mark.parametrize("weight_format", kt_ops.weight_formats())
def test_bit_identical_for_any_thread_count(isa_path, weight_format):
    case = make_case(96, 80, 12, 4, 301, 16, seed=5, weight_format=weight_format)
    results = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        y, grads = run_kt(case)
        results.append([y] + grads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_saved_activations_match_the_documented_bytes_per_token():
    """moe_sft's docstring: K*2I values in x's dtype plus K*(r_g+r_u+r_d) fp32 per token."""
    h, i, e, k, t, r = 64, 48, 8, 4, 10, 16
    case = make_case(h, i, e, k, t, r)
    _, gate_up_act, lora_act = torch.ops.kt.moe_sft_forward(
        case.x, case.topk_ids, case.topk_weights, list(case.experts.tensors), i, case.lora, case.scaling)
    assert gate_up_act.nbytes + lora_act.nbytes == t * (k * 2 * i * 2 + k * 3 * r * 4)
    qwen3 = 8 * 2 * 768 * 2 + 8 * 3 * 16 * 4
    assert qwen3 == 26112, "update the figure in kt_ops.moe_sft's docstring"
    assert "26,112 bytes per token" in kt_ops.moe_sft.__doc__
