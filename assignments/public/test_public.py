"""Public checks, one or two per assignment: shapes, dtypes and a value you can work out by hand.
`python -m pytest -m rope` runs one assignment's. Passing them does not mean full marks: the
instructor's grading tests check more properties (ASSIGNMENTS.md lists the details they check)."""

import math

import pytest
import torch


@pytest.mark.rmsnorm
def test_rmsnorm_shape_and_a_value():
    from llama import RMSNorm
    out = RMSNorm(2, eps=0.0)(torch.tensor([[3.0, 4.0]]))              # mean of squares 12.5
    assert out.shape == (1, 2), f"RMSNorm changed the shape (1, 2) to {tuple(out.shape)}"
    assert torch.allclose(out, torch.tensor([[3.0, 4.0]]) / math.sqrt(12.5)), f"RMSNorm([3, 4]) = {out.tolist()}"


@pytest.mark.s2attn_mask
def test_s2_mask_shape_and_one_group():
    from s2attn_kernel import s2_mask
    mask = s2_mask(4, 4, 2)                                             # G = T: plain causal attention
    assert mask.shape == (2, 4, 4) and mask.dtype == torch.bool, f"got {tuple(mask.shape)} {mask.dtype}"
    assert torch.equal(mask[0], torch.ones(4, 4, dtype=torch.bool).tril()), f"G >= T: causal, got\n{mask[0].int()}"


@pytest.mark.lr_schedule
def test_lr_factor_warmup_and_peak():
    import train
    cfg = train.TrainConfig(steps=20, warmup_steps=4, min_lr_ratio=0.0)
    assert train.lr_factor(1, cfg) == pytest.approx(0.5), "step 1 of a 4-step warmup: (1 + 1) / 4"
    assert train.lr_factor(4, cfg) == pytest.approx(1.0), "the decay starts at the peak"


@pytest.mark.rope
def test_rope_shapes_and_position_zero():
    from llama import apply_rope, rope_cos_sin
    cos, sin = rope_cos_sin(torch.arange(5), torch.tensor([1.0, 0.1]))
    assert cos.shape == sin.shape == (5, 4) and cos.dtype == torch.float32, f"got {tuple(cos.shape)} {cos.dtype}"
    x = torch.randn(1, 2, 5, 4)
    out = apply_rope(x, cos, sin)
    assert out.shape == x.shape and torch.allclose(out[:, :, 0], x[:, :, 0]), "position 0 is not rotated"


@pytest.mark.sampling
def test_sampling_shape_and_distinct():
    from jmlr import sample_documents
    picked = sample_documents(torch.randn(3, 6), 4, 1.0, generator=torch.Generator().manual_seed(0))
    assert picked.shape == (3, 4), f"(B, m) = (3, 4), got {tuple(picked.shape)}"
    assert all(len(set(row)) == 4 for row in picked.tolist()), "a document was drawn twice"


@pytest.mark.masks
def test_query_and_document_shapes(tmp_path):
    from retriever import ColBERTConfig, ColBERTTokenizer, load_wordpiece
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[unused0]", "[unused1]", "[UNK]", "[CLS]", "[SEP]",
                                                   "[MASK]", ".", "fever", "heart"]) + "\n")
    tok = ColBERTTokenizer(load_wordpiece(tmp_path), ColBERTConfig(query_maxlen=8, doc_maxlen=20))
    ids, attend = tok.queries(["fever heart"])
    assert ids.shape == attend.shape == (1, 8), f"queries are (Nq, query_maxlen) = (1, 8), got {tuple(ids.shape)}"
    ids, attend, score = tok.docs(["fever heart", "fever"])
    assert ids.shape == score.shape == (2, 5), f"documents: (Nd, longest row) = (2, 5), got {tuple(ids.shape)}"


@pytest.mark.doc_losses
def test_document_losses_shape():
    from torch import nn
    from jmlr import JMLR, Example, JMLRConfig, format_target

    class Tok:
        def encode(self, text, bos=None, eos=False):
            return [1] + [3 + b % 250 for b in text.encode()] + ([2] if eos else [])

        def decode(self, ids):
            return bytes(i - 3 for i in ids if i >= 3).decode(errors="replace")

    class LengthLM(nn.Module):                                          # a row's "loss" is its length
        embed_tokens = nn.Embedding(256, 1)

        def sequence_loss(self, tokens, labels):
            return (tokens != 0).sum(1).float()

    batch = [Example("q?", {"A": "x"}, format_target("A", "x"), ["a", "bb", "ccc"]) for _ in range(2)]
    losses = JMLR(LengthLM(), None, Tok(), JMLRConfig()).document_losses(batch, torch.tensor([[2, 0], [1, 2]]))
    assert losses.shape == (2, 2), f"(B, m) = (2, 2), got {tuple(losses.shape)}"
    assert losses[0, 0] - losses[0, 1] == 2, "document 2 is two tokens longer than document 0"


@pytest.mark.maxsim
def test_maxsim_shape_and_a_value():
    from retriever import maxsim
    Q = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    D = torch.tensor([[[1.0, 0.0]], [[0.6, 0.8]]])                      # 2 documents of 1 token
    scores = maxsim(Q, torch.ones(1, 2, dtype=torch.bool), D, torch.ones(2, 1, dtype=torch.bool))
    assert scores.shape == (1, 2), f"(Nq, Nd) = (1, 2), got {tuple(scores.shape)}"
    assert torch.allclose(scores, torch.tensor([[1.0, 1.4]])), f"got {scores.tolist()}"


@pytest.mark.rank_loss
def test_rank_loss_one_pair():
    from jmlr import rank_loss
    loss = rank_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.1, 0.5]]))   # doc 0 better, scored higher
    assert loss.dim() == 0 and loss.item() == pytest.approx(math.log(1 + math.exp(-1.0))), f"got {loss}"


@pytest.mark.online_softmax
def test_kernel_runs_and_one_key_is_itself():
    from s2attn_kernel import s2_attention
    q, k, v = (torch.randn(1, 2, 16, 16) for _ in range(3))
    out = s2_attention(q, k, v, 16, block_sizes=(16, 16))
    assert out.shape == q.shape, f"(B, H, T, D) = {tuple(q.shape)}, got {tuple(out.shape)}"
    assert torch.allclose(out[:, :, 0], v[:, :, 0], atol=1e-5), "query 0 sees key 0 only: its output is v[0]"
