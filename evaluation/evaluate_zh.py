"""Chinese few-shot evaluation: C-Eval with the reference's prompt, and CMMLU, GAOKAO-Bench and AGIEval.

The prompt is baichuan-7B ``evaluate_zh.py``'s (see ``evaluation/prompts.py``)::

    以下是中国关于{科目}考试的单项选择题，请选出其中的正确答案。\\n
    \\n<shot question>\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\n答案：<X>      (k shots)
    \\n<question>\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\n答案：

and the scoring is the reference's: the argmax over A-D of the last position's logits at
``tokenizer(letter).input_ids[-1]``, prompts encoded without BOS. Shots are the first k dev rows, so runs
are deterministic; the reference reshuffled the dev rows for every question without a seed, which
``--shuffle_shots --seed N`` reproduces in kind (seeded per subject). Shots are dropped one at a time
while a prompt is longer than ``--max_length`` tokens (2048, as the MMLU protocol) or the model's
``max_position_embeddings``, the one nearest the question first; a question that does not fit alone is an
error naming the subject and row.

Tasks (``--task``): ``ceval`` (52 subjects, splits val/test/dev; ``test`` has no answers, so the
leaderboard submission file ``submission.json`` = ``{subject: {id: letter}}`` is written instead of
accuracies), ``cmmlu`` (67 subjects, test), ``gaokao`` (GAOKAO-Bench objective questions) and ``agieval``
(AGIEval v1): for the last two only the single-answer four-option questions, the first 5 of each file being
the few-shot pool (see ``evaluation/data.py`` for the files and questions kept and why). English AGIEval
tasks get the MMLU prompt instead of the Chinese one.

Outputs in ``--output_dir`` (default ``<task>_output``): ``<subject>.json`` (one entry per question in file
order: ``id``, ``prompt``, ``answer`` = predicted letter, ``correct``, ``gold``, ``probs``, ``shots``),
``acc.json`` (``{subject: accuracy}``, as the reference) and ``summary.json``; the summary is printed as the
published table: Average, Avg(Hard), STEM, Social Science, Humanities, Other (C-Eval). Averages are over
subjects (the reference's ``sum(accs) / len(accs)``); ``summary.json`` also has the question-weighted one.

Both command lines of the reference work::

    python evaluation/evaluate_zh.py --model_name_or_path /path/to/baichuan-7b --shot 5 --split val \\
        --output_dir ceval_output --data_dir /path/to/ceval-exam
    OPENMODEL_PATH=/models CEVAL_DATA_PATH=/data/ceval-exam \\
        python evaluation/evaluate_zh.py --gpu_idx 0 --model_id baichuan-7b --task ceval --shot 5 --split test \\
        --show_detail
"""
import argparse
import json
import os
import random
import sys
import time

import numpy as np

from evaluation import categories as cats
from evaluation.data import LETTERS, LOADERS, DataError
from evaluation.engine import (FewShotEngine, add_runtime_args, load_model_and_tokenizer,
                               parse_subjects, predict, prompt_limit, select_gpus)
from evaluation.prompts import PromptStyle, PromptTooLong, fit_prompt
from common import HelpFormatter, run_cli

TASKS = ("ceval", "cmmlu", "gaokao", "agieval")
DATA_ENV = {"ceval": "CEVAL_DATA_PATH", "cmmlu": "CMMLU_DATA_PATH", "gaokao": "GAOKAO_DATA_PATH",
            "agieval": "AGIEVAL_DATA_PATH"}
