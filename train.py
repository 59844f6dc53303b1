"""Pretrain the baichuan-7B architecture with DeepSpeed ZeRO on a folder of text (data path: data/).

    deepspeed --hostfile config/hostfile train.py --deepspeed --deepspeed_config config/deepspeed.json \
        --data_dir data_dir --model_config 7b --max_steps 100000

The DeepSpeed config owns micro-batch size, global batch, optimizer, schedule and precision (accumulation is
global / (micro x world), so a run keeps its global batch on any world size); this file owns the model, the
data and the loop. Reads top to bottom: arguments, distributed init, data, model and
engine, resume, loop (batch, forward, backward, step, log, save).
"""
import argparse
import json
import logging
import time
from contextlib import nullcontext
from datetime import timedelta
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from transformers.modeling_utils import no_init_weights

from checkpoint.io import (check_folder_config, load_folder_weights, open_tag, point_latest, prepare_resume,
                           resolve_resume_tag, save_checkpoint, universal_client_state)
from checkpoint.resume_rules import check_allowed_names, compare_settings, run_settings, stored_settings
from common import HelpFormatter, all_ranks_ok, read_json, run_cli, write_atomic
from data import DATA_ORDERS, make_engine, split_global_batch
from models.configuration_baichuan import BaiChuanConfig
from models.flops import flops_per_token, peak_tflops_for
from models.kernels import compile_decoder_layers
from models.modeling_baichuan import BaiChuanForCausalLM
from training.documents import document_inputs
from training.eval_tasks import EvalTasks, parse_eval_tasks
from training import recovery
from training.metrics import MetricsLog
from training.schedule import lr_scheduler_factory
from training.validation import build_validation, check_val_args


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--data_dir", default="data_dir", help="folder of UTF-8 text files, one document per line "
                   "(searched recursively; sub-folders can be --data_mix sources)")
    p.add_argument("--tokenizer_path", default="tokenizer.model", help="SentencePiece model file")
    p.add_argument("--max_length", type=int, default=4096, help="tokens per training sequence (context length)")
    p.add_argument("--save_every", "--steps_per_epoch", dest="save_every", type=int, default=2000,
                   help="checkpoint interval in optimizer steps (--steps_per_epoch is the reference's name for it)")
    p.add_argument("--checkpoint_saving_path", default="checkpoints",
                   help="folder for checkpoints, metrics.jsonl and the resolved run config")
    p.add_argument("--model_config", default="7b", help="preset name (see config/model/) or a config.json path")
    p.add_argument("--max_steps", type=int, default=100_000, help="optimizer steps to train in all (resumed ones count)")
    p.add_argument("--resume", default="auto", help="'auto': the latest complete checkpoint in "
                   "--checkpoint_saving_path if any; 'none': start fresh; or a checkpoint tag such as step2000")
    p.add_argument("--allow_config_change", action="append", default=[], metavar="FIELD",
                   help="resume although FIELD (a setting such as model.rope_theta, a prefix such as optimizer, or "
                        "a group: model, data, optimizer, schedule, precision, zero) differs from the checkpoint's; "
                        "repeatable (default: none; see docs/security.md)")
    p.add_argument("--init_from", default=None, help="Hugging Face model folder (e.g. the released baichuan-7B) "
                   "to start from, for continued pretraining; ignored when resuming")
    p.add_argument("--seed", type=int, default=42, help="seed for weights and data order")
    p.add_argument("--gradient_checkpointing", action="store_true", help="recompute activations in backward")
    p.add_argument("--checkpoint_every", type=int, default=1,
                   help="with --gradient_checkpointing: checkpoint every k-th layer (1 = all)")
    p.add_argument("--attention_backend", default=None, choices=["auto", "flash_attention_2", "sdpa", "eager"],
                   help="force an attention kernel, as transformers' attn_implementation (default: 'auto', "
                        "flash-attn where installed and the batch allows, else SDPA)")
    p.add_argument("--loss_chunk_size", type=int, default=1024,
                   help="tokens per chunk of the vocabulary projection in the loss, so fp32 logits for the whole "
                        "batch never exist at once (0 = unchunked)")
    p.add_argument("--torch_compile", action="store_true",
                   help="torch.compile each decoder layer (fuses RMSNorm, SwiGLU, rotary; the first steps compile); "
                        "ZeRO stages 0-2")
    p.add_argument("--peak_tflops", type=float, default=None,
                   help="device peak TFLOPS for MFU (default: known for A100/A800/H100/H200, else MFU is null)")
    p.add_argument("--num_workers", type=int, default=None, help="tokenizer processes per rank")
    p.add_argument("--cache_dir", default=None, help="tokenized-shard cache (default <data_dir>/.cache)")
    p.add_argument("--data_order", default="global", choices=DATA_ORDERS,
                   help="global: batches fixed by data, seed, mixture and global batch, on any number of ranks "
                        "(resumable on another world size); per_rank: the reference's file-per-rank order")
    p.add_argument("--data_mix", default=None, help="JSON file of weighted sources under --data_dir (see "
                   "docs/data.md); default: all files as one source")
    p.add_argument("--allow_data_change", action="store_true", help="on resume, continue from the saved global "
                   "sample count even if the mixture, seed, sequence length, global batch or files changed (the "
                   "same as --allow_config_change data)")
    p.add_argument("--max_bad_line_fraction", type=float, default=0.5, help="refuse a data file with NUL bytes or "
                   "more undecodable lines than this share (1 = tokenize anything)")
    p.add_argument("--dist_timeout_minutes", type=int, default=30,
                   help="a collective that waits longer than this fails instead of hanging")
    p.add_argument("--val_dir", default=None, help="folder of held-out text shards for the validation loss")
    p.add_argument("--val_fraction", type=float, default=None,
                   help="hold out this share (0, 0.5] of --data_dir's documents, chosen by a hash of their content, "
                        "for the validation loss; they are never trained on")
    p.add_argument("--eval_every", type=int, default=500,
                   help="validation loss every this many optimizer steps, and at the start and end (0 = start "
                        "and end only); needs --val_dir or --val_fraction")
    p.add_argument("--eval_tokens", type=int, default=262_144,
                   help="held-out tokens (predictions) in the fixed validation set, split across ranks")
    p.add_argument("--eval_tasks", default=None,
                   help="benchmarks scored during training on a fixed seeded subset, e.g. mmlu:200,ceval:200 "
                        "(tasks: mmlu, ceval, cmmlu, gaokao, agieval)")
    p.add_argument("--eval_data_dir", default=None,
                   help="with --eval_tasks: folder holding each task's folder in its official layout (mmlu/, "
                        "ceval/, cmmlu/, gaokao-bench/, agieval/)")
    p.add_argument("--eval_tasks_every", type=int, default=0,
                   help="score --eval_tasks every this many steps (0 = at every checkpoint), and at the end")
    p.add_argument("--document_mask", action="store_true",
                   help="attention stays within each packed document and positions restart at each one "
                        "(default: the reference's plain causal attention over the packed row)")
    p.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    r = p.add_argument_group("recovery (docs/recovery.md)")
    r.add_argument("--max_skipped_steps", type=int, default=5,
                   help="stop after this many consecutive steps with a non-finite loss or gradient norm, whose "
                        "updates are skipped (default 5)")
    r.add_argument("--spike_window", type=int, default=100,
                   help="steps in the loss-spike detector's moving window; 0 turns it off (default 100)")
    r.add_argument("--spike_k", type=float, default=6.0,
                   help="a step loss above mean + k * std of the window is a spike (default 6)")
    r.add_argument("--rollback_on_spike", action="store_true",
                   help="on a spike, go back to the last complete checkpoint and step over the spike's batches")
    r.add_argument("--hang_timeout", type=float, default=0,
                   help="exit non-zero with every thread's stack when no step completes for this many seconds "
                        "(the first step included); 0 = off (default 0)")
    r.add_argument("--keep_last", type=int, default=0,
                   help="keep the newest N complete checkpoints, deleting older ones after each save; 0 keeps "
                        "all (default 0)")
    r.add_argument("--keep_every", type=int, default=0,
                   help="with --keep_last, also keep every M-th save (step a multiple of M * --save_every); "
                        "0 = none (default 0)")
    r.add_argument("--max_restarts_per_hour", type=int, default=10,
                   help="under torchrun, stop when restarts come faster than this (default 10)")
    r.add_argument("--keep_schedule", action="store_true",
                   help="when --max_steps grows on resume, keep the learning-rate schedule's old length")
    p = deepspeed.add_config_arguments(p)
    args = p.parse_args()
    if args.deepspeed_config is None:
        p.error("--deepspeed_config is required (see config/deepspeed.json)")
    if args.loss_chunk_size < 0:
        p.error("--loss_chunk_size must be >= 0")
    for flag in ("max_length", "save_every", "max_steps", "checkpoint_every", "max_skipped_steps"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} must be at least 1")
    check_val_args(args, p)
    if args.eval_tasks is not None:
        try:
            parse_eval_tasks(args.eval_tasks)
        except ValueError as e:
            p.error(str(e))
        if args.eval_data_dir is None:
            p.error("--eval_tasks needs --eval_data_dir (the folder holding mmlu/, ceval/ ...)")
    try:
        check_allowed_names(args.allow_config_change)
    except ValueError as e:
        p.error(str(e))
    return args


