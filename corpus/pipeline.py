"""Prepare a pretraining corpus for train.py: clean, filter, de-duplicate, shuffle, shard.

Reads raw UTF-8 text -- `.txt` (one document per line, per blank-line-separated block, or per file) and
`.jsonl` (one JSON object per line with a text field), each optionally gzip-compressed (`.gz`) -- from
files or folders (searched recursively, in sorted order), and writes N shards `part-00000.txt ...` into
a data_dir, one document per line, UTF-8, the format train.py reads.

Steps, in order, each switchable and each reported with the documents and characters it removed:
  1. normalization: Unicode NFKC, control and zero-width characters removed, whitespace runs collapsed;
     line breaks inside a document become one space (nothing between two CJK characters), so every
     document is one output line;
  2. heuristic filters: length, language (py3langid's model, per-language thresholds), share of symbols,
     share of digits, repeated lines, repeated n-grams (thresholds below, all options); then, with
     --quality-model, documents, paragraphs or sentences scoring below the threshold are dropped
     (docs/quality.md);
  3. exact de-duplication (64-bit digest of the normalized text);
  4. document-level near-duplicate removal: MinHash over character shingles + LSH, each LSH candidate
     confirmed by the exact Jaccard of the two shingle sets before the document is removed;
  5. sentence-level near-duplicate removal: sentences (zh 。！？； / en .!? followed by a space) that
     near-duplicate a sentence of an earlier kept document are dropped (boilerplate; candidates checked
     likewise), and documents
     left shorter than --min-chars are dropped;
  6. deterministic shuffle (seeded) and an even split by bytes into N shards, written atomically.
The first occurrence always wins, in input order, so the output does not depend on --processes.

Example:
  python scripts/prepare_data.py raw/ --output-dir data_dir --world-size 8 --processes 8
"""
from __future__ import annotations

import argparse
import array
import collections
import gzip
import json
import mmap
import os
import shutil
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from tqdm import tqdm

from common import HelpFormatter
from corpus import dedup, langid, quality, text as textproc

SUFFIXES = (".txt", ".jsonl", ".txt.gz", ".jsonl.gz")
SHARD_NAME = "part-{:05d}.txt"
MAX_LOCATIONS = 20  # malformed-input locations kept per kind for the report (all are counted)

MEMORY_NOTE = """\
memory: document texts stream through: the reader keeps at most 2 chunks per process in flight
(a chunk is ~1 M characters) and kept documents are spilled to a temporary file, so memory does not grow
with the characters of the corpus. What stays resident grows per kept document (compact backend,
--num-perm 128, thresholds 0.8 -> 18 bands of 6 rows, the banding for checked candidates): 12 B for exact
de-duplication, 216 B for the document LSH (+ ~100 B per document shortened by the sentence step, whose
signed text the candidate check keeps in a scratch file), 224 B per new (not near-duplicate) sentence of
>= --sentence-min-chars for the sentence LSH and the offset of its text in a scratch file, 8 B for the spill
offset (+8 B with --log-removed) and, in the final pass, ~50 B for the shuffle plan: ~290 B per kept
document plus ~224 B per indexed sentence, e.g. ~2.8 GB for 2 M documents of 5 indexed sentences, on top of
~0.3 GB fixed (interpreter, libraries, the last 512 K keys of each index kept in a dict before they are
merged into sorted arrays). --no-candidate-check halves the LSH part (9 bands of 13 rows). The datasketch
backend (MinHashLSH) needs ~3.6 KB per document and per sentence instead. Temporary files need up to about
twice the size of the output."""


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------
@dataclass
class InputReport:
    """Malformed or skipped input: counted, and the first locations kept, never silently dropped."""
    counts: collections.Counter = field(default_factory=collections.Counter)
    locations: dict = field(default_factory=lambda: collections.defaultdict(list))

    def add(self, kind: str, where: str, detail: str = "") -> None:
        self.counts[kind] += 1
        if len(self.locations[kind]) < MAX_LOCATIONS:
            self.locations[kind].append(f"{where}: {detail}" if detail else where)


def expand_inputs(paths: list[str], report: InputReport) -> list[Path]:
    """Input files in a stable order. A named file must exist and have a supported suffix; files with
    other suffixes found inside folders are skipped and reported."""
    files = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            for child in sorted(p for p in path.rglob("*") if p.is_file()):
                if child.name.endswith(SUFFIXES):
                    files.append(child)
                else:
                    report.add("skipped_unsupported_files", str(child), f"suffix not in {', '.join(SUFFIXES)}")
        elif path.is_file():
            if not path.name.endswith(SUFFIXES):
                raise SystemExit(f"error: input {path}: unsupported suffix (expected one of {', '.join(SUFFIXES)})")
            files.append(path)
        else:
            raise SystemExit(f"error: input {path} does not exist")
    return files


