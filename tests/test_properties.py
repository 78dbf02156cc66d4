"""Property tests of the op boundary (hypothesis): for arguments drawn at random (shapes with
0 and odd sizes, top-k, ranks, dtypes, strides, id ranges and sizes that do not match), a call
of torch.ops.kt either computes what kt_ops.reference computes, forward and every gradient,
or raises a RuntimeError whose message names the op and the argument at fault. Nothing
crashes, hangs or returns another function."""
import os
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kt_ops
from kt_ops.reference import TOLERANCES, moe_sft_reference
from moe_case import ALL_ISAS

PROPERTY_SETTINGS = settings(max_examples=400, deadline=None, derandomize=True,
                             suppress_health_check=[HealthCheck.too_slow])

# Faults a call can carry, and the arguments its error may name (a size that is off shows up
# where it is first compared: x's H against the packed H, say).
FAULTS = {
    None: (),
    "expert_id": ("topk_ids",),
    "intermediate_size": ("intermediate_size", "gate_up"),
    "hidden": ("x", "gate_up"),
    "lora_shape": ("lora_gate_a", "lora_gate_b", "lora_up_a", "lora_up_b", "lora_down_a", "lora_down_b"),
    "lora_unpaired": ("lora_gate_a", "lora_gate_b", "lora_up_a", "lora_up_b", "lora_down_a", "lora_down_b"),
    "weights_shape": ("topk_weights",),
    "ids_rows": ("topk_ids",),
    "ids_dtype": ("topk_ids",),
    "x_dtype": ("x",),
    "layout": ("layout", "gate_up", "x", "intermediate_size"),  # a changed layout disagrees with one of them
}


@dataclass
class Call:
    hidden: int
    intermediate: int
    experts: int
    top_k: int
    tokens: int
    ranks: list
    x_dtype: torch.dtype
    weights_dtype: torch.dtype
    ids_dtype: torch.dtype
    lora_dtype: torch.dtype
    numa_nodes: int
    strided: bool
    duplicate_ids: bool
    isa: str
    fault: Optional[str]
    seed: int


def available_isas() -> list[str]:
    found = []
    old = os.environ.get("KT_OPS_MAX_ISA")
    try:
        for isa in ALL_ISAS:
            os.environ["KT_OPS_MAX_ISA"] = isa
            if kt_ops.isa() == isa:
                found.append(isa)
    finally:
        if old is None:
            os.environ.pop("KT_OPS_MAX_ISA", None)
        else:
            os.environ["KT_OPS_MAX_ISA"] = old
    return found


ISAS = available_isas()


@st.composite
def calls(draw) -> Call:
    experts = draw(st.integers(1, 6))
    return Call(hidden=draw(st.integers(1, 72)), intermediate=draw(st.integers(1, 72)), experts=experts,
                top_k=draw(st.integers(1, 4)), tokens=draw(st.sampled_from([0, 1, 2, 3, 7, 9])),
                ranks=[draw(st.one_of(st.none(), st.integers(1, 5))) for _ in range(3)],
                x_dtype=draw(st.sampled_from([torch.bfloat16, torch.float32])),
                weights_dtype=draw(st.sampled_from([torch.float32, torch.bfloat16])),
                ids_dtype=draw(st.sampled_from([torch.int64, torch.int32])),
                lora_dtype=draw(st.sampled_from([torch.float32, torch.bfloat16])),
                numa_nodes=draw(st.sampled_from([0, 1, 2, 3])), strided=draw(st.booleans()),
                duplicate_ids=draw(st.booleans()), isa=draw(st.sampled_from(ISAS)),
                fault=draw(st.sampled_from(list(FAULTS))), seed=draw(st.integers(0, 2**16)))


def strided_copy(t: torch.Tensor) -> torch.Tensor:
    """The same values in a non-contiguous view (every other column of a wider tensor)."""
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
    wide[..., ::2] = t
    return wide[..., ::2]


