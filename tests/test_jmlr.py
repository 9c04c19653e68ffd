"""jmlr.py's steps against hand computations, and the joint loss's gradient routing."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from jmlr import (JMLR, Example, JMLRConfig, OptionHead, format_context, format_target, pad_batch, rank_loss,
                  sample_documents, tokenize_example)
from llama import Llama, LlamaConfig
from test_retriever import VOCAB, tiny_bert
from retriever import ColBERT, ColBERTConfig


class ByteTokenizer:
    """Bytes as tokens, 1 = BOS, 2 = EOS: enough for a tiny LLM."""
    def encode(self, text, bos=None, eos=False):
        return ([1] if bos is None else []) + [3 + b % 250 for b in text.encode()] + ([2] if eos else [])

    def decode(self, ids):
        return bytes(i - 3 for i in ids if i >= 3).decode(errors="replace")


@pytest.mark.rank_loss
def test_rank_loss_hand_computed_gradient_sign_and_ties():
    s = torch.tensor([[2.0, 1.0, 0.5]], requires_grad=True)
    l = torch.tensor([[0.3, 0.1, 0.3]])           # doc 1 is best; docs 0 and 2 tie
    # pairs (0,1): target 0 (l_0 > l_1), (1,2): target 1; (0,2) is a tie and does not count
    sig = lambda x: 1 / (1 + math.exp(-x))        # noqa: E731
    expected = (-math.log(1 - sig(2.0 - 1.0)) - math.log(sig(1.0 - 0.5))) / 2
    loss = rank_loss(s, l, tau_rank=1.0)
    assert loss.dim() == 0, f"rank_loss must be a scalar, got shape {tuple(loss.shape)}"
    assert abs(loss.item() - expected) < 1e-6, f"rank_loss = {loss.item():.6f}, expected {expected:.6f} (BCE of " \
        "pairs (0, 1) and (1, 2), averaged; the tie (0, 2) does not count)"
    loss.backward()
    assert s.grad[0, 1] < 0, "the document with the lowest LLM loss must be pushed up"
    s2 = torch.tensor([[2.0, 1.0, 0.7]], requires_grad=True)   # moving the tie partner of doc 0 alone...
    rank_loss(s2, l).backward()
    assert torch.allclose(s.grad[0, 0], s2.grad[0, 0]), "a tie must not contribute to the gradient"
    all_ties = rank_loss(torch.zeros(2, 3, requires_grad=True), torch.ones(2, 3))
    assert all_ties.item() == 0.0 and all_ties.requires_grad, "with only ties the loss is a 0 that keeps the graph"
    # tau_rank divides the score differences
    half = (-math.log(1 - sig(0.5)) - math.log(sig(0.25))) / 2
    assert rank_loss(s, l, tau_rank=2.0).item() == pytest.approx(half, abs=1e-6), "tau_rank=2 must halve s_a - s_b"
    # a batch: the mean is over all pairs of all questions (2 pairs in the first, 3 in the second)
    s_b = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 3.0]])
    l_b = torch.tensor([[0.2, 0.5, 0.5], [0.1, 0.2, 0.3]])      # question 0: pairs (0,1), (0,2); (1,2) ties
    bce = [-math.log(sig(1.0)), -math.log(sig(1.0)), -math.log(sig(-1.0)), -math.log(sig(-3.0)), -math.log(sig(-2.0))]
    got = rank_loss(s_b, l_b).item()
    assert got == pytest.approx(sum(bce) / 5, abs=1e-6), f"batched rank_loss {got:.6f} != the mean over the " \
        f"5 pairs that exist ({sum(bce) / 5:.6f})"


@pytest.mark.sampling
def test_sampling_without_replacement_matches_softmax_and_is_seeded():
    scores = torch.tensor([[1.0, 0.0, -1.0, 0.5]])
    g = torch.Generator().manual_seed(0)
    draws = torch.cat([sample_documents(scores.expand(1000, 4), 3, tau=0.5, generator=g) for _ in range(10)])
    assert draws.shape == (10000, 3), f"sample_documents must return (B, m) indices, got {tuple(draws.shape)}"
    assert all(len(set(row)) == 3 for row in draws.tolist()), "a document was drawn twice"
    first = torch.bincount(draws[:, 0], minlength=4).float() / len(draws)    # the first draw is the softmax
    expected = torch.softmax(scores[0] / 0.5, dim=0)
    assert (first - expected).abs().max() < 0.02, f"first draws {first.tolist()} do not follow softmax(s / tau) " \
        f"= {expected.tolist()}"      # 10,000 draws: 3 standard errors is about 0.015
    a = sample_documents(scores, 2, 1.0, generator=torch.Generator().manual_seed(3))
    b = sample_documents(scores, 2, 1.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b), "the same generator seed must draw the same documents (pass `generator` on)"
    s = scores.clone().requires_grad_()
    assert not sample_documents(s, 2, 1.0).requires_grad, "the draw takes no gradient"


@pytest.mark.sampling
def test_minmax_scaling_makes_sampling_nearly_uniform():
    scores = torch.tensor([[30.0, 10.0, 0.0]])         # MaxSim scores are tens of units apart
    g = torch.Generator().manual_seed(0)
    draws = sample_documents(scores.expand(20000, 3), 1, tau=1.0, minmax_scale=True, generator=g)[:, 0]
    freq = torch.bincount(draws, minlength=3).float() / 20000
    want = torch.softmax(torch.tensor([1.0, -1 / 3, -1.0]), 0)   # 30, 10, 0 scaled to [-1, 1]
    assert torch.allclose(freq, want, atol=0.02), f"with minmax_scale the draws {freq.tolist()} must follow " \
        f"softmax of the scores scaled to [-1, 1], {want.tolist()}"
    assert freq.min() > 0.1, f"draws {freq.tolist()}: with minmax_scale every document is drawn (>10%)"


@pytest.fixture
def joint(tmp_path):
    _, ckpt = tiny_bert(tmp_path)
    retriever = ColBERT.from_pretrained(ckpt, ColBERTConfig(dim=16, doc_maxlen=16, query_maxlen=8))
    llm = Llama(LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2))
    words = VOCAB[12:]
    g = torch.Generator().manual_seed(0)
    doc = lambda: " ".join(words[i] for i in torch.randint(0, len(words), (6,), generator=g))   # noqa: E731
    batch = [Example(f"question {i} {doc()}", {"A": "aspirin", "B": "insulin"}, format_target("A", "aspirin"),
                     [doc() for _ in range(5)], gold=0) for i in range(3)]
    return llm, retriever, batch


def test_batched_per_document_losses_equal_one_at_a_time(joint):
    llm, retriever, batch = joint
    model = JMLR(llm, retriever, ByteTokenizer(), JMLRConfig())
    rows = [tokenize_example(model.tok, [d], ex.question, ex.options, ex.target, 180)
            for ex in batch for d in ex.candidates[:3]]
    with torch.no_grad():
        together = model.llm_losses(rows)
        alone = torch.cat([model.llm_losses([r]) for r in rows])
    assert torch.allclose(together, alone, atol=1e-5)


class PromptMeanLM(nn.Module):
    """A stand-in LLM for JMLR.llm_losses: the "loss" of a row is the mean of a learned value per
    token over its non-pad tokens, so it depends on the document in the prompt, ignores right
    padding (pad id 0; ByteTokenizer never makes 0), and would carry a gradient. Counts its calls."""
    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(256, 1)
        self.calls = 0

    def sequence_loss(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        real = (tokens != 0).float()                                         # (B, T)
        return (self.embed_tokens(tokens)[..., 0] * real).sum(1) / real.sum(1)   # (B,)


@pytest.mark.doc_losses
def test_document_losses_score_each_sampled_document_alone():
    """losses[b, j] is the LLM loss of question b's prompt with candidate picked[b, j] alone, all B * m
    rows in one call, without gradients. A stand-in LLM: the assignment's code alone is graded."""
    batch = [Example(f"question {b}?", {"A": "x", "B": "y"}, format_target("A", "x"),
                     [f"document {b}.{j} " + "long " * (3 * j) for j in range(5)]) for b in range(3)]
    model = JMLR(PromptMeanLM(), None, ByteTokenizer(), JMLRConfig(max_doc_tokens=30))
    picked = torch.tensor([[4, 0], [2, 3], [0, 1]])                          # (B, m) = (3, 2)
    losses = model.document_losses(batch, picked)
    assert losses.shape == (3, 2), f"document_losses must be (B, m) = (3, 2), got {tuple(losses.shape)}"
    assert not losses.requires_grad, "the per-document losses are computed without gradients (step 3)"
    assert model.llm.calls == 1, f"the LLM ran {model.llm.calls} times: all B * m rows go in one padded batch"
    for b, ex in enumerate(batch):
        for j, i in enumerate(picked[b].tolist()):
            row = tokenize_example(model.tok, [ex.candidates[i]], ex.question, ex.options, ex.target, 30)
            alone = model.llm.sequence_loss(*pad_batch([row], 0, "cpu")).item()
            assert losses[b, j].item() == pytest.approx(alone, abs=1e-6), \
                f"losses[{b}, {j}] is not the loss of question {b} with its candidate {i} alone in the prompt"


