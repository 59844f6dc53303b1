"""Readers for the five benchmarks in their official local layouts, with checks that name the file and row.

Every reader returns a list of ``Subject``: the few-shot pool (``dev``) and the questions to score
(``test``), each a ``Question`` with four options (or ``None`` when the options are part of the question
text) and the gold letter (``None`` where labels are not public).

* MMLU (hendrycks ``data/``): ``dev/<subject>_dev.csv`` and ``<split>/<subject>_<split>.csv``, no header,
  columns question, A, B, C, D, answer. Cells are used verbatim. The reference read them with pandas, which
  turns the 12 cells that read ``None`` into ``nan``; here they stay ``None``.
* C-Eval (``ceval-exam``): ``dev/``, ``val/``, ``test/`` CSVs with a header ``id,question,A,B,C,D[,answer
  [,explanation]]``. Lines end in CRLF and some cells contain line breaks, hence ``newline=''``.
  ``test`` has no answers.
* CMMLU: ``dev/<subject>.csv`` and ``test/<subject>.csv``, header ``,Question,A,B,C,D,Answer`` (the first,
  unnamed column is the row index, used as the id).
* GAOKAO-Bench: ``Objective_Questions/<file>.json``, ``{"example": [{question, answer, index, ...}]}``, the
  options written inside the question text. Kept: the nine ``*_MCQs`` files listed in
  ``categories.GAOKAO_SUBJECTS`` and, in them, the items whose answer is one letter A-D. Left out: the files
  whose items hold several sub-questions (modern literature, reading, cloze, fill-in-the-blanks, geography
  groups), and inside the kept files the multiple-answer items (e.g. physics ``["AD"]``), since one
  next-token choice cannot answer them. The baichuan-7B README says it kept the single-choice questions and
  split them at random without publishing the split; here the first 5 kept items of a file are the
  few-shot pool and the rest are scored, so the split is reproducible.
* AGIEval v1: ``v1/<task>.jsonl`` with ``passage, question, options, label``. Kept: the tasks whose questions
  have four options (``categories.AGIEVAL_ZH_SUBJECTS`` and ``AGIEVAL_EN_SUBJECTS``) and, in them, the
  records with exactly four options and one answer letter. Left out: five-option tasks (aqua-rat, lsat-*),
  the tasks without options (math, gaokao-mathcloze), and multiple-answer records (many of jec-qa-*, a few of
  gaokao-physics and gaokao-mathqa) and the 2 gaokao-chemistry records whose option D is empty in the
  source. Option labels ("(A)", "A．", ...) are stripped, as the prompt adds its own. The passage, when there
  is one, goes before the question on its own line. The few-shot pool is the first 5 kept records, as for
  GAOKAO-Bench.

How many items each reader left out of a file, and why, is in ``Subject.skipped`` and printed by
``evaluate_zh.py``: nothing is dropped silently.
"""
import csv
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from evaluation import categories as cats

LETTERS = ("A", "B", "C", "D")
# GAOKAO-Bench and AGIEval have no dev split: this many kept items per file form the few-shot pool.
HELD_OUT_SHOTS = 5


class DataError(ValueError):
    """Bad or missing benchmark data; the message names the file (and row)."""


@dataclass
class Question:
    id: str
    question: str
    options: Optional[List[str]]  # four option texts, or None when they are part of ``question``
    answer: Optional[str]  # gold letter A-D; None where labels are not public (C-Eval test)
    where: str  # "file, row n", for messages


@dataclass
class Subject:
    name: str
    dev: List[Question]  # few-shot pool, in file order
    test: List[Question]  # questions to score, in file order
    skipped: Dict[str, int] = field(default_factory=dict)  # reason -> number of items left out
    dev_file: str = ""  # where the few-shot pool came from, for messages


# ---------------------------------------------------------------------------------------------------
# CSV helpers
# ---------------------------------------------------------------------------------------------------

def _require_dir(path: Path, what: str, hint: str = "") -> Path:
    if not path.is_dir():
        raise DataError(f"{what} data folder not found: {path}{hint}")
    return path


def _require_file(path: Path, subject: str) -> Path:
    if not path.is_file():
        raise DataError(f"missing file for subject '{subject}': {path}")
    return path


