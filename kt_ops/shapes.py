"""MoE layer shapes of real models, for examples, benchmarks and tests."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class MoeShape:
    """One model's MoE layer: hidden H, expert intermediate I, experts E, top-k K."""

    name: str
    hidden: int
    intermediate: int
    experts: int
    top_k: int
    shared_experts: int
    moe_layers: int
    arch: str

    @property
    def expert_bytes(self) -> int:
        """bf16 bytes of one layer's routed experts (gate, up and down)."""
        return 2 * 3 * self.experts * self.hidden * self.intermediate


def model_shapes() -> dict[str, MoeShape]:
    """All known shapes by name (``"qwen3-30b-a3b"``, ``"mixtral-8x7b"``, ...)."""
    raw = json.loads((Path(__file__).with_name("shapes.json")).read_text())
    return {
        name: MoeShape(name, s["H"], s["I"], s["E"], s["K"], s["shared"], s["moe_layers"], s["arch"])
        for name, s in raw.items()
        if not name.startswith("_")
    }


def model_shape(name: str) -> MoeShape:
    """The shape called ``name``; the error lists the known names."""
    shapes = model_shapes()
    if name not in shapes:
        raise KeyError(f"unknown model shape {name!r}; known: {', '.join(sorted(shapes))}")
    return shapes[name]