def test_joint_loss_reaches_both_models_and_generation_loss_only_the_llm(joint):
    llm, retriever, batch = joint
    model = JMLR(llm, retriever, ByteTokenizer(), JMLRConfig(num_sampled=4, top_k=2))
    loss, metrics = model(batch, generator=torch.Generator().manual_seed(0))
    loss.backward()
    grad = lambda m: sum(float(p.grad.abs().sum()) for p in m.parameters() if p.grad is not None)   # noqa: E731
    assert grad(llm) > 0 and grad(retriever) > 0
    assert {"loss_gen", "loss_rank", "rank_agreement", "doc_rank", "gold_rank"} <= metrics.keys()
    model.zero_grad()
    model.cfg.rank_weight = 0.0            # L_gen alone: the documents enter as tokens, no retriever gradient
    model(batch, generator=torch.Generator().manual_seed(0))[0].backward()
    assert grad(llm) > 0 and grad(retriever) == 0


@pytest.mark.parametrize("objective, llm_grad, retriever_grad", [
    ("rag", True, False), ("retriever_only", False, True), ("none", True, False),
    ("lsr", True, True), ("pdist", True, True), ("emdr2", True, True)])
def test_objectives_route_gradients(joint, objective, llm_grad, retriever_grad):
    llm, retriever, batch = joint
    model = JMLR(llm, retriever, ByteTokenizer(), JMLRConfig(objective=objective, num_sampled=3, top_k=2))
    loss, _ = model(batch, generator=torch.Generator().manual_seed(0))
    loss.backward()
    has = lambda m: any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())   # noqa: E731
    assert has(llm) == llm_grad and has(retriever) == retriever_grad


