"""Modules: ``Linear4bit``, a drop-in for ``torch.nn.Linear`` whose weight is stored in 4 bits.

The state dict uses bitsandbytes' keys and layout exactly (``weight`` packed uint8 ``[n, 1]``,
``weight.absmax``, ``weight.quant_map``, ``weight.nested_absmax``, ``weight.nested_quant_map``,
``weight.quant_state.bitsandbytes__nf4``, ``bias``), so a layer saved by one library loads
in the other.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import codes
from .functional import FLOAT_DTYPES, _check_format, dequantize_4bit, quantize_4bit
from .lora import matmul_4bit_lora
from .matmul import matmul_4bit, matmul_4bit_group, same_code_maps, same_format
from .quant_state import QuantState

class Linear4bit(nn.Module):
    """``y = x @ W.T + bias`` with W ``[out_features, in_features]`` frozen in 4 bits.

    Build one from a trained layer with :meth:`from_linear`, or construct it empty and
    ``load_state_dict`` a bitsandbytes-format state dict into it. The packed weight and its
    quant state are buffers (they move with ``.to()`` / ``.cuda()`` and never reach an
    optimizer); ``bias``, if any, is a regular parameter.

    ``forward`` takes ``x`` of shape ``[..., in_features]`` in bf16, fp16 or fp32 and returns
    x's dtype; see :func:`qlora_kernels.matmul_4bit` for which kernel serves which shape.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True,
                 weight_dtype: torch.dtype = torch.bfloat16, device=None):
        super().__init__()
        _check_format(quant_type, blocksize)
        if weight_dtype not in FLOAT_DTYPES:
            raise ValueError(f"weight_dtype: expected float32, float16 or bfloat16, got {weight_dtype}")
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.quant_type = quant_type
        self.blocksize = int(blocksize)
        self.double_quant = bool(double_quant)
        # The dtype W had before quantization (bitsandbytes records it in the quant state).
        self.weight_dtype = weight_dtype
        n = self.in_features * self.out_features
        nblocks = -(-n // self.blocksize)
        # Placeholders of the right shapes (load_state_dict or from_linear fills them).
        self.register_buffer("weight", torch.zeros(((n + 1) // 2, 1), dtype=torch.uint8, device=device),
                             persistent=False)
        if self.double_quant:
            self.register_buffer("absmax", torch.zeros(nblocks, dtype=torch.uint8, device=device), persistent=False)
            self.register_buffer("nested_absmax", torch.ones(-(-nblocks // codes.NESTED_BLOCKSIZE),
                                                             dtype=torch.float32, device=device), persistent=False)
            self.register_buffer("nested_quant_map", codes.dynamic_map().to(device), persistent=False)
            self.register_buffer("nested_offset", torch.zeros((), dtype=torch.float32, device=device),
                                 persistent=False)
        else:
            self.register_buffer("absmax", torch.ones(nblocks, dtype=torch.float32, device=device), persistent=False)
        self.register_buffer("quant_map", codes.code_tensor(quant_type).to(device), persistent=False)
        if bias:
            self.bias = nn.Parameter(torch.zeros(self.out_features, dtype=weight_dtype, device=device))
        else:
            self.register_parameter("bias", None)

    # ----------------------------------------------------------------------------------------
    @classmethod
    def from_linear(cls, linear: nn.Linear, quant_type: str = "nf4", blocksize: int = 64,
                    double_quant: bool = True) -> "Linear4bit":
        """Quantizes ``linear.weight`` on its device; the bias is kept as it is (a copy)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected a torch.nn.Linear, got {type(linear).__name__}")
        W = linear.weight.detach()
        if W.is_meta:
            raise ValueError("linear: its weight is on the meta device; materialize it before quantizing")
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    quant_type=quant_type, blocksize=blocksize, double_quant=double_quant,
                    weight_dtype=W.dtype, device="meta")
        packed, state = quantize_4bit(W, quant_type=quant_type, blocksize=blocksize, double_quant=double_quant)
        layer.set_quantized(packed, state)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
        return layer

    def set_quantized(self, packed: torch.Tensor, state: QuantState) -> None:
        """Replaces the stored weight by ``(packed, state)`` (shape must match the layer)."""
        if state.shape != (self.out_features, self.in_features):
            raise ValueError(f"state.shape: expected ({self.out_features}, {self.in_features}), got {tuple(state.shape)}")
        if state.nested != self.double_quant:
            raise ValueError(f"state: double quant is {state.nested}, the layer was built with double_quant={self.double_quant}")
        self.quant_type = state.quant_type
        self.blocksize = state.blocksize
        self.weight_dtype = state.dtype
        self._set_buffer("weight", packed)
        self._set_buffer("absmax", state.absmax)
        self._set_buffer("quant_map", state.code)
        if state.nested:
            self._set_buffer("nested_absmax", state.state2.absmax)
            self._set_buffer("nested_quant_map", state.state2.code)
            self._set_buffer("nested_offset", state.offset.reshape(()).to(torch.float32))

    def _set_buffer(self, name: str, tensor: torch.Tensor) -> None:
        # a buffer, not a plain attribute, so that .to() / .cuda() move it
        if name in self._buffers:
            self._buffers[name] = tensor
        else:
            self.register_buffer(name, tensor, persistent=False)

    @property
    def quant_state(self) -> QuantState:
        """The weight's quant state, a view of the buffers (built on each call: cheap)."""
        state2, offset = None, None
        if self.double_quant:
            state2 = QuantState(self.nested_absmax, None, self.nested_quant_map, codes.NESTED_BLOCKSIZE,
                                None, torch.float32)
            offset = self.nested_offset
        return QuantState(self.absmax, (self.out_features, self.in_features), self.quant_map,
                          self.blocksize, self.quant_type, self.weight_dtype, offset=offset, state2=state2)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W ``[out_features, in_features]`` in ``dtype`` (default: the dtype it was quantized from)."""
        return dequantize_4bit(self.weight, self.quant_state, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return matmul_4bit(x, self.weight, self.quant_state, self.bias)

    _QUANT_BUFFERS = ("weight", "absmax", "quant_map", "nested_absmax", "nested_quant_map", "nested_offset")

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16) / .half() cast every floating buffer; the quant state's
        # float32 absmax / code maps / offset must keep their dtype (the format stores them in
        # float32), so those buffers only follow the device change.
        saved = {n: self._buffers.pop(n) for n in self._QUANT_BUFFERS if n in self._buffers}
        try:
            super()._apply(fn, recurse)
        finally:
            for name, buf in saved.items():
                new = fn(buf) if buf is not None else None
                if new is not None and new.dtype != buf.dtype:
                    new = buf.to(new.device)
                self._buffers[name] = new
        return self

    # ----------------------------------------------------------------------------------------
    # bitsandbytes' state-dict layout
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.weight
        for key, value in self.quant_state.as_dict(packed=True).items():
            destination[prefix + "weight." + key] = value
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        weight_key = prefix + "weight"
        entries = {k[len(weight_key) + 1:]: v for k, v in state_dict.items() if k.startswith(weight_key + ".")}
        if weight_key not in state_dict:
            missing_keys.append(weight_key)
        elif not entries:
            error_msgs.append(
                f"{weight_key}: no quant state ({weight_key}.absmax, ...quant_state.bitsandbytes__nf4): "
                "this looks like an unquantized weight; load it into nn.Linear and use Linear4bit.from_linear")
        else:
            device = self.weight.device if not self.weight.is_meta else state_dict[weight_key].device
            try:
                state = QuantState.from_dict(entries, device=device)
                packed = state_dict[weight_key].to(device)
                if packed.dtype != torch.uint8:
                    raise ValueError(f"expected uint8 packed 4-bit data, got {packed.dtype}")
                if packed.numel() != (state.numel + 1) // 2:
                    raise ValueError(f"has {packed.numel()} bytes, the quant state's shape "
                                     f"{tuple(state.shape)} needs {(state.numel + 1) // 2}")
                self.double_quant = state.nested
                self.set_quantized(packed.reshape(-1, 1), state)
            except ValueError as err:
                error_msgs.append(f"{weight_key}: {err}")
        rest = {k: v for k, v in state_dict.items() if not k.startswith(weight_key)}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        dq = ", double_quant" if self.double_quant else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, {self.quant_type}, blocksize={self.blocksize}{dq}")


# ---------------------------------------------------------------------------------------------
# LoRA


def _check_lora_args(r, alpha, dropout) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"r: expected a positive int, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"alpha: expected a number, got {type(alpha).__name__}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout: expected a probability in [0, 1), got {dropout!r}")


class LoRALinear4bit(Linear4bit):
    """QLoRA's layer: ``y = x @ W.T + scaling * dropout(x) @ A.T @ B.T + bias``, W frozen in 4 bits.

    Submodules ``lora_A = nn.Linear(in_features, r, bias=False)`` and
    ``lora_B = nn.Linear(r, out_features, bias=False)`` hold the trainable A ``[r, in]`` and
    B ``[out, r]`` (float32 by default; cast to x's dtype inside the op, their gradients arrive in
    their own dtype). Initialized as peft: A kaiming-uniform(a=sqrt(5)), B zeros, so a new layer
    computes exactly what the 4-bit base does. ``scaling = lora_alpha / r``; ``lora_dropout`` (a
    float p) applies in training mode only. The forward/backward is
    :func:`qlora_kernels.matmul_4bit_lora`.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, r: int = 64,
                 lora_alpha: float = 16, lora_dropout: float = 0.1, lora_dtype: torch.dtype = torch.float32,
                 quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True,
                 weight_dtype: torch.dtype = torch.bfloat16, device=None):
        _check_lora_args(r, lora_alpha, lora_dropout)
        if lora_dtype not in FLOAT_DTYPES:
            raise ValueError(f"lora_dtype: expected float32, float16 or bfloat16, got {lora_dtype}")
        super().__init__(in_features, out_features, bias=bias, quant_type=quant_type, blocksize=blocksize,
                         double_quant=double_quant, weight_dtype=weight_dtype, device=device)
        self.r = int(r)
        self.lora_alpha = lora_alpha
        self.scaling = lora_alpha / r
        self.lora_dropout = float(lora_dropout)
        #: None: each call draws its dropout seed from torch's CPU generator. Or an int64
        #: tensor of one element on the weight's device that the dropout kernels read (set by
        #: ``qlora_kernels.train.graphs.GraphedStep``, which refreshes it before each replay).
        self.dropout_seed: torch.Tensor | None = None
        self.lora_A = nn.Linear(self.in_features, self.r, bias=False, device=device, dtype=lora_dtype)
        self.lora_B = nn.Linear(self.r, self.out_features, bias=False, device=device, dtype=lora_dtype)
        if not self.lora_A.weight.is_meta:
            self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """peft's initialization: A kaiming-uniform(a=sqrt(5)), B zeros."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int = 64, alpha: float = 16, dropout: float = 0.1,
                    quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True,
                    lora_dtype: torch.dtype = torch.float32) -> "LoRALinear4bit":
        """Quantizes ``linear`` (see :meth:`Linear4bit.from_linear`) and adds the adapter."""
        _check_lora_args(r, alpha, dropout)
        base = Linear4bit.from_linear(linear, quant_type=quant_type, blocksize=blocksize,
                                      double_quant=double_quant)
        return cls.from_linear4bit(base, r, alpha, dropout, lora_dtype=lora_dtype)

    @classmethod
    def from_linear4bit(cls, layer: Linear4bit, r: int = 64, alpha: float = 16, dropout: float = 0.1,
                        lora_dtype: torch.dtype = torch.float32) -> "LoRALinear4bit":
        """Adds an adapter to ``layer``; the new layer shares its 4-bit weight and bias."""
        if not isinstance(layer, Linear4bit):
            raise TypeError(f"layer: expected a qlora_kernels.nn.Linear4bit, got {type(layer).__name__}")
        device = layer.weight.device
        new = cls(layer.in_features, layer.out_features, bias=layer.bias is not None, r=r, lora_alpha=alpha,
                  lora_dropout=dropout, lora_dtype=lora_dtype, quant_type=layer.quant_type,
                  blocksize=layer.blocksize, double_quant=layer.double_quant,
                  weight_dtype=layer.weight_dtype, device="meta")
        new.set_quantized(layer.weight, layer.quant_state)
        new.bias = layer.bias
        new.lora_A.to_empty(device=device)
        new.lora_B.to_empty(device=device)
        new.reset_lora_parameters()
        new.train(layer.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.lora_dropout if self.training else 0.0
        return matmul_4bit_lora(x, self.weight, self.quant_state, self.lora_A.weight, self.lora_B.weight,
                                self.scaling, p, self.bias, seed=self.dropout_seed)

    @torch.no_grad()
    def merge(self, dtype: torch.dtype = torch.bfloat16) -> nn.Linear:
        """An ``nn.Linear`` (bf16 by default) with ``W + scaling * B @ A`` folded in (float32
        sum, one rounding), for export; this layer is left unchanged."""
        W = self.dequantize(torch.float32)
        W = W.addmm_(self.lora_B.weight.float(), self.lora_A.weight.float(), alpha=self.scaling)
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=W.device, dtype=dtype)
        linear.weight.copy_(W)
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", r={self.r}, lora_alpha={self.lora_alpha}, "
                f"lora_dropout={self.lora_dropout}")


def name_matches(name: str, suffixes) -> bool:
    """Whether module ``name`` is one of ``suffixes`` or ends in ``.<suffix>`` (matched at dot
    boundaries, as peft's target_modules and transformers' skip lists are)."""
    return any(name == s or name.endswith("." + s) for s in suffixes)


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    """Puts ``module`` at the dotted ``path`` under ``root`` (replacing what is there)."""
    parent, _, child = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def _matches(name: str, target) -> bool:
    if target == "all-linear":
        return name.split(".")[-1] != "lm_head"
    return name_matches(name, target)


def add_lora(model: nn.Module, r: int = 64, alpha: float = 16, dropout: float = 0.1,
             target="all-linear", lora_dtype: torch.dtype = torch.float32) -> nn.Module:
    """Replaces every matching :class:`Linear4bit` of ``model`` by a :class:`LoRALinear4bit`
    (sharing its 4-bit weight), freezes every parameter except the LoRA ones, and returns
    ``model`` (modified in place).

    ``target``: ``"all-linear"`` (every Linear4bit except ``lm_head`` and the model's output
    embedding) or a list of module-name suffixes (``["q_proj", "v_proj"]``), matched at dot
    boundaries. Layers that already carry an adapter are left as they are.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    _check_lora_args(r, alpha, dropout)
    if isinstance(target, str):
        if target != "all-linear":
            raise ValueError(f"target: expected \"all-linear\" or a list of module-name suffixes, got {target!r}")
    elif not isinstance(target, (list, tuple)) or not target or not all(isinstance(t, str) for t in target):
        raise ValueError(f"target: expected \"all-linear\" or a non-empty list of module-name suffixes, got {target!r}")
    output_layer = None
    if target == "all-linear" and hasattr(model, "get_output_embeddings"):
        output_layer = model.get_output_embeddings()
    chosen = [(name, module) for name, module in model.named_modules()
              if isinstance(module, Linear4bit) and not isinstance(module, LoRALinear4bit)
              and module is not output_layer and _matches(name, target)]
    if not chosen and not any(isinstance(m, LoRALinear4bit) for m in model.modules()):
        what = "4-bit linear layers (quantize the model first)" if target == "all-linear" else \
            f"Linear4bit layers named like {list(target)}"
        raise ValueError(f"target: model has no {what}")
    for name, module in chosen:
        set_submodule(model, name, LoRALinear4bit.from_linear4bit(module, r, alpha, dropout, lora_dtype=lora_dtype))
    for pname, param in model.named_parameters():
        param.requires_grad_(".lora_A." in f".{pname}" or ".lora_B." in f".{pname}")
    return model


# --- Decode: projections of one input in one launch -------------------------------------------

#: The projections ``fuse_projections`` groups by default: LLaMA / Mistral / Qwen2 attention and MLP.
DEFAULT_PROJECTION_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class ProjectionGroup(nn.Module):
    """Several layers applied to the same input, computed in one call: ``forward(x)`` returns
    their outputs as a list. For inference (batch-1 decode is launch-bound: q, k and v of a
    4096-wide model are 8 MB each, a few microseconds of bytes).

    * :class:`Linear4bit` layers (exactly that class, one 4-bit format, equal double-quant code
      maps) keep their own weights and run as one launch of the fused kernel
      (:func:`qlora_kernels.matmul.matmul_4bit_group`); bit for bit what each layer gives alone.
      (Layers replaced later, e.g. by ``add_lora``, are called one by one.)
    * ``nn.Linear`` layers (one dtype and device) are concatenated into one frozen weight: one
      GEMM, the outputs are column slices of it (for a fair bf16 baseline; the GEMM of the
      concatenation may round differently from the separate ones).

    The model keeps calling ``q_proj(x)``, ``k_proj(x)``, ... : :func:`fuse_projections` puts a
    member module in each place. The first member called computes every output and keeps them
    until each member has taken its own; a call with another input, a member asking a second
    time, or the same tensor modified in place (except under ``torch.compile`` and for
    inference-mode tensors, which have no version counter) recomputes. So the members must be
    called with the very same tensor, which is how LLaMA-style attention and MLP blocks call
    them; anything else is correct, just not faster.
    """

    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        if not 2 <= len(layers) <= 4:
            raise ValueError(f"layers: expected 2 to 4 layers, got {len(layers)}")
        if all(type(m) is Linear4bit for m in layers):
            states = [m.quant_state for m in layers]
            if not same_format(states):
                raise ValueError("layers: expected 4-bit layers of one format (K, quant type, blocksize, "
                                 "double quant)")
            if not same_code_maps(states):
                raise ValueError("layers: expected equal double-quant code maps")
            self.kind = "4bit"
            self.layers = nn.ModuleList(layers)
        elif all(type(m) is nn.Linear for m in layers):
            w = layers[0].weight
            if any(m.weight.shape[1] != w.shape[1] or m.weight.dtype != w.dtype or m.weight.device != w.device
                   for m in layers):
                raise ValueError("layers: expected nn.Linear layers of one in_features, dtype and device")
            if len({m.bias is None for m in layers}) != 1:
                raise ValueError("layers: expected all with a bias or all without")
            self.kind = "dense"
            with torch.no_grad():
                self.weight = nn.Parameter(torch.cat([m.weight for m in layers]), requires_grad=False)
                self.bias = (nn.Parameter(torch.cat([m.bias for m in layers]), requires_grad=False)
                             if layers[0].bias is not None else None)
        else:
            raise TypeError("layers: expected all Linear4bit or all nn.Linear, got "
                            f"{[type(m).__name__ for m in layers]}")
        self.out_features = [m.out_features for m in layers]
        self.in_features = layers[0].in_features
        self._outputs = None
        self._input = None
        self._input_version = None
        self._served = 0  # bit i: member i has taken its output of the kept set

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.kind == "dense":
            return list(torch.nn.functional.linear(x, self.weight, self.bias).split(self.out_features, dim=-1))
        if any(type(m) is not Linear4bit for m in self.layers):
            # a layer replaced after grouping (add_lora makes LoRALinear4bit): each its own call
            return [m(x) for m in self.layers]
        return matmul_4bit_group(x, [(m.weight, m.quant_state) for m in self.layers],
                                 [m.bias for m in self.layers], checked=True)

    def output(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Output ``index`` of the group for input ``x`` (what member ``index`` returns)."""
        # in-place changes are seen through the version counter, which neither traced nor
        # inference-mode tensors have; a member asking twice gets a fresh computation (never
        # the tensor it already has, which its caller may have changed)
        version = None if torch.compiler.is_compiling() or x.is_inference() else x._version
        if (self._outputs is None or self._input is not x or self._input_version != version
                or self._served & (1 << index)):
            self._outputs = self(x)
            self._input = x
            self._input_version = version
            self._served = 0
        out = self._outputs[index]
        self._served |= 1 << index
        if self._served == (1 << len(self._outputs)) - 1:  # every member served: keep no tensors
            self._outputs = None
            self._input = None
        return out

    def extra_repr(self) -> str:
        return f"kind={self.kind}, in_features={self.in_features}, out_features={self.out_features}"


class ProjectionGroupMember(nn.Module):
    """Stands where one layer of a :class:`ProjectionGroup` was: ``forward(x)`` is that layer's
    output, computed with the group's other layers."""

    def __init__(self, group: ProjectionGroup, index: int):
        super().__init__()
        object.__setattr__(self, "group", group)  # not a submodule: the group's parent owns it
        self.index = index
        self.in_features = group.in_features
        self.out_features = group.out_features[index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.output(self.index, x)

    def extra_repr(self) -> str:
        return f"output {self.index} of the group, in_features={self.in_features}, out_features={self.out_features}"


def fuse_projections(model: nn.Module, groups=DEFAULT_PROJECTION_GROUPS) -> int:
    """For inference: in every module of ``model`` that has all the children named in one of
    ``groups`` (by default q/k/v of attention and gate/up of the MLP), all :class:`Linear4bit`
    or all ``nn.Linear``, puts them in a :class:`ProjectionGroup` (a child named
    ``fused_<names>``, e.g. ``fused_q_k_v``) and each name's place is taken by a member that
    returns its output. Batch-1 decode then runs q, k and v as one kernel launch. Returns how
    many groups were made. The state dict changes (the weights move under the group), so fuse
    after loading, and for inference only: LoRA layers are not grouped, grouped ``nn.Linear``
    weights are frozen, and a grouped 4-bit layer needing gradients (of x or a bias) is called
    on its own."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    made = 0
    for parent in list(model.modules()):
        for names in groups:
            layers = [getattr(parent, n, None) for n in names]
            if any(not isinstance(m, nn.Module) for m in layers):
                continue
            try:
                group = ProjectionGroup(layers)
            except (TypeError, ValueError):
                continue  # mixed kinds or formats (a LoRA layer, a bias on one only): left alone
            parent.add_module("fused_" + "_".join(n.removesuffix("_proj") for n in names), group)
            for i, n in enumerate(names):
                setattr(parent, n, ProjectionGroupMember(group, i))
            made += 1
    return made
