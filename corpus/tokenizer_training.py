"""Train the project's SentencePiece BPE tokenizer (`tokenizer.model`) on the zh+en corpus.

The output follows the conventions of the released baichuan-7B tokenizer, so either file can be used with the same
model config (pad/bos/eos = none/1/2):

* BPE, 64000 pieces, byte fallback (256 `<0xNN>` pieces), so no text ever maps to `<unk>`;
* `<unk>`=0, `<s>`=1, `</s>`=2, no pad piece; then the same 390 user-defined pieces at ids 3..392 (`\\n` is id 5,
  `\\t` id 6, digits, CJK punctuation, html tags, `<reserved_0..299>`), then the byte pieces at ids 393..648;
* `nmt_nfkc` normalization, a dummy `▁` prefix, runs of spaces kept (remove_extra_whitespaces off);
* every digit is its own piece (split_digits plus the digits as user-defined pieces).

Only the learned pieces (ids 649..63999) differ from the released file.

Input preparation (all deterministic):
* every `*.txt` under each `--corpus` directory, in sorted path order, except names matching `--exclude`
  (by default the WikiText-2 valid/test splits, which are evaluation sets and in a pre-tokenized `@-@` format);
* lines longer than `--max-sentence-length` bytes are cut at sentence ends (SentencePiece would silently drop them:
  the State-of-the-Union file holds one ~46 kB address per line);
* one chunk in `--heldout-every` (chosen by a CRC32 of its text) is held out; `scripts/tokenizer_stats.py` measures
  compression on those held-out chunks, so the figures are not measured on training text;
* if more than `--max-sentences` chunks remain, a seeded random subset is kept.

Usage:
    python scripts/train_tokenizer.py --corpus ../shared/data/corpus --output tokenizer.model
"""
from __future__ import annotations

import argparse
import fnmatch
import io
import random
import re
import sys
import time
import zlib
from pathlib import Path
from typing import Iterable, Iterator, List, Sequence

import sentencepiece as spm

from common import REPO_ROOT, HelpFormatter, shared_data_dir, write_atomic

DEFAULT_CORPUS = shared_data_dir() / "corpus"
DEFAULT_EXCLUDE = ("wikitext2_*",)

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, -1

_HTML_TAGS = ["h2", "br", "strong", "h1", "p", "h5", "h3", "table", "li", "tr", "h4", "tbody", "img", "b", "td"]
# The released tokenizer's user-defined pieces, in its order (ids 3..392). Keeping the same list at the same ids means
# the two files agree on every id below 649. The released trainer spec names "<LF>" and "<tab>" where its vocabulary
# holds "\n" and "\t" (it was edited after training); here the real characters are passed to the trainer directly.
# User-defined pieces are matched before normalization and never merged, which is what keeps "\n", "\t", "０".."９"
# and the punctuation below as single pieces.
USER_DEFINED_SYMBOLS: List[str] = (
    ["<SEP>", "<CLS>", "\n", "\t"]
    + [tag for name in _HTML_TAGS for tag in (f"<{name}>", f"<{name}/>", f"</{name}>")]
    + [str(d) for d in range(10)]
    + [chr(ord("０") + d) for d in range(10)]
    + ["，", "。", "！", "？", "、", "：", "￥", ".", "!", "?", "《", "》", "【", "】", "『", "』"]
    + ["```", "<!--", "-->", "---", "<!DOCTYPE>"]
    + [f"<reserved_{i}>" for i in range(300)]
)
assert len(USER_DEFINED_SYMBOLS) == 390 and len(set(USER_DEFINED_SYMBOLS)) == 390

# A sentence ends at a run of end punctuation plus any closing quotes/brackets; long lines are cut there if possible.
_SENTENCE_END = re.compile(r"[。！？!?.;；…]+[”’\"'」』）)]*")