class Reader:
    """Yields (text, (file_index, line_number)) documents and tracks raw bytes for the progress bar."""

    def __init__(self, files: list[Path], txt_docs: str, text_field: str, report: InputReport, on_error: str):
        self.files, self.txt_docs, self.text_field = files, txt_docs, text_field
        self.report, self.on_error = report, on_error
        self.bytes_read = 0

    def bad(self, kind: str, where: str, detail: str = "") -> None:
        if self.on_error == "fail":
            raise SystemExit(f"error: {kind} at {where} {detail}".rstrip() + " (--on-error fail)")
        self.report.add(kind, where, detail)

    def _lines(self, path: Path):
        """(line_number, decoded line or None when it is not valid UTF-8)."""
        with open(path, "rb") as raw:
            stream = gzip.GzipFile(fileobj=raw) if path.name.endswith(".gz") else raw
            last = 0
            for number, line in enumerate(stream, 1):
                pos = raw.tell()
                self.bytes_read += pos - last
                last = pos
                try:
                    yield number, line.decode("utf-8")
                except UnicodeDecodeError as err:
                    self.bad("bad_utf8_lines", f"{path}:{number}", f"byte {err.start}: {err.reason}")
                    yield number, None

    def _documents_of(self, index: int, path: Path):
        block, start = [], 0
        for number, line in self._lines(path):
            if line is None:
                continue
            if path.name.endswith((".jsonl", ".jsonl.gz")):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    self.bad("bad_json_lines", f"{path}:{number}", err.msg)
                    continue
                text = record.get(self.text_field) if isinstance(record, dict) else None
                if not isinstance(text, str):
                    self.bad("json_lines_without_text", f"{path}:{number}", f"no string field {self.text_field!r}")
                    continue
                yield text, (index, number)
            elif self.txt_docs == "line":
                if line.strip():
                    yield line, (index, number)
            elif self.txt_docs == "blank" and not line.strip():
                if block:
                    yield "".join(block), (index, start)
                block = []
            else:  # a line of a block or of a whole-file document
                if not block:
                    start = number
                block.append(line)
        if block:
            yield "".join(block), (index, start)

    def documents(self):
        for index, path in enumerate(self.files):
            produced = False
            try:
                for doc in self._documents_of(index, path):
                    produced = True
                    yield doc
            except (OSError, EOFError, zlib.error) as err:  # truncated or corrupt gzip, unreadable file
                self.bad("unreadable_files", str(path), f"{type(err).__name__}: {err}")
            if not produced:
                self.report.add("files_without_documents", str(path), "empty or only blank/malformed lines")

    def chunks(self, max_chars: int = 1 << 20, max_docs: int = 2000):
        texts, where, chars = [], [], 0
        for text, loc in self.documents():
            texts.append(text)
            where.append(loc)
            chars += len(text)
            if chars >= max_chars or len(texts) >= max_docs:
                yield texts, where
                texts, where, chars = [], [], 0
        if texts:
            yield texts, where


# ---------------------------------------------------------------------------------------------
# Per-document work (worker processes)
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WorkerConfig:
    normalize: bool
    filters: textproc.FilterConfig | None
    exact: bool
    doc_dedup: bool
    sentence_dedup: bool
    sentence_min_chars: int
    num_perm: int
    seed: int
    shingle: int
    quality_model: str | None = None
    quality_level: str = "paragraph"
    quality_thresholds: tuple[tuple[str, float], ...] = ()


_WORKER: "Worker | None" = None


class Worker:
    def __init__(self, cfg: WorkerConfig):
        self.cfg = cfg
        self.signer = textproc.Signer(cfg.num_perm, cfg.seed, cfg.shingle)
        self.quality = quality.QualityStep(cfg.quality_model, cfg.quality_level, dict(cfg.quality_thresholds)) \
            if cfg.quality_model else None

    def process(self, texts: list[str]) -> dict:
        """Normalize and filter every document; digest and sign those that pass.

        Returns plain lists and arrays (cheap to pickle): per document its normalized length and the filter
        that dropped it (None when it passed); for passing documents their text, exact digest, document
        signature, sentence spans, which spans are indexed, and one signature per indexed sentence."""
        cfg = self.cfg
        out = {"norm_chars": [], "dropped": [], "texts": [], "spans": [], "indexed": [], "quality": [],
               "quality_chars": []}
        docs = []  # (lines, text, language) per document; text None when a filter dropped it
        for raw in texts:
            lines = textproc.normalize_lines(raw) if cfg.normalize else [s for s in raw.splitlines() if s.strip()]
            text = textproc.join_lines(lines)
            out["norm_chars"].append(len(text))
            reason = "empty" if not text else None
            info = {}
            if reason is None and cfg.filters is not None:
                reason = textproc.first_failed_filter(lines, text, cfg.filters, info)
            out["dropped"].append(reason)
            docs.append((lines, None if reason else text, info.get("language")))
        # Quality: one scoring call per language for all units of the chunk (a call per document costs more in
        # fixed overhead than the scoring itself).
        scored = [None] * len(docs)
        if self.quality is not None:
            passing = [i for i, (_, text, _) in enumerate(docs) if text is not None]
            langs = [docs[i][2] or langid.LanguageId().classify(docs[i][1])[0] for i in passing]
            results = self.quality.apply_many([docs[i][0] for i in passing], langs, textproc.join_lines,
                                              textproc.sentence_spans)
            min_chars = max(1, (cfg.filters.min_chars or 0) if cfg.filters else 1)
            for i, lang, (kept, scores, keep) in zip(passing, langs, results):
                scored[i] = (lang, None if scores is None else scores.astype(np.float32), keep)
                if kept is None:
                    continue
                if len(kept) < min_chars:
                    out["dropped"][i] = "quality"
                    scored[i] = (lang, scores.astype(np.float32), np.zeros_like(keep))
                else:
                    docs[i] = (docs[i][0], kept, lang)
        sentence_texts = []
        for i, (lines, text, _) in enumerate(docs):
            out["quality"].append(scored[i])
            if out["dropped"][i] is not None:
                continue
            out["quality_chars"].append(out["norm_chars"][i] - len(text))
            out["texts"].append(text)
            if cfg.sentence_dedup:
                spans = textproc.sentence_spans(text)
                indexed = [k for k, (s, e) in enumerate(spans) if len(text[s:e].strip()) >= cfg.sentence_min_chars]
                sentence_texts.extend(text[spans[k][0]:spans[k][1]].strip() for k in indexed)
                out["spans"].append(spans)
                out["indexed"].append(indexed)
        kept = out["texts"]
        out["digests"] = np.array([textproc.exact_key(t) for t in kept], dtype=np.uint64) if cfg.exact else None
        out["doc_sigs"] = self.signer.sign_many(kept) if cfg.doc_dedup else None
        out["sentence_sigs"] = self.signer.sign_many(sentence_texts) if cfg.sentence_dedup else None
        return out


