"""Write the lm-eval task YAMLs of this folder: one per subject and one group per benchmark.

    python -m evaluation.lm_eval_tasks.make_tasks      # after a change to the subject lists or the templates

How each benchmark's prompt maps onto lm-eval's few-shot assembly (description + shots + question):

* MMLU: description = the header with its blank line; a shot is ``<question block>Answer:`` + " " + letter,
  shots joined by "\\n\\n".
* Chinese: description = the header + "\\n"; a shot is ``<question block>答案：`` + letter (no space), shots
  joined by "\\n"; the scored continuation is " A" (a space, as for MMLU): the reference's candidate ids are
  ``tokenizer("A").input_ids[-1]``, the id of "▁A", and "答案： A" encodes to "答案", "：", "▁A".
"""
import json
from pathlib import Path

from evaluation import categories as cats

HERE = Path(__file__).resolve().parent
SUBJECTS = {
    "mmlu": sorted(cats.MMLU_SUBCATEGORIES),
    "ceval": list(cats.CEVAL_SUBJECTS),
    "cmmlu": list(cats.CMMLU_NAMES),
    "gaokao": list(cats.GAOKAO_SUBJECTS),
    "agieval": list(cats.AGIEVAL_ZH_SUBJECTS) + list(cats.AGIEVAL_EN_SUBJECTS),
}
# The reference's averages: question-weighted for MMLU, over subjects for the Chinese benchmarks.
WEIGHT_BY_SIZE = {"mmlu": True, "ceval": False, "cmmlu": False, "gaokao": False, "agieval": False}


def template(benchmark: str) -> dict:
    zh = benchmark != "mmlu"
    return {
        "custom_dataset": "!function utils.load",
        "test_split": "test",
        "fewshot_split": "dev",
        "fewshot_config": {"sampler": "first_n", **({"target_delimiter": ""} if zh else {})},
        "num_fewshot": 5,
        "output_type": "multiple_choice",
        "description": "description",  # a field of every document: the subject's header
        "doc_to_text": "!function utils.doc_to_text",
        "doc_to_choice": list("ABCD"),
        "doc_to_target": "!function utils.doc_to_target",
        "target_delimiter": " ",
        "fewshot_delimiter": "\n" if zh else "\n\n",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }


def dump(data: dict) -> str:
    """YAML from JSON values (YAML is a superset of JSON), with lm-eval's ``!function`` tags unquoted."""
    lines = []
    for key, value in data.items():
        text = json.dumps(value, ensure_ascii=False)
        if isinstance(value, str) and value.startswith("!function "):
            text = value
        lines.append(f"{key}: {text}")
    return "\n".join(lines) + "\n"


def files() -> dict:
    out = {}
    for benchmark, subjects in SUBJECTS.items():
        out[f"_{benchmark}_template_yaml"] = dump(template(benchmark))
        tasks = []
        for subject in subjects:
            task = f"baichuan_{benchmark}_{subject}"
            tasks.append(task)
            out[f"{benchmark}/{task}.yaml"] = dump({
                "include": f"../_{benchmark}_template_yaml", "task": task,
                "dataset_kwargs": {"benchmark": benchmark, "subject": subject}})
        out[f"{benchmark}/_baichuan_{benchmark}.yaml"] = dump({
            "group": f"baichuan_{benchmark}", "task": tasks,
            "aggregate_metric_list": [{"metric": "acc", "weight_by_size": WEIGHT_BY_SIZE[benchmark]}],
            "metadata": {"version": 1.0}})
    return out


def main():
    for name, text in files().items():
        path = HERE / name
        path.parent.mkdir(exist_ok=True)
        path.write_text(text, encoding="utf-8")
    print(f"wrote {len(files())} files under {HERE}")


if __name__ == "__main__":
    main()
