"""Hugging Face integration: peft-format adapters both ways.

Model-level tests build tiny transformers LLaMA models from a config (no network) on the CPU,
where every op runs the plain-torch reference.
"""

import json
import os

import pytest
import torch
from torch import nn

from qlora_kernels import peft_format

transformers = pytest.importorskip("transformers")


def tiny_llama_config(**overrides):
    kwargs = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=96, max_position_embeddings=64, tie_word_embeddings=False)
    kwargs.update(overrides)
    return transformers.LlamaConfig(**kwargs)


def tiny_llama(rng, dtype=torch.float32, **overrides):
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=rng)))
    model = transformers.LlamaForCausalLM(tiny_llama_config(**overrides)).to(dtype).eval()
    return model


def token_batch(rng, vocab=96, batch=2, seq=12):
    return torch.randint(0, vocab, (batch, seq), generator=rng)


class StandInLoRA(nn.Module):
    """A float LoRA layer with LoRALinear4bit's LoRA interface (lora_A, lora_B, r, lora_alpha,
    scaling, lora_dropout), so the peft format is tested independently of the 4-bit layers."""

    def __init__(self, linear, r, alpha, rng):
        super().__init__()
        self.base = linear
        self.r, self.lora_alpha, self.scaling, self.lora_dropout = r, alpha, alpha / r, 0.0
        self.lora_A = nn.Linear(linear.in_features, r, bias=False)
        self.lora_B = nn.Linear(r, linear.out_features, bias=False)
        with torch.no_grad():
            # B nonzero (unlike a fresh LoRA) so that the adapter changes the output
            self.lora_A.weight.copy_(torch.randn(self.lora_A.weight.shape, generator=rng) * 0.2)
            self.lora_B.weight.copy_(torch.randn(self.lora_B.weight.shape, generator=rng) * 0.2)

    def forward(self, x):
        return self.base(x) + self.scaling * self.lora_B(self.lora_A(x))


def add_stand_in_lora(model, rng, names, r=4, alpha=8, ranks=None):
    for path, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and path.rsplit(".", 1)[-1] in names:
            parent, _, child = path.rpartition(".")
            rank = (ranks or {}).get(path, r)
            setattr(model.get_submodule(parent), child, StandInLoRA(module, rank, alpha, rng))
    return model


def float_copy(model):
    """The float LLaMA with the stand-ins' base linears put back (what peft wraps)."""
    import copy

    base = copy.deepcopy(model)
    for path, module in list(base.named_modules()):
        if isinstance(module, StandInLoRA):
            parent, _, child = path.rpartition(".")
            setattr(base.get_submodule(parent), child, module.base)
    return base


@torch.no_grad()
def logits(model, ids):
    return model(input_ids=ids).logits.float()


# ------------------------------------------------------------------------------------------------
# peft format (stand-in LoRA layers)

@torch.no_grad()
def randomize_peft_lora(peft_model, rng, name_part: str, std: float) -> None:
    """Random values in the peft adapter weights whose names contain ``name_part`` (a fresh B
    is zero, which would make any comparison vacuous)."""
    for name, p in peft_model.named_parameters():
        if name_part in name:
            p.copy_(torch.randn(p.shape, generator=rng) * std)

