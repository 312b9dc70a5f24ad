"""PagedAdamW against torch.optim.AdamW step for step (float32 and bfloat16 params, weight decay,
several param groups, paged or not), its state dict, its errors; the adamw_step op's kernels
against the reference. CPU tests run the reference (and the Triton kernel in the
interpreter); GPU-marked ones run the CUDA and Triton kernels and real paging with streams."""

import copy
import io

import pytest
import torch

import qlora_kernels as qk
from qlora_kernels import ops, optim, reference_optim
from qlora_kernels.optim import PagedAdamW

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
# awkward LoRA-like shapes: A [r, in] and B [out, r] pairs, a bias, a scalar-like tensor
SHAPES = [(8, 33), (47, 8), (257,), (1,), (16, 70), (70, 16)]
PAGE_BYTES = 8 * 96  # 96 elements a page: every tensor above spans or shares pages
HYPER = dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-6)


def make_params(rng, dtype, device, shapes=SHAPES):
    return [torch.nn.Parameter((torch.randn(s, generator=rng) * 0.5).to(dtype).to(device)) for s in shapes]


def clone_params(params, dtype=None):
    return [torch.nn.Parameter(p.detach().clone().to(dtype or p.dtype)) for p in params]


def groups(params, weight_decay):
    # three groups, each with its own learning rate; the middle one with its own weight decay
    return [{"params": params[:2]}, {"params": params[2:4], "lr": 1e-2, "weight_decay": 0.0},
            {"params": params[4:], "lr": 5e-4}], dict(HYPER, weight_decay=weight_decay)


def random_grads(params, rng, scale=1.0):
    return [(torch.randn(p.shape, generator=rng) * scale).to(p.dtype).to(p.device) for p in params]


def paged_kwargs(paged):
    if paged == "budget":  # 'auto' with a budget that holds part of the state on the device
        return dict(paged="auto", device_budget_bytes=4000, page_bytes=PAGE_BYTES)
    return dict(paged=paged, page_bytes=PAGE_BYTES)


