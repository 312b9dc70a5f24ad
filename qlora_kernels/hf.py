"""Hugging Face integration: quantize any model's linears in place, bitsandbytes-4bit checkpoints
without bitsandbytes, and models that ``transformers.Trainer`` trains with our LoRA.

Nothing here imports bitsandbytes or peft. transformers and safetensors are imported where needed.

Typical use::

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)   # or load_quantized(bnb_dir)
    qk.quantize_model(model)                # every nn.Linear but lm_head -> Linear4bit, one at a time
    qk.add_lora(model, r=64, alpha=16)      # LoRA on every 4-bit linear, all else frozen
    qk.prepare_model_for_training(model)    # gradient checkpointing, input grads, use_cache off
    Trainer(model=model, args=TrainingArguments(..., bf16=True),
            callbacks=[qk.hf.SaveAdapterCallback()], ...).train()
    qk.save_adapter(model, "out/adapter")   # peft's format: PeftModel.from_pretrained loads it
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Mapping
from typing import Iterable

import torch
from torch import nn

from . import peft_format
from .nn import Linear4bit, name_matches, set_submodule
from .peft_format import load_adapter, save_adapter

__all__ = [
    "quantize_model", "load_quantized", "save_quantized", "prepare_model_for_training",
    "bnb_quantization_config", "SaveAdapterCallback", "save_adapter", "load_adapter", "empty_model",
]

_QUANT_KEY = re.compile(r"^(.*)\.weight\.quant_state\.bitsandbytes__(nf4|fp4)$")


def bnb_quantization_config(quant_type: str = "nf4", double_quant: bool = True,
                            compute_dtype: torch.dtype = torch.bfloat16,
                            skip_modules: Iterable[str] | None = None) -> dict:
    """The ``quantization_config`` dict transformers writes to config.json for
    ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=..., bnb_4bit_use_double_quant=...)``
    (transformers 5.x field set). A plain dict: nothing imports bitsandbytes for it."""
    return {
        "_load_in_4bit": True,
        "_load_in_8bit": False,
        "bnb_4bit_compute_dtype": str(compute_dtype).removeprefix("torch."),
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": quant_type,
        "bnb_4bit_use_double_quant": bool(double_quant),
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_skip_modules": sorted(skip_modules) if skip_modules else None,
        "llm_int8_threshold": 6.0,
        "load_in_4bit": True,
        "load_in_8bit": False,
        "quant_method": "bitsandbytes",
    }


def _float_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.bfloat16


def _record_quantization_config(model: nn.Module, quant_type: str, double_quant: bool, skipped: list[str]) -> None:
    """Writes bitsandbytes' quantization_config (a plain dict) on ``model.config``.

    Why: our Linear4bit state dict *is* bitsandbytes' layout, so with this entry
    ``model.save_pretrained`` (also what Trainer checkpoints call) writes a directory that
    transformers + bitsandbytes load as the 4-bit model it is; without it, config.json would
    describe float linears over packed uint8 tensors. It is a dict, not a BitsAndBytesConfig,
    so nothing imports bitsandbytes; transformers reads it only in ``from_pretrained``. We set
    no ``hf_quantizer`` / ``is_quantized`` on the model: those are what make Trainer refuse a
    quantized model without a peft wrapper and make ``.to()`` / ``.half()`` raise.
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return
    skip = sorted({name.rsplit(".", 1)[-1] for name in skipped}) or None
    config.quantization_config = bnb_quantization_config(quant_type, double_quant, _float_dtype(model), skip)