def test_labels_cover_the_target_only():
    tok = ByteTokenizer()
    tokens, labels = tokenize_example(tok, ["doc one", "doc two"], "Q?", {"A": "x", "B": "y"},
                                      format_target("B", "y", "because"), max_doc_tokens=8)
    target = tok.encode(" B. y\nExplanation: because", bos=False, eos=True)
    assert labels[-len(target):] == target and set(labels[:-len(target)]) == {-100}
    assert tokens[-len(target):] == target
    nl = tok.encode("\n", bos=False)
    assert tokens[1:9] == tok.encode("Document: doc one\n", bos=False)[:7] + nl   # cut to 8 tokens, newline kept



def test_letter_only_document_losses_are_the_answer_letters_nll_by_hand(joint):
    """doc_loss="letter": step 3's loss given a document is -log p(answer letter | prompt), the one
    target token a document can decide, computed here from the LLM's logits by hand."""
    llm, retriever, batch = joint
    ex = batch[0]
    model = JMLR(llm, retriever, ByteTokenizer(), JMLRConfig(doc_loss="letter", max_doc_tokens=30))
    tokens, labels = tokenize_example(model.tok, [ex.candidates[2]], ex.question, ex.options, ex.target, 30)
    first = next(i for i, y in enumerate(labels) if y != -100) + 1          # bytes: " " then the letter "A"
    assert model.tok.decode([tokens[first]]) == "A"
    with torch.no_grad():
        logits = llm.lm_head(llm.hidden_states(torch.tensor([tokens])))[0]         # (T, V)
        by_hand = F.cross_entropy(logits[first - 2:first].float(), torch.tensor(tokens[first - 1:first + 1]))
        got = model.document_losses([ex], torch.tensor([[2]]))[0, 0]
        whole = JMLR(llm, retriever, ByteTokenizer(), JMLRConfig(max_doc_tokens=30)).document_losses(
            [ex], torch.tensor([[2]]))[0, 0]
    assert torch.allclose(got, by_hand, atol=1e-5), (got, by_hand)
    assert not torch.allclose(got, whole, atol=1e-3), "the whole target's mean NLL is another number"
    with pytest.raises(ValueError, match="doc_loss"):
        JMLRConfig(doc_loss="letters")

