"""Offline tokenization (scripts/tokenize_data.py): tokenize a corpus into the token cache train.py reads,
once, on a CPU job; training then only maps it.

    python scripts/tokenize_data.py --data_dir data_dir --cache_dir /shared/cache --num_workers 32

Builds exactly the entries train.py would (same keys: file content, tokenizer, line rules), in parallel, with a
progress bar, and prints a summary (files, tokens, bytes, tokens/s). Files already cached are only looked up.
A --data_mix file is checked against data_dir too, so its mistakes show here rather than at training start.
"""
import argparse
import time
from pathlib import Path

from common import HelpFormatter

from .cache import MAX_BAD_LINE_FRACTION, TokenCache, resolve_cache_dir
from .sources import list_data_files, read_mixture


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--data_dir", required=True, help="folder of UTF-8 text files, one document per line")
    p.add_argument("--tokenizer_path", default="tokenizer.model", help="SentencePiece model")
    p.add_argument("--cache_dir", default=None, help="cache folder (default: <data_dir>/.cache, as train.py)")
    p.add_argument("--num_workers", type=int, default=None, help="tokenizer processes (default: all CPU cores)")
    p.add_argument("--data_mix", default=None, help="a --data_mix JSON file to check against data_dir")
    p.add_argument("--max_bad_line_fraction", type=float, default=MAX_BAD_LINE_FRACTION,
                   help="refuse a file with NUL bytes or more undecodable lines than this")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    data_dir = Path(args.data_dir)
    if not data_dir.is_dir():
        raise SystemExit(f"--data_dir {data_dir}: not a folder")
    cache_dir = resolve_cache_dir(args.cache_dir, data_dir)
    if cache_dir is None:
        raise SystemExit("no writable cache folder: pass --cache_dir")
    cache = TokenCache(cache_dir, args.tokenizer_path, num_workers=args.num_workers,
                       max_bad_line_fraction=args.max_bad_line_fraction)
    files = list_data_files(data_dir, exclude=[cache_dir])
    if not files:
        raise SystemExit(f"no data files in {data_dir}")
    if args.data_mix:
        sources, _ = read_mixture(args.data_mix, data_dir, files)
        print(f"--data_mix {args.data_mix}: " + ", ".join(f"{s.name} ({len(s.files)} files)" for s in sources))
    t0 = time.perf_counter()
    entries, cached = cache.load(files, show_progress=True)
    seconds = time.perf_counter() - t0
    tokens = sum(len(e) for e in entries)
    new_tokens = sum(len(e) for e in entries if e.verified and e.bin_path is not None)
    text_bytes = sum(p.stat().st_size for p in files)
    stats = [e.stats for e in entries]
    print(f"{len(files)} files ({cached} already cached), {text_bytes / 1e6:.1f} MB of text, "
          f"{sum(s['lines'] for s in stats)} lines ({sum(s['short'] for s in stats)} under "
          f"{cache.min_line_tokens} tokens dropped, {sum(s['bad'] for s in stats)} with undecodable bytes replaced), "
          f"{tokens} tokens ({tokens * cache.token_dtype.itemsize / 1e6:.1f} MB in {cache_dir}); "
          f"{seconds:.1f}s, {new_tokens / max(seconds, 1e-9):,.0f} tokens/s tokenized")
    empty = [str(p) for p, s in zip(files, stats) if s["kept"] == 0]
    if empty:
        print(f"warning: no usable line in {len(empty)} file(s), which train.py refuses: {empty[:5]}")
        return 1
    return 0
