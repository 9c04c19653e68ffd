"""costs.py: what a JMLR training run costs before it runs: memory per rank, tokens, FLOPs, GPU-hours.

Nothing is loaded: the models are built on the meta device (shapes only) to count parameters, and
the rest is arithmetic on the config. Memory per rank = parameters + gradients + AdamW state (two
fp32 moments per trainable parameter; trainable parameters are fp32, see train.build_model), all
divided by the world size under FSDP, + the activations of one micro-batch. The activation
formulas list, op by op, the tensors that this repository's code saves for backward (llama.Block,
retriever.BertLayer), deduplicated as autograd shares them, modelled as on CUDA: flash or S2-Attn
kernels (no T x T matrix), bool dropout masks. tests/test_costs.py checks them against what autograd
really saves and frees on a CPU.

One optimizer step, per question (jmlr.JMLR.forward), in this order:
  step 1   retriever: the query and N candidate documents re-encoded, with gradients
  step 5   LLM: one generation pass, top_k documents in the prompt, with gradients
  step 3   LLM: m single-document passes, no gradients, in chunks of jmlr.max_pass_tokens
FLOPs: 2 per parameter per token forward; backward 2 per parameter per token for activation
gradients (through frozen weights too) plus 2 per *trainable* parameter per token for weight
gradients (so full fine-tuning costs 6N per trained token and LoRA about 4N); the output head only at
labelled positions (Llama.sequence_loss); causal attention 2*T*H*D per token and layer forward
(S2-Attn: 2*G*H*D), twice that backward. Activation checkpointing's recomputation is reported
apart and not counted as model FLOPs (MFU's convention); embedding lookups count nothing.
train.py's logged MFU counts 2N per token + 4N per trained token over all LLM parameters instead.

Shape legend:  B rows  T tokens per row  n = B*T  C hidden  F MLP inner  H, Hkv heads  D head dim
               V vocabulary  L layers  r LoRA rank  I BERT inner  d ColBERT dim  N candidates

Run:
    python train.py --preset=llama2-13b --dry_run=True        # any config; as below with the defaults
    python costs.py --preset=llama2-13b --world=16 --mfu=0.4 --gpu=A100 --target_tokens=128
"""

import ast
import json
import os
import re
import sys
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
from tokenizers import Tokenizer, models

import cli
import retriever as rt
import train
from jmlr import OptionHead
from llama import Llama, LlamaConfig, LoraConfig, add_lora, load_config


@dataclass
class CostSettings:
    """What the config does not say. Lengths are LLM tokens per row; documents are assumed to
    reach their caps (jmlr.max_doc_tokens, colbert doc_maxlen), as textbook chunks do."""
    question_tokens: int = 256    # question + lettered options + "Answer:"
    target_tokens: int = 32       # " B. answer text" + EOS (more with rationales)
    options: int = 4              # answer options per question (validation scores each one)
    mfu: float = 0.4              # model FLOPs utilization assumed for GPU-hours
    gpu: str = "H100"             # a key of train.PEAK_BF16_FLOPS
    world: int = 0                # ranks; 0: $WORLD_SIZE, else 8 (one node)


# config.json of meta-llama/Llama-2-7b-hf and -13b-hf, for when no checkpoint directory is given
PUBLIC_SHAPES = {
    "7b": LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096),
    "13b": LlamaConfig(vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                       num_attention_heads=40, num_key_value_heads=40, max_position_embeddings=4096),
}
PRESET_SHAPES = {"llama2-7b": "7b", "llama2-13b": "13b"}
GiB = 2**30


# ----------------------------------------------------------------------------------------------
# Shapes and parameter counts

