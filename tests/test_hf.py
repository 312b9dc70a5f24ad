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
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=rng) * 0.2)
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