PAGED = [False, True, "budget"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("paged", PAGED)
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_float32_equals_torch_adamw(device, paged, weight_decay, rng):
    ours = make_params(rng, torch.float32, device)
    ref = clone_params(ours)
    gs, kw = groups(ours, weight_decay)
    opt = PagedAdamW(gs, **kw, **paged_kwargs(paged))
    gs_ref, kw_ref = groups(ref, weight_decay)
    torch_opt = torch.optim.AdamW(gs_ref, **kw_ref, foreach=False)
    for step in range(6):
        grads = random_grads(ours, rng, scale=10.0 ** (step % 3 - 1))
        for p, q, g in zip(ours, ref, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        torch_opt.step()
        # on CPU both run the same torch ops (bit-exact); the CUDA kernel may fuse multiply-adds
        tol = dict(rtol=0, atol=0) if device == "cpu" else dict(rtol=2e-6, atol=1e-7)
        for p, q in zip(ours, ref):
            torch.testing.assert_close(p, q, **tol)
        opt.zero_grad(set_to_none=step % 2 == 0)  # both: grads re-allocated, and kept in place
        torch_opt.zero_grad()
    sd, sd_ref = opt.state_dict(), torch_opt.state_dict()
    assert sd["state"].keys() == sd_ref["state"].keys()
    for k, s in sd_ref["state"].items():
        assert sd["state"][k]["step"].item() == s["step"].item() == 6
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(sd["state"][k][key].to(device), s[key], **tol)
    placed = opt.state_bytes()
    n = sum(p.numel() for p in ours)
    assert placed["device"] + placed["host"] == 8 * n
    if paged is True:
        assert placed["device"] == 0
    elif paged is False:
        assert placed["host"] == 0
    else:
        assert 0 < placed["device"] <= 4000 and placed["host"] > 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("paged", PAGED)
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_bfloat16_params_update_in_float32_rounded_once(device, paged, weight_decay, rng):
    # torch.optim.AdamW keeps bf16 state for bf16 params; ours is float32. The comparison: a
    # float32 shadow of each param, reset to our bf16 value before every step, stepped by
    # torch.optim.AdamW with float32 state, then rounded once: our param must be that value.
    ours = make_params(rng, torch.bfloat16, device)
    shadow = clone_params(ours, torch.float32)
    gs, kw = groups(ours, weight_decay)
    opt = PagedAdamW(gs, **kw, **paged_kwargs(paged))
    gs_ref, kw_ref = groups(shadow, weight_decay)
    torch_opt = torch.optim.AdamW(gs_ref, **kw_ref, foreach=False)
    for _ in range(5):
        grads = random_grads(ours, rng)
        with torch.no_grad():
            for p, s, g in zip(ours, shadow, grads):
                p.grad, s.grad = g, g.float()
                s.copy_(p.float())
        opt.step()
        torch_opt.step()
        for p, s in zip(ours, shadow):
            expected = s.detach().to(torch.bfloat16)
            if device == "cpu":
                assert torch.equal(p, expected)
            else:  # an ulp of float32 before the rounding can move a tie: one bf16 ulp at most
                torch.testing.assert_close(p.float(), expected.float(), rtol=2**-7, atol=1e-30)
    for k, s in torch_opt.state_dict()["state"].items():
        torch.testing.assert_close(opt.state_dict()["state"][k]["exp_avg_sq"].to(device), s["exp_avg_sq"],
                                   rtol=2e-6, atol=1e-12)


@pytest.mark.parametrize("flatten", [True, False])
def test_none_grads_are_skipped(flatten, rng):
    ours = make_params(rng, torch.float32, "cpu")
    ref = clone_params(ours)
    opt = PagedAdamW(ours, **HYPER, weight_decay=0.1, paged="auto", device_budget_bytes=3000,
                     page_bytes=PAGE_BYTES, flatten_params=flatten)
    torch_opt = torch.optim.AdamW(ref, **HYPER, weight_decay=0.1, foreach=False)
    for step in range(5):
        grads = random_grads(ours, rng)
        for i, (p, q, g) in enumerate(zip(ours, ref, grads)):
            # param i gets no gradient on some steps: its step count and state fall behind
            keep = (i + step) % 3 != 0
            p.grad = g.clone() if keep else None
            q.grad = g.clone() if keep else None
        before = [p.detach().clone() for p in ours]
        opt.step()
        torch_opt.step()
        for p, q, b in zip(ours, ref, before):
            assert torch.equal(p, q)
            if p.grad is None:
                assert torch.equal(p, b)
    sd, sd_ref = opt.state_dict(), torch_opt.state_dict()
    assert {k: s["step"].item() for k, s in sd["state"].items()} == \
        {k: s["step"].item() for k, s in sd_ref["state"].items()}


def test_params_become_views_of_one_buffer_and_replaced_data_is_taken_back(rng):
    ours = make_params(rng, torch.float32, "cpu")
    ref = clone_params(ours)
    opt = PagedAdamW(ours, **HYPER)
    torch_opt = torch.optim.AdamW(ref, **HYPER, weight_decay=0.0, foreach=False)
    for step in range(3):
        for p, q, g in zip(ours, ref, random_grads(ours, rng)):
            p.grad, q.grad = g.clone(), g.clone()
        if step == 2:  # someone swaps a param's data for a new tensor between steps
            new = torch.randn(ours[1].shape, generator=rng)
            ours[1].data = new.clone()
            ref[1].data = new.clone()
        opt.step()
        torch_opt.step()
        for p, q in zip(ours, ref):
            assert torch.equal(p, q)
    storage = {p.untyped_storage().data_ptr() for p in ours}
    assert len(storage) == 1


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("paged_before,paged_after", [(False, True), (True, "budget"), ("budget", False)])
def test_state_dict_round_trip_continues_identically(device, paged_before, paged_after, rng):
    params = make_params(rng, torch.float32, device)
    resumed = clone_params(params)
    grads = [random_grads(params, rng) for _ in range(6)]
    gs, kw = groups(params, 0.05)
    opt = PagedAdamW(gs, **kw, **paged_kwargs(paged_before))

    def run(opt, params, steps):
        for gr in steps:
            for p, g in zip(params, gr):
                p.grad = g.clone()
            opt.step()

    run(opt, params, grads[:3])
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    with torch.no_grad():
        for p, q in zip(resumed, params):
            q_copy = q.detach().clone()
            p.copy_(q_copy)
    run(opt, params, grads[3:])

    gs2, kw2 = groups(resumed, 0.05)
    kw2["lr"] = 1.0  # overwritten by the loaded param groups
    opt2 = PagedAdamW(gs2, **kw2, **paged_kwargs(paged_after))
    buf.seek(0)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    assert opt2.param_groups[0]["lr"] == HYPER["lr"]
    # placed at the first step, where the device budget is measured after a forward/backward;
    # until then state_dict() gives back what was loaded
    assert opt2._buckets is None
    pending = opt2.state_dict()["state"]
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)["state"]
    assert pending.keys() == loaded.keys() and all(
        torch.equal(pending[k]["exp_avg_sq"], loaded[k]["exp_avg_sq"]) for k in loaded)
    run(opt2, resumed, grads[3:])
    for p, q in zip(params, resumed):
        assert torch.equal(p, q)

    # torch.optim.AdamW reads the same state dict and continues alike (a deep copy: like
    # torch's own, our state dict holds references to the live state)
    ref = clone_params(params)
    gs3, kw3 = groups(ref, 0.05)
    torch_opt = torch.optim.AdamW(gs3, **kw3, foreach=False)
    torch_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    run(opt, params, grads[:2])
    run(torch_opt, ref, grads[:2])
    tol = dict(rtol=0, atol=0) if device == "cpu" else dict(rtol=2e-6, atol=1e-7)
    for p, q in zip(params, ref):
        torch.testing.assert_close(p, q, **tol)


def test_load_state_dict_errors(rng):
    params = make_params(rng, torch.float32, "cpu")
    opt = PagedAdamW(params)
    with pytest.raises(ValueError, match="expected 1 param groups, got 2"):
        opt.load_state_dict({"state": {}, "param_groups": [{"params": []}, {"params": []}]})
    with pytest.raises(ValueError, match="param group 0 has 2 params"):
        opt.load_state_dict({"state": {}, "param_groups": [{"params": [0, 1]}]})
    sd = {"state": {0: {"step": torch.tensor(1.0), "exp_avg": torch.zeros(3), "exp_avg_sq": torch.zeros(3)}},
          "param_groups": [{"params": list(range(len(params)))}]}
    with pytest.raises(ValueError, match=r"state of param 0 has shape \(3,\), its param \(8, 33\)"):
        opt.load_state_dict(sd)


def test_out_of_memory_while_placing_state_pages_it_out(monkeypatch, rng):
    # every device allocation of state fails as if the GPU were full: 'auto' pages it all out
    zeros = torch.zeros

    def full_device(*args, **kwargs):
        if "device" in kwargs:
            raise torch.OutOfMemoryError("simulated: the device is full")
        return zeros(*args, **kwargs)

    ours = make_params(rng, torch.float32, "cpu")
    ref = clone_params(ours)
    opt = PagedAdamW(ours, **HYPER, page_bytes=PAGE_BYTES)
    torch_opt = torch.optim.AdamW(ref, **HYPER, weight_decay=0.0, foreach=False)
    monkeypatch.setattr(optim.torch, "zeros", full_device)
    for _ in range(2):
        for p, q, g in zip(ours, ref, random_grads(ours, rng)):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        torch_opt.step()
    monkeypatch.setattr(optim.torch, "zeros", zeros)
    assert opt.state_bytes() == {"device": 0, "host": 8 * sum(p.numel() for p in ours)}
    for p, q in zip(ours, ref):
        assert torch.equal(p, q)
    # paged=False means on the device or not at all
    opt = PagedAdamW(clone_params(ours), paged=False)
    for p in opt.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    monkeypatch.setattr(optim.torch, "zeros", full_device)
    with pytest.raises(torch.OutOfMemoryError):
        opt.step()


@pytest.mark.parametrize("kwargs,message", [
    (dict(lr=-1e-3), r"^lr: expected a number >= 0, got -0.001"),
    (dict(betas=(1.0, 0.999)), r"^betas\[0\]: expected a value in \[0, 1\), got 1.0"),
    (dict(betas=(0.9, -0.1)), r"^betas\[1\]: expected a value in \[0, 1\), got -0.1"),
    (dict(betas=(0.9,)), r"^betas: expected a pair"),
    (dict(eps=0.0), r"^eps: expected a number > 0, got 0.0"),
    (dict(weight_decay=-0.1), r"^weight_decay: expected a number >= 0"),
    (dict(amsgrad=True), r"^amsgrad: not supported"),
    (dict(maximize=True), r"^maximize: not supported"),
    (dict(paged="yes"), r"^paged: expected True, False or 'auto', got 'yes'"),
    (dict(device_budget_bytes=-1), r"^device_budget_bytes: expected None or an int >= 0"),
    (dict(device_limit_bytes=-5), r"^device_limit_bytes: expected None or an int >= 0"),
    (dict(device_limit_bytes=1 << 30, device_budget_bytes=1 << 20), r"^device_limit_bytes: give either"),
])
def test_bad_hyperparameters_name_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PagedAdamW([torch.nn.Parameter(torch.randn(3))], **kwargs)


def test_bad_group_hyperparameters_name_the_group():
    p, q = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match=r"^param_groups\[1\]\.lr: expected a number >= 0, got -1"):
        PagedAdamW([{"params": [p]}, {"params": [q], "lr": -1}])
    with pytest.raises(ValueError, match=r"params: expected float32, float16 or bfloat16 tensors"):
        PagedAdamW([torch.nn.Parameter(torch.randn(3).double())])


