"""Evaluation data, mappings and prompts: the project's fixtures and the real benchmark files read in place, no
model needed.

Golden prompts are rebuilt here from the raw files with the csv/json modules and the reference's template
spelled out literally, so they check evaluation/prompts.py + evaluation/data.py independently of their code.
"""
import csv
import json

import pytest

from conftest import FIXTURES, shared_path
from evaluation import categories as cats
from evaluation.data import (DataError, load_agieval, load_ceval, load_cmmlu, load_gaokao, load_mmlu,
                             read_mmlu_csv)
from evaluation.prompts import PromptStyle, PromptTooLong, fit_prompt


def raw_rows(path, header=False):
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    return rows[1:] if header else rows


# ---------------------------------------------------------------------------------------------------
# Mappings agree with the files that ship with the data and cover every subject
# ---------------------------------------------------------------------------------------------------

@pytest.mark.real_data
def test_mmlu_mapping_matches_hendrycks_categories_and_covers_57_subjects():
    shipped = json.loads(shared_path("mmlu", "categories.json").read_text(encoding="utf-8"))
    assert cats.MMLU_SUBCATEGORIES == shipped["subcategories"]
    assert cats.MMLU_CATEGORIES == shipped["categories"]
    assert list(cats.MMLU_CATEGORIES) == list(shipped["categories"])  # the reference prints in this order
    files = sorted(p.name[: -len("_test.csv")] for p in shared_path("mmlu", "test").glob("*_test.csv"))
    assert len(files) == 57 and files == sorted(cats.MMLU_SUBCATEGORIES)
    subcats = {sc for lst in cats.MMLU_SUBCATEGORIES.values() for sc in lst}
    assert len(subcats) == 17 and subcats == {sc for lst in cats.MMLU_CATEGORIES.values() for sc in lst}
    assert set(cats.MMLU_TABLE_COLUMNS.values()) == set(cats.MMLU_CATEGORIES)


@pytest.mark.real_data
def test_ceval_mapping_matches_subject_mapping_and_covers_52_subjects():
    shipped = json.loads(shared_path("ceval", "subject_mapping.json").read_text(encoding="utf-8"))
    assert {k: tuple(v) for k, v in shipped.items()} == cats.CEVAL_SUBJECTS
    for split in ("dev", "val", "test"):
        files = sorted(p.name[: -len(f"_{split}.csv")] for p in shared_path("ceval", split).glob("*.csv"))
        assert files == sorted(cats.CEVAL_SUBJECTS), split
    assert len(cats.CEVAL_SUBJECTS) == 52
    assert set(cats.CEVAL_HARD) <= set(cats.CEVAL_SUBJECTS) and len(cats.CEVAL_HARD) == 8
    assert all(cats.CEVAL_SUBJECTS[s][2] == "STEM" for s in cats.CEVAL_HARD)
    assert {c for _, _, c in cats.CEVAL_SUBJECTS.values()} == set(cats.CEVAL_CATEGORY_ORDER)
    # The reference's prompt names differ from the mapping's Chinese names in exactly one subject.
    differ = [s for s in cats.CEVAL_SUBJECTS if cats.CEVAL_PROMPT_NAMES[s] != cats.CEVAL_SUBJECTS[s][1]]
    assert differ == ["mao_zedong_thought"]


@pytest.mark.real_data
def test_cmmlu_mapping_matches_shipped_categories():
    shipped = json.loads(shared_path("cmmlu", "categories.json").read_text(encoding="utf-8"))
    assert cats.CMMLU_NAMES == shipped["name_en2zh"]
    assert cats.CMMLU_SUBCATEGORIES == shipped["subcategories"]
    assert cats.CMMLU_CATEGORIES == shipped["categories"]
    files = sorted(p.stem for p in shared_path("cmmlu", "test").glob("*.csv"))
    assert files == sorted(cats.CMMLU_NAMES) and len(files) == 67


@pytest.mark.real_data
def test_gaokao_and_agieval_file_lists_are_complete():
    files = {p.stem for p in shared_path("gaokao-bench", "Objective_Questions").glob("*.json")}
    assert files == set(cats.GAOKAO_SUBJECTS) | set(cats.GAOKAO_EXCLUDED)
    assert not set(cats.GAOKAO_SUBJECTS) & set(cats.GAOKAO_EXCLUDED)
    tasks = {p.stem for p in shared_path("agieval", "v1").glob("*.jsonl")}
    kept = set(cats.AGIEVAL_ZH_SUBJECTS) | set(cats.AGIEVAL_EN_SUBJECTS)
    assert tasks == kept | set(cats.AGIEVAL_EXCLUDED) and not kept & set(cats.AGIEVAL_EXCLUDED)