def quantize_model(model: nn.Module, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True,
                   skip: Iterable[str] = ("lm_head",), *, weights: Mapping[str, torch.Tensor] | None = None,
                   device=None) -> nn.Module:
    """Swaps every ``nn.Linear`` of ``model`` (a module path ending in one of ``skip`` excepted)
    for :class:`qlora_kernels.nn.Linear4bit`, in place; returns the model.

    Layers are quantized one at a time where their weight lives, and each float weight is
    released as soon as its layer is swapped, so the extra memory is about one layer. Linears
    inside our own 4-bit / LoRA layers (LoRA A and B) are left alone.

    A model built on the meta device (``with torch.device("meta"):`` or :func:`empty_model`) is
    materialized as it goes: pass ``weights``, a mapping from state-dict keys to tensors (it may
    be lazy, e.g. :func:`safetensors_weights`), and ``device``; each meta linear is filled from
    ``weights[<path>.weight]`` on ``device``, quantized there, and its float weight dropped;
    every other meta parameter or buffer is then taken from ``weights`` too. Peak memory is the
    4-bit model plus one float layer.

    ``model.config`` (transformers models) gets bitsandbytes' ``quantization_config`` (see
    :func:`bnb_quantization_config`) so that ``save_pretrained`` writes a checkpoint
    transformers + bitsandbytes load; ``generate()`` keeps working.
    """
    skip = tuple(skip or ())
    if weights is not None and not isinstance(weights, Mapping):
        raise TypeError(f"weights: expected a mapping of state-dict keys to tensors, got {type(weights).__name__}")
    device = torch.device(device) if device is not None else None
    inside_ours = []
    todo, skipped = [], []
    for name, module in model.named_modules():
        if isinstance(module, Linear4bit) or peft_format.is_lora_layer(module):
            inside_ours.append(name + ".")
            continue
        if not isinstance(module, nn.Linear) or any(name.startswith(p) for p in inside_ours):
            continue
        (skipped if name_matches(name, skip) else todo).append(name)
    for name in todo:
        linear = model.get_submodule(name)
        if linear.weight.is_meta:
            linear = _materialize_linear(linear, name, weights, device)
        elif device is not None and linear.weight.device != device:
            linear = linear.to(device)
        set_submodule(model, name, Linear4bit.from_linear(linear, quant_type=quant_type, blocksize=blocksize,
                                                           double_quant=double_quant))
        del linear  # the float weight's last reference (the parent now holds the 4-bit layer)
    if weights is not None:
        _materialize_rest(model, weights, device)
        if device is not None:  # buffers built for real (rotary tables) join the rest
            model.to(device)
    _record_quantization_config(model, quant_type, double_quant, skipped)
    return model


def _materialize_linear(linear: nn.Linear, name: str, weights, device) -> nn.Linear:
    if weights is None:
        raise ValueError(f"model: {name}.weight is on the meta device; pass weights= (a mapping of its "
                         "state-dict keys to tensors) and device= to materialize it")
    target = device or torch.device("cpu")
    out = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
    for pname in ("weight", "bias"):
        if getattr(linear, pname) is None:
            continue
        key = f"{name}.{pname}"
        if key not in weights:
            raise KeyError(f"weights: no tensor for {key}")
        t = weights[key]
        expected = getattr(linear, pname)
        if tuple(t.shape) != tuple(expected.shape):
            raise ValueError(f"weights: {key} has shape {tuple(t.shape)}, the model needs {tuple(expected.shape)}")
        setattr(out, pname, nn.Parameter(t.to(target), requires_grad=False))
    return out


def _materialize_rest(model: nn.Module, weights, device) -> set[str]:
    """Fills the model's remaining meta parameters/buffers from ``weights``; returns the keys used
    (tied weights included)."""
    target = device or torch.device("cpu")
    consumed = set()
    for mod_name, module in model.named_modules():
        if isinstance(module, Linear4bit):
            continue
        for kind in ("_parameters", "_buffers"):
            for pname, t in list(getattr(module, kind).items()):
                if t is None or not t.is_meta:
                    continue
                key = f"{mod_name}.{pname}" if mod_name else pname
                if key not in weights:
                    continue  # tied weights are re-tied below; anything else is reported then
                value = weights[key].to(target)
                consumed.add(key)
                if tuple(value.shape) != tuple(t.shape):
                    raise ValueError(f"weights: {key} has shape {tuple(value.shape)}, the model needs {tuple(t.shape)}")
                if kind == "_parameters":
                    module._parameters[pname] = nn.Parameter(value.to(t.dtype), requires_grad=t.requires_grad)
                else:
                    module._buffers[pname] = value.to(t.dtype)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise KeyError(f"weights: no tensors for {len(left)} meta parameter(s)/buffer(s): {left[:5]}")
    consumed.update(k for k in weights if k in _tied_keys(model))
    return consumed


def _tied_keys(model: nn.Module) -> set[str]:
    """Names of parameters that share storage with an earlier one (tied embeddings)."""
    seen, tied = set(), set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if p.data_ptr() in seen and not p.is_meta:
            tied.add(name)
        seen.add(p.data_ptr())
    return tied