def matching_preset(cfg: train.TrainConfig) -> str:
    """The preset whose settings cfg shares most, by fraction (a config does not record its preset)."""
    def flat(d, prefix=""):   # {"jmlr": {"tau": 1.0}} -> [("jmlr.tau", 1.0)]
        return [x for k, v in d.items()
                for x in (flat(v, f"{prefix}{k}.") if isinstance(v, dict) else [(prefix + k, v)])]

    def value(key):
        obj = cfg
        for part in key.split("."):
            obj = getattr(obj, part)
        return obj
    score = {name: sum(value(k) == v for k, v in flat(p)) / len(flat(p)) for name, p in train.PRESETS.items()}
    return max(score, key=score.get)


def model_dir(cfg: train.TrainConfig, key: str) -> str:
    """cfg.llm or cfg.retriever; for the demo, the directory its first run wrote (train.prepare)."""
    path = getattr(cfg, key)
    if key == "retriever" and path == "minilm":
        path = rt.default_model_dir() or path
    if not path and not cfg.train_file and matching_preset(cfg) == "demo":
        path = str(Path(cfg.out_dir).parent / f"demo-data-seed{cfg.seed}" / key)
    return path


def llm_shape(cfg: train.TrainConfig) -> tuple[LlamaConfig, str]:
    """The LLM's config.json when there is one, else a public Llama-2 shape by name or by preset."""
    path = model_dir(cfg, "llm")
    if path and (Path(path) / "config.json").is_file():
        return load_config(path), f"{path}/config.json"
    size = re.search(r"(7|13)b", Path(path).name.lower()) if path else None
    preset = matching_preset(cfg)
    if size or preset in PRESET_SHAPES:
        key = size.group(0) if size else PRESET_SHAPES[preset]
        why = f"the name {path!r}" if size else f"no config.json at --llm={path!r}; settings match preset {preset}"
        return PUBLIC_SHAPES[key], f"assumed: the public Llama-2-{key.upper()} shape ({why})"
    raise ValueError(f"--llm={path!r} has no config.json and names no Llama-2 size (7b, 13b): give an HF-format "
                     "directory (the demo writes its models on its first run: python train.py)")


def retriever_shape(cfg: train.TrainConfig) -> tuple[rt.BertConfig, rt.ColBERTConfig, str]:
    """config.json (+ its ColBERT settings, as ColBERT.from_pretrained reads them), else ColBERTv2;
    cfg.query_maxlen / doc_maxlen replace them where set, as train.load_retriever does."""
    settings = train.colbert_settings(cfg)
    path = Path(model_dir(cfg, "retriever") or "-") / "config.json"
    if not path.is_file():
        return rt.BertConfig(), replace(rt.ColBERTConfig(), **settings), (
            f"assumed: ColBERTv2 = BERT-base shape + 128-dim projection (no config.json at --retriever={cfg.retriever!r})")
    hf = json.loads(path.read_text())
    return rt.BertConfig.from_hf(hf, path), replace(rt.saved_colbert_config(path.parent, hf), **settings), str(path)


