"""MMLU few-shot evaluation with the hendrycks protocol, as baichuan-7B's reference ``evaluate_mmlu.py``.

Protocol (unchanged from the reference): k = 5 shots, the first k rows of ``dev/<subject>_dev.csv``;
the prompt of ``evaluation/prompts.py`` (hendrycks format); shots dropped one at a time (the one nearest the
question first) while the prompt is longer than 2048 tokens or the model's context, and a question that does
not fit alone an error naming the subject and row; prompts encoded without BOS; the prediction is the argmax over A-D of the
last position's logits at ``tokenizer(letter).input_ids[-1]``. Accuracies are question-weighted within
each subject, subcategory, category and overall, as the reference.

What changed is the speed: the few-shot prefix of a subject is run once and its key/value cache reused
for every question, questions go in batches, and only the last position's logits are computed
(``--engine plain`` runs the reference's one-question-at-a-time computation instead; the predictions are
the same, see ``evaluation/engine.py``).

Outputs, as the reference: ``<save_dir>/results_<model name>/<subject>.csv`` (the test rows plus
``<name>_correct`` and ``<name>_choice{A,B,C,D}_probs``), the lines ``Average accuracy 0.xxx - <subject |
subcategory | category>`` and ``Average accuracy: 0.xxx``. Added: ``summary.json`` next to the CSVs with
every accuracy and the run's settings, and the README table row.

    python evaluation/evaluate_mmlu.py -m /path/to/baichuan-7b -d /path/to/mmlu/data
    python evaluation/evaluate_mmlu.py -m out/tiny -d ../shared/data/mmlu --subjects abstract_algebra \\
        --max_questions 20 --device_map cpu
"""
import argparse
import csv
import json
import os
import sys
import time

import numpy as np

from evaluation.categories import MMLU_CATEGORIES, MMLU_SUBCATEGORIES, MMLU_TABLE_COLUMNS
from evaluation.data import LETTERS, DataError, load_mmlu
from evaluation.engine import (FewShotEngine, add_runtime_args, load_model_and_tokenizer, model_name,
                               parse_subjects, predict, prompt_limit, select_gpus)
from evaluation.prompts import PromptStyle, PromptTooLong, fit_prompt
from common import HelpFormatter, run_cli


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--ntrain", "-k", type=int, default=5, help="number of few-shot examples (dev rows)")
    parser.add_argument("--ngpu", "-g", type=int, default=None,
                        help="use the first N GPUs (sets CUDA_VISIBLE_DEVICES unless already set); "
                             "default: all visible GPUs")
    parser.add_argument("--data_dir", "-d", type=str, default="data",
                        help="MMLU data folder holding dev/ val/ test/ (hendrycks data.tar layout)")
    parser.add_argument("--save_dir", "-s", type=str, default="results", help="where results_<model>/ goes")
    parser.add_argument("--model", "-m", type=str, required=True,
                        help="Hugging Face causal-LM folder (or hub id)")
    parser.add_argument("--split", choices=["test", "val"], default="test",
                        help="questions to score (test: 14042 questions, as published)")
    add_runtime_args(parser)
    args = parser.parse_args(argv)
    if args.ntrain < 0:
        parser.error(f"--ntrain must be >= 0, got {args.ntrain}")
    return args


