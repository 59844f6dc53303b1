"""Time a training step (forward + backward + optimizer step) of this project's model and of transformers'
LlamaForCausalLM of the same shape, side by side, and print tokens/s, achieved TFLOPS, MFU, peak memory and
the ratio to Llama.

    # CPU, seconds: the tiny preset, and a mid-size shape
    python benchmarks/benchmark_train.py --preset tiny --seq_len 256 --micro_batch 2
    python benchmarks/benchmark_train.py --preset tiny --hidden_size 512 --num_layers 4 --num_heads 8 \\
        --intermediate_size 1376 --seq_len 512
    # the loss's peak memory for a long sequence, one variant of ours per chunk size (0 = unchunked)
    python benchmarks/benchmark_train.py --preset tiny --seq_len 4096 --loss_chunk_size 0 1024 4096
    # does torch.compile pay? eager and compiled side by side
    python benchmarks/benchmark_train.py --preset tiny --models ours ours_compiled llama
    # one GPU: the 7b width with 4 layers, bf16, flash-attn when importable
    python benchmarks/benchmark_train.py --preset 7b --num_layers 4 --seq_len 4096 --micro_batch 1
    # both models inside a DeepSpeed engine (world size 1) with a given config
    python benchmarks/benchmark_train.py --preset tiny --deepspeed config/deepspeed.json

Method. Each variant (ours with each --loss_chunk_size, Llama) runs in its own worker process, so each one's
peak memory is its own: on CUDA torch.cuda.max_memory_allocated from after the model and optimizer were built
(parameters and optimizer state stay counted); on CPU the growth of the process's peak RSS from just before the
model was built. Steps are interleaved across workers (A, B, A, B, ..., starting with a different worker each
round) so a change in machine load hits every variant alike. Warm-up steps (and torch.compile's compilation) are
not timed; the median of the timed steps is quoted. FLOPs per token are models/flops.py's (6 x matmul
parameters + attention, recomputation not counted), the same for both models, so their TFLOPS ratio is their
tokens/s ratio.

Without --deepspeed both models train with torch.optim.AdamW on parameters of --dtype (on CUDA: bf16 weights,
gradients and optimizer state, fused AdamW). With --deepspeed the engine owns mixed precision (bf16 weights, fp32
master copy for ZeRO stages >= 1) and gradient accumulation; the config's optimizer and scheduler are replaced by
the same torch AdamW, so DeepSpeed need not build its CUDA ops.
"""
import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

from common import HelpFormatter, free_port, peak_rss_bytes, rss_bytes

