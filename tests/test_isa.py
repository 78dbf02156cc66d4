"""kt_ops.isa() and the KT_OPS_MAX_ISA cap."""
import pytest

import kt_ops
from moe_case import ALL_ISAS


def test_isa_is_a_known_path():
    assert kt_ops.isa() in ALL_ISAS


@pytest.mark.parametrize("cap", ALL_ISAS)
def test_cap_never_raises_the_path(cap, monkeypatch):
    monkeypatch.delenv("KT_OPS_MAX_ISA", raising=False)
    best = kt_ops.isa()
    monkeypatch.setenv("KT_OPS_MAX_ISA", cap)
    got = kt_ops.isa()
    order = ALL_ISAS[::-1]  # scalar < avx2 < avx512 < amx
    assert order.index(got) == min(order.index(cap), order.index(best))


def test_scalar_is_always_available(monkeypatch):
    monkeypatch.setenv("KT_OPS_MAX_ISA", "scalar")
    assert kt_ops.isa() == "scalar"


@pytest.mark.parametrize("cap", ALL_ISAS)
def test_each_format_takes_the_best_path_it_has_under_the_cap(cap, monkeypatch):
    """int8 has AVX2 and scalar kernels: under any cap it takes the better of those that the
    bf16 path (the CPU's best under the cap) allows."""
    monkeypatch.setenv("KT_OPS_MAX_ISA", cap)
    order = ALL_ISAS[::-1]
    bf16 = kt_ops.isa("bf16")
    assert kt_ops.isa() == bf16
    assert kt_ops.isa("int8") == order[min(order.index(bf16), order.index("avx2"))]


def test_isa_names_an_unknown_format():
    with pytest.raises(RuntimeError, match='kt.isa: format must be one of bf16, int8, got "int3"'):
        kt_ops.isa("int3")