def test_saved_adapter_has_peft_keys_and_config(rng, tmp_path):
    from safetensors import safe_open

    model = add_stand_in_lora(tiny_llama(rng), rng, {"q_proj", "v_proj", "down_proj"}, r=4, alpha=8)
    out = peft_format.save_adapter(model, tmp_path / "adapter", base_model_name_or_path="tiny")
    cfg = json.load(open(os.path.join(out, "adapter_config.json")))
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM" and cfg["bias"] == "none"
    assert (cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"]) == (4, 8, 0.0)
    assert cfg["target_modules"] == ["down_proj", "q_proj", "v_proj"]
    assert cfg["base_model_name_or_path"] == "tiny" and cfg["rank_pattern"] == {}
    with safe_open(os.path.join(out, "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.metadata() == {"format": "pt"}
        A = f.get_tensor("base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight")
    assert len(keys) == 2 * 2 * 3
    assert "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight" in keys
    assert torch.equal(A, model.model.layers[1].self_attn.q_proj.lora_A.weight)
    # no temporary directory left behind
    assert sorted(os.listdir(tmp_path)) == ["adapter"]


def test_save_into_existing_dir_keeps_other_files(rng, tmp_path):
    model = add_stand_in_lora(tiny_llama(rng), rng, {"o_proj"})
    (tmp_path / "optimizer.pt").write_bytes(b"keep me")
    (tmp_path / "adapter_config.json").write_text("{}")
    peft_format.save_adapter(model, tmp_path)
    assert (tmp_path / "optimizer.pt").read_bytes() == b"keep me"
    assert json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"] == ["o_proj"]
    assert not [n for n in os.listdir(tmp_path.parent) if n.startswith(f".{tmp_path.name}.tmp-")]


def test_our_adapter_loads_in_peft_with_same_logits(rng, tmp_path):
    peft = pytest.importorskip("peft")
    model = add_stand_in_lora(tiny_llama(rng), rng, {"q_proj", "k_proj", "gate_proj", "up_proj"}, r=4, alpha=8,
                              ranks={"model.layers.1.mlp.up_proj": 6})
    # a layer whose scaling is not alpha / r (as after loading an rsLoRA adapter)
    model.model.layers[0].self_attn.k_proj.scaling = 8 / 2.0
    peft_format.save_adapter(model, tmp_path)
    ids = token_batch(rng)
    expected = logits(model, ids)
    loaded = peft.PeftModel.from_pretrained(float_copy(model), tmp_path).eval()
    torch.testing.assert_close(logits(loaded, ids), expected, rtol=1e-5, atol=1e-5)
    # and the adapter actually matters
    assert (logits(float_copy(model), ids) - expected).abs().max() > 1e-2


def test_peft_adapter_loads_into_our_layers_with_same_logits(rng, tmp_path):
    peft = pytest.importorskip("peft")
    base = tiny_llama(rng)
    config = peft.LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "o_proj", "down_proj"],
                             rank_pattern={"layers.1.self_attn.o_proj": 2}, lora_dropout=0.0, task_type="CAUSAL_LM")
    import copy

    pm = peft.get_peft_model(copy.deepcopy(base), config)
    randomize_peft_lora(pm, rng, "lora_", 0.2)
    pm.save_pretrained(tmp_path)
    ids = token_batch(rng)
    expected = logits(pm.eval(), ids)

    ours = add_stand_in_lora(base, rng, {"q_proj", "o_proj", "down_proj"}, r=4, alpha=1,
                             ranks={"model.layers.1.self_attn.o_proj": 2})
    peft_format.load_adapter(ours, tmp_path)
    torch.testing.assert_close(logits(ours, ids), expected, rtol=1e-5, atol=1e-5)
    assert ours.model.layers[0].self_attn.q_proj.scaling == 3.0


def test_load_adapter_errors(rng, tmp_path):
    model = add_stand_in_lora(tiny_llama(rng), rng, {"q_proj", "v_proj"}, r=4)
    peft_format.save_adapter(model, tmp_path / "a")

    other_rank = add_stand_in_lora(tiny_llama(rng), rng, {"q_proj", "v_proj"}, r=8)
    with pytest.raises(ValueError, match="rank 4 in the adapter.*r=8"):
        peft_format.load_adapter(other_rank, tmp_path / "a")

    fewer = add_stand_in_lora(tiny_llama(rng), rng, {"q_proj"}, r=4)
    with pytest.raises(ValueError, match="v_proj, which is a Linear, not a LoRA layer"):
        peft_format.load_adapter(fewer, tmp_path / "a")

    more = add_stand_in_lora(tiny_llama(rng), rng, {"q_proj", "v_proj", "k_proj"}, r=4)
    with pytest.raises(ValueError, match="no weights for 2 LoRA layer"):
        peft_format.load_adapter(more, tmp_path / "a")
    peft_format.load_adapter(more, tmp_path / "a", strict=False)
    assert torch.equal(more.model.layers[0].self_attn.q_proj.lora_B.weight,
                       model.model.layers[0].self_attn.q_proj.lora_B.weight)

    shallower = add_stand_in_lora(tiny_llama(rng, num_hidden_layers=1), rng, {"q_proj", "v_proj"}, r=4)
    with pytest.raises(ValueError, match="does not have.*layers.1"):
        peft_format.load_adapter(shallower, tmp_path / "a")

    wider = add_stand_in_lora(tiny_llama(rng, hidden_size=128), rng, {"q_proj", "v_proj"}, r=4)
    with pytest.raises(ValueError, match="lora_A \\(4, 64\\).*needs \\(4, 128\\)"):
        peft_format.load_adapter(wider, tmp_path / "a")

    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    cfg["use_dora"] = True
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="use_dora=True.*DoRA"):
        peft_format.load_adapter(model, tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="adapter_dir: no adapter_config.json"):
        peft_format.load_adapter(model, tmp_path / "missing")
    with pytest.raises(ValueError, match="has no LoRA layers"):
        peft_format.save_adapter(tiny_llama(rng), tmp_path / "b")


