"""demo.py: train.py's built-in demo task, where no model can answer without retrieving.

An invented medical knowledge base (2,000 diseases, each with a first-line drug, a contraindicated
drug, a causing organism and a key finding, all invented words), the corpus that states those facts,
QA files about them (train, validation and test questions about different diseases), candidate
lists as a lexical retriever would return them, and two from-scratch models: a 2-layer Llama on a
word-level tokenizer and a 1-layer ColBERT that starts as a pure word matcher. `python train.py`
with no data calls `make_demo`; README ("The built-in demo") says what it teaches.

Run:
    python demo.py OUT_DIR [--seed 0] [--diseases 2000]     # write the data and models, print the paths
"""

import argparse
import json
import random
from pathlib import Path

import torch
import torch.nn as nn
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers

import cli
import retriever as rt
from llama import Llama, LlamaConfig, atomic_write

ATTRIBUTES = {   # attribute: (question, the document worded like the question, two paraphrases)
    "first": ("Which drug is the first line treatment for {d} ?", "The first line treatment for {d} is {v} .",
              ["{d} is treated first with {v} .", "Patients with {d} should start on {v} ."]),
    "avoid": ("Which drug is contraindicated in {d} ?", "The drug contraindicated in {d} is {v} .",
              ["{v} must never be given to patients with {d} .", "In {d} , giving {v} is dangerous ."]),
    "cause": ("Which organism causes {d} ?", "The organism that causes {d} is {v} .",
              ["{d} results from infection with {v} .", "{v} is the pathogen behind {d} ."]),
    "sign": ("What is the key finding in {d} ?", "The key finding in {d} is {v} .",
             ["{d} typically presents with {v} .", "Clinicians recognise {d} by {v} ."]),
}
SUFFIXES = {"disease": ["osis", "itis", "emia", "algia", "oma", "pathy"], "first": ["mab", "pril", "cillin", "azole"],
            "avoid": ["statin", "vir", "olol", "dronate"], "cause": ["bacter", "coccus", "monas", "myces"],
            "sign": ["uria", "plegia", "cytosis", "emesis"]}
SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]


def invent_words(kind: str, n: int, rng: random.Random, taken: set) -> list[str]:
    """n new pronounceable words of one kind ("velorosis", "zantimab"), none in `taken`."""
    words = []
    while len(words) < n:
        w = "".join(rng.choices(SYLLABLES, k=rng.randint(2, 3))) + rng.choice(SUFFIXES[kind])
        if w not in taken:
            taken.add(w)
            words.append(w.capitalize() if kind == "disease" else w)
    return words


def write_jsonl(path: Path, records: list[dict]):
    atomic_write(path, lambda p: Path(p).write_text("".join(json.dumps(r) + "\n" for r in records)))


