"""The QLoRA trainer on the CPU with tiny models: learning, exact resume, peft compatibility
of the adapter, data handling and bad input."""

import json
import math
import os
import shutil

import pytest
import torch

from qlora_kernels import add_lora, peft_format
from qlora_kernels.nn import Linear4bit
from qlora_kernels.train import DataError, ModelError, TrainConfig, TrainingError, train
from qlora_kernels.train import cli, data, loop, model as model_mod
from qlora_kernels.train.config import MODEL_SHAPES
from qlora_kernels.train.tokenizer import ByteTokenizer


@pytest.fixture(autouse=True)
def micro_model(monkeypatch):
    """Tests train a smaller random LLaMA than the built-in job's, to take seconds on 2 cores."""
    monkeypatch.setitem(MODEL_SHAPES, "tiny", dict(hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                                                   num_attention_heads=2, vocab_size=320))


def small_config(tmp_path, **overrides) -> TrainConfig:
    """The built-in job cut down to seconds: rank 8, a few short steps."""
    values = dict(output_dir=str(tmp_path / "run"), max_steps=6, batch_size=4, grad_accum=2, lora_r=8,
                  learning_rate=2e-3, eval_steps=0, save_steps=0, progress=False, plot=False,
                  sample_max_new_tokens=0, gradient_checkpointing=True, eval_fraction=0.0)
    values.update(overrides)
    return TrainConfig(**values)


def write_jsonl(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


# --------------------------------------------------------------------------------------------
# learning
def test_loss_goes_down_on_builtin_data(tmp_path):
    cfg = small_config(tmp_path, max_steps=16, grad_accum=1, batch_size=8, plot=True, eval_steps=8,
                       sample_max_new_tokens=4, eval_fraction=0.05)
    result = train(cfg)
    losses = [loss for _, loss in result.losses]
    assert len(losses) == 16
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first - 0.3, f"loss did not fall: {first:.3f} -> {last:.3f}"
    assert result.eval_losses[0][0] == 0 and result.eval_losses[-1][0] == 16
    assert result.eval_losses[-1][1] < result.eval_losses[0][1] - 0.2
    assert os.path.isfile(os.path.join(result.adapter_dir, "adapter_model.safetensors"))
    assert os.path.getsize(result.plot_path) > 1000
    with open(result.metrics_path) as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records] == list(range(0, 17))
    assert all(r["tokens_per_s"] > 0 and r["grad_norm"] > 0 for r in records[1:])
    assert result.sample_prompt.startswith("### Instruction:")


# --------------------------------------------------------------------------------------------
# checkpoints
class Killed(Exception):
    pass


