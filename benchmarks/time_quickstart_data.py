"""Time the quick start's data loading: the shipped data_dir with scripts/train.sh's settings (micro-batch 4,
256 tokens, 2 x 4 samples a step), cold cache then warm, in one process as train.py builds it.

    python benchmarks/time_quickstart_data.py
"""
import tempfile
import time

t0 = time.perf_counter()
from data import make_engine  # noqa: E402 - its import time is part of what is measured

import_seconds = time.perf_counter() - t0


def main():
    with tempfile.TemporaryDirectory() as cache:
        for label in ("cold cache (tokenizes)", "warm cache (maps)"):
            start = time.perf_counter()
            engine = make_engine("global", data_dir="data_dir", tokenizer_path="tokenizer.model",
                                 micro_batch_size=4, max_length=256, global_batch_size=8, num_batches=100,
                                 world_size=1, rank=0, seed=42, cache_dir=cache, show_progress=False)
            engine.load_data()
            batch = engine.get_data()
            print(f"{label}: {time.perf_counter() - start:.2f} s to the first batch {tuple(batch.shape)}")
    print(f"import of the data package: {import_seconds:.2f} s")


if __name__ == "__main__":
    main()
