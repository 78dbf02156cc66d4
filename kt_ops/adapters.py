"""Adapters in PEFT's format: the experts' LoRA (and PEFT LoRA on other modules, and trained
routers) written and read as stock PEFT writes and reads them."""
from __future__ import annotations

import json
import math
import os
import re
import tempfile
from typing import Any, Union

import torch
from torch import nn

from kt_ops.experts import KtExperts
from kt_ops.files import read_json, replacing
from kt_ops.models.families import ROUTER, Family, family_of, moe_layers

# PEFT names of the fused expert parameters, in the order the experts modules define them.
# PEFT wraps the first one innermost (its keys carry "base_layer."), whatever the order in
# adapter_config.json.
FUSED_PARAMETERS = ("gate_up_proj", "down_proj")


ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"  # PEFT's file names


def lora_state_dict(model: nn.Module, *, gradients: bool = False) -> dict[str, torch.Tensor]:
    """The expert LoRA tensors as PEFT saves them for this model, fp32 on the CPU: keys and
    layouts of ``target_parameters`` LoRA on ``gate_up_proj`` / ``down_proj`` for fused
    experts, of ``target_modules`` LoRA on each expert's ``nn.Linear`` for per-expert lists.
    With ``gradients=True``, the same for the tensors' ``.grad`` (to compare with a PEFT
    model's gradients)."""
    _, family = family_of(model)
    out = {}
    for name, m in moe_layers(model).items():
        if not isinstance(m, KtExperts):
            raise ValueError(f"kt_ops: {name} is not patched (call kt_ops.patch_model first)")
        prefix = f"base_model.model.{_unwrapped_name(name)}."
        value = {n: (getattr(m, n).grad if gradients else getattr(m, n)) for n in m.lora_names}
        if m.per_expert:
            for e in range(m.num_experts):
                for proj, stem in zip(family.expert_linears, ("gate", "up", "down")):
                    for ab in "AB":
                        out[f"{prefix}{e}.{proj}.lora_{ab}.weight"] = value[f"lora_{stem}_{ab}"][e].detach().cpu().float()
            continue
        for depth, stem in enumerate(("gate_up", "down")):
            base = "base_layer." * (len(FUSED_PARAMETERS) - 1 - depth)
            out[prefix + base + "lora_A.weight"], out[prefix + base + "lora_B.weight"] = to_peft_layout(
                value[f"lora_{stem}_A"], value[f"lora_{stem}_B"])
    return out


