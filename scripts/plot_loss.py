"""Plot training curves (loss, and tokens/s per device) from train.py's metrics.jsonl of one or more runs as a PNG.

    python scripts/plot_loss.py checkpoints -o loss.png
    python scripts/plot_loss.py runs/a/metrics.jsonl runs/b/metrics.jsonl --smooth 50 --x tokens -o loss.png

Each argument is a metrics.jsonl or the folder holding one (train.py's --checkpoint_saving_path); a run is
labelled with that folder's name unless --labels says otherwise. The top panel is the loss against the step
(``--x tokens``: against training tokens in billions, as the reference's published loss figure; tokens per step
come from the run_config.json beside the metrics), drawn faintly as logged and, with ``--smooth N``, boldly as a
moving average of N points. The validation loss (``val_loss`` records, train.py's ``--val_dir`` or
``--val_fraction``) is drawn on the same panel with markers, and benchmark accuracies (``eval/<task>/acc``)
get a panel of their own when a run has them. The bottom panel is tokens/s per device. A line that is not a
JSON object with a numeric "step" and a numeric "loss", "val_loss" or "eval/<task>/acc" stops the script with
the file and line number (docs/metrics.md describes the records).
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


def record_kind(record: dict):
    """"train" (has loss), "val" (val_loss), "eval" (eval/<task>/acc) or None."""
    if _number(record.get("loss")):
        return "train"
    if _number(record.get("val_loss")):
        return "val"
    if any(k.startswith("eval/") and k.endswith("/acc") and _number(v) for k, v in record.items()):
        return "eval"
    return None


def read_metrics(path: Path, kind: str = "train"):
    """Records of `kind` sorted by step; a step logged twice keeps its last record (the run was resumed)."""
    by_step, any_record = {}, False
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {number}: not valid JSON ({e})") from e
            if not isinstance(record, dict) or not _number(record.get("step")) or record_kind(record) is None:
                raise ValueError(f"{path}, line {number}: expected an object with numeric 'step' and 'loss' (or "
                                 f"'val_loss', 'eval/<task>/acc'), got {line.strip()[:120]!r}")
            any_record = True
            if record_kind(record) == kind:
                by_step[record["step"]] = record
    if not any_record:
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
    """Draw the runs and write `output`; returns the matplotlib Figure (Axes: loss, then benchmark accuracy
    when a run has it, then tokens/s)."""
    paths = [metrics_path(r) for r in runs]
    if labels is not None and len(labels) != len(paths):
        raise ValueError(f"--labels names {len(labels)} run(s) but {len(paths)} were given")
    labels = labels or [p.parent.name or str(p) for p in paths]
    evals = [read_metrics(p, "eval") for p in paths]
    if any(evals):
        fig, (ax_loss, ax_eval, ax_speed) = plt.subplots(3, 1, figsize=(9, 9), sharex=True,
                                                         height_ratios=[3, 2, 1])
    else:
        fig, (ax_loss, ax_speed) = plt.subplots(2, 1, figsize=(9, 7), sharex=True, height_ratios=[3, 1])
    for path, label, eval_records in zip(paths, labels, evals):
        records = read_metrics(path)
        scale = tokens_per_step(path) / 1e9 if x == "tokens" else 1
        steps = [r["step"] for r in records]
        xs = [s * scale for s in steps]
        loss = [r["loss"] for r in records]
        if smooth > 1:
            raw, = ax_loss.plot(xs, loss, alpha=0.25, linewidth=0.8)
            ax_loss.plot(xs[smooth - 1:], moving_average(loss, smooth), color=raw.get_color(), linewidth=1.6,
                         label=f"{label} (mean of {smooth})")
            color = raw.get_color()
        else:
            color = ax_loss.plot(xs, loss, linewidth=1.2, label=label)[0].get_color()
        val = read_metrics(path, "val")
        if val:
            ax_loss.plot([r["step"] * scale for r in val], [r["val_loss"] for r in val], color=color,
                         linestyle="--", marker="o", markersize=3, linewidth=1.2, label=f"{label} validation")
        tasks = sorted({k for r in eval_records for k in r if k.startswith("eval/") and k.endswith("/acc")})
        for task, style in zip(tasks, ["-", "--", ":", "-."] * len(tasks)):
            points = [(r["step"] * scale, r[task]) for r in eval_records if _number(r.get(task))]
            ax_eval.plot(*zip(*points), color=color, linestyle=style, marker="o", markersize=3,
                         label=f"{label} {task.split('/')[1]}")
        speed = [(xv, r["tokens_per_sec"]) for xv, r in zip(xs, records) if _number(r.get("tokens_per_sec"))]
        if speed:
            ax_speed.plot(*zip(*speed), color=color, linewidth=1.0, label=label)
    ax_loss.set_title(title)
    ax_loss.set_ylabel("loss")
    if logy:
        ax_loss.set_yscale("log")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend()
    if any(evals):
        ax_eval.set_ylabel("benchmark accuracy")
        ax_eval.grid(alpha=0.3)
        ax_eval.legend()
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
