"""jmlr.py: the JMLR method: an LLM and a retriever trained together (Wang et al. 2024, arXiv 2402.17887).

For each question q (with its options) and target y (answer letter and text, plus the rationale when
the data has one), with a candidate list C of N document ids retrieved beforehand (colbert_index.py):

  1. s_k = MaxSim(E_q(q), E_d(d_k)), k in C              re-scored with gradients, documents re-encoded
  2. draw m of C without replacement, p = softmax(s / tau) (dynamic sampling)
  3. l_k = mean NLL of y given (d_k, q), no gradient     one padded batch for every sampled k
  4. L_rank = mean over pairs (a, b), l_a != l_b, of BCE(sigmoid((s_a - s_b) / tau_r), 1[l_a < l_b])
  5. L_gen = mean NLL of y given (top-k documents by s, best last, q)
  6. L = L_gen + lambda * L_rank                          L_gen reaches only the LLM, L_rank only the retriever

Shape legend:
    B  questions in the batch    N  candidates per question    m  sampled documents    k  documents in the prompt
    Lq query tokens    Ld document tokens    d  retriever dim    T  LLM tokens    V  LLM vocabulary

How this differs from the official code (believewhat/JMLR-Joint-Medical-LLM-and-Retrieval-Training), and why:
  - sampling uses softmax(s / tau) with an explicit tau; the official code min-max scales the
    scores to [-1, 1] first, which makes the draw nearly uniform (`minmax_scale=True` reproduces it);
  - the rank loss is averaged over the pairs that exist (the official normalizer is off by one);
  - one prompt template, shared with eval.py (the official training and inference prompts differ);
  - top-k = 7 documents in the prompt (the official code uses 5; the paper reports 7 as best).

Additions of ours, off by default, that small models trained from scratch need (train.py's demo;
README, "The built-in demo"): `OptionHead`, an option-pointing answer head; `forward(...,
train_retriever=False)` for a warm-up curriculum in which the LLM first learns to read; and
`tie_margin`, which treats pairs whose LLM losses differ by less than a margin as ties.
"""

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from retriever import maxsim, score_candidate_lists

OBJECTIVES = ("jmlr", "lsr", "pdist", "emdr2", "none", "rag", "retriever_only")


@dataclass
class JMLRConfig:
    objective: str = "jmlr"       # one of OBJECTIVES: the retriever loss, or a baseline
    num_sampled: int = 10         # m: documents drawn per question for the per-document losses
    tau: float = 1.0              # sampling temperature: p = softmax(s / tau)
    minmax_scale: bool = False    # the official code's [-1, 1] scaling before the softmax
    tau_rank: float = 1.0         # RankNet temperature: sigmoid((s_a - s_b) / tau_rank)
    tie_margin: float = 0.0       # pairs whose LLM losses differ by no more than this (nats) count as ties
    top_k: int = 7                # documents in the generation prompt
    rank_weight: float = 1.0      # lambda in L = L_gen + lambda * L_rank
    max_doc_tokens: int = 180     # each document is cut to this many LLM tokens in the prompt
    confidence_margin: float = 0.5   # curriculum: a question is "confident" when s_top1 - s_top2 > this
    max_pass_tokens: int = 32768  # no-gradient passes (step 3, option scoring) in chunks of at most this many tokens
    doc_loss: str = "target"      # step 3's loss given one document: "target" (the mean NLL of the whole target, as
                                  # the paper) or "letter" (the NLL of the answer letter alone, the token it decides)

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective={self.objective!r}: choose one of {', '.join(OBJECTIVES)}")
        if self.doc_loss not in ("target", "letter"):
            raise ValueError(f"doc_loss={self.doc_loss!r}: choose 'target' or 'letter'")


# ----------------------------------------------------------------------------------------------
# The prompt, shared with eval.py: documents (best last, nearest the question), question, options

