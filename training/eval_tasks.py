"""Benchmark accuracy during training (``--eval_tasks mmlu:200,ceval:200``).

Each task's questions are loaded and their prompts built when the run starts, with the evaluation scripts' own
loaders and prompt rules (evaluation/: 5 shots, the first dev rows, shots dropped while a prompt is longer than
2048 tokens; MMLU's test split, C-Eval's val split, the test split of the others). A missing folder or a
malformed file therefore stops the launch, not the first evaluation hours later.

The subset is fixed for the run: ``n`` questions drawn without replacement by a generator seeded with
``--seed`` (all of them when a task has at most ``n``), in their file order. At every evaluation, question ``i``
of the subset goes to rank ``i % world``; the ranks' shares are padded to the same length with weight-0 repeats,
because under ZeRO-3 every forward pass gathers parameters in collectives that all ranks must join. Each
question is one forward pass of the whole prompt (the few-shot engine's ``plain`` mode, the reference's
computation), and the prediction is the argmax over the letters of the last position's logits, exactly as
evaluate_mmlu.py / evaluate_zh.py score it, so the accuracy equals theirs on the exported checkpoint.

Logged per task (docs/metrics.md): ``eval/<task>/acc``, ``eval/<task>/p_correct`` (mean probability of the
correct letter after the softmax over the letters: smoother than accuracy for a small model) and
``eval/<task>/questions``.
"""
from pathlib import Path
from typing import List, Tuple

import numpy as np
import torch
import torch.distributed as dist

TASK_FOLDERS = {"mmlu": "mmlu", "ceval": "ceval", "cmmlu": "cmmlu", "gaokao": "gaokao-bench", "agieval": "agieval"}
SHOTS, MAX_PROMPT_TOKENS = 5, 2048


def parse_eval_tasks(text: str) -> List[Tuple[str, int]]:
    """"mmlu:200,ceval:200" -> [("mmlu", 200), ("ceval", 200)]; ValueError naming the bad part."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, count = part.partition(":")
        if name not in TASK_FOLDERS:
            raise ValueError(f"--eval_tasks: unknown task {name!r} (known: {', '.join(TASK_FOLDERS)})")
        if not count.isdigit() or int(count) < 1:
            raise ValueError(f"--eval_tasks: {part!r} needs a question count, as in {name}:200")
        out.append((name, int(count)))
    if not out:
        raise ValueError(f"--eval_tasks {text!r} names no task")
    return out


def load_task_requests(task: str, folder: Path, count: int, seed: int, tokenizer):
    """(prompt token ids, index of the correct letter) of the task's fixed subset."""
    from evaluation.data import LETTERS, load_mmlu
    from evaluation.prompts import PromptStyle, fit_prompt

    if task == "mmlu":
        subjects = load_mmlu(folder, "test")
        style = lambda subject: PromptStyle("en", subject.name)  # noqa: E731
    else:
        from evaluation.data import LOADERS
        from evaluation.evaluate_zh import DEFAULT_SPLIT, prompt_style

        subjects = LOADERS[task](folder, DEFAULT_SPLIT[task])
        style = lambda subject: prompt_style(task, subject.name)  # noqa: E731
    for s in subjects:
        if len(s.dev) < SHOTS:
            raise ValueError(f"--eval_tasks {task}: {s.dev_file} holds {len(s.dev)} dev rows, {SHOTS} shots needed")
    pool = [(s, q) for s in subjects for q in s.test]
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(len(pool), size=count, replace=False)) if count < len(pool) else range(len(pool))
    requests = []
    for i in chosen:
        subject, q = pool[i]
        ids = fit_prompt(style(subject), subject.dev[:SHOTS], q, tokenizer, MAX_PROMPT_TOKENS).ids
        requests.append((ids, LETTERS.index(q.answer)))
    return requests


class EvalTasks:
    """The tasks' fixed subsets, prompts built; ``evaluate(engine)`` scores them on every rank."""

    def __init__(self, spec: str, data_dir, tokenizer_path, seed: int):
        from models.tokenization_baichuan import BaiChuanTokenizer

        self.tokenizer = BaiChuanTokenizer(vocab_file=str(tokenizer_path), add_bos_token=False,
                                           add_eos_token=False)
        self.tasks = {}
        for task, count in parse_eval_tasks(spec):
            folder = Path(data_dir) / TASK_FOLDERS[task]
            try:
                self.tasks[task] = load_task_requests(task, folder, count, seed, self.tokenizer)
            except (OSError, ValueError) as e:  # evaluation.data.DataError is a ValueError
                raise type(e)(f"--eval_tasks {task} ({folder}): {e}") from e

    @torch.no_grad()
    def evaluate(self, engine) -> dict:
        from evaluation.engine import FewShotEngine, softmax

        rank, world = dist.get_rank(), dist.get_world_size()
        model = engine.module
        was_training = model.training
        scorer = FewShotEngine(model, self.tokenizer, mode="plain")  # sets eval mode
        device = next(model.parameters()).device
        out = {}
        for task, requests in self.tasks.items():
            mine = requests[rank::world]
            per_rank = -(-len(requests) // world)
            padded = mine + [requests[0]] * (per_rank - len(mine))
            weights = torch.tensor([1.0] * len(mine) + [0.0] * (per_rank - len(mine)), dtype=torch.float64)
            logits = scorer.score([ids for ids, _ in padded])  # [per_rank, letters]
            gold = np.array([answer for _, answer in padded])
            probs = softmax(logits)
            correct = torch.from_numpy((probs.argmax(-1) == gold).astype(np.float64))
            p_correct = torch.from_numpy(probs[np.arange(len(gold)), gold].astype(np.float64))
            total = torch.stack([(weights * correct).sum(), (weights * p_correct).sum(), weights.sum()]).to(device)
            dist.all_reduce(total)
            acc, p, n = total.tolist()
            out.update({f"eval/{task}/acc": acc / n, f"eval/{task}/p_correct": p / n, f"eval/{task}/questions": int(n)})
        model.train(was_training)
        return out
