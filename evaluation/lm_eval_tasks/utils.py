"""lm-evaluation-harness functions for the task YAMLs beside this file: this project's readers and prompts.

The documents come from ``evaluation/data.py``'s readers over the local files in their official layouts (the
same checks and error messages as our scripts), and each question is rendered by ``evaluation/prompts.py``, so
lm-eval shows the model the reference's prompts token for token. Data folders: ``MMLU_DATA_PATH``,
``CEVAL_DATA_PATH``, ``CMMLU_DATA_PATH``, ``GAOKAO_DATA_PATH``, ``AGIEVAL_DATA_PATH``, else the benchmark's
folder under ``$BAICHUAN_SHARED_DATA`` (default ``../shared/data``).
"""
import os

from common import shared_data_dir
from evaluation.data import LETTERS, LOADERS, Question

DATA_ENV = {"mmlu": "MMLU_DATA_PATH", "ceval": "CEVAL_DATA_PATH", "cmmlu": "CMMLU_DATA_PATH",
            "gaokao": "GAOKAO_DATA_PATH", "agieval": "AGIEVAL_DATA_PATH"}
SHARED_NAME = {"mmlu": "mmlu", "ceval": "ceval", "cmmlu": "cmmlu", "gaokao": "gaokao-bench", "agieval": "agieval"}
SPLIT = {"mmlu": "test", "ceval": "val", "cmmlu": "test", "gaokao": "test", "agieval": "test"}


def data_dir(benchmark: str) -> str:
    return os.environ.get(DATA_ENV[benchmark]) or str(shared_data_dir() / SHARED_NAME[benchmark])


def style_for(benchmark: str, subject: str):
    from evaluation.evaluate_zh import prompt_style
    from evaluation.prompts import PromptStyle

    return PromptStyle("en", subject) if benchmark == "mmlu" else prompt_style(benchmark, subject)


def load(benchmark: str, subject: str, split: str = None, **_metadata):
    """``custom_dataset``: {"dev": few-shot pool in file order, "test": the questions scored}."""
    from datasets import Dataset, DatasetDict

    (s,) = LOADERS[benchmark](data_dir(benchmark), split or SPLIT[benchmark], [subject])
    style = style_for(benchmark, subject)
    # lm-eval joins the description and the first shot directly; the Chinese prompt has an empty line there.
    description = style.header() + ("\n" if style.language == "zh" else "")

    def rows(questions):
        return Dataset.from_list([{"id": q.id, "question": q.question, "options": q.options or [],
                                   "answer": q.answer, "where": q.where, "language": style.language,
                                   "name": style.name, "description": description} for q in questions])

    return DatasetDict({"dev": rows(s.dev), "test": rows(s.test)})


def doc_to_text(doc) -> str:
    """The question block without its answer, exactly as ``evaluation/prompts.py`` writes it."""
    from evaluation.prompts import PromptStyle

    q = Question(doc["id"], doc["question"], doc["options"] or None, doc["answer"], doc["where"])
    return PromptStyle(doc["language"], doc["name"]).example(q, with_answer=False)


def doc_to_target(doc) -> int:
    return LETTERS.index(doc["answer"])
