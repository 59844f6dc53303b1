"""Perplexity by position on long documents, within and past the training length (the baichuan-7B README figure).

For each model (a Hugging Face folder, or a train.py checkpoint folder exported on the fly), each RoPE scaling
variant (``--rope_scaling none linear:4 dynamic:4``), each mode and each evaluation length L, the mean token loss
and perplexity in position buckets of ``--bucket`` tokens. The position of a loss is the index of the token it
predicts in the document (its context is that many tokens), so bucket [0, 256) holds targets 1..255.

Modes:

* ``whole``: one forward of the document's first L tokens, as in the baichuan-7B figure. Attention is causal, so
  with plain or linear-scaled RoPE the loss at a position does not depend on L: a document runs once at the
  largest length it reaches and serves every shorter length. Dynamic NTK sets the rotary base from the length,
  so there every length is its own forward.
* ``sliding``: the standard perplexity of a text longer than the window: windows of ``--window`` tokens (default
  the model's ``max_position_embeddings``) end at W, W + stride, ... and finally L; each scores only the tokens
  that no earlier window scored, so every token past the first window has at least W - stride tokens of context.

A document shorter than L is skipped at that length and counted (``skipped``). A length (or window) past the
model's ``max_position_embeddings`` is what the curve measures: it is allowed and marked ``extrapolation``.

Memory: the vocabulary projection runs over ``--loss_chunk`` tokens at a time, so [tokens, vocab] logits never
exist whole. Outputs in ``--output_dir``: ``ppl.json``, ``ppl.csv``, ``ppl.png`` and a table on stdout.

    python -m evaluation.evaluate_ppl --model out/tiny256 --data ../shared/data/corpus/en/gutenberg \\
        --lengths 256 512 1024 --rope_scaling none linear:4 dynamic:4 --output_dir results/ppl
    python -m evaluation.evaluate_ppl --model checkpoints --tag step2000 --data held_out/ --unit line
"""
import argparse
import csv
import json
import math
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

MODES = ("whole", "sliding")
# RoPE types whose frequencies do not depend on the sequence length: a longer forward serves shorter lengths.
LENGTH_FREE_ROPE = (None, "default", "linear")


class PplError(ValueError):
    """Bad input to the perplexity evaluation; the message names the file, flag or value."""


# ---------------------------------------------------------------------------------------------------
# Documents
# ---------------------------------------------------------------------------------------------------

def list_text_files(paths: Sequence[str]) -> List[Path]:
    """The .txt files named, or found (recursively, sorted) under the folders named."""
    files = []
    for given in paths:
        path = Path(given)
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*.txt") if p.is_file() and not p.name.startswith("."))
            if not found:
                raise PplError(f"--data {path}: folder holds no .txt file")
            files.extend(found)
        else:
            raise PplError(f"--data {path}: no such file or folder")
    return files


def read_documents(files: Sequence[Path], unit: str = "file") -> List[tuple]:
    """(name, text) pairs: one per file (a book), or one per non-empty line (``unit='line'``, the one-document-
    per-line layout of train.py's data and held-out folders)."""
    docs = []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise PplError(f"{path}: not UTF-8 text ({e})") from e
        if "\x00" in text:
            raise PplError(f"{path}: holds NUL bytes; a binary file, not text")
        if not text.strip():
            raise PplError(f"{path}: empty file (no text to evaluate)")
        if unit == "file":
            docs.append((str(path), text))
        else:
            docs.extend((f"{path}:{i + 1}", line) for i, line in enumerate(text.splitlines()) if line.strip())
    return docs