def test_fixture_folder_is_what_its_generator_writes():
    from tests.fixtures import make_benchmarks

    assert make_benchmarks.main(["--check"]) == 0


# ---------------------------------------------------------------------------------------------------
# Readers on the fixtures and the real data
# ---------------------------------------------------------------------------------------------------

def test_readers_count_the_fixture_totals():
    root = FIXTURES / "benchmarks"
    manifest = json.loads((root / "MANIFEST.json").read_text())
    for split in ("test", "val"):
        subjects = load_mmlu(root / "mmlu", split)
        assert len(subjects) == 57
        assert [len(s.test) for s in subjects] == [manifest[f"mmlu/{split}/{s.name}"] for s in subjects]
    for split in ("val", "test"):
        subjects = load_ceval(root / "ceval", split)
        assert [len(s.test) for s in subjects] == [manifest[f"ceval/{split}/{s.name}"] for s in subjects]
        assert all((q.answer is None) == (split == "test") for s in subjects for q in s.test)
    assert [len(s.test) for s in load_cmmlu(root / "cmmlu")] == [manifest[f"cmmlu/test/{n}"]
                                                                  for n in cats.CMMLU_NAMES]
    for s in load_gaokao(root / "gaokao-bench"):
        assert len(s.dev) + len(s.test) == manifest[f"gaokao-bench/{s.name}"]["single"]
        assert sum(s.skipped.values()) == manifest[f"gaokao-bench/{s.name}"]["multiple"]
    for s in load_agieval(root / "agieval"):
        counts = manifest[f"agieval/{s.name}"]
        assert len(s.dev) + len(s.test) == counts["kept"]
        assert s.skipped == {k: v for k, v in counts.items() if k != "kept"}

@pytest.mark.real_data
def test_readers_count_the_official_totals():
    assert sum(len(s.test) for s in load_mmlu(shared_path("mmlu"), "test")) == 14042
    assert sum(len(s.test) for s in load_mmlu(shared_path("mmlu"), "val")) == 1531
    val = load_ceval(shared_path("ceval"), "val")
    assert sum(len(s.test) for s in val) == 1346 and sum(len(s.dev) for s in val) == 260
    test = load_ceval(shared_path("ceval"), "test")
    assert sum(len(s.test) for s in test) == 12342
    assert all(q.answer is None for s in test for q in s.test)
    assert sum(len(s.test) for s in load_cmmlu(shared_path("cmmlu"))) == 11582


def test_gaokao_keeps_single_answer_items_and_reports_the_rest(bench):
    subjects = {s.name: s for s in load_gaokao(bench / "gaokao-bench")}
    assert list(subjects) == list(cats.GAOKAO_SUBJECTS)
    for name, s in subjects.items():
        raw = json.loads((bench / "gaokao-bench" / "Objective_Questions" / f"{name}.json")
                         .read_text(encoding="utf-8"))["example"]
        single = [e for e in raw if len(e["answer"]) == 1 and e["answer"][0] in ("A", "B", "C", "D")]
        assert len(s.dev) == 5 and len(s.dev) + len(s.test) == len(single), name
        assert sum(s.skipped.values()) == len(raw) - len(single), name
        assert [q.id for q in s.dev + s.test] == [str(e["index"]) for e in single]
        assert all(q.options is None and q.answer in "ABCD" for q in s.test)
    assert subjects["2010-2022_Physics_MCQs"].skipped  # its "AD"-style answers are left out


def test_agieval_keeps_four_option_single_answer_records(bench):
    subjects = {s.name: s for s in load_agieval(bench / "agieval")}
    assert set(subjects) == set(cats.AGIEVAL_ZH_SUBJECTS) | set(cats.AGIEVAL_EN_SUBJECTS)
    for s in subjects.values():
        assert all(len(q.options) == 4 and all(q.options) and q.answer in "ABCD" for q in s.dev + s.test)
    assert subjects["jec-qa-kd"].skipped.get("multiple answers", 0) > 0
    if bench != FIXTURES / "benchmarks":
        assert subjects["sat-en"].skipped == {"not four options": 3}
    # Option labels such as "(A)" are not part of the option text.
    assert not any(o.startswith("(") and o[2:3] == ")" for s in subjects.values() for q in s.test
                   for o in q.options if o[1:2] in "ABCD")