@pytest.mark.rank_loss
def test_tie_margin_turns_near_ties_into_ties():
    s = torch.tensor([[2.0, 1.0, 0.5]])
    l = torch.tensor([[0.3, 0.1, 0.3]])          # pairs (0,1) and (1,2) differ by 0.2 nats
    assert rank_loss(s, l, tie_margin=0.25).item() == 0.0, "pairs within tie_margin are ties and do not count"
    assert rank_loss(s, l, tie_margin=0.15).item() == pytest.approx(rank_loss(s, l).item()), \
        "pairs that differ by more than tie_margin count as without a margin"


def test_option_head_points_at_the_option_the_answer_state_matches():
    """Identity maps and a 0-layer Llama (hidden state = normed embedding): the answer position
    holds the embedding of option C's text token, so C gets the highest logit; E is absent."""
    llm = Llama(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=0,
                            num_attention_heads=4, num_key_value_heads=4))
    with torch.no_grad():
        llm.embed_tokens.weight.copy_(torch.eye(40, 16) * 4)      # orthogonal token vectors (ids < 16)
    head = OptionHead(llm, letter_ids=[1, 2, 3, 4, 5])           # A B C D E
    with torch.no_grad():
        head.query.weight.copy_(torch.eye(16)), head.key.weight.copy_(torch.eye(16))
    dot, answer_cue = 6, 12
    # "A . x7  B . x8  C . x9  D . x10  <x9>  C" : the token before the labelled letter is x9
    tokens = torch.tensor([[1, dot, 7, 2, dot, 8, 3, dot, 9, 4, dot, 10, answer_cue, 9, 3]])
    labels = torch.full_like(tokens, -100)
    labels[0, -1] = 3
    logits, target = head.option_logits(tokens, labels)
    assert target.tolist() == [2] and logits[0, 4] == -math.inf
    assert logits[0, :4].argmax().item() == 2
    assert head.sequence_loss(tokens, labels).item() < 0.1
    tokens[0, -1] = 11                                           # an answer letter the head does not know (F)
    with pytest.raises(ValueError, match="option_letters"):      # once read as A
        head.option_logits(tokens, labels)


