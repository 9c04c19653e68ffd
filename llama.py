"""llama.py: a Llama-family decoder written by hand, loading and saving Hugging Face checkpoints.

The LLM half of JMLR (Wang et al. 2024). One file: the config, the model (RMSNorm, rotary position
embeddings, grouped-query attention, SwiGLU MLP), the per-sequence loss the joint method needs,
safetensors loading and saving in the HF layout (Llama-2, Llama-3, TinyLlama, SmolLM2, ...),
KV-cache generation, the tokenizer, and LoRA adapters.

Shape legend:
    B  batch            T  sequence length (new tokens)   S  cached + new tokens
    C  hidden size      H  query heads                     Hkv key/value heads (GQA: H % Hkv == 0)
    D  head dim         V  vocabulary                      F  MLP inner size    r  LoRA rank

Run:
    python llama.py                                  # a tiny random model, seconds, no downloads
    python llama.py CKPT_DIR --prompt "The capital of France is"   # real weights (HF directory)
"""

import argparse
import json
import math
import os
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer as HFTokenizer

import cli


@dataclass
class LlamaConfig:
    """The fields of an HF `config.json` that a Llama forward pass depends on."""
    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 172
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 0                   # 0: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None    # None, {"rope_type": "linear", "factor"}, or "llama3" (below)
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False        # a few Llama-architecture models add biases to q/k/v/o
    mlp_bias: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2   # Llama-3 instruct models list several

    def __post_init__(self):
        if self.head_dim == 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")
        rope_type = (self.rope_scaling or {}).get("rope_type", (self.rope_scaling or {}).get("type"))
        if rope_type not in (None, "default", "linear", "llama3"):
            raise ValueError(f"rope_scaling type {rope_type!r} is not supported: use none, 'linear' or "
                             f"'llama3' (rope_scaling={self.rope_scaling})")

    @classmethod
    def from_hf(cls, hf: dict) -> "LlamaConfig":
        """Build from a parsed HF config.json; refuse architectures this file does not implement."""
        archs = hf.get("architectures") or ["LlamaForCausalLM"]
        if hf.get("model_type", "llama") != "llama" or archs != ["LlamaForCausalLM"]:
            raise ValueError(f"unsupported model: model_type={hf.get('model_type')!r}, architectures={archs}; "
                             "llama.py implements LlamaForCausalLM only (Llama-2/3, TinyLlama, SmolLM2, ...)")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act={hf['hidden_act']!r} is not supported: Llama uses 'silu' (SwiGLU)")
        hf = dict(hf)
        # transformers >= 5 writes rope settings as one `rope_parameters` dict; older files use
        # `rope_theta` plus `rope_scaling`. Accept both.
        rope = dict(hf.pop("rope_parameters", None) or {})
        if "rope_theta" in rope:
            hf.setdefault("rope_theta", rope.pop("rope_theta"))
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            hf.setdefault("rope_scaling", rope)
        if hf.get("head_dim") is None:
            hf["head_dim"] = 0
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in hf.items() if k in names})

    def to_hf(self) -> dict:
        """The config.json that transformers (4.x and 5.x) reads back."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu", **d}


def load_config(ckpt_dir: str | Path) -> LlamaConfig:
    path = Path(ckpt_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no config.json; expected an HF-format checkpoint directory "
                                "(config.json + model.safetensors or model-0000i-of-0000n.safetensors)")
    return LlamaConfig.from_hf(read_json(path, "download or save the checkpoint again"))


# ----------------------------------------------------------------------------------------------
# Rotary position embeddings

def rope_inv_freq(cfg: LlamaConfig) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/D), i < D/2, with optional context-extension scaling. (D/2,)"""
    D = cfg.head_dim
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, D, 2, dtype=torch.float32) / D)
    s = cfg.rope_scaling or {}
    rope_type = s.get("rope_type", s.get("type"))
    if rope_type == "linear":                    # position interpolation: positions / factor
        inv_freq = inv_freq / s["factor"]
    elif rope_type == "llama3":
        # Llama-3.1: long wavelengths (low frequencies) are slowed down by `factor`, short ones kept,
        # and the band in between is interpolated smoothly.
        factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old_ctx = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = ((old_ctx / wavelen - lo) / (hi - lo)).clamp(0.0, 1.0)   # 0: long, 1: short
        inv_freq = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return inv_freq


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables for the given positions, in fp32. Each (T, D)."""
    # assignment: rope: angles (T, D/2) = positions x inv_freq, repeated to (T, D) for the half-split pairs
    angles = positions.float()[:, None] * inv_freq.to(positions.device)[None, :]   # (T, D/2)
    angles = torch.cat([angles, angles], dim=-1)                                     # (T, D)
    return angles.cos(), angles.sin()
    # end assignment: rope


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, D) by position: pair dimension i with i + D/2 (the HF "half-split" layout).

    Meta's original code rotates interleaved pairs (2i, 2i+1) instead. The two are the same model up
    to a fixed permutation of the rows of W_q and W_k, which HF's conversion script applies once; so
    HF-format checkpoints must be used with the half-split layout, and Meta's .pth files with theirs.
    """
    # assignment: rope: x * cos + rotated * sin, where rotated = (-x2, x1) from the halves (x1, x2) of D
    x1, x2 = x.chunk(2, dim=-1)                                  # (B, H, T, D/2) each
    rotated = torch.cat([-x2, x1], dim=-1)                       # (B, H, T, D)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)
    # end assignment: rope