def make_demo(out: Path, seed: int, n_diseases: int = 2000, n_val: int = 20, n_test: int = 40) -> dict:
    """Write the demo's corpus, QA files (generic jsonl), candidate lists, and from-scratch models.

    Every disease has 4 facts with invented values, one sentence each; a third of the documents
    repeat the question's wording, the rest paraphrase it and share only the disease name. Options
    come from the same attribute's values (for drugs, half the time the disease's other drug).
    Train, validation and test questions are about different diseases: test facts are in the
    corpus but never in a training question. Candidates: the disease's own 4 documents plus 12
    documents of other diseases about the same attribute (what a lexical retriever returns for the
    question), shuffled. Returns the paths as TrainConfig fields."""
    paths = {"llm": out / "llm", "retriever": out / "retriever", "train_file": out / "train.jsonl",
             "val_file": out / "val.jsonl", "test_file": out / "test.jsonl", "corpus": out / "corpus.jsonl",
             "candidates": out / "candidates.jsonl"}
    stamp = out / "demo.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == {"seed": seed, "n_diseases": n_diseases}:
        return {k: str(v) for k, v in paths.items()}
    if n_diseases <= n_val + n_test:   # validation and test diseases come first; training needs the rest
        raise ValueError(f"demo_diseases={n_diseases}: use more than {n_val + n_test} "
                         f"({n_val} validation + {n_test} test diseases, the rest for training)")
    rng, taken = random.Random(seed), set()
    diseases = invent_words("disease", n_diseases, rng, taken)
    values = {a: invent_words(a, n_diseases, rng, taken) for a in ATTRIBUTES}
    docs, doc_of = [], {}
    for i, d in enumerate(diseases):
        for a, (_, mirror, paraphrases) in ATTRIBUTES.items():
            text = (mirror if rng.random() < 1 / 3 else rng.choice(paraphrases)).format(d=d, v=values[a][i])
            doc_of[i, a] = f"{a}-{i}"
            docs.append({"id": doc_of[i, a], "content": text})
    split = {"test": range(n_test), "val": range(n_test, n_test + n_val), "train": range(n_test + n_val, n_diseases)}
    questions, candidates = {}, []
    for name, ids in split.items():
        questions[name] = []
        for i in ids:
            for a, (question, _, _) in ATTRIBUTES.items():
                for r in range(3 if name == "test" else (1 if name == "val" else 2)):
                    others = [j + (j >= i) for j in rng.sample(range(n_diseases - 1), 3)]   # any disease but i
                    wrong = [values[a][j] for j in others]
                    if a in ("first", "avoid") and rng.random() < 0.5:   # the disease's other drug
                        wrong[0] = values["avoid" if a == "first" else "first"][i]
                    options = wrong + [values[a][i]]
                    rng.shuffle(options)
                    letters = dict(zip("ABCD", options))
                    qid = f"{name}-{i}-{a}-{r}"
                    answer = "ABCD"[options.index(values[a][i])]
                    questions[name].append({"id": qid, "question": question.format(d=diseases[i]), "options": letters,
                                            "answer": answer, "gold_doc": doc_of[i, a]})
                    others = [j + (j >= i) for j in rng.sample(range(n_diseases - 1), 12)]
                    cands = [doc_of[i, b] for b in ATTRIBUTES] + [doc_of[j, a] for j in others]
                    rng.shuffle(cands)
                    candidates.append({"id": qid, "question": question.format(d=diseases[i]), "doc_ids": cands,
                                       "scores": [0.0] * len(cands)})
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(paths["corpus"], docs)
    for name in split:
        write_jsonl(paths[f"{name}_file"], questions[name])
    write_jsonl(paths["candidates"], candidates)
    words = sorted({w for r in docs + [q for qs in questions.values() for q in qs]
                    for w in (r.get("content") or r["question"]).split()}
                   | set("ABCD.:") | {"Document", "Question", "Answer"} | {v for vs in values.values() for v in vs})
    make_demo_models(paths["llm"], paths["retriever"], words, seed)
    atomic_write(stamp, lambda p: Path(p).write_text(json.dumps({"seed": seed, "n_diseases": n_diseases})))
    return {k: str(v) for k, v in paths.items()}


def make_demo_models(llm_dir: Path, retriever_dir: Path, words: list[str], seed: int):
    """A 2-layer Llama (width 64) on a word-level tokenizer, and a 1-layer ColBERT (width 64) that
    starts as a pure word matcher: unit random word vectors, no position signal, the layer's
    outputs and the projection set so the encoder is the identity (identical words score 1)."""
    torch.manual_seed(seed)
    vocab = ["<pad>", "<s>", "</s>", "<unk>"] + words
    tok = HFTokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()      # words, and punctuation on its own
    tok.decoder = decoders.WordPiece(prefix="##")    # joins words with spaces
    llm = Llama(LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                            bos_token_id=1, eos_token_id=2))
    nn.init.normal_(llm.embed_tokens.weight, std=1.0)   # frozen random embeddings, RMS 1 like a normed state
    llm.save_pretrained(llm_dir)
    tok.save(str(llm_dir / "tokenizer.json"))
    (llm_dir / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True}))

    bert_vocab = ["[PAD]", "[unused0]", "[unused1]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(
        {w.lower() for w in words})
    wp = HFTokenizer(models.WordPiece({w: i for i, w in enumerate(bert_vocab)}, unk_token="[UNK]"))
    wp.normalizer = normalizers.BertNormalizer(lowercase=True)
    wp.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wp.decoder = decoders.WordPiece()
    bert = rt.BertConfig(vocab_size=len(bert_vocab), hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                         intermediate_size=128, max_position_embeddings=64)
    model = rt.ColBERT(bert, rt.ColBERTConfig(dim=64, query_maxlen=16, doc_maxlen=24), wp)
    with torch.no_grad():
        model.position_embeddings.weight.zero_()
        model.token_type_embeddings.weight.zero_()
        for layer in model.layers:                    # residual branches start at zero: x = LN(x + 0)
            for lin in (layer.attn_out, layer.ffn_out):
                lin.weight.zero_(), lin.bias.zero_()
        model.linear.weight.copy_(torch.eye(64))
    model.save_pretrained(retriever_dir)


def main():
    p = argparse.ArgumentParser(description="Write the built-in demo's data and tiny models")
    p.add_argument("out", help="the directory to write (QA files, corpus, candidate lists, models)")
    p.add_argument("--seed", type=int, default=0, help="of the invented knowledge base (default %(default)s)")
    p.add_argument("--diseases", type=int, default=2000, help="size of the knowledge base (default %(default)s)")
    args = p.parse_args()
    print(json.dumps(make_demo(Path(args.out), args.seed, args.diseases), indent=1))


if __name__ == "__main__":
    cli.run(main)