# ---------------------------------------------------------------------------------------------------
# Golden prompts (the exact text of a known question of each task)
# ---------------------------------------------------------------------------------------------------

def test_mmlu_golden_prompt(bench):
    dev = raw_rows(bench / "mmlu" / "dev" / "abstract_algebra_dev.csv")
    test = raw_rows(bench / "mmlu" / "test" / "abstract_algebra_test.csv")
    block = "{}\nA. {}\nB. {}\nC. {}\nD. {}\nAnswer:"
    expected = ("The following are multiple choice questions (with answers) about  abstract algebra.\n\n"
                + "".join(block.format(*r[:5]) + f" {r[5]}\n\n" for r in dev[:5])
                + block.format(*test[3][:5]))
    (subject,) = load_mmlu(bench / "mmlu", subjects=["abstract_algebra"])
    assert PromptStyle("en", "abstract_algebra").prompt(subject.dev[:5], subject.test[3]) == expected
    assert expected.endswith("\nAnswer:") and expected.count("\nAnswer: ") == 5


def test_ceval_golden_prompt_keeps_crlf_inside_cells(bench):
    dev = raw_rows(bench / "ceval" / "dev" / "high_school_biology_dev.csv", header=True)
    val = raw_rows(bench / "ceval" / "val" / "high_school_biology_val.csv", header=True)
    block = "\n{}\nA. {}\nB. {}\nC. {}\nD. {}\n答案："
    expected = ("以下是中国关于高中生物考试的单项选择题，请选出其中的正确答案。\n"
                + "".join(block.format(*r[1:6]) + r[6] for r in dev[:5]) + block.format(*val[0][1:6]))
    (subject,) = load_ceval(bench / "ceval", "val", ["high_school_biology"])
    prompt = PromptStyle("zh", cats.CEVAL_PROMPT_NAMES["high_school_biology"]).prompt(subject.dev[:5],
                                                                                       subject.test[0])
    assert prompt == expected
    assert "\r\n" in prompt  # a dev question has CRLF line breaks inside its cell: kept as is
    assert subject.test[0].id == val[0][0] and subject.test[0].answer == val[0][6]


def test_ceval_prompt_uses_the_reference_subject_name(bench):
    (subject,) = load_ceval(bench / "ceval", "val", ["mao_zedong_thought"])
    prompt = PromptStyle("zh", cats.CEVAL_PROMPT_NAMES["mao_zedong_thought"]).prompt([], subject.test[0])
    assert prompt.startswith("以下是中国关于毛泽东思想和中国特色社会主义理论概论考试的单项选择题，请选出其中的正确答案。\n\n")
    assert prompt.endswith("\n答案：")


def test_cmmlu_golden_prompt(bench):
    dev = raw_rows(bench / "cmmlu" / "dev" / "agronomy.csv", header=True)
    test = raw_rows(bench / "cmmlu" / "test" / "agronomy.csv", header=True)
    block = "\n{}\nA. {}\nB. {}\nC. {}\nD. {}\n答案："
    expected = ("以下是中国关于农学考试的单项选择题，请选出其中的正确答案。\n"
                + "".join(block.format(*r[1:6]) + r[6] for r in dev[:2]) + block.format(*test[3][1:6]))
    (subject,) = load_cmmlu(bench / "cmmlu", subjects=["agronomy"])
    assert PromptStyle("zh", cats.CMMLU_NAMES["agronomy"]).prompt(subject.dev[:2], subject.test[3]) == expected
    assert subject.test[3].id == test[3][0]


def test_gaokao_golden_prompt(bench):
    raw = json.loads((bench / "gaokao-bench" / "Objective_Questions" / "2010-2022_Biology_MCQs.json")
                     .read_text(encoding="utf-8"))["example"]
    single = [e for e in raw if len(e["answer"]) == 1 and len(e["answer"][0]) == 1]
    expected = ("以下是中国关于高考生物考试的单项选择题，请选出其中的正确答案。\n"
                + "".join(f"\n{e['question'].strip()}\n答案：{e['answer'][0]}" for e in single[:3])
                + f"\n{single[5]['question'].strip()}\n答案：")
    (subject,) = load_gaokao(bench / "gaokao-bench", subjects=["2010-2022_Biology_MCQs"])
    assert PromptStyle("zh", "高考生物").prompt(subject.dev[:3], subject.test[0]) == expected