# ----------------------------------------------------------------------------------------------
# Building blocks

class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, computed in fp32 whatever the input dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # assignment: rmsnorm: in fp32, x / sqrt(mean of x^2 over the last dim + eps); back to x's dtype, times weight
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)
        # end assignment: rmsnorm


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The default attention function: q (B, H, T, D), k and v (B, Hkv, S, D) -> (B, H, T, D).

    Query t sits at absolute position S - T + t (the last T of the S keys, as during KV-cache
    decoding) and sees keys 0 .. S - T + t. Any function with this contract can replace it, such
    as S2-Attn for training on long inputs.
    """
    T, S = q.size(2), k.size(2)
    if T == S:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)   # (T, S)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
KVCache = list[tuple[torch.Tensor, torch.Tensor]]   # per layer: k and v buffers, (B, Hkv, S_max, D)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.H, self.Hkv, self.D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        C, bias = cfg.hidden_size, cfg.attention_bias
        self.q_proj = nn.Linear(C, self.H * self.D, bias=bias)
        self.k_proj = nn.Linear(C, self.Hkv * self.D, bias=bias)
        self.v_proj = nn.Linear(C, self.Hkv * self.D, bias=bias)
        self.o_proj = nn.Linear(self.H * self.D, C, bias=bias)

    def forward(self, x, cos, sin, attn_fn: AttentionFn, cache=None, start: int = 0):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.H, self.D).transpose(1, 2)      # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.Hkv, self.D).transpose(1, 2)    # (B, Hkv, T, D)
        v = self.v_proj(x).view(B, T, self.Hkv, self.D).transpose(1, 2)    # (B, Hkv, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:   # write this step's keys and values, attend to everything so far
            k_buf, v_buf = cache
            k_buf[:, :, start:start + T] = k
            v_buf[:, :, start:start + T] = v
            k, v = k_buf[:, :, :start + T], v_buf[:, :, :start + T]       # (B, Hkv, S, D)
        y = attn_fn(q, k, v)                                               # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.H * self.D))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        C, Fi, bias = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = nn.Linear(C, Fi, bias=bias)
        self.up_proj = nn.Linear(C, Fi, bias=bias)
        self.down_proj = nn.Linear(Fi, C, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, attn_fn, cache=None, start=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn_fn, cache, start)
        return x + self.mlp(self.post_attention_layernorm(x))


# ----------------------------------------------------------------------------------------------
# The model

class Llama(nn.Module):
    """Module names follow HF's LlamaForCausalLM minus its `model.` prefix, so that checkpoint keys
    map one to one (see `hf_key`)."""

    def __init__(self, cfg: LlamaConfig, attn_fn: AttentionFn = causal_attention):
        super().__init__()
        self.cfg, self.attn_fn = cfg, attn_fn
        self.train_attn_fn: AttentionFn | None = None   # e.g. S2-Attn: used in training mode only
        self.gradient_checkpointing = False   # recompute each block in backward: memory for time
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02):
        """Random init for from-scratch models: N(0, std) weights, zero biases, unit norms."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None, start: int = 0) -> torch.Tensor:
        """tokens (B, T) -> logits (B, T, V). With a cache, tokens sit at positions start .. start+T-1."""
        return self.lm_head(self.hidden_states(tokens, cache, start))      # (B, T, V)

    def sequence_loss(self, tokens: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
        """sequence_nll(self(tokens), labels) -> (B,), with the output head run only where a label is
        set. JMLR's targets are a few tokens after a long prompt, so the (B, T, V) logits (262 MB per
        2,048-token sequence at Llama-2's vocabulary, in fp32) are never built."""
        target = labels[:, 1:]                                             # position t predicts t + 1
        keep = target != ignore_index                                      # (B, T-1)
        h = self.hidden_states(tokens)[:, :-1][keep]                       # (n, C): labelled positions only
        nll = F.cross_entropy(self.lm_head(h).float(), target[keep], reduction="none")   # (n,)
        return per_row_mean(nll, keep)

    def hidden_states(self, tokens: torch.Tensor, cache: KVCache | None = None, start: int = 0) -> torch.Tensor:
        """tokens (B, T) -> final normalized hidden states (B, T, C), the input of the output head."""
        positions = torch.arange(start, start + tokens.size(1), device=tokens.device)
        cos, sin = rope_cos_sin(positions, rope_inv_freq(self.cfg))       # (T, D) each, fp32
        # a gradient-carrying training pass may use a cheaper attention (S2-Attn); inference and every
        # pass without gradients (JMLR's per-document losses, validation) see full causal attention
        train_fn = self.train_attn_fn if self.training and torch.is_grad_enabled() and cache is None else None
        attn_fn = train_fn or self.attn_fn
        x = self.embed_tokens(tokens)                                      # (B, T, C)
        for i, block in enumerate(self.layers):
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, attn_fn, use_reentrant=False)
            else:
                x = block(x, cos, sin, attn_fn, None if cache is None else cache[i], start)
        return self.norm(x)                                                # (B, T, C)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        """Empty key/value buffers for `max_len` positions, on the model's device and dtype."""
        w = self.embed_tokens.weight
        shape = (batch, self.cfg.num_key_value_heads, max_len, self.cfg.head_dim)
        return [(w.new_zeros(shape), w.new_zeros(shape)) for _ in self.layers]

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, stop_ids: tuple[int, ...] = (),
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Continue prompt (B, T) by up to max_new_tokens -> new tokens (B, N).

        temperature 0 is greedy. A row that emits a stop id keeps repeating it until all rows have
        stopped, so the result stays rectangular. All rows share one prompt length.
        """
        B, T = prompt.shape
        cache = self.new_cache(B, T + max_new_tokens)
        logits = self(prompt, cache, 0)[:, -1]                             # (B, V)
        out, done = [], torch.zeros(B, dtype=torch.bool, device=prompt.device)
        stops = torch.tensor(list(stop_ids), dtype=torch.long, device=prompt.device)
        for i in range(max_new_tokens):
            nxt = sample_next(logits, temperature, top_p, generator)       # (B,)
            nxt = torch.where(done, out[-1] if out else nxt, nxt)
            out.append(nxt)
            done |= torch.isin(nxt, stops)
            if done.all() or i == max_new_tokens - 1:
                break
            logits = self(nxt[:, None], cache, T + i)[:, -1]
        return torch.stack(out, dim=1)

    # ------------------------------------------------------------------------------------------
    # HF-format checkpoints

    @classmethod
    def from_pretrained(cls, ckpt_dir: str | Path, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu") -> "Llama":
        """Load config.json plus model.safetensors or its shards, strictly, tensor by tensor.

        The model is built on the meta device (no memory), every file header is checked against
        it before any data is read, and each tensor goes from the memory-mapped file straight to
        `dtype` on `device`: a 13B checkpoint never exists twice in RAM, and a bad checkpoint
        raises before a half-loaded model can exist.
        """
        ckpt_dir = Path(ckpt_dir)
        cfg = load_config(ckpt_dir)
        with torch.device("meta"):
            model = cls(cfg)
        expected = {hf_key(k): tuple(p.shape) for k, p in model.state_dict().items()
                    if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
        files = checkpoint_files(ckpt_dir)
        found = read_headers(files)                                        # hf key -> (file, shape, dtype)
        if cfg.tie_word_embeddings:   # some exporters also store the tied head; it is the embedding
            found.pop("lm_head.weight", None)
        check_keys_and_shapes(ckpt_dir, expected, found)
        state = {}
        for path in files:
            with open_safetensors(path) as f:
                for k in f.keys():
                    if k in expected:
                        state[model_key(k)] = check_weight_values(f.get_tensor(k), k, path).to(device=device, dtype=dtype)
        model.load_state_dict(state, strict=False, assign=True)   # strictness was checked above
        if cfg.tie_word_embeddings:
            model.lm_head.weight = model.embed_tokens.weight       # assign=True broke the tie
        return model

    def save_pretrained(self, ckpt_dir: str | Path, max_shard_bytes: int = 5 * 2**30):
        """Write config.json and safetensors in the HF layout (sharded with an index above
        max_shard_bytes). LoRA adapters are merged into the saved weights; the model is unchanged."""
        ckpt_dir = Path(ckpt_dir)
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        state, tied = self.export_state_dict()
        shards, size = [{}], 0                                             # greedy, in key order
        for k, t in state.items():
            nbytes = t.numel() * t.element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][k] = t.detach().contiguous().cpu()
            size += nbytes
        names = (["model.safetensors"] if len(shards) == 1 else
                 [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
        for old in ckpt_dir.glob("model*.safetensors*"):                   # stale files of an earlier save
            old.unlink()
        for name, shard in zip(names, shards):
            atomic_write(ckpt_dir / name, lambda p, s=shard: save_file(s, p, metadata={"format": "pt"}))
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                     "weight_map": {k: n for n, s in zip(names, shards) for k in s}}
            atomic_write(ckpt_dir / "model.safetensors.index.json",
                         lambda p: Path(p).write_text(json.dumps(index, indent=2)))
        hf_cfg = {**self.cfg.to_hf(), "tie_word_embeddings": tied,
                  "torch_dtype": str(next(iter(state.values())).dtype).removeprefix("torch.")}
        atomic_write(ckpt_dir / "config.json", lambda p: Path(p).write_text(json.dumps(hf_cfg, indent=2)))

    def export_state_dict(self) -> tuple[dict[str, torch.Tensor], bool]:
        """HF-keyed tensors with LoRA merged, and whether the head is still tied to the embedding
        (a LoRA adapter on a tied head unties it: the merged head differs from the embedding)."""
        state = {k: v for k, v in self.state_dict().items() if ".lora_" not in k}
        for name, m in self.named_modules():
            if isinstance(m, LoRALinear):
                state[f"{name}.weight"] = m.merged_weight()
        tied = self.cfg.tie_word_embeddings and not isinstance(self.lm_head, LoRALinear)
        if tied:
            del state["lm_head.weight"]
        return {hf_key(k): v for k, v in state.items()}, tied


def hf_key(key: str) -> str:
    """Our parameter name -> the HF checkpoint key (HF nests all but the head under `model.`)."""
    return key if key.startswith("lm_head.") else f"model.{key}"


def model_key(key: str) -> str:
    return key.removeprefix("model.")


def checkpoint_files(ckpt_dir: Path) -> list[Path]:
    """model.safetensors, or the shards listed by model.safetensors.index.json."""
    single, index = ckpt_dir / "model.safetensors", ckpt_dir / "model.safetensors.index.json"
    if index.is_file():
        data = read_json(index, "download or save the checkpoint again")
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: no 'weight_map' {{tensor: shard file}}; download or save the checkpoint again")
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (ckpt_dir / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{index} lists shards that do not exist: {missing}")
        return [ckpt_dir / n for n in names]
    if single.is_file():
        return [single]
    raise FileNotFoundError(f"{ckpt_dir}: neither model.safetensors nor model.safetensors.index.json "
                            "(only safetensors checkpoints are read; convert .bin/.pth files first)")


def open_safetensors(path: Path):
    """safe_open with an error that names the file when its header or size is wrong."""
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e}); it may be truncated or "
                         "corrupted: download or save it again") from e


def read_json(path: Path, fix: str):
    """A JSON file's value; invalid UTF-8 or JSON raises naming the file, and `fix` says what to do."""
    try:
        return json.loads(Path(path).read_bytes())
    except ValueError as e:                                    # JSONDecodeError and UnicodeDecodeError
        raise ValueError(f"{path}: not valid JSON ({e}); {fix}") from None


