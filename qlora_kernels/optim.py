"""Paged AdamW: ``torch.optim.AdamW``'s update with float32 state that stays on the GPU while
memory allows and lives in pinned host memory, in pages, when it does not.

Layout. The params of one group that share a device and dtype form a *bucket*: their data is
moved into one flat buffer (each param becomes a view of it), and their two moments are one
flat float32 range, so a step is one ``adamw_step`` launch per bucket instead of one per
tensor (LoRA has hundreds of small tensors: per-tensor launches would cost milliseconds of
Python a step). The state range is split into *chunks*: one device-resident chunk as large as
the byte budget allows, then host pages of ``page_bytes`` (both moments together).

Paging. A host page is copied into one of two device staging slots on a side stream, one page
ahead of its update, and copied back on a second side stream once the update is done; events
order the three streams, so the update of page i overlaps the fetch of page i+1 and the write
back of page i-1, and no step waits on the host. Memory is never managed (unified): only
pinned host memory and explicit copies. On CPU tensors the same code runs with plain
synchronous copies, which is how the tests cover it without a GPU.

Deferred host pages. Paging is bound by PCIe (a 65B model in 40 GiB pages ~5 GiB of state each
way per step, ~130 ms), and in a plain step the GPU idles meanwhile. ``step(defer_host_pages=True)``
returns with the host pages' updates still running on a side stream, page by page, each page
recording an event once its params are updated. The next forward can then start at once and
wait, layer by layer, only for the pages that hold that layer's params
(:class:`~qlora_kernels.train.graphs.GraphedStep` puts those waits into its CUDA graphs): the
copies hide under the forward's compute. Everything else must wait first: see
:meth:`PagedAdamW.wait_host_pages`.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch

from . import ops
from .functional import FLOAT_DTYPES

_GiB = 1 << 30


def _check_hyperparameters(lr, betas, eps, weight_decay, where: str = "") -> None:
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr >= 0.0:
        raise ValueError(f"{where}lr: expected a number >= 0, got {lr!r}")
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"{where}betas: expected a pair (beta1, beta2), got {betas!r}")
    for i, b in enumerate(betas):
        if not isinstance(b, (int, float)) or not 0.0 <= b < 1.0:
            raise ValueError(f"{where}betas[{i}]: expected a value in [0, 1), got {b!r}")
    if not isinstance(eps, (int, float)) or not eps > 0.0:
        raise ValueError(f"{where}eps: expected a number > 0, got {eps!r}")
    if not isinstance(weight_decay, (int, float)) or not weight_decay >= 0.0:
        raise ValueError(f"{where}weight_decay: expected a number >= 0, got {weight_decay!r}")


@dataclass
class _Chunk:
    """A range [start, end) of a bucket's state: ``exp_avg`` / ``exp_avg_sq`` of end - start
    float32 each, on the device (``resident``) or in (pinned) host memory."""

    start: int
    end: int
    resident: bool
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    # (param index, lo, hi): the bucket-element ranges of the params overlapping this chunk
    segments: list = field(default_factory=list)
    # host page on a GPU: recorded on the update stream once a deferred step has updated it
    updated: torch.cuda.Event | None = None


@dataclass
class _Bucket:
    params: list
    offsets: list  # element offset of each param in the flat buffers
    numel: int
    device: torch.device
    dtype: torch.dtype
    flat_param: torch.Tensor | None  # None when the params were left as they are
    steps: list  # per-param step counts (a param whose grad is None is not stepped)
    chunks: list = field(default_factory=list)
    flat_grad: torch.Tensor | None = None
    grad_views: list | None = None

    param_ptrs: list | None = None  # where each param's view of flat_param starts
    grad_ptrs: list | None = None  # likewise for flat_grad

    def param_ptrs_ok(self) -> bool:
        # one list comparison: this runs every step over hundreds of LoRA tensors
        return [p.data_ptr() for p in self.params] == self.param_ptrs

    def grads_are_views(self) -> bool:
        """Whether every param's grad is its view of flat_grad (where backward accumulates)."""
        return self.grad_ptrs is not None and \
            [0 if p.grad is None else p.grad.data_ptr() for p in self.params] == self.grad_ptrs