def test_agieval_golden_prompts(bench):
    lines = (bench / "agieval" / "v1" / "logiqa-en.jsonl").read_text(encoding="utf-8").splitlines()
    recs = [r for r in map(json.loads, lines) if len(r["options"]) == 4 and isinstance(r["label"], str)]

    def block(r):
        opts = "".join(f"\n{'ABCD'[j]}. {o[3:].strip()}" for j, o in enumerate(r["options"]))
        passage = f"{r['passage'].strip()}\n" if r["passage"] else ""
        return f"{passage}{r['question'].strip()}{opts}\nAnswer:"

    expected = ("The following are multiple choice questions (with answers) about  logical reasoning.\n\n"
                + "".join(block(r) + f" {r['label']}\n\n" for r in recs[:2]) + block(recs[6]))
    (subject,) = load_agieval(bench / "agieval", subjects=["logiqa-en"])
    assert PromptStyle("en", cats.AGIEVAL_EN_SUBJECTS["logiqa-en"]).prompt(subject.dev[:2], subject.test[1]) \
        == expected
    (zh,) = load_agieval(bench / "agieval", subjects=["gaokao-biology"])
    prompt = PromptStyle("zh", cats.AGIEVAL_ZH_SUBJECTS["gaokao-biology"]).prompt([], zh.test[0])
    assert prompt.startswith("以下是中国关于高考生物考试的单项选择题，请选出其中的正确答案。\n\n")
    assert "\nA. " in prompt and "\nD. " in prompt and "(A)" not in prompt and prompt.endswith("\n答案：")


# ---------------------------------------------------------------------------------------------------
# Shots dropped for an over-long prompt
# ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer(any_tokenizer):
    from models.tokenization_baichuan import BaiChuanTokenizer
    return BaiChuanTokenizer(vocab_file=str(any_tokenizer), add_bos_token=False)


def test_shots_dropped_one_at_a_time_until_the_prompt_fits(tokenizer, bench):
    (subject,) = load_mmlu(bench / "mmlu", subjects=["high_school_european_history"])
    style, q = PromptStyle("en", subject.name), subject.test[0]
    lengths = [len(tokenizer(style.prompt(subject.dev[:k], q), add_special_tokens=False).input_ids)
               for k in range(6)]
    assert lengths == sorted(lengths)
    if bench == FIXTURES / "benchmarks":  # short questions: a limit between the 2- and 3-shot lengths
        limit = (lengths[2] + lengths[3]) // 2
        fitted = fit_prompt(style, subject.dev[:5], q, tokenizer, limit)
    else:  # long passages: 5 shots do not fit the default limit, 2048
        limit = 2048
        assert lengths[5] > limit
        fitted = fit_prompt(style, subject.dev[:5], q, tokenizer)
    expected_k = max(k for k in range(6) if lengths[k] <= limit)
    assert fitted.shots == expected_k < 5 and len(fitted.ids) == lengths[expected_k]
    assert fitted.prompt == style.prompt(subject.dev[:expected_k], q)
    # A limit exactly at the 3-shot length keeps 3 shots; one token less drops to 2.
    assert fit_prompt(style, subject.dev[:5], q, tokenizer, lengths[3]).shots == 3
    assert fit_prompt(style, subject.dev[:5], q, tokenizer, lengths[3] - 1).shots == 2
    # Even 0 shots is too long: refused, naming the subject and the row, never fed past the limit.
    with pytest.raises(PromptTooLong, match=r"subject 'high_school_european_history', .*high_school_european_"
                       r"history_test\.csv, row 1: the question alone is \d+ tokens, longer than the limit of 10"):
        fit_prompt(style, subject.dev[:5], q, tokenizer, 10, subject.name)


def test_prompts_are_encoded_without_bos(tokenizer, bench):
    (subject,) = load_mmlu(bench / "mmlu", subjects=["anatomy"], max_questions=1)
    fitted = fit_prompt(PromptStyle("en", "anatomy"), subject.dev, subject.test[0], tokenizer)
    assert fitted.ids[0] != tokenizer.bos_token_id
    assert fitted.ids == tokenizer.sp_model.encode(fitted.prompt)


# ---------------------------------------------------------------------------------------------------
# Bad input: a clear message naming the file and row
# ---------------------------------------------------------------------------------------------------

def write_csv(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)
    return path


GOOD = ["What is 1+1?", "1", "2", "3", "4", "B"]


def mmlu_tree(tmp_path, test_rows):
    write_csv(tmp_path / "dev" / "anatomy_dev.csv", [GOOD] * 5)
    return write_csv(tmp_path / "test" / "anatomy_test.csv", test_rows)