def test_kill_and_resume_reproduces_losses_exactly(tmp_path):
    # dropout on, so the restored RNG states matter; the kill lands between checkpoints
    base = dict(max_steps=6, save_steps=2, lora_dropout=0.1)
    full = train(small_config(tmp_path / "a", **base))

    def kill(step, _):
        if step == 5:
            raise Killed

    with pytest.raises(Killed):
        train(small_config(tmp_path / "b", **base), on_step=kill)
    assert [s for s, _ in loop.checkpoints(str(tmp_path / "b" / "run"))] == [2, 4]
    resumed = train(small_config(tmp_path / "b", resume=True, **base))
    assert resumed.losses == full.losses[4:]  # exactly: same data, dropout masks and updates
    from safetensors.torch import load_file

    a = load_file(os.path.join(full.adapter_dir, "adapter_model.safetensors"))
    b = load_file(os.path.join(resumed.adapter_dir, "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with open(resumed.metrics_path) as f:
        assert [json.loads(line)["step"] for line in f] == list(range(1, 7))


def test_resume_with_changed_options_is_refused(tmp_path):
    train(small_config(tmp_path, max_steps=2, save_steps=1))
    with pytest.raises(ValueError, match="batch_size"):
        train(small_config(tmp_path, max_steps=3, batch_size=2, resume=True))


def test_resume_compares_the_resolved_adapter_dtype():
    saved = TrainConfig(lora_dtype="bf16").to_dict()
    loop._check_resumable(saved, TrainConfig(lora_dtype="bf16"), "ckpt")
    with pytest.raises(ValueError, match=r"lora_dtype: 'bf16' -> 'fp32'"):
        loop._check_resumable(saved, TrainConfig(lora_dtype="fp32"), "ckpt")
    # a checkpoint from before the option had float32 adapters
    old = {k: v for k, v in saved.items() if k != "lora_dtype"}
    loop._check_resumable(old, TrainConfig(lora_dtype="fp32"), "ckpt")
    with pytest.raises(ValueError, match=r"lora_dtype: 'fp32' -> 'bf16'"):
        loop._check_resumable(old, TrainConfig(lora_dtype="bf16"), "ckpt")


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    real = loop.token_loss_sum
    calls = {"n": 0}

    def poisoned(model, batch, device):
        loss, n = real(model, batch, device)
        calls["n"] += 1
        # micro-batches 7-8 make step 4 (grad_accum=2); training calls only (eval is off)
        return (loss * float("nan") if calls["n"] >= 7 else loss), n

    monkeypatch.setattr(loop, "token_loss_sum", poisoned)
    cfg = small_config(tmp_path, max_steps=6, save_steps=3)
    with pytest.raises(TrainingError, match=r"loss is nan at step 4.*checkpoint-3"):
        train(cfg)
    assert [s for s, _ in loop.checkpoints(cfg.output_dir)] == [3]
    state = torch.load(os.path.join(cfg.output_dir, "checkpoint-3", loop.STATE_FILE), weights_only=False)
    assert state["step"] == 3 and state["position"] == 6
    assert not os.path.exists(os.path.join(cfg.output_dir, "adapter"))


# --------------------------------------------------------------------------------------------
# peft reads the adapter
def test_peft_loads_saved_adapter_with_same_logits(tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import LlamaForCausalLM

    cfg = small_config(tmp_path, max_steps=3, lora_dropout=0.0)
    result = train(cfg)
    ours = model_mod.random_model("tiny", "cpu", torch.float32, cfg.seed)
    # same base as the trained one, LoRA applied from the saved adapter by our own loader
    add_lora(ours, r=8, alpha=16, dropout=0.0)
    peft_format.load_adapter(ours, result.adapter_dir)
    # the float base peft sees: every Linear holds our dequantized 4-bit weight
    base = LlamaForCausalLM(model_mod.llama_config("tiny")).float()
    state = {}
    for name, module in ours.named_modules():
        if isinstance(module, Linear4bit):
            state[name + ".weight"] = module.dequantize(torch.float32)
    for name, p in ours.named_parameters():
        if "lora_" not in name:
            state[name] = p.detach()
    base.load_state_dict(state, strict=True)
    with open(os.path.join(result.adapter_dir, "adapter_config.json")) as f:
        assert json.load(f)["r"] == 8
    peft_model = peft.PeftModel.from_pretrained(base, result.adapter_dir).eval()
    ids = torch.randint(3, 259, (2, 24))
    ours.eval()
    with torch.no_grad():
        expected = ours(input_ids=ids).logits
        got = peft_model(input_ids=ids).logits
    with torch.no_grad(), peft_model.disable_adapter():
        without = peft_model(input_ids=ids).logits
    assert (without - expected).abs().max() > 1e-3, "the adapter changed nothing; the test would be vacuous"
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------
# data
def test_target_only_loss_masks_the_source():
    tok = ByteTokenizer()
    record = {"instruction": "Reverse the word.", "input": "stone", "output": "enots"}
    ex = data.encode_record(record, tok, template="alpaca-short", source_max_len=384, target_max_len=128,
                            train_on_source=False)
    prompt = data.format_prompt("Reverse the word.", "stone", "alpaca-short")
    n_source = 1 + len(prompt.encode())
    assert ex.n_source == n_source
    assert ex.labels[:n_source] == [data.IGNORE_INDEX] * n_source
    assert ex.labels[n_source:] == ex.input_ids[n_source:] == tok.encode("enots") + [tok.eos_token_id]
    full = data.encode_record(record, tok, template="alpaca-short", source_max_len=384, target_max_len=128,
                              train_on_source=True)
    assert full.labels == full.input_ids
    # the loss counts target tokens only: 5 letters + EOS
    batch = data.collate([ex], tok.pad_token_id)
    assert int((batch["labels"][:, 1:] != data.IGNORE_INDEX).sum()) == 6
    # truncation: source to source_max_len, target to target_max_len
    short = data.encode_record(record, tok, template="alpaca-short", source_max_len=10, target_max_len=3,
                               train_on_source=False)
    assert len(short.input_ids) == 13 and short.labels[10:] == tok.encode("eno")


def test_chat_and_text_records():
    tok = ByteTokenizer()
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    ex = data.encode_record(chat, tok, template="alpaca", source_max_len=384, target_max_len=128,
                            train_on_source=False)
    targets = [t for t in ex.labels if t != data.IGNORE_INDEX]
    assert targets == tok.encode("hello") + [tok.eos_token_id]
    text = data.encode_record({"text": "plain words"}, tok, template="alpaca", source_max_len=384,
                              target_max_len=128, train_on_source=False)
    assert text.labels == text.input_ids


def test_group_by_length_batches_similar_lengths_and_cover_every_example(rng):
    lengths = torch.randint(5, 400, (1000,), generator=rng).tolist()
    spread = {}
    for grouped in (True, False):
        for epoch in (0, 1):
            batches = data.epoch_batches(lengths, 8, seed=3, epoch=epoch, group_by_length=grouped)
            flat = sorted(i for b in batches for i in b)
            assert flat == list(range(1000)), "every example exactly once per epoch"
            assert all(1 <= len(b) <= 8 for b in batches)
        spread[grouped] = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches)
    assert spread[True] < 0.2 * spread[False]
    e0 = data.epoch_batches(lengths, 8, seed=3, epoch=0)
    assert e0 != data.epoch_batches(lengths, 8, seed=3, epoch=1)
    assert e0 == data.epoch_batches(lengths, 8, seed=3, epoch=0), "a pure function of (seed, epoch)"
    assert max(lengths[i] for i in e0[0]) == max(lengths), "the longest batch comes first"


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [
        {"instruction": "a", "output": "b"}, "", '{"instruction": "c", "output": ', {"instruction": "d", "output": "e"}])
    with pytest.raises(DataError, match=r"bad\.jsonl, line 3: not valid JSON"):
        train(small_config(tmp_path, dataset=path))
    assert not os.path.exists(tmp_path / "run"), "nothing ran on bad data"
    path = write_jsonl(tmp_path / "fields.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "x"}])
    with pytest.raises(DataError, match=r"fields\.jsonl, line 2: missing field 'output'"):
        data.load_dataset(path, ByteTokenizer(), template="alpaca", source_max_len=384, target_max_len=128,
                          train_on_source=False)
    path = write_jsonl(tmp_path / "kind.jsonl", [{"question": "a"}])
    with pytest.raises(DataError, match=r"kind\.jsonl, line 1: expected an Alpaca record"):
        data.load_dataset(path, ByteTokenizer(), template="alpaca", source_max_len=384, target_max_len=128,
                          train_on_source=False)


# --------------------------------------------------------------------------------------------
# models
def test_pretrained_directory_loads_layer_by_layer_into_4bit(tmp_path, rng):
    from transformers import LlamaForCausalLM

    config = model_mod.llama_config("tiny")
    config.num_hidden_layers = 2
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=rng)))
    ref = LlamaForCausalLM(config).eval()
    ref.save_pretrained(tmp_path / "m", max_shard_size="300KB")  # sharded: several files + index
    assert os.path.isfile(tmp_path / "m" / "model.safetensors.index.json")
    ours = model_mod.pretrained_model(str(tmp_path / "m"), "cpu", torch.float32).eval()
    n_linear = 0
    for name, module in ref.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            q = ours.get_submodule(name)
            assert isinstance(q, Linear4bit)
            expected = Linear4bit.from_linear(module).dequantize(torch.float32)
            assert torch.equal(q.dequantize(torch.float32), expected)
            n_linear += 1
    assert n_linear == 7 * config.num_hidden_layers
    assert torch.equal(ours.lm_head.weight, ref.lm_head.weight)
    ids = torch.randint(0, 320, (1, 16), generator=rng)
    with torch.no_grad():
        err = (ours(input_ids=ids).logits - ref(input_ids=ids).logits).abs().max()
    assert 0 < err < 0.5  # only the 4-bit rounding differs