def to_peft_layout(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """KtExperts' fused-layout A [E, r, in] and B [E, out, r] as PEFT's fused-experts
    ``lora_A.weight`` [E*r, in] (rows expert-major) and ``lora_B.weight`` [out, r*E] (column
    j*E + e is rank j of expert e); fp32 on the CPU."""
    e, r = a.shape[0], a.shape[1]
    a_w = a.detach().cpu().float().reshape(e * r, -1).contiguous()
    b_w = b.detach().cpu().float().permute(1, 2, 0).reshape(b.shape[1], r * e).contiguous()
    return a_w, b_w


def from_peft_layout(a_w: torch.Tensor, b_w: torch.Tensor, experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`to_peft_layout`: PEFT's fused-experts ``lora_A.weight`` [E*r, in] and
    ``lora_B.weight`` [out, r*E] as A [E, r, in] and B [E, out, r] (views)."""
    r = a_w.shape[0] // experts
    return a_w.reshape(experts, r, a_w.shape[1]), b_w.reshape(b_w.shape[0], r, experts).permute(2, 0, 1)


def _unwrapped_name(name: str) -> str:
    """A module path inside a PeftModel ("base_model.model.model.layers.0...") as inside the
    plain model ("model.layers.0...")."""
    return name[len("base_model.model."):] if name.startswith("base_model.model.") else name


def _per_expert_targets(family: Family, user_targets: Any) -> str:
    """PEFT ``target_modules`` regex matching every routed expert's linears exactly (not the
    shared experts' or dense layers' ones), plus the user's own targets."""
    experts = rf".*\.{re.escape(family.expert_list)}\.\d+\.({'|'.join(family.expert_linears)})"
    if not user_targets:
        return experts
    if isinstance(user_targets, str):  # already a regex
        return f"(?:{user_targets})|(?:{experts})"
    # PEFT's list matching: the module name is the target or ends with "." + target.
    return f"(?:(.*\\.)?({'|'.join(map(re.escape, sorted(user_targets)))}))|(?:{experts})"


def _is_peft_adapter(model: nn.Module) -> bool:
    """Whether the whole adapter of ``model`` is PEFT's (no KtExperts with LoRA of their own)."""
    from kt_ops.models.surgery import is_peft_model

    return is_peft_model(model) and not any(isinstance(m, KtExperts) for m in model.modules())


def _save_peft_adapter(model: nn.Module, out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    adapter = model.active_adapter
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".tmp-") as staging:
        model.save_pretrained(staging, selected_adapters=[adapter])
        # PEFT writes the default adapter at the top, any other in a directory of its name.
        written = staging if adapter == "default" else os.path.join(staging, adapter)
        for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
            with replacing(os.path.join(out_dir, name)) as tmp:
                os.replace(os.path.join(written, name), tmp)


def save_adapter(model: nn.Module, out_dir: Union[str, os.PathLike]) -> None:
    """Writes ``adapter_model.safetensors`` and ``adapter_config.json`` in PEFT's format, each
    file whole (a kill leaves the previous one), tensors first: a directory with a config
    always has the tensors that config describes.

    For the ``PeftModel`` :func:`kt_ops.patch_model` returns on transformers 5.x, this is
    PEFT's own ``save_pretrained`` of the active adapter, written atomically. For a 4.x model
    with :class:`KtExperts`, the experts' LoRA is written as stock PEFT writes it for the
    unpatched model (``target_modules`` LoRA on each expert's ``nn.Linear``), with PEFT LoRA
    on other modules if the model was wrapped with some, and trained routers as
    ``modules_to_save``; ``PeftModel.from_pretrained(unpatched_model, out_dir)`` loads it.
    """
    if _is_peft_adapter(model):
        _save_peft_adapter(model, os.fspath(out_dir))
        return
    import peft
    from safetensors.torch import save_file

    tensors = lora_state_dict(model)
    m = next(iter(moe_layers(model).values()))
    user_targets: Any = []
    if isinstance(model, peft.PeftModel):
        user_cfg = model.peft_config[model.active_adapter]
        if user_cfg.r != m.rank or user_cfg.lora_alpha != m.alpha:
            raise ValueError(f"kt_ops.save_adapter: PEFT LoRA on other modules has r={user_cfg.r}, "
                             f"alpha={user_cfg.lora_alpha}; the experts have r={m.rank}, alpha={m.alpha:g}. "
                             "One adapter file holds one r and alpha")
        user_targets = user_cfg.target_modules or []
        for k, v in peft.get_peft_model_state_dict(model).items():
            tensors[k] = v.detach().cpu().contiguous()
    routers = trained_routers(model)
    for block, gate in routers.items():
        for k, v in gate.state_dict().items():
            tensors[f"base_model.model.{block}.{ROUTER}.{k}"] = v.detach().cpu().contiguous()
    base = model.get_base_model() if isinstance(model, peft.PeftModel) else model
    _, family = family_of(base)
    if m.per_expert:
        targets = dict(target_modules=_per_expert_targets(family, user_targets))
    else:
        targets = dict(target_modules=sorted(user_targets) if not isinstance(user_targets, str) else user_targets,
                       target_parameters=[f"{family.experts}.{p}" for p in FUSED_PARAMETERS])
    if routers:  # PEFT's whole-module copies, saved as "<module>.<tensor>" as here; PEFT matches
        # names by suffix, so "mlp.gate" (not "gate", which would take shared_expert_gate too).
        targets["modules_to_save"] = sorted({".".join(b.split(".")[-1:] + [ROUTER]) for b in routers})
    # task_type CAUSAL_LM: what AutoPeftModelForCausalLM.from_pretrained(out_dir) reads to build the model.
    cfg = peft.LoraConfig(r=m.rank, lora_alpha=m.alpha, lora_dropout=0.0, **targets, task_type="CAUSAL_LM",
                          base_model_name_or_path=getattr(base.config, "_name_or_path", None) or None)
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    with replacing(os.path.join(out_dir, ADAPTER_WEIGHTS)) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".tmp-") as staging:
        cfg.save_pretrained(staging)  # PEFT's own serialisation of its config
        with replacing(os.path.join(out_dir, ADAPTER_CONFIG)) as tmp:
            os.replace(os.path.join(staging, ADAPTER_CONFIG), tmp)


