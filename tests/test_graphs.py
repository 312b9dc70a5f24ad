"""CUDA graphs of a training step (qlora_kernels.train.graphs.GraphedStep) and the device-held
dropout seeds they rely on."""

from __future__ import annotations

import pytest
import torch

import qlora_kernels as qk
from qlora_kernels.nn import LoRALinear4bit
from qlora_kernels.train import model as model_mod
from qlora_kernels.train.loss import lm_loss_sum

HAS_CUDA = torch.cuda.is_available()


def test_lora_layer_reads_its_dropout_seed(rng):
    # LoRALinear4bit.dropout_seed, when set, is the seed of its dropout mask (no draw)
    layer = LoRALinear4bit.from_linear(torch.nn.Linear(130, 70), r=8, alpha=16, dropout=0.3)
    torch.nn.init.normal_(layer.lora_B.weight, std=0.1, generator=rng)
    x = torch.randn(5, 130, generator=rng)
    seed = int(torch.randint(0, 2**62, (), generator=rng))
    layer.dropout_seed = torch.tensor([seed])
    state = torch.get_rng_state()
    got = layer(x)
    assert torch.equal(torch.get_rng_state(), state)
    want = qk.matmul_4bit_lora(x, layer.weight, layer.quant_state, layer.lora_A.weight, layer.lora_B.weight,
                               layer.scaling, 0.3, layer.bias, seed=torch.tensor(seed))
    assert torch.equal(got, want)
    layer.dropout_seed.fill_(seed + 1)
    assert not torch.equal(layer(x), want)


@pytest.mark.skipif(HAS_CUDA, reason="checks the error without a GPU")
def test_graphed_step_needs_a_gpu():
    from qlora_kernels.train.graphs import GraphedStep

    with pytest.raises(RuntimeError, match="CUDA graphs need a CUDA GPU"):
        GraphedStep(torch.nn.Linear(2, 2), [torch.nn.Parameter(torch.ones(2))], lambda m: None)


def tiny_lora_model(seed: int, dropout: float = 0.1):
    model = model_mod.random_model("tiny", "cuda", torch.bfloat16, seed=seed)
    qk.add_lora(model, r=8, alpha=16, dropout=dropout, lora_dtype=torch.bfloat16)
    for m in model.modules():  # B = 0 at init would hide the LoRA branch from dX
        if isinstance(m, LoRALinear4bit):
            torch.nn.init.normal_(m.lora_B.weight, std=0.02)
    model_mod.enable_checkpointing(model)
    model.train()
    return model, [p for p in model.parameters() if p.requires_grad]


