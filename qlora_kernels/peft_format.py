"""LoRA adapters in peft's on-disk format, both ways, without peft.

A peft LoRA adapter directory holds two files:

- ``adapter_model.safetensors``: for every adapted module at path ``p`` of the model,
  ``base_model.model.<p>.lora_A.weight`` ``[r, in_features]`` and
  ``base_model.model.<p>.lora_B.weight`` ``[out_features, r]`` (the ``base_model.model.``
  prefix is where peft's ``PeftModelForCausalLM`` keeps the wrapped model; the adapter name
  ``default`` is not part of the saved keys). Safetensors metadata ``{"format": "pt"}``.
- ``adapter_config.json``: ``peft_type`` ``"LORA"``, ``task_type``, ``r``, ``lora_alpha``,
  ``lora_dropout``, ``target_modules``, ``bias`` ``"none"``, ``rank_pattern`` /
  ``alpha_pattern`` (per-module exceptions to ``r`` / ``lora_alpha``; keys are regexes matched
  against the end of a module path), ``use_rslora`` (scaling ``alpha / sqrt(r)`` instead of
  ``alpha / r``), ``use_dora``, ``base_model_name_or_path`` and peft's other fields at their
  defaults.

:func:`save_adapter` writes this for every LoRA layer of a model (``LoRALinear4bit`` from
:mod:`qlora_kernels.nn`, or any module with ``lora_A`` / ``lora_B`` linears and ``r``,
``lora_alpha``, ``scaling``, ``lora_dropout`` attributes), so ``peft.PeftModel.from_pretrained``
loads it onto the float base model. :func:`load_adapter` reads an adapter saved by peft (or
by :func:`save_adapter`) into those layers.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from collections import Counter
from typing import Any

import torch
from torch import nn

from . import nn as qnn

ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_WEIGHTS_NAME_BIN = "adapter_model.bin"
ADAPTER_CONFIG_NAME = "adapter_config.json"
# peft's PeftModelForCausalLM wraps the model as `base_model` (a LoraModel) whose `model` is ours
KEY_PREFIX = "base_model.model."
# the peft release whose format this mirrors (the field layout of its LoraConfig)
PEFT_FORMAT_VERSION = "0.21.2"


def is_lora_layer(module: nn.Module) -> bool:
    """True for our LoRA layers: ``lora_A`` / ``lora_B`` linears plus ``r`` and ``scaling``."""
    return (isinstance(getattr(module, "lora_A", None), nn.Linear)
            and isinstance(getattr(module, "lora_B", None), nn.Linear)
            and hasattr(module, "r") and hasattr(module, "scaling"))


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model under ``torch.compile`` (``_orig_mod``) and DDP/FSDP-style (``module``) wrappers,
    so that module paths are the model's own."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            model = inner
            continue
        inner = getattr(model, "module", None)
        if isinstance(inner, nn.Module) and type(model).__name__ in (
                "DistributedDataParallel", "DataParallel", "FullyShardedDataParallel"):
            model = inner
            continue
        return model


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``{module path: LoRA layer}`` in the model's module order."""
    return {name: m for name, m in unwrap_model(model).named_modules() if name and is_lora_layer(m)}


def _dropout_p(layer: nn.Module) -> float:
    p = getattr(layer, "lora_dropout", 0.0)
    if isinstance(p, nn.Module):  # an nn.Dropout / nn.Identity module rather than the float p
        p = getattr(p, "p", 0.0)
    return float(p)


def _effective_alpha(layer: nn.Module) -> float:
    """The alpha that gives the layer's scaling as ``alpha / r`` (its own ``lora_alpha`` when
    that is consistent; a layer loaded from an rsLoRA adapter has ``scaling = alpha / sqrt(r)``)."""
    r, scaling = int(layer.r), float(layer.scaling)
    alpha = getattr(layer, "lora_alpha", None)
    if alpha is not None and math.isclose(float(alpha) / r, scaling, rel_tol=1e-6):
        return alpha
    return scaling * r


def _most_common(values):
    return Counter(values).most_common(1)[0][0]


