"""What watching a run costs: the share of wall time the validation loss takes, and --document_mask's cost.

1. Validation share. train.py with its defaults (``--eval_every 500``, ``--eval_tokens 262144``) on the tiny
   preset with config/deepspeed_tiny.json (micro-batch 4, sequence 4096): a training step (forward, backward,
   AdamW) and one held-out sample's forward (what validation runs ``eval_tokens / max_length / world`` times)
   are timed in-process on the same model, fp32, and the share is
   ``eval_time / (eval_every * step_time + eval_time)`` per rank. Each figure is the fastest of ``--repeats``
   (other processes on a shared machine only add time).
2. Document mask. The forward and backward of one packed row of 4096 tokens from the sample corpus (real
   documents, EOS-separated), with plain causal attention (the reference) and with ``--document_mask``
   (training/documents.py + the kernel table's DocumentMask: a block-diagonal boolean mask through SDPA on CPU,
   flash-attn's variable-length kernel on GPU), side by side, and the ratio.

    python benchmarks/bench_watch.py                  # both, CPU
    python benchmarks/bench_watch.py --repeats 5 --seq 4096 --device cuda
"""
import argparse
import json
import time
from pathlib import Path

import torch

from common import HelpFormatter
from data_utils import DataEngine
from models.configuration_baichuan import BaiChuanConfig
from models.modeling_baichuan import BaiChuanForCausalLM
from training.documents import document_inputs

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--seq", type=int, default=4096, help="sequence length")
    p.add_argument("--micro_batch", type=int, default=4, help="training micro-batch (deepspeed_tiny.json: 4)")
    p.add_argument("--eval_every", type=int, default=500, help="train.py's default")
    p.add_argument("--eval_tokens", type=int, default=262_144, help="train.py's default")
    p.add_argument("--world", type=int, default=1, help="ranks sharing the validation set")
    p.add_argument("--repeats", type=int, default=3, help="timings per figure; the fastest counts")
    p.add_argument("--device", default="cpu")
    p.add_argument("--attention_backend", default="sdpa", choices=["sdpa", "eager", "flash_attention_2", "auto"])
    return p.parse_args(argv)


def fastest(fn, repeats, sync):
    best = float("inf")
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t)
    return best


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    config = BaiChuanConfig.from_name("tiny", use_cache=False, max_position_embeddings=args.seq + 1,
                                      attn_implementation=args.attention_backend)
    model = BaiChuanForCausalLM(config).to(device=device, dtype=dtype)  # loss chunked as in train.py
    data = DataEngine(ROOT / "data_dir", ROOT / "tokenizer.model", args.micro_batch, args.seq, world_size=1,
                      rank=0, cache_dir=False, show_progress=False).load_data()
    batch = torch.from_numpy(data.batch_array(0)).to(device)  # [micro_batch, seq + 1]
    row = batch[:1]  # [1, seq + 1]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def train_step():
        model.train()
        model(batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def eval_sample():
        model.eval()
        model(row, labels=row)

    step_s = fastest(train_step, args.repeats, sync)
    sample_s = fastest(eval_sample, args.repeats, sync)
    samples = -(-args.eval_tokens // args.seq)
    eval_s = sample_s * -(-samples // args.world)
    share = eval_s / (args.eval_every * step_s + eval_s)

    def fwd_bwd(inputs):
        def run():
            model.train()
            model(row, **inputs).loss.backward()
            model.zero_grad(set_to_none=True)
        return run

    documents = int((row == data.eos_id).sum())
    plain_s = fastest(fwd_bwd({"labels": row}), args.repeats, sync)
    masked_s = fastest(fwd_bwd(document_inputs(row, data.eos_id)), args.repeats, sync)

    result = {"device": str(device), "seq": args.seq, "attention_backend": args.attention_backend,
              "train_step_s": step_s, "eval_sample_s": sample_s, "eval_samples_per_rank": -(-samples // args.world),
              "eval_s": eval_s, "eval_share": share, "documents_in_row": documents,
              "causal_fwd_bwd_s": plain_s, "document_mask_fwd_bwd_s": masked_s, "mask_ratio": masked_s / plain_s}
    print(json.dumps(result, indent=1))
    print(f"\n| figure | value |\n|---|---|\n| training step (micro-batch {args.micro_batch} x {args.seq}) | "
          f"{step_s:.3f} s |\n| validation: {-(-samples // args.world)} samples x {sample_s:.3f} s | {eval_s:.2f} s "
          f"every {args.eval_every} steps |\n| share of wall time | {100 * share:.2f}% |")
    print(f"\n| one row of {args.seq} tokens ({documents} EOS), forward + backward | time | ratio |\n|---|---|---|\n"
          f"| causal (reference) | {plain_s:.3f} s | 1.00 |\n| --document_mask | {masked_s:.3f} s | "
          f"{masked_s / plain_s:.2f} |")


if __name__ == "__main__":
    main()
