"""Tiny random models of every supported MoE family, built from transformers config classes."""
from __future__ import annotations

import torch

VOCAB = 96


def tiny_config(family: str):
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    mla = dict(num_key_value_heads=4, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=3,
               n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16, qk_nope_head_dim=16,
               qk_rope_head_dim=8, v_head_dim=16, n_group=4, topk_group=2)
    if family == "qwen3_moe":
        return tf.Qwen3MoeConfig(**common, head_dim=16, moe_intermediate_size=32, num_experts=6,
                                 num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True)
    if family == "qwen2_moe":  # shared expert with a sigmoid gate; norm_topk_prob False
        return tf.Qwen2MoeConfig(**common, moe_intermediate_size=32, shared_expert_intermediate_size=48,
                                 num_experts=6, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[])
    if family == "mixtral":
        return tf.MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2)
    if family == "deepseek_v2":  # softmax scores, group-limited top-k, routed scaling
        return tf.DeepseekV2Config(**{**common, **mla}, q_lora_rank=None, topk_method="group_limited_greedy",
                                   routed_scaling_factor=1.5)
    if family == "deepseek_v3":  # sigmoid scores, correction bias, group-limited top-k
        return tf.DeepseekV3Config(**{**common, **mla}, q_lora_rank=24, routed_scaling_factor=2.5, norm_topk_prob=True)
    raise ValueError(family)


FAMILIES = ["qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v2", "deepseek_v3"]


def tiny_model(family: str, seed: int = 0):
    """An fp32 model whose expert weights are bf16-exact (kt_ops packs them to bf16), with a
    non-zero score correction bias where the family has one."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".experts." in name:
                p.copy_(p.bfloat16().float())
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.copy_(torch.randn_like(b) * 0.1)
    return model