# ------------------------------------------------------------------------------------------------
# quantize_model
import qlora_kernels as qk  # noqa: E402
from qlora_kernels import hf  # noqa: E402
from qlora_kernels.nn import Linear4bit, LoRALinear4bit, set_submodule  # noqa: E402

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "bnb_tiny_llama")


def dequantized_float_copy(model, dtype=torch.float32):
    """A float LLaMA whose linears hold our dequantized weights: the same function as the 4-bit
    model up to kernel error, so it isolates kernel error from quantization error."""
    import copy

    ref = copy.deepcopy(model)
    for name, module in list(ref.named_modules()):
        if isinstance(module, Linear4bit):
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, dtype=dtype)
            with torch.no_grad():
                linear.weight.copy_(module.dequantize(torch.float32))
                if module.bias is not None:
                    linear.bias.copy_(module.bias)
            set_submodule(ref, name, linear)
    return ref.to(dtype)


def test_quantize_model_logits_within_quantization_error_and_generates(rng):
    import copy

    model = tiny_llama(rng)
    float_model = copy.deepcopy(model)
    ids = token_batch(rng)
    expected = logits(model, ids)
    assert qk.quantize_model(model) is model
    linears = {n: m for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    assert len(linears) == 14 and isinstance(model.lm_head, nn.Linear)
    assert not any(isinstance(m, nn.Linear) for n, m in model.named_modules() if n != "lm_head")
    got = logits(model, ids)
    # kernel error alone: the float model over our dequantized weights computes the same
    torch.testing.assert_close(got, logits(dequantized_float_copy(model), ids), rtol=1e-5, atol=1e-5)
    # Quantization error, bounded by measurement: perturb each float weight by Gaussian noise of
    # the same norm as its measured quantization error; the logits must move by about as much
    # as under that noise (NF4's error is close to noise-like), not more than twice.
    noisy = copy.deepcopy(float_model)
    with torch.no_grad():
        for name, layer in linears.items():
            W = noisy.get_submodule(name).weight
            err = (W - layer.dequantize(torch.float32)).norm()
            assert 0.03 < (err / W.norm()).item() < 0.15  # NF4's relative error on Gaussian weights
            noise = torch.randn(W.shape, generator=rng)
            W.add_(noise * (err / noise.norm()))
    noise_err = ((logits(noisy, ids) - expected).norm() / expected.norm()).item()
    logit_err = ((got - expected).norm() / expected.norm()).item()
    assert 0 < logit_err < 2 * noise_err, (logit_err, noise_err)
    # generate() works, greedy tokens as the dequantized float model's (min_new_tokens: a random tiny
    # model can pick its EOS token greedily and stop early; seed 4222045246 did)
    out = model.generate(ids[:1], max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (1, ids.shape[1] + 5)
    ref = dequantized_float_copy(model).generate(ids[:1], max_new_tokens=5, min_new_tokens=5, do_sample=False,
                                                 pad_token_id=0)
    assert torch.equal(out, ref)
    qc = model.config.quantization_config
    assert qc["quant_method"] == "bitsandbytes" and qc["load_in_4bit"] and qc["llm_int8_skip_modules"] == ["lm_head"]
    assert not getattr(model, "is_quantized", False) and getattr(model, "hf_quantizer", None) is None


def test_quantize_model_dtype_moves_keep_the_quant_state(rng):
    model = qk.quantize_model(tiny_llama(rng, dtype=torch.bfloat16), skip=("lm_head", "down_proj"))
    assert isinstance(model.model.layers[0].mlp.down_proj, nn.Linear)
    ids = token_batch(rng)
    before = logits(model, ids)
    layer = model.model.layers[1].self_attn.q_proj
    absmax = layer.nested_absmax.clone()
    model.to(torch.float16).to(torch.bfloat16)  # float buffers of the quant state must stay float32
    assert layer.nested_absmax.dtype == torch.float32 and torch.equal(layer.nested_absmax, absmax)
    assert torch.equal(logits(model, ids), before)


def test_quantize_model_materializes_a_meta_model_layer_by_layer(rng, tmp_path):
    model = tiny_llama(rng, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path)
    expected = qk.quantize_model(model)
    empty = hf.empty_model(model.config, dtype=torch.bfloat16)
    assert all(p.is_meta for p in empty.parameters())
    got = qk.quantize_model(empty, weights=hf.safetensors_weights(tmp_path), device="cpu")
    assert not any(t.is_meta for t in list(got.parameters()) + list(got.buffers()))
    want = expected.state_dict()
    have = got.state_dict()
    assert have.keys() == want.keys()
    for key in want:
        assert torch.equal(have[key], want[key]), key
    with pytest.raises(ValueError, match="meta device; pass weights="):
        qk.quantize_model(hf.empty_model(model.config))


# ------------------------------------------------------------------------------------------------
# Trainer
class TokenDataset(torch.utils.data.Dataset):
    def __init__(self, ids):
        self.ids = ids

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def train_with_trainer(model, rng, out_dir, steps, bf16, device):
    from transformers import Trainer, TrainingArguments

    # counting sequences (each token is the previous one plus 1): a rule the LoRA weights pick
    # up within a few steps, so the loss falls clearly above the noise of random batches
    start = torch.randint(0, 96, (8, 1), generator=rng)
    data = TokenDataset((start + torch.arange(16)) % 96)
    args = TrainingArguments(output_dir=str(out_dir), max_steps=steps, per_device_train_batch_size=4,
                             learning_rate=1e-2, lr_scheduler_type="constant", logging_steps=1, save_strategy="no",
                             report_to=[], bf16=bf16, use_cpu=device == "cpu", gradient_checkpointing=True,
                             dataloader_num_workers=0, disable_tqdm=True, warmup_steps=0)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[hf.SaveAdapterCallback()])
    before = dataset_loss(model, data)
    trainer.train()
    # the loss over the whole (fixed) training set, eval mode: no batch-to-batch noise
    return trainer, (before, dataset_loss(model, data))


@torch.no_grad()
def dataset_loss(model, data):
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ids = data.ids.to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss.item()
    model.train(was_training)
    return loss


def run_trainer_flow(rng, tmp_path, device, bf16):
    model = qk.quantize_model(tiny_llama(rng, dtype=torch.bfloat16).to(device))
    qk.add_lora(model, r=8, alpha=16, dropout=0.0)
    qk.prepare_model_for_training(model)
    assert model.is_gradient_checkpointing and model.config.use_cache is False
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lora_names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert lora_names and all(".lora_A." in n or ".lora_B." in n for n in lora_names)
    trainer, losses = train_with_trainer(model, rng, tmp_path, steps=10, bf16=bf16, device=device)
    # only LoRA parameters reach the optimizer
    in_opt = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert in_opt == {id(p) for n, p in model.named_parameters() if n in lora_names}
    assert losses[1] < 0.9 * losses[0], losses
    after = model.state_dict()
    for key, value in before.items():
        changed = not torch.equal(after[key].cpu(), value.cpu())
        assert changed == (key.endswith("lora_B.weight") or key.endswith("lora_A.weight")), key
    assert os.path.isfile(os.path.join(tmp_path, "adapter", "adapter_model.safetensors"))
    return model


def test_trainer_trains_quantized_lora_model(rng, tmp_path):
    run_trainer_flow(rng, tmp_path, "cpu", bf16=True)


@pytest.mark.gpu
def test_trainer_flow_on_cuda(rng, tmp_path):
    model = run_trainer_flow(rng, tmp_path, "cuda", bf16=True)
    ids = token_batch(rng).cuda()
    model.eval()
    eager = logits(model, ids)
    compiled = torch.compile(model)
    torch.testing.assert_close(logits(compiled, ids), eager, rtol=2e-2, atol=2e-2)
    gpu = hf.load_quantized(FIXTURE, device="cuda")
    check_fixture_hashes(gpu)
    # quantized on the CPU, then moved: the same bytes, the same function
    moved = qk.quantize_model(tiny_llama(rng))
    ids = token_batch(rng)
    on_cpu = logits(moved, ids)
    moved.to("cuda")
    assert moved.model.layers[0].mlp.up_proj.weight.is_cuda
    torch.testing.assert_close(logits(moved, ids.cuda()).cpu(), on_cpu, rtol=1e-3, atol=1e-3)


def test_torch_compile_traces_the_quantized_lora_model(rng):
    model = qk.add_lora(qk.quantize_model(tiny_llama(rng)), r=4, alpha=8, dropout=0.0)
    ids = token_batch(rng)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=False)
    torch.testing.assert_close(logits(compiled, ids), logits(model, ids), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# peft round trip with the real 4-bit LoRA layers
def randomize_lora(model, rng):
    with torch.no_grad():
        for layer in peft_format.lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=rng) * 0.1)