def _op_args(n, pdtype, gdtype, rng, device="cpu"):
    param = (torch.randn(n, generator=rng)).to(pdtype).to(device)
    grad = (torch.randn(n, generator=rng) * 0.1).to(gdtype).to(device)
    exp_avg = (torch.randn(n, generator=rng) * 0.01).to(device)
    exp_avg_sq = (torch.rand(n, generator=rng) * 1e-3 + 1e-8).to(device)
    # step 3 of lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight decay 0.01
    return [param, grad, exp_avg, exp_avg_sq], (1e-3, 0.9, 0.999, 1e-8, 0.01, 1 - 0.9**3, 1 - 0.999**3)


def test_op_bad_arguments_name_the_argument(rng):
    (p, g, m, v), s = _op_args(10, torch.float32, torch.float32, rng)
    with pytest.raises(ValueError, match=r"grad: expected 10 elements \(as param\), got 9"):
        ops.adamw_step(p, g[:9], m, v, *s)
    with pytest.raises(ValueError, match="exp_avg: expected dtype float32, got torch.bfloat16"):
        ops.adamw_step(p, g, m.bfloat16(), v, *s)
    with pytest.raises(ValueError, match="exp_avg_sq: expected a contiguous tensor"):
        ops.adamw_step(p, g, m, torch.rand(20)[::2], *s)
    with pytest.raises(ValueError, match="param: expected dtype float32, float16 or bfloat16, got torch.float64"):
        ops.adamw_step(p.double(), g, m, v, *s)
    with pytest.raises(ValueError, match=r"bias_correction1: expected a value in \(0, 1\], got 0.0"):
        ops.adamw_step(p, g, m, v, *s[:5], 0.0, s[6])


