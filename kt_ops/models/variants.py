"""What an experts module of transformers' experts interface computes, and whether the kt
kernels compute it.

``@use_experts_implementation`` records a module's layout on it (``is_concatenated``,
``is_transposed``, ``has_bias``, ``has_gate``, ``has_post_expert_norm``); the gate is the
class's ``_apply_gate`` (the interface's default: ``act_fn(gate) * up``, or the family's own)
and its activation ``act_fn``. These are read off the module, never from a list of names.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import nn
from torch.nn.utils import parametrize


@dataclass(frozen=True)
class ExpertsVariant:
    """One experts module's variant: its layout flags, ``gate`` ("default" or the name of the
    class whose ``_apply_gate`` it uses) and ``activation`` (the ``act_fn`` class name)."""

    concatenated: bool
    transposed: bool
    bias: bool
    gated: bool
    post_expert_norm: bool
    gate: str
    activation: str

    def describe(self) -> str:
        parts = ["gate/up " + ("concatenated" if self.concatenated else "interleaved"),
                 "transposed" if self.transposed else "[E, out, in]"]
        parts += [n for n, on in (("biases", self.bias), ("post-expert norm", self.post_expert_norm)) if on]
        parts.append(f"{self.activation}(gate) * up" if self.gated and self.gate == "default" else
                     f"{self.gate}._apply_gate" if self.gated else f"{self.activation}(up), no gate")
        return ", ".join(parts)

    def unsupported(self) -> Optional[str]:
        """Why the kt kernels cannot compute this variant, or None when they can."""
        if not self.gated:
            return "non-gated experts (act(up) without a gate)"
        if self.post_expert_norm:
            return "a norm after each expert"
        if self.bias:
            return "expert biases"
        if self.gate != "default":
            return f"the gate of {self.gate}._apply_gate"
        if self.activation not in SILU_ACTIVATIONS:
            return f"the activation {self.activation} (the kernels compute silu(gate) * up)"
        return None


# act_fn classes that compute SiLU: transformers' own and torch's.
SILU_ACTIVATIONS = ("SiLUActivation", "SiLU")


def is_interface_experts(module: nn.Module) -> bool:
    """Whether ``module`` is an experts module of transformers' experts interface (the
    decorator sets these attributes on every instance since its first version; later versions
    add more, such as ``has_post_expert_norm``)."""
    return all(hasattr(module, a) for a in ("has_gate", "is_concatenated", "is_transposed", "has_bias"))


def experts_variant(module: nn.Module) -> ExpertsVariant:
    """The variant of an experts module of transformers' experts interface."""
    from transformers.integrations.moe import _default_apply_gate

    owner = next(c for c in parametrize.type_before_parametrizations(module).__mro__ if "_apply_gate" in vars(c))
    gate = "default" if vars(owner)["_apply_gate"] is _default_apply_gate else owner.__name__
    return ExpertsVariant(concatenated=bool(module.is_concatenated), transposed=bool(module.is_transposed),
                          bias=bool(module.has_bias), gated=bool(module.has_gate),
                          post_expert_norm=bool(getattr(module, "has_post_expert_norm", False)), gate=gate,
                          activation=type(getattr(module, "act_fn", None)).__name__)
