"""torch.compile(fullgraph=True) of code calling kt_ops.moe_sft: one graph, same results."""
import pytest
import torch
import torch._dynamo.testing

import kt_ops
from moe_case import make_case, run_kt


@pytest.mark.parametrize("weight_format, w8a8", [(f, False) for f in kt_ops.weight_formats()] + [("int8", True)],
                         ids=kt_ops.weight_formats() + ["int8_w8a8"])
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_forward_and_backward(backend, weight_format, w8a8):
    torch._dynamo.reset()
    case = make_case(64, 48, 8, 2, 19, 8, weight_format=weight_format, w8a8=w8a8)
    experts, ids, scaling = case.experts, case.topk_ids, case.scaling

    def step(x, w, lora):
        y = kt_ops.moe_sft(x, ids, w, experts, lora, scaling, w8a8=w8a8)
        return (y.float() * case.grad_y.float()).sum()

    counter = torch._dynamo.testing.CompileCounterWithBackend(backend)
    compiled = torch.compile(step, fullgraph=True, backend=counter)
    leaves = case.inputs_requiring_grad()
    loss = compiled(leaves[0], leaves[1], leaves[2:])
    grads = torch.autograd.grad(loss, leaves)
    assert counter.frame_count == 1  # fullgraph=True already fails on any graph break

    y_eager, grads_eager = run_kt(case)
    assert torch.allclose(loss, (y_eager.float() * case.grad_y.float()).sum())
    for g, e in zip(grads, grads_eager):
        assert torch.equal(g, e)


def test_compiled_graph_calls_the_kt_ops():
    torch._dynamo.reset()
    case = make_case(32, 24, 4, 2, 5, 4)
    graphs = []

    def backend(gm, example_inputs):
        from torch._functorch.aot_autograd import aot_module_simplified

        from functorch.compile import make_boxed_func

        def record(g, _):
            graphs.append(str(g.graph))
            return make_boxed_func(g.forward)

        return aot_module_simplified(gm, example_inputs, fw_compiler=record, bw_compiler=record)

    def step(x, w, lora):
        return kt_ops.moe_sft(x, case.topk_ids, w, case.experts, lora, case.scaling).sum()

    leaves = case.inputs_requiring_grad()
    loss = torch.compile(step, fullgraph=True, backend=backend)(leaves[0], leaves[1], leaves[2:])
    loss.backward()
    assert any("kt.moe_sft_forward" in g for g in graphs)
    assert any("kt.moe_sft_backward" in g for g in graphs)
