"""Prepare a pretraining corpus for train.py: clean, filter, de-duplicate, shuffle, shard (core: corpus/pipeline.py).

    python scripts/prepare_data.py raw/ --output-dir my_data --world-size 8 --processes 8
"""
import sys

from common import run_cli
from corpus.pipeline import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
