"""qa_data.py: one reader of medical QA files for the whole project (colbert_index.py's `candidates`,
train.py, eval.py): MedQA (and Amboss), MedMCQA, MMLU, PubMedQA and a generic JSON-lines format.

    read_qa(path, fmt=None) -> [QARecord(id, question, options {letter: text}, answer letter,
                                         rationale, subject, gold_doc)]

Every record is validated before any is returned, so a bad line stops a run before training starts,
not hours into it; each error names the file and line (PubMedQA: the file and pmid) and says what to
fix. `pubmedqa_corpus` turns PubMedQA's abstracts into a corpus in which each question's own
abstract is its gold document.

Run:
    python qa_data.py FILE [--format FMT]      # count the questions, show the first, or the first error
"""

import argparse
import csv
import io
import json
import re
import string
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cli


@dataclass
class QARecord:
    id: str
    question: str
    options: dict[str, str]        # letter -> option text, in order ("A", "B", ...)
    answer: str                    # the correct letter, a key of options
    rationale: str | None = None   # MedMCQA `exp`, PubMedQA LONG_ANSWER, generic `rationale`
    subject: str | None = None     # MMLU subset (from the file name), MedMCQA subject_name, MedQA meta_info
    gold_doc: str | None = None    # a known gold corpus document id (PubMedQA: its own pmid)


QA_FORMATS = ("medqa", "medmcqa", "mmlu", "pubmedqa", "generic")
PUBMEDQA_OPTIONS = {"A": "yes", "B": "no", "C": "maybe"}   # PubMedQA's final_decision, as a 3-way choice


def qa_field(rec: dict, key: str, where: str):
    if rec.get(key) is None:        # absent, or null as MedMCQA writes a missing value
        raise ValueError(f"{where}: missing field {key!r}")
    return rec[key]


def qa_text(value, name: str, where: str) -> str:
    if value is not None and not isinstance(value, str):   # 5, true, [...]: say what was found
        raise ValueError(f"{where}: {name!r} is {value!r} ({type(value).__name__}); expected a text (a JSON string)")
    if value is None or not value.strip():
        raise ValueError(f"{where}: missing or empty {name!r}")
    return value


class DuplicateKeyError(ValueError):
    """A JSON object gives one key twice (json.loads would keep the later value silently)."""


def unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """json.loads's object_pairs_hook: a key given twice is refused (JSON keeps the last one silently,
    which drops a PubMedQA question with a repeated pmid, or the first of two 'answer' fields)."""
    out = {}
    for k, v in pairs:
        if k in out:
            raise DuplicateKeyError(f"duplicate key {k!r}; every key (a PubMedQA pmid, a field) must appear once")
        out[k] = v
    return out


def qa_options(raw, where: str) -> dict[str, str]:
    """{letter: text} or [texts] -> {"A": text, "B": text, ...} in letter order, so the prompt and
    the answer letter agree however the file ordered its keys."""
    if isinstance(raw, list):
        if len(raw) > len(string.ascii_uppercase):            # zip would drop the 27th and later silently
            raise ValueError(f"{where}: {len(raw)} options; at most 26 (A-Z) can be lettered")
        raw = dict(zip(string.ascii_uppercase, raw))          # lettered in list order
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"{where}: missing or empty 'options'; give {{letter: text}} or a list of texts")
    letters = sorted(raw)
    if len(letters) < 2:
        raise ValueError(f"{where}: only 1 option ({letters[0]}); a question needs at least 2")
    if letters != list(string.ascii_uppercase[:len(letters)]):
        raise ValueError(f"{where}: options are lettered {letters}; letter them A, B, C, ... without gaps")
    if not all(isinstance(raw[k], str) for k in letters):
        raise ValueError(f"{where}: every option must be a string")
    return {k: raw[k] for k in letters}


def answer_letter(answer, options: dict[str, str], where: str) -> str:
    """The letter of the correct option, from a letter or from exactly one option's text."""
    a = qa_text(answer, "answer", where).strip()
    if a in options:                # a letter first: an option whose text is "A" cannot shadow it
        return a
    matches = [k for k, text in options.items() if text.strip() == a]
    if len(matches) == 1:
        return matches[0]
    if len(a) == 1:                 # a letter, but not one of these options
        raise ValueError(f"{where}: answer letter {a!r} is not one of the options {', '.join(options)}")
    if matches:                     # two options share this text: the letter is ambiguous
        raise ValueError(f"{where}: answer {a!r} is the text of options {', '.join(matches)}; give its letter")
    raise ValueError(f"{where}: answer {a!r} matches no option; give a letter ({', '.join(options)}) "
                     "or exactly one option's text")


