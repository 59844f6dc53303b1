"""Vocabulary size and compression of one or more SentencePiece models on a Chinese and an English sample.

For each model it prints one row of a Markdown table, like the tokenizer table of the baichuan-7B README:

    model | vocab | zh tokens/char | zh bytes/token | en tokens/char | en bytes/token

Fewer tokens per character (more UTF-8 bytes per token) means the model sees more text per context window.
Each non-blank line of a sample is encoded on its own, without <s>/</s>, as in training.

By default the samples are the chunks of ../shared/data/corpus/{zh,en} that scripts/train_tokenizer.py holds out of
training (one in 100, chosen by a CRC32 of the text), so the project's tokenizer is not measured on its own training
text. Pass --zh/--en files to measure on other text.

Usage:
    python scripts/tokenizer_stats.py tokenizer.model ../shared/data/baichuan-7b-tokenizer/tokenizer.model
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence

import sentencepiece as spm

from corpus.tokenizer_training import DEFAULT_CORPUS, DEFAULT_EXCLUDE, corpus_files, is_heldout, iter_chunks
from common import HelpFormatter


@dataclass
class Compression:
    tokens: int
    chars: int
    bytes: int

    @property
    def tokens_per_char(self) -> float:
        return self.tokens / self.chars

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / self.tokens


def heldout_sample(corpus_dir: Path, heldout_every: int = 100, max_sentence_length: int = 8192,
                   exclude: Sequence[str] = DEFAULT_EXCLUDE) -> List[str]:
    """The chunks of corpus_dir that train_tokenizer.py (with the same settings) leaves out of training."""
    files = corpus_files([corpus_dir], exclude)
    sample = [c for c in iter_chunks(files, max_sentence_length) if is_heldout(c, heldout_every)]
    if not sample:
        raise ValueError(f"no held-out chunks under {corpus_dir} with --heldout-every {heldout_every}")
    return sample


def read_sample(paths: Sequence[Path]) -> List[str]:
    """The non-blank lines of the given files."""
    lines: List[str] = []
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                lines.extend(line.rstrip("\n") for line in f if line.strip())
        except FileNotFoundError:
            raise ValueError(f"sample file {path} does not exist") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"sample file {path} is not valid UTF-8: {e}") from e
    if not lines:
        raise ValueError(f"sample files {[str(p) for p in paths]} hold no text")
    return lines


def compression(sp: spm.SentencePieceProcessor, lines: Sequence[str]) -> Compression:
    """Token, character and UTF-8 byte counts of the lines, each encoded on its own."""
    ids = sp.encode(list(lines))
    return Compression(tokens=sum(len(x) for x in ids), chars=sum(len(line) for line in lines),
                       bytes=sum(len(line.encode("utf-8")) for line in lines))


def model_stats(model_path: Path, samples: Dict[str, Sequence[str]]) -> Dict[str, object]:
    """Vocabulary size and, per language, the Compression of that sample."""
    path = Path(model_path)
    if not path.is_file():
        raise ValueError(f"model file {path} does not exist")
    sp = spm.SentencePieceProcessor(model_file=str(path))
    return {"model": str(model_path), "vocab": sp.get_piece_size(),
            **{lang: compression(sp, lines) for lang, lines in samples.items()}}


def format_table(rows: Sequence[Dict[str, object]], langs: Sequence[str]) -> str:
    header = ["model", "vocab"]
    for lang in langs:
        header += [f"{lang} tokens/char", f"{lang} bytes/token"]
    out = ["| " + " | ".join(header) + " |", "|" + "---|" + "---:|" * (len(header) - 1)]
    for row in rows:
        cells = [f"`{row['model']}`", str(row["vocab"])]
        for lang in langs:
            c = row[lang]
            cells += [f"{c.tokens_per_char:.3f}", f"{c.bytes_per_token:.2f}"]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("models", type=Path, nargs="+", help="SentencePiece .model files")
    p.add_argument("--zh", type=Path, nargs="+",
                   help="Chinese sample files (default: held-out chunks of <corpus>/zh)")
    p.add_argument("--en", type=Path, nargs="+",
                   help="English sample files (default: held-out chunks of <corpus>/en)")
    p.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS,
                   help="corpus with zh/ and en/ folders for the default samples (default: ../shared/data/corpus)")
    p.add_argument("--heldout-every", type=int, default=100,
                   help="as given to train_tokenizer.py, to pick the same held-out chunks (default: %(default)s)")
    args = p.parse_args(argv)
    if args.heldout_every <= 0:
        raise SystemExit("--heldout-every must be > 0: the default samples are the held-out chunks")

    try:
        samples = {}
        for lang, given in (("zh", args.zh), ("en", args.en)):
            samples[lang] = read_sample(given) if given else heldout_sample(args.corpus / lang, args.heldout_every)
        rows = [model_stats(m, samples) for m in args.models]
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    for lang, lines in samples.items():
        print(f"{lang} sample: {len(lines)} lines, {sum(map(len, lines))} characters", file=sys.stderr)
    print(format_table(rows, list(samples)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
