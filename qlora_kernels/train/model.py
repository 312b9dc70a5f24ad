"""Building the 4-bit base model one decoder layer at a time.

The model is first built on the meta device (no memory at all). Then each decoder layer in
turn is materialized on the target device — from the checkpoint's safetensors shards, or
with random weights for ``--model-config`` — and its ``nn.Linear`` layers are replaced by
NF4 + double-quant :class:`~qlora_kernels.nn.Linear4bit`, after which its 16-bit weights are
freed. So the 16-bit model never sits whole in memory: the peak is the 4-bit model plus one
16-bit layer. Embeddings, norms and the LM head stay in the compute dtype.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ..hf import enable_checkpointing  # noqa: F401  (re-exported for the loop and benchmarks)
from ..nn import Linear4bit
from .config import MODEL_SHAPES
from .tokenizer import ByteTokenizer, HFTokenizer  # noqa: F401  (re-exported for the loop)

INIT_STD = 0.02  # LLaMA's initializer_range


class ModelError(ValueError):
    """A model directory or config we cannot load; the message says what was expected."""


def llama_config(name: str, max_position_embeddings: int = 2048):
    """The ``LlamaConfig`` of a ``--model-config`` shape."""
    from transformers import LlamaConfig

    if name not in MODEL_SHAPES:
        raise ModelError(f"model_config: expected one of {sorted(MODEL_SHAPES)}, got {name!r}")
    shape = dict(MODEL_SHAPES[name])
    shape.setdefault("num_key_value_heads", shape["num_attention_heads"])
    return LlamaConfig(**shape, max_position_embeddings=max_position_embeddings, rms_norm_eps=1e-6,
                       tie_word_embeddings=False, use_cache=False)


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ``ModuleList`` of decoder layers and its qualified name (``model.layers`` for
    LLaMA, Mistral, Qwen2)."""
    n = getattr(model.config, "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n and n:
            return name, module
    raise ModelError(f"{type(model).__name__}: expected a list of {n} decoder layers (model.layers); "
                     "supported are decoder-only causal LMs such as LLaMA, Mistral and Qwen2")


def _set_tensor(root: nn.Module, qualified: str, tensor: torch.Tensor) -> None:
    parent_name, _, leaf = qualified.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    if leaf in parent._parameters:
        parent._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    else:
        parent._buffers[leaf] = tensor


def quantize_linears(module: nn.Module, *, quant_type: str, blocksize: int, double_quant: bool,
                     init=None) -> None:
    """Replaces every ``nn.Linear`` under ``module`` by a ``Linear4bit``, one at a time.

    ``init(name, linear)``, if given, first fills a Linear that is still on the meta device
    (random weights); each 16-bit weight is dropped as soon as it is quantized.
    """
    # names only: a list of the modules themselves would keep every replaced 16-bit Linear
    # alive until the end, i.e. the whole layer in 16 bits at once
    names = [name for name, child in module.named_modules() if isinstance(child, nn.Linear)]
    for name in names:
        linear = module.get_submodule(name)
        if init is not None:
            init(name, linear)
        q = Linear4bit.from_linear(linear, quant_type=quant_type, blocksize=blocksize, double_quant=double_quant)
        parent_name, _, leaf = name.rpartition(".")
        setattr(module.get_submodule(parent_name) if parent_name else module, leaf, q)
        del linear


def _rebuild_rotary(model: nn.Module, device) -> None:
    # rotary tables are non-persistent buffers computed in __init__ from the config: on the
    # meta device they are empty, so the modules are built again on the real device
    for name, module in list(model.named_modules()):
        if any(b.is_meta for b in module.buffers(recurse=False)) and hasattr(module, "config"):
            with torch.device(device):
                fresh = type(module)(config=module.config)
            parent_name, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, leaf, fresh)


def _check_materialized(model: nn.Module, what: str) -> None:
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise ModelError(f"{what}: no weights for {len(left)} tensors, e.g. {left[:3]}")


def _random_fill(module: nn.Module, device, dtype, gen) -> None:
    """Materializes the parameters of ``module`` still on the meta device: vectors (norm
    weights) to 1, matrices (embeddings, LM head) to N(0, 0.02)."""
    for qualified, p in list(module.named_parameters()):
        if p.is_meta:
            t = torch.empty(p.shape, dtype=dtype, device=device)
            t.fill_(1.0) if p.dim() == 1 else t.normal_(0.0, INIT_STD, generator=gen)
            _set_tensor(module, qualified, t)