# LoraConfig fields that change what an adapter computes in ways kt_ops's experts do not:
# refused rather than ignored.
_UNSUPPORTED_LORA = {"use_dora": "DoRA", "use_rslora": "rank-stabilised scaling", "lora_bias": "LoRA biases",
                     "rank_pattern": "per-module ranks", "alpha_pattern": "per-module alphas"}


def read_adapter_config(in_dir: Union[str, os.PathLike], caller: str = "kt_ops.load_adapter") -> dict[str, Any]:
    """``adapter_config.json`` of a PEFT LoRA adapter directory, checked: ``r`` a positive
    integer, ``lora_alpha`` a positive number, ``target_modules`` a string or a list of
    strings (or absent), ``target_parameters`` and ``modules_to_save`` lists of strings (or
    absent), and none of the options kt_ops's experts cannot compute (DoRA, rsLoRA, LoRA
    biases, per-module ranks or alphas). ValueError naming the file and the field otherwise."""
    path = os.path.join(os.fspath(in_dir), ADAPTER_CONFIG)
    cfg = read_json(path, caller)
    if not isinstance(cfg, dict):
        raise ValueError(f"{caller}: {path} must hold a JSON object, got {type(cfg).__name__}")

    def bad(field: str, expected: str) -> ValueError:
        return ValueError(f"{caller}: {path}: \"{field}\" must be {expected}, got {json.dumps(cfg.get(field))[:80]}")

    def is_number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    if not (isinstance(cfg.get("r"), int) and not isinstance(cfg["r"], bool) and cfg["r"] > 0):
        raise bad("r", "a positive integer")
    if not (is_number(cfg.get("lora_alpha")) and cfg["lora_alpha"] > 0):
        raise bad("lora_alpha", "a positive number")
    targets = cfg.get("target_modules")
    if not (targets is None or isinstance(targets, str)
            or (isinstance(targets, list) and all(isinstance(t, str) for t in targets))):
        raise bad("target_modules", "a string, a list of strings or null")
    for field in ("target_parameters", "modules_to_save"):
        value = cfg.get(field)
        if not (value is None or (isinstance(value, list) and all(isinstance(t, str) for t in value))):
            raise bad(field, "a list of strings or null")
    for field, what in _UNSUPPORTED_LORA.items():
        if cfg.get(field):
            raise ValueError(f"{caller}: {path}: \"{field}\" is set; kt_ops computes plain LoRA and cannot load "
                             f"{what}")
    return cfg