# the safetensors dtypes a weight may be stored in; an int8 or bool tensor is quantized or not a weight
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


def read_headers(files: list[Path], key: Callable[[str], str] = lambda k: k) -> dict[str, tuple[Path, tuple, str]]:
    """key(name) -> (file, shape, safetensors dtype) of every tensor, from the file headers alone. A
    tensor stored in two files is refused: which copy loads would depend on the order of the files."""
    found = {}
    for path in files:
        with open_safetensors(path) as f:
            for k in f.keys():   # noqa: SIM118 (safe_open is not iterable)
                name, s = key(k), f.get_slice(k)
                if name in found:
                    raise ValueError(f"{path}: tensor {k} is also in {found[name][0].name}; a checkpoint stores each "
                                     "tensor once: download or save it again")
                found[name] = (path, tuple(s.get_shape()), s.get_dtype())
    return found


def check_keys_and_shapes(ckpt_dir: Path, expected: dict, found: dict, against: str = "its config.json"):
    """Raise one error that lists every missing key, unexpected key, shape mismatch and non-float
    dtype. expected: {key: shape} of float parameters; found: read_headers's {key: (file, shape, dtype)}."""
    problems = [f"missing tensor {k} (expected shape {list(s)})" for k, s in expected.items() if k not in found]
    problems += [f"unexpected tensor {k} in {p.name}" for k, (p, *_) in found.items() if k not in expected]
    problems += [f"tensor {k} in {found[k][0].name} has shape {list(found[k][1])}, expected {list(s)}"
                 for k, s in expected.items() if k in found and found[k][1] != s]
    problems += [f"tensor {k} in {found[k][0].name} is stored as {found[k][2]}, not a float type "
                 f"({', '.join(FLOAT_DTYPES)})" for k in expected if k in found and found[k][2] not in FLOAT_DTYPES]
    if problems:
        raise ValueError(f"{ckpt_dir}: checkpoint does not match {against}:\n  " + "\n  ".join(problems))