# ------------------------------------------------------------------------------------------------
# Building a model without allocating its parameters
@contextlib.contextmanager
def _params_on_meta():
    """Parameters created inside go to the meta device; buffers (rotary ``inv_freq`` and other
    non-persistent ones a checkpoint does not hold) are created for real, on the CPU."""
    original = nn.Module.register_parameter

    def register_parameter(module, name, param):
        original(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_parameter
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def empty_model(config, dtype: torch.dtype = torch.bfloat16, model_class=None) -> nn.Module:
    """A transformers model for ``config`` with its parameters on the meta device (no memory),
    buffers real; fill it with :func:`quantize_model` (``weights=``) or :func:`load_quantized`."""
    import transformers

    if model_class is None:
        arch = (getattr(config, "architectures", None) or [None])[0]
        model_class = getattr(transformers, arch, None) if arch else None
        if model_class is None:
            model_class = transformers.AutoModelForCausalLM
    with _params_on_meta():
        if hasattr(model_class, "from_config"):
            model = model_class.from_config(config, dtype=dtype)
        else:
            model = model_class._from_config(config, dtype=dtype)
    return model.eval()


class safetensors_weights(Mapping):
    """A lazy ``{key: tensor}`` over a checkpoint directory's safetensors: the shards listed by
    ``model.safetensors.index.json``, else ``model.safetensors``, else every ``*.safetensors``
    file there. Each tensor is read from disk when asked for; the files stay open."""

    def __init__(self, path: str | os.PathLike):
        from safetensors import safe_open

        path = os.fspath(path)
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.isfile(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
        elif os.path.isfile(os.path.join(path, "model.safetensors")):
            files, weight_map = ["model.safetensors"], None
        else:
            files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
            weight_map = None
            if not files:
                raise FileNotFoundError(f"path: no *.safetensors (one file, or shards with "
                                        f"model.safetensors.index.json) in {path!r}")
        self._handles = {f: safe_open(os.path.join(path, f), "pt") for f in files}
        if weight_map is None:
            weight_map = {k: f for f in files for k in self._handles[f].keys()}
        self._map = weight_map

    def __getitem__(self, key):
        return self._handles[self._map[key]].get_tensor(key)

    def __contains__(self, key):  # without reading the tensor, as Mapping's default would
        return key in self._map

    def __iter__(self):
        return iter(self._map)

    def __len__(self):
        return len(self._map)


# ------------------------------------------------------------------------------------------------
# bitsandbytes-4bit checkpoints
def _default_device(device):
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _device_from_map(device_map) -> torch.device:
    """The one device a transformers-style ``device_map`` names: ``"auto"`` / ``"balanced"`` /
    ``"sequential"`` (the current CUDA device, else the CPU: a model loaded here fits one
    device), a device (``"cuda:0"``, ``0``, ``torch.device``), or a dict whose values are all the
    same device (``{"": 0}``). A map over several devices raises: these layers are not split."""
    def one(d) -> torch.device:
        if isinstance(d, bool):  # a bool is an int: refuse it before the int case
            raise ValueError(f"device_map: expected a device, 'auto' or a dict, got {device_map!r}")
        try:
            return torch.device(f"cuda:{d}" if isinstance(d, int) else d)
        except (RuntimeError, TypeError):
            raise ValueError(f"device_map: expected a device, 'auto' or a dict of devices, got {device_map!r}") from None

    if isinstance(device_map, Mapping):
        devices = {str(one(d)) for d in device_map.values()}
        if len(devices) != 1:
            raise ValueError(f"device_map: expected one device (qlora_kernels loads the whole model onto "
                             f"one GPU), got {sorted(devices) or 'an empty map'}")
        return torch.device(devices.pop())
    if device_map in ("auto", "balanced", "balanced_low_0", "sequential"):
        return _default_device(None)
    return one(device_map)


def load_quantized(path: str | os.PathLike, device=None, dtype: torch.dtype = torch.bfloat16,
                   model_class=None, device_map=None) -> nn.Module:
    """Loads a transformers directory saved with ``BitsAndBytesConfig(load_in_4bit=True, ...)``
    (or by :func:`save_quantized`) into our ``Linear4bit`` layers, without bitsandbytes.

    The model is built from config.json with its parameters on the meta device; each linear the
    checkpoint stores in 4 bits (it has ``<path>.weight.quant_state.bitsandbytes__*``) becomes an
    empty Linear4bit that takes the packed bytes and quant state as they are (bit for bit), and
    every other tensor is read into place, cast to ``dtype``. One tensor is read at a time, on
    ``device`` (default: CUDA when available, else the CPU). ``model.config.quantization_config``
    is kept, so ``save_pretrained`` / :func:`save_quantized` write the same layout back.

    ``device_map`` takes what ``from_pretrained`` takes for a model on one device (``"auto"``,
    ``"cuda:0"``, ``{"": 0}``), in place of ``device``; the model's ``hf_device_map`` records it,
    as transformers does. A map over several devices raises ``ValueError``.
    """
    import transformers

    path = os.fspath(path)
    if device_map is not None:
        if device is not None:
            raise ValueError("device, device_map: give one of them, not both")
        device = _device_from_map(device_map)
    device = _default_device(device)
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype: expected float32, float16 or bfloat16, got {dtype}")
    config = transformers.AutoConfig.from_pretrained(path)
    qc = getattr(config, "quantization_config", None)
    if qc is not None and not isinstance(qc, dict):
        qc = qc.to_dict()
    if qc is not None and (qc.get("quant_method") != "bitsandbytes" or not qc.get("load_in_4bit", qc.get("_load_in_4bit"))):
        raise ValueError(f"path: {path!r} is quantized with {qc.get('quant_method')!r} "
                         f"(load_in_4bit={qc.get('load_in_4bit')}); only bitsandbytes 4-bit checkpoints load here")
    if qc is not None:
        del config.quantization_config  # so building the model does not reach for bitsandbytes
    weights = safetensors_weights(path)
    quantized = {}
    for key in weights:
        m = _QUANT_KEY.match(key)
        if m:
            quantized[m.group(1)] = m.group(2)
    if not quantized:
        raise ValueError(f"path: {path!r} has no 4-bit weights (no '*.weight.quant_state.bitsandbytes__nf4' keys)")

    model = empty_model(config, dtype=dtype, model_class=model_class)
    for name in quantized:
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"path: the checkpoint has a 4-bit weight for {name}, which the model does not have") from None
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"path: {name} is stored in 4 bits but is a {type(linear).__name__} in the model")
        # built on `device` at the checkpoint's sizes; load_state_dict swaps in its bytes as they are
        layer = Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                           weight_dtype=dtype, device=device)
        prefix = name + "."
        entries = {k[len(prefix):]: weights[k].to(device) for k in weights
                   if k.startswith(prefix + "weight") or k == prefix + "bias"}
        layer.load_state_dict(entries, strict=True)
        if layer.bias is not None:
            layer.bias.requires_grad_(False)
        set_submodule(model, name, layer)
    rest = _CastMapping(weights, dtype, skip=tuple(n + "." for n in quantized))
    consumed = _materialize_rest(model, rest, device)
    unexpected = sorted(set(rest) - consumed)
    if unexpected:
        raise ValueError(f"path: the checkpoint has {len(unexpected)} tensor(s) the model does not use: {unexpected[:5]}")
    for buf_owner in model.modules():
        for bname, buf in list(buf_owner._buffers.items()):
            if buf is not None and buf.device != device and not isinstance(buf_owner, Linear4bit):
                buf_owner._buffers[bname] = buf.to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    if qc is not None:
        model.config.quantization_config = qc
    try:
        model.generation_config = transformers.GenerationConfig.from_pretrained(path)
    except (OSError, ValueError):
        pass  # no generation_config.json: the one built from config stays
    if device_map is not None:
        # as from_pretrained(device_map=...) leaves it; Trainer reads it to tell one device from model parallel
        model.hf_device_map = {"": str(device)}
    return model


