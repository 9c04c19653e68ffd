"""Grades masks (retriever.ColBERTTokenizer.queries and .docs) on a word-level vocabulary: ColBERT's
markers, [MASK] padding to query_maxlen (attended: no; scored: yes), documents cut to doc_maxlen and
padded with [PAD] to the longest row only, punctuation out of the score mask, bool masks."""

import pytest
import torch

from retriever import ColBERTConfig, ColBERTTokenizer, load_wordpiece

pytestmark = pytest.mark.masks
VOCAB = ["[PAD]", "[unused0]", "[unused1]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "?",
         "aspirin", "dose", "fever", "heart", "lung", "kidney", "liver", "blood"]
V = {w: i for i, w in enumerate(VOCAB)}


@pytest.fixture
def tok(tmp_path):
    (tmp_path / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    return ColBERTTokenizer(load_wordpiece(tmp_path), ColBERTConfig(query_maxlen=8, doc_maxlen=6))


def ids_of(words: str) -> list[int]:
    return [V[w] for w in words.split()]


def test_queries_are_padded_with_mask_to_query_maxlen(tok):
    ids, attend = tok.queries(["aspirin dose ?", "fever"])
    assert ids.shape == attend.shape == (2, 8), f"queries must be (Nq, query_maxlen) = (2, 8), got {tuple(ids.shape)}"
    assert ids[0].tolist() == ids_of("[CLS] [unused0] aspirin dose ? [SEP] [MASK] [MASK]"), \
        f"query ids {ids[0].tolist()}: [CLS] [Q] text [SEP], padded with [MASK] (not [PAD])"
    assert ids[1].tolist() == ids_of("[CLS] [unused0] fever [SEP]") + [V["[MASK]"]] * 4, \
        f"query ids {ids[1].tolist()}: every query is padded to query_maxlen, not to the longest"


def test_query_attention_mask_is_bool_and_skips_the_padding(tok):
    _, attend = tok.queries(["aspirin dose ?", "fever"])
    assert attend.dtype == torch.bool, f"the query attention mask must be bool, got {attend.dtype}"
    assert attend.tolist() == [[True] * 6 + [False] * 2, [True] * 4 + [False] * 4], \
        f"query attention {attend.int().tolist()}: the [MASK] padding is not attended"


def test_long_queries_and_documents_are_cut(tok):
    ids, attend = tok.queries(["aspirin dose fever heart lung kidney liver blood"])
    assert ids[0].tolist() == ids_of("[CLS] [unused0] aspirin dose fever heart lung [SEP]"), \
        f"a long query is cut to query_maxlen = 8 tokens, [SEP] last: {ids[0].tolist()}"
    assert attend.all(), "a query that fills query_maxlen is attended everywhere"
    ids, _, _ = tok.docs(["heart , lung . kidney liver"])
    assert ids[0].tolist() == ids_of("[CLS] [unused1] heart , lung [SEP]"), \
        f"a long document is cut to doc_maxlen = 6 tokens, [SEP] last: {ids[0].tolist()}"


def test_documents_are_padded_to_the_longest_row_with_pad(tok):
    tok.cfg.doc_maxlen = 20                                   # far more than either document needs
    ids, attend, score = tok.docs(["heart lung", "fever"])
    assert ids.shape == attend.shape == score.shape == (2, 5), f"documents are padded to the longest row " \
        f"(5 tokens here, doc_maxlen is 20), not to doc_maxlen: got {tuple(ids.shape)}"
    assert ids.tolist() == [ids_of("[CLS] [unused1] heart lung [SEP]"), ids_of("[CLS] [unused1] fever [SEP] [PAD]")], \
        f"document ids {ids.tolist()}: [CLS] [D] text [SEP], padded with [PAD]"
    assert attend.tolist() == [[True] * 5, [True] * 4 + [False]], f"attention {attend.int().tolist()}: padding " \
        "is not attended"


def test_score_mask_drops_padding_and_punctuation(tok):
    ids, attend, score = tok.docs(["heart , lung", "fever ."])
    assert attend.dtype == score.dtype == torch.bool, f"document masks must be bool, got {attend.dtype}, {score.dtype}"
    assert score.tolist() == [[True, True, True, False, True, True], [True, True, True, False, True, False]], \
        f"score mask {score.int().tolist()}: punctuation and padding are not scored, everything else is"
    tok.cfg.mask_punctuation = False
    _, attend, score = tok.docs(["heart , lung", "fever ."])
    assert torch.equal(attend, score), "with mask_punctuation=False every attended token is scored"