def test_model_directory_errors(tmp_path):
    with pytest.raises(ModelError, match="expected a local directory"):
        model_mod.pretrained_model(str(tmp_path / "nowhere"), "cpu", torch.float32)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="config.json"):
        model_mod.pretrained_model(str(tmp_path / "empty"), "cpu", torch.float32)
    model_mod.llama_config("tiny").save_pretrained(tmp_path / "nofiles")
    (tmp_path / "nofiles" / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ModelError, match=r"expected \*\.safetensors.*pytorch_model\.bin"):
        model_mod.pretrained_model(str(tmp_path / "nofiles"), "cpu", torch.float32)
    with pytest.raises(ModelError, match="expected a local directory"):
        train(TrainConfig(model=str(tmp_path / "nowhere"), output_dir=str(tmp_path / "o"), progress=False))


# --------------------------------------------------------------------------------------------
# command line
def test_cli_help_and_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--lora-r", "--resume", "--model-config", "--no-gradient-checkpointing", "--train-on-source"):
        assert flag in out
    cfg = cli.parse_config(["--lora-r", "8", "--no-gradient-checkpointing", "--model-config", "7b",
                            "--learning-rate", "1e-4"])
    assert (cfg.lora_r, cfg.gradient_checkpointing, cfg.model_config, cfg.learning_rate) == (8, False, "7b", 1e-4)
    assert cli.parse_config([]) == TrainConfig()
    with pytest.raises(SystemExit):
        cli.main(["--model-config", "70b"])
    assert "invalid choice" in capsys.readouterr().err