def format_context(docs: list[str], question: str, options: dict[str, str]) -> list[str]:
    """The prompt as pieces, each ending in a newline (so that they tokenize independently):
    one per document, then the question with lettered options and the answer cue."""
    pieces = [f"Document: {d.strip()}\n" for d in docs]
    opts = "".join(f"{letter}. {text}\n" for letter, text in options.items())
    return pieces + [f"Question: {question.strip()}\n{opts}Answer:"]


def format_target(letter: str, answer: str, rationale: str | None = None) -> str:
    """' B. Vitamin C' plus '\\nExplanation: ...' when the data has a rationale."""
    target = f" {letter}. {answer.strip()}"
    return target + f"\nExplanation: {rationale.strip()}" if rationale else target


def tokenize_example(tok, docs: list[str], question: str, options: dict[str, str], target: str,
                     max_doc_tokens: int, letter_only: bool = False) -> tuple[list[int], list[int]]:
    """-> (tokens, labels) of the prompt and the target encoded as ONE text, as the model reads it at
    inference: labels are -100 on the prompt and the tokens themselves on the target (which ends
    with EOS); with letter_only, on the answer letter alone (the target's first token, " B", in BPE).
    Each document is first cut to about max_doc_tokens tokens (`cut_document`).

    Encoding the pieces one by one would not give the same tokens: Llama-2's tokenizer prepends "▁"
    to every text it encodes, so a target " B. text" encoded alone starts with a double space "▁▁"
    and an unprefixed "B", which Llama-2 rarely saw after "Answer:"."""
    *doc_pieces, question_piece = format_context(docs, question, options)
    prompt = "".join(cut_document(tok, piece, max_doc_tokens) for piece in doc_pieces) + question_piece
    prompt_ids = tok.encode(prompt)                              # [BOS] first if the model wants it
    tokens = tok.encode(prompt + target, eos=True)
    P = 0                                                        # the prompt's tokens: the common prefix (a token
    while P < min(len(prompt_ids), len(tokens)) and prompt_ids[P] == tokens[P]:   # merged across the border
        P += 1                                                   # is labelled, so the answer is never cut)
    last = len(tokens)
    if letter_only:   # through the first token that is not blank: " B" in BPE, or " " then "B" in bytes
        last = next((t + 1 for t in range(P, len(tokens)) if tok.decode([tokens[t]]).strip()), last)
    return tokens, [-100] * P + tokens[P:last] + [-100] * (len(tokens) - last)


def cut_document(tok, piece: str, max_tokens: int) -> str:
    """A document piece ("Document: ...\n") cut to its first max_tokens tokens, newline kept. The cut
    is made on the piece's own encoding and decoded back to text, so that the prompt can be encoded
    as one text; in context the cut text may encode to a token more or fewer."""
    ids = tok.encode(piece, bos=False)
    if len(ids) <= max_tokens:
        return piece
    return tok.decode(ids[:max(0, max_tokens - 1)]) + "\n"


