"""Time the few-shot engine against the plain computation on the same model and MMLU questions, in one run.

"plain" is the reference scripts' computation: one question at a time, the whole 5-shot prompt every time.
To keep the comparison about the engine, plain by default also computes the last position's logits only; the
reference computed all of them (``--plain_logits all`` times that), which on a small model with a 64000-word
vocabulary makes plain far slower.
"fast" is evaluation/engine.py: the subject's few-shot prefix cached once, the questions in padded batches.
Prompt encoding is shared by both and timed on its own. Each subject is timed --repeats times per mode,
alternating, and the fastest time counts (other processes on a shared machine only add time). The script
prints both times, the speed-up, whether the predictions are identical, and the work ratio (tokens run by
plain / by fast, padding included), which bounds the speed-up on compute-bound hardware.

Runs on CPU always, and on the GPU as well when one is visible (``--devices``). The default model is a
random baichuan-architecture model (hidden 256, 4 layers, the released 64000-word tokenizer); ``--model``
times a real folder instead (e.g. baichuan-7B on a GPU).

    python benchmarks/bench_eval.py                       # CPU (and GPU if present), 8 subjects x 40 questions
    python benchmarks/bench_eval.py --subjects all --max_questions 0 --repeats 1   # all 14042 questions
    python benchmarks/bench_eval.py --model /path/to/baichuan-7b --devices cuda --max_questions 100
"""
import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

from common import HelpFormatter, shared_data_dir
from evaluation.data import load_mmlu
from evaluation.engine import FewShotEngine, load_model_and_tokenizer, predict
from evaluation.prompts import PromptStyle, fit_prompt

SHARED = shared_data_dir()
# Every 8th of the 57 subjects in alphabetical order: a spread of short and long questions, not picked for
# speed. Over the whole test set the work ratio (tokens run, plain / fast) is 6.1x; on this sample it is lower,
# as 40 questions per subject amortise the prefix less than a subject's full ~250.
DEFAULT_SUBJECTS = ("abstract_algebra,college_mathematics,formal_logic,high_school_macroeconomics,human_aging,"
                    "medical_genetics,professional_law,world_religions")