def test_our_4bit_adapter_loads_in_peft_on_the_dequantized_base(rng, tmp_path):
    peft = pytest.importorskip("peft")
    model = qk.add_lora(qk.quantize_model(tiny_llama(rng)), r=8, alpha=16, dropout=0.0).eval()
    randomize_lora(model, rng)
    qk.save_adapter(model, tmp_path)
    ids = token_batch(rng)
    loaded = peft.PeftModel.from_pretrained(dequantized_float_copy(model), tmp_path).eval()
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids), rtol=1e-4, atol=1e-4)


def test_peft_adapter_loads_into_our_4bit_layers(rng, tmp_path):
    peft = pytest.importorskip("peft")
    import copy

    ours = qk.quantize_model(tiny_llama(rng))
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], lora_dropout=0.0,
                             use_rslora=True, task_type="CAUSAL_LM")
    pm = peft.get_peft_model(dequantized_float_copy(ours), config)
    randomize_peft_lora(pm, rng, "lora_B", 0.1)
    pm.save_pretrained(tmp_path)
    ids = token_batch(rng)
    # the plain Linear4bit layers the adapter names become LoRALinear4bit of its rank
    qk.load_adapter(ours, tmp_path)
    assert isinstance(ours.model.layers[0].self_attn.q_proj, LoRALinear4bit)
    assert isinstance(ours.model.layers[0].self_attn.k_proj, Linear4bit)
    assert not isinstance(ours.model.layers[0].self_attn.k_proj, LoRALinear4bit)
    assert ours.model.layers[1].mlp.up_proj.scaling == pytest.approx(8 / 2)  # rsLoRA: alpha / sqrt(r)
    torch.testing.assert_close(logits(ours.eval(), ids), logits(pm.eval(), ids), rtol=1e-4, atol=1e-4)
    # and back: what we save from it loads in peft with the same logits
    qk.save_adapter(ours, tmp_path / "again")
    again = peft.PeftModel.from_pretrained(dequantized_float_copy(ours), tmp_path / "again").eval()
    torch.testing.assert_close(logits(again, ids), logits(ours, ids), rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# bitsandbytes-4bit checkpoints
def bnb_or_none():
    try:
        import bitsandbytes  # noqa: F401
        import bitsandbytes.backends.default.ops  # noqa: F401
    except Exception:  # absent, or broken on this machine: the fixture's stored reference serves
        return None
    return bitsandbytes


def reference_file():
    from safetensors import safe_open

    with safe_open(os.path.join(FIXTURE, "reference.safetensors"), "pt") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}