def test_a_documents_loss_is_the_same_alone_and_beside_a_longer_one_with_s2attn():
    """Step 3 runs as inference does (full causal attention, no dropout) even in training mode with
    S2-Attn and LoRA dropout on: a (document, question)'s loss must not depend on its batch-mates.
    Only the gradient-carrying pass may use S2-Attn, with its group size from the setting."""
    from llama import LoraConfig, add_lora
    from s2attn_kernel import S2Attention
    llm = Llama(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2))     # head_dim 16: the kernel's least
    add_lora(llm, LoraConfig(rank=4, dropout=0.5))
    for p in llm.parameters():                       # B != 0, so that the adapters (and dropout) matter
        if p.requires_grad:
            nn.init.normal_(p, std=0.5)
    llm.train_attn_fn = S2Attention(8)
    model = JMLR(llm, None, ByteTokenizer(), JMLRConfig(max_doc_tokens=64)).train()
    ex = Example("Which drug?", {"A": "aspirin", "B": "insulin"}, format_target("A", "aspirin"),
                 ["short document", "a much longer document " * 4])
    alone = model.document_losses([ex], torch.tensor([[0]]))
    beside = model.document_losses([ex], torch.tensor([[0, 1]]))
    assert model.training and llm.training, "document_losses must restore the training mode"
    assert torch.equal(alone[0, 0], beside[0, 0]), f"alone {alone[0, 0]:.6f}, beside a longer document " \
        f"{beside[0, 0]:.6f}: the no-gradient pass must not depend on the batch"
    with torch.no_grad():
        inference = model.eval().document_losses([ex], torch.tensor([[0]]))
    assert torch.equal(alone, inference), "step 3 must see exactly the attention inference uses"
    # the gradient-carrying pass does use S2-Attn (and dropout): its loss differs
    row = tokenize_example(model.tok, [ex.candidates[0]], ex.question, ex.options, ex.target, 64)
    assert len(row[0]) > 8 and (model.train().llm_losses([row])[0] - alone[0, 0]).abs() > 1e-4


def test_no_gradient_passes_are_cut_by_a_token_budget():
    """max_pass_tokens bounds every no-gradient LLM pass (padded tokens); the losses are unchanged."""
    llm = PromptMeanLM()
    model = JMLR(llm, None, ByteTokenizer(), JMLRConfig(max_pass_tokens=10_000))
    rows = [tokenize_example(model.tok, ["x" * n], "q?", {"A": "a"}, format_target("A", "a"), 100)
            for n in (5, 40, 10, 80, 3)]
    with torch.no_grad():
        whole = model.llm_losses(rows)
        model.cfg.max_pass_tokens = 2 * max(len(t) for t, _ in rows)
        calls, cut = llm.calls, model.llm_losses(rows)
    assert llm.calls - calls >= 3 and torch.allclose(whole, cut, atol=1e-6)
    from jmlr import token_chunks
    for budget in (1, 50, 120, 1000):
        chunks = token_chunks(rows, budget)
        assert [r for c in chunks for r in c] == rows, "chunks keep every row, in order"
        assert all(len(c) == 1 or len(c) * max(len(t) for t, _ in c) <= budget for c in chunks)


@pytest.mark.sampling
def test_sampling_never_underflows_and_draws_on_the_generators_device():
    """At a small tau softmax(s / tau) underflows to zeros; torch.multinomial then filled the draws
    with the highest-index (worst) candidates. The draw follows the scores' order instead. And the
    noise is drawn on the generator's device: a sampler handed scores on another device (here meta,
    on a GPU it is CUDA) must never pass a CPU generator to an op on that device (ATen refuses it)."""
    scores = torch.tensor([[20.0, 25.0, 15.0, 14.0, 13.0, 12.0, 11.0, 10.0]])
    g = torch.Generator().manual_seed(0)
    draws = {tuple(sample_documents(scores, 4, tau=0.05, generator=g)[0].tolist()) for _ in range(200)}
    assert draws == {(1, 0, 2, 3)}, f"tau=0.05 must draw the four best in order, got {sorted(draws)[:5]}"

    from torch.overrides import TorchFunctionMode

    class GeneratorDeviceCheck(TorchFunctionMode):
        """ATen's rule on CUDA, enforced for every device: a generator must live where its op runs."""
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            gen = kwargs.get("generator")
            out = func(*args, **kwargs)
            devices = {a.device for a in (*args, out) if isinstance(a, torch.Tensor)}
            assert gen is None or devices == {gen.device}, f"{func.__name__}: generator on {gen.device}, " \
                f"tensors on {devices}"
            return out

    with GeneratorDeviceCheck():
        picked = sample_documents(torch.randn(3, 8, device="meta"), 4, 1.0, generator=torch.Generator().manual_seed(0))
    assert picked.shape == (3, 4) and picked.device.type == "meta"


