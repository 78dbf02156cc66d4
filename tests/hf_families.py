"""Tiny models of every MoE family of transformers' experts interface, from each family's own
config class with its sizes shrunk (no hand-written config per family)."""
from __future__ import annotations

import torch

VOCAB = 96
TINY_POSITIONS = 128  # also the sliding window where one is needed: as long as any test sequence

# Size fields shared by many config classes, and the tiny value each gets where a config has it.
TINY = dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32, expert_intermediate_size=32,
            ffn_hidden_size=96, shared_expert_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, max_position_embeddings=TINY_POSITIONS,
            num_experts_per_tok=2, moe_topk=2, num_experts=4, n_routed_experts=4, num_local_experts=4,
            moe_num_experts=4, n_shared_experts=1, num_shared_experts=1, first_k_dense_replace=0,
            decoder_sparse_step=1, mlp_only_layers=[], kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8,
            qk_nope_head_dim=16, v_head_dim=16, n_group=1, topk_group=1, num_expert_group=1, num_experts_per_token=2, moe_k=2,
            mamba_n_heads=4, mamba_d_head=32, mamba_d_state=16, expert_ffn_hidden_size=32, num_layers=2,
            zero_expert_num=2, sliding_window=TINY_POSITIONS, pad_token_id=0, bos_token_id=1, eos_token_id=2)
# Fields a default config may leave None (each checkpoint's config sets them) that the
# families' code reads as numbers: they get the tiny value too.
REQUIRED = ("num_experts_per_tok", "first_k_dense_replace", "head_dim", "n_routed_experts", "n_shared_experts",
            "sliding_window")
# The same for a multimodal model's other towers (vision, audio) and their projectors onto the
# language model's hidden size: only their size, since the tests feed text alone.
TINY_TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, depth=1, num_attention_heads=2,
                  num_heads=2, num_key_value_heads=2, head_dim=16, out_hidden_size=TINY["hidden_size"],
                  text_hidden_size=TINY["hidden_size"], projection_hidden_dim=64, projection_intermediate_size=64,
                  encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64, d_model=32,
                  output_dim=TINY["hidden_size"], downsample_hidden_size=32)
# Sub-configs that hold a multimodal model's language model.
TEXT_CONFIGS = ("text_config", "language_config", "llm_config")
MAX_PARAMS = 30_000_000


def shrink(config) -> None:
    """Sets every size field of ``config`` (and of its sub-configs) that it has to a tiny value,
    keeping the structure (attention kinds, MoE layers) the family needs."""
    for name, sub in list(vars(config).items()):
        if sub is config or not hasattr(sub, "to_dict"):
            continue
        if name in TEXT_CONFIGS:
            shrink(sub)
        else:
            for key, value in TINY_TOWER.items():
                if isinstance(vars(sub).get(key), int) and not isinstance(vars(sub)[key], bool):
                    setattr(sub, key, value)
    # Families whose attention has as many key/value heads as query heads (multi-head latent
    # attention, say) need that kept.
    same_heads = vars(config).get("num_key_value_heads") == vars(config).get("num_attention_heads")
    for key, value in TINY.items():
        if key == "head_dim" and getattr(config, "qk_rope_head_dim", None) is not None:
            value = TINY["qk_rope_head_dim"]  # multi-head latent attention: head_dim is the rope part
        if key == "num_key_value_heads" and same_heads:
            value = TINY["num_attention_heads"]
        if key in vars(config) and (getattr(config, key) is not None or key in REQUIRED):
            current = getattr(config, key)
            if isinstance(current, list) and not isinstance(value, list):  # one size per modality
                value = [value] * len(current)
            try:
                setattr(config, key, value)
            except AttributeError:  # a derived property (no setter)
                pass
    # Layer kinds set by period and offset (Jamba's attention every 8th layer from the 4th):
    # period 2 keeps a layer of each kind within the two layers.
    for key in [k for k in vars(config) if k.endswith("_layer_period")]:
        offset = key.replace("_period", "_offset")
        if isinstance(getattr(config, key), int) and isinstance(getattr(config, offset, None), int):
            setattr(config, offset, getattr(config, offset) % 2)
            setattr(config, key, 2)
    config.use_cache = False  # training forwards: no cache (some layer mixes have no attention layer to size one)
    if "qk_head_dim" in vars(config) and getattr(config, "qk_rope_head_dim", None) is not None:
        config.qk_head_dim = config.qk_nope_head_dim + config.qk_rope_head_dim  # derived when the config is made
    # Per-layer kinds (attention kinds, dense or sparse MLPs): one layer of each kind the
    # family has, in every such list, as many layers as the longest needs.
    kinds = {k: list(dict.fromkeys(v)) for k, v in vars(config).items()
             if k.endswith("layer_types") and isinstance(v, list) and v}
    if kinds:
        n = max([config.num_hidden_layers, *map(len, kinds.values())])
        config.num_hidden_layers = n
        for key, values in kinds.items():
            setattr(config, key, (values * n)[:n])


def tiny_config(model_type: str):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config = CONFIG_MAPPING[model_type]()
    shrink(config)
    return config


def tiny_model(model_type: str, seed: int = 0, **config_fields):
    """A tiny fp32 model of ``model_type`` whose expert weights are bf16-exact (kt packs them
    to bf16), with ``config_fields`` set on its shrunk config (a tokenizer's vocabulary, say).
    Raises ValueError if the shrunk config still makes a large model."""
    from kt_ops.models.families import _model_class

    config = tiny_config(model_type)
    for key, value in config_fields.items():
        setattr(config, key, value)
    model_class = _model_class(model_type)
    with torch.device("meta"):
        skeleton = model_class(config)
    size = sum(p.numel() for p in skeleton.parameters())
    if size > MAX_PARAMS:
        biggest = max(skeleton.named_parameters(), key=lambda kv: kv[1].numel())[0]
        raise ValueError(f"the shrunk config still has {size / 1e6:.0f}M parameters (largest: {biggest})")
    from kt_ops.models.variants import is_interface_experts

    if not any(is_interface_experts(m) for m in skeleton.modules()):
        raise ValueError("the shrunk config builds no routed experts")
    torch.manual_seed(seed)
    model = model_class(config).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".experts." in name:
                p.copy_(p.bfloat16().float())
    return model.eval()


def expert_targets(model) -> list[str]:
    """PEFT ``target_parameters`` for ``model``'s experts, in its own names (the experts
    module's last two path components and its parameters, e.g. ``mlp.experts.gate_up_proj``)."""
    from kt_ops.models.variants import is_interface_experts

    name, module = next((n, m) for n, m in model.named_modules() if is_interface_experts(m))
    stem = ".".join(name.split(".")[-2:])
    first = "gate_up_proj" if module.has_gate else "up_proj"
    return [f"{stem}.{first}", f"{stem}.down_proj"]