GIB = 2 ** 30
MODELS = ("ours", "ours_compiled", "llama", "llama_compiled", "llama_sdpa")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    shape = p.add_argument_group("model shape (a preset, then any size overridden)")
    shape.add_argument("--preset", default="tiny", help="preset name in config/model/ (tiny, 7b) or a config.json path")
    shape.add_argument("--hidden_size", type=int, help="override the preset's hidden size")
    shape.add_argument("--num_layers", type=int, help="override the preset's number of layers")
    shape.add_argument("--num_heads", type=int, help="override the preset's number of attention heads")
    shape.add_argument("--intermediate_size", type=int, help="override the preset's SwiGLU width")
    shape.add_argument("--vocab_size", type=int, help="override the preset's vocabulary size")
    run = p.add_argument_group("step")
    run.add_argument("--seq_len", type=int, default=512, help="tokens per sequence")
    run.add_argument("--micro_batch", type=int, default=1, help="sequences per forward/backward")
    run.add_argument("--grad_accum", type=int, default=1, help="micro-batches per optimizer step (one timed step)")
    run.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation, allocator warm-up)")
    run.add_argument("--steps", type=int, default=5, help="timed steps; their median is quoted")
    run.add_argument("--device", default="auto", help="'auto' (cuda when available, else cpu), 'cpu' or 'cuda'")
    run.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"],
                     help="parameter/compute dtype; auto = bf16 on CUDA, fp32 on CPU")
    run.add_argument("--seed", type=int, default=0, help="seed for weights and the random token batch")
    ours = p.add_argument_group("this project's model")
    ours.add_argument("--loss_chunk_size", type=int, nargs="+", default=[4096],
                      help="tokens per chunk of the fused linear + cross-entropy; 0 = unchunked; several values "
                           "run one variant each (a memory sweep)")
    ours.add_argument("--attention_backend", default="auto", choices=["auto", "flash_attention_2", "sdpa", "eager"],
                      help="our attention kernel (Llama gets flash_attention_2 when flash_attn is importable on "
                           "CUDA, else sdpa)")
    ours.add_argument("--checkpoint_every", type=int, default=0,
                      help="activation checkpointing of every k-th layer for ours (0 = off); Llama, which can "
                           "only checkpoint every layer, checkpoints every layer when k > 0")
    p.add_argument("--models", nargs="+", default=["ours", "llama"], choices=MODELS,
                   help="what to time: this project's model and transformers' LlamaForCausalLM, each eager or "
                        "with torch.compile on every decoder layer (_compiled), and Llama with SDPA even where "
                        "flash-attn is importable (llama_sdpa); ratios are against 'llama' (else the first Llama)")
    p.add_argument("--deepspeed", metavar="CONFIG", help="wrap each model in a DeepSpeed engine with this config "
                   "(world size 1; micro-batch and accumulation are set from the flags above)")
    p.add_argument("--peak_tflops", type=float, help="device peak TFLOPS for MFU (default: known for A100/A800/"
                   "H100/H200 by device name; none on CPU)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    args = p.parse_args(argv)
    for flag in ("seq_len", "micro_batch", "grad_accum", "steps"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} must be at least 1")
    if args.warmup < 0 or args.checkpoint_every < 0 or min(args.loss_chunk_size) < 0:
        p.error("--warmup, --checkpoint_every and --loss_chunk_size must be >= 0")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device not in ("cpu", "cuda"):
        p.error(f"--device must be auto, cpu or cuda, got {args.device!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device")
    if args.dtype == "auto":
        args.dtype = "bf16" if args.device == "cuda" else "fp32"
    if args.deepspeed and not Path(args.deepspeed).is_file():
        p.error(f"--deepspeed {args.deepspeed}: no such file")
    return args


def model_config(args):
    from models.configuration_baichuan import BaiChuanConfig

    overrides = {k: v for k, v in (("hidden_size", args.hidden_size), ("num_hidden_layers", args.num_layers),
                                   ("num_attention_heads", args.num_heads),
                                   ("intermediate_size", args.intermediate_size), ("vocab_size", args.vocab_size))
                 if v is not None}
    overrides.update(use_cache=False, max_position_embeddings=max(args.seq_len, 4096))
    return BaiChuanConfig.from_name(args.preset, **overrides)


def llama_attention(device: str) -> str:
    if device == "cuda":
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


# ------------------------------------------------------------------------------------------------------------
# Worker: one model, built once, stepping on command
# ------------------------------------------------------------------------------------------------------------

def build_model(spec: dict, args):
    from transformers import LlamaConfig, LlamaForCausalLM

    from models.modeling_baichuan import BaiChuanForCausalLM

    config = model_config(args)
    with torch.device(args.device):  # initialise on the device: a 7B-wide model builds in seconds there
        if spec["kind"] == "ours":
            config._attn_implementation = args.attention_backend  # transformers' attn_implementation
            model = BaiChuanForCausalLM(config)
            model.loss_chunk_size = spec.get("loss_chunk_size", 0)
        else:
            model = LlamaForCausalLM(LlamaConfig(
                vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                intermediate_size=config.intermediate_size, num_hidden_layers=config.num_hidden_layers,
                num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_attention_heads,
                max_position_embeddings=config.max_position_embeddings, rms_norm_eps=config.rms_norm_eps,
                rope_theta=config.rope_theta, tie_word_embeddings=False, use_cache=False,
                attn_implementation=spec.get("attention") or llama_attention(args.device)))
    model.to({"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]).train()
    if args.checkpoint_every and spec["kind"] == "ours":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False},
                                            checkpoint_every=args.checkpoint_every)
    elif args.checkpoint_every:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if spec["compile"]:
        from models.kernels import compile_decoder_layers

        compile_decoder_layers(model)
    return model


def deepspeed_engine(model, optimizer, args, port: int):
    import deepspeed

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    deepspeed.init_distributed(verbose=False)
    ds = json.loads(Path(args.deepspeed).read_text(encoding="utf-8"))
    ds.pop("train_batch_size", None)
    ds.pop("optimizer", None)  # the client AdamW below: same optimizer for both models, no CUDA op build
    ds.pop("scheduler", None)
    ds.update(train_micro_batch_size_per_gpu=args.micro_batch, gradient_accumulation_steps=args.grad_accum,
              steps_per_print=10 ** 9, wall_clock_breakdown=False)
    ds["bf16"] = {"enabled": args.dtype == "bf16"}
    ds.pop("fp16", None)
    ds["tensorboard"] = {"enabled": False}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds)
    return engine


