"""Our evaluation scripts against lm-evaluation-harness with evaluation/lm_eval_tasks/, on one model and the same
questions, in one run: wall time of each and per-question agreement (prediction, letter probabilities).

The model is a random tiny baichuan-architecture model (context 4096, so every prompt fits) written both as
this project's folder (scored by evaluate_mmlu.py / evaluate_zh.py) and as a Llama folder (checkpoint/llama.py,
scored by lm-eval's Hugging Face backend with ``add_bos_token=False``). Both on the CPU, float32; batches of 16
questions for ours, 4 for lm-eval (it computes the 64000-word log-softmax at every position of every choice, so
its batches of 16 need several GB).
Needs the extra: ``pip install -e ".[lmeval]"``.

    python benchmarks/bench_lm_eval.py                         # 4 subjects per benchmark x 20 questions
    python benchmarks/bench_lm_eval.py --max_questions 0       # every question of the chosen subjects
"""
import argparse
import csv
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from evaluation.lm_eval_tasks.utils import SPLIT, data_dir

SUBJECTS = {"mmlu": "abstract_algebra,marketing,college_physics,world_religions",
            "ceval": "law,logic,high_school_physics,computer_network",
            "cmmlu": "ancient_chinese,marketing,college_law,nutrition"}


def ours(benchmark, subjects, folder, out, max_questions):
    """{task: [probabilities per question]}, and the seconds it took."""
    from evaluation import evaluate_mmlu, evaluate_zh
    common = ["--subjects", subjects, "--device_map", "cpu", "--batch_size", "16"]
    if max_questions:
        common += ["--max_questions", str(max_questions)]
    start = time.perf_counter()
    if benchmark == "mmlu":
        evaluate_mmlu.main(["-m", str(folder), "-d", data_dir("mmlu"), "-s", str(out)] + common)
    else:
        evaluate_zh.main(["--model_name_or_path", str(folder), "--task", benchmark, "--data_dir",
                          data_dir(benchmark), "--output_dir", str(out)] + common)
    seconds = time.perf_counter() - start
    probs = {}
    for subject in subjects.split(","):
        if benchmark == "mmlu":
            with open(out / f"results_{folder.name}" / f"{subject}.csv", newline="", encoding="utf-8") as f:
                probs[f"baichuan_mmlu_{subject}"] = [[float(x) for x in r[7:11]] for r in list(csv.reader(f))[1:]]
        else:
            entries = json.loads((out / SPLIT[benchmark] / f"{subject}.json").read_text(encoding="utf-8"))
            probs[f"baichuan_{benchmark}_{subject}"] = [[e["probs"][x] for x in "ABCD"] for e in entries]
    return probs, seconds


def theirs(tasks, folder, max_questions):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from evaluation.lm_eval_tasks.make_tasks import HERE
    start = time.perf_counter()
    results = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={folder},add_bos_token=False,dtype=float32", tasks=tasks,
        limit=max_questions or None, log_samples=True, device="cpu", batch_size=4,
        task_manager=TaskManager(include_path=str(HERE)))
    seconds = time.perf_counter() - start
    probs = {}
    for task in tasks:
        samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
        lls = torch.tensor([[float(r[0]) for r in s["filtered_resps"]] for s in samples])
        probs[task] = torch.softmax(lls, dim=-1).tolist()
    return probs, seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max_questions", type=int, default=20, help="per subject; 0 = all (default 20)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from checkpoint.llama import save_llama_folder
    from models.configuration_baichuan import BaiChuanConfig
    from models.modeling_baichuan import BaiChuanForCausalLM
    from models.tokenization_baichuan import BaiChuanTokenizer

    vocab = str(Path(data_dir("mmlu")).parent / "baichuan-7b-tokenizer" / "tokenizer.model")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        model = BaiChuanForCausalLM(BaiChuanConfig.from_name("tiny", max_position_embeddings=4096)).eval()
        model.save_pretrained(tmp / "tiny-baichuan")
        BaiChuanTokenizer(vocab_file=vocab).save_pretrained(tmp / "tiny-baichuan")
        save_llama_folder(model, vocab, tmp / "tiny-llama")
        rows = []
        for benchmark, subjects in SUBJECTS.items():
            a, ours_s = ours(benchmark, subjects, tmp / "tiny-baichuan", tmp / benchmark, args.max_questions)
            b, theirs_s = theirs(list(a), tmp / "tiny-llama", args.max_questions)
            p, q = np.concatenate([a[t] for t in a]), np.concatenate([b[t] for t in a])
            same = float((p.argmax(1) == q.argmax(1)).mean())
            rows.append((benchmark, len(p), ours_s, theirs_s, same, float(np.abs(p - q).max())))
    print("\n| benchmark | questions | ours (s) | lm-eval (s) | lm-eval / ours | same prediction | max prob. diff |")
    print("|---|---|---|---|---|---|---|")
    for name, n, o, t, same, diff in rows:
        print(f"| {name} | {n} | {o:.1f} | {t:.1f} | {t / o:.1f}x | {100 * same:.1f}% | {diff:.1e} |")


if __name__ == "__main__":
    main()