def _init_worker(cfg: WorkerConfig) -> None:
    global _WORKER
    _WORKER = Worker(cfg)


def _process_chunk(texts: list[str]) -> dict:
    return _WORKER.process(texts)


def ordered_results(chunks, cfg: WorkerConfig, processes: int):
    """(chunk, result) in input order. At most 2 chunks per process are in flight: Pool.imap would read
    the whole input ahead into its task queue, which is exactly the unbounded memory to avoid."""
    if processes <= 1:
        worker = Worker(cfg)
        for chunk in chunks:
            yield chunk, worker.process(chunk[0])
        return
    with Pool(processes, initializer=_init_worker, initargs=(cfg,)) as pool:
        pending = collections.deque()
        for chunk in chunks:
            pending.append((chunk, pool.apply_async(_process_chunk, (chunk[0],))))
            if len(pending) >= 2 * processes:
                chunk, result = pending.popleft()
                yield chunk, result.get()
        while pending:
            chunk, result = pending.popleft()
            yield chunk, result.get()


# ---------------------------------------------------------------------------------------------
# Sequential de-duplication (main process) and the spill file
# ---------------------------------------------------------------------------------------------
class Stats:
    """Documents and characters in, removed by each step, out. chars in = out + every removal."""

    def __init__(self):
        self.removed_docs = collections.Counter()
        self.removed_chars = collections.Counter()
        self.docs_in = self.chars_in = self.docs_out = self.chars_out = 0
        self.sentences_indexed = self.sentences_removed = 0
        self.candidates_checked = self.candidates_rejected = 0
        self.sentence_candidates_checked = self.sentence_candidates_rejected = 0

    def remove(self, step: str, docs: int, chars: int) -> None:
        self.removed_docs[step] += docs
        self.removed_chars[step] += chars