def small_model(args, device, dtype):
    from models.configuration_baichuan import BaiChuanConfig
    from models.modeling_baichuan import BaiChuanForCausalLM
    from models.tokenization_baichuan import BaiChuanTokenizer

    config = BaiChuanConfig.from_name("tiny")
    config.update(dict(hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
                       intermediate_size=args.intermediate, max_position_embeddings=4096))
    torch.manual_seed(0)
    model = BaiChuanForCausalLM(config).to(device=device, dtype=dtype).eval()
    tokenizer = BaiChuanTokenizer(vocab_file=str(args.tokenizer), add_bos_token=False)
    return model, tokenizer


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def run(args, device):
    dtype = torch.float32 if device == "cpu" else getattr(torch, args.gpu_dtype)
    if args.model:
        model, tokenizer = load_model_and_tokenizer(args.model, "cpu" if device == "cpu" else device,
                                                    "float32" if device == "cpu" else args.gpu_dtype)
    else:
        model, tokenizer = small_model(args, device, dtype)
    wanted = None if args.subjects == "all" else args.subjects.split(",")
    subjects = load_mmlu(args.data_dir, "test", wanted, args.max_questions or None)
    requests, encode_s = timed(lambda: [
        [fit_prompt(PromptStyle("en", s.name), s.dev[:5], q, tokenizer) for q in s.test] for s in subjects])

    fast = FewShotEngine(model, tokenizer, batch_size=args.batch_size)
    plain = FewShotEngine(model, tokenizer, mode="plain")
    if args.plain_logits == "all":
        plain._last_only = {}  # the reference's computation: logits for every position, the last one used
    warm = [r.ids for r in requests[0][:2]]
    fast.score(warm), plain.score(warm)  # first-call allocations out of the timing

    # Subject by subject, plain and fast alternately, each --repeats times, keeping each one's fastest time
    # (as timeit does): other processes on the machine only ever add time.
    plain_logits, fast_logits, plain_s, fast_s, plain_tokens, fast_tokens = [], [], 0.0, 0.0, 0, 0
    for reqs in requests:
        seqs, groups = [r.ids for r in reqs], [r.shots for r in reqs]
        best, logits = {"plain": float("inf"), "fast": float("inf")}, {}
        for _ in range(args.repeats):
            for mode, engine in (("plain", plain), ("fast", fast)):
                logits[mode], seconds = timed(lambda: engine.score(seqs, groups))
                best[mode] = min(best[mode], seconds)
        plain_logits.append(logits["plain"])
        fast_logits.append(logits["fast"])
        plain_s, plain_tokens = plain_s + best["plain"], plain_tokens + plain.stats["tokens"]
        fast_s, fast_tokens = fast_s + best["fast"], fast_tokens + fast.stats["tokens"]
    plain_pred = sum((predict(x)[0] for x in plain_logits), [])
    fast_pred = sum((predict(x)[0] for x in fast_logits), [])
    same = sum(a == b for a, b in zip(plain_pred, fast_pred))
    diff = max(float(np.abs(a - b).max()) for a, b in zip(plain_logits, fast_logits))
    n = len(plain_pred)
    tokens = sum(len(r.ids) for reqs in requests for r in reqs)
    name = args.model or f"random baichuan h{args.hidden} L{args.layers}"
    per_subject = args.max_questions or "all"
    return (f"| {device} ({str(dtype).replace('torch.', '')}) | {name} | {len(subjects)} x {per_subject}"
            f" = {n} | {tokens / n:.0f} | {encode_s:.2f} | {plain_s:.2f} | {fast_s:.2f} | {plain_s / fast_s:.1f}x"
            f" | {same}/{n} | {diff:.1e} | {plain_tokens / fast_tokens:.1f}x |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--data_dir", type=Path, default=SHARED / "mmlu", help="MMLU data folder")
    parser.add_argument("--tokenizer", type=Path, default=SHARED / "baichuan-7b-tokenizer" / "tokenizer.model",
                        help="SentencePiece model for the random model")
    parser.add_argument("--subjects", default=DEFAULT_SUBJECTS, help="comma-separated MMLU subjects, or 'all'")
    parser.add_argument("--max_questions", type=int, default=40, help="questions per subject (0: all)")
    parser.add_argument("--batch_size", type=int, default=16, help="fast engine batch size")
    parser.add_argument("--repeats", type=int, default=3, help="timings per subject and mode; the fastest counts")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for torch (1: stable timings on a shared machine, where two threads "
                             "stall each other whenever another job takes a core)")
    parser.add_argument("--model", default=None, help="time this model folder instead of a random one")
    parser.add_argument("--hidden", type=int, default=256, help="random model: hidden size")
    parser.add_argument("--layers", type=int, default=4, help="random model: layers")
    parser.add_argument("--heads", type=int, default=4, help="random model: attention heads")
    parser.add_argument("--intermediate", type=int, default=688, help="random model: MLP size")
    parser.add_argument("--devices", default="cpu,cuda", help="devices to time on (cuda skipped if absent)")
    parser.add_argument("--gpu_dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16",
                        help="dtype on the GPU (CPU runs use float32)")
    parser.add_argument("--plain_logits", choices=["last", "all"], default="last",
                        help="last: plain computes only the last position's logits (the engine alone is compared); "
                             "all: every position's, as the reference scripts did")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, load average {os.getloadavg()[0]:.1f}"
          + (f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"))
    print("| device | model | questions | mean prompt tokens | encode s | plain s | fast s | speed-up "
          "| identical predictions | max abs logit diff | tokens run, plain/fast |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for device in args.devices.split(","):
        if device == "cuda" and not torch.cuda.is_available():
            continue
        print(run(args, device), flush=True)
    print(f"load average at the end {os.getloadavg()[0]:.1f} (other processes on the machine skew CPU timings)")


if __name__ == "__main__":
    main()
