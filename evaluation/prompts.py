"""The two few-shot prompt formats of the reference scripts, and fitting a prompt into the length budget.

English, hendrycks/test ``evaluate.py`` as baichuan-7B's ``evaluate_mmlu.py`` uses it::

    The following are multiple choice questions (with answers) about  abstract algebra.\\n\\n
    <question>\\nA. <a>\\nB. <b>\\nC. <c>\\nD. <d>\\nAnswer: <X>\\n\\n      (one block per shot)
    <question>\\nA. <a>\\nB. <b>\\nC. <c>\\nD. <d>\\nAnswer:

Note the two spaces after "about": the reference formats ``"about {}."`` with ``format_subject``, which
puts a space before every word. That is the prompt the published MMLU numbers were measured with, so it
is kept byte for byte.

Chinese, baichuan-7B's ``evaluate_zh.py``::

    以下是中国关于<科目>考试的单项选择题，请选出其中的正确答案。\\n
    \\n<question>\\nA. <a>\\nB. <b>\\nC. <c>\\nD. <d>\\n答案：<X>             (one block per shot)
    \\n<question>\\nA. <a>\\nB. <b>\\nC. <c>\\nD. <d>\\n答案：

GAOKAO-Bench questions carry their options in the question text, so their blocks are
``<question>\\n答案：<X>``.
"""
from dataclasses import dataclass
from typing import List, Sequence

from evaluation.data import LETTERS, Question

MMLU_HEADER = "The following are multiple choice questions (with answers) about {}.\n\n"
ZH_HEADER = "以下是中国关于{}考试的单项选择题，请选出其中的正确答案。\n"
DEFAULT_MAX_LENGTH = 2048  # the reference drops shots while the prompt is longer than this many tokens


def format_subject(subject: str) -> str:
    """``abstract_algebra`` -> `` abstract algebra`` (every word preceded by a space), as the reference."""
    return "".join(" " + word for word in subject.split("_"))


@dataclass(frozen=True)
class PromptStyle:
    language: str  # "en" (hendrycks MMLU format) or "zh" (C-Eval format of the reference)
    name: str  # subject with underscores (en) or the exam name in Chinese (zh)

    def header(self) -> str:
        if self.language == "en":
            return MMLU_HEADER.format(format_subject(self.name))
        return ZH_HEADER.format(self.name)

    def example(self, q: Question, with_answer: bool) -> str:
        if self.language == "en":
            text = q.question + "".join(f"\n{letter}. {opt}" for letter, opt in zip(LETTERS, q.options))
            return text + "\nAnswer:" + (f" {q.answer}\n\n" if with_answer else "")
        options = "" if q.options is None else "\n" + "\n".join(
            f"{letter}. {opt}" for letter, opt in zip(LETTERS, q.options))
        return f"{q.question}{options}\n答案：{q.answer if with_answer else ''}"

    def prompt(self, shots: Sequence[Question], q: Question) -> str:
        if self.language == "en":
            return self.header() + "".join(self.example(s, True) for s in shots) + self.example(q, False)
        return (self.header() + "".join("\n" + self.example(s, True) for s in shots)
                + "\n" + self.example(q, False))


@dataclass
class Request:
    prompt: str
    ids: List[int]
    shots: int  # how many shots survived the length limit


def encode(tokenizer, text: str) -> List[int]:
    """Token ids without BOS/EOS, as the reference (tokenizer loaded with ``add_bos_token=False``)."""
    return tokenizer(text, add_special_tokens=False).input_ids


class PromptTooLong(ValueError):
    """A question that does not fit the model's context even without shots; names the subject and the row."""


def fit_prompt(style: PromptStyle, shots: Sequence[Question], q: Question, tokenizer,
               max_length: int = DEFAULT_MAX_LENGTH, subject: str = "") -> Request:
    """The prompt with the first k shots, k lowered one at a time while it is longer than ``max_length``.

    Lowering k drops the shot nearest the question first, as the reference's MMLU script does. The
    reference went on past k = 0 (its ``gen_prompt`` then silently used every shot again) and handed the
    model whatever was left; here a question that does not fit on its own is refused, since the positions
    past the model's context would give numbers that mean nothing.
    """
    k = len(shots)
    while True:
        prompt = style.prompt(shots[:k], q)
        ids = encode(tokenizer, prompt)
        if len(ids) <= max_length:
            return Request(prompt, ids, k)
        if k == 0:
            raise PromptTooLong(f"subject '{subject or style.name}', {q.where}: the question alone is {len(ids)} "
                                f"tokens, longer than the limit of {max_length} (the model's context or "
                                "--max_length); it cannot be scored")
        k -= 1
