"""Benchmark DataEngine.load_data() against the reference's data loading, on >= 100 MB of real Chinese + English text.

The corpus is made from ../shared/data/corpus (read in place, written to a temporary folder). Every *.txt file
under it is read in sorted order, repeated until --size-mb is reached, and cut into --shards files at line
boundaries. Each shard starts with a one-line header "benchmark shard k". That line is shorter than 20 tokens,
so both loaders drop it, but it makes every shard's content unique, so the cache never reuses one shard's tokens
for another.

Each measurement runs in a fresh Python process, so one run's memory cannot count toward another's:
* reference: the reference's approach. One process reads each line, calls sp.EncodeAsIds(line.strip()) + [eos],
  drops lines under 20 tokens, and keeps every micro_batch_size * (max_length + 1) tokens as a Python list.
  Whatever of a line overflows that block is dropped.
* engine, N workers, cold cache: DataEngine(num_workers=N).load_data() with an empty cache folder.
* engine, cache hit: the same load again, in a new process, after the 2-worker run filled the cache.

"bytes per token held" is the growth of the process's resident set size (RSS) from just before loading to after
it, divided by the number of tokens the loader holds. For DataEngine this is measured after one full epoch of
get_data(). That epoch touches every memory-mapped page, so all the token files are resident and counted.
Throughput is the number of tokens of kept lines divided by the wall time of the load. That count is the same
for both loaders, and the script checks it. Other processes share the cores, so the script prints the load
average and the CPU time other processes took during each phase. Run it on a quiet machine. The CPU seconds
column (the process plus its finished worker processes) shows what parallel loading costs in total, and busy
neighbours do not change it.

Usage:
    python benchmarks/bench_data.py                      # 100 MB, workers 1 and 2, against the reference
    python benchmarks/bench_data.py --size-mb 20 --workers 2
    python benchmarks/bench_data.py --repeat 3             # each loader's fastest of 3 rounds (busy machines)
    python benchmarks/bench_data.py --scale-tokens 2e9 --work-dir /tmp/bench-scale --tokenizer tokenizer.model
        # one rank's start-up and memory on a 2e9-token synthetic cache: per_rank vs global order
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import HelpFormatter, peak_rss_bytes, rss_bytes, shared_data_dir

SHARED = shared_data_dir()
EOS, MIN_TOKENS = 2, 20


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (the tokenizer workers)."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def machine_busy_seconds() -> float:
    """CPU seconds all processes on the machine have used since boot (Linux /proc/stat; 0 elsewhere)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return 0.0
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def build_corpus(src: Path, out: Path, size_mb: float, shards: int) -> int:
    files = sorted(p for p in src.rglob("*.txt"))
    if not files:
        raise SystemExit(f"no .txt files under {src}")
    blob = b"".join(p.read_bytes().rstrip(b"\n") + b"\n" for p in files)
    target = int(size_mb * 1e6)
    repeated = blob * (target // len(blob) + 1)
    out.mkdir(parents=True, exist_ok=True)
    start, total = 0, 0
    for k in range(shards):
        end = repeated.index(b"\n", max(start, (k + 1) * target // shards - 1)) + 1  # cut after a newline
        data = f"benchmark shard {k}\n".encode() + repeated[start:end]
        (out / f"shard-{k:02d}.txt").write_bytes(data)
        total += len(data)
        start = end
    return total


# --------------------------------------------------------------------------------------------------------------
# Phases (each runs in its own process and prints one JSON line)


def reference_load(paths, sp, micro_batch_size, max_length):
    """The reference's DataEngine.load_data, as a function: lists of Python ints, one process."""
    samples, encoded = [], 0
    block = micro_batch_size * (max_length + 1)
    for path in paths:
        data = []
        with open(path, encoding="utf-8", errors="ignore") as f:
            for line in f:
                cc = sp.EncodeAsIds(line.strip()) + [EOS]
                if len(cc) < MIN_TOKENS:
                    cc = []
                encoded += len(cc)
                data.extend(cc)
                if len(data) >= block:
                    samples.append(data[:block])
                    data = []
    return samples, encoded


def phase_reference(args) -> dict:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(args.tokenizer))
    paths = sorted(Path(args.data).glob("*.txt"))
    before, cpu0 = rss_bytes(), cpu_seconds()
    t0 = time.perf_counter()
    samples, encoded = reference_load(paths, sp, args.micro_batch_size, args.max_length)
    wall = time.perf_counter() - t0
    held = sum(len(s) for s in samples)
    return {"wall_s": wall, "cpu_s": cpu_seconds() - cpu0, "tokens_encoded": encoded, "tokens_held": held,
            "rss_growth": rss_bytes() - before, "peak_rss": peak_rss_bytes()}


def phase_engine(args) -> dict:
    import torch  # noqa: F401  (imported before the baseline so its own memory is not counted)

    from data_utils import DataEngine

    before, cpu0 = rss_bytes(), cpu_seconds()
    t0 = time.perf_counter()
    engine = DataEngine(args.data, args.tokenizer, args.micro_batch_size, args.max_length, world_size=1, rank=0,
                        cache_dir=args.cache, num_workers=args.num_workers, show_progress=False)
    engine.load_data()
    wall = time.perf_counter() - t0
    cpu = cpu_seconds() - cpu0
    after_load = rss_bytes() - before
    for _ in range(engine.steps_per_epoch):
        engine.get_data()
    return {"wall_s": wall, "cpu_s": cpu, "tokens_encoded": engine.num_tokens, "tokens_held": engine.num_tokens,
            "rss_growth_after_load": after_load, "rss_growth": rss_bytes() - before, "peak_rss": peak_rss_bytes(),
            "steps_per_epoch": engine.steps_per_epoch}


def run_phase(name: str, args, **extra) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--phase", name, "--data", str(args.data),
           "--tokenizer", str(args.tokenizer), "--micro-batch-size", str(args.micro_batch_size),
           "--max-length", str(args.max_length)]
    for key, value in extra.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    import resource

    def children_cpu():
        r = resource.getrusage(resource.RUSAGE_CHILDREN)
        return r.ru_utime + r.ru_stime

    load_before, busy_before, own_before = os.getloadavg()[0], machine_busy_seconds(), children_cpu()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"phase {name} failed:\n{proc.stderr}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["load"] = (load_before, os.getloadavg()[0])
    # CPU time that other processes took while this phase ran (the phase's own process, start-up and imports
    # included, is subtracted). When it is large, the cores were shared and the wall times are not clean.
    result["others_cpu_s"] = max(0.0, machine_busy_seconds() - busy_before - (children_cpu() - own_before))
    return result


# --------------------------------------------------------------------------------------------------------------
# Scale: start-up and memory of one rank on a synthetic cache of --scale-tokens tokens (no tokenization)


def build_synthetic_cache(work: Path, tokenizer: Path, tokens: int, files: int, max_length: int) -> Path:
    """`files` small text files plus, for each, a cache entry of tokens/files random ids under the key the file
    would get: the engines find every entry cached and tokenize nothing, as after scripts/tokenize_data.py."""
    import hashlib

    import numpy as np

    from data.cache import CACHE_FORMAT, TokenCache

    data, cache_dir = work / "data", work / "cache"
    data.mkdir(parents=True, exist_ok=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    cache = TokenCache(cache_dir, tokenizer, num_workers=1)
    rng = np.random.default_rng(0)
    per_file = tokens // files
    for k in range(files):
        path = data / f"shard-{k:04d}.txt"
        path.write_text(f"synthetic shard {k}\n", encoding="utf-8")
        key = cache.key(path)
        h = hashlib.blake2b(digest_size=16)
        with open(cache_dir / f"{key}.bin", "wb") as f:
            for lo in range(0, per_file, 1 << 26):
                part = rng.integers(3, cache.vocab_size, min(1 << 26, per_file - lo), dtype=np.uint16)
                h.update(part.tobytes())
                part.tofile(f)
        stats = {"lines": per_file // 200, "kept": per_file // 200, "short": 0, "bad": 0, "first_bad": None, "nul": 0}
        (cache_dir / f"{key}.json").write_text(json.dumps({
            "format": CACHE_FORMAT, "source": str(path), "dtype": "uint16", "tokens": per_file, "stats": stats,
            "tokenizer": str(tokenizer), "blake2b": h.hexdigest()}))
    return data


def phase_scale(args) -> dict:
    import torch  # noqa: F401  (imported before measuring, as train.py has it)

    from data import make_engine

    before = rss_bytes()
    t0 = time.perf_counter()
    samples = args.scale_tokens // (args.max_length + 1)
    batches = samples // args.global_batch_size
    engine = make_engine(args.order, data_dir=args.data, tokenizer_path=args.tokenizer,
                         micro_batch_size=args.micro_batch_size, max_length=args.max_length,
                         global_batch_size=args.global_batch_size, num_batches=batches, world_size=1, rank=0,
                         cache_dir=args.cache, num_workers=1, show_progress=False, data_mix=None).load_data()
    load_s = time.perf_counter() - t0
    rss_load = rss_bytes() - before
    t1 = time.perf_counter()
    for _ in range(args.batches):
        engine.get_data()
    index = getattr(engine, "index", None)
    with open("/proc/self/status") as f:
        status = dict(line.split(":", 1) for line in f)
    return {"load_s": load_s, "batches_s": time.perf_counter() - t1, "rss_growth_after_load": rss_load,
            "peak_rss": peak_rss_bytes(), "rss_anon": int(status["RssAnon"].split()[0]) * 1024,
            "index_bytes": 0 if index is None else index.nbytes, "samples": samples, "index_batches": batches}


def scale_main(args) -> int:
    if not args.tokenizer.is_file():
        raise SystemExit(f"need the tokenizer {args.tokenizer}")
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench_data_scale_"))
    work.mkdir(parents=True, exist_ok=True)
    need = args.scale_tokens * 2
    free = shutil.disk_usage(work).free
    if free < need * 1.2:
        raise SystemExit(f"{work} has {free / 1e9:.1f} GB free; the synthetic cache needs {need / 1e9:.1f} GB")
    try:
        t0 = time.perf_counter()
        args.data = build_synthetic_cache(work, args.tokenizer, args.scale_tokens, args.shards, args.max_length)
        args.cache = work / "cache"
        print(f"synthetic cache: {args.scale_tokens:.3g} tokens in {args.shards} uint16 files at {work}; "
              f"built in {time.perf_counter() - t0:.0f}s; load average {os.getloadavg()[0]:.2f}", flush=True)
        rows = {}
        # per_rank: the reference's order (the baseline). Each order's first start finds no stamps and checks
        # the cache in full; "global restart" starts again on the stamps the global start left.
        for row, order in (("per_rank", "per_rank"), ("global", "global"), ("global restart", "global")):
            if row != "global restart":
                for stamp in args.cache.glob("*.verified"):
                    stamp.unlink()
            rows[row] = run_phase("scale", args, cache=args.cache, order=order, scale_tokens=args.scale_tokens,
                                  global_batch_size=args.global_batch_size, batches=args.batches)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\n{args.scale_tokens:.3g} tokens, max_length {args.max_length}, micro-batch {args.micro_batch_size}, "
          f"global batch {args.global_batch_size}, one rank, {args.batches} batches served after start-up\n")
    print("| order | start-up s | first batches s | RSS growth at start MB | peak RSS MB | anonymous RSS MB | index MB "
          "| index bytes/sample | load avg |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for order, r in rows.items():
        print(f"| {order} | {r['load_s']:.1f} | {r['batches_s']:.1f} | {r['rss_growth_after_load'] / 2**20:,.0f} "
              f"| {r['peak_rss'] / 2**20:,.0f} "
              f"| {r['rss_anon'] / 2**20:,.0f} | {r['index_bytes'] / 2**20:,.1f} "
              f"| {r['index_bytes'] / max(1, r['index_batches'] * args.global_batch_size):.1f} "
              f"| {r['load'][0]:.2f} -> {r['load'][1]:.2f} |")
    g, p = rows["global"], rows["per_rank"]
    print(f"\nglobal vs per_rank: start-up {g['load_s'] / p['load_s']:.2f}x, "
          f"peak RSS {g['peak_rss'] / p['peak_rss']:.2f}x; global restart vs first start: start-up "
          f"{rows['global restart']['load_s'] / g['load_s']:.3f}x")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--corpus", type=Path, default=SHARED / "corpus", help="folder of .txt files to build from")
    parser.add_argument("--tokenizer", type=Path, default=SHARED / "baichuan-7b-tokenizer" / "tokenizer.model",
                        help="SentencePiece model used by both loaders")
    parser.add_argument("--size-mb", type=float, default=100.0, help="size of the built corpus in MB (1e6 bytes)")
    parser.add_argument("--shards", type=int, default=8, help="number of files the corpus is cut into")
    parser.add_argument("--workers", default="1,2", help="comma-separated DataEngine num_workers values to run cold")
    parser.add_argument("--micro-batch-size", type=int, default=4, help="samples per batch (both loaders)")
    parser.add_argument("--max-length", type=int, default=2048, help="context length; samples hold max_length + 1")
    parser.add_argument("--work-dir", type=Path, default=None, help="where to build the corpus (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the built corpus and cache")
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds of all phases; the table keeps each loader's fastest round")
    parser.add_argument("--skip-reference", action="store_true", help="measure DataEngine only")
    # Internal: one measurement in this process.
    parser.add_argument("--scale-tokens", type=float, default=None,
                        help="instead: start-up time and memory of one rank on a synthetic uint16 cache of this many "
                             "tokens (e.g. 2e9: 4 GB under --work-dir, deleted afterwards unless --keep)")
    parser.add_argument("--global-batch-size", type=int, default=512, help="with --scale-tokens: the global batch")
    parser.add_argument("--batches", type=int, default=200, help="with --scale-tokens: batches served after start-up")
    parser.add_argument("--phase", choices=["reference", "engine", "scale"], help=argparse.SUPPRESS)
    parser.add_argument("--order", help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--num-workers", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.scale_tokens is not None:
        args.scale_tokens = int(args.scale_tokens)
    if args.phase:
        phases = {"reference": phase_reference, "engine": phase_engine, "scale": phase_scale}
        print(json.dumps(phases[args.phase](args)))
        return 0
    if args.scale_tokens:
        return scale_main(args)

    if not args.tokenizer.is_file() or not args.corpus.is_dir():
        raise SystemExit(f"need the tokenizer {args.tokenizer} and the corpus {args.corpus} (../shared/data)")
    workers = [int(w) for w in args.workers.split(",")]
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench_data_"))
    try:
        args.data = work / "corpus"
        size = build_corpus(args.corpus, args.data, args.size_mb, args.shards)
        print(f"corpus: {size / 1e6:.1f} MB in {args.shards} shards at {args.data}; cores: {os.cpu_count()}; "
              f"load average before: {os.getloadavg()[0]:.2f}", flush=True)
        rows, last = {}, max(workers)
        for attempt in range(args.repeat):
            # Rounds alternate the loaders, so a busy spell on the shared machine does not hit only one of them.
            runs = {}
            if not args.skip_reference:
                runs["reference (lists, 1 process)"] = run_phase("reference", args)
            for w in workers:
                cache = work / f"cache-{w}"
                shutil.rmtree(cache, ignore_errors=True)
                runs[f"DataEngine, {w} worker(s), cold"] = run_phase("engine", args, cache=cache, num_workers=w)
            runs["DataEngine, cache hit"] = run_phase("engine", args, cache=work / f"cache-{last}",
                                                      num_workers=last)
            for name, r in runs.items():
                print(f"round {attempt + 1}: {name}: {r['wall_s']:.2f} s, others' CPU {r['others_cpu_s']:.1f} s",
                      flush=True)
                if name not in rows or r["wall_s"] < rows[name]["wall_s"]:
                    rows[name] = r
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    tokens = {r["tokens_encoded"] for name, r in rows.items()}
    print(f"\nfastest of {args.repeat} round(s); corpus {size / 1e6:.1f} MB; tokens of kept lines: "
          f"{sorted(tokens)} (must be one number); "
          f"micro_batch_size {args.micro_batch_size}, max_length {args.max_length}\n")
    print("| loader | load s | CPU s | tokens/s | MB/s | tokens held | bytes/token held (RSS) | peak RSS MB "
          "| load avg | other processes' CPU s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['wall_s']:.2f} | {r['cpu_s']:.2f} | {r['tokens_encoded'] / r['wall_s']:,.0f} "
              f"| {size / 1e6 / r['wall_s']:.2f} | {r['tokens_held']:,} | {r['rss_growth'] / r['tokens_held']:.2f} "
              f"| {r['peak_rss'] / 2**20:,.0f} "
              f"| {r['load'][0]:.2f} -> {r['load'][1]:.2f} | {r['others_cpu_s']:.1f} |")
    cold = rows[f"DataEngine, {last} worker(s), cold"]
    hit = rows["DataEngine, cache hit"]
    bpt = cold["rss_growth"] / cold["tokens_held"]
    print(f"\nDataEngine bytes/token held: {bpt:.2f} (target <= 2.5)")
    print(f"cache hit vs tokenizing ({last} workers): {cold['wall_s'] / hit['wall_s']:.1f}x faster (target >= 20x)")
    if 1 in workers and last > 1:
        one = rows["DataEngine, 1 worker(s), cold"]
        print(f"DataEngine {last} workers vs 1 worker: {one['wall_s'] / cold['wall_s']:.2f}x")
    if "reference (lists, 1 process)" in rows:
        ref = rows["reference (lists, 1 process)"]
        ref_bpt = ref["rss_growth"] / ref["tokens_held"]
        print(f"reference bytes/token held: {ref_bpt:.1f}; DataEngine holds {ref_bpt / bpt:.1f}x less per token")
        print(f"tokenization throughput, DataEngine {last} workers vs reference: "
              f"{ref['wall_s'] / cold['wall_s']:.2f}x (target >= 1.8x on 2 cores)")
        print(f"tokens the reference's packing threw away: {ref['tokens_encoded'] - ref['tokens_held']:,} of "
              f"{ref['tokens_encoded']:,} ({1 - ref['tokens_held'] / ref['tokens_encoded']:.1%}); DataEngine "
              f"leaves only the last incomplete sample unused")
    return 0


if __name__ == "__main__":
    sys.exit(main())