def _opcheck_samples(device, rng):
    out = []
    for pdtype, gdtype in [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                           (torch.bfloat16, torch.float32)]:
        tensors, scalars = _op_args(1000, pdtype, gdtype, rng, device)
        out.append((ops.adamw_step, (*tensors, *scalars)))
    return out


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device, rng):
    for op, args in _opcheck_samples(device, rng):
        torch.library.opcheck(op, args)


def _assert_like_reference(got, want, pdtype):
    p, _, m, v = got
    p_ref, _, m_ref, v_ref = want
    # absolute slack a millionth of the typical magnitude (m ~ 1e-2, v ~ 1e-3): where
    # m * beta1 and (1 - beta1) * g nearly cancel, a fused multiply-add (torch's CPU lerp has
    # one) moves the small result by more than 2e-6 of itself
    torch.testing.assert_close(m.cpu(), m_ref, rtol=2e-6, atol=1e-8)
    torch.testing.assert_close(v.cpu(), v_ref, rtol=2e-6, atol=1e-9)
    if pdtype == torch.float32:
        torch.testing.assert_close(p.cpu(), p_ref, rtol=2e-6, atol=1e-9)
    else:  # an ulp of float32 before the single rounding can move a tie by one 16-bit ulp
        torch.testing.assert_close(p.cpu().float(), p_ref.float(), rtol=2**-7, atol=1e-30)
        assert (p.cpu() != p_ref).float().mean() < 0.01


