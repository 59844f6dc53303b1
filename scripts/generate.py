"""Generate text from a Hugging Face model folder (released baichuan-7B, or one scripts/convert_checkpoint.py wrote).

    python scripts/generate.py --model out/baichuan-7b
    python scripts/generate.py --model out/baichuan-7b --prompt '登鹳雀楼->王之涣\\n夜雨寄北->'
    python scripts/generate.py --model out/baichuan-7b --prompt_file prompts.txt --output out.jsonl
    python scripts/generate.py --model out/baichuan-7b --do_sample --temperature 0.7 --top_p 0.9 --seed 1

The defaults are the reference README's example: prompt ``登鹳雀楼->王之涣\\n夜雨寄北->``, ``max_new_tokens=64``,
``repetition_penalty=1.1``, greedy decoding, and the output printed as ``tokenizer.decode(ids,
skip_special_tokens=True)`` of prompt + continuation.

Prompts: ``--prompt`` (repeatable) and/or ``--prompt_file`` (one prompt per line; ``.jsonl``: one JSON object with
a "prompt" field, or a JSON string, per line). In both, the two characters ``\\n`` stand for a line break and
``\\\\`` for a backslash, so the reference's two-line prompt fits on one line. Prompts run in batches of
``--batch_size``, left-padded with the pad id (0, ``<unk>``) and masked, so a prompt's output does not depend on its
batch. A batch of one prompt is streamed to the terminal token by token as it is produced (``--no_stream`` turns
that off); larger batches print each result when the batch finishes. ``--output`` also writes one JSON line per
prompt ({"prompt", "completion", "text"}).

Greedy decoding is deterministic: the same folder, prompts and flags give the same text on the same machine.
"""
import argparse
import json
import sys
from pathlib import Path

import torch

from common import HelpFormatter, pick_device_and_dtype, run_cli
from evaluation.engine import add_trust_remote_code_arg, refuse_remote_code

REFERENCE_PROMPT = "登鹳雀楼->王之涣\n夜雨寄北->"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model", required=True, help="Hugging Face model folder")
    p.add_argument("--prompt", action="append", default=None,
                   help="a prompt (repeatable); default: the reference README's prompt when no --prompt_file")
    p.add_argument("--prompt_file", default=None,
                   help="prompts, one per line (.jsonl: a JSON object with 'prompt' or a JSON string per line)")
    p.add_argument("--batch_size", type=int, default=8, help="prompts per generate() call")
    p.add_argument("--max_new_tokens", type=int, default=64, help="tokens to generate per prompt at most")
    p.add_argument("--repetition_penalty", type=float, default=1.1, help="1.0 = none (the reference uses 1.1)")
    p.add_argument("--do_sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0, help="with --do_sample: softmax temperature")
    p.add_argument("--top_p", type=float, default=1.0, help="with --do_sample: nucleus sampling mass")
    p.add_argument("--top_k", type=int, default=50, help="with --do_sample: keep the k likeliest tokens (0 = all)")
    p.add_argument("--seed", type=int, default=None, help="seed for --do_sample, for repeatable samples")
    p.add_argument("--device", default="auto",
                   help="'auto' (cuda when available, else cpu), 'cpu', 'cuda' or e.g. 'cuda:1'")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default="auto",
                   help="weights dtype; auto = bfloat16 on a GPU that supports it (else float16), float32 on CPU")
    p.add_argument("--no_stream", action="store_true", help="print results only when each batch finishes")
    p.add_argument("--output", default=None, help="also write the results here as JSON lines")
    add_trust_remote_code_arg(p)
    args = p.parse_args(argv)
    for flag in ("batch_size", "max_new_tokens"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} must be at least 1")
    if args.do_sample and not (args.temperature > 0 and 0 < args.top_p <= 1 and args.top_k >= 0):
        p.error("--do_sample needs --temperature > 0, 0 < --top_p <= 1 and --top_k >= 0")
    return args