def test_presets_follow_table_8():
    for size in ("7b", "13b"):
        cfg = TrainConfig().resolved(size)
        assert (cfg.lora_dropout, cfg.learning_rate, cfg.max_steps) == (0.1, 2e-4, 1875)
    for size in ("33b", "65b"):
        cfg = TrainConfig().resolved(size)
        assert (cfg.lora_dropout, cfg.learning_rate) == (0.05, 1e-4)
    cfg = TrainConfig()
    assert (cfg.lora_r, cfg.lora_alpha, cfg.adam_beta2, cfg.max_grad_norm, cfg.lr_schedule) == (64, 16, 0.999, 0.3,
                                                                                               "constant")
    assert TrainConfig(learning_rate=5e-5).resolved("65b").learning_rate == 5e-5, "an explicit value wins"
    with pytest.raises(ValueError, match="lora_r"):
        TrainConfig(lora_r=0).validate()


# --------------------------------------------------------------------------------------------
# speed and memory options
def test_lora_dtype_option_sets_the_adapter_dtype(tmp_path):
    # on the CPU the compute dtype is float32; --lora-dtype bf16 still gives bf16 adapters (what
    # "auto" picks on a GPU), trained and saved in that dtype
    result = train(small_config(tmp_path, max_steps=2, lora_dtype="bf16"))
    from safetensors.torch import load_file

    tensors = load_file(os.path.join(result.adapter_dir, "adapter_model.safetensors"))
    assert tensors and all(t.dtype == torch.bfloat16 for t in tensors.values())
    assert all(math.isfinite(loss) for _, loss in result.losses)


def test_new_options_are_validated_and_parsed():
    cfg = cli.parse_config(["--compile", "--max-memory-gib", "40", "--lora-dtype", "fp32"])
    assert (cfg.compile, cfg.max_memory_gib, cfg.lora_dtype) == (True, 40.0, "fp32")
    for bad in (0.0, float("inf")):
        with pytest.raises(ValueError, match=r"^max_memory_gib: expected a positive, finite number of GiB"):
            TrainConfig(max_memory_gib=bad).validate()
    with pytest.raises(ValueError, match=r"^lora_dtype: expected one of"):
        TrainConfig(lora_dtype="int8").validate()


def test_compiled_decoder_layers_match_eager(rng):
    # torch.compile of every decoder layer, under gradient checkpointing and with LoRA dropout:
    # the same loss and gradients as eager (inductor reorders float32 sums: close, not equal)
    if not shutil.which(os.environ.get("CXX", "g++")):
        pytest.skip("inductor on CPU needs a C++ compiler")
    import torch.nn.functional as F

    def run(compiled):
        torch.manual_seed(0)
        model = model_mod.random_model("tiny", "cpu", torch.float32, seed=3)
        add_lora(model, r=8, alpha=16, dropout=0.1)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.05)
        model_mod.enable_checkpointing(model)
        if compiled:
            model_mod.compile_decoder_layers(model)
        model.train()
        ids = torch.randint(3, 300, (2, 40), generator=torch.Generator().manual_seed(5))
        torch.manual_seed(7)  # dropout seeds
        logits = model(input_ids=ids).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss_e, grads_e = run(False)
    loss_c, grads_c = run(True)
    assert grads_e.keys() == grads_c.keys() and len(grads_e) == 2 * 7 * 2
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-4, atol=1e-5)
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], rtol=2e-3, atol=1e-5, msg=name)


