"""kt_ops: LoRA fine-tuning of Mixture-of-Experts models with the routed experts on the CPU.

The expert kernels are PyTorch operators under ``torch.ops.kt`` (CPU, Meta and Autograd
implementations), so eager mode, autograd, activation checkpointing and
``torch.compile(fullgraph=True)`` all see ordinary ops. This package is the thin,
typed Python face of those ops.
"""
import torch  # noqa: F401  (loads libtorch, which the extension links against)

from kt_ops import _C  # noqa: F401  (registers torch.ops.kt.*)
from kt_ops.api import (NO_EXPERT, Gate, PackedExperts, experts_formats, isa, moe_sft, pack_expert_codes, pack_experts, topology,
                        weight_formats)
from kt_ops.adapters import load_adapter, save_adapter
from kt_ops.experts import KtExperts, register_experts_implementation
from kt_ops.gpu_share import choose_gpu_experts, count_routing, share_experts, shared_experts
from kt_ops.models.families import supported_families
from kt_ops.models.surgery import ExpertLoraConfig, patch_model
from kt_ops.weights import checkpoint_experts_format, load_experts, load_model

__all__ = ["NO_EXPERT", "ExpertLoraConfig", "Gate", "KtExperts", "PackedExperts", "checkpoint_experts_format",
           "choose_gpu_experts", "count_routing", "experts_formats", "isa", "load_adapter", "load_experts", "load_model",
           "moe_sft", "pack_expert_codes", "pack_experts", "patch_model", "save_adapter", "share_experts",
           "shared_experts", "supported_families", "topology", "weight_formats"]
__version__ = "0.1.0"

register_experts_implementation()  # experts_implementation="kt" in transformers