def _kernel_cases():
    for n in (1, 7, 1000, 4097):
        for pdtype in (torch.float32, torch.bfloat16):
            for gdtype in (torch.float32, torch.bfloat16):
                for offset in (0, 1):  # offset 1: every operand a view off its 16-byte boundary
                    yield n, pdtype, gdtype, offset


def _check_kernel(fn, device, rng, cases):
    for n, pdtype, gdtype, offset in cases:
        tensors, scalars = _op_args(n + offset, pdtype, gdtype, rng)
        want = [t[offset:].clone() for t in tensors]
        reference_optim.adamw_step(*want, *scalars)
        got_full = [t.to(device) for t in tensors]
        got = [t[offset:] for t in got_full]
        fn(*got, *scalars)
        _assert_like_reference(got, want, pdtype)
        if offset:  # the element before the view is untouched
            for t, t0 in zip(got_full, tensors):
                assert torch.equal(t[:1].cpu(), t0[:1])


def test_triton_kernel_in_the_interpreter_matches_reference(rng):
    from qlora_kernels.triton import adamw as triton_adamw

    cases = [c for c in _kernel_cases() if c[0] in (1, 7, 1000)]
    _check_kernel(triton_adamw.adamw_step, "cpu", rng, cases)


@pytest.mark.gpu
def test_triton_kernel_matches_reference(rng):
    from qlora_kernels.triton import adamw as triton_adamw

    _check_kernel(triton_adamw.adamw_step, "cuda", rng, list(_kernel_cases()))


@pytest.mark.gpu
def test_cuda_kernel_matches_reference(rng):
    if qk.backend() != "cuda":
        pytest.skip(f"the CUDA extension is not loaded (backend {qk.backend()})")
    _check_kernel(torch.ops.qlora_kernels.adamw_step.default, "cuda", rng, list(_kernel_cases()))
    # the vectorized path over many grid-stride rounds, and the 16-bit grads with a float32 param
    _check_kernel(torch.ops.qlora_kernels.adamw_step.default, "cuda", rng,
                  [(3 * 2**20 + 5, torch.float32, torch.bfloat16, 0), (2**21 + 3, torch.bfloat16, torch.bfloat16, 0)])