DEFAULT_SPLIT = {"ceval": "val", "cmmlu": "test", "gaokao": "test", "agieval": "test"}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--model_name_or_path", type=str, default=None,
                        help="Hugging Face causal-LM folder; default: --model_id or "
                             "$OPENMODEL_PATH")
    parser.add_argument("--model_id", type=str, default=None,
                        help="model folder name under $OPENMODEL_PATH (the reference README's command line); "
                             "a path when OPENMODEL_PATH is unset")
    parser.add_argument("--task", choices=TASKS, default="ceval", help="benchmark to run")
    parser.add_argument("--data_dir", type=str, default=None,
                        help="benchmark data folder in its official layout; default: $CEVAL_DATA_PATH, "
                             "$CMMLU_DATA_PATH, $GAOKAO_DATA_PATH or $AGIEVAL_DATA_PATH by --task")
    parser.add_argument("--shot", type=int, default=5, help="number of few-shot examples")
    parser.add_argument("--split", type=str, default=None,
                        help="split to score: C-Eval val (default; has answers), test (leaderboard "
                             "submission) or dev; the other tasks have test only")
    parser.add_argument("--output_dir", type=str, default=None,
                        help="results go to <output_dir>/<split>/, so val and test runs never overwrite each other; "
                             "default: <task>_output")
    parser.add_argument("--show_detail", action="store_true", help="print every prompt and its prediction")
    parser.add_argument("--shuffle_shots", action="store_true",
                        help="shuffle the dev rows for every question, as the reference did (seeded by "
                             "--seed and the subject, so runs repeat)")
    parser.add_argument("--seed", type=int, default=1234, help="seed of --shuffle_shots")
    add_runtime_args(parser)
    args = parser.parse_args(argv)
    if args.shot < 0:
        parser.error(f"--shot must be >= 0, got {args.shot}")
    args.split = args.split or DEFAULT_SPLIT[args.task]
    args.output_dir = os.path.join(args.output_dir or f"{args.task}_output", args.split)
    if args.model_name_or_path is None:
        base = os.environ.get("OPENMODEL_PATH")
        if args.model_id is not None:
            args.model_name_or_path = os.path.join(base, args.model_id) if base else args.model_id
        elif base:
            args.model_name_or_path = base
        else:
            parser.error("no model: pass --model_name_or_path, or --model_id (with OPENMODEL_PATH), "
                         "or set OPENMODEL_PATH")
    if args.data_dir is None:
        args.data_dir = os.environ.get(DATA_ENV[args.task])
        if not args.data_dir:
            parser.error(f"no {args.task} data: pass --data_dir or set {DATA_ENV[args.task]}")
    return args


def prompt_style(task: str, subject: str) -> PromptStyle:
    if task == "ceval":
        return PromptStyle("zh", cats.CEVAL_PROMPT_NAMES[subject])
    if task == "cmmlu":
        return PromptStyle("zh", cats.CMMLU_NAMES[subject])
    if task == "gaokao":
        return PromptStyle("zh", cats.GAOKAO_SUBJECTS[subject])
    if subject in cats.AGIEVAL_EN_SUBJECTS:
        return PromptStyle("en", cats.AGIEVAL_EN_SUBJECTS[subject])
    return PromptStyle("zh", cats.AGIEVAL_ZH_SUBJECTS[subject])


def summarize(task: str, acc: dict, counts: dict) -> dict:
    """The published table's columns: averages over subjects (the reference's convention)."""
    mean = lambda names: float(np.mean([acc[s] for s in names])) if names else None  # noqa: E731
    table = {"Average": mean(list(acc))}
    if task == "ceval":
        table["Avg(Hard)"] = mean([s for s in acc if s in cats.CEVAL_HARD])
        for cat in cats.CEVAL_CATEGORY_ORDER:
            table[cat] = mean([s for s in acc if cats.CEVAL_SUBJECTS[s][2] == cat])
    elif task == "cmmlu":
        for cat, subcats in cats.CMMLU_CATEGORIES.items():
            table[cat] = mean([s for s in acc if set(cats.CMMLU_SUBCATEGORIES[s]) & set(subcats)])
    total = sum(counts.values())
    table["Average (question-weighted)"] = (sum(acc[s] * counts[s] for s in acc) / total) if total else None
    return table


def shots_for(subject, k: int, rng):
    """The few-shot examples of one question: the first k dev rows, or k of them in a fresh random order."""
    if rng is None:
        return subject.dev[:k]
    return rng.sample(subject.dev, len(subject.dev))[:k]


