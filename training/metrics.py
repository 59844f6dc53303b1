"""metrics.jsonl and TensorBoard: one record per logging window, each figure for the step or window it belongs to.

The names and their meaning are in docs/metrics.md; the same name is used in metrics.jsonl and TensorBoard.
"""
import json
import math
from pathlib import Path

from common import write_atomic


class MetricsLog:
    """Rank 0 writes; every other rank's calls do nothing, so the loop calls it without asking who it is."""

    def __init__(self, save_dir: Path, rank: int, monitor=None):
        self.path = Path(save_dir) / "metrics.jsonl"
        self.rank, self.monitor = rank, monitor

    def truncate_after(self, step: int) -> None:
        """On resume: records after the checkpoint belong to steps the killed run lost; they are trained again."""
        if self.rank != 0 or not self.path.exists():
            return
        kept = [line for line in self.path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line)["step"] <= step]
        write_atomic(self.path, "".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        """Append `record` (which has "step") to metrics.jsonl, print it and send its finite numbers to
        TensorBoard under the same names."""
        if self.rank != 0:
            return
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()
                       if k != "time"), flush=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.monitor is not None and self.monitor.enabled:
            # One level of dicts becomes name/key curves (tokens_by_source/<source>).
            flat = {f"{k}/{sub}" if isinstance(v, dict) else k: x for k, v in record.items()
                    for sub, x in (v.items() if isinstance(v, dict) else [(None, v)])}
            self.monitor.write_events([(k, float(v), record["step"]) for k, v in flat.items()
                                       if k not in ("step", "time") and isinstance(v, (int, float))
                                       and not isinstance(v, bool) and math.isfinite(v)])