def load_ds_config(args, saved_schedule_steps) -> dict:
    path = Path(args.deepspeed_config)
    if not path.is_file():
        raise FileNotFoundError(f"--deepspeed_config {path}: no such file")
    ds = read_json(path, "--deepspeed_config")
    # The schedule's length is the run's length: "auto" takes --max_steps rather than repeating it.
    sched = ds.get("scheduler", {}).get("params", {})
    if sched.get("total_num_steps") == "auto":
        sched["total_num_steps"] = recovery.schedule_length(args.max_steps, saved_schedule_steps, args.keep_schedule)
    return ds


def peak_tflops(args):
    if args.peak_tflops:
        return args.peak_tflops
    if torch.cuda.is_available():
        return peak_tflops_for(torch.cuda.get_device_name())
    return None


def main():
    args = parse_args()

    # ---- distributed init ------------------------------------------------------------------------------
    recovery.init_distributed(timeout=timedelta(minutes=args.dist_timeout_minutes))
    rank, world = dist.get_rank(), dist.get_world_size()
    recovery.remove_shm_buffers_at_exit(rank)
    # Rank 0 tells what it does (data statistics, chosen kernels); the others speak only of problems.
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")
    device = deepspeed.get_accelerator().current_device_name()
    torch.manual_seed(args.seed)
    save_dir = Path(args.checkpoint_saving_path)
    resume_tag = resolve_resume_tag(save_dir, args.resume)
    resumed_info = recovery.read_complete_info(save_dir, resume_tag)
    if resumed_info.get("step", 0) >= args.max_steps:
        if rank == 0:
            print(f"already complete: {save_dir / resume_tag} is at step {resumed_info['step']} "
                  f"(--max_steps {args.max_steps})", flush=True)
        recovery.shutdown_distributed()
        return
    ds_config = load_ds_config(args, resumed_info.get("schedule_steps"))
    schedule_steps = ds_config.get("scheduler", {}).get("params", {}).get("total_num_steps")
    micro_bs = ds_config.get("train_micro_batch_size_per_gpu", 1)
    zero3 = ds_config.get("zero_optimization", {}).get("stage", 0) == 3

    # ---- data ------------------------------------------------------------------------------------------
    error = None
    try:
        # The global batch is the run's: from the config, else the checkpoint's, so a resume on another world
        # size keeps it and changes only the accumulation.
        saved = read_json(save_dir / resume_tag / "complete.json", "checkpoint") if resume_tag else {}
        global_bs = ds_config.get("train_batch_size") or saved.get("global_batch_size") or \
            micro_bs * ds_config.get("gradient_accumulation_steps", 1) * world
        ds_config.update(train_batch_size=global_bs,
                         gradient_accumulation_steps=split_global_batch(global_bs, micro_bs, world))
        data = make_engine(args.data_order, data_dir=args.data_dir, tokenizer_path=args.tokenizer_path,
                           micro_batch_size=micro_bs, max_length=args.max_length, global_batch_size=global_bs,
                           num_batches=args.max_steps + recovery.SPARE_BATCHES, world_size=world, rank=rank, seed=args.seed,
                           cache_dir=args.cache_dir, num_workers=args.num_workers, device=device,
                           data_mix=args.data_mix, max_bad_line_fraction=args.max_bad_line_fraction,
                           holdout=None if args.val_fraction is None else (args.val_fraction, False))
    except (OSError, ValueError) as e:
        error = e
    all_ranks_ok(error, "opening the data")
    data.load_data()  # agrees across ranks itself: it raises on every rank or on none
    validation = None
    if args.val_dir is not None or args.val_fraction is not None:
        error = None
        try:
            validation = build_validation(args, rank, world, device)
        except (OSError, ValueError) as e:
            error = e
        all_ranks_ok(error, "opening the validation data")
    eval_tasks = None
    if args.eval_tasks is not None:
        error = None
        try:
            eval_tasks = EvalTasks(args.eval_tasks, args.eval_data_dir, args.tokenizer_path, args.seed)
        except (OSError, ValueError) as e:
            error = e
        all_ranks_ok(error, "loading the --eval_tasks benchmarks")

    # ---- model and engine --------------------------------------------------------------------------------
    config = BaiChuanConfig.from_name(args.model_config, use_cache=False)
    if args.attention_backend:
        config._attn_implementation = args.attention_backend  # transformers' attn_implementation
    if args.max_length > config.max_position_embeddings:
        raise ValueError(f"--max_length {args.max_length} is longer than the model's max_position_embeddings "
                         f"{config.max_position_embeddings} (--model_config {args.model_config})")
    if config.vocab_size < data.vocab_size:
        raise ValueError(f"tokenizer {args.tokenizer_path} has {data.vocab_size} pieces but the model's "
                         f"vocab_size is {config.vocab_size}")
    # --allow_data_change is the resume table's "data" group.
    allowed_changes = args.allow_config_change + (["data"] if args.allow_data_change else [])
    settings = run_settings(config, ds_config, args.seed, args.max_length, world, args.tokenizer_path,
                            getattr(data, "fingerprint", None))
    if resume_tag:
        # Before DeepSpeed reads the tag (with pickle): no file may run code, and nothing that changes what is
        # trained may differ unless --allow_config_change names it.
        error = None
        try:
            stored = open_tag(save_dir, resume_tag)
            allowed = compare_settings(stored_settings(stored), settings,
                                       allowed_changes, where=str(save_dir / resume_tag))
            if allowed and rank == 0:
                logging.warning("resuming with changed settings (allowed): %s", "; ".join(allowed))
        except (OSError, ValueError) as e:
            error = e
        all_ranks_ok(error, f"checking checkpoint {save_dir / resume_tag}")
    if args.init_from and not resume_tag:
        check_folder_config(Path(args.init_from), config)
    # Weights about to be overwritten by --init_from are not initialised first (minutes at 7B).
    skip_init = no_init_weights() if args.init_from and not resume_tag else nullcontext()
    if zero3:
        # Parameters are partitioned as they are created, so a 7B model never exists whole on one rank.
        with deepspeed.zero.Init(config_dict_or_path=ds_config), skip_init:
            model = BaiChuanForCausalLM(config)
    else:
        with skip_init:
            model = BaiChuanForCausalLM(config)
    if args.init_from and not resume_tag:
        load_folder_weights(model, Path(args.init_from), zero3=zero3)
    model.loss_chunk_size = args.loss_chunk_size
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False},
                                            checkpoint_every=args.checkpoint_every)
    if args.torch_compile:
        if zero3:  # ZeRO-3 gathers parameters in module hooks, which the compiled layers would have to trace
            raise ValueError("--torch_compile is supported with ZeRO stages 0-2, not with ZeRO-3 "
                             f"({args.deepspeed_config})")
        compile_decoder_layers(model)
    if resume_tag:  # another world size than the checkpoint's: re-partition through a universal checkpoint
        load_dir, load_tag = prepare_resume(save_dir, resume_tag, world, ds_config)
    # The config's scheduler section drives our LambdaLR, so step k trains at the schedule's value for k.
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config,
                                           lr_scheduler=lr_scheduler_factory(ds_config))
    gas = engine.gradient_accumulation_steps()
    recovery.check_skip_supported(engine)

    # ---- resume ----------------------------------------------------------------------------------------
    metrics = MetricsLog(save_dir, rank, engine.monitor)
    guard = recovery.NonFiniteGuard(args.max_skipped_steps)
    skips = recovery.load_skips(save_dir)  # data ranges stepped over after spikes, [start, end)

    def resume(tag, load_dir=None, load_tag=None) -> int:
        step = 0
        if tag:
            _, client = engine.load_checkpoint(str(load_dir or save_dir), tag=load_tag or tag)
            step = client["step"]
            data.load_state_dict(client["data"], allow_data_change="data" in allowed_changes)
            skips.extend(r for r in client.get("skipped_batches", []) if r not in skips)
            recovery.set_schedule_length(engine, schedule_steps)
            if rank == 0:
                point_latest(save_dir, tag)
                print(f"resumed from {save_dir / tag} at step {step}", flush=True)
        metrics.truncate_after(step)
        return step

    step = resume(resume_tag, *((load_dir, load_tag) if resume_tag else ()))
    if rank == 0:
        # Only now, with every check passed: a launch refused above leaves the record of the run as it was.
        save_dir.mkdir(parents=True, exist_ok=True)
        resolved = {"args": vars(args), "deepspeed": ds_config,
                    "model": config.to_dict(), "world_size": world}
        write_atomic(save_dir / "run_config.json", json.dumps(resolved, indent=2, default=str))
    error = None
    if rank == 0:
        try:
            recovery.note_restart(metrics.path, step, args.max_restarts_per_hour, world, resumed_info.get("world_size"))
        except RuntimeError as e:
            error = e
    all_ranks_ok(error, "the restart check")

    def validate() -> float:
        """Log the validation loss at this step; returns the seconds it took (kept out of tokens/s)."""
        if validation is None:
            return 0.0
        start = time.perf_counter()
        result = validation.evaluate(engine)
        seconds = time.perf_counter() - start
        metrics.write({"step": step, **result, "val_seconds": seconds, "time": time.time()})
        return seconds

    def save(tag_step: int):
        tag = f"step{tag_step}"
        client = {"step": tag_step, "data": data.state_dict(), "model_config": config.to_dict(),
                  "skipped_batches": skips, "run_settings": settings, **universal_client_state()}
        # The tag carries its tokenizer: an export takes it from there, whatever later launches record.
        save_checkpoint(engine, save_dir, tag, client, {"step": tag_step, "world_size": world,
                                                        "global_batch_size": global_bs,
                                                        "schedule_steps": schedule_steps},
                        files={"tokenizer.model": args.tokenizer_path})
        if rank == 0:
            print(f"saved checkpoint {save_dir / tag}", flush=True)
            recovery.prune_checkpoints(save_dir, args.keep_last, args.keep_every, args.save_every)
        dist.barrier()  # no rank reads the folder (a rollback) while rank 0 still deletes in it

    # ---- loop ------------------------------------------------------------------------------------------
    tokens_per_step = micro_bs * args.max_length * gas
    flops = flops_per_token(config, args.max_length)
    peak = peak_tflops(args)
    print_every = ds_config.get("steps_per_print", 10)
    engine.train()
    if step == 0:
        validate()
    spikes = recovery.SpikeDetector(args.spike_window, args.spike_k)
    watchdog = recovery.Watchdog(args.hang_timeout, on_exit=lambda: recovery.remove_shm_buffers(rank))
    window_loss, window_steps, t0 = torch.zeros((), device=device), 0, time.perf_counter()
    while step < args.max_steps:
        lr = engine.get_lr()[0]  # what this step's optimizer update uses (the scheduler moves after it)
        recovery.step_over_skips(data, skips)
        data_start, micro_start = recovery.data_position(data), data.step
        skipped_before, losses, spike_offset = engine.skipped_steps, [], 0.0
        hook_batch = recovery.batch_number(data, gas)
        for _ in range(gas):
            batch = data.get_data()  # [micro_bs, max_length + 1]
            # The model shifts: max_length predictions per row.
            inputs = document_inputs(batch, data.eos_id) if args.document_mask else {"labels": batch}
            loss = engine(batch, **inputs).loss
            loss, offset = recovery.apply_test_hooks(loss, hook_batch, rank)
            spike_offset += offset / gas
            engine.backward(loss)
            engine.step()  # DeepSpeed steps the optimizer at the accumulation boundary only
            losses.append(loss.detach().float())
        if guard.after_step(engine, skipped_before, step, data, data_start, losses, micro_start):
            watchdog.beat()  # DeepSpeed discarded the update: `step` and the schedule stay, the data moved on
            continue
        step_loss = sum(losses) / gas
        data_end = recovery.data_position(data)
        spike = spikes.check(step_loss + spike_offset, step + 1, [data_start, data_end], metrics.path)
        if spike and args.rollback_on_spike and (save_dir / "latest").is_file():
            # Back to the last complete checkpoint, and from now on past this step's batches.
            if rank == 0:
                recovery.add_skip(save_dir, data_start, data_end)
            dist.barrier()
            skips.append([data_start, data_end])
            step = resume(resolve_resume_tag(save_dir, "auto"))
            spikes = recovery.SpikeDetector(args.spike_window, args.spike_k)
            window_loss.zero_()
            window_steps, t0 = 0, time.perf_counter()
            watchdog.beat()
            continue
        window_loss += step_loss
        step += 1
        window_steps += 1
        watchdog.beat()

        if step % print_every == 0 or step == args.max_steps:
            dist.all_reduce(window_loss)
            elapsed = time.perf_counter() - t0
            tokens_per_sec = tokens_per_step * window_steps / elapsed  # per device
            tflops = tokens_per_sec * flops / 1e12
            grad_norm = engine.get_global_grad_norm()  # of this step's update, before clipping
            # loss: mean over the window's steps; lr and grad_norm: this step's (docs/metrics.md).
            metrics.write({"step": step, "loss": window_loss.item() / world / window_steps,
                           "window_steps": window_steps, "lr": lr,
                           "grad_norm": None if grad_norm is None else float(grad_norm),
                           "tokens_per_sec": tokens_per_sec, "tflops": tflops,
                           "mfu": tflops / peak if peak else None, "epoch": data.epoch,
                           "skipped_steps": engine.skipped_steps, "time": time.time(),
                           **({"tokens_by_source": data.tokens_by_source()}
                              if hasattr(data, "tokens_by_source") else {})})
            window_loss.zero_()
            window_steps, t0 = 0, time.perf_counter()

        if step == args.max_steps or (args.eval_every and step % args.eval_every == 0):
            t0 += validate()
            watchdog.beat()

        every = args.eval_tasks_every or args.save_every
        if eval_tasks is not None and (step % every == 0 or step == args.max_steps):
            start = time.perf_counter()
            metrics.write({"step": step, **eval_tasks.evaluate(engine),
                           "eval_seconds": time.perf_counter() - start, "time": time.time()})
            t0 += time.perf_counter() - start
            watchdog.beat()

        if step % args.save_every == 0 or step == args.max_steps:
            save(step)
            watchdog.beat()
    watchdog.stop()
    recovery.shutdown_distributed()
    if rank == 0:
        print(f"training complete: reached --max_steps {args.max_steps}", flush=True)


if __name__ == "__main__":
    run_cli(main)
