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