def deduplicate(results, cfg: WorkerConfig, args, stats: Stats, spill, offsets: array.array, log, files,
                progress=None, quality_log=None):
    """Exact, document and sentence de-duplication over the stream, writing kept documents to `spill`."""
    Backend = dedup.BACKENDS[args.lsh_backend]
    exact = dedup.ExactIndex() if cfg.exact else None
    check = None
    if cfg.doc_dedup and not args.no_candidate_check:
        check = dedup.CandidateCheck(textproc.Signer(cfg.num_perm, cfg.seed, cfg.shingle), args.threshold, spill,
                                     offsets, Path(spill.name).with_name("signed_texts.txt"))
    doc_params = dedup.recall_params(args.threshold, cfg.num_perm) if check else None
    doc_lsh = Backend(args.threshold, cfg.num_perm, cfg.seed, doc_params) if cfg.doc_dedup else None
    sentences = None  # indexed sentence texts, for the check of sentence candidates
    if cfg.sentence_dedup and not args.no_candidate_check:
        sentences = dedup.SentenceStore(Path(spill.name).with_name("sentences.txt"))
        signer = check.signer if check else textproc.Signer(cfg.num_perm, cfg.seed, cfg.shingle)
    sent_params = dedup.recall_params(args.sentence_threshold, cfg.num_perm) if sentences else None
    sent_lsh = Backend(args.sentence_threshold, cfg.num_perm, cfg.seed, sent_params) if cfg.sentence_dedup else None
    min_chars = max(1, cfg.filters.min_chars or 0) if cfg.filters else 1
    kept_where = array.array("Q")  # (file, line) of each kept document, packed; only to name duplicates in the log

    def where(loc):
        return f"{files[loc[0]]}:{loc[1]}"

    def removed(step, loc, chars, of=None):
        if log is not None:
            record = {"source": where(loc), "step": step, "chars": chars}
            if of is not None:
                packed = kept_where[of]
                record["duplicate_of"] = where((packed >> 32, packed & 0xFFFFFFFF))
            log.write(json.dumps(record, ensure_ascii=False) + "\n")

    for (texts, locations), res in results:
        stats.docs_in += len(texts)
        raw_chars = sum(len(t) for t in texts)
        stats.chars_in += raw_chars
        stats.remove("normalize", 0, raw_chars - sum(res["norm_chars"]))
        exact_batch = exact.batch(res["digests"]) if exact else None
        doc_batch = doc_lsh.batch(res["doc_sigs"]) if doc_lsh else None
        sent_batch = sent_lsh.batch(res["sentence_sigs"]) if sent_lsh else None
        j = sentence_row = 0  # index among passing documents / first sentence signature row of document j
        for i, reason in enumerate(res["dropped"]):
            if quality_log is not None and res["quality"][i] is not None:
                quality_log(locations[i], *res["quality"][i])
            if reason is not None:
                stats.remove(reason, 1, res["norm_chars"][i])
                removed(reason, locations[i], res["norm_chars"][i])
                continue
            if res["quality_chars"][j]:
                stats.remove("quality", 0, res["quality_chars"][j])
            text = res["texts"][j]
            rows = []
            if sent_lsh:
                rows = list(range(sentence_row, sentence_row + len(res["indexed"][j])))
                sentence_row += len(rows)
            owners = exact.query(exact_batch, j) if exact else ()
            if owners:
                stats.remove("exact_duplicate", 1, len(text))
                removed("exact_duplicate", locations[i], len(text), min(owners))
                j += 1
                continue
            candidates = doc_lsh.query(doc_batch, j) if doc_lsh else ()
            owner = (check.confirm(text, candidates) if check else min(candidates)) if candidates else None
            if owner is not None:
                stats.remove("near_duplicate_document", 1, len(text))
                removed("near_duplicate_document", locations[i], len(text), owner)
                j += 1
                continue
            final, fresh_rows = text, rows
            if sent_lsh and rows:
                stats.sentences_indexed += len(rows)
                dup, fresh_rows, spans = set(), [], res["spans"][j]
                for k, row in zip(res["indexed"][j], rows):
                    similar = sent_lsh.query(sent_batch, row)
                    confirmed = bool(similar)
                    if similar and sentences:
                        sentence = text[spans[k][0]:spans[k][1]].strip()
                        match, rejected = dedup.confirm(signer, args.sentence_threshold, sentence, similar,
                                                        sentences.text_of)
                        confirmed = match is not None
                        stats.sentence_candidates_checked += rejected + confirmed
                        stats.sentence_candidates_rejected += rejected
                    if confirmed:
                        dup.add(k)
                    else:
                        fresh_rows.append((row, k, bool(similar)))
                if dup:
                    final = "".join(text[s:e] for k, (s, e) in enumerate(spans) if k not in dup).strip()
                    stats.sentences_removed += len(dup)
                    if len(final) < min_chars:
                        stats.remove("near_duplicate_sentences", 1, len(text))
                        removed("near_duplicate_sentences", locations[i], len(text))
                        j += 1
                        continue
                    stats.remove("near_duplicate_sentences", 0, len(text) - len(final))
            # Kept: only documents that are written out enter the indexes, and only what matched nothing
            # (the indexes' contract; a matched sentence's near-twin is already there).
            ordinal = len(offsets) - 1
            if exact:
                exact.insert(exact_batch, j, ordinal)
            if doc_lsh:
                doc_lsh.insert(doc_batch, j, ordinal, fresh=not candidates)
            if check:
                check.kept(ordinal, text, final)
            for row, k, had_candidates in fresh_rows:
                if sentences:  # owners are sentence ids, whose texts the check reads back
                    s, e = res["spans"][j][k]
                    sent_lsh.insert(sent_batch, row, sentences.add(text[s:e].strip()), fresh=not had_candidates)
                else:
                    sent_lsh.insert(sent_batch, row, ordinal)
            if log is not None:
                kept_where.append((locations[i][0] << 32) | locations[i][1])
            data = final.encode("utf-8") + b"\n"
            spill.write(data)
            offsets.append(offsets[-1] + len(data))
            stats.docs_out += 1
            stats.chars_out += len(final)
            j += 1
        for index in (exact, doc_lsh, sent_lsh):
            if index is not None:
                index.end_batch()
        if progress is not None:
            progress()
    if check:
        stats.candidates_checked, stats.candidates_rejected = check.checked, check.rejected
        check.close()
    if sentences:
        sentences.close()
    return {name: idx.nbytes() for name, idx in (("exact", exact), ("document_lsh", doc_lsh),
                                                 ("sentence_lsh", sent_lsh)) if idx is not None}