def build(c: Call):
    """Weights, packed experts and the op arguments of ``c``, with its fault in them."""
    g = torch.Generator().manual_seed(c.seed)
    h, i, e, k, t = c.hidden, c.intermediate, c.experts, c.top_k, c.tokens

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    w_gate = randn(e, i, h, scale=h**-0.5).bfloat16()
    w_up = randn(e, i, h, scale=h**-0.5).bfloat16()
    w_down = randn(e, h, i, scale=i**-0.5).bfloat16()
    packed = kt_ops.pack_experts(w_gate, w_up, w_down, c.numa_nodes)
    # The caller's view of the sizes: off by a little for the size faults, so that most of
    # them agree with the packed shapes after padding and only the layout can tell.
    call_h = h + 1 + c.seed % 7 if c.fault == "hidden" else h
    call_i = i + 1 + c.seed % 7 if c.fault == "intermediate_size" else i
    if c.duplicate_ids or k > e:
        ids = torch.randint(0, e, (t, k), generator=g)
    else:
        ids = torch.rand(t, e, generator=g).topk(k, dim=1).indices
    fault = c.fault
    if fault == "expert_id":
        if t:
            ids[c.seed % t, c.seed % k] = e if c.seed % 2 else -2
        else:
            fault = None  # no row to put a bad id in: the call is a valid one
    weights = torch.rand(t, k, generator=g)
    x = randn(t, call_h)
    lora = []
    for p, r in enumerate(c.ranks):
        fan_in, fan_out = [(call_h, call_i), (call_h, call_i), (call_i, call_h)][p]
        if r is None:
            lora += [None, None]
            continue
        lora += [randn(e, r, fan_in, scale=0.5 * fan_in**-0.5), randn(e, fan_out, r, scale=0.5 * r**-0.5)]
    lora_given = [j for j, a in enumerate(lora) if a is not None]
    if fault in ("lora_shape", "lora_unpaired") and not lora_given:
        fault = None  # nothing to break: the call is a valid one
    if fault == "lora_shape":
        j = lora_given[c.seed % len(lora_given)]
        lora[j] = lora[j][..., :-1] if lora[j].shape[-1] > 1 else torch.cat([lora[j], lora[j]], dim=-1)
    if fault == "lora_unpaired":
        lora[lora_given[c.seed % len(lora_given)]] = None
    x, weights = x.to(c.x_dtype), weights.to(c.weights_dtype)
    lora = [a if a is None else a.to(c.lora_dtype) for a in lora]
    ids = ids.to(c.ids_dtype)
    if c.strided:
        x, weights = strided_copy(x), strided_copy(weights)
        ids = ids.t().contiguous().t()
        lora = [a if a is None else strided_copy(a) for a in lora]
    if fault == "weights_shape":
        weights = weights[:, :-1] if k > 1 else torch.cat([weights, weights], dim=1)
    if fault == "ids_rows":
        ids = torch.cat([ids, ids[:1] if t else torch.zeros(1, k, dtype=ids.dtype)])
    if fault == "ids_dtype":
        ids = ids.float()
    if fault == "x_dtype":
        x = x.double()
    layout = packed.layout
    if fault == "layout":
        layout = layout.clone()
        layout[2 + c.seed % 4] += 1  # experts, hidden, intermediate or slices
    args = (x, ids, weights, [packed.gate_up, packed.down, layout], call_i, list(lora), 2.0)
    return (w_gate, w_up, w_down), args, fault


def assert_within(name, got, want, scale, tolerance):
    """||got - want|| <= tolerance * ||scale||, every value finite."""
    got, want, scale = got.float(), want.float(), scale.float()
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    error, bound = (got - want).norm().item(), tolerance * scale.norm().item()
    assert error <= bound or error < 1e-30, f"{name}: error {error:.3e} > {bound:.3e}"


def forward_and_grads(x, ids, weights, lora, run, grad_y=None):
    """y = run(...) and the gradients of <y, grad_y> for x, weights and the given LoRA tensors;
    grad_y defaults to y itself (see the test)."""
    leaves = [x, weights] + [a for a in lora if a is not None]
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    x_, w_ = leaves[0], leaves[1]
    it = iter(leaves[2:])
    lora_ = [None if a is None else next(it) for a in lora]
    y = run(x_, ids, w_, lora_)
    if grad_y is None:
        grad_y = y.detach()
    if not y.requires_grad:  # no tokens: nothing flows
        return y.detach(), [torch.zeros_like(l) for l in leaves], grad_y
    grads = torch.autograd.grad(y, leaves, grad_y.to(y.dtype), allow_unused=True)
    return y.detach(), [torch.zeros_like(l) if g is None else g for g, l in zip(grads, leaves)], grad_y