def meta_models(cfg: train.TrainConfig, shape: LlamaConfig, bert: rt.BertConfig, colbert: rt.ColBERTConfig):
    """The LLM and the retriever on the meta device, trainable exactly as train.build_model sets them."""
    specials = ["[PAD]", "[unused0]", "[unused1]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    stub = Tokenizer(models.WordPiece({w: i for i, w in enumerate(specials)}, unk_token="[UNK]"))  # ColBERT wants one
    with torch.device("meta"):
        llm = Llama(shape)
        if cfg.use_lora:
            add_lora(llm, cfg.lora)
        if cfg.option_head:
            llm = OptionHead(llm, list(range(5)))
        retriever = rt.ColBERT(bert, colbert, stub) if cfg.jmlr.objective != "none" else None
    if cfg.freeze_embeddings:
        llm.embed_tokens.weight.requires_grad_(False)
        if retriever is not None:
            retriever.word_embeddings.weight.requires_grad_(False)
    if cfg.jmlr.objective == "rag":
        retriever.requires_grad_(False)
    if cfg.jmlr.objective == "retriever_only":
        llm.requires_grad_(False)
    return llm, retriever


def count(module) -> dict:
    """Parameter counts, tied weights once. matmul: the weights that multiply every token (Linear
    weights and LoRA adapters; not embeddings, norms, biases); head: those of lm_head."""
    out = dict(total=0, trainable=0, matmul=0, matmul_trainable=0, head=0, head_trainable=0)
    for name, p in module.named_parameters() if module is not None else ():
        out["total"] += p.numel()
        out["trainable"] += p.numel() * p.requires_grad
        if p.dim() == 2 and "embed" not in name:
            key = "head" if "lm_head" in name.split(".") else "matmul"
            out[key] += p.numel()
            out[key + "_trainable"] += p.numel() * p.requires_grad
    return out


def param_bytes(module, frozen_bytes: int) -> int:
    """Trainable parameters are fp32 (train.build_model upcasts them); frozen ones frozen_bytes each."""
    return sum(p.numel() * (4 if p.requires_grad else frozen_bytes) for p in module.parameters()) if module else 0


# ----------------------------------------------------------------------------------------------
# Activations: bytes saved for backward, op by op, as llama.py and retriever.py run

@dataclass
class Dtypes:
    """Bytes per element of what a pass stores (train.build_model's dtypes + torch.autocast)."""
    act: int = 4            # Linear and attention outputs: 2 under bf16 autocast
    resid: int = 4          # the residual stream, in the embedding's dtype (fp32 when it trains)
    norm_out: int = 4       # RMSNorm output: its weight's dtype promoted with the residual's
    train_norms: bool = True
    full_ft: bool = True    # every Linear weight trains (no LoRA)
    cuda: bool = False      # dropout masks: bool on CUDA, the input's dtype on CPU


def llm_dtypes(cfg: train.TrainConfig, bf16: bool, cuda: bool) -> Dtypes:
    base = 2 if cfg.use_lora and bf16 else 4                                   # the frozen base weights
    embed_trains = not cfg.freeze_embeddings and (not cfg.use_lora or cfg.lora.train_embeddings)
    norms_train = not cfg.use_lora or cfg.lora.train_norms
    resid = 4 if embed_trains else base
    norm_out = 4 if 4 in (resid, 4 if norms_train else base) else 2
    return Dtypes(2 if bf16 else 4, resid, norm_out, norms_train, not cfg.use_lora, cuda)


def block_saved_bytes(s: LlamaConfig, B: int, T: int, lora: LoraConfig | None, dt: Dtypes) -> int:
    """What one llama.Block saves for backward, B rows of T tokens. A dict keyed by tensor, so a
    tensor that several ops save (the norm output read by q, k and v in fp32) counts once."""
    n, C, F, a = B * T, s.hidden_size, s.intermediate_size, dt.act
    q_width, kv_width = s.num_attention_heads * s.head_dim, s.num_key_value_heads * s.head_dim
    saved = {}

    def norm(tag):   # RMSNorm: x.float() (read by pow and by x * rsqrt), rsqrt (n, 1), and x * rsqrt for weight's grad
        saved[f"{tag}.x32"], saved[f"{tag}.rsqrt"] = n * C * 4, n * 4
        if dt.train_norms:
            saved[f"{tag}.xn"] = n * C * dt.resid

    def linear(name, x, width, x_bytes):   # x: the key of its input tensor, width: its last dim
        targeted = lora is not None and name in lora.targets
        if targeted and lora.dropout > 0:                  # dropout's mask, and dropout(x) that lora_A reads
            saved[f"{name}.mask"] = n * width * (1 if dt.cuda else x_bytes)
            saved[f"{name}.dropped"] = n * width * a
        elif targeted or dt.full_ft:                       # x itself, or its autocast copy (one per Linear)
            saved[x if x_bytes == a else f"{name}.cast"] = n * width * a
        if targeted:
            saved[f"{name}.lora_A_out"] = n * lora.rank * a   # read by lora_B; a frozen W saves nothing

    norm("norm1")
    for proj, width in (("q_proj", q_width), ("k_proj", kv_width), ("v_proj", kv_width)):
        linear(proj, "h1", C, dt.norm_out)
    # SDPA (flash on CUDA, its CPU counterpart here) and S2-Attn's kernel: q, k, v after RoPE, out, lse (B, H, T) fp32;
    # no (T, T) matrix. RoPE saves only cos/sin (T, D): per call under autocast (a cast), once per pass in fp32.
    saved.update(q=n * q_width * a, k=n * kv_width * a, v=n * kv_width * a, out=n * q_width * a,
                 lse=B * s.num_attention_heads * T * 4, rope=4 * T * s.head_dim * 2 if a == 2 else 0)
    linear("o_proj", "out", q_width, a)          # out.transpose(1, 2).reshape is a view: attention returns (B, T, H, D)
    norm("norm2")
    linear("gate_proj", "h2", C, dt.norm_out)
    linear("up_proj", "h2", C, dt.norm_out)
    saved.update(g=n * F * a, silu=n * F * a, up=n * F * a)   # silu(g) saves g; silu(g) * up saves both factors
    linear("down_proj", "p", F, a)
    return sum(saved.values())


def llm_saved_bytes(s: LlamaConfig, B: int, T: int, labelled: int, lora: LoraConfig | None, dt: Dtypes,
                    checkpointing: bool) -> int:
    """A whole gradient-carrying Llama.sequence_loss pass: B rows of T tokens, `labelled` target
    tokens in all. Checkpointing keeps each block's input only (plus cos/sin, shared)."""
    n, C = B * T, s.hidden_size
    per_block = n * C * dt.resid if checkpointing else block_saved_bytes(s, B, T, lora, dt)
    rope = 2 * T * s.head_dim * 4 if checkpointing or dt.act == 4 else 0           # fp32 cos, sin, once
    final = n * C * 4 + n * 4 + (n * C * dt.resid if dt.train_norms else 0)      # the final RMSNorm
    head_in = labelled * s.hidden_size * dt.act if dt.full_ft or (lora and "lm_head" in lora.targets) else 0
    logits = labelled * s.vocab_size * 4                                          # log_softmax's fp32 output
    small = n * 8 + n + labelled * 40                                            # token ids, label mask, indices
    return s.num_hidden_layers * per_block + rope + final + head_in + logits + small


def llm_nograd_bytes(s: LlamaConfig, n: int, labelled: int, dt: Dtypes, lora: LoraConfig | None = None) -> int:
    """Peak of a no-grad pass over n tokens (step 3, validation): every tensor is freed once used, so
    one layer's: the fp32 residual and norm, the MLP's gate, up and product (n, F) (LoRA on gate or
    up adds two: W x and the scaled update coexist with the update), and the labelled positions'
    logits with their fp32 copy and log-softmax."""
    mlp = 3 + 2 * (lora is not None and bool({"gate_proj", "up_proj"} & set(lora.targets)))
    logits = labelled * s.vocab_size * (dt.act + 4 + (4 if dt.act == 2 else 0))
    return n * (2 * s.hidden_size * 4 + mlp * s.intermediate_size * dt.act) + logits


def llm_backward_bytes(s: LlamaConfig, n: int, labelled: int, dt: Dtypes) -> int:
    """Backward's transient tensors beyond the saved ones: in the MLP the product's gradient and the
    two factors' (while the product itself is freed), the residual's gradient in and out, and the
    logits' gradient (fp32 and its log-softmax input's). Saved tensors are freed as backward goes."""
    return n * (2 * s.intermediate_size * dt.act + 2 * s.hidden_size * 4) + 2 * labelled * s.vocab_size * 4


def colbert_saved_bytes(b: rt.BertConfig, c: rt.ColBERTConfig, B: int, N: int, a: int) -> int:
    """JMLR.score_candidates with gradients: B queries of query_maxlen, B*N documents of doc_maxlen
    tokens through retriever.ColBERT, then maxsim. a = 2 under bf16 autocast (LayerNorms stay fp32)."""
    C, I, H, d = b.hidden_size, b.intermediate_size, b.num_attention_heads, c.dim
    total = 0
    for rows, T in ((B, c.query_maxlen), (B * N, c.doc_maxlen)):
        n = rows * T
        x_in = 3 * 2 * C if a == 2 else 4 * C      # q, k, v each save an autocast copy of x; in fp32 x once
        per_token = x_in + 4 * C * a + 2 * (4 * C + 8) + (2 * C if a == 2 else 4 * C) + 2 * I * a
        #           x     q k v out   two LayerNorm inputs + mean, rstd      ffn_in's input  ffn_in out, gelu out
        layer = n * per_token + rows * H * T * 4 + rows * T * a                  # + lse, the converted key mask
        embed = n * 8 + T * 8 + n * (4 * C + 8)                                  # ids, positions, emb_norm input
        head = n * (C * a + d * a + 2 * a)                                       # linear's input, normalize
        total += b.num_hidden_layers * layer + embed + head + n * d * a          # einsum's copy of E
    return total + B * N * c.query_maxlen * (c.doc_maxlen + 1) * a + B * N * c.doc_maxlen   # sim, max, mask


def colbert_nograd_bytes(b: rt.BertConfig, n: int, a: int) -> int:
    """Peak of a no-grad ColBERT pass over n tokens: one layer's fp32 residual and LayerNorm, q, k,
    v and the attention output, and the FFN's (n, I) input and GELU output."""
    return n * (2 * b.hidden_size * 4 + 4 * b.hidden_size * a + 2 * b.intermediate_size * a)


# ----------------------------------------------------------------------------------------------
# FLOPs

def llm_pass_flops(s: LlamaConfig, c: dict, rows: int, T: int, labelled: int, grad: bool,
                   group: int = 0) -> dict:
    """One Llama.sequence_loss pass over rows x T tokens (c = count(llm)). group: S2-Attn's G."""
    tokens, window = rows * T, min(T, group or T)
    attention = rows * s.num_hidden_layers * 2 * T * window * s.num_attention_heads * s.head_dim   # causal
    forward = 2 * c["matmul"] * tokens + 2 * c["head"] * labelled + attention
    out = dict(forward=forward, backward=0, recompute=0)
    if grad:   # activation gradients through every weight, weight gradients for trainable ones only
        out["backward"] = (forward + attention + 2 * c["matmul_trainable"] * tokens
                           + 2 * c["head_trainable"] * labelled)
        out["recompute"] = 2 * c["matmul"] * tokens + attention
    return out


def bert_flops(b: rt.BertConfig, c: dict, rows: int, T: int, grad: bool) -> int:
    """rows sequences of T tokens through ColBERT (c = count(retriever)), every weight trained when
    grad: 2N per token + bidirectional attention 4*T*C per token and layer forward, backward twice."""
    forward = rows * T * (2 * c["matmul"] + b.num_hidden_layers * 4 * T * b.hidden_size)
    return forward * (3 if grad else 1)


# ----------------------------------------------------------------------------------------------
# The estimate of one run, and its report

def estimate(cfg: train.TrainConfig, st: CostSettings) -> dict:
    """Every figure of the report: counts, bytes per rank, tokens and FLOPs per step, GPU-hours."""
    if st.gpu not in train.PEAK_BF16_FLOPS:
        raise ValueError(f"gpu={st.gpu!r}: choose one of {', '.join(train.PEAK_BF16_FLOPS)} (train.PEAK_BF16_FLOPS)")
    (shape, llm_source), (bert, colbert, ret_source) = llm_shape(cfg), retriever_shape(cfg)
    llm, retriever = meta_models(cfg, shape, bert, colbert)
    c_llm, c_ret = count(llm), count(retriever)
    world = st.world or int(os.environ.get("WORLD_SIZE", 0)) or 8
    bf16 = cfg.autocast in ("auto", "bf16")   # every GPU of train.PEAK_BF16_FLOPS has compute capability >= 8.0
    dt, lora = llm_dtypes(cfg, bf16, cuda=True), cfg.lora if cfg.use_lora else None
    j, mb, N, tgt, objective = cfg.jmlr, cfg.micro_batch_size, cfg.num_candidates, st.target_tokens, cfg.jmlr.objective
    m, k = min(j.num_sampled, N), 0 if objective == "none" else j.top_k
    Ld, Lq = colbert.doc_maxlen, colbert.query_maxlen
    T_gen = 1 + k * j.max_doc_tokens + st.question_tokens + tgt                  # BOS, documents, question, target
    T_doc = 1 + j.max_doc_tokens + st.question_tokens + tgt
    llm_grad, has_retriever = objective != "retriever_only", objective != "none"
    ret_grad = doc_passes = objective not in ("rag", "none")                 # steps 2-4 run, the retriever trains
    chunk = lambda rows, T: min(rows, max(1, j.max_pass_tokens // T))   # noqa: E731  rows per no-grad pass

    # 1. parameters, gradients, AdamW state: FSDP shards them all, DDP keeps whole copies (+ its buckets)
    shard, base = world if cfg.fsdp else 1, 2 if cfg.use_lora and bf16 else 4
    trainable, weights = c_llm["trainable"] + c_ret["trainable"], param_bytes(llm, base) + param_bytes(retriever, 4)
    mem = {"parameters": weights / shard, "gradients (fp32)": 4 * trainable / shard,
           "AdamW state (2 x fp32)": 8 * trainable / shard,
           # autocast caches a bf16 copy of each trainable weight it casts, until the autocast region ends
           "autocast's bf16 weight copies": 2 * bf16 * (c_llm["matmul_trainable"] + c_llm["head_trainable"]
                                                         + c_ret["matmul_trainable"])}
    if cfg.fsdp and world > 1:   # the root (embeddings, head, retriever) stays gathered; blocks two at a time
        blocks = (llm.llm if cfg.option_head else llm).layers
        mem["FSDP gathered: root + 2 blocks"] = weights - (len(blocks) - 2) * param_bytes(blocks[0], base)
    elif world > 1:
        mem["DDP gradient buckets"] = 4 * trainable
    static = sum(mem.values())

    # 2. one micro-batch: steps 1 and 5 stay saved until backward, step 3 runs in between, then backward
    ckpt = cfg.activation_checkpointing
    gen = {c: llm_grad * llm_saved_bytes(shape, mb, T_gen, mb * tgt, lora, dt, c) for c in (True, False)}
    act = {f"retriever, step 1 ({mb * N} docs, grads)": ret_grad * colbert_saved_bytes(bert, colbert, mb, N, dt.act),
           f"LLM, step 5 ({'checkpointed' if ckpt else 'no checkpointing'})": gen[ckpt]}
    rows = chunk(mb * m, T_doc)
    transient = {"step 3 no-grad pass": doc_passes * llm_nograd_bytes(shape, rows * T_doc, rows * tgt, dt, lora),
                 "backward" + " + a recomputed block" * ckpt: llm_backward_bytes(shape, mb * T_gen, mb * tgt, dt)
                 + ckpt * block_saved_bytes(shape, mb, T_gen, lora, dt),
                 "retriever no-grad pass": (objective == "rag") * colbert_nograd_bytes(bert, mb * N * Ld, dt.act)}
    rows = chunk(cfg.eval_batch_size * st.options, T_gen)                   # validation: every option scored
    validation = static - mem["gradients (fp32)"] + max(                    # grads freed by zero_grad(set_to_none)
        llm_nograd_bytes(shape, rows * T_gen, rows * tgt, dt, lora),
        has_retriever * colbert_nograd_bytes(bert, cfg.eval_batch_size * N * Ld, dt.act))

    # 3. tokens and FLOPs of one optimizer step: batch_size questions over all ranks
    Bq, group = cfg.batch_size, cfg.s2attn_group_size if cfg.s2attn else 0

    def step_flops(with_docs: bool, retriever_grad: bool) -> dict:
        g = llm_pass_flops(shape, c_llm, Bq, T_gen, Bq * tgt, llm_grad, group)
        d = with_docs * llm_pass_flops(shape, c_llm, Bq * m, T_doc, Bq * m * tgt, False)["forward"]
        r = has_retriever * (bert_flops(bert, c_ret, Bq, Lq, retriever_grad)
                             + bert_flops(bert, c_ret, Bq * N, Ld, retriever_grad))
        return {"LLM generation pass (fwd + bwd)": g["forward"] + g["backward"], "LLM per-document passes (fwd)": d,
                "retriever (fwd + bwd)": r, "model FLOPs": g["forward"] + g["backward"] + d + r,
                "+ checkpointing's recompute": ckpt * g["recompute"]}
    flops = step_flops(doc_passes, ret_grad)
    warm = has_retriever * int(cfg.curriculum * cfg.steps)                 # curriculum steps skip steps 2-4
    total = (cfg.steps - warm) * flops["model FLOPs"] + warm * step_flops(False, False)["model FLOPs"]
    tokens = {"LLM generation pass (grads)": Bq * T_gen,
              "LLM per-document passes (no grad)": doc_passes * Bq * m * T_doc,
              "retriever documents + queries": has_retriever * Bq * (N * Ld + Lq)}
    seen, trained = Bq * T_gen + doc_passes * Bq * m * T_doc, llm_grad * Bq * T_gen
    notes = ([f"batch_size={Bq} is not a multiple of micro_batch_size x world = {mb * world}: train.py refuses it"]
             * bool(Bq % (mb * world)) + [f"the prompt ({T_gen:,} tokens) is longer than the LLM's "
                                          f"max_position_embeddings={shape.max_position_embeddings:,}"]
             * (T_gen > shape.max_position_embeddings))
    return dict(llm_source=llm_source, retriever_source=ret_source, shape=shape, llm=c_llm, retriever=c_ret,
                world=world, accumulation=Bq / (mb * world), bf16=bf16, T_gen=T_gen, T_doc=T_doc, m=m, k=k,
                memory=mem, activations=act, transient=transient, gen_activations=gen, validation_peak=validation,
                peak=static + sum(act.values()) + max(transient.values()), tokens=tokens, flops=flops,
                train_py_flops=2 * c_llm["total"] * seen + 4 * c_llm["total"] * trained, total_flops=total,
                gpu_hours=total / (train.PEAK_BF16_FLOPS[st.gpu] * st.mfu) / 3600, notes=notes, settings=st)


def report(e: dict, cfg: train.TrainConfig) -> str:
    """The estimate as a table for humans: one figure per line, bytes per rank, FLOPs per step."""
    st, s, j, ckpt = e["settings"], e["shape"], cfg.jmlr, cfg.activation_checkpointing
    row = lambda label, value: f"  {label:<52}{value:>16}"   # noqa: E731
    gib = lambda x: f"{x / GiB:,.2f} GiB" if x >= GiB / 10 else f"{x / 2**20:,.1f} MiB"   # noqa: E731
    out = [f"JMLR dry run, objective {j.objective} (nothing loaded; models built on the meta device)",
           f"LLM: {s.num_hidden_layers} layers, hidden {s.hidden_size:,}, heads {s.num_attention_heads}/"
           f"{s.num_key_value_heads}, MLP {s.intermediate_size:,}, vocab {s.vocab_size:,}; {e['llm_source']}",
           f"retriever: {e['retriever_source']}",
           f"{e['world']} rank(s) ({'FSDP' if cfg.fsdp else 'DDP'}; --world=N or WORLD_SIZE, else 8) x micro-batch "
           f"{cfg.micro_batch_size} x {e['accumulation']:g} accumulation step(s) = batch {cfg.batch_size}; "
           + (f"bf16 autocast, {'frozen base bf16, ' * cfg.use_lora}trainable fp32" if e["bf16"] else "fp32"),
           f"rows: generation 1 + {e['k']} docs x {j.max_doc_tokens} + {st.question_tokens} question + "
           f"{st.target_tokens} target = {e['T_gen']:,} tokens; per-document ({e['m']} per question) "
           f"{e['T_doc']:,}; retriever query_maxlen + {cfg.num_candidates} docs x doc_maxlen (assumed: documents "
           "reach their caps)", "", f"  {'parameters':<52}{'LLM':>16}{'retriever':>16}"]
    out += [row(key, f"{e['llm'][key]:,}") + f"{e['retriever'][key]:>16,}" for key in ("total", "trainable")]
    out += ["", "memory per rank"] + [row(key, gib(v)) for key, v in e["memory"].items() if v]
    out += [row("activations: " + key, gib(v)) for key, v in e["activations"].items()]
    out += [row(f"  (step 5 {'without' if ckpt else 'with'} checkpointing)", gib(e["gen_activations"][not ckpt]))]
    out += [row("transient: " + key, gib(v)) for key, v in e["transient"].items() if v]
    out += [row("peak, training step", gib(e["peak"])),
            row("peak, validation (no gradients)", gib(e["validation_peak"]))]
    out += ["", f"tokens per optimizer step ({cfg.batch_size} questions)"]
    out += [row(key, f"{v:,}") for key, v in e["tokens"].items()]
    out += ["", "FLOPs per optimizer step"] + [row(key, f"{v:.3e}") for key, v in e["flops"].items()]
    out += [row("train.py's MFU count (2N per token, +4N trained)", f"{e['train_py_flops']:.3e}"), "",
            f"{cfg.steps:,} steps: {e['total_flops']:.3e} FLOPs = {e['gpu_hours']:,.1f} GPU-hours at {st.mfu:.0%} MFU "
            f"of an {st.gpu} ({train.PEAK_BF16_FLOPS[st.gpu] / 1e12:,.0f} TFLOP/s bf16; --mfu=, --gpu=), validation "
            "and index builds excluded (the paper trained JMLR-13B in 148 GPU-hours, with its own settings)"]
    return "\n".join(out + [f"note: {n}" for n in e["notes"]])


def dry_run(cfg: train.TrainConfig, **settings) -> dict:
    """Print the report for cfg and return its figures (estimate's dict); settings: CostSettings' fields."""
    e = estimate(cfg, CostSettings(**settings))
    print(report(e, cfg), flush=True)
    return e


def main(argv: list[str]):
    """--mfu=0.5 --gpu=A100 ... (CostSettings) and any train.py setting (--preset=llama2-13b ...)."""
    if "-h" in argv or "--help" in argv:
        print("\n".join(["usage: python costs.py [--preset=NAME] [--key=value ...]", "", __doc__.splitlines()[0], "",
                         "Takes every train.py setting (python train.py --help lists them) and these, which a "
                         "config does not say:", *cli.settings_help(CostSettings())]))
        return
    names, ours, theirs = {f.name for f in fields(CostSettings)}, {}, []
    for arg in argv:                             # ours: --mfu=0.5 --gpu=A100 ...; the rest go to train.parse_args
        key, _, raw = arg.removeprefix("--").partition("=")
        if key not in names:
            theirs.append(arg)
            continue
        try:
            ours[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            ours[key] = raw                      # a GPU name
    st = CostSettings()
    train.apply_overrides(st, ours)              # type-checked like train.py's settings
    dry_run(train.parse_args(theirs + ["--dry_run=True"]), **vars(st))


if __name__ == "__main__":
    cli.run(main, sys.argv[1:])
