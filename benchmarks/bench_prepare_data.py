"""Benchmark scripts/prepare_data.py on a ~200 MB Chinese + English corpus with planted near-duplicates.

The corpus is built in a work folder from ../shared/data/corpus (read in place, never copied into the repository),
one document per line (every non-blank line of every .txt file):
* 00_base.txt: the real corpus once (48 MB), with whatever duplicates it has by nature;
* 10_round_<r>.txt: the real corpus again, disguised so that it is new text with the same statistics: each CJK
  ideograph is mapped to another one by a permutation seeded with r, and each English word that is not a function
  word to another word of the corpus by a seeded hash. Lengths, scripts, punctuation, sentence structure and the
  corpus's own repetitions survive; no shingle of the original does. These rounds fill the corpus up to --size-mb
  without turning it into copies of the base;
* 90_planted.txt: K = --planted documents drawn from the base (at least 100 characters), each with 1 to 5
  random single-character edits. These must be found.

Then prepare_data.py runs in a fresh process with --processes 2 (the default compact LSH backend). Reported: input
MB/s over the whole run (start-up and shard writing included), peak memory as the largest sum of RSS over the
process tree (main + workers, sampled every 0.2 s; shared pages count once per process, so an upper bound) and the
largest single-process peak from getrusage, and the planted recall: the share of planted copies removed by a
de-duplication step (exact, near-duplicate document, or left empty by the sentence step) among those that no
heuristic filter removed, also broken down by the true Jaccard similarity of their 5-shingle sets with the original.

The full corpus runs twice: with --no-candidate-check (every LSH candidate removed unchecked, datasketch's banding:
the behaviour before the candidate check) and with the default check (exact shingle Jaccard, banding for recall).
For each: the planted recall per language and Jaccard bucket, and the documents removed as near-duplicates whose
Jaccard with the kept document they matched is below the threshold (0.8) or below it minus 0.05; then the time
ratio of the two runs.

Baseline side by side: the same pipeline with --lsh-backend datasketch (datasketch.MinHashLSH) on the first
--baseline-mb of the corpus, next to the compact backend on that same slice; the script prints both and the ratio.
Other processes share the cores, so the load average is printed before and after each run.

Usage:
    python benchmarks/bench_prepare_data.py                              # 200 MB, 2 processes, baseline on 50 MB
    python benchmarks/bench_prepare_data.py --size-mb 30 --baseline-mb 10 --planted 2000
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import psutil

from common import REPO_ROOT as ROOT, HelpFormatter, shared_data_dir
from corpus import text as prep_text

CORPUS = shared_data_dir() / "corpus"
FUNCTION_WORDS = set(prep_text.EN_FUNCTION_WORDS)
WORD = re.compile(r"[A-Za-z]+")


def base_documents() -> list[str]:
    if not CORPUS.exists():
        raise SystemExit(f"corpus not found at {CORPUS} (set BAICHUAN_SHARED_DATA or lay ../shared beside the repo)")
    docs = []
    for path in sorted(CORPUS.rglob("*.txt")):
        docs += [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return docs


def disguise(docs: list[str], round_: int, vocabulary: list[str]) -> list[str]:
    """The same documents as new text: CJK ideographs permuted, English content words swapped (seeded by round)."""
    rng = np.random.default_rng(round_)
    cjk = np.arange(0x4E00, 0xA000)
    table = dict(zip(cjk.tolist(), rng.permutation(cjk).tolist()))

    def swap(match):
        word = match.group(0)
        if word.lower() in FUNCTION_WORDS:
            return word
        other = vocabulary[zlib.crc32(f"{round_}:{word.lower()}".encode()) % len(vocabulary)]
        return other.capitalize() if word[0].isupper() else other

    return [WORD.sub(swap, doc.translate(table)) for doc in docs]


def plant(docs: list[str], count: int, seed: int = 0) -> tuple[list[int], list[str]]:
    """`count` documents of >= 100 characters, each with 1-5 single-character substitutions."""
    rng = random.Random(seed)
    eligible = [i for i, d in enumerate(docs) if len(d) >= 100]
    chosen = rng.sample(eligible, count)
    copies = []
    for i in chosen:
        chars = list(docs[i])
        for pos in rng.sample(range(len(chars)), rng.randint(1, 5)):
            chars[pos] = "的" if prep_text.CHAR_CLASS[ord(chars[pos])] == prep_text.CJK else "q"
        copies.append("".join(chars))
    return chosen, copies


def build(work: Path, size_mb: float, planted: int) -> dict:
    manifest_path = work / "manifest.json"
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        if manifest["size_mb"] == size_mb and manifest["planted"] == planted:
            print(f"reusing corpus in {work}")
            return manifest
    shutil.rmtree(work / "corpus", ignore_errors=True)
    (work / "corpus").mkdir(parents=True)
    t0 = time.perf_counter()
    docs = base_documents()
    chosen, copies = plant(docs, planted)
    vocabulary = sorted({w.lower() for d in docs for w in WORD.findall(d)} - FUNCTION_WORDS)
    target = int(size_mb * 1e6)
    written = 0

    def write(name, lines):
        nonlocal written
        data = ("\n".join(lines) + "\n").encode("utf-8")
        (work / "corpus" / name).write_bytes(data)
        written += len(data)

    write("00_base.txt", docs)
    planted_bytes = sum(len(c.encode()) + 1 for c in copies)
    round_ = 1
    while written + planted_bytes < target:
        budget = target - planted_bytes - written
        block, size = [], 0
        for doc in disguise(docs, round_, vocabulary):
            if size >= budget:
                break
            block.append(doc)
            size += len(doc.encode()) + 1
        write(f"10_round_{round_:02d}.txt", block)
        round_ += 1
    write("90_planted.txt", copies)
    manifest = {"size_mb": size_mb, "planted": planted, "bytes": written, "originals": chosen,
                "build_seconds": round(time.perf_counter() - t0, 1)}
    manifest_path.write_text(json.dumps(manifest))
    print(f"built {written / 1e6:.1f} MB in {work / 'corpus'} ({manifest['build_seconds']} s)")
    return manifest


def load() -> str:
    return "load average %.2f %.2f %.2f" % os.getloadavg()


def run_prepare(inputs: list[Path], out: Path, processes: int, backend: str, log: Path | None,
                extra: tuple = ()) -> dict:
    """Run prepare_data.py in a fresh process; wall time, peak RSS of the process tree, its JSON report."""
    report = out.with_suffix(".report.json")
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, str(ROOT / "scripts" / "prepare_data.py"), *map(str, inputs), "-o", str(out),
           "--num-shards", "8", "--processes", str(processes), "--lsh-backend", backend, "--no-progress",
           "--report", str(report), *extra] + (["--log-removed", str(log)] if log else [])
    print(load())
    print("$", " ".join(cmd))
    start = time.perf_counter()
    proc = psutil.Popen(cmd, stdout=subprocess.PIPE, text=True)
    peak = 0
    while proc.poll() is None:
        try:
            tree = [proc] + proc.children(recursive=True)
            peak = max(peak, sum(p.memory_info().rss for p in tree))
        except psutil.Error:
            pass
        time.sleep(0.2)
    wall = time.perf_counter() - start
    output = proc.stdout.read()
    print(output)
    if proc.returncode != 0:
        raise SystemExit(f"prepare_data.py failed with exit code {proc.returncode}")
    print(load())
    result = json.loads(report.read_text())
    result.update(wall=wall, peak_tree_rss=peak,
                  max_single_rss=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
    return result


def jaccard(signer: prep_text.Signer, a: str, b: str) -> float:
    sa = set(signer.shingle_hashes(prep_text.join_lines(prep_text.normalize_lines(a))).tolist())
    sb = set(signer.shingle_hashes(prep_text.join_lines(prep_text.normalize_lines(b))).tolist())
    return len(sa & sb) / max(1, len(sa | sb))


def language(text: str) -> str:
    counts = np.bincount(prep_text.CHAR_CLASS[prep_text.code_points(text)], minlength=8)
    return "zh" if counts[prep_text.CJK] > counts[prep_text.LATIN] / 4 else "en"


def planted_recall(work: Path, manifest: dict, log: Path) -> None:
    copies = (work / "corpus" / "90_planted.txt").read_text(encoding="utf-8").splitlines()
    originals = base_documents()
    steps = {}
    for line in log.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        path, number = record["source"].rsplit(":", 1)
        if path.endswith("90_planted.txt"):
            steps[int(number) - 1] = record["step"]
    dedup_steps = {"exact_duplicate", "near_duplicate_document", "near_duplicate_sentences"}
    signer = prep_text.Signer(128, 0, 5)
    names = ("J >= 0.9", "0.8 <= J < 0.9", "0.7 <= J < 0.8", "J < 0.7")
    buckets = {(lang, name): [0, 0] for lang in ("zh", "en") for name in names}
    found = considered = filtered = 0
    for i, copy in enumerate(copies):
        step = steps.get(i)
        if step is not None and step not in dedup_steps:
            filtered += 1  # a heuristic filter took it: not a de-duplication miss
            continue
        considered += 1
        hit = step is not None
        found += hit
        j = jaccard(signer, copy, originals[manifest["originals"][i]])
        key = (language(copy), next(name for name, low in zip(names, (0.9, 0.8, 0.7, -1.0)) if j >= low))
        buckets[key][0] += hit
        buckets[key][1] += 1
    print(f"planted near-copies: {len(copies):,}; removed by a filter (not counted) {filtered:,}; "
          f"found by de-duplication {found:,} of {considered:,} = {100.0 * found / max(1, considered):.2f}%")
    for (lang, name), (hit, total) in buckets.items():
        if total:
            print(f"  {lang} {name:<15} {hit:>6,} / {total:>6,} = {100.0 * hit / total:6.2f}%")


def false_removals(work: Path, log: Path, threshold: float) -> None:
    """Documents removed as near-duplicates whose Jaccard with the kept document they were matched to is below
    the threshold (and below threshold - 0.05), per language."""
    lines = {}

    def text_at(source: str) -> str:
        path, number = source.rsplit(":", 1)
        if path not in lines:
            lines[path] = Path(path).read_text(encoding="utf-8").splitlines()
        return lines[path][int(number) - 1]

    signer = prep_text.Signer(128, 0, 5)
    counts = {lang: [0, 0, 0] for lang in ("zh", "en")}  # removed, J < t, J < t - 0.05
    for line in log.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if record["step"] != "near_duplicate_document":
            continue
        doc = text_at(record["source"])
        j = jaccard(signer, doc, text_at(record["duplicate_of"]))
        row = counts[language(doc)]
        row[0] += 1
        row[1] += j < threshold
        row[2] += j < threshold - 0.05
    for lang, (n, below, far) in counts.items():
        print(f"  {lang}: {n:,} removed as near-duplicate documents; Jaccard with the matched kept document "
              f"< {threshold}: {below:,}; < {threshold - 0.05:.2f}: {far:,}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--size-mb", type=float, default=200.0, help="corpus size (default 200)")
    p.add_argument("--baseline-mb", type=float, default=50.0,
                   help="slice on which both LSH backends run side by side; 0 skips the baseline (default 50)")
    p.add_argument("--planted", type=int, default=10000, help="edited near-copies to plant (default 10000)")
    p.add_argument("--processes", type=int, default=2, help="prepare_data.py --processes (default 2)")
    p.add_argument("--work-dir", help="where to build the corpus (kept and reused when given; default: a temp dir)")
    args = p.parse_args()
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="bench_prepare_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        manifest = build(work, args.size_mb, args.planted)
        files = sorted((work / "corpus").iterdir())
        walls = {}
        for mode, extra in (("unchecked", ("--no-candidate-check",)), ("checked", ())):
            log = work / f"removed_{mode}.jsonl"
            full = run_prepare(files, work / f"out_{mode}", args.processes, "compact", log, extra)
            walls[mode] = full["wall"]
            mb = full["input_bytes"] / 1e6
            print(f"== full corpus, compact backend, {mode} candidates: {mb:,.1f} MB, {full['wall']:.1f} s, "
                  f"{mb / full['wall']:.2f} MB/s on {args.processes} processes; peak RSS of the process tree "
                  f"{full['peak_tree_rss'] / 2**20:,.0f} MiB; (largest single process "
                  f"{full['max_single_rss'] / 2**20:,.0f} MiB); index bytes {full['index_bytes']}; candidates "
                  f"checked {full['candidates_checked']:,}, rejected {full['candidates_rejected']:,}")
            planted_recall(work, manifest, log)
            false_removals(work, log, 0.8)
        print(f"== candidate check: time x{walls['checked'] / walls['unchecked']:.2f} of the unchecked run")
        if args.baseline_mb > 0:
            # a prefix of the corpus, cut at a line boundary
            slice_path = work / "slice" / "slice.txt"
            slice_path.parent.mkdir(exist_ok=True)
            budget = int(args.baseline_mb * 1e6)
            with open(slice_path, "wb") as dst:
                for path in files:
                    data = path.read_bytes()
                    if len(data) >= budget:
                        dst.write(data[:budget].rsplit(b"\n", 1)[0] + b"\n")
                        break
                    dst.write(data)
                    budget -= len(data)
            rows = {}
            for backend in ("compact", "datasketch"):
                rows[backend] = run_prepare([slice_path], work / f"out_{backend}", args.processes, backend, None)
            same = all((work / "out_compact" / n).read_bytes() == (work / "out_datasketch" / n).read_bytes()
                       for n in sorted(os.listdir(work / "out_compact")))
            c, d = rows["compact"], rows["datasketch"]
            mb = c["input_bytes"] / 1e6
            print(f"== {mb:.1f} MB slice, {args.processes} processes: backend | MB/s | peak tree RSS MiB")
            for name, row in rows.items():
                print(f"  {name:<10} | {mb / row['wall']:6.2f} | {row['peak_tree_rss'] / 2**20:8,.0f}")
            print(f"  ratio compact/datasketch: speed x{d['wall'] / c['wall']:.2f}, "
                  f"peak memory x{c['peak_tree_rss'] / d['peak_tree_rss']:.2f}; identical shards: {same}")
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