class _Pager:
    """Two device staging slots for host pages of one device, and the streams and events that
    move pages through them. On a CPU device the copies are synchronous and there are no
    streams."""

    def __init__(self, device: torch.device, page_elems: int):
        self.device = device
        self.cuda = device.type == "cuda"
        self.slots = [(torch.empty(page_elems, dtype=torch.float32, device=device),
                       torch.empty(page_elems, dtype=torch.float32, device=device)) for _ in range(2)]
        if self.cuda:
            self.h2d = torch.cuda.Stream(device)
            self.d2h = torch.cuda.Stream(device)
            # deferred steps update the host pages here; ``done`` follows its last update.
            # External events: a CUDA graph that waits on one waits for the record made before
            # each replay, instead of joining this stream into the capture
            self.update = torch.cuda.Stream(device)
            self.done = _external_event(device)
        self.slot_free = [None, None]  # event: the slot's last write back has finished
        self.last_write_back = None
        self.pending = False  # a deferred step's updates may still run on ``update``

    def begin_step(self) -> None:
        # A host page read this step may have been written back late in the previous one:
        # the fetch stream waits for every write back (they are in order on one stream).
        if self.cuda and self.last_write_back is not None:
            self.h2d.wait_event(self.last_write_back)

    def fetch(self, slot: int, chunk: _Chunk):
        """Starts the copy of a host page into a slot; returns what the update must wait on."""
        k = chunk.end - chunk.start
        m, v = self.slots[slot]
        if not self.cuda:
            m[:k].copy_(chunk.exp_avg)
            v[:k].copy_(chunk.exp_avg_sq)
            return None
        with torch.cuda.stream(self.h2d):
            if self.slot_free[slot] is not None:
                self.h2d.wait_event(self.slot_free[slot])
            m[:k].copy_(chunk.exp_avg, non_blocking=True)
            v[:k].copy_(chunk.exp_avg_sq, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(self.h2d)
        return ready

    def slot_views(self, slot: int, chunk: _Chunk, ready) -> tuple[torch.Tensor, torch.Tensor]:
        if ready is not None:
            torch.cuda.current_stream(self.device).wait_event(ready)
        k = chunk.end - chunk.start
        m, v = self.slots[slot]
        return m[:k], v[:k]

    def write_back(self, slot: int, chunk: _Chunk) -> None:
        k = chunk.end - chunk.start
        m, v = self.slots[slot]
        if not self.cuda:
            chunk.exp_avg.copy_(m[:k])
            chunk.exp_avg_sq.copy_(v[:k])
            return
        updated = torch.cuda.Event()
        updated.record(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.d2h):
            self.d2h.wait_event(updated)
            chunk.exp_avg.copy_(m[:k], non_blocking=True)
            chunk.exp_avg_sq.copy_(v[:k], non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.d2h)
        self.slot_free[slot] = done
        self.last_write_back = done

    def wait_pending(self) -> None:
        """Makes the current stream wait for a deferred step's updates (only it: work on other
        streams must be ordered after it by the caller)."""
        if self.pending:
            torch.cuda.current_stream(self.device).wait_event(self.done)
            self.pending = False

    def synchronize(self) -> None:
        """Waits for every copy in flight, before the host reads or writes its pages."""
        self.wait_pending()
        if self.cuda:
            self.h2d.synchronize()
            self.d2h.synchronize()
            self.update.synchronize()


def _external_event(device: torch.device) -> torch.cuda.Event | None:
    """An external event, recorded once so that it exists: torch creates events lazily at their
    first record, and a wait on an event not created yet is dropped, from a graph capture too.
    None on a torch without external events (before 2.9): steps are then never deferred."""
    try:
        event = torch.cuda.Event(external=True)
    except TypeError:
        return None
    event.record(torch.cuda.current_stream(device))
    return event


class PagedAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias correction) with float32 state, paged to host memory
    when the GPU runs short.

    Args:
        params, lr, betas, eps, weight_decay: as ``torch.optim.AdamW`` (``lr`` defaults to the
            QLoRA paper's 2e-4 and ``weight_decay`` to 0).
        paged: ``"auto"`` keeps the state on the device up to a byte budget and pages the rest;
            ``False`` keeps all of it on the device; ``True`` pages all of it.
        device_budget_bytes: the budget for state on each device. Default, at the first step:
            the free memory (``torch.cuda.mem_get_info``) less a reserve of
            ``max(1 GiB, 10%)`` of the card. On CPU tensors there is no default budget.
        device_limit_bytes: instead of a state budget, a ceiling for the whole card's use
            (``total - free``, as ``nvidia-smi`` shows it): at the first step, which runs after
            a forward and backward, the state gets what is left below the ceiling once the
            peak seen so far and a 256 MiB margin are counted; the rest is paged. For a run that
            must fit a smaller card than the one it runs on (a 48 GB card's budget on an 80 GB
            one), or share the GPU.
        page_bytes: bytes of one host page (both moments together).
        flatten_params: move each bucket's params into one flat buffer (the params become
            views of it) so that a step is one kernel launch per bucket. ``False`` leaves the
            params alone and launches once per param.

    ``params`` may be float32, float16 or bfloat16; a 16-bit param is updated in float32 and
    rounded once. A param whose ``grad`` is None is skipped, as ``torch.optim.AdamW`` does.
    ``zero_grad(set_to_none=False)`` lets the gradients accumulate in place, which with
    ``flatten_params`` saves a copy of them into the flat gradient buffer each step.
    """

    def __init__(self, params, lr: float = 2e-4, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, *, amsgrad: bool = False, maximize: bool = False,
                 paged="auto", device_budget_bytes: int | None = None, page_bytes: int = 64 << 20,
                 flatten_params: bool = True, device_limit_bytes: int | None = None):
        _check_hyperparameters(lr, betas, eps, weight_decay)
        if amsgrad:
            raise ValueError("amsgrad: not supported by PagedAdamW (expected False)")
        if maximize:
            raise ValueError("maximize: not supported by PagedAdamW (expected False)")
        if paged not in (True, False, "auto"):
            raise ValueError(f"paged: expected True, False or 'auto', got {paged!r}")
        if device_budget_bytes is not None and (not isinstance(device_budget_bytes, int) or device_budget_bytes < 0):
            raise ValueError(f"device_budget_bytes: expected None or an int >= 0, got {device_budget_bytes!r}")
        if device_limit_bytes is not None and (not isinstance(device_limit_bytes, int) or device_limit_bytes < 0):
            raise ValueError(f"device_limit_bytes: expected None or an int >= 0, got {device_limit_bytes!r}")
        if device_limit_bytes is not None and device_budget_bytes is not None:
            raise ValueError("device_limit_bytes: give either it or device_budget_bytes, not both")
        if not isinstance(page_bytes, int) or page_bytes < 64:
            raise ValueError(f"page_bytes: expected an int >= 64, got {page_bytes!r}")
        self.paged = paged
        self.device_budget_bytes = device_budget_bytes
        self.device_limit_bytes = device_limit_bytes
        # elements per page: both float32 moments in page_bytes, a multiple of 32 elements so
        # every page starts 128-byte aligned for the vector loads
        self.page_elems = max(32, page_bytes // 8 // 32 * 32)
        self.flatten_params = flatten_params
        self._buckets: list[list[_Bucket]] | None = None  # per param group
        # a state dict loaded before the first step, placed once that step has built the buckets
        self._pending_state: dict | None = None
        self._pagers: dict[torch.device, _Pager] = {}
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    def add_param_group(self, param_group: dict) -> None:
        if getattr(self, "_buckets", None) is not None:
            raise RuntimeError("add_param_group: PagedAdamW cannot take new param groups after its first step")
        super().add_param_group(param_group)
        g = self.param_groups[-1]
        _check_hyperparameters(g["lr"], g["betas"], g["eps"], g["weight_decay"],
                               where=f"param_groups[{len(self.param_groups) - 1}].")
        for p in g["params"]:
            if p.dtype not in FLOAT_DTYPES:
                raise ValueError(f"params: expected float32, float16 or bfloat16 tensors, got one of {p.dtype}")

    # -----------------------------------------------------------------------------------------
    # Where the state lives

    def _budgets(self, buckets) -> dict:
        """Bytes of state each device may hold (inf: no limit)."""
        budgets = {}
        for b in buckets:
            if b.device in budgets:
                continue
            if self.paged is True:
                budgets[b.device] = 0
            elif self.paged is False:
                budgets[b.device] = math.inf
            elif self.device_budget_bytes is not None:
                budgets[b.device] = self.device_budget_bytes
            elif self.device_limit_bytes is not None and b.device.type == "cuda":
                free, total = torch.cuda.mem_get_info(b.device)
                # the step so far peaked above what the card holds now by what the allocator
                # has released since (cached blocks still count as used)
                released = max(0, torch.cuda.max_memory_reserved(b.device) - torch.cuda.memory_reserved(b.device))
                budgets[b.device] = max(0, self.device_limit_bytes - (total - free) - released - (256 << 20))
            elif b.device.type == "cuda":
                free, total = torch.cuda.mem_get_info(b.device)
                budgets[b.device] = max(0, free - max(_GiB, total // 10))
            else:
                budgets[b.device] = math.inf
        return budgets

    def _build(self) -> None:
        """Groups the params into buckets and places their state (zeros)."""
        groups = []
        for g in self.param_groups:
            keyed: dict = {}
            for p in g["params"]:
                keyed.setdefault((p.device, p.dtype), []).append(p)
            buckets = []
            for (device, dtype), params in keyed.items():
                offsets, n = [], 0
                for p in params:
                    offsets.append(n)
                    n += p.numel()
                b = _Bucket(params, offsets, n, device, dtype, None, [0] * len(params))
                if self.flatten_params:
                    self._flatten(b)
                    if all(p.grad is not None and p.grad.dtype == dtype for p in params):
                        # the flat gradient now, before the budget below is measured: it lives
                        # as long as the optimizer (the grads become its views)
                        self._grads(b)
                buckets.append(b)
            groups.append(buckets)
        everything = [b for buckets in groups for b in buckets]
        budgets = self._budgets(everything)
        # a device that cannot hold all of its state pays for two staging slots first
        need = {}
        for b in everything:
            need[b.device] = need.get(b.device, 0) + 8 * b.numel
        for device, budget in budgets.items():
            if need[device] > budget:
                budgets[device] = max(0, budget - 2 * 8 * self.page_elems)
        for b in everything:
            self._place(b, budgets)
        self._buckets = groups

    def _flatten(self, b: _Bucket) -> None:
        flat = torch.empty(b.numel, dtype=b.dtype, device=b.device)
        for p, off in zip(b.params, b.offsets):
            flat[off:off + p.numel()].copy_(p.detach().reshape(-1))
            p.data = flat[off:off + p.numel()].view_as(p)
        b.flat_param = flat
        b.param_ptrs = [flat.data_ptr() + off * flat.element_size() for off in b.offsets]

    def _place(self, b: _Bucket, budgets: dict) -> None:
        """The longest prefix of the state that fits the budget on the device (halved while
        the allocation runs out of memory, unless paged=False), the rest in host pages."""
        n = b.numel
        budget = budgets[b.device]
        resident = n if budget >= 8 * n else int(budget // 8) // self.page_elems * self.page_elems
        chunks = []
        while resident > 0:
            try:
                m = torch.zeros(resident, dtype=torch.float32, device=b.device)
                v = torch.zeros(resident, dtype=torch.float32, device=b.device)
                chunks.append(_Chunk(0, resident, True, m, v))
                break
            except torch.OutOfMemoryError:
                if self.paged is False:
                    raise
                resident = resident // 2 // self.page_elems * self.page_elems
        budgets[b.device] = budget - 8 * resident
        pin = b.device.type == "cuda"
        for start in range(resident, n, self.page_elems):
            end = min(n, start + self.page_elems)
            m = torch.zeros(end - start, dtype=torch.float32, pin_memory=pin)
            v = torch.zeros(end - start, dtype=torch.float32, pin_memory=pin)
            chunks.append(_Chunk(start, end, False, m, v,
                                 updated=_external_event(b.device) if b.device.type == "cuda" else None))
            if b.device not in self._pagers:
                self._pagers[b.device] = _Pager(b.device, self.page_elems)
        for c in chunks:
            for i, (p, off) in enumerate(zip(b.params, b.offsets)):
                lo, hi = max(off, c.start), min(off + p.numel(), c.end)
                if lo < hi:
                    c.segments.append((i, lo, hi))
        b.chunks = chunks

    def state_bytes(self) -> dict:
        """Bytes of optimizer state on the device and on the host: ``{"device": .., "host": ..}``."""
        out = {"device": 0, "host": 0}
        for buckets in self._buckets or []:
            for b in buckets:
                for c in b.chunks:
                    out["device" if c.resident else "host"] += 8 * (c.end - c.start)
        return out

    # -----------------------------------------------------------------------------------------
    # The step

    def _grads(self, b: _Bucket):
        """(grads, flat): the params' grads (None where a param has none) and, when every param
        has one of the bucket's dtype, the bucket's flat gradient (copied there unless the
        grads already are views of it)."""
        grads = [p.grad for p in b.params]
        if b.flat_param is not None and b.grads_are_views():
            return grads, b.flat_grad  # the grads are the flat buffer's views already
        for g in grads:
            if g is not None and g.is_sparse:
                raise RuntimeError("PagedAdamW does not support sparse gradients")
        if b.flat_param is None or any(g is None or g.dtype != grads[0].dtype for g in grads):
            return grads, None
        if b.flat_grad is None or b.flat_grad.dtype != grads[0].dtype:
            b.flat_grad = torch.empty(b.numel, dtype=grads[0].dtype, device=b.device)
            b.grad_views = [b.flat_grad[o:o + p.numel()].view_as(p) for p, o in zip(b.params, b.offsets)]
            b.grad_ptrs = [v.data_ptr() for v in b.grad_views]
        if [g.data_ptr() for g in grads] != b.grad_ptrs:
            torch._foreach_copy_(b.grad_views, grads)
            # the next backward accumulates into the flat buffer if the grads are not reset to None
            for p, view in zip(b.params, b.grad_views):
                p.grad = view
        return grads, b.flat_grad

    def _check_params(self, b: _Bucket) -> None:
        if b.flat_param is not None and b.param_ptrs_ok():
            return  # every param still is its view of the flat buffer
        for p in b.params:
            if p.device != b.device or p.dtype != b.dtype:
                raise RuntimeError(
                    f"params: a param moved from {b.device}/{b.dtype} to {p.device}/{p.dtype} after "
                    "PagedAdamW's first step; create the optimizer after moving the model")
        if b.flat_param is not None:
            # a param's data was replaced (e.g. param.data = ...): take it back into the buffer
            for p, off in zip(b.params, b.offsets):
                view = b.flat_param[off:off + p.numel()]
                if p.data_ptr() != view.data_ptr():
                    view.copy_(p.detach().reshape(-1))
                    p.data = view.view_as(p)

    @torch.no_grad()
    def step(self, closure=None, *, defer_host_pages: bool = False):
        """One AdamW step of every param with a gradient.

        ``defer_host_pages``: return once the device-resident state is updated and leave the
        host pages' updates running on a side stream (see the module doc). The params whose
        state is paged are then not updated yet when this returns: the next forward must wait
        for them, as a :class:`~qlora_kernels.train.graphs.GraphedStep` given this optimizer
        does, or call :meth:`wait_host_pages` first. Without host pages, or on the CPU, or
        when a host page's gradients are not in the flat buffer, the step is not deferred.
        """
        loss = None
        if closure is not None:
            self.wait_host_pages()  # the closure's forward reads the params, its backward the grads
            with torch.enable_grad():
                loss = closure()
        if self._buckets is None:
            self._build()
            if self._pending_state is not None:
                self._place_state(self._pending_state)
                self._pending_state = None
        for pager in self._pagers.values():
            pager.wait_pending()  # a deferred step's updates come before this one's
            pager.begin_step()
        # per device: the host chunks in update order, for the one-ahead prefetch
        work = []
        for g, buckets in zip(self.param_groups, self._buckets):
            for b in buckets:
                self._check_params(b)
                grads, flat_grad = self._grads(b)
                if all(x is None for x in grads):
                    continue
                stepped = [i for i, x in enumerate(grads) if x is not None]
                for i in stepped:
                    b.steps[i] += 1
                uniform = flat_grad is not None and all(s == b.steps[0] for s in b.steps)
                for c in b.chunks:
                    work.append((g, b, c, grads, flat_grad if uniform else None))
        fetched: dict = {}
        host = {}
        for item in work:
            c, device = item[2], item[1].device
            if not c.resident:
                host.setdefault(device, []).append(id(c))
        position = {dev: {cid: k for k, cid in enumerate(ids)} for dev, ids in host.items()}
        by_id = {id(item[2]): item[2] for item in work}

        def prefetch(device, k):
            ids = host.get(device, [])
            if k < len(ids) and (device, k) not in fetched:
                fetched[(device, k)] = self._pagers[device].fetch(k % 2, by_id[ids[k]])

        # devices whose host pages are updated on their pager's update stream (deferred): the
        # zeroing that zero_grad then queues behind those updates needs the flat gradient
        deferred = set()
        if defer_host_pages:
            deferred = {device for device in host if device.type == "cuda" and self._pagers[device].done is not None}
            for g, b, c, grads, flat_grad in work:
                if not c.resident and flat_grad is None:
                    deferred.discard(b.device)
            for device in deferred:
                # the update stream starts behind what the caller queued (backward, clipping)
                self._pagers[device].update.wait_stream(torch.cuda.current_stream(device))
        for device in host:
            prefetch(device, 0)
        for g, b, c, grads, flat_grad in work:
            if c.resident:
                self._update(g, b, c, grads, flat_grad, c.exp_avg, c.exp_avg_sq)
                continue
            k = position[b.device][id(c)]
            prefetch(b.device, k)
            prefetch(b.device, k + 1)
            pager = self._pagers[b.device]
            with torch.cuda.stream(pager.update) if b.device in deferred else contextlib.nullcontext():
                m, v = pager.slot_views(k % 2, c, fetched[(b.device, k)])
                self._update(g, b, c, grads, flat_grad, m, v)
                if b.device in deferred:
                    c.updated.record(pager.update)
                pager.write_back(k % 2, c)
        for device in deferred:
            pager = self._pagers[device]
            pager.done.record(pager.update)
            pager.pending = True
        return loss

    def wait_host_pages(self) -> None:
        """After ``step(defer_host_pages=True)``: makes the current stream wait until every
        param is updated (the host does not wait). Call it before anything other than a replay
        of a :class:`~qlora_kernels.train.graphs.GraphedStep` made with this optimizer reads
        the params: an evaluation, saving the adapter, a forward of your own. ``step``,
        ``state_dict``, ``load_state_dict`` and ``zero_grad(set_to_none=True)`` call it
        themselves. A no-op when no step is pending."""
        for pager in self._pagers.values():
            pager.wait_pending()

    def update_event(self, params) -> torch.cuda.Event | None:
        """The event a deferred step records once every one of ``params`` is updated, or None
        when all of their state lives on the device (``step`` updates those before it returns).
        Host pages are updated in order on one stream, so waiting for a later page's event
        also waits for the pages before it (on one device: ``params`` must share it). Valid
        from the first step on (the state is placed there); the same event objects are
        recorded again by every deferred step."""
        if self._buckets is None:
            raise RuntimeError("update_event: PagedAdamW places its state at its first step(); ask after it")
        wanted = {id(p) for p in params}
        last = None
        for buckets in self._buckets:  # the order step() updates them in
            for b in buckets:
                mine = {i for i, p in enumerate(b.params) if id(p) in wanted}
                for c in b.chunks:
                    if not c.resident and c.updated is not None and any(i in mine for i, _, _ in c.segments):
                        last = c.updated
        return last

    def update_done_event(self, device) -> torch.cuda.Event | None:
        """The event a deferred step (and the ``zero_grad`` after it) records on ``device``
        once all of its work there is done; None when the device pages nothing."""
        device = torch.device(device)
        if device.type != "cuda" or not torch.cuda.is_available():
            return None
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        pager = self._pagers.get(device)
        return pager.done if pager is not None and pager.cuda else None

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As ``torch.optim.Optimizer.zero_grad``. With ``set_to_none=False`` and the grads in
        the flat buffer, one fill per bucket instead of one per param. After a deferred step
        the host pages' share of the buffer is zeroed on the update stream, behind the
        updates that read it, so the next forward still overlaps them."""
        flat = self._buckets is not None and not set_to_none and all(
            b.grads_are_views() for buckets in self._buckets for b in buckets)
        if not flat:
            self.wait_host_pages()
            super().zero_grad(set_to_none=set_to_none)
            return
        for buckets in self._buckets:
            for b in buckets:
                pager = self._pagers.get(b.device)
                if pager is None or not pager.pending:
                    b.flat_grad.zero_()
                    continue
                pager.update.wait_stream(torch.cuda.current_stream(b.device))
                for c in b.chunks:
                    if c.resident:
                        b.flat_grad[c.start:c.end].zero_()
                with torch.cuda.stream(pager.update):
                    for c in b.chunks:
                        if not c.resident:
                            b.flat_grad[c.start:c.end].zero_()
        for pager in self._pagers.values():
            if pager.pending:
                pager.done.record(pager.update)

    def _update(self, g, b: _Bucket, c: _Chunk, grads, flat_grad, m, v) -> None:
        lr, (beta1, beta2), eps, wd = g["lr"], g["betas"], g["eps"], g["weight_decay"]
        if flat_grad is not None:
            step = b.steps[0]
            ops.adamw_step(b.flat_param[c.start:c.end], flat_grad[c.start:c.end], m, v, lr, beta1, beta2,
                           eps, wd, 1 - beta1**step, 1 - beta2**step)
            return
        for i, lo, hi in c.segments:
            grad = grads[i]
            if grad is None:
                continue
            off, step = b.offsets[i], b.steps[i]
            p = b.params[i]
            ops.adamw_step(p.detach().view(-1)[lo - off:hi - off], grad.contiguous().view(-1)[lo - off:hi - off],
                           m[lo - c.start:hi - c.start], v[lo - c.start:hi - c.start],
                           lr, beta1, beta2, eps, wd, 1 - beta1**step, 1 - beta2**step)

    # -----------------------------------------------------------------------------------------
    # State dict, shaped like torch.optim.AdamW's

    def _sync(self) -> None:
        for pager in self._pagers.values():
            pager.synchronize()

    def _param_state(self, b: _Bucket, i: int, which: str) -> torch.Tensor:
        """The state of param i: a view when it lies in one chunk, else a joined copy."""
        p, off = b.params[i], b.offsets[i]
        pieces = []
        for c in b.chunks:
            lo, hi = max(off, c.start), min(off + p.numel(), c.end)
            if lo < hi:
                pieces.append(getattr(c, which)[lo - c.start:hi - c.start])
        if len(pieces) == 1:
            return pieces[0].view(p.shape)
        return torch.cat([x.to(b.device) for x in pieces]).view(p.shape)

    def state_dict(self) -> dict:
        """``{"state": {index: {"step", "exp_avg", "exp_avg_sq"}}, "param_groups": [...]}``, as
        ``torch.optim.AdamW`` writes it; paged state comes as host tensors. Only params that
        have taken a step have state."""
        self._sync()
        index = {}
        groups = []
        for g in self.param_groups:
            packed = {k: v for k, v in g.items() if k != "params"}
            packed["params"] = [index.setdefault(id(p), len(index)) for p in g["params"]]
            groups.append(packed)
        if self._buckets is None and self._pending_state is not None:
            return {"state": self._pending_state.get("state", {}), "param_groups": groups}
        state = {}
        for buckets in self._buckets or []:
            for b in buckets:
                for i, p in enumerate(b.params):
                    if b.steps[i] == 0:
                        continue
                    state[index[id(p)]] = {
                        "step": torch.tensor(float(b.steps[i]), dtype=torch.float32),
                        "exp_avg": self._param_state(b, i, "exp_avg"),
                        "exp_avg_sq": self._param_state(b, i, "exp_avg_sq"),
                    }
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads a state dict of PagedAdamW or of torch.optim.AdamW (same param order)."""
        groups = state_dict.get("param_groups")
        if not isinstance(groups, list) or len(groups) != len(self.param_groups):
            raise ValueError(f"state_dict: expected {len(self.param_groups)} param groups, got "
                             f"{len(groups) if isinstance(groups, list) else groups!r}")
        for k, (saved, g) in enumerate(zip(groups, self.param_groups)):
            if len(saved["params"]) != len(g["params"]):
                raise ValueError(f"state_dict: param group {k} has {len(saved['params'])} params, "
                                 f"this optimizer's has {len(g['params'])}")
        for k, (saved, g) in enumerate(zip(groups, self.param_groups)):
            for key in ("lr", "betas", "eps", "weight_decay"):
                if key in saved:
                    g[key] = tuple(saved[key]) if key == "betas" else saved[key]
            _check_hyperparameters(g["lr"], g["betas"], g["eps"], g["weight_decay"], where=f"param_groups[{k}].")
        saved_ids = [i for saved in groups for i in saved["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        state = state_dict.get("state", {})
        for saved_id, p in zip(saved_ids, params):
            s = state.get(saved_id)
            if s is None:
                continue
            for key in ("step", "exp_avg", "exp_avg_sq"):
                if key not in s:
                    raise ValueError(f"state_dict: state of param {saved_id} has no {key!r}")
            if s["exp_avg"].shape != p.shape or s["exp_avg_sq"].shape != p.shape:
                raise ValueError(f"state_dict: state of param {saved_id} has shape "
                                 f"{tuple(s['exp_avg'].shape)}, its param {tuple(p.shape)}")
        if self._buckets is None:
            # Not placed yet: the first step() builds the buckets and measures the device
            # budget after a forward and backward (what device_limit_bytes promises); placing
            # the state here, on a resume before any step, would measure a card holding only
            # the model and leave no room for the activations.
            self._pending_state = {"state": state, "param_groups": groups}
            return
        self._place_state({"state": state, "param_groups": groups})

    def _place_state(self, state_dict: dict) -> None:
        """Writes a validated state dict into the built buckets."""
        groups = state_dict["param_groups"]
        self._sync()
        where = {}
        for buckets in self._buckets:
            for b in buckets:
                for i, p in enumerate(b.params):
                    where[id(p)] = (b, i)
        saved_ids = [i for saved in groups for i in saved["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        state = state_dict.get("state", {})
        for saved_id, p in zip(saved_ids, params):
            b, i = where[id(p)]
            s = state.get(saved_id)
            if s is None:
                b.steps[i] = 0
                self._write_state(b, i, None)
                continue
            b.steps[i] = int(float(s["step"]))
            self._write_state(b, i, s)

    def _write_state(self, b: _Bucket, i: int, s) -> None:
        p, off = b.params[i], b.offsets[i]
        for which in ("exp_avg", "exp_avg_sq"):
            src = None if s is None else s[which].detach().reshape(-1)
            for c in b.chunks:
                lo, hi = max(off, c.start), min(off + p.numel(), c.end)
                if lo < hi:
                    dst = getattr(c, which)[lo - c.start:hi - c.start]
                    if src is None:
                        dst.zero_()
                    else:
                        dst.copy_(src[lo - off:hi - off])