def _target_modules(model: nn.Module, paths: list[str]) -> list[str]:
    """peft's ``target_modules`` for exactly these module paths: the short names (``q_proj``)
    when every module of the model with such a name is adapted, as peft users write it;
    otherwise the full paths (peft matches an entry equal to a path, or a path ending in
    ``.<entry>``)."""
    names = sorted({p.rsplit(".", 1)[-1] for p in paths})
    chosen = set(paths)
    matched = {name for name, _ in model.named_modules()
               if name and qnn.name_matches(name, names)}
    return names if matched == chosen else sorted(paths)


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """peft's saved keys -> the LoRA weights (detached, contiguous, on the CPU, own dtype)."""
    out = {}
    for path, layer in lora_layers(model).items():
        for part in ("lora_A", "lora_B"):
            weight = getattr(layer, part).weight.detach()
            if weight.is_meta:
                raise ValueError(f"model: {path}.{part}.weight is on the meta device; materialize it first")
            out[f"{KEY_PREFIX}{path}.{part}.weight"] = weight.to("cpu", copy=True).contiguous()
    return out


def adapter_config(model: nn.Module, *, base_model_name_or_path: str | None = None,
                   task_type: str = "CAUSAL_LM") -> dict[str, Any]:
    """The ``adapter_config.json`` contents (a dict) for the model's LoRA layers."""
    model = unwrap_model(model)
    layers = lora_layers(model)
    if not layers:
        raise ValueError("model: has no LoRA layers (add them with qlora_kernels.add_lora)")
    ranks = {p: int(m.r) for p, m in layers.items()}
    alphas = {p: _effective_alpha(m) for p, m in layers.items()}
    r = _most_common(ranks.values())
    alpha = _most_common(alphas.values())
    # peft's rank_pattern / alpha_pattern keys are regexes matched as `(.*\.)?(key)$` against
    # a module path; an escaped full path matches that one module only.
    rank_pattern = {re.escape(p): v for p, v in ranks.items() if v != r}
    alpha_pattern = {re.escape(p): v for p, v in alphas.items() if v != alpha}
    if base_model_name_or_path is None:
        name = getattr(getattr(model, "config", None), "_name_or_path", None) or None
        base_model_name_or_path = name if isinstance(name, str) else None
    # Field order and defaults as peft's LoraConfig writes them.
    return {
        "alora_invocation_tokens": None,
        "alpha_pattern": alpha_pattern,
        "arrow_config": None,
        "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path,
        "bias": "none",
        "corda_config": None,
        "ensure_weight_tying": False,
        "eva_config": None,
        "exclude_modules": None,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "kasa_config": None,
        "layer_replication": None,
        "layers_pattern": None,
        "layers_to_transform": None,
        "loftq_config": {},
        "lora_alpha": alpha,
        "lora_bias": False,
        "lora_dropout": _most_common(_dropout_p(m) for m in layers.values()),
        "lora_ga_config": None,
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "modules_to_save": None,
        "monteclora_config": None,
        "peft_type": "LORA",
        "peft_version": PEFT_FORMAT_VERSION,
        "qalora_group_size": 16,
        "r": r,
        "rank_pattern": rank_pattern,
        "revision": None,
        "target_modules": _target_modules(model, list(layers)),
        "target_parameters": None,
        "task_type": task_type,
        "trainable_token_indices": None,
        "use_bdlora": None,
        "use_dora": False,
        "use_qalora": False,
        "use_rslora": False,
        "velora_config": None,
    }