def test_chunked_lm_loss_equals_full_logits(rng):
    # the LM head in chunks (3 chunks of 37 rows + a partial one) under checkpoint: the same
    # summed loss and the same gradients as the full logits, ignored targets included
    import torch.nn.functional as F

    from qlora_kernels.train import loss as loss_mod

    model = model_mod.random_model("tiny", "cpu", torch.float32, seed=4)
    add_lora(model, r=8, alpha=16, dropout=0.0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    assert loss_mod.plain_head(model) is not None
    ids = torch.randint(3, 300, (3, 45), generator=rng)
    labels = ids.clone()
    labels[:, :10] = -100  # a source part without loss
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding in the first row
    params = [p for p in model.parameters() if p.requires_grad]

    def grads(fn):
        for p in params:
            p.grad = None
        value = fn()
        value.backward()
        return value.detach(), [p.grad.clone() for p in params]

    def full():
        logits = model(input_ids=ids, attention_mask=mask).logits
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                               ignore_index=-100, reduction="sum")

    want, want_grads = grads(full)
    got, got_grads = grads(lambda: loss_mod.lm_loss_sum(model, ids, labels, mask, chunk_tokens=37))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    with torch.no_grad():  # evaluation: no checkpoint, same value
        torch.testing.assert_close(loss_mod.lm_loss_sum(model, ids, labels, mask, chunk_tokens=37), want,
                                   rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match=r"^chunk_tokens: expected a positive int"):
        loss_mod.lm_loss_sum(model, ids, labels, chunk_tokens=0)
    # one-token sequences have no next token: a zero that backward() still accepts
    one = loss_mod.lm_loss_sum(model, ids[:, :1], labels[:, :1])
    assert one.item() == 0.0 and one.requires_grad
    one.backward()


def test_lm_loss_falls_back_to_full_logits_for_other_heads(monkeypatch):
    from qlora_kernels.train import loss as loss_mod

    model = model_mod.random_model("tiny", "cpu", torch.float32, seed=4)
    monkeypatch.setattr(model.config, "model_type", "gemma2")  # soft-capped logits: not a plain head
    assert loss_mod.plain_head(model) is None
    ids = torch.randint(3, 300, (2, 12))
    with torch.no_grad():
        got = loss_mod.lm_loss_sum(model, ids, ids)
        logits = model(input_ids=ids).logits
    want = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                             reduction="sum")
    torch.testing.assert_close(got, want)


def test_quantize_linears_frees_each_16bit_linear_before_the_next():
    import weakref

    from torch import nn

    block = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 128), nn.Linear(128, 64))
    refs = [weakref.ref(m) for m in block if isinstance(m, nn.Linear)]
    alive_at_init = []

    def init(name, linear):
        alive_at_init.append(sum(r() is not None for r in refs))

    model_mod.quantize_linears(block, quant_type="nf4", blocksize=64, double_quant=True, init=init)
    # at the k-th init only the not-yet-quantized Linears exist: 3, 2, 1
    assert alive_at_init == [3, 2, 1]
    assert all(r() is None for r in refs)
    assert all(isinstance(m, Linear4bit) for m in (block[0], block[2], block[3]))


# --------------------------------------------------------------------------------------------
# --cuda-graphs
def test_graph_batch_pads_to_few_shapes():
    batch = data.collate([data.Example([5, 6, 7], [-100, 6, 7]), data.Example([8] * 70, [-100] * 2 + [8] * 68)],
                         pad_token_id=0)
    ids, labels, inv = loop.graph_batch(batch, rows=3, pad_id=0, n_target=9)
    assert ids.shape == labels.shape == (3, 128)
    assert torch.equal(ids[:2, :70], batch["input_ids"]) and torch.equal(labels[:2, :70], batch["labels"])
    assert (ids[:, 70:] == 0).all() and (ids[2] == 0).all()
    assert (labels[:, 70:] == data.IGNORE_INDEX).all() and (labels[2] == data.IGNORE_INDEX).all()
    assert inv.dtype == torch.float32 and inv.dim() == 0 and float(inv) == pytest.approx(1 / 9)