def corpus_files(corpus_dirs: Sequence[Path], exclude: Sequence[str] = DEFAULT_EXCLUDE) -> List[Path]:
    """All `*.txt` files under the given directories (or the files themselves), sorted, minus excluded names."""
    files: List[Path] = []
    for root in corpus_dirs:
        root = Path(root)
        if root.is_file():
            found = [root]
        elif root.is_dir():
            found = sorted(root.rglob("*.txt"))
        else:
            raise FileNotFoundError(f"corpus path {root} does not exist")
        kept = [f for f in found if not any(fnmatch.fnmatch(f.name, pat) for pat in exclude)]
        if not kept:
            raise ValueError(f"no .txt files under {root} (after --exclude {list(exclude)})")
        files.extend(kept)
    return files


def _hard_cut(text: str, max_bytes: int) -> Iterator[str]:
    """Cut text into pieces of at most max_bytes UTF-8 bytes, at character boundaries."""
    start, size = 0, 0
    for i, ch in enumerate(text):
        n = len(ch.encode("utf-8"))
        if size + n > max_bytes:
            yield text[start:i]
            start, size = i, 0
        size += n
    if start < len(text):
        yield text[start:]


def split_long_line(line: str, max_bytes: int) -> List[str]:
    """Split a line longer than max_bytes (UTF-8) into chunks that fit, cutting at sentence ends where possible.

    Spaces at a cut are dropped so that each chunk starts like a fresh line (the dummy prefix supplies the `▁`).
    """
    if len(line.encode("utf-8")) <= max_bytes:
        return [line]
    sentences, start = [], 0
    for m in _SENTENCE_END.finditer(line):
        sentences.append(line[start:m.end()])
        start = m.end()
    sentences.append(line[start:])

    chunks: List[str] = []
    current, current_bytes = "", 0
    for sentence in sentences:
        for part in _hard_cut(sentence, max_bytes):
            n = len(part.encode("utf-8"))
            if current and current_bytes + n > max_bytes:
                chunks.append(current)
                current, current_bytes = "", 0
            current += part
            current_bytes += n
    chunks.append(current)
    last = len(chunks) - 1
    chunks = [c.lstrip(" ") if i > 0 else c for i, c in enumerate(chunks)]
    chunks = [c.rstrip(" ") if i < last else c for i, c in enumerate(chunks)]
    return [c for c in chunks if c.strip()]


def is_heldout(text: str, every: int) -> bool:
    """Whether a chunk is held out of training: a stable hash, so the trainer and the stats script agree."""
    return every > 0 and zlib.crc32(text.encode("utf-8")) % every == 0


def iter_chunks(files: Iterable[Path], max_bytes: int) -> Iterator[str]:
    """Every non-blank line of the files, long ones split into chunks of at most max_bytes."""
    for path in files:
        try:
            with open(path, encoding="utf-8") as f:
                for line in f:
                    line = line.rstrip("\n")
                    if line.strip():
                        yield from split_long_line(line, max_bytes)
        except UnicodeDecodeError as e:
            raise ValueError(f"{path} is not valid UTF-8: {e}") from e


def training_sentences(files: Sequence[Path], max_bytes: int, heldout_every: int, max_sentences: int,
                       seed: int) -> List[str]:
    """The chunks to train on: held-out ones removed, then a seeded subset if there are more than max_sentences."""
    sentences = [c for c in iter_chunks(files, max_bytes) if not is_heldout(c, heldout_every)]
    if not sentences:
        raise ValueError(f"no training text in {[str(f) for f in files]}")
    if 0 < max_sentences < len(sentences):
        keep = sorted(random.Random(seed).sample(range(len(sentences)), max_sentences))
        sentences = [sentences[i] for i in keep]
    return sentences