class _CastMapping(Mapping):
    """``weights`` without the keys under ``skip`` prefixes, floating tensors cast to ``dtype``
    when read (lazily: one tensor at a time)."""

    def __init__(self, weights: Mapping, dtype: torch.dtype, skip: tuple[str, ...] = ()):
        self._w, self._dtype = weights, dtype
        self._keys = [k for k in weights if not k.startswith(skip)] if skip else list(weights)
        self._key_set = set(self._keys)

    def __getitem__(self, key):
        if key not in self._key_set:
            raise KeyError(key)
        t = self._w[key]
        return t.to(self._dtype) if t.is_floating_point() else t

    def __contains__(self, key):
        return key in self._key_set

    def __iter__(self):
        return iter(self._keys)

    def __len__(self):
        return len(self._keys)


def _quantized_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict in bitsandbytes' layout, without LoRA weights (those go to an adapter)
    and without tied duplicates (safetensors refuses shared storage; transformers re-ties them)."""
    model = peft_format.unwrap_model(model)
    lora_prefixes = [f"{p}.{part}." for p in peft_format.lora_layers(model) for part in ("lora_A", "lora_B")]
    tied = _tied_keys(model)
    out, seen = {}, set()
    for key, t in model.state_dict().items():
        if key in tied or any(key.startswith(p) for p in lora_prefixes):
            continue
        t = t.detach().to("cpu").contiguous()
        # Layers share their code maps (one quant_map tensor for all NF4 layers); safetensors
        # refuses shared storage, and bitsandbytes wants each layer's own entry: copy repeats.
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[key] = t
    return out


def save_quantized(model: nn.Module, path: str | os.PathLike, max_shard_size: int = 5 * 2**30) -> str:
    """Writes a quantized model (from :func:`quantize_model` or :func:`load_quantized`) as
    transformers + bitsandbytes write a ``load_in_4bit`` model: config.json with bitsandbytes'
    ``quantization_config``, ``model.safetensors`` (or shards of at most ``max_shard_size`` bytes
    with ``model.safetensors.index.json``; a 4-bit layer's tensors stay in one shard) holding the
    packed weights and ``weight.absmax`` / ``quant_map`` / ``nested_*`` /
    ``quant_state.bitsandbytes__nf4`` entries. LoRA weights are not part of it (use
    :func:`save_adapter`). The directory is written next to ``path`` and moved into place.
    """
    from safetensors.torch import save_file

    path = os.fspath(path)
    inner = peft_format.unwrap_model(model)
    layers = [m for m in inner.modules() if isinstance(m, Linear4bit)]
    if not layers:
        raise ValueError("model: has no Linear4bit layers (quantize it with qlora_kernels.quantize_model first)")
    config = getattr(inner, "config", None)
    if config is None or not hasattr(config, "save_pretrained"):
        raise ValueError("model: needs a transformers config (model.config) to write config.json")
    quant_type = Counter(m.quant_type for m in layers).most_common(1)[0][0]
    double_quant = Counter(m.double_quant for m in layers).most_common(1)[0][0]
    inside_lora = tuple(p + "." for p in peft_format.lora_layers(inner))  # their lora_A / lora_B
    skipped = [n for n, m in inner.named_modules() if isinstance(m, nn.Linear) and not n.startswith(inside_lora)]
    config = copy.deepcopy(config)
    dtype = _float_dtype(inner)
    config.quantization_config = bnb_quantization_config(
        quant_type, double_quant, dtype, sorted({n.rsplit(".", 1)[-1] for n in skipped}) or None)
    config.dtype = dtype

    state = _quantized_state_dict(inner)
    # group keys by owning module so a 4-bit layer's entries never straddle two shards
    groups: dict[str, list[str]] = {}
    for key in state:
        m = re.match(r"^(.*?\.weight)(\..*)?$", key)
        groups.setdefault(m.group(1) if m and m.group(2) else key, []).append(key)
    shards, current, size = [], [], 0
    for keys in groups.values():
        nbytes = sum(state[k].numel() * state[k].element_size() for k in keys)
        if current and size + nbytes > max_shard_size:
            shards.append(current)
            current, size = [], 0
        current.extend(keys)
        size += nbytes
    shards.append(current)

    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(path))}.tmp-", dir=parent)
    try:
        config.save_pretrained(tmp)
        gen = getattr(inner, "generation_config", None)
        if gen is not None and hasattr(gen, "save_pretrained"):
            gen.save_pretrained(tmp)
        names = (["model.safetensors"] if len(shards) == 1 else
                 [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
        weight_map = {}
        for name, keys in zip(names, shards):
            save_file({k: state[k] for k in keys}, os.path.join(tmp, name), metadata={"format": "pt"})
            weight_map.update({k: name for k in keys})
        if len(shards) > 1:
            total = sum(t.numel() * t.element_size() for t in state.values())
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
                          f, indent=2)
        if not os.path.exists(path):
            os.replace(tmp, path)
            return path
        if not os.path.isdir(path):
            raise ValueError(f"path: {path!r} exists and is not a directory")
        for old in os.listdir(path):  # stale weights of an earlier save would shadow the new ones
            if old.endswith(".safetensors") or old == "model.safetensors.index.json":
                os.remove(os.path.join(path, old))
        for name in sorted(os.listdir(tmp), key=lambda n: n == "config.json"):  # config last
            os.replace(os.path.join(tmp, name), os.path.join(path, name))
        return path
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------------------
# Training with transformers.Trainer
def enable_checkpointing(model: nn.Module, **kwargs) -> None:
    """Gradient checkpointing of a transformers model's layers, non-reentrant unless ``kwargs``
    say otherwise, under either of transformers' names for it (``activation_checkpointing_enable``
    from 5.2x, ``gradient_checkpointing_enable`` before; the old name goes away in v6). A model
    with neither is left as it is.

    Non-reentrant checkpointing skips torch's determinism check unless ``kwargs`` ask for it
    (``determinism_check="default"``): the check compares the metadata of every tensor the
    recomputation saves again, ~10 ms of CPU a step for a 7B model on an H100 host, where the
    training step is bound by the CPU. Our recomputation is deterministic by construction: the
    dropout masks come from seeds drawn from the RNG state checkpointing restores."""
    kwargs = {"use_reentrant": False, **kwargs}
    if not kwargs["use_reentrant"]:
        kwargs.setdefault("determinism_check", "none")
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def prepare_model_for_training(model: nn.Module, use_gradient_checkpointing: bool = True,
                               gradient_checkpointing_kwargs: dict | None = None,
                               upcast_float_params: bool = False) -> nn.Module:
    """Readies a quantized (+ LoRA) transformers model for ``Trainer``, as peft's
    ``prepare_model_for_kbit_training`` does for bitsandbytes models; returns the model.

    - freezes every parameter but the LoRA A/B weights (so only they reach the optimizer);
    - with ``upcast_float_params``, casts the other fp16/bf16 parameters (norms, embeddings,
      lm_head) to float32 as peft does, for stability at the cost of memory;
    - gradient checkpointing (``use_reentrant=False`` unless told otherwise), ``use_cache`` off
      (a KV cache is useless in training and conflicts with checkpointing);
    - makes the embeddings' output require grad, which reentrant checkpointing needs for any
      gradient to reach the LoRA weights (harmless otherwise).
    """
    lora_params = {id(p) for layer in peft_format.lora_layers(model).values()
                   for p in (layer.lora_A.weight, layer.lora_B.weight)}
    for p in model.parameters():
        p.requires_grad_(id(p) in lora_params)
        if upcast_float_params and id(p) not in lora_params and p.dtype in (torch.float16, torch.bfloat16):
            p.data = p.data.float()
    if use_gradient_checkpointing:
        enable_checkpointing(model, **(gradient_checkpointing_kwargs or {}))
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "use_cache"):
        config.use_cache = False
    return model


class _SaveAdapterCallbackMixin:
    """Writes the LoRA adapter in peft's format into every checkpoint directory
    (``<output_dir>/checkpoint-<step>``) and, at the end of training, into
    ``<output_dir>/adapter`` (or ``final_dir``); ``PeftModel.from_pretrained`` loads either."""

    def __init__(self, final_dir: str | None = None, base_model_name_or_path: str | None = None):
        self.final_dir = final_dir
        self.base_model_name_or_path = base_model_name_or_path

    def _save(self, model, out_dir, state):
        if model is not None and getattr(state, "is_world_process_zero", True):
            save_adapter(model, out_dir, base_model_name_or_path=self.base_model_name_or_path)

    def on_save(self, args, state, control, model=None, **kwargs):
        self._save(model, os.path.join(args.output_dir, f"checkpoint-{state.global_step}"), state)
        return control

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._save(model, self.final_dir or os.path.join(args.output_dir, "adapter"), state)
        return control


_callback_class = None


def __getattr__(name):
    # SaveAdapterCallback subclasses transformers.TrainerCallback, built on first use so that
    # importing qlora_kernels does not import transformers.
    global _callback_class
    if name == "SaveAdapterCallback":
        if _callback_class is None:
            from transformers import TrainerCallback

            _callback_class = type("SaveAdapterCallback", (_SaveAdapterCallbackMixin, TrainerCallback),
                                   {"__doc__": _SaveAdapterCallbackMixin.__doc__, "__module__": __name__})
        return _callback_class
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