def unescape(text: str) -> str:
    """`\\n` -> line break and `\\\\` -> backslash; any other backslash stays as it is."""
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text) and text[i + 1] in "n\\":
            out.append("\n" if text[i + 1] == "n" else "\\")
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def read_prompts(path: Path):
    if not path.is_file():
        raise FileNotFoundError(f"--prompt_file {path}: no such file")
    prompts = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            if path.suffix == ".jsonl":
                try:
                    item = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}, line {number}: not JSON: {e}") from e
                if isinstance(item, dict):
                    item = item.get("prompt")
                if not isinstance(item, str):
                    raise ValueError(f"{path}, line {number}: expected a JSON string or an object with a "
                                     "string 'prompt'")
                prompts.append(item)
            else:
                prompts.append(unescape(line))
    if not prompts:
        raise ValueError(f"--prompt_file {path} holds no prompt")
    return prompts


def load(model_dir: str, device: str, dtype, trust_remote_code: bool = False):
    """The folder's model and tokenizer; a baichuan folder with this project's classes (its files' code never
    runs), another folder's own code only with `trust_remote_code`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from models import register_auto_classes

    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"--model {path}: not a model folder (no config.json)")
    register_auto_classes()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, use_fast=False, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code, dtype=dtype)
    except ValueError as e:
        refuse_remote_code(path, e, trust_remote_code)
        raise
    model = model.to(device).eval()
    if tokenizer.pad_token_id is None:
        # The released tokenizer has no pad piece; id 0 (<unk>) pads, as the model config's pad_token_id says.
        tokenizer.pad_token_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    tokenizer.padding_side = "left"  # generation continues at the right end of every row
    return model, tokenizer


def generate(model, tokenizer, prompts, args, out=None):
    """Yield {"prompt", "completion", "text"} per prompt, in order, printing to `out` (stdout) as it goes."""
    from transformers import TextStreamer, set_seed

    out = out or sys.stdout

    if args.seed is not None:
        set_seed(args.seed)
    sampling = dict(do_sample=True, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k) \
        if args.do_sample else dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    device = model.get_input_embeddings().weight.device
    for start in range(0, len(prompts), args.batch_size):
        batch = prompts[start:start + args.batch_size]
        inputs = tokenizer(batch, return_tensors="pt", padding=True).to(device)
        stream = len(batch) == 1 and not args.no_stream
        streamer = TextStreamer(tokenizer, skip_special_tokens=True) if stream else None
        with torch.inference_mode():
            ids = model.generate(**inputs, max_new_tokens=args.max_new_tokens,
                                 repetition_penalty=args.repetition_penalty, pad_token_id=tokenizer.pad_token_id,
                                 streamer=streamer, **sampling)
        new = ids[:, inputs["input_ids"].shape[1]:].cpu()  # [b, generated]
        for i, prompt in enumerate(batch):
            completion = tokenizer.decode(new[i], skip_special_tokens=True)
            # As the reference prints it: prompt and continuation decoded together, padding dropped.
            text = tokenizer.decode(ids[i].cpu(), skip_special_tokens=True)
            if not stream:
                print(text, file=out, flush=True)
            if len(prompts) > 1:
                print("-" * 40, file=out, flush=True)
            yield {"prompt": prompt, "completion": completion, "text": text}


def main(argv=None):
    args = parse_args(argv)
    try:
        prompts = [unescape(p) for p in args.prompt or []]
        if args.prompt_file:
            prompts += read_prompts(Path(args.prompt_file))
        if not prompts:
            prompts = [REFERENCE_PROMPT]
        device, dtype = pick_device_and_dtype(args.device, args.dtype)
        model, tokenizer = load(args.model, device, dtype, args.trust_remote_code)
    except (OSError, ValueError, RuntimeError) as e:
        sys.exit(f"generate: error: {e}")
    results = list(generate(model, tokenizer, prompts, args))
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            for r in results:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return results


if __name__ == "__main__":
    run_cli(main)