@pytest.mark.gpu
def test_cuda_kernel_checks_its_arguments(rng):
    if qk.backend() != "cuda":
        pytest.skip(f"the CUDA extension is not loaded (backend {qk.backend()})")
    (p, g, m, v), s = _op_args(10, torch.float32, torch.float32, rng, "cuda")
    op = torch.ops.qlora_kernels.adamw_step.default
    with pytest.raises(RuntimeError, match=r"grad: expected 10 elements \(as param\), got 9"):
        op(p, g[:9], m, v, *s)
    with pytest.raises(RuntimeError, match="exp_avg: expected dtype Float, got BFloat16"):
        op(p, g, m.bfloat16(), v, *s)
    with pytest.raises(RuntimeError, match="exp_avg_sq: expected a CUDA tensor, got one on cpu"):
        op(p, g, m, v.cpu(), *s)
    with pytest.raises(RuntimeError, match="grad: expected a contiguous tensor"):
        op(p, torch.randn(20, device="cuda")[::2], m, v, *s)
    with pytest.raises(RuntimeError, match="bias_correction2: expected a value in"):
        op(p, g, m, v, *s[:6], 1.5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_paging_with_prefetch_equals_unpaged(dtype, rng):
    # ~260k elements in pages of 4096: dozens of host pages through the two staging slots, the
    # budget holding the first tens of thousands of elements on the device
    shapes = [(64, 1000), (1000, 64), (4097,), (33, 7)] * 8
    base = make_params(rng, dtype, "cuda", shapes)
    runs = {}
    for name, kw in [("device", dict(paged=False)), ("all_paged", dict(paged=True, page_bytes=8 * 4096)),
                     ("budget", dict(paged="auto", device_budget_bytes=600_000, page_bytes=8 * 4096))]:
        params = clone_params(base)
        gs, hyper = groups(params, 0.01)
        opt = PagedAdamW(gs, **hyper, **kw)
        g = torch.Generator(device="cuda").manual_seed(1)
        for _ in range(4):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g, device="cuda").to(dtype)
            opt.step()
        runs[name] = (params, opt)
    placed = runs["budget"][1].state_bytes()
    assert 0 < placed["device"] <= 600_000 - 2 * 8 * 4096 and placed["host"] > 0
    assert runs["all_paged"][1].state_bytes()["device"] == 0
    chunk = next(c for b in runs["all_paged"][1]._buckets[0] for c in b.chunks)
    assert chunk.exp_avg.is_pinned() and not chunk.exp_avg.is_cuda
    # the same kernel on the same inputs: any ordering slip between the streams shows as a difference
    for name in ("all_paged", "budget"):
        for p, q in zip(runs[name][0], runs["device"][0]):
            assert torch.equal(p, q), name
        sd, sd_ref = runs[name][1].state_dict(), runs["device"][1].state_dict()
        for k, s in sd_ref["state"].items():
            assert torch.equal(sd["state"][k]["exp_avg_sq"].cuda(), s["exp_avg_sq"]), name
    # and torch.optim.AdamW (float32 params: up to an ulp per step from fused multiply-adds)
    if dtype == torch.float32:
        ref = clone_params(base)
        gs, hyper = groups(ref, 0.01)
        torch_opt = torch.optim.AdamW(gs, **hyper, foreach=False)
        g = torch.Generator(device="cuda").manual_seed(1)
        for _ in range(4):
            for p in ref:
                p.grad = torch.randn(p.shape, generator=g, device="cuda")
            torch_opt.step()
        for p, q in zip(runs["budget"][0], ref):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
def test_gpu_device_limit_pages_what_does_not_fit(rng):
    # a ceiling 3 MiB of state above what the card holds now (plus the 256 MiB margin): of
    # ~12 MiB of state, a part stays on the device, the rest is paged, and the card stays under
    params = make_params(rng, torch.float32, "cuda", [(1000, 1000), (500, 1000)])
    for p in params:
        p.grad = torch.randn_like(p)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()  # earlier tests' peaks are not this step's
    free, total = torch.cuda.mem_get_info()
    limit = (total - free) + (256 << 20) + (3 << 20)
    opt = PagedAdamW(params, lr=1e-3, device_limit_bytes=limit, page_bytes=1 << 20, flatten_params=False)
    opt.step()
    placed = opt.state_bytes()
    assert 0 < placed["device"] <= 3 << 20
    assert placed["host"] >= 12_000_000 - placed["device"]


