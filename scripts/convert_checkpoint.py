"""Export a DeepSpeed checkpoint written by train.py as a Hugging Face model folder (core: checkpoint/export.py).

    python scripts/convert_checkpoint.py checkpoints out/baichuan-7b-step2000 --tag step2000
    python scripts/convert_checkpoint.py checkpoints out/latest-fp32 --dtype fp32      # the tag `latest` names
"""
from checkpoint.export import main
from common import run_cli

if __name__ == "__main__":
    run_cli(main)