def main(argv=None):
    args = parse_args(argv)
    select_gpus(args.gpu_idx)
    subjects = LOADERS[args.task](args.data_dir, args.split, parse_subjects(args.subjects), args.max_questions)
    for s in subjects:
        if len(s.dev) < args.shot:
            raise DataError(f"{s.dev_file}: {len(s.dev)} few-shot examples, --shot asks for {args.shot}")
        for reason, n in s.skipped.items():
            print(f"{s.name}: left out {n} item(s): {reason}")
    has_answers = all(q.answer is not None for s in subjects for q in s.test)
    model, tokenizer = load_model_and_tokenizer(args.model_name_or_path, args.device_map, args.dtype,
                                                args.trust_remote_code)
    engine = FewShotEngine(model, tokenizer, batch_size=args.batch_size, mode=args.engine)
    os.makedirs(args.output_dir, exist_ok=True)

    limit = prompt_limit(model, args.max_length)
    from tqdm import tqdm

    start = time.time()
    acc, counts, submission, fewer_shots = {}, {}, {}, 0
    with tqdm(total=sum(len(s.test) for s in subjects), desc=args.task, unit="q", file=sys.stderr) as bar:
        for subject in subjects:
            style = prompt_style(args.task, subject.name)
            rng = random.Random(f"{args.seed}:{subject.name}") if args.shuffle_shots else None
            requests = [fit_prompt(style, shots_for(subject, args.shot, rng), q, tokenizer, limit,
                                   subject.name)
                        for q in subject.test]
            fewer_shots += sum(r.shots < args.shot for r in requests)
            logits = engine.score([r.ids for r in requests], [r.shots for r in requests], progress=bar)
            preds, probs = predict(logits)
            results = []
            for q, r, pred, p in zip(subject.test, requests, preds, probs):
                results.append({"id": q.id, "prompt": r.prompt, "answer": pred,
                                "correct": None if q.answer is None else pred == q.answer, "gold": q.answer,
                                "probs": {letter: float(x) for letter, x in zip(LETTERS, p)}, "shots": r.shots})
                if args.show_detail:
                    bar.write("-" * 100 + f"\n{r.prompt}\nPredict answer with ABCD probs: {pred}"
                              + (f" (gold {q.answer})" if q.answer else ""))
            with open(os.path.join(args.output_dir, f"{subject.name}.json"), "w", encoding="utf-8") as f:
                json.dump(results, f, ensure_ascii=False, indent=2)
            submission[subject.name] = {q.id: pred for q, pred in zip(subject.test, preds)}
            if has_answers:
                counts[subject.name] = len(results)
                acc[subject.name] = float(np.mean([e["correct"] for e in results]))
                bar.write(f"{subject.name}: acc {acc[subject.name]:.4f} ({len(results)} questions)")

    config = {"task": args.task, "model": args.model_name_or_path, "data_dir": args.data_dir, "split": args.split,
              "shot": args.shot, "shuffle_shots": args.shuffle_shots, "seed": args.seed,
              "max_length": limit, "engine": args.engine, "batch_size": args.batch_size,
              "dtype": str(next(model.parameters()).dtype), "max_questions": args.max_questions,
              "seconds": round(time.time() - start, 1)}
    if fewer_shots:
        print(f"{fewer_shots} question(s) used fewer than {args.shot} shots to fit {limit} tokens "
              "(`shots` in the subject files)")
    if not has_answers:
        path = os.path.join(args.output_dir, "submission.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(submission, f, ensure_ascii=False, indent=2)
        print(f"the {args.split} split has no answers: wrote the leaderboard submission file {path}")
        return {"submission": path, "config": config}

    with open(os.path.join(args.output_dir, "acc.json"), "w", encoding="utf-8") as f:
        json.dump(acc, f, indent=2)
    table = summarize(args.task, acc, counts)
    columns = [c for c in table if c != "Average (question-weighted)" and table[c] is not None]
    print(f"\n| Model {args.shot}-shot | " + " | ".join(columns) + " |\n|---|" + "---|" * len(columns))
    print(f"| {os.path.basename(os.path.normpath(args.model_name_or_path))} | "
          + " | ".join(f"{100 * table[c]:.1f}" for c in columns) + " |")
    print(f"average acc: {table['Average']:.4f} over {len(acc)} subjects "
          f"(question-weighted {table['Average (question-weighted)']:.4f}, {sum(counts.values())} questions)")
    summary = {"summary": table, "subjects": acc, "questions": counts, "fewer_shots": int(fewer_shots),
               "config": config}
    with open(os.path.join(args.output_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, ensure_ascii=False, indent=2)
    return summary


if __name__ == "__main__":
    run_cli(main, expected=(DataError, PromptTooLong, FileNotFoundError))