def tensor_sha256(t):
    import hashlib

    return hashlib.sha256(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def check_fixture_hashes(model):
    meta, tensors = reference_file()
    hashes = {k.removeprefix("sha256:"): v for k, v in meta.items() if k.startswith("sha256:")}
    layers = {n: m for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    assert layers.keys() == hashes.keys()
    for name, layer in layers.items():
        W = layer.dequantize()
        assert W.dtype == torch.bfloat16
        full = tensors.get(f"{name}.weight.dequantized")
        if full is not None:
            assert torch.equal(W.cpu(), full), name
        assert tensor_sha256(W) == hashes[name], name


def bnb_dequantize_all(model):
    """bitsandbytes' dequantization (portable path) of every bnb Linear4bit of a transformers model."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as F
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    out = {}
    for name, m in model.named_modules():
        if isinstance(m, bnb.nn.Linear4bit):
            qs = m.weight.quant_state
            absmax = qs.absmax if not qs.nested else F.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
            out[name] = _dequantize_4bit_compute(m.weight.data.reshape(-1), absmax, qs.code, qs.blocksize,
                                                 tuple(qs.shape), qs.dtype)
    return out


def test_bnb_checkpoint_loads_bit_for_bit_without_bitsandbytes(rng):
    from safetensors.torch import load_file

    model = hf.load_quantized(FIXTURE, device="cpu")
    check_fixture_hashes(model)
    # every stored tensor is in the model exactly as stored
    stored = load_file(os.path.join(FIXTURE, "model.safetensors"))
    state = model.state_dict()
    assert state.keys() == stored.keys()
    for key, value in stored.items():
        assert torch.equal(state[key], value), key
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    # same outputs as the float model over bitsandbytes' dequantized weights (in float32, so
    # that only the kernels' error remains, not bf16 rounding of differently ordered sums)
    ids = reference_file()[1]["input_ids"]
    model32 = hf.load_quantized(FIXTURE, device="cpu", dtype=torch.float32)
    torch.testing.assert_close(logits(model32, ids), logits(dequantized_float_copy(model32), ids),
                               rtol=1e-5, atol=1e-5)
    assert model.generate(ids[:1, :4], max_new_tokens=3, min_new_tokens=3, do_sample=False).shape == (1, 7)
    assert model.config.quantization_config["bnb_4bit_quant_type"] == "nf4"


def test_bnb_checkpoint_matches_live_bitsandbytes():
    if bnb_or_none() is None:
        pytest.skip("bitsandbytes not importable: the fixture's stored reference is checked instead")
    theirs = transformers.LlamaForCausalLM.from_pretrained(FIXTURE, device_map="cpu")
    ours = hf.load_quantized(FIXTURE, device="cpu")
    expected = bnb_dequantize_all(theirs)
    assert len(expected) == 14
    for name, W in expected.items():
        assert torch.equal(ours.get_submodule(name).dequantize(), W), name


@pytest.mark.parametrize("shard", [None, 40_000])
def test_save_quantized_round_trip(rng, tmp_path, shard):
    model = qk.add_lora(qk.quantize_model(tiny_llama(rng, dtype=torch.bfloat16)), r=4, alpha=8, dropout=0.0)
    kwargs = {"max_shard_size": shard} if shard else {}
    out = hf.save_quantized(model, tmp_path / "q", **kwargs)
    files = sorted(os.listdir(out))
    assert ("model.safetensors.index.json" in files) == bool(shard)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".q.tmp-")]
    loaded = hf.load_quantized(out, device="cpu")
    want = {k: v for k, v in model.state_dict().items() if ".lora_" not in k}
    have = loaded.state_dict()
    assert have.keys() == want.keys()
    for key in want:
        assert torch.equal(have[key], want[key]), key
    cfg = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
    assert cfg["quant_method"] == "bitsandbytes" and cfg["bnb_4bit_use_double_quant"] is True
    if bnb_or_none() is not None:
        theirs = transformers.LlamaForCausalLM.from_pretrained(out, device_map="cpu")
        for name, W in bnb_dequantize_all(theirs).items():
            assert torch.equal(loaded.get_submodule(name).dequantize(), W), name


@pytest.mark.parametrize("device_map", ["cpu", {"": "cpu"}, {"model": "cpu", "lm_head": torch.device("cpu")}])
def test_load_quantized_device_map_one_device(device_map, rng):
    """A transformers-style device_map naming one device loads as device= does, and leaves
    hf_device_map as from_pretrained would."""
    model = hf.load_quantized(FIXTURE, device_map=device_map)
    assert model.hf_device_map == {"": "cpu"}
    plain = hf.load_quantized(FIXTURE, device="cpu")
    tokens = torch.randint(0, model.config.vocab_size, (2, 7), generator=rng)
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, plain(tokens).logits)
    assert not hasattr(plain, "hf_device_map")


@pytest.mark.parametrize("device_map,match", [
    ({"model": "cpu", "lm_head": "cuda:1"}, "expected one device"),
    ({}, "expected one device.*an empty map"),
    ("disk", "expected a device"),
    (True, "expected a device"),
])
def test_load_quantized_device_map_errors(device_map, match):
    with pytest.raises(ValueError, match=f"device_map: {match}"):
        hf.load_quantized(FIXTURE, device_map=device_map)
    with pytest.raises(ValueError, match="device, device_map: give one"):
        hf.load_quantized(FIXTURE, device="cpu", device_map="cpu")


def test_load_quantized_errors(rng, tmp_path):
    model = tiny_llama(rng, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "float")
    with pytest.raises(ValueError, match="has no 4-bit weights"):
        hf.load_quantized(tmp_path / "float", device="cpu")
    with pytest.raises(ValueError, match="dtype: expected"):
        hf.load_quantized(FIXTURE, device="cpu", dtype=torch.int8)
    with pytest.raises(ValueError, match="has no Linear4bit layers"):
        hf.save_quantized(model, tmp_path / "q")


def test_safetensors_weights_reads_shards_lazily(tmp_path):
    """An index lists the shards; without one, model.safetensors alone; without that, every
    *.safetensors file. Membership is answered from the names, without reading a tensor."""
    from safetensors.torch import save_file

    a, b = torch.randn(3, 5), torch.arange(7, dtype=torch.int32)
    save_file({"layer.a": a}, str(tmp_path / "part-1.safetensors"))
    save_file({"layer.b": b}, str(tmp_path / "part-2.safetensors"))
    weights = hf.safetensors_weights(tmp_path)
    assert sorted(weights) == ["layer.a", "layer.b"] and "layer.c" not in weights
    assert torch.equal(weights["layer.a"], a) and torch.equal(weights["layer.b"], b)
    save_file({"only": a}, str(tmp_path / "model.safetensors"))
    assert list(hf.safetensors_weights(tmp_path)) == ["only"]
    with open(tmp_path / "model.safetensors.index.json", "w") as f:
        json.dump({"weight_map": {"layer.b": "part-2.safetensors"}}, f)
    assert list(hf.safetensors_weights(tmp_path)) == ["layer.b"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        hf.safetensors_weights(empty)