@pytest.mark.parametrize("device", DEVICES)
def test_zero_grad_keeps_the_flat_gradient_and_defer_is_a_plain_step_without_gpu_pages(device, rng):
    # zero_grad(set_to_none=False) zeroes the flat buffer in place: the grads stay its views.
    # step(defer_host_pages=True) equals step() wherever nothing can be deferred (the CPU, or
    # no host pages); update_event tells which params a deferred step leaves for later.
    runs = []
    for defer in (False, True):
        params = make_params(torch.Generator().manual_seed(3), torch.float32, device)
        opt = PagedAdamW(params, **HYPER, paged=False)
        with pytest.raises(RuntimeError, match="first step"):
            opt.update_event(params)
        g = torch.Generator().manual_seed(4)
        for step in range(3):
            grads = random_grads(params, g)
            for p, x in zip(params, grads):
                if p.grad is None:
                    p.grad = x
                else:
                    p.grad += x  # accumulates into the flat buffer once the optimizer made it
            opt.step(defer_host_pages=defer)
            ptrs = [p.grad.data_ptr() for p in params]
            opt.zero_grad(set_to_none=False)
            assert [p.grad.data_ptr() for p in params] == ptrs
            assert all(torch.count_nonzero(p.grad) == 0 for p in params)
        assert opt.update_event(params) is None  # all of the state is on the device
        runs.append([p.detach().clone() for p in params])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_gpu_deferred_host_pages_equal_a_plain_step(rng):
    # the host pages' updates left running on the update stream (and the next zero_grad queued
    # behind them) give what a plain step gives, bit for bit, once the stream waits for them
    shapes = [(64, 1000), (1000, 64), (4097,), (33, 7)] * 4
    base = make_params(rng, torch.bfloat16, "cuda", shapes)
    runs = {}
    for defer in (False, True):
        params = clone_params(base)
        # 16 pages of 4096 elements on the device (the first param's 64000 among them), the rest paged
        opt = PagedAdamW(params, lr=1e-2, paged="auto", device_budget_bytes=600_000, page_bytes=8 * 4096)
        g = torch.Generator(device="cuda").manual_seed(1)
        for step in range(5):
            for p in params:
                x = torch.randn(p.shape, generator=g, device="cuda").to(p.dtype)
                if p.grad is None:
                    p.grad = x
                else:
                    p.grad += x  # into the flat buffer, as a backward accumulates
            pager = opt._pagers.get(torch.device("cuda", torch.cuda.current_device()))  # from the first step on
            if defer and pager is not None:
                # the update stream held back (~20 ms): what reads the params or grads before
                # waiting for it would see them half-done
                with torch.cuda.stream(pager.update):
                    torch.cuda._sleep(40_000_000)
            opt.step(defer_host_pages=defer)
            opt.zero_grad(set_to_none=False)
            pager = opt._pagers[torch.device("cuda", torch.cuda.current_device())]
            if defer:
                assert pager.pending
                opt.wait_host_pages()  # before the next gradients go in
                assert not pager.pending
            assert all(torch.count_nonzero(p.grad) == 0 for p in params)
        torch.cuda.synchronize()
        runs[defer] = (params, opt)
    opt = runs[True][1]
    placed = opt.state_bytes()
    assert placed["device"] > 0 and placed["host"] > 0
    assert opt.update_event(runs[True][0][:1]) is None  # the first param's state is on the device
    assert opt.update_event(runs[True][0][-1:]) is not None
    assert opt.update_done_event("cuda") is not None
    for p, q in zip(*(runs[d][0] for d in (False, True))):
        assert torch.equal(p, q)
    sd, sd_ref = runs[True][1].state_dict(), runs[False][1].state_dict()
    for k, s in sd_ref["state"].items():
        assert torch.equal(sd["state"][k]["exp_avg"].cuda(), s["exp_avg"].cuda())