def mean_loss(model, ids, scale):
    return lm_loss_sum(model, ids, ids, chunk_tokens=100) * scale


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.gpu
def test_graphed_step_matches_eager_with_the_same_seeds(rng):
    from qlora_kernels.train.graphs import GraphedStep

    model, params = tiny_lora_model(int(torch.randint(0, 1000, (), generator=rng)))
    for p in params:
        p.grad = torch.zeros_like(p)
    step = GraphedStep(model, params, mean_loss, generator=torch.Generator().manual_seed(7))
    seeds = torch.Generator().manual_seed(7)  # the same stream of seeds, for the eager runs
    assert step._seeds.numel() == 4 * 7  # every LoRA layer of the tiny model has dropout

    def batch(n, s):
        return torch.randint(3, 320, (n, s), generator=rng).cuda(), torch.tensor(1.0 / (n * (s - 1)), device="cuda")

    def eager(ids, scale):
        step._seeds.copy_(torch.randint(0, 2**63 - 1, (step._seeds.numel(),), generator=seeds))
        for p in params:
            p.grad.zero_()
        loss = mean_loss(model, ids, scale)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in params]

    for n, s in ((3, 77), (3, 77), (2, 130)):  # a replay of a captured shape, then a new shape
        ids, scale = batch(n, s)
        want_loss, want_grads = eager(ids, scale)
        for p in params:
            p.grad.zero_()
        got_loss = step(ids, scale)
        assert rel(got_loss, want_loss) < 1e-3
        errors = [rel(p.grad, g) for p, g in zip(params, want_grads)]
        assert max(errors) < 2e-2, max(errors)
    assert step.num_graphs == 2
    # each replay draws new masks: the same batch twice gives other gradients
    for p in params:
        p.grad.zero_()
    step(ids, scale)
    first = [p.grad.clone() for p in params]
    for p in params:
        p.grad.zero_()
    step(ids, scale)
    assert min(rel(p.grad, g) for p, g in zip(params, first)) > 0.05
    # replays accumulate into the gradients, as backward does: two replays give the sum of the
    # two eager steps with the same seeds
    step.generator = torch.Generator().manual_seed(11)
    seeds = torch.Generator().manual_seed(11)
    g1 = eager(ids, scale)[1]
    g2 = eager(ids, scale)[1]
    for p in params:
        p.grad.zero_()
    step(ids, scale)
    step(ids, scale)
    errors = [rel(p.grad, a + b) for p, a, b in zip(params, g1, g2)]
    assert max(errors) < 2e-2, max(errors)
    # close(): the graphs go, and the layers draw their own seeds again
    step.close()
    assert step.num_graphs == 0
    assert all(m.dropout_seed is None for m in model.modules() if isinstance(m, LoRALinear4bit))


@pytest.mark.gpu
def test_graphed_step_refuses_moved_gradients_and_python_values(rng):
    from qlora_kernels.train.graphs import GraphCaptureError, GraphedStep

    model, params = tiny_lora_model(3)
    step = GraphedStep(model, params, lambda m, ids: lm_loss_sum(m, ids, ids) / ids.numel())
    ids = torch.randint(3, 320, (2, 40), generator=rng).cuda()
    loss = step(ids)
    assert torch.isfinite(loss) and loss.item() > 0
    with pytest.raises(TypeError, match=r"inputs\[0\]: expected a tensor"):
        step(5)
    # max_graphs: a new shape beyond it is refused (nothing runs), the old one still replays
    one = GraphedStep(model, params, lambda m, ids: lm_loss_sum(m, ids, ids) / ids.numel(), max_graphs=1)
    assert torch.isfinite(one(ids))
    with pytest.raises(GraphCaptureError, match=r"already 1 graphs \(max_graphs\) and a new input shape \[\[2, 41\]\]"):
        one(torch.randint(3, 320, (2, 41), generator=rng).cuda())
    assert torch.isfinite(one(ids)) and one.num_graphs == 1
    params[0].grad = None  # zero_grad(set_to_none=True)
    with pytest.raises(RuntimeError, match="zero_grad\\(set_to_none=False\\)"):
        step(ids)
    with pytest.raises(ValueError, match="warmup: expected a positive int"):
        GraphedStep(model, params, lambda m, ids: None, warmup=0)
    with pytest.raises(ValueError, match="params: expected the trainable parameters"):
        GraphedStep(model, [], lambda m, ids: None)


@pytest.mark.gpu
def test_a_failed_capture_raises_graph_capture_error(rng):
    from qlora_kernels.train.graphs import GraphCaptureError, GraphedStep

    model, params = tiny_lora_model(4)

    def syncing_loss(m, ids):
        loss = lm_loss_sum(m, ids, ids) / ids.numel()
        if loss.item() > 1e9:  # a host sync: fine eagerly, not allowed in a capture
            raise AssertionError
        return loss

    step = GraphedStep(model, params, syncing_loss)
    ids = torch.randint(3, 320, (2, 40), generator=rng).cuda()
    with pytest.raises(GraphCaptureError, match=r"capturing the step for input shapes \[\[2, 40\]\] failed"):
        step(ids)
    # the process goes on: the same step eagerly, with fresh seeds, on the stream it was on,
    # and the CUDA generator (left marked as capturing by torch) draws again
    assert torch.cuda.current_stream() == torch.cuda.default_stream()
    torch.rand(3, device="cuda")
    before = [p.grad.clone() for p in params]
    loss = step.eager(ids)
    assert torch.isfinite(loss)
    assert any(not torch.equal(p.grad, b) for p, b in zip(params, before))