def medqa_record(rec: dict, where: str, default_id: str) -> QARecord:
    """MedQA/Amboss: options {A..D or A..E}, answer_idx the letter and answer its text (either suffices)."""
    options = qa_options(rec.get("options"), where)
    letter = answer_letter(rec.get("answer_idx") or rec.get("answer"), options, where)
    text = rec.get("answer")        # with answer_idx, a check that the two agree
    if rec.get("answer_idx") and isinstance(text, str) and text.strip() != options[letter].strip():
        raise ValueError(f"{where}: answer_idx {letter!r} is {options[letter]!r} but answer is {text!r}; fix one")
    return QARecord(str(rec.get("id", default_id)), qa_text(rec.get("question"), "question", where),
                    options, letter, subject=rec.get("meta_info"))


def medmcqa_record(rec: dict, where: str, default_id: str) -> QARecord:
    """MedMCQA: four options opa..opd and cop, the correct one numbered 1-4; exp may be null or ""."""
    options = qa_options([qa_field(rec, k, where) for k in ("opa", "opb", "opc", "opd")], where)
    cop = qa_field(rec, "cop", where)
    if type(cop) is not int or cop not in (1, 2, 3, 4):   # true == 1 and 1.0 == 1 in Python: neither is a cop
        raise ValueError(f"{where}: cop={cop!r} is outside 1-4 (1 -> A, ..., 4 -> D)")
    return QARecord(str(rec.get("id", default_id)), qa_text(rec.get("question"), "question", where),
                    options, "ABCD"[cop - 1], rationale=rec.get("exp") or None, subject=rec.get("subject_name"))


def generic_record(rec: dict, where: str, default_id: str) -> QARecord:
    options = qa_options(rec.get("options"), where)
    gold = rec.get("gold_doc")
    return QARecord(str(rec.get("id", default_id)), qa_text(rec.get("question"), "question", where),
                    options, answer_letter(rec.get("answer"), options, where),
                    rationale=rec.get("rationale") or None, subject=rec.get("subject"),
                    gold_doc=None if gold is None else str(gold))


def read_jsonl_records(path: Path) -> Iterator[tuple[dict, str, str]]:
    """(record, "file:line", default id "stem:line") for each non-blank line of a JSON-lines file."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw, object_pairs_hook=unique_keys)   # bytes: bad UTF-8 names this line too
            except DuplicateKeyError as e:
                raise ValueError(f"{path}:{n}: {e}") from None
            except ValueError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e}); each line must be one JSON object") from None
            if not isinstance(rec, dict) or not rec:
                raise ValueError(f"{path}:{n}: expected a JSON object with the question's fields, found {rec!r:.80}")
            yield rec, f"{path}:{n}", f"{path.stem}:{n}"


def read_text_file(path: Path) -> str:
    """A UTF-8 text file, less a byte-order mark (Excel writes one; it would start the first
    question); invalid UTF-8 raises naming the file and line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not valid UTF-8 ({e.reason} at byte {e.start}); "
                         "re-encode the file as UTF-8") from None


def read_mmlu(path: Path) -> list[QARecord]:
    """MMLU's header-less CSV question,A,B,C,D,answer; the subject is the file name less its split."""
    subject = re.sub(r"_(test|dev|val)$", "", path.stem)   # anatomy_test.csv -> anatomy
    out = []
    with io.StringIO(read_text_file(path), newline="") as f:
        reader, next_line = csv.reader(f), 1
        for row in reader:
            line, next_line = next_line, reader.line_num + 1   # a quoted field may span lines: name the first
            where = f"{path}:{line}"
            if not row:                                         # a blank line
                continue
            if len(row) != 6:
                raise ValueError(f"{where}: expected 6 columns (question,A,B,C,D,answer), found {len(row)}; "
                                 "quote fields that contain commas")
            options = qa_options(row[1:5], where)
            out.append(QARecord(f"{path.stem}:{line}", qa_text(row[0], "question", where), options,
                                answer_letter(row[5], options, where), subject=subject))
    return out


def read_pubmedqa_json(path: Path) -> dict[str, dict]:
    try:
        data = json.loads(path.read_bytes(), object_pairs_hook=unique_keys)   # one object: the decoder's position
    except DuplicateKeyError as e:
        raise ValueError(f"{path}: {e}") from None
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ValueError(f"{path}: expected PubMedQA's {{pmid: {{QUESTION, CONTEXTS, final_decision, ...}}}} "
                         "(JSON-lines QA files end in .jsonl)")
    return data


