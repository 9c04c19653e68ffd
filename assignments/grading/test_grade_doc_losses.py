"""Grades doc_losses (jmlr.JMLR.document_losses) with a stand-in LLM whose "loss" of a row is the
mean of a learned value per token: each (question, sampled document) prompt must be built alone by
tokenize_example with cfg.max_doc_tokens, in row-major (B, m) order, and go through llm_losses
(one padded batch within the token budget, eval mode), without gradients. Only the assignment's
code runs: no real LLM, no retriever."""

import pytest
import torch
from torch import nn

from jmlr import JMLR, Example, JMLRConfig, format_target, tokenize_example

pytestmark = pytest.mark.doc_losses


class ByteTokenizer:
    """Bytes as tokens, 1 = BOS, 2 = EOS."""
    def encode(self, text, bos=None, eos=False):
        return ([1] if bos is None else []) + [3 + b % 250 for b in text.encode()] + ([2] if eos else [])

    def decode(self, ids):
        return bytes(i - 3 for i in ids if i >= 3).decode(errors="replace")


class PromptMeanLM(nn.Module):
    """Row loss = mean over non-pad tokens (pad id 0) of a learned value per token. Records each
    call's batch size and training mode."""
    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(256, 1)
        self.calls = []

    def sequence_loss(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.calls.append((tokens.size(0), self.training))
        real = (tokens != 0).float()                                         # (B, T)
        return (self.embed_tokens(tokens)[..., 0] * real).sum(1) / real.sum(1)   # (B,)


def make_batch(B: int = 3, N: int = 5) -> list[Example]:
    return [Example(f"question {b}?", {"A": "x", "B": "y"}, format_target("A", "x"),
                    [f"document {b}.{j} " + "long " * (4 * j) for j in range(N)]) for b in range(B)]


def one_alone(model: JMLR, ex: Example, doc: str) -> float:
    row = tokenize_example(model.tok, [doc], ex.question, ex.options, ex.target, model.cfg.max_doc_tokens)
    with torch.no_grad():
        return model.llm.sequence_loss(*(torch.tensor([x]) for x in row)).item()


def model_with(**cfg) -> JMLR:
    return JMLR(PromptMeanLM(), None, ByteTokenizer(), JMLRConfig(**cfg))


def test_shape_and_no_gradient():
    model = model_with()
    losses = model.document_losses(make_batch(), torch.tensor([[4, 0], [2, 3], [0, 1]]))
    assert losses.shape == (3, 2), f"document_losses must be (B, m) = (3, 2), got {tuple(losses.shape)}"
    assert losses.dtype == torch.float32 and not losses.requires_grad, f"{losses.dtype}, requires_grad=" \
        f"{losses.requires_grad}: float losses without gradients (step 3)"


@pytest.mark.parametrize("picked", [[[4, 0], [2, 3], [0, 1]], [[1, 2, 3], [3, 2, 1]]])
def test_each_entry_is_its_sampled_document_alone(picked):
    batch, model = make_batch(len(picked)), model_with(max_doc_tokens=200)
    losses = model.document_losses(batch, torch.tensor(picked))
    for b, ex in enumerate(batch):
        for j, i in enumerate(picked[b]):
            want = one_alone(model, ex, ex.candidates[i])
            assert losses[b, j].item() == pytest.approx(want, abs=1e-5), f"losses[{b}, {j}] must be question " \
                f"{b}'s loss with its candidate {i} alone in the prompt (row-major order, picked[b, j]); got " \
                f"{losses[b, j].item():.5f}, expected {want:.5f}"


def test_documents_are_cut_to_max_doc_tokens():
    batch = make_batch(2)
    for limit in (12, 40):
        model = model_with(max_doc_tokens=limit)
        losses = model.document_losses(batch, torch.tensor([[4], [3]]))
        want = [one_alone(model, ex, ex.candidates[i]) for ex, i in zip(batch, (4, 3))]
        assert losses[:, 0].tolist() == pytest.approx(want, abs=1e-5), f"max_doc_tokens = {limit}: pass " \
            "cfg.max_doc_tokens to tokenize_example"


def test_one_padded_batch_through_llm_losses():
    model = model_with()
    model.train()
    model.document_losses(make_batch(), torch.tensor([[4, 0], [2, 3], [0, 1]]))
    assert model.llm.calls == [(6, False)], f"LLM calls (rows, training mode): {model.llm.calls}; all B * m = 6 " \
        "rows go through llm_losses in one call (it runs the LLM once, in eval mode)"
    model = model_with(max_pass_tokens=80)                     # llm_losses cuts this budget into chunks
    losses = model.document_losses(make_batch(), torch.tensor([[4, 0], [2, 3], [0, 1]]))
    assert len(model.llm.calls) >= 3 and sum(n for n, _ in model.llm.calls) == 6, f"LLM calls {model.llm.calls} " \
        "with max_pass_tokens = 80: call llm_losses, which keeps each pass within the token budget"
    assert losses.shape == (3, 2)


def test_candidate_losses_score_every_candidate():
    """candidate_losses calls document_losses with picked = arange(N).expand(B, N), a view."""
    batch, model = make_batch(2, 4), model_with()
    losses = model.candidate_losses(batch)
    assert losses.shape == (2, 4), f"candidate_losses must be (B, N) = (2, 4), got {tuple(losses.shape)}"
    want = [[one_alone(model, ex, d) for d in ex.candidates] for ex in batch]
    assert losses.tolist() == [pytest.approx(row, abs=1e-5) for row in want], "an expanded (non-contiguous) " \
        "picked must work like any other"