def test_bf16_training_step_document_losses_and_scoring_agree_with_fp32(joint):
    """What a recent GPU runs: a bf16 frozen base with fp32 LoRA adapters under bf16 autocast (as
    train.build_model sets up), here on the CPU. The joint loss, its gradients, the per-document
    losses and the option losses agree with fp32 within bf16's precision (8 bits of mantissa: about
    0.4% per rounding; the tolerances below allow a few percent after two layers)."""
    from llama import LoraConfig, add_lora
    llm32, retriever, batch = joint
    add_lora(llm32, LoraConfig(rank=4, dropout=0.0))
    for p in llm32.parameters():
        if p.requires_grad:
            nn.init.normal_(p, std=0.05)
    llm16 = Llama(llm32.cfg)
    add_lora(llm16, LoraConfig(rank=4, dropout=0.0))
    llm16.load_state_dict(llm32.state_dict())
    for p in llm16.parameters():                    # the frozen base in bf16, the adapters fp32
        p.data = p.data.float() if p.requires_grad else p.data.bfloat16()
    cfg = JMLRConfig(num_sampled=4, top_k=2)
    results = {}
    for name, llm in (("fp32", llm32), ("bf16", llm16)):
        model = JMLR(llm, retriever, ByteTokenizer(), cfg)
        retriever.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=name == "bf16"):
            loss, _ = model(batch, generator=torch.Generator().manual_seed(0))
            loss.backward()
            picked = torch.tensor([[0, 1, 2, 3]] * len(batch))
            doc = model.document_losses(batch, picked)
            options = model.option_losses(batch, [ex.candidates[:2] for ex in batch])
        grads = torch.cat([p.grad.flatten().float() for p in (*llm.parameters(), *retriever.parameters())
                           if p.grad is not None])
        results[name] = loss.detach(), grads, doc, options
        assert doc.dtype == options.dtype == torch.float32, "losses are returned in fp32 whatever the compute dtype"
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=name == "bf16"):
            assert model.score_candidates(batch).dtype == torch.float32, "MaxSim scores are summed in fp32"
    (l32, g32, d32, o32), (l16, g16, d16, o16) = results["fp32"], results["bf16"]
    assert (l16 - l32).abs() <= 0.02 * l32.abs(), f"joint loss bf16 {l16:.4f} vs fp32 {l32:.4f}"
    assert F.cosine_similarity(g16, g32, dim=0) > 0.99, "bf16 gradients must point where fp32's do"
    torch.testing.assert_close(d16, d32, rtol=0.02, atol=0.02)
    torch.testing.assert_close(o16, o32, rtol=0.02, atol=0.02)


def test_gold_rank_counts_ties_against_the_gold_document():
    from jmlr import gold_ranks
    batch = [Example("q", {}, "", ["a", "b", "c", "d"], gold=g) for g in (1, 2, 0, -1)]
    scores = torch.tensor([[5.0, 5.0, 5.0, 5.0],      # collapsed: all equal -> last, not first
                           [1.0, 3.0, 3.0, 0.0],      # one tie above the rest -> 2
                           [9.0, 1.0, 2.0, 3.0],      # strictly best -> 1
                           [1.0, 2.0, 3.0, 4.0]])     # gold known but not a candidate -> inf
    assert gold_ranks(scores, batch) == [4, 2, 1, math.inf]


