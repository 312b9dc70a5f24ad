"""A training step's forward and backward as CUDA graphs, replayed per micro-batch.

On a fast GPU a QLoRA step is bound by the CPU that launches its kernels: a 7B model at 4 x 512
tokens launches thousands of kernels per step (LoRA products, norms, rotary, checkpoint
recomputation), and on an H100 host the step took ~370 ms of wall time for ~190 ms of GPU work.
A CUDA graph records those launches once and replays them with a single call.

:class:`GraphedStep` captures ``loss_fn(model, *inputs)`` and its ``backward()`` once per input
shape and replays it on each new micro-batch:

* The inputs are copied into static buffers the graph reads. The gradients accumulate into the
  parameters' existing ``.grad`` tensors, in place, exactly as an eager backward does, so the
  optimizer step, gradient clipping and accumulation over micro-batches stay as they are.
  Those tensors must stay put: zero them with ``zero_grad(set_to_none=False)``
  (:class:`~qlora_kernels.optim.PagedAdamW` keeps them as views of its flat buffer); a replay
  after they moved raises instead of writing into tensors nobody reads.
* LoRA dropout: a seed passed by value would be frozen into the graph, one mask forever. So
  every :class:`~qlora_kernels.nn.LoRALinear4bit` with dropout reads its seed from a slot of one
  device tensor (``dropout_seed``), refreshed from torch's CPU generator before each replay;
  the forward, the checkpoint recomputation and the backward all read the same slot, so they
  agree on the mask. The masks are as random as in eager mode, not the same ones.
* Gradient checkpointing is switched to ``preserve_rng_state=False``: the recomputation needs no
  RNG state any more (the seeds sit in the table), and reading the CUDA generator's state is
  not allowed during a capture.
* Each new shape is first run eagerly (``warmup`` times, on a side stream, with the gradients
  set aside and put back), so that compilation, cuBLAS workspaces and lazy initialization happen
  outside the capture. All graphs share one memory pool: only one runs at a time, and the loss a
  replay returns is copied out at once.

The memory the graphs hold (their pool) is about one step's activations, which an eager step
also needs at its peak; it stays reserved between steps.

Given the optimizer (``optimizer=``, a :class:`~qlora_kernels.optim.PagedAdamW` that pages part
of its state to the host), each graph waits, as the model's loop reaches a decoder layer, for
the optimizer's update of that layer's params, and before the backward for all of its work.
Then ``optimizer.step(defer_host_pages=True)`` can return at once and its host pages move over
PCIe while the next forward computes: a 65B model in 40 GiB saves ~100 ms of its ~130 ms of
paging a step this way. The waits are event-wait nodes on the optimizer's external events, recorded before
each replay, so a replay with nothing deferred waits for nothing.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn

from ..lora import draw_seed
from ..nn import LoRALinear4bit


def _tracing_but_not_capturing(tensor=None) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return (torch.compiler.is_compiling() or torch.jit.is_tracing()
            or isinstance(tensor, (torch.fx.Proxy, FakeTensor)))


@contextlib.contextmanager
def _eager_causal_masks():
    """transformers' causal-mask builder takes a CUDA graph capture for tracing (its
    ``is_tracing`` checks ``torch.cuda.is_current_stream_capturing()``): it then builds a full
    ``[batch, 1, seq, seq]`` mask tensor where eager mode passes no mask and SDPA's causal flag.
    The compiled decoder layers then see a mask input the warmup did not have, and recompile
    inside the capture, which fails; and attention with a mask tensor is slower. So the warmup
    and the capture run with the eager decisions:

    * ``is_tracing`` without the capture test (compiling and jit tracing still count);
    * no packed-sequence detection: eagerly it reads position ids back to the host (a sync the
      capture forbids) and finds, for batches that are not packed, nothing.

    An attention mask with padding still works (the mask tensor is built in both runs); its
    ``all ones`` shortcut reads the mask on the host and fails the capture with a message.
    Packed sequences (position ids restarting inside a row) are not supported."""
    try:
        from transformers import masking_utils
    except ImportError:
        yield
        return
    patches = {"is_tracing": _tracing_but_not_capturing, "find_packed_sequence_indices": lambda position_ids: None}
    originals = {name: getattr(masking_utils, name) for name in patches if hasattr(masking_utils, name)}
    for name in originals:
        setattr(masking_utils, name, patches[name])
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(masking_utils, name, fn)


def _recover_from_failed_capture(device: torch.device, stream) -> None:
    """What a capture that raised leaves behind in torch (2.11-2.14), undone so that eager
    work can go on: ``torch.cuda.graph`` does not leave its capture stream when ending the
    capture raises, and the CUDA generators registered at the capture's start stay marked as
    capturing, so the next random draw on the device fails ("Offset increment outside graph
    capture"). A fresh copy of a generator's state (same seed and offset) is not marked."""
    torch.cuda.set_stream(stream)
    generator = torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    if hasattr(generator, "graphsafe_set_state") and hasattr(generator, "clone_state"):
        generator.graphsafe_set_state(generator.clone_state())


# During a warmup or capture: id(decoder layer) -> the optimizer event to wait for before it runs,
# and the layers waited for so far. Set by _waits_before_layers.
_LAYER_WAITS: dict = {}
_LAYERS_WAITED: set = set()


class _WaitingLayers(nn.ModuleList):
    """The decoder layers' ModuleList while a step is captured: as the model's loop takes each
    layer from it (``for layer in self.layers[:n]``; a slice is a new list of this class), the
    current stream first waits for the optimizer's update of that layer's params. The wait
    sits in front of the layer's call, outside its compiled code (torch.compile would not keep
    a stream wait), and the checkpoint recomputation, which calls layers directly, needs none."""

    def __iter__(self):
        for layer in super().__iter__():
            event = _LAYER_WAITS.get(id(layer))
            if event is not None:
                torch.cuda.current_stream().wait_event(event)
                _LAYERS_WAITED.add(id(layer))
            yield layer


@contextlib.contextmanager
def _waits_before_layers(layers: nn.ModuleList | None, events: dict):
    if layers is None or not events:
        yield
        return
    original = type(layers)
    _LAYER_WAITS.clear()
    _LAYER_WAITS.update(events)
    _LAYERS_WAITED.clear()
    layers.__class__ = _WaitingLayers
    try:
        yield
    finally:
        layers.__class__ = original
        _LAYER_WAITS.clear()


class GraphCaptureError(RuntimeError):
    """A step could not be captured (it failed, or ``max_graphs`` shapes exist already);
    nothing ran, so the micro-batch can be run eagerly (:meth:`GraphedStep.eager`) instead."""


class GraphedStep:
    """``loss = loss_fn(model, *inputs); loss.backward()`` as a CUDA graph per input shape.

    ``params``: the trainable parameters (their ``.grad`` receive the gradients).
    ``loss_fn(model, *inputs)`` returns the scalar to differentiate; it must not synchronize
    with the host (no ``.item()``, no data-dependent Python branches) and must take every value
    that changes between calls as one of the tensor ``inputs`` (a Python number is frozen into
    the graph). Calling the object with CUDA tensors of the same shapes and dtypes as a previous
    call replays that call's graph; a new shape is captured first (``warmup`` eager runs, then
    the capture), at most ``max_graphs`` of them. Returns the loss, detached.

    ``optimizer``: the :class:`~qlora_kernels.optim.PagedAdamW` stepping ``params``, so that
    the graphs wait for its deferred host-page updates (see the module doc) and ``eager`` and
    captures wait for them first; then step it with ``step(defer_host_pages=True)``.

    From construction on, the model's LoRA layers read their dropout seeds from this object's
    table (see :meth:`close`). Before the first call, drop every reference to an earlier step's
    loss (``del loss``): a live autograd graph keeps the parameters' gradient accumulators bound
    to the stream it ran on, and the capture, which runs on a stream of its own, would then wait
    on that one.
    """

    def __init__(self, model: nn.Module, params, loss_fn: Callable[..., torch.Tensor], *, warmup: int = 2,
                 max_graphs: int = 16, generator: torch.Generator | None = None, optimizer=None):
        if not torch.cuda.is_available():
            raise RuntimeError("GraphedStep: CUDA graphs need a CUDA GPU")
        self.params = [p for p in params]
        if not self.params:
            raise ValueError("params: expected the trainable parameters, got none")
        devices = {p.device for p in self.params}
        if len(devices) != 1 or next(iter(devices)).type != "cuda":
            raise ValueError(f"params: expected parameters on one CUDA device, got {sorted(map(str, devices))}")
        if not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"warmup: expected a positive int (the eager runs before a capture), got {warmup!r}")
        if not isinstance(max_graphs, int) or max_graphs < 1:
            raise ValueError(f"max_graphs: expected a positive int, got {max_graphs!r}")
        if optimizer is not None and not all(hasattr(optimizer, a) for a in ("update_event", "wait_host_pages")):
            raise TypeError(f"optimizer: expected a qlora_kernels.optim.PagedAdamW (deferred host pages), got "
                            f"{type(optimizer).__name__}")
        self.model, self.loss_fn, self.optimizer = model, loss_fn, optimizer
        self.warmup, self.max_graphs, self.generator = warmup, max_graphs, generator
        self.device = next(iter(devices))
        self._graphs: dict = {}
        self._pool = None
        # decoder layers the latest capture waits in front of for the optimizer's deferred pages
        self.layer_waits = 0
        self._addresses: list[int] | None = None  # params' and grads' data_ptrs the graphs use
        # one device seed per LoRA layer with dropout, read by its kernels at replay time
        self._lora = [m for m in model.modules() if isinstance(m, LoRALinear4bit) and m.lora_dropout > 0]
        self._seeds = torch.zeros(len(self._lora), dtype=torch.int64, device=self.device)
        for i, m in enumerate(self._lora):
            m.dropout_seed = self._seeds[i]
        # seeds of the warmup runs: a generator of their own, so that when a shape gets captured
        # does not change the seeds (and the masks) of the steps that follow
        self._warmup_generator = torch.Generator().manual_seed(0x9E3779B9)
        if getattr(model, "is_gradient_checkpointing", False):
            from ..hf import enable_checkpointing

            enable_checkpointing(model, preserve_rng_state=False)

    def close(self) -> None:
        """Frees the graphs (and their memory pool) and gives the LoRA layers back their
        per-call seeds (``dropout_seed = None``). Until then they read this object's table,
        which only its calls refresh: train through them, not by calling the model directly."""
        self._graphs.clear()
        self._pool = None
        for m in self._lora:
            m.dropout_seed = None
        self._lora = []

    def _wait_optimizer(self) -> None:
        if self.optimizer is not None:
            self.optimizer.wait_host_pages()

    def _optimizer_waits(self):
        """(decoder layers, {id(layer): event}, done event, wait for everything up front):
        what a graph captured now waits on; None when nothing the optimizer does can be
        deferred (no optimizer, no step yet, or no host pages)."""
        opt = self.optimizer
        if opt is None or getattr(opt, "_buckets", None) is None:
            return None
        done = opt.update_done_event(self.device)
        if done is None or opt.update_event(self.params) is None:
            return None
        from .model import ModelError, decoder_layers

        try:
            _, layers = decoder_layers(self.model)
        except (ModelError, AttributeError):
            return None, {}, done, True
        if type(layers) is not nn.ModuleList:  # a subclass of its own: not swapped, waits up front
            return None, {}, done, True
        events, covered = {}, set()
        for layer in layers:
            mine = [p for p in layer.parameters() if p.requires_grad]
            covered.update(id(p) for p in mine)
            event = opt.update_event(mine) if mine else None
            if event is not None:
                events[id(layer)] = event
        # a trainable param outside the decoder layers whose state is paged (a trained LM head,
        # say): read before any layer wait covers it, so the graph waits for everything first
        outside = [p for p in self.params if id(p) not in covered]
        upfront = bool(outside) and opt.update_event(outside) is not None
        return layers, events, done, upfront

    @property
    def num_graphs(self) -> int:
        """How many shapes have been captured."""
        return len(self._graphs)

    def _refresh_seeds(self, generator) -> None:
        if self._lora:
            self._seeds.copy_(draw_seed(generator, count=len(self._lora)))

    def _current_addresses(self) -> list[int]:
        return [p.data_ptr() for p in self.params] + [0 if p.grad is None else p.grad.data_ptr() for p in self.params]

    def _check_addresses(self) -> None:
        if self._current_addresses() != self._addresses:
            raise RuntimeError(
                "GraphedStep: a parameter or its .grad is not the tensor the captured graphs write to "
                "(set to None by zero_grad(set_to_none=True), or replaced by an optimizer that flattens "
                "parameters); zero gradients with zero_grad(set_to_none=False), and create the GraphedStep "
                "after the optimizer's first step")

    def _check_inputs(self, inputs) -> tuple:
        for i, t in enumerate(inputs):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"inputs[{i}]: expected a tensor (a Python value would be frozen into the graph), "
                                f"got {type(t).__name__}")
        return tuple((tuple(t.shape), t.dtype) for t in inputs)

    def _capture(self, key, inputs):
        self._wait_optimizer()  # the warmup runs eagerly
        if len(self._graphs) >= self.max_graphs:
            raise GraphCaptureError(f"GraphedStep: already {len(self._graphs)} graphs (max_graphs) and a new "
                                    f"input shape {[list(s) for s, _ in key]}: pad the inputs to fewer distinct "
                                    "shapes, or run this one eagerly (GraphedStep.eager)")
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if self._addresses is None:
            self._addresses = self._current_addresses()
        self._check_addresses()
        static = [torch.empty_like(t, device=self.device) for t in inputs]
        for s, t in zip(static, inputs):
            s.copy_(t)
        # eager runs first, on a side stream (as torch.cuda.graph asks), with the real gradients
        # set aside: whatever compiles or initializes lazily does so here, not in the capture
        kept = [p.grad for p in self.params]
        waits = self._optimizer_waits()
        layers, events, done, upfront = waits if waits is not None else (None, {}, None, False)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with _eager_causal_masks(), _waits_before_layers(layers, events), torch.cuda.stream(side):
            for _ in range(self.warmup):
                for p in self.params:
                    p.grad = None
                self._refresh_seeds(self._warmup_generator)
                self.loss_fn(self.model, *static).backward()
            if events and set(_LAYERS_WAITED) != set(events):
                # the model did not take its layers from the list in a loop: no per-layer
                # waits, the graph waits for the whole update before it starts
                events, upfront = {}, True
        torch.cuda.current_stream(self.device).wait_stream(side)
        for p, g in zip(self.params, kept):
            p.grad = g
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()  # the warmup's blocks go back, for the graph's pool to take
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.current_stream(self.device)
        try:
            with _eager_causal_masks(), _waits_before_layers(layers, events), \
                    torch.cuda.graph(graph, pool=self._pool):
                if upfront:
                    torch.cuda.current_stream(self.device).wait_event(done)
                loss = self.loss_fn(self.model, *static)
                if done is not None:
                    # the backward writes the gradients the deferred updates read (and
                    # zero_grad zeroes behind them on the update stream)
                    torch.cuda.current_stream(self.device).wait_event(done)
                loss.backward()
                # only the value is kept: holding the autograd graph would keep its gradient
                # accumulators, bound to the capture's stream, alive past the capture
                loss = loss.detach()
        except Exception as err:
            _recover_from_failed_capture(self.device, stream)
            raise GraphCaptureError(
                f"GraphedStep: capturing the step for input shapes {[list(s) for s, _ in key]} failed "
                f"({type(err).__name__}: {err}). The loss function must not synchronize with the host (.item(), "
                "printing a tensor, data-dependent branches), and no earlier loss may still hold its autograd "
                "graph (del it after backward). Or train without CUDA graphs.") from err
        self._check_addresses()  # the capture accumulated into the same .grad tensors
        self.layer_waits = len(events)
        self._pool = graph.pool()
        entry = (graph, static, loss, waits is not None)
        self._graphs[key] = entry
        return entry

    def eager(self, *inputs: torch.Tensor) -> torch.Tensor:
        """The same step without a graph: the dropout seeds are drawn as a replay draws them,
        so a run that captures later (or, after a resume, earlier) gets the same masks. For
        the steps before the gradients settle (e.g. the optimizer's first step, after which
        :class:`~qlora_kernels.optim.PagedAdamW` keeps them in its flat buffer)."""
        self._check_inputs(inputs)
        self._wait_optimizer()
        on_device = [t.to(self.device, non_blocking=True) for t in inputs]
        self._refresh_seeds(self.generator)
        loss = self.loss_fn(self.model, *on_device)
        loss.backward()
        return loss.detach()

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        key = self._check_inputs(inputs)
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._capture(key, inputs)
        else:
            self._check_addresses()
        graph, static, loss, waits_for_optimizer = entry
        if not waits_for_optimizer:
            self._wait_optimizer()
        for s, t in zip(static, inputs):
            s.copy_(t, non_blocking=True)
        self._refresh_seeds(self.generator)
        graph.replay()
        # the graphs share one pool: another shape's replay may reuse this loss's memory
        return loss.detach().clone()