def test_cuda_graphs_is_ignored_on_the_cpu(tmp_path, capsys):
    result = train(small_config(tmp_path, max_steps=2, cuda_graphs=True, device="cpu"))
    assert len(result.losses) == 2
    assert "cuda_graphs: ignored on the CPU" in capsys.readouterr().out


@pytest.mark.gpu
def test_cuda_graphs_train_and_resume_like_an_uninterrupted_run(tmp_path):
    # the graphed trainer learns, captures one graph per padded shape, and a resumed run (whose
    # first step runs eagerly) draws the same dropout masks as the uninterrupted one
    base = dict(max_steps=8, save_steps=4, lora_dropout=0.1, cuda_graphs=True, device="cuda")
    full = train(small_config(tmp_path / "a", **base))
    assert all(math.isfinite(loss) for _, loss in full.losses)

    def kill(step, _):
        if step == 6:
            raise Killed

    with pytest.raises(Killed):
        train(small_config(tmp_path / "b", **base), on_step=kill)
    resumed = train(small_config(tmp_path / "b", resume=True, **base))
    # GPU kernels (atomics in attention's backward) are not bitwise repeatable: close, not equal
    for (s1, a), (s2, b) in zip(resumed.losses, full.losses[4:]):
        assert s1 == s2 and abs(a - b) < 2e-3 * abs(b), (s1, a, b)
    learned = train(small_config(tmp_path / "c", max_steps=16, grad_accum=1, batch_size=8, cuda_graphs=True,
                                 device="cuda"))
    losses = [loss for _, loss in learned.losses]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3


@pytest.mark.gpu
def test_cuda_graphs_capture_failure_goes_on_eagerly(tmp_path, monkeypatch, capsys):
    from qlora_kernels.train import graphs

    def fail(self, key, inputs):
        raise graphs.GraphCaptureError("GraphedStep: capturing the step failed (injected)")

    monkeypatch.setattr(graphs.GraphedStep, "_capture", fail)
    result = train(small_config(tmp_path, max_steps=4, cuda_graphs=True, device="cuda", lora_dropout=0.1))
    assert len(result.losses) == 4 and all(math.isfinite(loss) for _, loss in result.losses)
    out = capsys.readouterr().out
    assert out.count("continuing without CUDA graphs") == 1


@pytest.mark.gpu
def test_cuda_graphs_with_paged_optimizer_state_train_like_unpaged(tmp_path, capsys):
    # a max_memory_gib just above what the card holds now: the optimizer state goes to host
    # pages, whose updates the graphed trainer defers under the next forward (two micro-batches
    # a step, a checkpoint and an evaluation in between); it must train as the unpaged run does
    base = dict(max_steps=6, save_steps=3, eval_steps=3, eval_fraction=0.1, lora_dropout=0.1, cuda_graphs=True,
                device="cuda")
    unpaged = train(small_config(tmp_path / "a", **base))
    assert "paged to pinned host memory" not in capsys.readouterr().out
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    # the optimizer keeps a 256 MiB margin below the ceiling: none of its state fits under this one
    paged = train(small_config(tmp_path / "b", max_memory_gib=(total - free) / 2**30 + 0.25, **base))
    out = capsys.readouterr().out
    assert "GiB paged to pinned host memory" in out and "its updates run under the next forward" in out
    for (s1, a), (s2, b) in zip(paged.losses, unpaged.losses):
        assert s1 == s2 and abs(a - b) < 2e-3 * abs(b), (s1, a, b)
    for (s1, a), (s2, b) in zip(paged.eval_losses, unpaged.eval_losses):
        assert s1 == s2 and abs(a - b) < 2e-3 * abs(b), (s1, a, b)


def test_loss_plot_without_matplotlib_warns_and_returns_none(tmp_path, monkeypatch):
    """The plot comes after the adapter is saved: a missing matplotlib must not fail the run."""
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(json.dumps({"step": 1, "loss": 2.5}) + "\n" + json.dumps({"step": 2, "loss": 2.0}) + "\n")
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)  # `import matplotlib` raises
    with pytest.warns(UserWarning, match="matplotlib is not installed"):
        assert loop.plot_losses(str(metrics), str(tmp_path / "loss.png")) is None
    assert not (tmp_path / "loss.png").exists()
