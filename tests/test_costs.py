"""costs.py: its memory formulas against what autograd really stores and frees, its FLOPs against
torch.utils.flop_counter, its parameter and state bytes against train.build_model's real tensors.

How memory is measured here, on a CPU, without CUDA's allocator statistics (RSS is too coarse and
too noisy for models of a few megabytes):
  - saved bytes ("activations"): torch.autograd.graph.saved_tensors_hooks sees every tensor an op
    saves for backward; they are summed by storage (a tensor saved by several ops, or a view of
    one, counts once), parameters left out. Non-reentrant activation checkpointing saves its
    block inputs through these hooks and hides the block's own tensors behind hooks of its own, so
    with checkpointing the sum is exactly what checkpointing keeps.
  - peak bytes: a TorchDispatchMode sees every tensor an op creates and a weakref on its storage
    sees it freed; the most bytes alive at once over forward + backward (or a no-grad pass) is the
    peak, as torch.cuda.max_memory_allocated would report it, without the allocator's caching.
    Tensors that existed before (parameters, gradients of an earlier micro-batch) are not counted.
  - parameters, gradients, AdamW state: the bytes of the real tensors after an optimizer step.
The saved-bytes checks are tight (2%) and fail when checkpointing, LoRA's dropout, a dtype or GQA
is modelled wrongly; peaks must agree within 25%, the task's tolerance for an estimate.
"""

import dataclasses
import weakref

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

import costs
import retriever as rt
import train
from llama import Llama, LlamaConfig, LoraConfig, add_lora

SHAPE = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=176, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2)   # GQA: k and v are half of q
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
B, T, LABELLED = 4, 96, 8                                           # LABELLED target tokens per row