def test_missing_data_folder_is_named(tmp_path):
    with pytest.raises(DataError, match=f"MMLU data folder not found: {tmp_path / 'nope'}"):
        load_mmlu(tmp_path / "nope")
    with pytest.raises(DataError, match="C-Eval data folder not found.*CEVAL_DATA_PATH"):
        load_ceval(tmp_path / "nope")
    with pytest.raises(DataError, match="MMLU test data folder not found"):
        load_mmlu(tmp_path)


def test_missing_subject_file_is_named(tmp_path):
    write_csv(tmp_path / "test" / "anatomy_test.csv", [GOOD])
    with pytest.raises(DataError, match=r"missing file for subject 'anatomy': .*dev/anatomy_dev\.csv"):
        load_mmlu(tmp_path)
    (tmp_path / "ceval" / "val").mkdir(parents=True)
    with pytest.raises(DataError, match=r"missing file for subject 'law': .*law_dev\.csv"):
        load_ceval(tmp_path / "ceval", "val", ["law"])


@pytest.mark.parametrize("bad_row, message", [
    (GOOD[:5], r"row 2: expected 6 fields \(question, A, B, C, D, answer\), got 5"),
    (GOOD[:5] + [""], r"row 2: no answer"),
    (GOOD[:5] + ["E"], r"row 2: answer 'E' is not one of A, B, C, D"),
    (GOOD[:2] + ["", "3", "4", "B"], r"row 2: option B is empty"),
])
def test_bad_mmlu_rows_are_named(tmp_path, bad_row, message):
    path = mmlu_tree(tmp_path, [GOOD, bad_row, GOOD])
    with pytest.raises(DataError, match=f"{path}, {message}"):
        load_mmlu(tmp_path)


def test_empty_split_is_named(tmp_path):
    path = mmlu_tree(tmp_path, [])
    with pytest.raises(DataError, match=f"{path}: no questions"):
        load_mmlu(tmp_path)
    (tmp_path / "val").mkdir()
    with pytest.raises(DataError, match="no \\*_val.csv files"):
        load_mmlu(tmp_path, "val")


def test_bad_ceval_rows_are_named(tmp_path):
    header = ["id", "question", "A", "B", "C", "D", "answer"]
    write_csv(tmp_path / "dev" / "law_dev.csv", [header + ["explanation"]] + [["0"] + GOOD + ["why"]] * 5)
    val = write_csv(tmp_path / "val" / "law_val.csv", [header, ["0"] + GOOD, ["1"] + GOOD[:5] + ["F"]])
    with pytest.raises(DataError, match=f"{val}, row 2: answer 'F' is not one of A, B, C, D"):
        load_ceval(tmp_path, "val", ["law"])
    write_csv(val, [header, ["0"] + GOOD[:4] + ["B"]])  # one option short
    with pytest.raises(DataError, match=f"{val}, row 1: expected 7 fields"):
        load_ceval(tmp_path, "val", ["law"])
    write_csv(val, [header[:-2] + ["answer"], ["0"] + GOOD[:3] + ["B"]])  # no column D
    with pytest.raises(DataError, match=f"{val}: header .* lacks column\\(s\\) \\['D'\\]"):
        load_ceval(tmp_path, "val", ["law"])
    write_csv(val, [header])
    with pytest.raises(DataError, match=f"{val}: no questions"):
        load_ceval(tmp_path, "val", ["law"])
    with pytest.raises(DataError, match="C-Eval has no split 'train'"):
        load_ceval(tmp_path, "train", ["law"])


def test_unknown_subject_and_bad_json_are_named(tmp_path):
    with pytest.raises(DataError, match=r"unknown C-Eval subject\(s\) \['lawn'\]"):
        load_ceval(FIXTURES / "benchmarks" / "ceval", "val", ["lawn"])
    path = tmp_path / "v1" / "logiqa-en.jsonl"
    path.parent.mkdir()
    path.write_text('{"question": "q", "options": ["(A)a", "(B)b", "(C)c", "(D)d"], "label": "A"}\n{oops\n',
                    encoding="utf-8")
    with pytest.raises(DataError, match=f"{path}, line 2: not JSON"):
        load_agieval(tmp_path, subjects=["logiqa-en"])


def test_read_mmlu_csv_keeps_cells_verbatim(tmp_path):
    path = write_csv(tmp_path / "x.csv", [["Q with, comma\nand a line break", "None", "0.50", " x ", "007", "A"]])
    (q,) = read_mmlu_csv(path)
    assert q.question == "Q with, comma\nand a line break" and q.options == ["None", "0.50", " x ", "007"]