def held_out_documents(run_dir: Path) -> List[tuple]:
    """(name, text) of the documents a train.py run held out, from its run_config.json: the lines of its
    ``--val_dir``, or for ``--val_fraction F`` the lines of its ``--data_dir`` that the data path holds out
    (data.cache.held_out_lines: the split training used, so the two cannot drift apart)."""
    run_config = run_dir / "run_config.json"
    if not run_config.is_file():
        raise PplError(f"--held_out {run_dir}: no run_config.json (not a train.py --checkpoint_saving_path)")
    try:
        recorded = json.loads(run_config.read_text(encoding="utf-8"))["args"]
    except (ValueError, KeyError, TypeError) as e:
        raise PplError(f"{run_config}: not a train.py run config ({e})") from e
    if recorded.get("val_dir"):
        return read_documents(list_text_files([str(_recorded_folder(run_config, "val_dir", recorded))]), "line")
    fraction = recorded.get("val_fraction")
    if not fraction:
        raise PplError(f"{run_config} records neither --val_dir nor --val_fraction: the run held no text out; "
                       "pass held-out text with --data")
    from data.cache import held_out_lines
    from data.sources import list_data_files

    data_dir = _recorded_folder(run_config, "data_dir", recorded)
    # The files validation read: all of --data_dir but its token cache (a hidden .cache unless --cache_dir).
    exclude = [_recorded_folder(run_config, "cache_dir", recorded)] if recorded.get("cache_dir") else []
    docs = []
    for path in list_data_files(data_dir, exclude=[p for p in exclude if p is not None]):
        raw = path.read_bytes()
        if b"\x00" in raw:
            raise PplError(f"{path}: holds NUL bytes; a binary file, not text")
        docs.extend((f"{path}:{i + 1}", text) for i, text in held_out_lines(raw, float(fraction)))
    if not docs:
        raise PplError(f"{run_config}: --val_fraction {fraction} holds out no non-empty line of --data_dir {data_dir}")
    return docs


def _recorded_folder(run_config: Path, flag: str, recorded: dict) -> Optional[Path]:
    """The folder a run recorded for --<flag>. train.py records the path as given, usually relative to the
    repository root it was launched from. A missing --cache_dir is None (nothing to leave out); others are an error."""
    from common import REPO_ROOT

    given = recorded[flag]
    for path in (Path(given), REPO_ROOT / given):
        if path.is_dir():
            return path
    if flag == "cache_dir":
        return None
    raise PplError(f"{run_config} records --{flag} {given!r}, which is not a folder from here or from {REPO_ROOT}")


