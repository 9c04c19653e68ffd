"""qa_data.read_qa: hand-written fixtures in each QA format parse to hand-expected records, the
real files in ../shared/data parse to their published counts, and bad input stops with file:line."""

import json
from pathlib import Path

import pytest

from qa_data import QA_FORMATS, QARecord, detect_qa_format, pubmedqa_corpus, read_qa

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
ABCD = {"A": "aspirin", "B": "insulin", "C": "vitamin C", "D": "heparin"}


def jsonl(path: Path, *records) -> Path:
    """Records as JSON lines; a str is written as it is (a blank or malformed line)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


# ------------------------------------------------------------------------------------------------
# One small fixture per format, and the records expected from it by hand

def medqa_file(tmp_path: Path) -> Path:
    return jsonl(tmp_path / "US_test.jsonl",
                 {"question": "What treats scurvy?", "options": ABCD, "answer": "vitamin C", "answer_idx": "C",
                  "meta_info": "step1"},
                 "",   # a blank line is skipped, but still counts for the next line's number
                 {"question": "Five options?", "options": {**ABCD, "E": "none"}, "answer": "none",
                  "answer_idx": "E", "meta_info": "step2&3", "id": "m7"})


def medmcqa_file(tmp_path: Path) -> Path:
    row = {"question": "Deficiency in scurvy?", "opa": "B12", "opb": "D", "opc": "C", "opd": "K", "cop": 3,
           "exp": "Vitamin C is needed for collagen.", "subject_name": "Biochemistry", "topic_name": None,
           "id": "u1", "choice_type": "single"}
    return jsonl(tmp_path / "dev.jsonl", row, {**row, "id": "u2", "cop": 1, "exp": None},
                 {**row, "id": "u3", "cop": 4, "exp": ""})


def mmlu_file(tmp_path: Path) -> Path:
    path = tmp_path / "anatomy_test.csv"   # RFC 4180: "" inside quotes, a comma and a newline in one field
    path.write_text('What is 2+2?,3,4,5,6,B\n'
                    '"A ""dished face"", with commas, and\na newline",w,x,y,z,D\n'
                    'Last?,a,b,c,d,A\n', encoding="utf-8")
    return path


def pubmedqa_file(tmp_path: Path) -> Path:
    path = tmp_path / "ori_pqal.json"
    path.write_text(json.dumps({
        "111": {"QUESTION": "Does aspirin help?", "CONTEXTS": ["Background.", "Results."], "LABELS": ["B", "R"],
                "final_decision": "yes", "LONG_ANSWER": "It helps."},
        "222": {"QUESTION": "Is it unclear?", "CONTEXTS": ["Only one section."], "final_decision": "maybe",
                "LONG_ANSWER": "Perhaps."}}))
    return path


def generic_file(tmp_path: Path) -> Path:
    return jsonl(tmp_path / "mine.jsonl",
                 {"question": "Capital of France?", "options": ["Rome", "Paris"], "answer": "Paris"},
                 {"question": "Which vitamin?", "options": {"B": "D", "A": "C", "C": "K"}, "answer": "A",
                  "rationale": "Scurvy is vitamin C deficiency.", "id": "g2", "subject": "nutrition", "gold_doc": 42})


EXPECTED = {
    "medqa": (medqa_file, [
        QARecord("US_test:1", "What treats scurvy?", ABCD, "C", subject="step1"),
        QARecord("m7", "Five options?", {**ABCD, "E": "none"}, "E", subject="step2&3")]),
    "medmcqa": (medmcqa_file, [
        QARecord("u1", "Deficiency in scurvy?", {"A": "B12", "B": "D", "C": "C", "D": "K"}, "C",
                 rationale="Vitamin C is needed for collagen.", subject="Biochemistry"),
        QARecord("u2", "Deficiency in scurvy?", {"A": "B12", "B": "D", "C": "C", "D": "K"}, "A",
                 subject="Biochemistry"),   # exp null
        QARecord("u3", "Deficiency in scurvy?", {"A": "B12", "B": "D", "C": "C", "D": "K"}, "D",
                 subject="Biochemistry")]),   # exp ""
    "mmlu": (mmlu_file, [
        QARecord("anatomy_test:1", "What is 2+2?", {"A": "3", "B": "4", "C": "5", "D": "6"}, "B", subject="anatomy"),
        QARecord("anatomy_test:2", 'A "dished face", with commas, and\na newline',
                 {"A": "w", "B": "x", "C": "y", "D": "z"}, "D", subject="anatomy"),
        QARecord("anatomy_test:4", "Last?", {"A": "a", "B": "b", "C": "c", "D": "d"}, "A", subject="anatomy")]),
    "pubmedqa": (pubmedqa_file, [
        QARecord("111", "Does aspirin help?", {"A": "yes", "B": "no", "C": "maybe"}, "A", rationale="It helps.",
                 gold_doc="111"),
        QARecord("222", "Is it unclear?", {"A": "yes", "B": "no", "C": "maybe"}, "C", rationale="Perhaps.",
                 gold_doc="222")]),
    "generic": (generic_file, [
        QARecord("mine:1", "Capital of France?", {"A": "Rome", "B": "Paris"}, "B"),
        QARecord("g2", "Which vitamin?", {"A": "C", "B": "D", "C": "K"}, "A",
                 rationale="Scurvy is vitamin C deficiency.", subject="nutrition", gold_doc="42")]),
}


@pytest.mark.parametrize("fmt", QA_FORMATS)
def test_each_format_parses_to_the_hand_expected_records(tmp_path, fmt):
    make, expected = EXPECTED[fmt]
    path = make(tmp_path)
    assert detect_qa_format(path) == fmt
    assert read_qa(path) == expected
    assert read_qa(path, fmt) == expected
    assert list(read_qa(path)[-1].options) == sorted(expected[-1].options)   # letter order, whatever the file's


def test_a_named_format_overrides_detection(tmp_path):
    medqa = medqa_file(tmp_path)
    assert [r.subject for r in read_qa(medqa, "generic")] == [None, None]   # generic ignores meta_info
    assert [r.answer for r in read_qa(medqa, "generic")] == ["C", "E"]      # and finds the letter from the text
    csv_as_txt = tmp_path / "anatomy_test.txt"
    csv_as_txt.write_text(mmlu_file(tmp_path).read_text())
    with pytest.raises(ValueError, match="not valid JSON"):                 # a .txt is read as JSON lines...
        detect_qa_format(csv_as_txt)
    assert [r.answer for r in read_qa(csv_as_txt, "mmlu")] == ["B", "D", "A"]   # ...unless told otherwise


def test_pubmedqa_corpus_is_each_questions_abstract(tmp_path):
    path = pubmedqa_file(tmp_path)
    assert pubmedqa_corpus(path) == [("111", "Background. Results."), ("222", "Only one section.")]
    assert [r.gold_doc for r in read_qa(path)] == [pmid for pmid, _ in pubmedqa_corpus(path)]


# ------------------------------------------------------------------------------------------------
# The real files in ../shared/data

@pytest.mark.skipif(not (DATA / "mmlu_medical").is_dir(), reason=f"no {DATA}/mmlu_medical")
def test_real_mmlu_medical_has_1089_questions_in_six_subjects():
    records = [r for path in sorted((DATA / "mmlu_medical").glob("*.csv")) for r in read_qa(path)]
    assert len(records) == 1089
    assert {r.subject for r in records} == {"anatomy", "clinical_knowledge", "college_biology",
                                           "college_medicine", "medical_genetics", "professional_medicine"}
    assert all(list(r.options) == ["A", "B", "C", "D"] and r.answer in r.options for r in records)
    assert len({r.id for r in records}) == 1089


@pytest.mark.skipif(not (DATA / "medmcqa" / "dev.jsonl").is_file(), reason=f"no {DATA}/medmcqa/dev.jsonl")
def test_real_medmcqa_dev_has_4183_questions():
    records = read_qa(DATA / "medmcqa" / "dev.jsonl")
    assert len(records) == 4183
    assert all(r.answer in "ABCD" and len(r.options) == 4 for r in records)
    assert sum(r.rationale is not None for r in records) == 2206   # the rest have exp null (none is "")
    assert records[0].id == "45258d3d-b974-44dd-a161-c3fccbdadd88" and records[0].subject == "Physiology"


@pytest.mark.skipif(not (DATA / "pubmedqa" / "ori_pqal.json").is_file(), reason=f"no {DATA}/pubmedqa")
def test_real_pubmedqa_has_1000_questions_and_abstracts():
    path = DATA / "pubmedqa" / "ori_pqal.json"
    records = read_qa(path)
    assert len(records) == 1000
    assert all(r.answer in r.options and r.gold_doc == r.id and r.rationale for r in records)
    answers = [r.options[r.answer] for r in records]
    assert (answers.count("yes"), answers.count("no"), answers.count("maybe")) == (552, 338, 110)
    corpus = pubmedqa_corpus(path)
    assert len(corpus) == 1000 and all(text.strip() for _, text in corpus)
    assert [pmid for pmid, _ in corpus] == [r.gold_doc for r in records]


# ------------------------------------------------------------------------------------------------
# Bad input: a ValueError that names the file and line and says what is wrong

GOOD = {"question": "q?", "options": ABCD, "answer": "A"}
MEDMCQA = {"question": "q?", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": 1, "exp": None}


@pytest.mark.parametrize("name, lines, message", [
    ("qa.jsonl", [GOOD, '{"question": "q?", "options": '], "qa.jsonl:2: not valid JSON"),
    ("qa.jsonl", [GOOD, '["a list"]'], "qa.jsonl:2: expected a JSON object"),
    ("qa.jsonl", [GOOD, "", {"question": "q?", "answer": "A"}], "qa.jsonl:3: missing or empty 'options'"),
    ("qa.jsonl", [{"question": "q?", "answer": "A"}], "qa.jsonl:1: cannot tell the QA format from the keys"),
    ("qa.jsonl", [GOOD, {**GOOD, "options": {}}], "qa.jsonl:2: missing or empty 'options'"),
    ("qa.jsonl", [GOOD, {**GOOD, "options": ["only"]}], "qa.jsonl:2: only 1 option (A); a question needs at least 2"),
    ("qa.jsonl", [GOOD, {**GOOD, "options": {"A": "x", "C": "y"}}], "qa.jsonl:2: options are lettered ['A', 'C']"),
    ("qa.jsonl", [{**GOOD, "answer": "E"}], "qa.jsonl:1: answer letter 'E' is not one of the options A, B, C, D"),
    ("qa.jsonl", [{**GOOD, "answer": "Paris"}], "qa.jsonl:1: answer 'Paris' matches no option"),
    ("qa.jsonl", [GOOD, {**GOOD, "question": "  "}], "qa.jsonl:2: missing or empty 'question'"),
    ("qa.jsonl", [{**GOOD, "id": "x"}, {**GOOD, "id": "x"}], "qa.jsonl: duplicate question id 'x'"),
    ("medqa.jsonl", [{**GOOD, "answer": "aspirin", "answer_idx": "B"}],
     "medqa.jsonl:1: answer_idx 'B' is 'insulin' but answer is 'aspirin'"),
    ("dev.jsonl", [MEDMCQA, {**MEDMCQA, "cop": 5}], "dev.jsonl:2: cop=5 is outside 1-4"),
    ("dev.jsonl", [MEDMCQA, {k: v for k, v in MEDMCQA.items() if k != "opd"}], "dev.jsonl:2: missing field 'opd'"),
    ("qa.jsonl", [{**GOOD, "options": [f"o{i}" for i in range(27)]}], "qa.jsonl:1: 27 options; at most 26 (A-Z)"),
    ("qa.jsonl", [GOOD, '{"question": "q?", "options": ["a", "b"], "answer": "A", "answer": "B"}'],
     "qa.jsonl:2: duplicate key 'answer'"),
    ("qa.jsonl", [{**GOOD, "answer": 2}], "qa.jsonl:1: 'answer' is 2 (int); expected a text"),
    ("dev.jsonl", [MEDMCQA, {**MEDMCQA, "cop": True}], "dev.jsonl:2: cop=True is outside 1-4"),
    ("qa.jsonl", [], "qa.jsonl: no questions"),
    ("qa.jsonl", ["", "  "], "qa.jsonl: no questions"),
])
def test_bad_json_lines_name_file_and_line(tmp_path, name, lines, message):
    path = jsonl(tmp_path / name, *lines)
    with pytest.raises(ValueError) as e:
        read_qa(path)
    assert str(e.value).startswith(f"{tmp_path}/{message}")


@pytest.mark.parametrize("text, message", [
    ("q1,a,b,c,d,A\nq2,a,b,c,A\n", "x_test.csv:2: expected 6 columns (question,A,B,C,D,answer), found 5"),
    ('q1,a,b,c,d,A\n"two\nlines",a,b,c,d,a,b\n', "x_test.csv:2: expected 6 columns"),
    ('q1,a,b,c,d,A\n\n"two\nlines",a,b,c,d,E\n', "x_test.csv:3: answer letter 'E' is not one of the options"),
    ("", "x_test.csv: no questions"),
    ("q1,a,b,c,d,A\nq2,caf\xe9,b,c,d,A\n".encode("latin-1"), "x_test.csv:2: not valid UTF-8"),
])
def test_bad_csv_names_file_and_csv_line(tmp_path, text, message):
    (tmp_path / "x_test.csv").write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ValueError) as e:
        read_qa(tmp_path / "x_test.csv")
    assert str(e.value).startswith(f"{tmp_path}/{message}")


@pytest.mark.parametrize("data, message", [
    ({"111": {"QUESTION": "q?", "final_decision": "perhaps"}}, "pq.json pmid 111: final_decision='perhaps'"),
    ({"111": {"final_decision": "yes"}}, "pq.json pmid 111: missing or empty 'QUESTION'"),
    ({"111": "yes"}, "pq.json: expected PubMedQA's {pmid: {QUESTION"),   # test_ground_truth.json's shape
    ({}, "pq.json: no questions"),
    ('{"111": {"QUESTION": "q?", "final_decision": "yes"}, "111": {"QUESTION": "r?", "final_decision": "no"}}',
     "pq.json: duplicate key '111'"),   # json.loads alone keeps the second question and drops the first
])
def test_bad_pubmedqa_names_file_and_pmid(tmp_path, data, message):
    (tmp_path / "pq.json").write_text(data if isinstance(data, str) else json.dumps(data))
    with pytest.raises(ValueError) as e:
        read_qa(tmp_path / "pq.json")
    assert str(e.value).startswith(f"{tmp_path}/{message}")


def test_mmlu_byte_order_mark_is_not_part_of_the_first_question(tmp_path):
    (tmp_path / "x_test.csv").write_text("What is 2+2?,3,4,5,6,B\n", encoding="utf-8-sig")   # as Excel saves it
    assert read_qa(tmp_path / "x_test.csv")[0].question == "What is 2+2?"


def test_unknown_format_name_is_refused(tmp_path):
    path = generic_file(tmp_path)
    with pytest.raises(ValueError, match="unknown QA format 'medqa2'; choose one of medqa, medmcqa, mmlu"):
        read_qa(path, "medqa2")