# ---------------------------------------------------------------------------------------------
# Shuffle and shards
# ---------------------------------------------------------------------------------------------
def shard_plan(lengths: np.ndarray, num_shards: int, seed: int, shuffle: bool) -> tuple[np.ndarray, np.ndarray]:
    """(document order, shard boundaries into that order). Documents are cut into num_shards contiguous
    runs of the seeded permutation, each document going to the shard that holds its byte midpoint: every
    shard is within one document's size of total/num_shards bytes."""
    order = np.random.default_rng(seed).permutation(len(lengths)) if shuffle else np.arange(len(lengths))
    sizes = lengths[order]
    total = int(sizes.sum())
    if total == 0:
        return order, np.zeros(num_shards + 1, dtype=np.int64)
    midpoints = np.cumsum(sizes) - sizes / 2.0
    shard = np.minimum((midpoints * num_shards / total).astype(np.int64), num_shards - 1)
    bounds = np.searchsorted(shard, np.arange(num_shards + 1), side="left")
    return order, bounds


def write_shards(spill_path: Path, offsets: np.ndarray, num_shards: int, seed: int, shuffle: bool,
                 staging: Path, output_dir: Path, replaced: list[Path]) -> list[int]:
    """Write every shard into `staging`, then delete the `replaced` shards of an earlier run and rename the
    new ones into `output_dir` (a killed run leaves only complete shards there). Returns shard sizes."""
    order, bounds = shard_plan(np.diff(offsets), num_shards, seed, shuffle)
    sizes = []
    with open(spill_path, "rb") as f:
        view = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if offsets[-1] > 0 else b""
        for k in range(num_shards):
            with open(staging / SHARD_NAME.format(k), "wb") as out:
                for doc in order[bounds[k]:bounds[k + 1]]:
                    out.write(view[offsets[doc]:offsets[doc + 1]])
                out.flush()
                os.fsync(out.fileno())
                sizes.append(out.tell())
        if isinstance(view, mmap.mmap):
            view.close()
    for old in replaced:
        old.unlink()
    for k in range(num_shards):
        os.replace(staging / SHARD_NAME.format(k), output_dir / SHARD_NAME.format(k))
    return sizes