@pytest.mark.gpu
def test_graphs_overlap_deferred_host_pages_and_train_as_without(rng):
    # PagedAdamW pages most of the tiny model's LoRA state; stepped with defer_host_pages, the
    # graphs wait for each decoder layer's pages as the forward reaches it. The run must train
    # as the one whose optimizer finishes every page before the next replay. A missing wait
    # would read params one update old (lr 1e-2: a large difference), and a zeroing out of
    # order would double the gradients.
    from qlora_kernels.optim import PagedAdamW
    from qlora_kernels.train.graphs import GraphedStep

    seed = int(torch.randint(0, 1000, (), generator=rng))
    batches = [torch.randint(3, 320, (2, 96), generator=rng).cuda() for _ in range(6)]
    scale = torch.tensor(1.0 / (2 * 95), device="cuda")
    runs = {}
    # twice without deferral: how far two identical runs drift apart (atomics in reductions)
    for name, defer in (("plain", False), ("plain again", False), ("deferred", True)):
        torch.manual_seed(seed)  # the same LoRA init in every run
        model, params = tiny_lora_model(seed)
        initial = [p.detach().float().clone() for p in params]
        # pages of 4096 elements; 40960 elements on the device: all of layer 0's 39040, none of
        # the other layers' (two staging slots come out of the budget first)
        opt = PagedAdamW(params, lr=1e-2, paged="auto", device_budget_bytes=400_000, page_bytes=8 * 4096)
        step = GraphedStep(model, params, mean_loss, generator=torch.Generator().manual_seed(5),
                           optimizer=opt if defer else None)
        losses = []
        for i, ids in enumerate(batches):
            loss = (step.eager if i == 0 else step)(ids, scale)  # the first step makes the flat grads
            losses.append(float(loss))
            torch.nn.utils.clip_grad_norm_(params, 0.3)
            if defer and i > 0:
                # hold the update stream back (~20 ms) so that the deferred pages are still
                # being updated when the next replay reaches their layers: without its waits
                # the graph would read them stale, and the backward would race the zeroing
                with torch.cuda.stream(opt._pagers[params[0].device].update):
                    torch.cuda._sleep(40_000_000)
            opt.step(defer_host_pages=defer)
            opt.zero_grad(set_to_none=False)
        opt.wait_host_pages()
        torch.cuda.synchronize()
        placed = opt.state_bytes()
        assert placed["device"] > 0 and placed["host"] > 0
        if defer:
            # every decoder layer holds paged state but the first, which stays on the device
            assert step.layer_waits == 3, step.layer_waits
            assert opt.update_event(list(model.model.layers[0].parameters())) is None
        runs[name] = (losses, [p.detach().float().clone() for p in params])
        moved = min(rel(p.detach(), q) for p, q in zip(params, initial))
        assert moved > 1e-2, moved  # a missed update would show
        step.close()

    def drift(a, b):
        (la, pa), (lb, pb) = runs[a], runs[b]
        return max(abs(x - y) for x, y in zip(la, lb)), max(rel(x, y) for x, y in zip(pa, pb))

    noise_loss, noise_params = drift("plain", "plain again")
    assert noise_loss < 1e-3 and noise_params < 1e-3, (noise_loss, noise_params)
    got_loss, got_params = drift("deferred", "plain")
    assert got_loss <= max(1e-4, 10 * noise_loss), (got_loss, noise_loss)
    assert got_params <= max(1e-3, 10 * noise_params), (got_params, noise_params)
