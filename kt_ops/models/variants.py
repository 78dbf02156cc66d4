"""What an experts module of transformers' experts interface computes, and whether the kt
kernels compute it.

``@use_experts_implementation`` records a module's layout on it (``is_concatenated``,
``is_transposed``, ``has_bias``, ``has_gate``, ``has_post_expert_norm``); the gate is the
class's ``_apply_gate`` (the interface's default: ``act_fn(gate) * up``, or the family's own)
and its activation ``act_fn``. These are read off the module, never from a list of names, and
the gate is matched to one the kt kernels compute by evaluating it.
"""
from __future__ import annotations

import itertools
import math
import weakref
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from torch.nn.utils import parametrize

from kt_ops.api import Gate
from kt_ops.reference import gate_reference


@dataclass(frozen=True)
class ExpertsVariant:
    """One experts module's variant: its layout flags, ``gate`` ("default" or the name of the
    class whose ``_apply_gate`` it uses), ``activation`` (the ``act_fn`` class name) and
    ``kernel_gate``, the :class:`kt_ops.Gate` that computes what its gate computes (None when
    none does). ``concatenated`` is how its gate splits the fused gate/up output: gate
    columns then up columns, or interleaved."""

    concatenated: bool
    transposed: bool
    bias: bool
    gated: bool
    post_expert_norm: bool
    gate: str
    activation: str
    kernel_gate: Optional[Gate]

    def describe(self) -> str:
        parts = ["gate/up " + ("concatenated" if self.concatenated else "interleaved"),
                 "transposed" if self.transposed else "[E, out, in]"]
        parts += [n for n, on in (("biases", self.bias), ("post-expert norm", self.post_expert_norm)) if on]
        if not self.gated:
            parts.append(f"{self.activation}(up), no gate")
        elif self.kernel_gate is None:
            parts.append(self._own_gate())
        else:
            parts.append(describe_gate(self.kernel_gate))
        return ", ".join(parts)

    def _own_gate(self) -> str:
        """The module's gate, by where it comes from."""
        return f"{self.gate}._apply_gate" if self.gate != "default" else f"{self.activation}(gate) * up"

    def unsupported(self) -> Optional[str]:
        """Why the kt kernels cannot compute this variant, or None when they can."""
        if not self.gated:
            return "non-gated experts (act(up) without a gate)"
        if self.post_expert_norm:
            return "a norm after each expert"
        if self.kernel_gate is None:
            gate = f"the gate of {self._own_gate()}" if self.gate != "default" else self._own_gate()
            return (f"{gate} (activation {self.activation}), which is none of the kernels' gates: "
                    "act(min(g, limit)) * (clamp(u, -limit, limit) + offset) with act silu(alpha v), gelu or "
                    "gelu_tanh")
        return None


def describe_gate(gate: Gate) -> str:
    """``gate`` as a formula, e.g. ``silu(gate) * up`` or ``(clamp(up, 7) + 1) * silu_1.702(min(gate, 7))``."""
    act = gate.activation if gate.alpha == 1 else f"{gate.activation}_{gate.alpha:g}"
    g = "gate" if gate.limit is None else f"min(gate, {gate.limit:g})"
    u = "up" if gate.limit is None else f"clamp(up, {gate.limit:g})"
    if gate.up_offset:
        u = f"({u} + {gate.up_offset:g})"
    return f"{act}({g}) * {u}"


def is_interface_experts(module: nn.Module) -> bool:
    """Whether ``module`` is an experts module of transformers' experts interface (the
    decorator sets these attributes on every instance since its first version; later versions
    add more, such as ``has_post_expert_norm``)."""
    return all(hasattr(module, a) for a in ("has_gate", "is_concatenated", "is_transposed", "has_bias"))


def interface_experts_shape(module: nn.Module) -> tuple[int, int, int]:
    """(E, H, I) of an experts module of transformers' experts interface, from its down
    projection's shape only (its weights may be on the meta device or packed)."""
    e, a, b = module.down_proj.shape
    return (e, b, a) if module.is_transposed else (e, a, b)


def experts_variant(module: nn.Module) -> ExpertsVariant:
    """The variant of an experts module of transformers' experts interface."""
    from transformers.integrations.moe import _default_apply_gate

    owner = next(c for c in parametrize.type_before_parametrizations(module).__mro__ if "_apply_gate" in vars(c))
    gate = "default" if vars(owner)["_apply_gate"] is _default_apply_gate else owner.__name__
    gated = bool(module.has_gate)
    found = _gate_of(module) if gated else None
    kernel_gate, concatenated = found if found is not None else (None, bool(module.is_concatenated))
    return ExpertsVariant(concatenated=concatenated, transposed=bool(module.is_transposed),
                          bias=bool(module.has_bias), gated=gated,
                          post_expert_norm=bool(getattr(module, "has_post_expert_norm", False)), gate=gate,
                          activation=type(getattr(module, "act_fn", None)).__name__, kernel_gate=kernel_gate)


# module -> (its numeric attributes, what _gate_of found for them): evaluated once per module,
# and again if an attribute such as its limit changes.
_GATE_CACHE: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _numeric_attributes(module: nn.Module) -> tuple:
    return tuple(sorted((k, float(v)) for k, v in vars(module).items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool)))


def _gate_of(module: nn.Module) -> Optional[tuple[Gate, bool]]:
    """The kernels' gate that computes the module's own ``_apply_gate``, and whether that
    splits its input concatenated (else interleaved); None when no gate does.

    Found by evaluation, not by name: every candidate, its parameters taken from the module's
    attributes whose names say ``limit`` or ``alpha``, is compared with ``_apply_gate`` on
    probe values that reach past every limit."""
    attrs = _numeric_attributes(module)
    cached = _GATE_CACHE.get(module)
    if cached is None or cached[0] != attrs:
        cached = _GATE_CACHE[module] = (attrs, _probe_gate(module, dict(attrs)))
    return cached[1]


def _probe_gate(module: nn.Module, attrs: dict[str, float]) -> Optional[tuple[Gate, bool]]:
    limits = [None] + sorted({v for k, v in attrs.items() if "limit" in k.lower() and 0 < v < math.inf})
    alphas = [1.0] + sorted({v for k, v in attrs.items() if "alpha" in k.lower() and 0 < v < math.inf} - {1.0})
    reach = 3 * max([4.0] + [v for v in limits if v is not None])
    gen = torch.Generator().manual_seed(0)
    g = torch.linspace(-reach, reach, 257).repeat(3, 1)
    u = (torch.rand(g.shape, generator=gen) * 2 - 1) * reach
    for concatenated in (True, False):
        probe = torch.cat([g, u], dim=-1) if concatenated else torch.stack([g, u], dim=-1).flatten(-2)
        try:
            with torch.no_grad():
                got = module._apply_gate(probe.clone())
        except Exception:  # a gate that takes other inputs is none of the kernels'
            continue
        if not isinstance(got, torch.Tensor) or got.shape != g.shape:
            continue
        got = got.float()
        for gate in itertools.starmap(Gate, itertools.product(("silu", "gelu", "gelu_tanh"), alphas, limits,
                                                                (0.0, 1.0))):
            if gate.alpha != 1.0 and gate.activation != "silu":
                continue
            want = gate_reference(g, u, gate)
            if torch.allclose(got, want, rtol=1e-5, atol=1e-5):
                return gate, concatenated
    return None