def check_output_dir(output_dir: Path, overwrite: bool) -> list[Path]:
    """train.py reads every file in data_dir, so refuse to mix with files of another run. Returns the old
    shards that --overwrite replaces (deleted only once the new shards are ready)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    present = sorted(p.name for p in output_dir.iterdir() if not p.name.startswith("."))
    if not present:
        return []
    if not overwrite:
        raise SystemExit(f"error: --output-dir {output_dir} is not empty ({', '.join(present[:5])}"
                         f"{' ...' if len(present) > 5 else ''}); train.py reads every file there. "
                         "Use --overwrite to replace part-*.txt shards of an earlier run.")
    others = [name for name in present if not (name.startswith("part-") and name.endswith(".txt"))]
    if others:
        raise SystemExit(f"error: --output-dir {output_dir} holds files that are not shards ({', '.join(others[:5])}); "
                         "train.py would read them as training data. Move them away first.")
    return [output_dir / name for name in present]


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
STEP_ORDER = ["normalize", "empty", "too_short", "too_long", "language", "symbols", "digits", "repeated_lines",
              "repeated_ngrams", "quality", "exact_duplicate", "near_duplicate_document", "near_duplicate_sentences"]


def summary_table(stats: Stats) -> str:
    rows = [("documents in / characters in", stats.docs_in, stats.chars_in)]
    for step in STEP_ORDER:
        if step in stats.removed_docs or step in stats.removed_chars:
            rows.append((f"  removed: {step}", stats.removed_docs[step], stats.removed_chars[step]))
    rows.append(("documents out / characters out", stats.docs_out, stats.chars_out))
    width = max(len(r[0]) for r in rows)
    lines = [f"{'step':<{width}} {'documents':>12} {'characters':>15} {'% chars':>8}"]
    for name, docs, chars in rows:
        share = 100.0 * chars / stats.chars_in if stats.chars_in else 0.0
        lines.append(f"{name:<{width}} {docs:>12,} {chars:>15,} {share:>7.2f}%")
    if stats.sentences_indexed:
        lines.append(f"sentences indexed {stats.sentences_indexed:,}, removed as near-duplicates "
                     f"{stats.sentences_removed:,}")
    if stats.candidates_checked:
        lines.append(f"document LSH candidates checked {stats.candidates_checked:,}, rejected (Jaccard below "
                     f"--threshold, kept) {stats.candidates_rejected:,}")
    if stats.sentence_candidates_checked:
        lines.append(f"sentence LSH candidates checked {stats.sentence_candidates_checked:,}, rejected (Jaccard "
                     f"below --sentence-threshold, kept) {stats.sentence_candidates_rejected:,}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
def _ratio_or_off(value: str):
    return None if value.lower() == "off" else float(value)


def _int_or_off(value: str):
    return None if value.lower() == "off" else int(value)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, epilog=MEMORY_NOTE,
                                formatter_class=HelpFormatter)
    p.add_argument("inputs", nargs="+", help="input files or folders (.txt, .jsonl, optionally .gz)")
    p.add_argument("--output-dir", "-o", required=True, help="data_dir for train.py; receives part-NNNNN.txt only")
    shards = p.add_mutually_exclusive_group(required=True)
    shards.add_argument("--num-shards", type=int, help="number of shards to write")
    shards.add_argument("--world-size", type=int,
                        help="total number of ranks; writes world_size x --shards-per-rank shards")
    p.add_argument("--shards-per-rank", type=int, default=1, help="with --world-size (default 1)")
    p.add_argument("--overwrite", action="store_true", help="replace the part-*.txt shards of an earlier run")
    p.add_argument("--txt-docs", choices=["line", "blank", "file"], default="line",
                   help=".txt documents: one per line (default), per block between blank lines, or per file")
    p.add_argument("--text-field", default="text", help=".jsonl field holding the text (default 'text')")
    p.add_argument("--on-error", choices=["report", "fail"], default="report",
                   help="malformed input (bad UTF-8, broken JSON, unreadable gzip): count it and go on "
                        "(default), or stop at the first one")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    p.add_argument("--processes", type=int, default=cores,
                   help="worker processes for normalization, filters and MinHash (default: all cores)")
    p.add_argument("--seed", type=int, default=0, help="seed of the MinHash permutations and of the shuffle")
    p.add_argument("--tmp-dir", help="folder for the spill file of kept documents, about the size of the output "
                                     "(default: the hidden staging folder beside --output-dir)")
    p.add_argument("--report", help="also write the counts and malformed-input locations to this JSON file")
    p.add_argument("--log-removed", help="write one JSON line per removed document (source, step, duplicate_of)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    g = p.add_argument_group("normalization and filters ('off' disables one threshold)")
    g.add_argument("--no-normalize", action="store_true", help="skip NFKC / control-character / whitespace cleanup")
    g.add_argument("--no-filters", action="store_true", help="skip every heuristic filter")
    d = textproc.FilterConfig()
    g.add_argument("--min-chars", type=_int_or_off, default=d.min_chars,
                   help=f"drop documents shorter than this many characters, also after sentence dedup "
                        f"(default {d.min_chars})")
    g.add_argument("--max-chars", type=_int_or_off, default=d.max_chars,
                   help=f"drop documents longer than this (default {d.max_chars:,})")
    g.add_argument("--languages", default="zh,en",
                   help="comma list of ISO 639-1 codes of the languages to keep; 'any' keeps all (default zh,en). "
                        "zh covers Mandarin, Wu and Cantonese in simplified or traditional characters")
    g.add_argument("--language-threshold", default="",
                   help="per-language confidence a document needs, e.g. 'zh=0.6,en=0.8' (default 0.5 for each "
                        "language of --languages)")
    g.add_argument("--language-id", choices=["model", "script"], default="model",
                   help="model: py3langid's 97-language model on the first 384 bytes of each document (default); "
                        "script: character classes, zh and en only (CJK ideographs outweigh other letters; Latin "
                        "letters and >= 2 English function words), faster")
    g.add_argument("--max-symbol-ratio", type=_ratio_or_off, default=d.max_symbol_ratio,
                   help=f"drop documents whose non-space characters are more than this share of symbols "
                        f"(Unicode S*, #$%%&*+/<=>@[\\]^`{{|}}~) (default {d.max_symbol_ratio})")
    g.add_argument("--max-digit-ratio", type=_ratio_or_off, default=d.max_digit_ratio,
                   help=f"... more than this share of digits (default {d.max_digit_ratio})")
    g.add_argument("--max-dup-line-ratio", type=_ratio_or_off, default=d.max_dup_line_ratio,
                   help=f"drop documents whose lines repeat an earlier line of the document more than this "
                        f"share of the time (default {d.max_dup_line_ratio}, Gopher's value)")
    g.add_argument("--max-dup-ngram-ratio", type=_ratio_or_off, default=d.max_dup_ngram_ratio,
                   help=f"drop documents with more than this share of characters inside a repeated "
                        f"--dup-ngram-chars n-gram (default {d.max_dup_ngram_ratio})")
    g.add_argument("--dup-ngram-chars", type=int, default=d.dup_ngram_chars,
                   help=f"n-gram length for --max-dup-ngram-ratio, in characters (default {d.dup_ngram_chars})")

    g = p.add_argument_group("de-duplication")
    g.add_argument("--no-exact-dedup", action="store_true", help="skip exact de-duplication")
    g.add_argument("--no-doc-dedup", action="store_true", help="skip document-level near-duplicate removal")
    g.add_argument("--no-sentence-dedup", action="store_true", help="skip sentence-level near-duplicate removal")
    g.add_argument("--threshold", type=float, default=0.8,
                   help="Jaccard threshold of document near-duplicates (default 0.8)")
    g.add_argument("--sentence-threshold", type=float, default=0.8,
                   help="Jaccard threshold of sentence near-duplicates (default 0.8)")
    g.add_argument("--sentence-min-chars", type=int, default=20,
                   help="only sentences at least this long are compared (default 20)")
    g.add_argument("--num-perm", type=int, default=128, help="MinHash permutations (default 128)")
    g.add_argument("--shingle", type=int, default=5,
                   help="character shingle size for MinHash, on lower-cased text (default 5)")
    g.add_argument("--no-candidate-check", action="store_true",
                   help="remove every document and sentence LSH candidate unchecked, with datasketch's banding "
                        "(9 bands of 13 rows at 0.8), as before; by default each candidate is confirmed by the "
                        "exact Jaccard of the shingle sets and the banding is chosen for recall (18 of 6 at 0.8)")
    g.add_argument("--lsh-backend", choices=sorted(dedup.BACKENDS), default="compact",
                   help="compact: datasketch's banding stored in numpy (~110 B per signature); datasketch: "
                        "datasketch.MinHashLSH itself (~3.6 KB per signature). Same results.")
    g = p.add_argument_group("quality model (after the filters, before de-duplication; see docs/quality.md)")
    g.add_argument("--quality-model",
                   help="score units with this model and drop those below the threshold of their document's "
                        "language: a file from scripts/train_quality_model.py, or a shipped model: "
                        f"{', '.join(quality.NAMED)} (default: no quality step)")
    g.add_argument("--quality-level", choices=quality.LEVELS, default="paragraph",
                   help="unit scored and dropped: the document, each of its lines (paragraph), or each sentence "
                        "(default paragraph); a document left shorter than --min-chars is dropped")
    thresholds = g.add_mutually_exclusive_group()
    thresholds.add_argument("--quality-threshold",
                            help="lowest score kept, one value or per language ('en=0.6,zh=0.5'); scores are "
                                 "P(good) for a classifier, mean log2 probability per token for a perplexity "
                                 "model (default: 0.5 for a classifier, the 5th percentile of the model's held-out "
                                 "reference text for a perplexity model)")
    thresholds.add_argument("--quality-percentile",
                            help="drop units scoring below this percentile of the model's held-out reference "
                                 "text, one value or per language ('en=10,zh=5')")
    g.add_argument("--quality-scores",
                   help="write one JSON line per scored unit (source, unit, language, score, kept); the report "
                        "always has a histogram per language")
    p.add_argument("--no-shuffle", action="store_true", help="keep input order (shards are still balanced)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.world_size is not None:
        if args.world_size < 1 or args.shards_per_rank < 1:
            parser.error("--world-size and --shards-per-rank must be >= 1")
        args.num_shards = args.world_size * args.shards_per_rank
    if args.num_shards < 1:
        parser.error("--num-shards must be >= 1")
    if args.processes < 1:
        parser.error("--processes must be >= 1")
    for flag in ("threshold", "sentence_threshold"):
        try:
            dedup.lsh_params(getattr(args, flag), args.num_perm)
            if not args.no_candidate_check:
                dedup.recall_params(getattr(args, flag), args.num_perm)
        except ValueError as err:  # datasketch finds no banding with >= 2 bands, e.g. 0.99 at 128 permutations
            parser.error(f"--{flag.replace('_', '-')} {getattr(args, flag)} with --num-perm {args.num_perm}: {err}")
    languages = None if args.languages == "any" else tuple(x.strip() for x in args.languages.split(",") if x.strip())
    args.language_thresholds = ()
    if languages is not None and args.language_id == "script" and (not languages or set(languages) - {"zh", "en"}):
        parser.error(f"--languages {args.languages!r} with --language-id script: use a comma list of zh, en, or 'any'")
    if languages is not None and args.language_id == "model":
        try:
            thresholds = langid.parse_thresholds(args.languages, args.language_threshold)
            langid.LanguageId(thresholds)
        except ValueError as err:
            parser.error(f"--languages {args.languages!r} / --language-threshold {args.language_threshold!r}: {err}")
        if not thresholds:
            parser.error(f"--languages {args.languages!r}: name at least one language, or 'any'")
        args.language_thresholds = tuple(sorted(thresholds.items()))
    args.language_tuple = languages
    args.quality_thresholds = ()
    if args.quality_model:
        try:
            model = quality.QualityModel.load(args.quality_model)
            args.quality_thresholds = tuple(sorted(quality.resolve_thresholds(
                model, languages, args.quality_threshold, args.quality_percentile).items()))
        except (quality.QualityModelError, ValueError) as err:
            parser.error(f"--quality-model {args.quality_model}: {err}")
        args.quality_kind = model.kind
    elif args.quality_threshold or args.quality_percentile or args.quality_scores:
        parser.error("--quality-threshold, --quality-percentile and --quality-scores need --quality-model")
    return args


def run(args: argparse.Namespace) -> dict:
    report = InputReport()
    files = expand_inputs(args.inputs, report)
    output_dir = Path(args.output_dir)
    replaced = check_output_dir(output_dir, args.overwrite)
    filters = None if args.no_filters else textproc.FilterConfig(
        min_chars=args.min_chars, max_chars=args.max_chars, languages=args.language_tuple,
        language_id=args.language_id, language_thresholds=args.language_thresholds,
        max_symbol_ratio=args.max_symbol_ratio, max_digit_ratio=args.max_digit_ratio,
        max_dup_line_ratio=args.max_dup_line_ratio, max_dup_ngram_ratio=args.max_dup_ngram_ratio,
        dup_ngram_chars=args.dup_ngram_chars)
    cfg = WorkerConfig(normalize=not args.no_normalize, filters=filters, exact=not args.no_exact_dedup,
                       doc_dedup=not args.no_doc_dedup, sentence_dedup=not args.no_sentence_dedup,
                       sentence_min_chars=args.sentence_min_chars, num_perm=args.num_perm, seed=args.seed,
                       shingle=args.shingle, quality_model=args.quality_model, quality_level=args.quality_level,
                       quality_thresholds=args.quality_thresholds)
    reader = Reader(files, args.txt_docs, args.text_field, report, args.on_error)
    total_bytes = sum(f.stat().st_size for f in files)
    # Shards are staged beside data_dir (same file system, so the final renames are atomic); the spill file
    # goes to --tmp-dir when given.
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.prepare-", dir=output_dir.parent))
    spill_dir = Path(tempfile.mkdtemp(prefix="prepare-spill-", dir=args.tmp_dir)) if args.tmp_dir else staging
    stats = Stats()
    start = time.perf_counter()
    log = open(args.log_removed, "w", encoding="utf-8") if args.log_removed else None
    scores_file = open(args.quality_scores, "w", encoding="utf-8") if args.quality_scores else None
    histogram = quality.Histogram(quality.QualityModel.load(args.quality_model)) if args.quality_model else None
    units = collections.Counter()

    def quality_log(loc, lang, scores, keep):
        if scores is None:
            units[f"unscored ({lang}: no scorer)"] += 1
            return
        histogram.add(lang, scores)
        units["scored"] += len(scores)
        units["removed"] += int(len(keep) - keep.sum())
        if scores_file is not None:
            source = f"{files[loc[0]]}:{loc[1]}"
            for k, (score, kept) in enumerate(zip(scores.tolist(), keep.tolist())):
                scores_file.write(json.dumps({"source": source, "unit": k, "language": lang,
                                              "score": round(score, 4), "kept": kept}, ensure_ascii=False) + "\n")
    try:
        bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="prepare", disable=args.no_progress or None)

        def progress():
            bar.update(reader.bytes_read - bar.n)
            bar.set_postfix(docs_in=stats.docs_in, kept=stats.docs_out, refresh=False)

        offsets = array.array("q", [0])
        spill_path = spill_dir / "spill.txt"
        with open(spill_path, "w+b") as spill:  # read back by the candidate check
            results = ordered_results(reader.chunks(), cfg, args.processes)
            index_bytes = deduplicate(results, cfg, args, stats, spill, offsets, log, files, progress,
                                      quality_log if args.quality_model else None)
        bar.close()
        dedup_seconds = time.perf_counter() - start
        shard_bytes = write_shards(spill_path, np.frombuffer(offsets, dtype=np.int64), args.num_shards, args.seed,
                                   not args.no_shuffle, staging, output_dir, replaced)
    finally:
        if log is not None:
            log.close()
        if scores_file is not None:
            scores_file.close()
        for folder in {staging, spill_dir}:
            shutil.rmtree(folder, ignore_errors=True)
    seconds = time.perf_counter() - start
    result = {
        "input_files": len(files), "input_bytes": reader.bytes_read, "seconds": round(seconds, 3),
        "dedup_seconds": round(dedup_seconds, 3),
        "documents_in": stats.docs_in, "characters_in": stats.chars_in,
        "documents_out": stats.docs_out, "characters_out": stats.chars_out,
        "removed_documents": dict(stats.removed_docs), "removed_characters": dict(stats.removed_chars),
        "sentences_indexed": stats.sentences_indexed, "sentences_removed": stats.sentences_removed,
        "candidates_checked": stats.candidates_checked, "candidates_rejected": stats.candidates_rejected,
        "sentence_candidates_checked": stats.sentence_candidates_checked,
        "sentence_candidates_rejected": stats.sentence_candidates_rejected,
        "malformed_input": dict(report.counts), "malformed_locations": dict(report.locations),
        "shard_bytes": shard_bytes, "index_bytes": index_bytes, "lsh_backend": args.lsh_backend,
    }
    if histogram is not None:
        result["quality"] = {"model": args.quality_model, "kind": args.quality_kind, "level": args.quality_level,
                             "thresholds": dict(args.quality_thresholds), "units": dict(units),
                             "histogram": histogram.to_dict()}
    print(summary_table(stats))
    if histogram is not None:
        print(f"quality ({args.quality_kind}, {args.quality_level} level): " +
              ", ".join(f"{k} {v:,}" for k, v in sorted(units.items())))
        print(histogram.render(dict(args.quality_thresholds)))
    mb = reader.bytes_read / 1e6
    print(f"{len(files)} files, {mb:,.1f} MB in {seconds:,.1f} s ({mb / max(seconds, 1e-9):,.2f} MB/s) "
          f"with {args.processes} process(es)")
    print(f"{args.num_shards} shards in {output_dir}: {min(shard_bytes):,} .. {max(shard_bytes):,} bytes")
    if any(size == 0 for size in shard_bytes):
        print(f"warning: {shard_bytes.count(0)} shard(s) are empty: fewer kept documents than shards",
              file=sys.stderr)
    if report.counts:
        print("malformed or skipped input (counted, not used):")
        for kind, count in sorted(report.counts.items()):
            shown = report.locations[kind][:3]
            print(f"  {kind}: {count:,}  e.g. {'; '.join(shown)}")
    if args.report:
        Path(args.report).write_text(json.dumps(result, indent=2, ensure_ascii=False), encoding="utf-8")
    return result


def main(argv=None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