def train(sentences: Sequence[str], *, vocab_size: int, character_coverage: float = 1.0, num_threads: int = 2,
          max_sentence_length: int = 8192, seed: int = 0, allow_whitespace_only_pieces: bool = True,
          quiet: bool = False) -> bytes:
    """Train the BPE model on the given sentences and return the serialized ModelProto."""
    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=character_coverage,
        byte_fallback=True,
        # Digits: never merged during training, and user-defined pieces at encode time.
        split_digits=True,
        normalization_rule_name="nmt_nfkc",
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        # Lets the trainer learn pieces of several spaces (indentation) instead of one `▁` per space.
        allow_whitespace_only_pieces=allow_whitespace_only_pieces,
        user_defined_symbols=USER_DEFINED_SYMBOLS,
        unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID,
        max_sentencepiece_length=10,
        max_sentence_length=max_sentence_length,
        num_sub_iterations=2,
        # Sampling is done above, deterministically; SentencePiece gets every sentence in order.
        input_sentence_size=0,
        shuffle_input_sentence=False,
        num_threads=num_threads,
        minloglevel=2 if quiet else 0,
    )
    return model.getvalue()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--corpus", type=Path, nargs="+", default=[DEFAULT_CORPUS],
                   help="directories (searched recursively for *.txt) or .txt files to train on "
                        "(default: ../shared/data/corpus)")
    p.add_argument("--exclude", nargs="*", default=list(DEFAULT_EXCLUDE),
                   help="file-name glob patterns to leave out (default: %(default)s; pass no value to keep all)")
    p.add_argument("--output", type=Path, default=REPO_ROOT / "tokenizer.model",
                   help="where to write the model (default: tokenizer.model at the repository root)")
    p.add_argument("--vocab-size", type=int, default=64000, help="number of pieces (default: %(default)s)")
    p.add_argument("--character-coverage", type=float, default=1.0,
                   help="share of corpus characters that get their own piece; the rest fall back to bytes "
                        "(default: %(default)s, as the released tokenizer)")
    p.add_argument("--max-sentence-length", type=int, default=8192,
                   help="longest training chunk in UTF-8 bytes; longer lines are split at sentence ends "
                        "(default: %(default)s)")
    p.add_argument("--heldout-every", type=int, default=100,
                   help="hold out one chunk in N (by a CRC32 of its text) for tokenizer_stats.py; 0 keeps all "
                        "(default: %(default)s)")
    p.add_argument("--max-sentences", type=int, default=2_000_000,
                   help="train on a seeded random subset of at most this many chunks; 0 for all "
                        "(default: %(default)s)")
    p.add_argument("--no-whitespace-pieces", action="store_true",
                   help="do not learn pieces made only of spaces (the released tokenizer has none)")
    p.add_argument("--seed", type=int, default=20240601, help="seed for sampling (default: %(default)s)")
    p.add_argument("--num-threads", type=int, default=2, help="trainer threads (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="hide SentencePiece's training log")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    n_meta = 3 + len(USER_DEFINED_SYMBOLS) + 256
    if args.vocab_size <= n_meta:
        raise SystemExit(f"--vocab-size {args.vocab_size} leaves no room for learned pieces: "
                         f"{n_meta} ids are taken by special, user-defined and byte pieces")
    if not 0.0 < args.character_coverage <= 1.0:
        raise SystemExit(f"--character-coverage must be in (0, 1], got {args.character_coverage}")
    if args.heldout_every < 0 or args.max_sentences < 0:
        raise SystemExit("--heldout-every and --max-sentences must be >= 0")
    try:
        files = corpus_files(args.corpus, args.exclude)
        sentences = training_sentences(files, args.max_sentence_length, args.heldout_every, args.max_sentences,
                                       args.seed)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    n_chars = sum(len(s) for s in sentences)
    print(f"training on {len(sentences)} chunks, {n_chars} characters, from {len(files)} files", file=sys.stderr)
    start = time.time()
    try:
        model = train(sentences, vocab_size=args.vocab_size, character_coverage=args.character_coverage,
                      num_threads=args.num_threads, max_sentence_length=args.max_sentence_length, seed=args.seed,
                      allow_whitespace_only_pieces=not args.no_whitespace_pieces, quiet=args.quiet)
    except RuntimeError as e:
        # Typically "Vocabulary size too high": the corpus cannot fill --vocab-size pieces.
        raise SystemExit(f"error: SentencePiece training failed (--vocab-size {args.vocab_size}): {e}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(args.output, model)
    print(f"wrote {args.output} ({len(model)} bytes) in {time.time() - start:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