def pubmedqa_record(pmid: str, rec: dict, where: str) -> QARecord:
    """PubMedQA: yes/no/maybe as options A/B/C; the question's own abstract is its gold document."""
    letters = {text: k for k, text in PUBMEDQA_OPTIONS.items()}   # yes -> A, no -> B, maybe -> C
    decision = rec.get("final_decision")
    if decision not in letters:
        raise ValueError(f"{where}: final_decision={decision!r}; expected yes, no or maybe")
    return QARecord(pmid, qa_text(rec.get("QUESTION"), "QUESTION", where), dict(PUBMEDQA_OPTIONS),
                    letters[decision], rationale=rec.get("LONG_ANSWER") or None, gold_doc=pmid)


def pubmedqa_corpus(path: str | Path) -> list[tuple[str, str]]:
    """(pmid, abstract) for each PubMedQA question, the abstract being its CONTEXTS joined by spaces:
    the corpus in which each question's gold document (QARecord.gold_doc) is its own abstract."""
    out = []
    for pmid, rec in read_pubmedqa_json(Path(path)).items():
        contexts = qa_field(rec, "CONTEXTS", f"{path} pmid {pmid}")
        is_text = isinstance(contexts, list) and all(isinstance(c, str) for c in contexts)
        if not is_text or not "".join(contexts).strip():
            raise ValueError(f"{path} pmid {pmid}: CONTEXTS must be a non-empty list of strings")
        out.append((pmid, " ".join(contexts)))
    return out


def detect_qa_format(path: str | Path) -> str:
    """.csv is MMLU, .json is PubMedQA; JSON lines are told apart by their first record's keys."""
    path = Path(path)
    if path.suffix == ".csv":
        return "mmlu"
    if path.suffix == ".json":
        return "pubmedqa"
    for rec, where, _ in read_jsonl_records(path):   # only the first record is looked at
        if "cop" in rec and "opa" in rec:               # MedMCQA's own field names
            return "medmcqa"
        if "answer_idx" in rec or "meta_info" in rec:   # MedQA's; a generic file has neither
            return "medqa"
        if {"question", "options", "answer"} <= rec.keys():
            return "generic"
        raise ValueError(f"{where}: cannot tell the QA format from the keys {sorted(rec)}; "
                         f"pass the format (one of {', '.join(QA_FORMATS)})")
    raise ValueError(f"{path}: no questions")


def read_qa(path: str | Path, fmt: str | None = None) -> list[QARecord]:
    """Every question of a QA file, in file order; `fmt` (one of QA_FORMATS) overrides detection.
    A malformed record raises ValueError naming file:line (PubMedQA: file and pmid)."""
    path = Path(path)
    if fmt is not None and fmt not in QA_FORMATS:
        raise ValueError(f"unknown QA format {fmt!r}; choose one of {', '.join(QA_FORMATS)}")
    fmt = fmt or detect_qa_format(path)
    if fmt == "mmlu":
        records = read_mmlu(path)
    elif fmt == "pubmedqa":
        records = [pubmedqa_record(pmid, rec, f"{path} pmid {pmid}") for pmid, rec in read_pubmedqa_json(path).items()]
    else:
        parse = {"medqa": medqa_record, "medmcqa": medmcqa_record, "generic": generic_record}[fmt]   # per line
        records = [parse(rec, where, default_id) for rec, where, default_id in read_jsonl_records(path)]
    if not records:                 # a wrong path or split, not an empty evaluation
        raise ValueError(f"{path}: no questions")
    seen = set()
    for r in records:               # candidate files are matched to their questions by id
        if r.id in seen:
            raise ValueError(f"{path}: duplicate question id {r.id!r}; give every question its own id")
        seen.add(r.id)
    return records


def main():
    p = argparse.ArgumentParser(description="Read a medical QA file and show what was read")
    p.add_argument("path", help="MedQA/Amboss or MedMCQA jsonl, MMLU csv, PubMedQA json, or generic jsonl")
    p.add_argument("--format", choices=QA_FORMATS, default=None, help="default: detected from the file")
    args = p.parse_args()
    records = read_qa(args.path, args.format)
    print(f"{args.path}: {len(records):,} questions ({args.format or detect_qa_format(args.path)}); the first:")
    print(records[0])


if __name__ == "__main__":
    cli.run(main)