def _read_adapter_tensors(in_dir: str) -> dict[str, torch.Tensor]:
    """The adapter's tensors, each a finite floating-point tensor (ValueError naming the key)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = os.path.join(in_dir, ADAPTER_WEIGHTS)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"kt_ops.load_adapter: {path}: no such file")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"kt_ops.load_adapter: {path} is not a readable safetensors file ({e})") from None
    for key, t in tensors.items():
        if not t.is_floating_point():
            raise ValueError(f"kt_ops.load_adapter: {key} in {path} is {str(t.dtype).removeprefix('torch.')}; "
                             "adapter tensors must be floating point")
        if not torch.isfinite(t).all():
            raise ValueError(f"kt_ops.load_adapter: {key} in {path} holds NaN or infinite values")
    return tensors


def load_adapter(model: nn.Module, in_dir: Union[str, os.PathLike]) -> nn.Module:
    """Loads a PEFT-format adapter (written by :func:`save_adapter` or by PEFT itself) into
    a patched model; returns the model.

    Into the ``PeftModel`` :func:`kt_ops.patch_model` returns on transformers 5.x, the
    adapter's tensors must be those of the model's active adapter (its targets come from the
    patch: ``kt_ops.load_model(..., adapter=dir)`` builds the model from the adapter's own
    config); routers the adapter does not hold keep their values. Into a 4.x model with
    :class:`KtExperts`, the result is wrapped in a ``peft.PeftModel`` if the adapter has LoRA
    on other modules than the experts and ``model`` is not one yet.

    The layout is read from ``adapter_config.json`` (checked by
    :func:`read_adapter_config`): ``target_parameters`` LoRA on fused ``gate_up_proj`` /
    ``down_proj``, or per-expert ``target_modules`` LoRA (``experts.{e}.gate_proj`` ... as
    PEFT writes for transformers 4.x models). Either loads into either kind of patched model,
    except that fused 5.x experts share one A between gate and up, so a per-expert adapter
    whose gate and up A differ cannot load there. Rank, alpha and every tensor's shape must
    match the patched model, every expert LoRA tensor must be present, and every tensor must
    be finite floating point: a mismatch or a missing key raises an error naming it. Routers
    saved as ``modules_to_save`` are loaded in place; LoRA on other modules (attention, say)
    goes through PEFT; a tensor that none of these takes is an error too.

    All or nothing: everything is read and checked before the first value of the model is
    changed, so an adapter that does not fit leaves the model as it was.
    """
    in_dir = os.fspath(in_dir)
    cfg = read_adapter_config(in_dir)
    tensors = _read_adapter_tensors(in_dir)
    if _is_peft_adapter(model):
        return _load_peft_adapter(model, cfg, tensors)
    _, family = family_of(model)
    layers = moe_layers(model)
    for name, m in layers.items():
        if not isinstance(m, KtExperts):
            raise ValueError(f"kt_ops.load_adapter: {name} is not patched (call kt_ops.patch_model first)")
        if cfg["r"] != m.rank or float(cfg["lora_alpha"]) != m.alpha:
            raise ValueError(f"kt_ops.load_adapter: adapter has r={cfg['r']}, lora_alpha={cfg['lora_alpha']}; "
                             f"{name} has r={m.rank}, alpha={m.alpha:g}")
    targets = cfg.get("target_parameters") or []
    fused = [p for p in FUSED_PARAMETERS if any(t == p or t.endswith("." + p) for t in targets)]
    if fused and len(fused) != len(FUSED_PARAMETERS):
        raise ValueError(f"kt_ops.load_adapter: adapter targets {fused} only; the kt experts carry LoRA on "
                         f"{list(FUSED_PARAMETERS)}")

    # Plan: every value the model will take, read and checked; nothing is written yet.
    expert_values = {}
    for name, m in layers.items():
        values = (_read_fused(tensors, name, m) if fused else
                  _read_per_expert(tensors, name, (m.num_experts, m.hidden_size, m.intermediate_size, m.rank), family))
        m.check_lora(values, name)
        expert_values[name] = values
    saved_whole = cfg.get("modules_to_save") or []
    router_values = []
    for name in layers:
        block = name.rpartition(".")[0]
        router = f"{_unwrapped_name(block)}.{ROUTER}"
        if any(router.endswith(t) for t in saved_whole):  # PEFT's suffix match
            for k, v in model.get_submodule(block).get_submodule(ROUTER).state_dict().items():
                router_values.append((v, _take(tensors, f"base_model.model.{router}.{k}", tuple(v.shape))))
    other_lora = _plan_other_lora(model, cfg, tensors) if tensors else None

    # Apply: nothing below can fail on the adapter's contents.
    for name, m in layers.items():
        m.set_lora(expert_values[name])
    with torch.no_grad():
        for dst, value in router_values:
            dst.copy_(value)
    if other_lora is not None:
        model = other_lora()
    return model


def _load_peft_adapter(model: nn.Module, cfg: dict, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """load_adapter into a PeftModel: the file's tensors must be what the model's active
    adapter holds (names and shapes; whole modules such as routers may be left out, and keep
    their values); per-expert expert LoRA (PEFT's keys for a 4.x model) is first turned into
    the fused experts' keys."""
    import peft

    adapter = model.active_adapter
    mine = model.peft_config[adapter]
    if cfg["r"] != mine.r or float(cfg["lora_alpha"]) != float(mine.lora_alpha):
        raise ValueError(f"kt_ops.load_adapter: adapter has r={cfg['r']}, lora_alpha={cfg['lora_alpha']}; the model's "
                         f"adapter {adapter!r} has r={mine.r}, lora_alpha={mine.lora_alpha}")
    current = peft.get_peft_model_state_dict(model, adapter_name=adapter)
    expected = {k: tuple(v.shape) for k, v in current.items()}
    if not cfg.get("target_parameters"):
        tensors = _per_expert_to_fused(model, tensors, mine.r)
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise KeyError(f"kt_ops.load_adapter: unexpected keys {unexpected[:3]}: no module of the model takes them")
    # Whole modules the model trains (its routers) that the adapter does not hold keep their values.
    saved_whole = cfg.get("modules_to_save") or []
    missing = sorted(k for k in set(expected) - set(tensors)
                     if ".lora_" in k or any(k.rpartition(".")[0].endswith(t) for t in saved_whole))
    if missing:
        raise KeyError(f"kt_ops.load_adapter: missing key {missing[0]} (and {len(missing) - 1} more)")
    for key, t in tensors.items():
        if tuple(t.shape) != expected[key]:
            raise ValueError(f"kt_ops.load_adapter: {key} has shape {tuple(t.shape)}, expected {expected[key]}")
    peft.set_peft_model_state_dict(model, {**current, **tensors}, adapter_name=adapter)
    return model


def _per_expert_to_fused(model: nn.Module, tensors: dict[str, torch.Tensor], r: int) -> dict[str, torch.Tensor]:
    """``tensors`` with PEFT's per-expert LoRA keys of a transformers 4.x model
    (``...experts.{e}.gate_proj.lora_A.weight``) replaced by the keys and layout of PEFT's
    ``target_parameters`` LoRA on the same model's fused 5.x experts. Fused experts share
    one A between gate and up, so the two must be equal (ValueError otherwise)."""
    from peft.tuners.lora.layer import ParamWrapper

    from kt_ops.models.families import ARCHITECTURES
    from kt_ops.models.variants import experts_variant, interface_experts_shape

    family = ARCHITECTURES.get(getattr(model.config, "model_type", None))
    if family is None:
        return tensors
    tensors = dict(tensors)
    wrapper_keys: dict[str, dict[str, str]] = {}  # experts module path -> parameter -> key stem
    for name, m in model.named_modules():
        if isinstance(m, ParamWrapper):
            path = re.sub(r"(\.base_layer)+$", "", name)
            wrapper_keys.setdefault(path, {})[m.parameter_name] = name + "."
    for path, stems in wrapper_keys.items():
        experts = model.get_submodule(path)
        while "base_layer" in experts._modules:
            experts = experts.base_layer
        e, h, i = interface_experts_shape(experts)
        variant = experts_variant(experts)
        if not path.endswith("." + family.experts) or variant.transposed:
            continue
        if not any(k.startswith(_per_expert_prefix(path, family)) for k in tensors):
            continue
        a_g, b_g, a_u, b_u, a_d, b_d = _read_per_expert(tensors, path, (e, h, i, r), family)
        if not torch.equal(a_g, a_u):
            raise ValueError(f"kt_ops.load_adapter: {_unwrapped_name(path)}: gate and up have different lora_A; the "
                             "fused experts of this model share one A between gate and up (PEFT's target_parameters "
                             "LoRA on gate_up_proj)")
        b_gu = torch.cat([b_g, b_u], dim=1) if variant.concatenated else torch.stack([b_g, b_u], 2).flatten(1, 2)
        for param, (a, b) in (("gate_up_proj", (a_g, b_gu)), ("down_proj", (a_d, b_d))):
            if param not in stems:
                raise KeyError(f"kt_ops.load_adapter: the model has no LoRA on {path}.{param} for the adapter's "
                               "expert LoRA")
            tensors[stems[param] + "lora_A.weight"], tensors[stems[param] + "lora_B.weight"] = to_peft_layout(a, b)
    return tensors


def _plan_other_lora(model: nn.Module, cfg: dict, tensors: dict[str, torch.Tensor]):
    """Checks the adapter's PEFT LoRA on modules other than the experts (attention, say)
    against the model, and returns the function that loads it (wrapping ``model`` with PEFT
    first if it is not a PeftModel yet). Raises before any change if a key has no module to
    take it, a module PEFT would wrap has no tensors, or a shape differs."""
    import peft
    from peft.tuners.tuners_utils import check_target_module_exists

    r = cfg["r"]
    if isinstance(model, peft.PeftModel):
        expected = {k: tuple(v.shape) for k, v in peft.get_peft_model_state_dict(model).items()
                    if re.search(r"\.lora_[AB]\.", k)}
    else:
        if not cfg.get("target_modules"):
            raise KeyError(f"kt_ops.load_adapter: unexpected keys {sorted(tensors)[:3]}: the adapter has no "
                           "target_modules for them")
        matcher = peft.LoraConfig(r=r, target_modules=cfg["target_modules"])
        expected = {}
        for name, module in model.named_modules():
            if not name or isinstance(module, KtExperts) or not check_target_module_exists(matcher, name):
                continue
            if not isinstance(module, nn.Linear):
                raise ValueError(f"kt_ops.load_adapter: target_modules takes {name}, a {type(module).__name__}; "
                                 "kt_ops loads PEFT LoRA on nn.Linear modules only")
            expected[f"base_model.model.{name}.lora_A.weight"] = (r, module.in_features)
            expected[f"base_model.model.{name}.lora_B.weight"] = (module.out_features, r)
        if not expected:  # the targets name only the experts, say, which the patch replaced
            raise KeyError(f"kt_ops.load_adapter: unexpected keys {sorted(tensors)[:3]}: the adapter has no "
                           f"target_modules for them (its target_modules {cfg['target_modules']!r} match no module "
                           "of the model)")
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise KeyError(f"kt_ops.load_adapter: unexpected keys {unexpected[:3]}: no module of the model takes them")
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise KeyError(f"kt_ops.load_adapter: missing key {missing[0]} (and {len(missing) - 1} more)")
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape:
            raise ValueError(f"kt_ops.load_adapter: {key} has shape {tuple(tensors[key].shape)}, expected {shape}")

    def load() -> nn.Module:
        wrapped = model if isinstance(model, peft.PeftModel) else add_peft_lora(model, r, cfg["lora_alpha"],
                                                                                cfg["target_modules"])
        peft.set_peft_model_state_dict(wrapped, tensors)
        return wrapped

    return load


def add_peft_lora(model: nn.Module, rank: int, alpha: float, target_modules: Any) -> nn.Module:
    """``model`` wrapped by PEFT with LoRA on ``target_modules`` (attention, say), beside the
    experts' LoRA; what trained before (the experts' LoRA, the routers) still trains, where
    PEFT alone would freeze all but its own LoRA."""
    import peft

    trainable = [p for p in model.parameters() if p.requires_grad]
    model = peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0,
                                                       target_modules=target_modules))
    for p in trainable:
        p.requires_grad_(True)
    return model