def saved_bytes(fn, params) -> tuple[object, int]:
    """fn() -> (its result, bytes of the tensors autograd saved for backward, by storage, params excluded)."""
    skip, seen = {p.untyped_storage().data_ptr() for p in params}, {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in skip:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


class PeakBytes(TorchDispatchMode):
    """The most bytes alive at once among tensors created inside the mode (views share a storage)."""

    def __init__(self):
        super().__init__()
        self.live, self.now, self.peak = {}, 0, 0

    def _free(self, key):
        self.now -= self.live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {id(t.untyped_storage()) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and id(t.untyped_storage()) not in inputs | self.live.keys():
                s = t.untyped_storage()                 # one Python object per storage while it lives
                self.live[id(s)] = s.nbytes()
                self.now += s.nbytes()
                self.peak = max(self.peak, self.now)
                weakref.finalize(s, self._free, id(s))
        return out


def tiny_llama(lora: LoraConfig | None, bf16_base: bool = False) -> Llama:
    """A random Llama as train.build_model makes it: LoRA freezes the base (bf16 if asked), trainable fp32."""
    torch.manual_seed(0)
    model = Llama(SHAPE)
    if lora is not None:
        model = model.to(torch.bfloat16) if bf16_base else model
        add_lora(model, lora)
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    return model.train()


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, SHAPE.vocab_size, (B, T), generator=torch.Generator().manual_seed(1))
    labels = torch.full_like(tokens, -100)
    labels[:, -LABELLED:] = tokens[:, -LABELLED:]                   # targets after a long prompt, as in JMLR
    return tokens, labels


CASES = {   # name: (LoRA config or None = full fine-tuning, bf16 autocast)
    "full fine-tuning fp32": (None, False),
    "LoRA all targets, dropout 0.1, fp32": (LoraConfig(rank=4, dropout=0.1, targets=ALL, train_embeddings=True,
                                                       train_norms=True), False),
    "LoRA q/v/up, no dropout, frozen norms, fp32": (LoraConfig(rank=4, dropout=0.0, train_embeddings=True,
                                                               targets=("q_proj", "v_proj", "up_proj")), False),
    "LoRA as the preset, bf16 base + autocast": (LoraConfig(rank=8, dropout=0.05, train_embeddings=True,
                                                            train_norms=True), True),
    "full fine-tuning, bf16 autocast": (None, True),
}


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_llm_saved_bytes_match_autograd(case, checkpointing):
    lora, bf16 = CASES[case]
    model = tiny_llama(lora, bf16_base=bf16)
    model.gradient_checkpointing = checkpointing
    tokens, labels = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        _, measured = saved_bytes(lambda: model.sequence_loss(tokens, labels), list(model.parameters()))
    cfg = train.TrainConfig(use_lora=lora is not None, lora=lora or LoraConfig())
    dt = costs.llm_dtypes(cfg, bf16, cuda=False)
    estimate = costs.llm_saved_bytes(SHAPE, B, T, B * LABELLED, lora, dt, checkpointing)
    if bf16:   # autocast's cached bf16 copy of each trainable weight is saved too (the report's own line);
        c = costs.count(model)   # inside checkpointed blocks the copies stay in autocast's cache, unseen here
        estimate += 2 * ((0 if checkpointing else c["matmul_trainable"]) + c["head_trainable"])
    assert abs(estimate - measured) <= 0.02 * measured, f"{case}: estimated {estimate:,} B, saved {measured:,} B"
    other = costs.llm_saved_bytes(SHAPE, B, T, B * LABELLED, lora, dt, not checkpointing)
    assert abs(other - measured) > 0.5 * measured      # the checkpointing term decides: the test can fail


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("case", ["full fine-tuning fp32", "LoRA all targets, dropout 0.1, fp32"])
def test_llm_peak_bytes_within_25_percent(case, checkpointing):
    """Forward + backward of a second micro-batch (gradients exist already, as under accumulation):
    peak = saved + backward's transient (+ one recomputed block with checkpointing); and a no-grad
    pass in eval mode (step 3, validation)."""
    lora, _ = CASES[case]
    model = tiny_llama(lora)
    model.gradient_checkpointing = checkpointing
    tokens, labels = batch()
    model.sequence_loss(tokens, labels).sum().backward()               # micro-batch 1: the gradients
    with PeakBytes() as mode:
        model.sequence_loss(tokens, labels).sum().backward()
    dt = costs.llm_dtypes(train.TrainConfig(use_lora=lora is not None, lora=lora or LoraConfig()), False, cuda=False)
    estimate = (costs.llm_saved_bytes(SHAPE, B, T, B * LABELLED, lora, dt, checkpointing)
                + costs.llm_backward_bytes(SHAPE, B * T, B * LABELLED, dt)
                + (costs.block_saved_bytes(SHAPE, B, T, lora, dt) if checkpointing else 0))
    assert abs(estimate - mode.peak) <= 0.25 * mode.peak, f"estimated {estimate:,} B, peak {mode.peak:,} B"
    model.eval()
    with torch.no_grad(), PeakBytes() as mode:
        model.sequence_loss(tokens, labels)
    estimate = costs.llm_nograd_bytes(SHAPE, B * T, B * LABELLED, dt, lora)
    assert abs(estimate - mode.peak) <= 0.25 * mode.peak, f"no grad: estimated {estimate:,} B, peak {mode.peak:,} B"


def tiny_colbert() -> rt.ColBERT:
    words = [f"w{i}" for i in range(50)]
    vocab = ["[PAD]", "[unused0]", "[unused1]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words
    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    bert = rt.BertConfig(vocab_size=len(vocab), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=160, max_position_embeddings=64)
    torch.manual_seed(0)
    return rt.ColBERT(bert, rt.ColBERTConfig(dim=16, query_maxlen=8, doc_maxlen=24), tok)


@pytest.mark.parametrize("bf16", [False, True])
def test_colbert_saved_bytes_match_autograd(bf16):
    """JMLR.score_candidates' step 1: queries, B*N documents cut to doc_maxlen, MaxSim."""
    model, Bq, N = tiny_colbert(), 2, 3
    docs = [" ".join(f"w{(7 * i + j) % 50}" for j in range(40)) for i in range(Bq * N)]   # longer than doc_maxlen

    def step1():
        Q, q_mask = model.encode_queries(["w1 w2 w3"] * Bq)
        D, d_mask = model.encode_docs(docs)
        return rt.maxsim(Q, q_mask, D.view(Bq, N, *D.shape[1:]), d_mask.view(Bq, N, -1))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        _, measured = saved_bytes(step1, list(model.parameters()))
    estimate = costs.colbert_saved_bytes(model.bert_cfg, model.cfg, Bq, N, 2 if bf16 else 4)
    if bf16:
        estimate += 2 * costs.count(model)["matmul_trainable"]                       # autocast's weight copies
    assert abs(estimate - measured) <= 0.02 * measured, f"estimated {estimate:,} B, autograd saved {measured:,} B"


@pytest.mark.parametrize("lora", [None, LoraConfig(rank=4, targets=("q_proj", "v_proj", "down_proj"),
                                                   train_embeddings=True, train_norms=True)])
def test_flops_match_flop_counter(lora):
    """Forward + backward through the math attention (which FlopCounterMode counts; it computes the
    full T x T product, twice causal attention's work, so its excess is added) for the LLM, and
    the encoder for the retriever (MaxSim's einsum is not in costs' count: added here)."""
    model = tiny_llama(lora)
    tokens, labels = batch()
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model.sequence_loss(tokens, labels).sum().backward()
    f = costs.llm_pass_flops(SHAPE, costs.count(model), B, T, B * LABELLED, grad=True)
    causal_attention = B * SHAPE.num_hidden_layers * 2 * T * T * SHAPE.num_attention_heads * SHAPE.head_dim
    expected = f["forward"] + f["backward"] + 3 * causal_attention
    assert counter.get_total_flops() == pytest.approx(expected, rel=0.01)
    if lora is None:
        return
    colbert, Bq, N = tiny_colbert(), 2, 3
    docs = [" ".join(f"w{(7 * i + j) % 50}" for j in range(40)) for i in range(Bq * N)]
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        Q, q_mask = colbert.encode_queries(["w1 w2"] * Bq)
        D, d_mask = colbert.encode_docs(docs)
        rt.maxsim(Q, q_mask, D.view(Bq, N, *D.shape[1:]), d_mask.view(Bq, N, -1)).sum().backward()
    c, b = costs.count(colbert), colbert.bert_cfg
    maxsim = 3 * 2 * Bq * N * 8 * 24 * colbert.cfg.dim
    expected = costs.bert_flops(b, c, Bq, 8, True) + costs.bert_flops(b, c, Bq * N, 24, True) + maxsim
    assert counter.get_total_flops() == pytest.approx(expected, rel=0.01)


def test_static_bytes_match_build_model_and_adamw(tmp_path):
    """Parameters, gradients and AdamW state of the real train.build_model (LoRA, bf16 frozen base,
    fp32 trainables) after one optimizer step, against the estimate from the same directories."""
    llm_dir, ret_dir = tmp_path / "llm", tmp_path / "retriever"
    tiny_llama(None).save_pretrained(llm_dir)
    vocab = {f"t{i}": i for i in range(SHAPE.vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(llm_dir / "tokenizer.json"))
    tiny_colbert().save_pretrained(ret_dir)
    cfg = train.parse_args([f"--llm={llm_dir}", f"--retriever={ret_dir}", "--use_lora=True", "--autocast=bf16",
                            "--lora.train_norms=True", "--option_head=False", "--freeze_embeddings=False"])
    model = train.build_model(cfg, torch.device("cpu"))
    optimizer = train.make_optimizer(model, cfg)
    for p in model.parameters():
        p.grad = torch.zeros_like(p) if p.requires_grad else None
    optimizer.step()
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)   # noqa: E731
    params = list(model.parameters())
    moments = [v for s in optimizer.state.values() for k, v in s.items() if k in ("exp_avg", "exp_avg_sq")]
    e = costs.estimate(cfg, costs.CostSettings(world=1))
    assert e["llm_source"].endswith("config.json") and e["retriever_source"].endswith("config.json")
    assert e["llm"]["total"] + e["retriever"]["total"] == sum(p.numel() for p in params)
    assert e["memory"]["parameters"] == nbytes(params)
    assert e["memory"]["gradients (fp32)"] == nbytes(p.grad for p in params if p.grad is not None)
    assert e["memory"]["AdamW state (2 x fp32)"] == nbytes(moments)
    assert any(p.dtype == torch.bfloat16 for p in params)              # the frozen base really is bf16


def lora_params(C: int, F: int, L: int, V: int, r: int = 128) -> int:
    """The presets' LoRA, by hand: r * (in + out) per adapter; q, k, v, o are C x C (no GQA in
    Llama-2-7B/13B), gate and up C -> F, down F -> C, in every layer, and lm_head C -> V once."""
    return L * r * (4 * 2 * C + 3 * (C + F)) + r * (C + V)


def test_dry_run_llama2_presets(capsys):
    """Public shapes by preset (the parameter counts of Llama-2-7B/13B and BERT-base + ColBERT's
    projection), FSDP dividing the static memory by the world size and DDP not, checkpointing."""
    e13 = costs.dry_run(train.parse_args(["--preset=llama2-13b", "--dry_run=True"]), world=8)
    out = capsys.readouterr().out
    assert "Llama-2-13B" in out and "GPU-hours" in out and "peak, training" in out
    assert e13["llm"]["total"] == 13_015_864_320 + lora_params(5120, 13824, 40, 32000)
    assert e13["retriever"]["total"] == 109_482_240 - (768 * 768 + 768) + 768 * 128   # BERT-base - pooler + projection
    e7 = costs.estimate(train.parse_args(["--preset=llama2-7b", "--dry_run=True"]), costs.CostSettings(world=8))
    assert e7["llm"]["total"] == 6_738_415_616 + lora_params(4096, 11008, 32, 32000)
    assert "Llama-2-7B" in e7["llm_source"]
    one = costs.estimate(train.parse_args(["--preset=llama2-13b", "--dry_run=True"]), costs.CostSettings(world=1))
    for key in ("parameters", "gradients (fp32)", "AdamW state (2 x fp32)"):
        assert e13["memory"][key] == pytest.approx(one["memory"][key] / 8)              # FSDP shards
    e7_one = costs.estimate(train.parse_args(["--preset=llama2-7b", "--dry_run=True"]), costs.CostSettings(world=1))
    assert e7["memory"]["parameters"] == e7_one["memory"]["parameters"]                  # DDP replicates
    assert e13["gen_activations"][True] < e13["gen_activations"][False] / 5
    assert e13["accumulation"] == 64 / (2 * 8)
    hours = costs.estimate(train.parse_args(["--preset=llama2-13b", "--dry_run=True"]),
                           costs.CostSettings(world=8, mfu=0.2))["gpu_hours"]
    assert hours == pytest.approx(2 * e13["gpu_hours"])
    no_lora = dataclasses.replace(train.parse_args(["--preset=llama2-13b", "--dry_run=True"]), use_lora=False)
    assert costs.estimate(no_lora, costs.CostSettings(world=8))["llm"]["trainable"] == 13_015_864_320