def check_weight_values(t: torch.Tensor, key: str, path: Path) -> torch.Tensor:
    """t, once it holds only finite values (one sum: NaN or inf make it non-finite; in fp32, which
    weights cannot overflow) and is not integer bytes labelled as floats: small integers' bit
    patterns are subnormal floats (below finfo.tiny, which no trained weight is), so most of the
    nonzero values of a strided sample of 4,096 would be."""
    if not math.isfinite(float(t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32))):
        raise ValueError(f"{path}: tensor {key} holds NaN or infinite values; the model it was saved from had "
                         "diverged: use an earlier checkpoint")
    sample = t.reshape(-1)[::max(1, t.numel() // 4096)]
    nonzero = sample != 0
    subnormal = int((nonzero & (sample.abs() < torch.finfo(t.dtype).tiny)).sum())
    if subnormal and 2 * subnormal > int(nonzero.sum()):
        raise ValueError(f"{path}: tensor {key}: {subnormal:,} of {int(nonzero.sum()):,} nonzero values sampled are "
                         f"subnormal {t.dtype} numbers, as when integer bytes are labelled as floats; save the "
                         "weights as float tensors")
    return t


def atomic_write(path: Path, write: Callable[[str], None]):
    """Write to path.tmp, then rename: a crash mid-write never leaves a truncated file at path."""
    tmp = f"{path}.tmp"
    write(tmp)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# Loss and sampling

def sequence_nll(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean next-token NLL of each sequence over its labelled positions: (B, T, V), (B, T) -> (B,).

    labels[b, t] is the token expected at position t (HF convention: labels = tokens with prompt
    positions set to ignore_index); position t is predicted from logits[b, t - 1]. The joint method
    needs one loss per (document, question) pair, hence no mean over the batch.
    """
    target = labels[:, 1:]                                                 # predict t+1 from t
    keep = target != ignore_index                                          # (B, T-1)
    nll = F.cross_entropy(logits[:, :-1][keep].float(), target[keep], reduction="none")   # (n,)
    return per_row_mean(nll, keep)


def per_row_mean(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """values (n,) at the True positions of keep (B, T), in row-major order -> each row's mean (B,)."""
    count = keep.sum(1)                                                    # (B,)
    if (count == 0).any():
        raise ValueError(f"sequence_nll: rows {(count == 0).nonzero().flatten().tolist()} have no labelled "
                         "position (was the target truncated away?)")
    rows = keep.nonzero()[:, 0]                                            # (n,) row of each value
    return torch.zeros(keep.size(0), dtype=values.dtype, device=values.device).index_add(0, rows, values) / count


def sample_next(logits: torch.Tensor, temperature: float, top_p: float,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) -> next tokens (B,): greedy at temperature 0, else nucleus (top-p) sampling."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_p, order = probs.sort(dim=-1, descending=True)                  # (B, V)
    # keep the smallest prefix whose mass reaches top_p (the first token always stays)
    sorted_p[(sorted_p.cumsum(-1) - sorted_p) >= top_p] = 0.0
    # drawn on the generator's device (a CPU generator with CUDA probabilities is refused by ATen)
    device = generator.device if generator is not None else probs.device
    choice = torch.multinomial(sorted_p.to(device), 1, generator=generator).to(probs.device)   # (B, 1); renormalizes
    return order.gather(-1, choice).squeeze(-1)


# ----------------------------------------------------------------------------------------------
# Tokenizer

class Tokenizer:
    """tokenizer.json through the `tokenizers` library, with BOS/EOS added by us, explicitly.

    BOS is prepended when tokenizer_config.json says add_bos_token (Llama-2: yes, SmolLM2: no);
    without that file, when tokenizer.json's own post-processor would add it. EOS is appended
    only when asked (training targets end with it; prompts do not).
    """

    def __init__(self, ckpt_dir: str | Path):
        ckpt_dir = Path(ckpt_dir)
        path = ckpt_dir / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; llama.py reads HF fast-tokenizer files only")
        self.tok = HFTokenizer.from_file(str(path))
        cfg = load_config(ckpt_dir)
        self.bos_id = cfg.bos_token_id
        eos = cfg.eos_token_id
        self.eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        tok_cfg = ckpt_dir / "tokenizer_config.json"
        add_bos = read_json(tok_cfg, "download or write it again").get("add_bos_token") if tok_cfg.is_file() else None
        if add_bos is None:
            add_bos = self.tok.encode("a", add_special_tokens=True).ids[:1] == [self.bos_id]
        self.add_bos = bool(add_bos) and self.bos_id is not None

    def encode(self, text: str, bos: bool | None = None, eos: bool = False) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        if self.add_bos if bos is None else bos:
            ids = [self.bos_id] + ids
        return ids + [self.eos_ids[0]] if eos else ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)


# ----------------------------------------------------------------------------------------------
# LoRA (Hu et al. 2021): W x + (alpha / r) * B A x, with W frozen and A, B trained

@dataclass
class LoraConfig:
    rank: int = 8                    # r: A is (r, in), B is (out, r)
    alpha: float = 16.0              # the update is scaled by alpha / r
    dropout: float = 0.05            # on the adapters' input, in training
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")   # any Linear name, incl. lm_head
    train_embeddings: bool = False   # LongLoRA: embeddings and norms trainable too, for long contexts
    train_norms: bool = False        # the RMSNorm weights


class LoRALinear(nn.Linear):
    """An nn.Linear with a low-rank update. Subclassing keeps the base weight's key (`...q_proj.weight`)
    so HF checkpoints still load; the adapters add `lora_A` (r, in) and `lora_B` (out, r)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias                    # shared, not copied
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout)
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))   # B = 0: the update starts at exactly 0

    def forward(self, x):
        update = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)   # (..., out)
        return F.linear(x, self.weight, self.bias) + self.scale * update

    def merged_weight(self) -> torch.Tensor:
        return self.weight + self.scale * (self.lora_B @ self.lora_A)     # (out, in)


def add_lora(model: Llama, cfg: LoraConfig) -> Llama:
    """Freeze the model, wrap every Linear named in cfg.targets, and leave only adapters (plus
    embeddings/norms if asked) trainable. Returns the same model, changed in place."""
    model.requires_grad_(False)
    wrapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if name in cfg.targets and type(child) is nn.Linear:
                setattr(parent, name, LoRALinear(child, cfg.rank, cfg.alpha, cfg.dropout))
                wrapped += 1
    if wrapped == 0:
        raise ValueError(f"LoRA targets {cfg.targets} match no Linear layer; names are q_proj, k_proj, "
                         "v_proj, o_proj, gate_proj, up_proj, down_proj, lm_head")
    model.embed_tokens.weight.requires_grad_(cfg.train_embeddings)
    for m in model.modules():
        if isinstance(m, RMSNorm):
            m.weight.requires_grad_(cfg.train_norms)
    return model


@torch.no_grad()
def merge_lora(model: Llama) -> Llama:
    """Fold every adapter into its weight and turn it back into a plain nn.Linear (for export)."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                plain = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                  device="meta")
                plain.weight = nn.Parameter(child.merged_weight(), requires_grad=child.weight.requires_grad)
                plain.bias = child.bias
                setattr(parent, name, plain)
    if model.cfg.tie_word_embeddings and model.lm_head.weight is not model.embed_tokens.weight:
        model.cfg.tie_word_embeddings = False   # a merged head adapter made the head its own weight
    return model


# ----------------------------------------------------------------------------------------------
# Demo: generate text

def main():
    p = argparse.ArgumentParser(description="Generate text with llama.py")
    p.add_argument("ckpt_dir", nargs="?", help="HF-format Llama directory; omit for a tiny random model")
    p.add_argument("--prompt", default="The capital of France is", help="the text to continue (default: %(default)r)")
    p.add_argument("--max-new-tokens", type=int, default=30, help="tokens to generate (default %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy; above 0: sampling (default %(default)s)")
    p.add_argument("--top-p", type=float, default=0.9, help="sampling: the smallest set of tokens whose probabilities "
                   "sum to this (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="of the sampler and of the tiny model (default %(default)s)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="weights and compute (default %(default)s)")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device).manual_seed(args.seed)
    if args.ckpt_dir is None:
        print("no checkpoint given: a tiny random-weight model on byte tokens (its text is noise);")
        print("pass an HF-format directory for real text, e.g. one made by tests/convert_gguf.py\n")
        torch.manual_seed(args.seed)
        model = Llama(LlamaConfig()).to(device).eval()
        ids, decode, stops = list(args.prompt.encode()), (lambda t: bytes(t).decode(errors="replace")), ()
    else:
        t0 = time.perf_counter()
        model = Llama.from_pretrained(args.ckpt_dir, getattr(torch, args.dtype), device).eval()
        tok = Tokenizer(args.ckpt_dir)
        n = sum(p.numel() for p in model.parameters())
        print(f"loaded {args.ckpt_dir}: {n / 1e6:,.1f}M parameters in {time.perf_counter() - t0:.1f}s")
        ids, decode, stops = tok.encode(args.prompt), tok.decode, tok.eos_ids
    prompt = torch.tensor([ids], device=device)
    t0 = time.perf_counter()
    out = model.generate(prompt, args.max_new_tokens, args.temperature, args.top_p, stops, gen)[0]
    dt = time.perf_counter() - t0
    print(args.prompt + decode(out.tolist()))
    print(f"\n{len(out)} tokens in {dt:.2f}s ({len(out) / dt:,.1f} tokens/s, KV cache, {device})")


if __name__ == "__main__":
    cli.run(main)