@PROPERTY_SETTINGS
@given(calls())
def test_moe_sft_computes_the_reference_or_names_the_argument(c):
    weights_unpacked, args, fault = build(c)
    x, ids, weights, experts, call_i, lora, scaling = args
    old = os.environ.get("KT_OPS_MAX_ISA")
    os.environ["KT_OPS_MAX_ISA"] = c.isa
    try:
        if fault is not None:
            with pytest.raises(RuntimeError) as err:
                torch.ops.kt.moe_sft_forward(*args)
            message = str(err.value).splitlines()[0]
            assert message.startswith("kt.moe_sft_forward: "), message
            assert any(name in message for name in FAULTS[fault]), (fault, message)
            return

        def kt(x_, ids_, w_, lora_):
            y, _, _ = torch.ops.kt.moe_sft_forward(x_, ids_, w_, experts, call_i, list(lora_), scaling)
            return y

        def reference(x_, ids_, w_, lora_):
            return moe_sft_reference(x_.float(), ids_, w_.float(), *weights_unpacked,
                                     [None if a is None else a.float() for a in lora_], scaling)

        got_y, got_grads, grad_y = forward_and_grads(x, ids, weights, lora, kt)
        want_y, want_grads, _ = forward_and_grads(x, ids, weights, lora, reference, grad_y)
        # The scale errors are measured against: the same computation on the inputs' absolute
        # values, where no sum cancels. A routing weight's gradient <dy, h>, say, can cancel to
        # almost nothing; measured against itself, the documented bf16 rounding of the saved
        # activations would then exceed any relative tolerance.
        scale_y, scale_grads, _ = forward_and_grads(
            x.abs(), ids, weights.abs(), [None if a is None else a.abs() for a in lora],
            lambda x_, ids_, w_, lora_: moe_sft_reference(x_.float(), ids_, w_.float(),
                                                          *(w.abs() for w in weights_unpacked),
                                                          [None if a is None else a.float() for a in lora_], scaling),
            grad_y.abs())
        rounded = c.x_dtype == torch.bfloat16 or c.lora_dtype == torch.bfloat16 or c.isa in ("amx", "avx512")
        tolerance = TOLERANCES[torch.bfloat16]["rel"] if rounded else 1e-4
        assert got_y.dtype == x.dtype and got_y.shape == x.shape
        assert_within("y", got_y, want_y, scale_y, tolerance)
        for n, (a, b, scale) in enumerate(zip(got_grads, want_grads, scale_grads)):
            assert a.dtype == b.dtype and a.shape == b.shape, n
            assert_within(f"grad {n}", a, b, scale, tolerance)
    finally:
        if old is None:
            os.environ.pop("KT_OPS_MAX_ISA", None)
        else:
            os.environ["KT_OPS_MAX_ISA"] = old


@st.composite
def pack_calls(draw):
    e, i, h = draw(st.integers(0, 4)), draw(st.integers(0, 70)), draw(st.integers(0, 70))
    fault = draw(st.sampled_from([None, "dtype", "up_shape", "down_shape", "numa_nodes"]))
    numa = draw(st.integers(-3, 2000)) if fault == "numa_nodes" else draw(st.integers(0, 5))
    return e, i, h, fault, numa


@PROPERTY_SETTINGS
@given(pack_calls())
def test_pack_experts_packs_or_names_the_argument(p):
    e, i, h, fault, numa = p
    w_gate, w_up, w_down = torch.ones(e, i, h).bfloat16(), torch.ones(e, i, h).bfloat16(), torch.ones(e, h, i).bfloat16()
    expected = {"dtype": "w_gate", "up_shape": "w_up", "down_shape": "w_down", "numa_nodes": "numa_nodes"}
    if fault == "dtype":
        w_gate = w_gate.float()
    if fault == "up_shape":
        w_up = torch.ones(e, i + 1, h).bfloat16()
    if fault == "down_shape":
        w_down = torch.ones(e, h + 1, i).bfloat16()
    valid = fault is None or (fault == "numa_nodes" and 0 <= numa <= 1024)
    if i == 0 or h == 0:
        valid, expected[fault] = False, "w_gate"
    if valid:
        packed = kt_ops.pack_experts(w_gate, w_up, w_down, numa)
        assert packed.num_experts == e and packed.hidden_size == h and packed.intermediate_size == i
        assert float(packed.gate_up.float().sum() + packed.down.float().sum()) == 3 * e * i * h  # every weight once
        return
    with pytest.raises(RuntimeError) as err:
        torch.ops.kt.pack_experts(w_gate, w_up, w_down, numa)
    message = str(err.value).splitlines()[0]
    assert message.startswith("kt.pack_experts: ") and expected[fault] in message, message