def tokenize_prefix(tokenizer, text: str, need: int) -> List[int]:
    """BOS + the token ids of the document's start, at least ``need`` of them when the text has that many.

    A book is tokenized only as far as the longest evaluation length needs, growing the character span
    until it yields enough tokens (a 1 MB book costs what its first few thousand tokens cost)."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    span = max(4 * need, 1024)
    while True:
        ids = bos + tokenizer.encode(text[:span], add_special_tokens=False)
        # The last token of a cut span may be a piece of a longer one, so keep a margin before trusting it.
        if span >= len(text):
            return ids
        if len(ids) > need + 16:
            return ids[:need]
        span *= 2


# ---------------------------------------------------------------------------------------------------
# Per-token losses, memory bounded in the vocabulary
# ---------------------------------------------------------------------------------------------------

@torch.inference_mode()
def token_losses(model, ids: torch.Tensor, loss_chunk: int = 1024) -> torch.Tensor:
    """Cross-entropy of predicting ids[:, 1:], fp32 [b, s-1], projecting ``loss_chunk`` tokens at a time.

    Runs the decoder without the head (``get_decoder()``, LlamaForCausalLM's and ours) and applies the output
    embeddings chunk by chunk, so peak extra memory is [loss_chunk, vocab] fp32, not [b, s, vocab]."""
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state[:, :-1]  # [b, s-1, h]
    targets = ids[:, 1:]  # [b, s-1]
    b, n = targets.shape
    rows = max(1, loss_chunk // b)  # positions per chunk, all rows at once
    out = torch.empty((b, n), dtype=torch.float32, device=ids.device)
    for i in range(0, n, rows):
        logits = head(hidden[:, i:i + rows]).float()  # [b, c, vocab]
        out[:, i:i + rows] = F.cross_entropy(logits.transpose(1, 2), targets[:, i:i + rows], reduction="none")
    return out


# ---------------------------------------------------------------------------------------------------
# Curves
# ---------------------------------------------------------------------------------------------------

@dataclass
class Curve:
    """Loss sums by position bucket for one (mode, length)."""
    mode: str
    length: int
    window: int
    stride: Optional[int]
    bucket: int
    documents: int = 0
    skipped: int = 0

    def __post_init__(self):
        n = math.ceil(self.length / self.bucket)
        self.loss_sum = np.zeros(n, dtype=np.float64)
        self.tokens = np.zeros(n, dtype=np.int64)

    def add(self, positions: np.ndarray, losses: np.ndarray):
        """Losses of the tokens at document ``positions`` (the index of the predicted token)."""
        idx = positions // self.bucket
        np.add.at(self.loss_sum, idx, losses)
        np.add.at(self.tokens, idx, 1)

    def summary(self) -> Dict:
        total = int(self.tokens.sum())
        loss = float(self.loss_sum.sum() / total) if total else None
        buckets = []
        for i, (s, t) in enumerate(zip(self.loss_sum, self.tokens)):
            mean = float(s / t) if t else None
            buckets.append({"start": i * self.bucket, "end": min((i + 1) * self.bucket, self.length),
                            "tokens": int(t), "loss": mean, "ppl": math.exp(mean) if t else None})
        return {"mode": self.mode, "length": self.length, "window": self.window, "stride": self.stride,
                "documents": self.documents, "skipped": self.skipped, "tokens": total, "loss": loss,
                "ppl": math.exp(loss) if loss is not None else None, "buckets": buckets}


def sliding_windows(length: int, window: int, stride: int) -> List[tuple]:
    """(start, end, first scored target) of each window over a span of ``length`` tokens; every window holds
    exactly ``window`` tokens (one rotary base per window under dynamic scaling, and windows batch together)."""
    if length <= window:
        return [(0, length, 1)]
    ends = list(range(window, length, stride)) + [length]
    spans, scored = [], window
    for i, end in enumerate(ends):
        spans.append((end - window, end, 1 if i == 0 else scored))
        scored = end
    return spans


def evaluate_model(model, docs: Sequence[Sequence[int]], lengths: Sequence[int], modes: Sequence[str],
                   bucket: int = 256, window: Optional[int] = None, stride: Optional[int] = None,
                   batch_size: int = 1, loss_chunk: int = 1024, progress=None) -> List[Curve]:
    """The curves of one model over token-id documents (BOS included), one per (mode, length).

    ``window``/``stride`` are the sliding mode's (default: max_position_embeddings and half of it)."""
    device = model.get_input_embeddings().weight.device
    max_pos = model.config.max_position_embeddings
    scaling = getattr(model.config, "rope_scaling", None) or {}
    length_free = scaling.get("rope_type", scaling.get("type")) in LENGTH_FREE_ROPE
    window = window or max_pos
    stride = stride or max(1, window // 2)
    lengths = sorted(set(lengths))
    curves = []

    def run(rows: List[List[int]]) -> np.ndarray:
        """Losses [len(rows), s-1] of equal-length rows, ``batch_size`` rows per forward."""
        out = []
        for i in range(0, len(rows), batch_size):
            ids = torch.tensor(rows[i:i + batch_size], dtype=torch.long, device=device)  # [b, s]
            out.append(token_losses(model, ids, loss_chunk).cpu().numpy())
            if progress is not None:
                progress.update(ids.numel())
        return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)

    # Whole mode: (forward length, the lengths it serves, documents); a document runs at the largest length it
    # reaches when the loss at a position does not depend on the length.
    plan = []
    for k, L in enumerate(lengths if "whole" in modes else []):
        if length_free:
            top = [i for i, d in enumerate(docs) if len(d) >= L and (k + 1 == len(lengths)
                                                                      or len(d) < lengths[k + 1])]
            plan.append((L, lengths[:k + 1], top))
        else:
            plan.append((L, [L], [i for i, d in enumerate(docs) if len(d) >= L]))
    slides = {L: sliding_windows(L, window, stride) for L in (lengths if "sliding" in modes else [])}
    if progress is not None:  # tokens through the model
        progress.reset(total=sum(L * len(members) for L, _, members in plan)
                       + sum(sum(len(d) >= L for d in docs) * sum(b - a for a, b, _ in spans)
                             for L, spans in slides.items()))

    if "whole" in modes:
        by_length = {L: Curve("whole", L, L, None, bucket) for L in lengths}
        for L in lengths:
            by_length[L].documents = sum(len(d) >= L for d in docs)
            by_length[L].skipped = len(docs) - by_length[L].documents
        for L, serves, members in plan:
            losses = run([list(docs[i][:L]) for i in members])  # [docs, L-1]
            for row in losses:
                for served in serves:
                    by_length[served].add(np.arange(1, served), row[:served - 1])
        curves.extend(by_length[L] for L in lengths)

    if "sliding" in modes:
        for L in lengths:
            curve = Curve("sliding", L, min(window, L), stride if L > window else None, bucket)
            members = [d for d in docs if len(d) >= L]
            curve.documents, curve.skipped = len(members), len(docs) - len(members)
            spans = slides[L]
            rows = [list(d[a:b]) for d in members for a, b, _ in spans]
            losses = run(rows)  # [docs * windows, window-1]
            for r, row in enumerate(losses):
                a, b, first = spans[r % len(spans)]
                positions = np.arange(first, b)
                curve.add(positions, row[positions - a - 1])
            curves.append(curve)
    return curves


# ---------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------

def parse_scaling(text: str) -> Optional[dict]:
    """'none' -> None; 'linear:4' / 'dynamic:2.5' -> transformers' rope_scaling dict."""
    if text == "none":
        return None
    kind, _, factor = text.partition(":")
    try:
        value = float(factor)
    except ValueError:
        value = None
    if kind not in ("linear", "dynamic") or value is None or value < 1:
        raise PplError(f"--rope_scaling {text!r}: expected 'none', 'linear:<factor>' or 'dynamic:<factor>' "
                       "with factor >= 1")
    return {"type": kind, "rope_type": kind, "factor": value}


def is_checkpoint_folder(path: Path) -> bool:
    """A train.py --checkpoint_saving_path (DeepSpeed tags), not a Hugging Face model folder."""
    return path.is_dir() and not (path / "config.json").is_file() and (
        (path / "latest").is_file() or (path / "run_config.json").is_file())


def export_checkpoint(path: Path, tag: Optional[str], workdir: Path) -> Path:
    """Export a DeepSpeed checkpoint tag to a temporary fp32 Hugging Face folder through the export path."""
    from checkpoint.export import convert
    return convert(path, workdir / f"{path.name}-{tag or 'latest'}", tag=tag, dtype="fp32")


def load_model(path: str, rope_scaling: Optional[dict], device: str, dtype: torch.dtype,
               trust_remote_code: bool = False):
    """The model (with ``rope_scaling`` set, or the folder's own when None) and its tokenizer.

    A baichuan folder loads with this repository's classes, so no code from the folder runs; any other folder
    (e.g. a Llama) through transformers' Auto classes, its own code only with ``--trust_remote_code``."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise PplError(f"--model {path}: no config.json (not a Hugging Face model folder or train.py checkpoint "
                       "folder)")
    fields = json.loads(config_file.read_text(encoding="utf-8"))
    overrides = {"rope_scaling": rope_scaling} if rope_scaling is not None else {}
    if fields.get("model_type") == "baichuan":
        from models.modeling_baichuan import BaiChuanForCausalLM
        from models.tokenization_baichuan import BaiChuanTokenizer
        model = BaiChuanForCausalLM.from_pretrained(path, dtype=dtype, **overrides)
        tokenizer = BaiChuanTokenizer(vocab_file=str(Path(path) / "tokenizer.model"))
    else:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, **overrides)
        model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype,
                                                     trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    return model.to(device).eval(), tokenizer


def scaling_label(scaling: Optional[dict]) -> str:
    return "none" if not scaling else f"{scaling.get('rope_type', scaling.get('type'))}:{scaling['factor']:g}"


# ---------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------

def write_csv(results: List[Dict], path: Path):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["model", "rope_scaling", "mode", "length", "window", "stride", "extrapolation",
                    "bucket_start", "bucket_end", "tokens", "loss", "ppl"])
        for r in results:
            for b in r["buckets"]:
                w.writerow([r["model"], scaling_label(r["rope_scaling"]), r["mode"], r["length"], r["window"],
                            r["stride"] or "", r["extrapolation"], b["start"], b["end"], b["tokens"],
                            "" if b["loss"] is None else f"{b['loss']:.6f}",
                            "" if b["ppl"] is None else f"{b['ppl']:.4f}"])


def plot(results: List[Dict], path: Path, title: str = ""):
    """One panel per mode; a line per (model, scaling, length); a dashed line at each training length."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in MODES if any(r["mode"] == m for r in results)]
    fig, axes = plt.subplots(1, len(modes), figsize=(6.4 * len(modes), 4.2), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        for r in (r for r in results if r["mode"] == mode):
            pts = [((b["start"] + b["end"]) / 2, b["ppl"]) for b in r["buckets"] if b["ppl"] is not None]
            if not pts:
                continue
            label = f"{r['model']} rope={scaling_label(r['rope_scaling'])} L={r['length']}"
            ax.plot(*zip(*pts), marker=".", label=label)
        for max_pos in sorted({r["max_position_embeddings"] for r in results}):
            ax.axvline(max_pos, color="gray", linestyle="--", linewidth=1)
        ax.set_yscale("log")
        ax.set_xlabel("token position (context length)")
        ax.set_ylabel("perplexity")
        ax.set_title(f"{mode} window" if mode == "whole" else "sliding window")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def print_table(results: List[Dict]):
    head = f"{'model':<20} {'rope':<12} {'mode':<8} {'length':>7} {'docs':>5} {'skip':>5} {'tokens':>9} " \
           f"{'ppl':>10} {'ppl last':>10}"
    print(head)
    print("-" * len(head))
    for r in results:
        last = next((b["ppl"] for b in reversed(r["buckets"]) if b["ppl"] is not None), None)
        fmt = lambda x: f"{x:10.3f}" if x is not None else f"{'-':>10}"  # noqa: E731
        note = "  extrapolation" if r["extrapolation"] else ""
        print(f"{r['model'][:20]:<20} {scaling_label(r['rope_scaling']):<12} {r['mode']:<8} {r['length']:>7} "
              f"{r['documents']:>5} {r['skipped']:>5} {r['tokens']:>9} {fmt(r['ppl'])} {fmt(last)}{note}")


# ---------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", "-m", nargs="+", required=True,
                   help="Hugging Face model folder(s), or train.py --checkpoint_saving_path folder(s) (exported "
                        "to a temporary fp32 folder first); several are drawn in one plot")
    p.add_argument("--tag", default=None, help="checkpoint tag for checkpoint folders (default: `latest`)")
    p.add_argument("--data", "-d", nargs="+", default=[],
                   help=".txt files or folders of them (recursive); a run's held-out folder works as it is")
    p.add_argument("--held_out", default=None,
                   help="a train.py --checkpoint_saving_path: add the documents it held out, one per line: its "
                        "--val_dir, or the --val_fraction share of its --data_dir (text the model never trained on)")
    p.add_argument("--unit", choices=["file", "line"], default="file",
                   help="file: one document per file (books); line: one per non-empty line (train.py's layout) "
                        "(default: %(default)s)")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 6144, 8192],
                   help="evaluation lengths in tokens (default: %(default)s)")
    p.add_argument("--max_eval_length", type=int, default=32768,
                   help="refuse lengths above this, a guard against a typo costing hours (default: %(default)s)")
    p.add_argument("--bucket", type=int, default=256, help="tokens per position bucket (default: %(default)s)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                   help="whole: one forward of L tokens; sliding: windows with a stride (default: both)")
    p.add_argument("--window", type=int, default=None,
                   help="sliding window in tokens (default: the model's max_position_embeddings)")
    p.add_argument("--stride", type=int, default=None, help="sliding stride (default: half the window)")
    p.add_argument("--rope_scaling", nargs="+", default=["none"],
                   help="variants to evaluate each model with: 'none' (the folder's own config), "
                        "'linear:<factor>', 'dynamic:<factor>' (default: %(default)s)")
    p.add_argument("--max_documents", type=int, default=None, help="evaluate only the first N documents")
    p.add_argument("--batch_size", type=int, default=1, help="rows per forward (default: %(default)s)")
    p.add_argument("--loss_chunk", type=int, default=1024,
                   help="tokens per vocabulary projection in the loss (default: %(default)s)")
    p.add_argument("--device", default="auto", help="'auto' (cuda if available), 'cpu', 'cuda:0' ... (default: %(default)s)")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default="auto",
                   help="weights dtype; auto = bfloat16 on GPU, float32 on CPU (losses are fp32 either way)")
    p.add_argument("--trust_remote_code", action="store_true",
                   help="run a non-baichuan folder's own Python code (baichuan folders never need it)")
    p.add_argument("--output_dir", "-o", default="results/ppl", help="where ppl.json/.csv/.png go (default: %(default)s)")
    args = p.parse_args(argv)
    for flag in ("bucket", "batch_size", "loss_chunk", "window", "stride", "max_documents"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            p.error(f"--{flag} must be at least 1, got {value}")
    too_long = [L for L in args.lengths if L > args.max_eval_length]
    if too_long:
        p.error(f"--lengths {too_long} exceed --max_eval_length {args.max_eval_length}")
    if not args.data and not args.held_out:
        p.error("give the documents: --data and/or --held_out")
    if min(args.lengths) < 2:
        p.error(f"--lengths must be at least 2 tokens, got {min(args.lengths)}")
    if args.window is not None and args.window > args.max_eval_length:
        p.error(f"--window {args.window} exceeds --max_eval_length {args.max_eval_length}")
    return args


def run(args) -> List[Dict]:
    from tqdm import tqdm

    scalings = [parse_scaling(s) for s in args.rope_scaling]
    docs_text = read_documents(list_text_files(args.data), args.unit) if args.data else []
    if args.held_out:
        docs_text += held_out_documents(Path(args.held_out))
    docs_text = docs_text[:args.max_documents]
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    dtype = (torch.bfloat16 if device.startswith("cuda") else torch.float32) if args.dtype == "auto" \
        else getattr(torch, args.dtype)
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="ppl-export-") as workdir:
        for given in args.model:
            path, name = Path(given), Path(given).resolve().name
            if is_checkpoint_folder(path):
                path = export_checkpoint(path, args.tag, Path(workdir))
                name += f"@{args.tag or 'latest'}"
            tokenized = None
            for scaling in scalings:
                model, tokenizer = load_model(str(path), scaling, device, dtype, args.trust_remote_code)
                if tokenized is None:
                    tokenized = [tokenize_prefix(tokenizer, text, max(args.lengths)) for _, text in docs_text]
                max_pos = model.config.max_position_embeddings
                window = args.window or max_pos
                with tqdm(desc=f"{name} rope={scaling_label(scaling)}", unit="tok",
                          disable=None) as bar:
                    curves = evaluate_model(model, tokenized, args.lengths, args.modes, args.bucket, window,
                                            args.stride, args.batch_size, args.loss_chunk, progress=bar)
                used = getattr(model.config, "rope_scaling", None)
                for curve in curves:
                    row = {"model": name, "path": str(given), "rope_scaling": used,
                           "max_position_embeddings": max_pos, **curve.summary()}
                    # Positions past the training length: what the curve measures, marked rather than refused.
                    row["extrapolation"] = (curve.length if curve.mode == "whole" else curve.window) > max_pos
                    results.append(row)
                del model
    settings = {"data": [str(d) for d in args.data], "held_out": args.held_out, "unit": args.unit, "documents": len(docs_text),
                "lengths": sorted(set(args.lengths)), "bucket": args.bucket, "modes": args.modes,
                "window": args.window, "stride": args.stride, "dtype": str(dtype).replace("torch.", ""),
                "device": device}
    (out_dir / "ppl.json").write_text(json.dumps({"settings": settings, "results": results}, indent=1) + "\n",
                                      encoding="utf-8")
    write_csv(results, out_dir / "ppl.csv")
    plot(results, out_dir / "ppl.png", title=f"perplexity by position, {len(docs_text)} documents")
    print_table(results)
    print(f"wrote {out_dir / 'ppl.json'}, {out_dir / 'ppl.csv'}, {out_dir / 'ppl.png'}")
    return results


def main(argv=None):
    args = parse_args(argv)
    try:
        return run(args)
    except (PplError, OSError) as e:
        sys.exit(f"evaluate_ppl: error: {e}")


if __name__ == "__main__":
    main()