def write_subject_csv(path, subject, name, probs, cors, shots):
    """The test rows followed by the reference's extra columns (pandas' to_csv layout, integer headers), then
    the number of shots each prompt kept to fit the length limit."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow([str(i) for i in range(6)] + [f"{name}_correct"]
                   + [f"{name}_choice{letter}_probs" for letter in LETTERS] + ["shots"])
        for q, p, c, k in zip(subject.test, probs, cors, shots):
            w.writerow([q.question, *q.options, q.answer, str(bool(c))] + [str(np.float32(x)) for x in p]
                       + [str(k)])


def main(argv=None):
    args = parse_args(argv)
    select_gpus(args.gpu_idx, args.ngpu)
    subjects = load_mmlu(args.data_dir, args.split, parse_subjects(args.subjects), args.max_questions)
    for s in subjects:
        if len(s.dev) < args.ntrain:
            raise DataError(f"{s.dev_file}: {len(s.dev)} dev rows, --ntrain asks for {args.ntrain}")
    model, tokenizer = load_model_and_tokenizer(args.model, args.device_map, args.dtype, args.trust_remote_code)
    engine = FewShotEngine(model, tokenizer, batch_size=args.batch_size, mode=args.engine)
    name = model_name(args.model)
    out_dir = os.path.join(args.save_dir, f"results_{name}")
    os.makedirs(out_dir, exist_ok=True)

    limit = prompt_limit(model, args.max_length)
    from tqdm import tqdm

    start = time.time()
    all_cors, subject_acc, fewer_shots = {}, {}, 0
    with tqdm(total=sum(len(s.test) for s in subjects), desc="MMLU", unit="q", file=sys.stderr) as bar:
        for subject in subjects:
            style = PromptStyle("en", subject.name)
            requests = [fit_prompt(style, subject.dev[:args.ntrain], q, tokenizer, limit, subject.name)
                        for q in subject.test]
            fewer_shots += sum(r.shots < args.ntrain for r in requests)
            logits = engine.score([r.ids for r in requests], [r.shots for r in requests], progress=bar)
            preds, probs = predict(logits)
            cors = np.array([p == q.answer for p, q in zip(preds, subject.test)])
            all_cors[subject.name] = cors
            subject_acc[subject.name] = float(cors.mean())
            bar.write("Average accuracy {:.3f} - {}".format(cors.mean(), subject.name))
            write_subject_csv(os.path.join(out_dir, f"{subject.name}.csv"), subject, name, probs, cors,
                              [r.shots for r in requests])

    # Question-weighted, as the reference: concatenate the per-question results of the members.
    subcat_acc, cat_acc = {}, {}
    subcats = list(dict.fromkeys(sc for lst in MMLU_SUBCATEGORIES.values() for sc in lst))
    for subcat in subcats:
        members = [all_cors[s] for s in all_cors if subcat in MMLU_SUBCATEGORIES[s]]
        if members:  # a --subjects run leaves some empty; the reference would print nan
            subcat_acc[subcat] = float(np.concatenate(members).mean())
            print("Average accuracy {:.3f} - {}".format(subcat_acc[subcat], subcat))
    for cat, cat_subcats in MMLU_CATEGORIES.items():
        members = [all_cors[s] for s in all_cors if set(MMLU_SUBCATEGORIES[s]) & set(cat_subcats)]
        if members:
            cat_acc[cat] = float(np.concatenate(members).mean())
            print("Average accuracy {:.3f} - {}".format(cat_acc[cat], cat))
    average = float(np.concatenate(list(all_cors.values())).mean())
    print("Average accuracy: {:.3f}".format(average))

    columns = list(MMLU_TABLE_COLUMNS) + ["Average"]
    values = [cat_acc.get(MMLU_TABLE_COLUMNS[c]) for c in MMLU_TABLE_COLUMNS] + [average]
    print("\n| Model | " + " | ".join(columns) + " |\n|---|" + "---|" * len(columns))
    print(f"| {name} | " + " | ".join("-" if v is None else f"{100 * v:.1f}" for v in values) + " |")
    if fewer_shots:
        print(f"{fewer_shots} question(s) used fewer than {args.ntrain} shots to fit {limit} tokens "
              "(the `shots` column of the subject CSVs)")

    summary = {
        "average": average, "categories": cat_acc, "subcategories": subcat_acc, "subjects": subject_acc,
        "questions": int(sum(len(c) for c in all_cors.values())), "fewer_shots": int(fewer_shots),
        "config": {"model": args.model, "data_dir": args.data_dir, "split": args.split, "ntrain": args.ntrain,
                   "max_length": limit, "engine": args.engine, "batch_size": args.batch_size,
                   "dtype": str(next(model.parameters()).dtype), "max_questions": args.max_questions,
                   "seconds": round(time.time() - start, 1)},
    }
    with open(os.path.join(out_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    return summary


if __name__ == "__main__":
    run_cli(main, expected=(DataError, PromptTooLong, FileNotFoundError))
