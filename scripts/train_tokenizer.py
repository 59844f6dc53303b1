"""Train a SentencePiece tokenizer with the released baichuan-7B conventions (core: corpus/tokenizer_training.py).

    python scripts/train_tokenizer.py --corpus ../shared/data/corpus --output tokenizer.model
"""
import sys

from common import run_cli
from corpus.tokenizer_training import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