def pad_batch(rows: list[tuple[list[int], list[int]]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad (tokens, labels) rows -> tokens (B, T), labels (B, T). Right padding is invisible
    to causal attention: no real token attends to a later pad."""
    T = max(len(t) for t, _ in rows)
    tokens = torch.tensor([t + [pad_id] * (T - len(t)) for t, _ in rows], device=device)
    labels = torch.tensor([lab + [-100] * (T - len(lab)) for _, lab in rows], device=device)
    return tokens, labels


def token_chunks(rows: list[tuple[list[int], list[int]]], max_tokens: int) -> list[list]:
    """Consecutive rows grouped so that each group, right-padded to its longest row, holds at most
    max_tokens tokens (a row longer than that goes alone)."""
    chunks, longest = [[]], 0
    for row in rows:
        longest = max(longest, len(row[0]))
        if chunks[-1] and (len(chunks[-1]) + 1) * longest > max_tokens:
            chunks.append([])
            longest = len(row[0])
        chunks[-1].append(row)
    return chunks


@contextlib.contextmanager
def eval_mode(module: nn.Module):
    """module.eval() inside the block, the previous mode restored after it."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


class OptionHead(nn.Module):
    """An option-pointing answer head for small LLMs trained from scratch (the built-in demo).

    A next-token letter head must learn two coordinated hops under a one-token loss (find the value
    in a document, then map it to its letter); a from-scratch model does not learn to read that way
    in minutes. This head scores option j by comparing the state that predicts the answer letter with
    the state at option j's first text token:  logit_j = <W_q h_answer, W_k h_option_j> / sqrt(C).
    `sequence_loss` becomes the cross-entropy over the options of the labelled letter, so JMLR's
    per-document losses, its generation loss and option scoring use it unchanged. It assumes that the
    letters appear as tokens of their own only in the option lines ("A. text"), as in the demo."""

    def __init__(self, llm: nn.Module, letter_ids: list[int]):
        super().__init__()
        self.llm = llm
        if llm.lm_head.weight is not llm.embed_tokens.weight:   # replaced by this head: never used
            llm.lm_head.weight.requires_grad_(False)
        C = llm.cfg.hidden_size
        self.query, self.key = nn.Linear(C, C, bias=False), nn.Linear(C, C, bias=False)
        self.register_buffer("letter_ids", torch.tensor(letter_ids), persistent=False)

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.llm.embed_tokens

    def option_logits(self, tokens: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens, labels (B, T) -> option logits (B, n) (-inf for absent letters), target index (B,)."""
        B, T = tokens.shape
        first = (labels != -100).int().argmax(1)                               # (B,) the answer letter
        pos = torch.arange(T, device=tokens.device)
        is_letter = (tokens[:, :, None] == self.letter_ids) & (pos[None, :, None] < first[:, None, None])
        letter_pos = torch.where(is_letter, pos[None, :, None], -1).amax(1)   # (B, n) last occurrence
        h = self.llm.hidden_states(tokens)                                     # (B, T, C)
        rows = torch.arange(B, device=tokens.device)
        h_answer = h[rows, first - 1]                                          # (B, C): predicts the letter
        h_option = h[rows[:, None], (letter_pos + 2).clamp(0, T - 1)]          # (B, n, C): "A" "." text
        logits = (self.query(h_answer)[:, None] * self.key(h_option)).sum(-1) / math.sqrt(h.size(-1))
        logits = logits.float().masked_fill(letter_pos < 0, -math.inf)         # (B, n)
        is_target = tokens[rows, first][:, None] == self.letter_ids                # (B, n)
        if not bool(is_target.any(1).all()):
            raise ValueError("an answer letter that is not among the option head's letters (train.py: option_letters)")
        return logits, is_target.int().argmax(1)                               # (B,) the target option

    def sequence_loss(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """-> (B,) cross-entropy of the labelled letter over the options (replaces Llama.sequence_loss)."""
        logits, target = self.option_logits(tokens, labels)
        return F.cross_entropy(logits, target, reduction="none")


# ----------------------------------------------------------------------------------------------
# The method's steps as small functions

def sample_documents(scores: torch.Tensor, m: int, tau: float, minmax_scale: bool = False,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Step 2: draw m of N candidates without replacement, p = softmax(s / tau). (B, N) -> (B, m).

    Gumbel-top-k (Kool et al. 2019): the m largest keys log p_k - log E_k, E_k ~ Exp(1), are a draw
    without replacement in draw order, the same distribution as drawing one at a time and
    renormalizing over what is left. In log space nothing underflows: torch.multinomial on
    softmax(s / tau) at a small tau gets exact zeros and fills the remaining draws with the
    highest-index candidates. The noise is drawn on the generator's own device, so a CPU generator
    draws the same documents whatever device the scores are on. No gradient flows through the draw."""
    # assignment: sampling: keys log softmax(s.detach() / tau) - log(Exp(1) noise) (minmax_scale first); the top m
    s = scores.detach().float()
    if minmax_scale:   # the official code's scaling to [-1, 1]: nearly uniform draws for small tau
        lo, hi = s.amin(1, keepdim=True), s.amax(1, keepdim=True)
        s = 2 * (s - lo) / (hi - lo).clamp_min(1e-12) - 1
    log_p = torch.log_softmax(s / tau, dim=1)                                    # (B, N)
    device = generator.device if generator is not None else s.device
    noise = torch.empty(s.shape, device=device).exponential_(generator=generator).to(s.device)   # (B, N) ~ Exp(1)
    return (log_p - noise.log()).topk(m, dim=1).indices                          # (B, m), in draw order
    # end assignment: sampling


def rank_loss(scores: torch.Tensor, llm_losses: torch.Tensor, tau_rank: float = 1.0,
              tie_margin: float = 0.0) -> torch.Tensor:
    """Step 4, RankNet: scores (B, m) with gradients, llm_losses (B, m) detached -> scalar.

    Every unordered pair (a, b) of one question whose LLM losses differ contributes
    BCE(sigmoid((s_a - s_b) / tau_rank), 1[l_a < l_b]): the document that lowers the LLM's loss must
    score higher. Ties contribute nothing; the mean is over the pairs that exist in the batch.
    tie_margin > 0 (our option, not the paper's) also treats near-ties as ties: two documents that
    help the LLM equally little differ in loss by noise, and a hard label on noise teaches the
    retriever to flatten its scores."""
    # assignment: rank_loss: mean BCE(sigmoid((s_a - s_b) / tau_rank), 1[l_a < l_b]) over untied pairs a < b
    diff = (scores[:, :, None] - scores[:, None, :]) / tau_rank               # (B, m, m): s_a - s_b
    l = llm_losses.detach()
    target = (l[:, :, None] < l[:, None, :]).float()                         # 1 where a is better
    m = scores.size(1)
    differ = (l[:, :, None] - l[:, None, :]).abs() > tie_margin                 # (B, m, m)
    pairs = torch.ones(m, m, dtype=torch.bool, device=scores.device).triu(1) & differ
    if not pairs.any():
        return scores.sum() * 0.0                                            # keeps the graph, no signal
    bce = F.binary_cross_entropy_with_logits(diff, target, reduction="none")  # (B, m, m)
    return bce[pairs].mean()
    # end assignment: rank_loss


def lsr_loss(scores: torch.Tensor, llm_losses: torch.Tensor, tau: float = 1.0, beta: float = 1.0) -> torch.Tensor:
    """REPLUG's LM-supervised retrieval: KL(P_R || Q_LM), P_R = softmax(s / tau) over the sampled
    documents, Q_LM = softmax(-l / beta) (documents that make the answer likely). (B, m) -> scalar."""
    log_p = F.log_softmax(scores / tau, dim=1)
    log_q = F.log_softmax(-llm_losses.detach() / beta, dim=1)
    return (log_p.exp() * (log_p - log_q)).sum(1).mean()


def pdist_loss(scores: torch.Tensor, llm_losses: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """Atlas's perplexity distillation: KL(Q_LM || P_R), the retriever fits the LM's preference."""
    log_p = F.log_softmax(scores / tau, dim=1)
    q = F.softmax(-llm_losses.detach() / tau, dim=1)
    return F.kl_div(log_p, q, reduction="batchmean")


def emdr2_loss(scores: torch.Tensor, llm_losses: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """Atlas's EMDR^2 with a frozen LM term: -log sum_k p_R(d_k) p_LM(y | d_k, q), with
    log p_LM = -l (mean NLL as the per-token log-likelihood)."""
    return -torch.logsumexp(F.log_softmax(scores / tau, dim=1) - llm_losses.detach(), dim=1).mean()


RETRIEVER_LOSSES = {"jmlr": lambda s, l, c: rank_loss(s, l, c.tau_rank, c.tie_margin),
                    "lsr": lambda s, l, c: lsr_loss(s, l, c.tau),
                    "pdist": lambda s, l, c: pdist_loss(s, l, c.tau), "emdr2": lambda s, l, c: emdr2_loss(s, l, c.tau)}


# ----------------------------------------------------------------------------------------------
# The joint module

@dataclass
class Example:
    question: str
    options: dict[str, str]     # letter -> text
    target: str                 # format_target(...)
    candidates: list[str]       # N candidate document texts, in the candidate file's order
    gold: int | None = None     # metrics only: index in candidates of the gold document (gold_index)
    answer: str = ""            # the correct letter, for accuracy


def gold_index(doc_ids: list[str], gold_doc: str | None) -> int | None:
    """Example.gold for candidates with these ids: the gold document's index; -1 when a gold document
    is known but not among them (a retrieval miss, which recall must count); None when none is known."""
    if gold_doc is None:
        return None
    return doc_ids.index(gold_doc) if gold_doc in doc_ids else -1


def gold_ranks(scores: torch.Tensor, batch: list[Example]) -> list[float | None]:
    """1-based rank of each question's gold document among its candidates, by scores (B, N): inf
    when it is not among them (recall counts a miss, MRR adds 1/inf = 0), None when none is known.
    Ties count against the gold document (its rank is the number of candidates scoring at least as
    high): a collapsed retriever with equal scores must not read as perfect recall."""
    return [None if ex.gold is None else math.inf if ex.gold < 0 else int((scores[b] >= scores[b, ex.gold]).sum())
            for b, ex in enumerate(batch)]


def helpfulness(scores: torch.Tensor, losses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Does the retriever's order agree with the documents that help the LLM? scores (B, N) and the
    LLM's losses given each candidate alone (B, N) -> per question (B,): the share of candidate pairs
    with different losses that the scores order the same way (a score tie counts as a disagreement;
    nan without such pairs), and the retriever's rank of the most helpful document (the lowest
    loss), ties counted against it."""
    ds = scores[:, :, None] - scores[:, None, :]                                  # (B, N, N): s_a - s_b
    dl = losses[:, None, :] - losses[:, :, None]                                  # (B, N, N): l_b - l_a
    pairs = (dl != 0).sum((1, 2))
    agreement = ((ds * dl) > 0).sum((1, 2)) / pairs                               # (B,); 0 / 0 = nan
    best = losses.argmin(1, keepdim=True)                                         # (B, 1)
    return agreement, (scores >= scores.gather(1, best)).sum(1)                  # (B,), (B,)


class JMLR(nn.Module):
    """Owns the LLM (llama.Llama) and the retriever (retriever.ColBERT); `forward(batch)` computes
    the joint loss of one batch and a metrics dict. One module, so one DDP wrapper covers both."""

    def __init__(self, llm: nn.Module, retriever: nn.Module | None, tokenizer, cfg: JMLRConfig, pad_id: int = 0):
        super().__init__()
        self.llm, self.retriever, self.tok, self.cfg, self.pad_id = llm, retriever, tokenizer, cfg, pad_id
        self.tokens_seen = 0      # LLM tokens through forward passes, for tokens/s and MFU
        self.tokens_trained = 0   # of which with gradients (a backward pass follows)
        self.equal_passes: Callable[[int], int] | None = None   # FSDP (train.py): n passes here -> the most of any rank

    def llm_losses(self, rows: list[tuple[list[int], list[int]]]) -> torch.Tensor:
        """Per-row mean NLL of the labelled target: a list of (tokens, labels) -> (len(rows),).

        With gradients (the generation pass) the rows go through as one padded batch. Without
        (step 3's per-document losses, option scoring, validation) the LLM runs as at inference,
        in eval mode (full causal attention, no dropout), so that a row's loss never depends on
        the rows beside it, and in chunks of at most cfg.max_pass_tokens padded tokens, so that
        memory is bounded whatever the batch size."""
        if torch.is_grad_enabled():
            return self._llm_pass(rows)
        chunks = token_chunks(rows, self.cfg.max_pass_tokens)
        if self.equal_passes is not None:   # FSDP: each pass gathers the weights, so every rank runs as many
            chunks += chunks[-1:] * (self.equal_passes(len(chunks)) - len(chunks))
        with eval_mode(self.llm):
            return torch.cat([self._llm_pass(chunk) for chunk in chunks])[:len(rows)]

    def _llm_pass(self, rows: list[tuple[list[int], list[int]]]) -> torch.Tensor:
        tokens, labels = pad_batch(rows, self.pad_id, self.llm.embed_tokens.weight.device)   # (B, T) each
        if self.training:   # evaluation passes are not training throughput
            self.tokens_seen += tokens.numel()
            self.tokens_trained += tokens.numel() if torch.is_grad_enabled() else 0
        return self.llm.sequence_loss(tokens, labels)

    @torch.no_grad()
    def document_losses(self, batch: list[Example], picked: torch.Tensor) -> torch.Tensor:
        """Step 3: l (B, m), the mean NLL of each question's target (or its answer letter alone: cfg.doc_loss)
        given one sampled document alone, without gradients. picked (B, m) indexes each question's candidates; all B * m (document,
        question) prompts go through the LLM as one padded batch (right padding changes nothing)."""
        # assignment: doc_losses: one tokenize_example row per sampled document, one llm_losses call, shaped (B, m)
        rows = [tokenize_example(self.tok, [ex.candidates[i]], ex.question, ex.options, ex.target,
                                 self.cfg.max_doc_tokens, self.cfg.doc_loss == "letter")
                for ex, p in zip(batch, picked.tolist()) for i in p]
        return self.llm_losses(rows).view(picked.shape)                           # (B, m)
        # end assignment: doc_losses

    @torch.no_grad()
    def candidate_losses(self, batch: list[Example]) -> torch.Tensor:
        """(B, N): the LLM's loss given each candidate alone, step 3 over every candidate: which
        documents help it (`helpfulness` compares the retriever's order with it)."""
        B, N = len(batch), len(batch[0].candidates)
        return self.document_losses(batch, torch.arange(N).expand(B, N))

    def score_candidates(self, batch: list[Example]) -> torch.Tensor:
        """Step 1: s (B, N) = MaxSim of each question against its own candidates, with gradients.
        Without gradients (validation, a frozen retriever) the same values come in passes of at most
        cfg.max_pass_tokens document tokens, so memory does not grow with B x N."""
        B, N = len(batch), len(batch[0].candidates)
        if any(len(ex.candidates) != N for ex in batch):
            raise ValueError(f"every example needs the same number of candidates ({N}); pad the candidate file")
        if not torch.is_grad_enabled():
            return score_candidate_lists(self.retriever, [ex.question for ex in batch],
                                         [ex.candidates for ex in batch], self.cfg.max_pass_tokens)
        Q, q_mask = self.retriever.encode_queries([ex.question for ex in batch])      # (B, Lq, d), (B, Lq)
        D, d_mask = self.retriever.encode_docs([d for ex in batch for d in ex.candidates])   # (B*N, Ld, d)
        return maxsim(Q, q_mask, D.view(B, N, *D.shape[1:]), d_mask.view(B, N, -1))  # (B, N)

    def top_documents(self, batch: list[Example], scores: torch.Tensor,
                      k: int | None = None) -> tuple[list[list[str]], torch.Tensor]:
        """The top-k (default cfg.top_k) candidates of each question by score, ordered best LAST
        (nearest the question), and their indices in the candidate lists (B, k), best first."""
        top = scores.detach().topk(min(k or self.cfg.top_k, scores.size(1)), dim=1).indices   # (B, k), best first
        return [[ex.candidates[i] for i in reversed(t)] for ex, t in zip(batch, top.tolist())], top

    @torch.no_grad()
    def option_losses(self, batch: list[Example], docs: list[list[str]]) -> torch.Tensor:
        """Answer by option likelihood: the loss of the target ' X. option text' for every option X
        -> (B, n), n the most options of any question (+inf past a question's own, as when MedQA's
        4 and 5 options mix); the prediction is the argmin. Never fails to parse, unlike generated text."""
        rows = [tokenize_example(self.tok, d, ex.question, ex.options, format_target(x, text), self.cfg.max_doc_tokens)
                for ex, d in zip(batch, docs) for x, text in ex.options.items()]
        per_question = self.llm_losses(rows).split([len(ex.options) for ex in batch])   # B tensors (n_b,)
        return nn.utils.rnn.pad_sequence(per_question, batch_first=True, padding_value=math.inf)   # (B, n)

    @torch.no_grad()
    def confident(self, batch: list[Example]) -> torch.Tensor:
        """(B,) bool: the retriever's best candidate beats the second by cfg.confidence_margin. Uses
        no labels; with a word-matching initial retriever the top document is then usually right."""
        top2 = self.score_candidates(batch).topk(2, dim=1).values                  # (B, 2)
        return top2[:, 0] - top2[:, 1] > self.cfg.confidence_margin

    @torch.no_grad()
    def predict(self, batch: list[Example]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> option losses (B, n) with the top-k documents of the current retriever (argmin answers),
        and the candidate scores (B, N) (None without retrieval)."""
        if self.cfg.objective == "none":
            return self.option_losses(batch, [[] for _ in batch]), None
        scores = self.score_candidates(batch)
        return self.option_losses(batch, self.top_documents(batch, scores)[0]), scores

    def forward(self, batch: list[Example], generator: torch.Generator | None = None, train_retriever: bool = True):
        """-> (loss, metrics). train_retriever=False skips steps 2-4 (the demo's warm-up curriculum:
        the LLM first learns to read from questions the initial retriever is confident about)."""
        cfg, metrics = self.cfg, {}
        tokenize = lambda ex, docs: tokenize_example(self.tok, docs, ex.question, ex.options, ex.target,  # noqa: E731
                                                     cfg.max_doc_tokens)
        if cfg.objective == "none":
            loss_gen = self.llm_losses([tokenize(ex, []) for ex in batch]).mean()
            return loss_gen, {"loss_gen": loss_gen.item()}
        train_retriever = train_retriever and cfg.objective != "rag"

        # 1. re-score the candidates (no gradient for a frozen retriever)
        with torch.set_grad_enabled(torch.is_grad_enabled() and train_retriever):
            scores = self.score_candidates(batch)                                   # (B, N)
        # 5. generation loss with the top-k documents, best last (nearest the question)
        docs, top = self.top_documents(batch, scores)
        rows = [tokenize(ex, d) for ex, d in zip(batch, docs)]
        with torch.set_grad_enabled(torch.is_grad_enabled() and cfg.objective != "retriever_only"):
            loss_gen = self.llm_losses(rows).mean()
        metrics["loss_gen"] = loss_gen.item()
        ranks = [r for r in gold_ranks(scores, batch) if r is not None]
        found = [r for r in ranks if r != math.inf]
        if ranks:
            metrics["recall_at_k"] = sum(r <= cfg.top_k for r in ranks) / len(ranks)
        if found:
            metrics["gold_rank"] = sum(found) / len(found)       # among the candidates that hold it
        metrics["doc_rank"] = float(top.float().mean()) + 1    # mean candidate-list rank of the docs used
        if not train_retriever:
            return loss_gen, metrics

        # 2. dynamic sampling, 3. per-document LLM losses as one padded no-grad batch
        picked = sample_documents(scores, min(cfg.num_sampled, scores.size(1)), cfg.tau, cfg.minmax_scale, generator)
        losses = self.document_losses(batch, picked)                                  # (B, m), no gradient
        sampled = scores.gather(1, picked)                                            # (B, m), with gradients
        # 4. the retriever loss, 6. the joint loss
        objective = "jmlr" if cfg.objective == "retriever_only" else cfg.objective
        loss_ret = RETRIEVER_LOSSES[objective](sampled, losses, cfg)
        loss = (0.0 if cfg.objective == "retriever_only" else loss_gen) + cfg.rank_weight * loss_ret
        agree = (torch.sign(sampled[:, :, None] - sampled[:, None, :])                   # (B, m, m)
                 == torch.sign(losses[:, None, :] - losses[:, :, None]))
        differ = losses[:, :, None] != losses[:, None, :]
        metrics.update(loss_rank=loss_ret.item(), loss_spread=float((losses.amax(1) - losses.amin(1)).mean()),
                       rank_agreement=float(agree[differ].float().mean()) if differ.any() else math.nan)
        return loss, metrics