def trained_routers(model: nn.Module) -> dict[str, nn.Module]:
    """``{MoE block name: router}`` for the routers with trainable parameters (block names as
    in the unwrapped model)."""
    out = {}
    for name in moe_layers(model):
        block = name.rpartition(".")[0]
        gate = model.get_submodule(block).get_submodule(ROUTER)
        if any(p.requires_grad for p in gate.parameters()):
            out[_unwrapped_name(block)] = gate
    return out


def _take(tensors: dict[str, torch.Tensor], key: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Removes and returns ``tensors[key]`` as fp32, checking its shape; what no reader takes
    is left over."""
    if key not in tensors:
        raise KeyError(f"kt_ops.load_adapter: missing key {key}")
    t = tensors.pop(key)
    if tuple(t.shape) != shape:
        raise ValueError(f"kt_ops.load_adapter: {key} has shape {tuple(t.shape)}, expected {shape}")
    return t.float()


def _read_fused(tensors: dict[str, torch.Tensor], name: str, m: KtExperts) -> list[torch.Tensor]:
    """(A_g, B_g, A_u, B_u, A_d, B_d) of one layer from PEFT's fused-experts keys."""
    prefix = f"base_model.model.{_unwrapped_name(name)}."
    e, r, h, i = m.num_experts, m.rank, m.hidden_size, m.intermediate_size
    pairs = []
    for depth, (fan_in, fan_out) in enumerate([(h, 2 * i), (i, h)]):
        base = "base_layer." * (len(FUSED_PARAMETERS) - 1 - depth)
        a_w = _take(tensors, prefix + base + "lora_A.weight", (e * r, fan_in))
        b_w = _take(tensors, prefix + base + "lora_B.weight", (fan_out, r * e))
        pairs.append(from_peft_layout(a_w, b_w, e))
    (a_gu, b_gu), (a_d, b_d) = pairs
    return [a_gu, b_gu[:, :i], a_gu, b_gu[:, i:], a_d, b_d]


def _per_expert_prefix(name: str, family: Family) -> str:
    """Where PEFT keeps the per-expert LoRA keys of the experts module at ``name``
    (``base_model.model.<layer>.<expert list>.``)."""
    layer = _unwrapped_name(name)
    for suffix in (family.experts, family.expert_list):
        if layer.endswith("." + suffix):
            layer = layer[: -len(suffix)]
            break
    return f"base_model.model.{layer}{family.expert_list}."


def _read_per_expert(tensors: dict[str, torch.Tensor], name: str, sizes: tuple[int, int, int, int],
                     family: Family) -> list[torch.Tensor]:
    """(A_g, B_g, A_u, B_u, A_d, B_d) of one layer of ``sizes`` (E, H, I, r) from PEFT LoRA
    keys on per-expert nn.Linear modules (``...experts.{e}.gate_proj.lora_A.weight``)."""
    prefix = _per_expert_prefix(name, family)
    e, h, i, r = sizes
    shapes = {"A": [(r, h), (r, h), (r, i)], "B": [(i, r), (i, r), (h, r)]}
    out = []
    for j, proj in enumerate(family.expert_linears):
        for ab in "AB":
            out.append(torch.stack([_take(tensors, f"{prefix}{x}.{proj}.lora_{ab}.weight", shapes[ab][j])
                                    for x in range(e)]))
    return out