def trained_tokenizer_dir(path, style: str):
    """A small tokenizer.json in the style of Llama-2 (SentencePiece BPE: "▁" prepended and for
    spaces, byte fallback) or Llama-3 (byte-level BPE after a regex split), trained here on a few
    sentences, plus the config files llama.Tokenizer reads."""
    from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer
    text = ["Document: Vitamin C deficiency causes scurvy.\n", "Question: Which vitamin prevents scurvy?\n"
            "A. Vitamin C\nB. Vitamin D\nAnswer: A. Vitamin C"] * 20
    special = ["<unk>", "<s>", "</s>"]
    if style == "llama2":
        tok = HFTokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
        tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=400, special_tokens=special + [
            f"<0x{i:02X}>" for i in range(256)]))
        tok.pre_tokenizer = None                           # as Llama-2's tokenizer.json: the normalizer alone
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    else:
        split = Regex(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                      r"|\s*[\r\n]+|\s+(?!\S)|\s+")
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(split, "isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=400, special_tokens=special,
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        tok.decoder = decoders.ByteLevel()
    path.mkdir()
    tok.save(str(path / "tokenizer.json"))
    cfg = LlamaConfig(vocab_size=tok.get_vocab_size(), bos_token_id=1, eos_token_id=2).to_hf()
    (path / "config.json").write_text(json.dumps(cfg))
    (path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True}))
    return path


@pytest.mark.parametrize("style", ["llama2", "llama3", "smollm2"])
def test_the_prompt_and_target_are_the_tokens_of_the_whole_text(style, tmp_path, request):
    """Training's tokens must be those of the text the model reads: the pieces joined, encoded at
    once. Encoded piece by piece, Llama-2's tokenizer starts the target " A. Vitamin C" with "▁▁"."""
    from llama import Tokenizer
    path = request.getfixturevalue("smollm2_dir") if style == "smollm2" else trained_tokenizer_dir(tmp_path / style, style)
    tok = Tokenizer(path)
    docs, question = ["Vitamin C deficiency causes scurvy."], "Which vitamin prevents scurvy?"
    options = {"A": "Vitamin C", "B": "Vitamin D"}
    target = format_target("A", "Vitamin C")
    tokens, labels = tokenize_example(tok, docs, question, options, target, max_doc_tokens=100)
    prompt = "".join(format_context(docs, question, options))
    assert tokens == tok.encode(prompt + target, eos=True), "not the tokens of the whole text"
    answer = [t for t, lab in zip(tokens, labels) if lab != -100]
    assert labels[:len(tokens) - len(answer)] == [-100] * (len(tokens) - len(answer))
    assert tok.decode(answer).strip() == "A. Vitamin C" and answer[-1] == tok.eos_ids[0]
    if style == "llama2":   # the bug this prevents: the target encoded alone starts differently
        assert tok.encode(target, bos=False)[:len(answer) - 1] != answer[:-1]
    # a document longer than max_doc_tokens is cut to about that many tokens, newline kept
    long_doc = ["Vitamin C deficiency causes scurvy. " * 20]
    cut, _ = tokenize_example(tok, long_doc, question, options, target, max_doc_tokens=12)
    full, _ = tokenize_example(tok, [], question, options, target, max_doc_tokens=12)
    assert abs(len(cut) - len(full) - 12) <= 2, f"{len(cut) - len(full)} document tokens, asked for 12"


def test_helpfulness_agreement_and_rank_of_the_most_helpful_document_by_hand():
    from jmlr import helpfulness
    scores = torch.tensor([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0], [1.0, 1.0, 0.0], [0.0, 1.0, 2.0]])
    losses = torch.tensor([[0.1, 0.2, 0.3],      # the same order: every pair agrees, best ranked 1
                           [0.1, 0.2, 0.3],      # reversed: none agrees, best ranked last
                           [0.5, 0.1, 0.9],      # (0,1) a score tie: disagrees; (0,2), (1,2) agree; best tied 1st -> 2
                           [0.2, 0.2, 0.2]])     # no untied pairs: nan; best (the first) ranked 3
    agreement, best = helpfulness(scores, losses)
    assert agreement[:3].tolist() == pytest.approx([1.0, 0.0, 2 / 3]) and agreement[3].isnan()
    assert best.tolist() == [1, 3, 2, 3]
