"""Alias kept for earlier commands: the training benchmark lives in benchmarks/benchmark_train.py."""
import runpy
from pathlib import Path

if __name__ == "__main__":
    runpy.run_path(str(Path(__file__).resolve().parents[1] / "benchmarks" / "benchmark_train.py"), run_name="__main__")
