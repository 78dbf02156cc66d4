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
    """Every format has kernels on every path: under any cap each takes the bf16 path, the
    CPU's best under the cap."""
    monkeypatch.setenv("KT_OPS_MAX_ISA", cap)
    bf16 = kt_ops.isa("bf16")
    assert kt_ops.isa() == bf16
    assert ALL_ISAS.index(bf16) >= ALL_ISAS.index(cap)
    for format in kt_ops.weight_formats():
        assert kt_ops.isa(format) == bf16, format


def test_isa_names_an_unknown_format():
    with pytest.raises(RuntimeError, match='kt.isa: format must be one of bf16, int8, int4, fp8, got "int3"'):
        kt_ops.isa("int3")