def worker(spec: dict, args, conn):
    """Build one variant, then answer 'step' with its time and loss, 'report' with its peak memory."""
    try:
        torch.manual_seed(args.seed)
        device = torch.device(args.device)
        if device.type == "cuda":
            torch.cuda.set_device(0)
        rss_before = rss_bytes()
        model = build_model(spec, args)
        params = sum(p.numel() for p in model.parameters())
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
        engine = deepspeed_engine(model, optimizer, args, spec["port"]) if args.deepspeed else None
        g = torch.Generator().manual_seed(args.seed)  # the same tokens for every variant
        vocab = model.config.vocab_size
        batches = torch.randint(3, vocab, (args.grad_accum, args.micro_batch, args.seq_len), generator=g).to(device)

        def sync():
            if device.type == "cuda":
                torch.cuda.synchronize()

        def step():
            sync()
            start = time.perf_counter()
            for ids in batches:
                if engine is not None:
                    loss = engine(ids, labels=ids).loss
                    engine.backward(loss)
                    engine.step()  # steps the optimizer at the accumulation boundary only
                else:
                    loss = model(ids, labels=ids).loss
                    (loss / args.grad_accum).backward()
            if engine is None:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            sync()
            return {"seconds": time.perf_counter() - start, "loss": loss.item()}

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        conn.send({"ready": True, "params": params})
        while True:
            command = conn.recv()
            if command == "step":
                conn.send(step())
            elif command == "report":
                if device.type == "cuda":
                    peak = torch.cuda.max_memory_allocated()
                    conn.send({"peak_bytes": peak, "reserved_bytes": torch.cuda.max_memory_reserved()})
                else:
                    # ru_maxrss is in KiB on Linux; the growth from before the build is this model's footprint.
                    peak_rss = peak_rss_bytes()
                    conn.send({"peak_bytes": peak_rss - rss_before, "reserved_bytes": None})
            else:
                break
        if engine is not None:  # a gloo group left to the interpreter's teardown can abort the process
            import torch.distributed as dist
            dist.destroy_process_group()
    except Exception:  # sent to the parent, which names the variant
        conn.send({"error": traceback.format_exc()})
    finally:
        conn.close()


# ------------------------------------------------------------------------------------------------------------
# Parent: start the workers, interleave their steps, report
# ------------------------------------------------------------------------------------------------------------

def receive(variant, conn):
    try:
        message = conn.recv()
    except EOFError:
        raise RuntimeError(f"benchmark worker for {variant['name']} died without a message (out of memory?)")
    if "error" in message:
        raise RuntimeError(f"benchmark worker for {variant['name']} failed:\n{message['error']}")
    return message


def variants(args):
    out = []
    for model in dict.fromkeys(args.models):  # each once, in the order given
        kind, compiled = model.split("_")[0], model.endswith("_compiled")
        suffix = ", compiled" if compiled else ", sdpa" if model == "llama_sdpa" else ""
        if kind == "llama":
            out.append({"name": f"llama (transformers){suffix}", "kind": kind, "loss_chunk_size": 0,
                        "compile": compiled, "attention": "sdpa" if model == "llama_sdpa" else None})
        else:
            out.extend({"name": f"ours (loss chunk {chunk or 'off'}){suffix}", "kind": kind,
                        "loss_chunk_size": chunk, "compile": compiled} for chunk in args.loss_chunk_size)
    return out


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU ({os.cpu_count()} cores, torch threads {torch.get_num_threads()})"