def _csv_rows(path: Path):
    """Yield (row number from 1, fields); newline='' keeps line breaks inside quoted cells intact."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            for n, row in enumerate(csv.reader(f), start=1):
                yield n, row
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from e


def _make_question(where: str, qid: str, question: str, options: Optional[Sequence[str]],
                   answer: Optional[str], need_answer: bool) -> Question:
    for letter, text in zip(LETTERS, options or ()):
        if text.strip() == "":
            raise DataError(f"{where}: option {letter} is empty")
    if question.strip() == "":
        raise DataError(f"{where}: the question is empty")
    if need_answer:
        gold = (answer or "").strip().upper()
        if gold == "":
            raise DataError(f"{where}: no answer")
        if gold not in LETTERS:
            raise DataError(f"{where}: answer {answer!r} is not one of A, B, C, D")
    else:
        gold = None
    return Question(id=qid, question=question, options=None if options is None else list(options),
                    answer=gold, where=where)


def _read_headed_csv(path: Path, columns: Sequence[str], need_answer: bool) -> List[Question]:
    """A CSV with a header row; ``columns`` are the header names of id, question, A, B, C, D[, answer]."""
    rows = _csv_rows(path)
    try:
        _, header = next(rows)
    except StopIteration:
        raise DataError(f"{path}: empty file (no header row, no questions)") from None
    missing = [c for c in columns if c not in header]
    if missing:
        raise DataError(f"{path}: header {header} lacks column(s) {missing}")
    pos = [header.index(c) for c in columns]
    out = []
    for n, row in rows:
        where = f"{path}, row {n - 1}"  # data rows counted from 1 after the header
        if len(row) != len(header):
            raise DataError(f"{where}: expected {len(header)} fields ({', '.join(header)}), got {len(row)}"
                            " (a row needs a question, four options and an answer)")
        qid, question, *options = (row[p] for p in pos[:6])
        answer = row[pos[6]] if len(pos) > 6 else None
        out.append(_make_question(where, qid, question, options, answer, need_answer))
    if not out:
        raise DataError(f"{path}: no questions (the split is empty)")
    return out


def _limit(questions: List[Question], max_questions: Optional[int]) -> List[Question]:
    return questions if not max_questions else questions[:max_questions]


def _pick(available: Sequence[str], wanted: Optional[Sequence[str]], what: str) -> List[str]:
    if not wanted:
        return list(available)
    unknown = [s for s in wanted if s not in available]
    if unknown:
        raise DataError(f"unknown {what} subject(s) {unknown}; known: {', '.join(sorted(available))}")
    return list(wanted)


# ---------------------------------------------------------------------------------------------------
# MMLU
# ---------------------------------------------------------------------------------------------------

def read_mmlu_csv(path: Path) -> List[Question]:
    """One MMLU CSV (no header): question, A, B, C, D, answer; ids are the 0-based row numbers."""
    out = []
    for n, row in _csv_rows(path):
        where = f"{path}, row {n}"
        if len(row) != 6:
            raise DataError(f"{where}: expected 6 fields (question, A, B, C, D, answer), got {len(row)}")
        out.append(_make_question(where, str(n - 1), row[0], row[1:5], row[5], need_answer=True))
    if not out:
        raise DataError(f"{path}: no questions (the split is empty)")
    return out


def load_mmlu(data_dir, split: str = "test", subjects: Optional[Sequence[str]] = None,
              max_questions: Optional[int] = None) -> List[Subject]:
    """Subjects are the ``<split>/*_<split>.csv`` files, sorted, as the reference lists them."""
    root = _require_dir(Path(data_dir), "MMLU", " (pass -d/--data_dir, the folder holding dev/ val/ test/)")
    split_dir = _require_dir(root / split, f"MMLU {split}")
    suffix = f"_{split}.csv"
    found = sorted(f[: -len(suffix)] for f in os.listdir(split_dir) if f.endswith(suffix))
    if not found:
        raise DataError(f"{split_dir}: no *{suffix} files (the split is empty)")
    for name in found:
        if name not in cats.MMLU_SUBCATEGORIES:
            raise DataError(f"{split_dir / (name + suffix)}: subject '{name}' is not one of the 57 MMLU subjects "
                            "in evaluation/categories.py")
    out = []
    for name in _pick(found, subjects, "MMLU"):
        dev = read_mmlu_csv(_require_file(root / "dev" / f"{name}_dev.csv", name))
        test = read_mmlu_csv(_require_file(split_dir / f"{name}{suffix}", name))
        out.append(Subject(name, dev, _limit(test, max_questions), 
                           dev_file=str(root / "dev" / f"{name}_dev.csv")))
    return out


# ---------------------------------------------------------------------------------------------------
# C-Eval and CMMLU
# ---------------------------------------------------------------------------------------------------

CEVAL_SPLITS = ("val", "test", "dev")


def load_ceval(data_dir, split: str = "val", subjects: Optional[Sequence[str]] = None,
               max_questions: Optional[int] = None) -> List[Subject]:
    """The 52 subjects of ``categories.CEVAL_SUBJECTS``; ``test`` has no answers (leaderboard split)."""
    if split not in CEVAL_SPLITS:
        raise DataError(f"C-Eval has no split '{split}'; choose one of {', '.join(CEVAL_SPLITS)}")
    root = _require_dir(Path(data_dir), "C-Eval", " (pass --data_dir or set CEVAL_DATA_PATH)")
    _require_dir(root / split, f"C-Eval {split}")
    cols = ["id", "question", "A", "B", "C", "D"]
    out = []
    for name in _pick(list(cats.CEVAL_SUBJECTS), subjects, "C-Eval"):
        dev = _read_headed_csv(_require_file(root / "dev" / f"{name}_dev.csv", name), cols + ["answer"], True)
        need_answer = split != "test"
        test = _read_headed_csv(_require_file(root / split / f"{name}_{split}.csv", name),
                                cols + (["answer"] if need_answer else []), need_answer)
        out.append(Subject(name, dev, _limit(test, max_questions), 
                           dev_file=str(root / "dev" / f"{name}_dev.csv")))
    return out


def load_cmmlu(data_dir, split: str = "test", subjects: Optional[Sequence[str]] = None,
               max_questions: Optional[int] = None) -> List[Subject]:
    """The 67 subjects of ``categories.CMMLU_NAMES``; CMMLU has only dev (few-shot) and test."""
    if split != "test":
        raise DataError(f"CMMLU has no split '{split}'; it has dev (few-shot examples) and test")
    root = _require_dir(Path(data_dir), "CMMLU", " (pass --data_dir or set CMMLU_DATA_PATH)")
    cols = ["", "Question", "A", "B", "C", "D", "Answer"]
    out = []
    for name in _pick(list(cats.CMMLU_NAMES), subjects, "CMMLU"):
        dev = _read_headed_csv(_require_file(root / "dev" / f"{name}.csv", name), cols, True)
        test = _read_headed_csv(_require_file(root / "test" / f"{name}.csv", name), cols, True)
        out.append(Subject(name, dev, _limit(test, max_questions), 
                           dev_file=str(root / "dev" / f"{name}.csv")))
    return out


# ---------------------------------------------------------------------------------------------------
# GAOKAO-Bench and AGIEval (JSON; the first HELD_OUT_SHOTS kept items are the few-shot pool)
# ---------------------------------------------------------------------------------------------------

def _split_held_out(name: str, path: Path, kept: List[Question], skipped: Dict[str, int],
                    max_questions: Optional[int]) -> Subject:
    if len(kept) <= HELD_OUT_SHOTS:
        raise DataError(f"{path}: only {len(kept)} single-answer four-option questions, need more than "
                        f"{HELD_OUT_SHOTS} (the first {HELD_OUT_SHOTS} are the few-shot examples)")
    return Subject(name, kept[:HELD_OUT_SHOTS], _limit(kept[HELD_OUT_SHOTS:], max_questions), skipped,
                   dev_file=f"{path} (first {HELD_OUT_SHOTS} kept items)")


def _single_letter(answer, where: str) -> Optional[str]:
    """The answer letter of a single-answer item, or None for a multiple-answer/over-four-option item."""
    if isinstance(answer, list):
        if len(answer) != 1:
            return None
        answer = answer[0]
    if not isinstance(answer, str) or not answer.strip():
        raise DataError(f"{where}: no answer (got {answer!r})")
    letter = answer.strip().upper()
    if len(letter) != 1:
        return None  # "AD": several letters in one string
    if not letter.isalpha():
        raise DataError(f"{where}: answer {answer!r} is not a letter")
    return letter if letter in LETTERS else None


def load_gaokao(data_dir, split: str = "test", subjects: Optional[Sequence[str]] = None,
                max_questions: Optional[int] = None) -> List[Subject]:
    if split != "test":
        raise DataError(f"GAOKAO-Bench has no split '{split}'; use test (the first {HELD_OUT_SHOTS} "
                        "questions of each file are the few-shot examples)")
    root = _require_dir(Path(data_dir), "GAOKAO-Bench", " (pass --data_dir or set GAOKAO_DATA_PATH)")
    qdir = _require_dir(root / "Objective_Questions", "GAOKAO-Bench Objective_Questions")
    out = []
    for name in _pick(list(cats.GAOKAO_SUBJECTS), subjects, "GAOKAO-Bench"):
        path = _require_file(qdir / f"{name}.json", name)
        try:
            with open(path, encoding="utf-8") as f:
                examples = json.load(f)["example"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise DataError(f"{path}: not a GAOKAO-Bench file ({{\"example\": [...]}}): {e}") from e
        kept, skipped = [], {}
        for i, ex in enumerate(examples):
            where = f"{path}, example {i}"
            missing = [k for k in ("question", "answer", "index") if k not in ex]
            if missing:
                raise DataError(f"{where}: missing key(s) {missing}")
            letter = _single_letter(ex["answer"], where)
            if letter is None:
                skipped["multiple answers or more than four options"] = \
                    skipped.get("multiple answers or more than four options", 0) + 1
                continue
            # The options are written inside the question text.
            kept.append(_make_question(where, str(ex["index"]), ex["question"].strip(), None, letter, True))
        out.append(_split_held_out(name, path, kept, skipped, max_questions))
    return out


# "(A)text", "A．text", "A. text", "(B) text", "C。text", and "A 第一" (a space, then non-ASCII text); the
# letter is not checked against the position, as a few source records list options out of order.
_OPTION_LABEL = re.compile(r"^\s*(?:\(\s*[A-E]\s*\)|[A-E]\s*[.．、:：。]|[A-E]\s+(?=[^\x00-\x7f]))\s*")


def _strip_option_label(option: str) -> str:
    return _OPTION_LABEL.sub("", option, count=1).strip()


def load_agieval(data_dir, split: str = "test", subjects: Optional[Sequence[str]] = None,
                 max_questions: Optional[int] = None) -> List[Subject]:
    if split != "test":
        raise DataError(f"AGIEval has no split '{split}'; use test (the first {HELD_OUT_SHOTS} questions "
                        "of each task are the few-shot examples)")
    root = _require_dir(Path(data_dir), "AGIEval", " (pass --data_dir or set AGIEVAL_DATA_PATH)")
    vdir = _require_dir(root / "v1", "AGIEval v1")
    known = list(cats.AGIEVAL_ZH_SUBJECTS) + list(cats.AGIEVAL_EN_SUBJECTS)
    out = []
    for name in _pick(known, subjects, "AGIEval"):
        path = _require_file(vdir / f"{name}.jsonl", name)
        kept, skipped = [], {}

        def skip(reason):
            skipped[reason] = skipped.get(reason, 0) + 1

        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{path}, line {n}"
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{where}: not JSON ({e})") from e
                if "question" not in rec or "label" not in rec:
                    raise DataError(f"{where}: missing key 'question' or 'label'")
                options = rec.get("options") or []
                if len(options) != 4:
                    skip("not four options")
                    continue
                if isinstance(rec["label"], list) and len(rec["label"]) != 1:
                    skip("multiple answers" if rec["label"] else "no answer")
                    continue
                letter = _single_letter(rec["label"], where)
                if letter is None:
                    skip("multiple answers")
                    continue
                if not all(isinstance(opt, str) for opt in options):
                    raise DataError(f"{where}: options must be strings, got {options!r}")
                texts = [_strip_option_label(opt) for opt in options]
                if not all(texts):
                    skip("an option is empty (lost in the source, e.g. an image)")
                    continue
                passage = (rec.get("passage") or "").strip()
                question = rec["question"].strip()
                text = f"{passage}\n{question}" if passage else question
                kept.append(_make_question(where, str(n - 1), text, texts, letter, True))
        out.append(_split_held_out(name, path, kept, skipped, max_questions))
    return out


LOADERS = {"ceval": load_ceval, "cmmlu": load_cmmlu, "gaokao": load_gaokao, "agieval": load_agieval,
           "mmlu": load_mmlu}