def save_adapter(model: nn.Module, out_dir: str | os.PathLike, *,
                 base_model_name_or_path: str | None = None, task_type: str = "CAUSAL_LM") -> str:
    """Writes the model's LoRA layers to ``out_dir`` as peft does (``adapter_model.safetensors``,
    ``adapter_config.json``); ``peft.PeftModel.from_pretrained(base, out_dir)`` loads it.

    Atomic: the files are written to a temporary directory next to ``out_dir`` and moved into
    place with ``os.replace``; a new ``out_dir`` appears whole. An existing ``out_dir`` keeps its
    other files (a trainer checkpoint's optimizer state, say); the weights are replaced before
    the config, each file atomically, so a reader that finds the new config finds the new
    weights. Returns ``out_dir``.
    """
    from safetensors.torch import save_file

    out_dir = os.fspath(out_dir)
    config = adapter_config(model, base_model_name_or_path=base_model_name_or_path, task_type=task_type)
    tensors = adapter_state_dict(model)
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out_dir))}.tmp-", dir=parent)
    try:
        save_file(tensors, os.path.join(tmp, ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
        with open(os.path.join(tmp, ADAPTER_CONFIG_NAME), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.write("\n")
        if not os.path.exists(out_dir):
            try:
                os.replace(tmp, out_dir)
                return out_dir
            except OSError:  # created meanwhile by someone else: fall through to the per-file move
                pass
        if not os.path.isdir(out_dir):
            raise ValueError(f"out_dir: {out_dir!r} exists and is not a directory")
        for name in (ADAPTER_WEIGHTS_NAME, ADAPTER_CONFIG_NAME):
            os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
        return out_dir
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------------------
def read_adapter(adapter_dir: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(config dict, state dict)`` of a peft adapter directory (safetensors, or peft's older
    ``adapter_model.bin``)."""
    adapter_dir = os.fspath(adapter_dir)
    config_path = os.path.join(adapter_dir, ADAPTER_CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"adapter_dir: no {ADAPTER_CONFIG_NAME} in {adapter_dir!r}")
    with open(config_path) as f:
        config = json.load(f)
    weights = os.path.join(adapter_dir, ADAPTER_WEIGHTS_NAME)
    if os.path.isfile(weights):
        from safetensors.torch import load_file

        state = load_file(weights)
    elif os.path.isfile(os.path.join(adapter_dir, ADAPTER_WEIGHTS_NAME_BIN)):
        state = torch.load(os.path.join(adapter_dir, ADAPTER_WEIGHTS_NAME_BIN), map_location="cpu",
                           weights_only=True)
    else:
        raise FileNotFoundError(f"adapter_dir: no {ADAPTER_WEIGHTS_NAME} (or {ADAPTER_WEIGHTS_NAME_BIN}) "
                                f"in {adapter_dir!r}")
    return config, state


def _pattern_value(patterns: dict, path: str, default):
    # peft's get_pattern_key: the first key that matches the end of the path at a '.' boundary
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def _check_config(config: dict) -> None:
    if config.get("peft_type") != "LORA":
        raise ValueError(f"adapter_dir: peft_type is {config.get('peft_type')!r}; only LORA adapters load")
    unsupported = {
        "use_dora": "DoRA", "lora_bias": "LoRA bias terms", "modules_to_save": "modules_to_save",
        "layer_replication": "layer_replication", "trainable_token_indices": "trainable tokens",
        "target_parameters": "target_parameters", "use_qalora": "QALoRA", "alora_invocation_tokens": "aLoRA",
    }
    for key, what in unsupported.items():
        if config.get(key):
            raise ValueError(f"adapter_dir: {ADAPTER_CONFIG_NAME} sets {key}={config[key]!r}; "
                             f"{what} is not supported by our LoRA layers")
    if config.get("bias", "none") != "none":
        raise ValueError(f"adapter_dir: bias={config['bias']!r}; only bias='none' adapters load")
    if config.get("fan_in_fan_out"):
        raise ValueError("adapter_dir: fan_in_fan_out=True (Conv1D-style weights) is not supported")


def _set_scaling(layer: nn.Module, path: str, alpha: float, scaling: float) -> None:
    layer.lora_alpha = alpha
    try:
        layer.scaling = scaling
    except AttributeError:  # scaling derived from lora_alpha / r: lora_alpha carries it then
        layer.lora_alpha = scaling * int(layer.r)
    if not math.isclose(float(layer.scaling), scaling, rel_tol=1e-6):
        raise RuntimeError(f"{path}: could not set the LoRA scaling to {scaling} (the layer reports {layer.scaling})")


def load_adapter(model: nn.Module, adapter_dir: str | os.PathLike, *, strict: bool = True) -> nn.Module:
    """Loads a peft LoRA adapter into the model's LoRA layers, in place; returns the model.

    Every module the adapter names must be one of our LoRA layers (``add_lora`` first) with the
    adapter's rank for it; a ``Linear4bit`` that is not one yet is turned into a
    ``LoRALinear4bit`` of the adapter's rank. The adapter's alpha (and rsLoRA scaling) replace the
    layer's. With ``strict`` (default), a LoRA layer of the model that the adapter does not
    cover is an error too. The weights are copied into the layers' existing parameters (their
    device and dtype stay), so an optimizer built on them keeps working.
    """
    config, state = read_adapter(adapter_dir)
    _check_config(config)
    model = unwrap_model(model)
    r_default = int(config.get("r", 8))
    alpha_default = config.get("lora_alpha", 8)
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    rslora = bool(config.get("use_rslora", False))

    weights: dict[str, dict[str, torch.Tensor]] = {}
    bad = []
    for key, tensor in state.items():
        m = re.fullmatch(r"base_model\.model\.(.+)\.(lora_A|lora_B)(?:\.[^.]+)?\.weight", key)
        if m is None:
            bad.append(key)
            continue
        weights.setdefault(m.group(1), {})[m.group(2)] = tensor
    if bad:
        raise ValueError(f"adapter_dir: {len(bad)} key(s) are not LoRA A/B weights of the form "
                         f"'{KEY_PREFIX}<module>.lora_A.weight': {bad[:5]}")

    modules = dict(model.named_modules())
    missing_modules = sorted(p for p in weights if p not in modules)
    if missing_modules:
        raise ValueError(f"adapter_dir: the adapter names {len(missing_modules)} module(s) the model does not "
                         f"have: {missing_modules[:5]}")
    for path, parts in weights.items():
        if set(parts) != {"lora_A", "lora_B"}:
            raise ValueError(f"adapter_dir: {path} has {sorted(parts)} but needs both lora_A and lora_B")

    targets: dict[str, nn.Module] = {}
    for path in weights:
        layer = modules[path]
        r = int(_pattern_value(rank_pattern, path, r_default))
        alpha = _pattern_value(alpha_pattern, path, alpha_default)
        if not is_lora_layer(layer):
            layer = _convert_to_lora(model, path, layer, r, alpha, float(config.get("lora_dropout", 0.0)))
        if int(layer.r) != r:
            raise ValueError(f"adapter_dir: {path} has rank {r} in the adapter, the model's layer has r={layer.r}")
        A, B = weights[path]["lora_A"], weights[path]["lora_B"]
        a_shape = (r, layer.lora_A.in_features)
        b_shape = (layer.lora_B.out_features, r)
        if tuple(A.shape) != a_shape or tuple(B.shape) != b_shape:
            raise ValueError(f"adapter_dir: {path}: lora_A {tuple(A.shape)} / lora_B {tuple(B.shape)}, the layer "
                             f"needs {a_shape} / {b_shape}")
        targets[path] = layer

    uncovered = sorted(p for p in lora_layers(model) if p not in weights)
    if strict and uncovered:
        raise ValueError(f"adapter_dir: the adapter has no weights for {len(uncovered)} LoRA layer(s) of the model: "
                         f"{uncovered[:5]} (pass strict=False to leave them as they are)")

    with torch.no_grad():
        for path, layer in targets.items():
            layer.lora_A.weight.copy_(weights[path]["lora_A"])
            layer.lora_B.weight.copy_(weights[path]["lora_B"])
            r = int(layer.r)
            alpha = _pattern_value(alpha_pattern, path, alpha_default)
            _set_scaling(layer, path, alpha, alpha / math.sqrt(r) if rslora else alpha / r)
    return model


def _convert_to_lora(model: nn.Module, path: str, layer: nn.Module, r: int, alpha, dropout: float) -> nn.Module:
    """Swaps a plain ``Linear4bit`` at ``path`` for a ``LoRALinear4bit`` of rank r."""
    if not isinstance(layer, qnn.Linear4bit):
        raise ValueError(f"adapter_dir: the adapter has weights for {path}, which is a "
                         f"{type(layer).__name__}, not a LoRA layer (apply qlora_kernels.add_lora first)")
    new = qnn.LoRALinear4bit.from_linear4bit(layer, r=r, alpha=alpha, dropout=dropout)
    qnn.set_submodule(model, path, new)
    return new
