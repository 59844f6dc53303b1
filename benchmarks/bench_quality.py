"""Benchmark the quality scorers: separation of planted poor text from clean held-out text, and throughput.

Clean units: held-out units (corpus.quality_training.held_out: never trained on) of ../shared/data/corpus, cut
into pieces of at most 400 characters as in training, --units per language drawn with a fixed seed. Poor units:
each clean unit corrupted by each kind of corruption in corpus.quality_training.CORRUPTIONS with seed 1000 (the
shipped classifier saw seed 0). Reported per model, language and corruption: ROC AUC of the score separating
clean from corrupted (1.0: every clean unit scores above every corrupted one).

Throughput: scoring MB/s of each model in one process, and prepare_data.py on --slice-mb of the corpus with
--processes 2, without a quality model (with the language-id model and with --language-id script) and with each
model (--quality-level paragraph), side by side.

Usage:
    python benchmarks/bench_quality.py                       # the shipped classifier
    python benchmarks/bench_quality.py --model my.npz --units 300 --slice-mb 5
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from common import REPO_ROOT as ROOT, shared_data_dir
from corpus import quality, quality_training as qt

CORPUS = shared_data_dir() / "corpus"


def held_out_units(lang: str, count: int, seed: int = 1) -> list[str]:
    units = [u for u in qt.read_units(str(CORPUS / lang)) if qt.held_out(u)]
    return random.Random(seed).sample(units, min(count, len(units)))


def auc_table(model: quality.QualityModel, clean: dict[str, list[str]]) -> list[tuple]:
    rows = []
    for lang in model.languages:
        good = model.score(lang, clean[lang])
        for name, corrupt in qt.CORRUPTIONS.items():
            rng = random.Random(1000)
            poor = model.score(lang, [qt.normalized(corrupt(u, lang, rng)) for u in clean[lang]])
            y = np.r_[np.ones(len(good)), np.zeros(len(poor))]
            rows.append((lang, name, len(good), float(roc_auc_score(y, np.r_[good, poor]))))
    return rows


def prepare(inputs: list[Path], out: Path, extra: list[str]) -> tuple[float, dict]:
    report = out.with_suffix(".json")
    cmd = [sys.executable, str(ROOT / "scripts" / "prepare_data.py"), *map(str, inputs), "-o", str(out),
           "--num-shards", "2", "--processes", "2", "--no-progress", "--report", str(report), *extra]
    print("$", " ".join(cmd))
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start, json.loads(report.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", help="model file or name, repeatable (default: the shipped "
                                                    "classifier, 'default')")
    p.add_argument("--units", type=int, default=500, help="held-out clean units per language (default 500)")
    p.add_argument("--slice-mb", type=float, default=5.0, help="corpus slice for prepare_data.py; 0 skips (default 5)")
    args = p.parse_args()
    if not CORPUS.exists():
        raise SystemExit(f"corpus not found at {CORPUS} (set BAICHUAN_SHARED_DATA or lay ../shared beside the repo)")
    names = args.model or ["default"]
    clean = {lang: held_out_units(lang, args.units) for lang in ("zh", "en")}
    for name in names:
        model = quality.QualityModel.load(name)
        print(f"== {model.path} ({model.kind}): ROC AUC, clean held-out units against corrupted copies")
        print(f"  {'lang':<4} {'corruption':<12} {'units':>6} {'AUC':>7}")
        for lang, corruption, n, auc in auc_table(model, clean):
            print(f"  {lang:<4} {corruption:<12} {n:>6} {auc:7.4f}{'' if auc >= 0.9 else '  < 0.9'}")
        for lang in model.languages:
            data = clean[lang] * 4
            mb = sum(len(u.encode()) for u in data) / 1e6
            start = time.perf_counter()
            model.score(lang, data)
            print(f"  scoring {lang}: {mb / (time.perf_counter() - start):.2f} MB/s in one process")
    if args.slice_mb > 0:
        work = Path(tempfile.mkdtemp(prefix="bench_quality_"))
        try:
            slice_path = work / "slice.txt"
            per_lang = int(args.slice_mb * 1e6 / 2)
            with open(slice_path, "wb") as dst:
                for lang in ("zh", "en"):
                    budget = per_lang
                    for path in sorted((CORPUS / lang).rglob("*.txt")):
                        data = path.read_bytes()[:budget]
                        data = data.rsplit(b"\n", 1)[0] + b"\n"
                        dst.write(data)
                        budget -= len(data)
                        if budget <= 1000:
                            break
            mb = slice_path.stat().st_size / 1e6
            rows = [("no quality model", *prepare([slice_path], work / "out_none", [])),
                    ("(--language-id script)", *prepare([slice_path], work / "out_script", ["--language-id", "script"]))]
            for k, name in enumerate(names):
                rows.append((Path(name).name, *prepare([slice_path], work / f"out_{k}",
                                                       ["--quality-model", name, "--quality-level", "paragraph"])))
            print(f"== prepare_data.py on {mb:.1f} MB, 2 processes: model | s | MB/s | x time | chars removed by "
                  "quality")
            base = rows[0][1]
            for name, seconds, report in rows:
                removed = report["removed_characters"].get("quality", 0)
                print(f"  {name:<18} {seconds:7.1f} {mb / seconds:6.2f} {seconds / base:6.2f} "
                      f"{100.0 * removed / max(1, report['characters_in']):6.2f}%")
        finally:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
