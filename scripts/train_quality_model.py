"""Train a quality model (n-gram perplexity or linear classifier) for prepare_data.py --quality-model
(core: corpus/quality_training.py).

    python scripts/train_quality_model.py --kind classifier -o my_quality.npz \
        --reference zh=../shared/data/corpus/zh --reference en=../shared/data/corpus/en
"""
import sys

from common import run_cli
from corpus.quality_training import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