def random_model(name: str, device, dtype: torch.dtype, seed: int, *, quant_type="nf4", blocksize=64,
                 double_quant=True, max_position_embeddings: int = 2048):
    """A LLaMA of shape ``name`` with random weights (``N(0, 0.02)``, norms 1), 4-bit linears."""
    from transformers import LlamaForCausalLM

    config = llama_config(name, max_position_embeddings)
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(dtype)
    device = torch.device(device)
    gen = torch.Generator(device)

    def init(_, linear):
        linear.to_empty(device=device)
        with torch.no_grad():
            linear.weight.normal_(0.0, INIT_STD, generator=gen)
            if linear.bias is not None:
                linear.bias.zero_()

    _, layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        gen.manual_seed(seed * 1_000_003 + i)  # each layer's weights depend only on (seed, layer)
        quantize_linears(layer, quant_type=quant_type, blocksize=blocksize, double_quant=double_quant, init=init)
        _random_fill(layer, device, dtype, gen)
    gen.manual_seed(seed * 1_000_003 + len(layers))
    _random_fill(model, device, dtype, gen)
    _rebuild_rotary(model, device)
    _check_materialized(model, f"model_config {name!r}")
    model.requires_grad_(False)
    return model


def _open_weights(path: str):
    """The checkpoint's tensors by name (hf.safetensors_weights), or a ModelError saying what
    was expected and, for other weight formats, how to convert them."""
    from ..hf import safetensors_weights

    try:
        return safetensors_weights(path)
    except FileNotFoundError as err:
        found = [f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth", ".gguf"))]
        hint = f" (found {found[:3]}: load it with transformers and save_pretrained(..., safe_serialization=True))" if found else ""
        raise ModelError(f"model: expected *.safetensors weights (one file, or shards with "
                         f"model.safetensors.index.json) in {path!r}{hint}") from err


def _read(weights, key: str, device, dtype: torch.dtype) -> torch.Tensor:
    t = weights[key]
    return t.to(device=device, dtype=dtype if t.dtype.is_floating_point else t.dtype)


def pretrained_model(path: str, device, dtype: torch.dtype, *, quant_type="nf4", blocksize=64,
                     double_quant=True):
    """A Hugging Face causal LM from a local directory, quantized layer by layer as it loads
    (the tokenizer is loaded separately, before it, so that bad data stops the run early)."""
    if not os.path.isdir(path):
        raise ModelError(f"model: expected a local directory holding a Hugging Face causal LM "
                         f"(config.json, *.safetensors, tokenizer files), got {path!r}: no such directory")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ModelError(f"model: expected {os.path.join(path, 'config.json')} (a directory written by "
                         "save_pretrained); it is missing")
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config).to(dtype)
    except (ValueError, KeyError, OSError) as err:
        raise ModelError(f"model: {path!r} is not a causal LM transformers can build "
                         f"(expected e.g. a LLaMA, Mistral or Qwen2 config.json): {err}") from err
    prefix, layers = decoder_layers(model)
    if not any(isinstance(m, nn.Linear) for m in layers[0].modules()):
        raise ModelError(f"model: {type(model).__name__}'s decoder layers have no nn.Linear projections; "
                         "expected a LLaMA-like architecture (LLaMA, Mistral, Qwen2)")
    weights = _open_weights(path)
    device = torch.device(device)

    def load(module: nn.Module, module_prefix: str) -> None:
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            key = module_prefix + name
            if t.is_meta and key in weights:
                _set_tensor(module, name, _read(weights, key, device, dtype))

    for i, layer in enumerate(layers):
        load(layer, f"{prefix}.{i}.")
        _check_materialized(layer, f"model: {path!r}, layer {i}")
        quantize_linears(layer, quant_type=quant_type, blocksize=blocksize, double_quant=double_quant)
    for qualified, t in list(model.named_parameters()):
        if t.is_meta and qualified in weights:
            _set_tensor(model, qualified, _read(weights, qualified, device, dtype))
    out = model.get_output_embeddings()
    if out is not None and out.weight.is_meta and getattr(config, "tie_word_embeddings", False):
        out.weight = model.get_input_embeddings().weight
    _rebuild_rotary(model, device)
    _check_materialized(model, f"model: {path!r}")
    model.requires_grad_(False)
    return model


def compile_decoder_layers(model: nn.Module) -> None:
    """``torch.compile`` every decoder layer in place.

    Eager HF decoder layers launch dozens of small kernels each (RMSNorm in float32, rotary,
    SiLU * up, residual adds), and on a fast GPU a 7B training step spends more time launching
    them than running them. Compiled, inductor fuses those elementwise chains and the Python per
    layer shrinks to one graph call; the QLoRA op enters the graph through its custom op.
    All layers run the same code with their parameters as graph inputs, so one compilation
    serves them all (shapes are made dynamic on the first new sequence length). It works under
    gradient checkpointing: the recomputation calls the same compiled layer.
    """
    _, layers = decoder_layers(model)
    for layer in layers:
        layer.compile()


def count_parameters(model: nn.Module) -> int:
    """Parameters of the base model (LoRA adapters excluded), counting each 4-bit weight as
    its unquantized element count."""
    total = 0
    for name, m in model.named_modules():
        if name.endswith((".lora_A", ".lora_B")):
            continue
        if isinstance(m, Linear4bit):
            total += m.in_features * m.out_features
        total += sum(p.numel() for p in m.parameters(recurse=False))
    return total
