"""Tokenize a corpus into the token cache train.py reads, once, on a CPU job: training then only maps it.

    python scripts/tokenize_data.py --data_dir data_dir --cache_dir /shared/cache --num_workers 32

Builds exactly the entries train.py would (same keys: file content, tokenizer, line rules), in parallel, with a
progress bar, and prints a summary (files, tokens, bytes, tokens/s). Files already cached are only looked up.
A --data_mix file is checked against data_dir too, so its mistakes show here rather than at training start.
"""
import sys

from common import run_cli
from data.offline import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