def run(args):
    from models.flops import flops_per_token, peak_tflops_for

    config = model_config(args)
    flops = flops_per_token(config, args.seq_len)
    name = device_name(args.device)
    peak = args.peak_tflops or (peak_tflops_for(name) if args.device == "cuda" else None)
    if args.device == "cuda" and peak is None:
        print(f"note: no known peak TFLOPS for {name!r}; pass --peak_tflops for MFU")
    tokens = args.micro_batch * args.seq_len * args.grad_accum
    load_before = os.getloadavg()

    ctx = mp.get_context("spawn")  # a fresh interpreter: clean peak RSS and its own CUDA context
    runs = variants(args)
    for v in runs:
        v["port"] = free_port()
        v["conn"], child = ctx.Pipe()
        v["process"] = ctx.Process(target=worker, args=(dict(v, conn=None), args, child), daemon=True)
    try:
        for v in runs:
            v["process"].start()
            v["params"] = receive(v, v["conn"])["params"]  # one at a time: builds do not compete for memory
            v["times"], v["losses"] = [], []
        for i in range(args.warmup + args.steps):
            for j in range(len(runs)):
                v = runs[(i + j) % len(runs)]  # rotate who goes first
                v["conn"].send("step")
                result = receive(v, v["conn"])
                if i >= args.warmup:
                    v["times"].append(result["seconds"])
                v["losses"].append(result["loss"])
        for v in runs:
            v["conn"].send("report")
            v.update(receive(v, v["conn"]))
            v["conn"].send("stop")
    finally:
        for v in runs:
            v["process"].join(timeout=60)
            if v["process"].is_alive():
                v["process"].kill()

    rows = []
    for v in runs:
        seconds = statistics.median(v["times"])
        tflops = tokens / seconds * flops / 1e12
        rows.append({"variant": v["name"], "params": v["params"], "step_seconds": seconds,
                     "step_seconds_all": v["times"], "tokens_per_sec": tokens / seconds, "tflops": tflops,
                     "mfu": tflops / peak if peak else None, "peak_mem_gib": v["peak_bytes"] / GIB,
                     "peak_reserved_gib": v["reserved_bytes"] / GIB if v["reserved_bytes"] else None,
                     "first_loss": v["losses"][0], "last_loss": v["losses"][-1]})
    llama = next((r for r in rows if r["variant"] == "llama (transformers)"),
                 next((r for r in rows if r["variant"].startswith("llama")), None))
    for r in rows:
        r["speed_vs_llama"] = r["tokens_per_sec"] / llama["tokens_per_sec"] if llama else None
        r["mem_vs_llama"] = r["peak_mem_gib"] / llama["peak_mem_gib"] if llama and llama["peak_mem_gib"] > 0 else None
    return {"device": name, "dtype": args.dtype, "deepspeed": args.deepspeed, "shape": {
                "hidden_size": config.hidden_size, "num_layers": config.num_hidden_layers,
                "num_heads": config.num_attention_heads, "intermediate_size": config.intermediate_size,
                "vocab_size": config.vocab_size},
            "seq_len": args.seq_len, "micro_batch": args.micro_batch, "grad_accum": args.grad_accum,
            "warmup": args.warmup, "steps": args.steps, "checkpoint_every": args.checkpoint_every,
            "flops_per_token": flops, "peak_tflops": peak,
            "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "rows": rows}


def print_report(result, argv):
    s = result["shape"]
    print(f"command: python benchmarks/benchmark_train.py {' '.join(argv)}")
    print(f"device: {result['device']}, dtype {result['dtype']}, deepspeed {result['deepspeed'] or 'off'}, "
          f"torch {torch.__version__}")
    print(f"shape: hidden {s['hidden_size']}, layers {s['num_layers']}, heads {s['num_heads']}, "
          f"intermediate {s['intermediate_size']}, vocab {s['vocab_size']}; seq {result['seq_len']} x micro-batch "
          f"{result['micro_batch']} x accumulation {result['grad_accum']}; checkpoint_every "
          f"{result['checkpoint_every'] or 'off'}")
    print(f"FLOPs/token {result['flops_per_token'] / 1e9:.3f} G; peak {result['peak_tflops'] or 'unknown'} TFLOPS; "
          f"median of {result['steps']} steps after {result['warmup']} warm-up; load average "
          f"{result['loadavg_before'][0]:.2f} -> {result['loadavg_after'][0]:.2f}")
    mem = "peak mem GiB" if "CPU" not in result["device"] else "peak RSS growth GiB"
    header = f"| variant | params (M) | step s | tokens/s | TFLOPS | MFU | {mem} | loss (step 1) | speed vs llama | memory vs llama |"
    print(header)
    print("|" + "---|" * header.count(" | ") + "---|")
    for r in result["rows"]:
        def fmt(x, spec):
            return "n/a" if x is None else format(x, spec)
        print(f"| {r['variant']} | {r['params'] / 1e6:.1f} | {r['step_seconds']:.4f} | {r['tokens_per_sec']:.0f} | "
              f"{r['tflops']:.4g} | {fmt(r['mfu'], '.1%')} | {r['peak_mem_gib']:.3f} | {r['first_loss']:.4f} | "
              f"{fmt(r['speed_vs_llama'], '.2f')}x | {fmt(r['mem_vs_llama'], '.2f')}x |")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    result = run(args)
    print_report(result, argv)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
