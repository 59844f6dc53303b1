"""Plot training curves (loss, and tokens/s per device) from train.py's metrics.jsonl of one or more runs as a PNG.

    python scripts/plot_loss.py checkpoints -o loss.png
    python scripts/plot_loss.py runs/a/metrics.jsonl runs/b/metrics.jsonl --smooth 50 --x tokens -o loss.png

Each argument is a metrics.jsonl or the folder holding one (train.py's --checkpoint_saving_path); a run is
labelled with that folder's name unless --labels says otherwise. The top panel is the loss against the step
(``--x tokens``: against training tokens in billions, as the reference's published loss figure; tokens per step
come from the run_config.json beside the metrics), drawn faintly as logged and, with ``--smooth N``, boldly as a
moving average of N points; the bottom panel is tokens/s per device. A line that is not a JSON object with
numeric "step" and "loss" stops the script with the file and line number.
"""
import argparse
import json
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on training machines
import matplotlib.pyplot as plt  # noqa: E402
from common import HelpFormatter


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("runs", nargs="+", help="metrics.jsonl files, or folders holding one")
    p.add_argument("-o", "--output", default="loss.png", help="PNG file to write")
    p.add_argument("--labels", default=None, help="comma-separated legend labels, one per run")
    p.add_argument("--smooth", type=int, default=0, help="moving-average window in logged points (0 = off)")
    p.add_argument("--x", choices=["step", "tokens"], default="step",
                   help="x axis: optimizer step, or training tokens (needs run_config.json beside the metrics)")
    p.add_argument("--title", default="Training loss", help="figure title")
    p.add_argument("--logy", action="store_true", help="log-scale loss axis")
    args = p.parse_args(argv)
    if args.smooth < 0:
        p.error("--smooth must be >= 0")
    return args


def metrics_path(run: str) -> Path:
    path = Path(run)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such metrics file")
    return path


def _number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_metrics(path: Path):
    """Records sorted by step; a step logged twice keeps its last record (the run was resumed)."""
    by_step = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {number}: not valid JSON ({e})") from e
            if not isinstance(record, dict) or not _number(record.get("step")) or not _number(record.get("loss")):
                raise ValueError(f"{path}, line {number}: expected an object with numeric 'step' and 'loss', "
                                 f"got {line.strip()[:120]!r}")
            by_step[record["step"]] = record
    if not by_step:
        raise ValueError(f"{path}: no records (empty metrics file)")
    return [by_step[s] for s in sorted(by_step)]


def tokens_per_step(metrics: Path) -> int:
    """Global batch tokens: micro-batch x accumulation x ranks x max_length, from train.py's run_config.json."""
    path = metrics.parent / "run_config.json"
    if not path.is_file():
        raise FileNotFoundError(f"--x tokens: {path} is missing (written by train.py beside metrics.jsonl)")
    run = json.loads(path.read_text(encoding="utf-8"))
    ds = run["deepspeed"]
    return (ds.get("train_micro_batch_size_per_gpu", 1) * ds.get("gradient_accumulation_steps", 1)
            * run["world_size"] * run["args"]["max_length"])


def moving_average(values, window: int):
    """Means of every full window of `values` (len(values) - window + 1 of them): a partial window at the start
    would draw a mean of a few noisy points as if it were as smooth as the rest."""
    if window > len(values):
        raise ValueError(f"--smooth {window} is larger than the {len(values)} logged point(s); use at most "
                         f"{len(values)}")
    out, total = [], sum(values[:window - 1])
    for i in range(window - 1, len(values)):
        total += values[i]
        out.append(total / window)
        total -= values[i - window + 1]
    return out


def plot(runs, output, labels=None, smooth: int = 0, x: str = "step", title: str = "Training loss",
         logy: bool = False):
    """Draw the runs and write `output`; returns the matplotlib Figure (two Axes: loss, tokens/s)."""
    paths = [metrics_path(r) for r in runs]
    if labels is not None and len(labels) != len(paths):
        raise ValueError(f"--labels names {len(labels)} run(s) but {len(paths)} were given")
    labels = labels or [p.parent.name or str(p) for p in paths]
    fig, (ax_loss, ax_speed) = plt.subplots(2, 1, figsize=(9, 7), sharex=True, height_ratios=[3, 1])
    for path, label in zip(paths, labels):
        records = read_metrics(path)
        steps = [r["step"] for r in records]
        xs = [s * tokens_per_step(path) / 1e9 for s in steps] if x == "tokens" else steps
        loss = [r["loss"] for r in records]
        if smooth > 1:
            raw, = ax_loss.plot(xs, loss, alpha=0.25, linewidth=0.8)
            ax_loss.plot(xs[smooth - 1:], moving_average(loss, smooth), color=raw.get_color(), linewidth=1.6,
                         label=f"{label} (mean of {smooth})")
            color = raw.get_color()
        else:
            color = ax_loss.plot(xs, loss, linewidth=1.2, label=label)[0].get_color()
        speed = [(xv, r["tokens_per_sec"]) for xv, r in zip(xs, records) if _number(r.get("tokens_per_sec"))]
        if speed:
            ax_speed.plot(*zip(*speed), color=color, linewidth=1.0, label=label)
    ax_loss.set_title(title)
    ax_loss.set_ylabel("loss")
    if logy:
        ax_loss.set_yscale("log")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend()
    ax_speed.set_ylabel("tokens/s per device")
    ax_speed.set_xlabel("tokens (billions)" if x == "tokens" else "step")
    ax_speed.grid(alpha=0.3)
    fig.tight_layout()
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=120)
    return fig


def main(argv=None):
    args = parse_args(argv)
    labels = [s.strip() for s in args.labels.split(",")] if args.labels else None
    try:
        fig = plot(args.runs, args.output, labels, args.smooth, args.x, args.title, args.logy)
    except (OSError, ValueError, KeyError) as e:
        sys.exit(f"plot_loss: error: {e}")
    plt.close(fig)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
