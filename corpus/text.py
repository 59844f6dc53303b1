"""Per-document text work for prepare_data.py: normalization, quality filters, sentence split, MinHash.

Everything here is a pure function of one document and the options, so it runs in worker processes.
Character classes are looked up in one numpy table over all code points, so the filters cost a few
vectorised passes per document instead of a Python loop per character.
"""
from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass

import numpy as np
from datasketch import MinHash

# ---------------------------------------------------------------------------------------------
# Character classes
# ---------------------------------------------------------------------------------------------
OTHER, CJK, LATIN, LETTER, DIGIT, SYMBOL, PUNCT, SPACE = range(8)
# ASCII punctuation that prose rarely needs but markup, code and spam are full of; counted as symbols
# together with the Unicode symbol categories (S*: math, currency, emoji, box drawing ...). The underscore
# is left out: Project Gutenberg texts mark _italics_ with it.
_CODE_PUNCT = set("#$%&*+/<=>@[\\]^`{|}~")


def _build_class_table() -> np.ndarray:
    """Class of every code point (1.1 MB), built once per process at import (~0.5 s)."""
    cats = np.array([unicodedata.category(chr(cp)) for cp in range(0x110000)])
    cp = np.arange(0x110000)
    table = np.full(0x110000, OTHER, dtype=np.uint8)
    table[np.char.startswith(cats, "P")] = PUNCT
    table[np.char.startswith(cats, "S") | np.isin(cp, [ord(c) for c in _CODE_PUNCT])] = SYMBOL
    table[cats == "Nd"] = DIGIT
    table[np.char.startswith(cats, "L")] = LETTER
    table[np.char.startswith(cats, "L") & (((cp >= 0x41) & (cp <= 0x5A)) | ((cp >= 0x61) & (cp <= 0x7A))
                                           | ((cp >= 0xC0) & (cp <= 0x24F)))] = LATIN
    table[(cats == "Lo") & (((cp >= 0x3400) & (cp <= 0x4DBF)) | ((cp >= 0x4E00) & (cp <= 0x9FFF))
                            | ((cp >= 0xF900) & (cp <= 0xFAFF)) | ((cp >= 0x20000) & (cp <= 0x3FFFF)))] = CJK
    table[[c for c in range(0x110000) if chr(c).isspace()]] = SPACE
    return table


CHAR_CLASS = _build_class_table()


def code_points(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


# ---------------------------------------------------------------------------------------------
# Normalization
# ---------------------------------------------------------------------------------------------
# Control characters (Cc) other than the line breaks that str.splitlines() understands are
# deleted; tabs become spaces. Zero-width characters and the BOM (Cf) are deleted because they are
# invisible in text yet split tokens. Line breaks survive until the line-level filters have run.
_LINE_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85"
_DELETE = {cp: None for cp in list(range(0x20)) + list(range(0x7F, 0xA0)) if chr(cp) not in _LINE_BREAKS}
_DELETE.update({ord("\t"): " ", 0x200B: None, 0x200C: None, 0x200D: None, 0x2060: None, 0xFEFF: None, 0xAD: None})


def normalize_lines(text: str) -> list[str]:
    """NFKC, control characters removed, whitespace runs collapsed to one space; non-empty lines.

    NFKC folds full-width Latin letters, digits and ASCII punctuation (Ａ１！？，) to their ASCII forms and
    the ideographic space to a space; 。、「」 and the CJK ideographs themselves are unchanged.
    """
    text = unicodedata.normalize("NFKC", text.translate(_DELETE))
    # str.split() with no argument splits on every Unicode space, so this also collapses NBSP etc.
    return [clean for line in text.splitlines() if (clean := " ".join(line.split()))]


def _is_cjk_edge(ch: str) -> bool:
    cls = CHAR_CLASS[ord(ch)]
    return cls == CJK or "\u3000" <= ch <= "\u303f" or "\uff00" <= ch <= "\uffef"


def join_lines(lines: list[str]) -> str:
    """One document per output line: line breaks become a space, or nothing between two CJK characters
    (Chinese has no spaces between words, and hard-wrapped Chinese text must not gain any)."""
    if not lines:
        return ""
    parts = [lines[0]]
    for prev, line in zip(lines, lines[1:]):
        parts.append("" if _is_cjk_edge(prev[-1]) and _is_cjk_edge(line[0]) else " ")
        parts.append(line)
    return "".join(parts)


# ---------------------------------------------------------------------------------------------
# Filters
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FilterConfig:
    """Thresholds of the heuristic filters; a threshold of None switches its filter off."""
    min_chars: int | None = 50
    max_chars: int | None = 1_000_000
    languages: tuple[str, ...] | None = ("zh", "en")
    # "model": corpus/langid.py with a confidence threshold per language, (lang, threshold) pairs (0.5 for a
    # language not named); "script": detect_language below, zh and en only, from character classes
    language_id: str = "model"
    language_thresholds: tuple[tuple[str, float], ...] = ()
    max_symbol_ratio: float | None = 0.10
    max_digit_ratio: float | None = 0.30
    max_dup_line_ratio: float | None = 0.30
    max_dup_ngram_ratio: float | None = 0.60
    dup_ngram_chars: int = 20


# After Gopher's stop-word rule (Rae et al. 2021), widened to the commonest English function words so that
# a single short paragraph passes too: English text has at least two of them.
EN_FUNCTION_WORDS = ("the be to of and that have with is in it for on as was are you he she we they his her not but "
                     "at by this my me i from or had were will would an so if no all what which there their our your "
                     "him them").split()
_EN_STOPWORDS = re.compile(r"\b(" + "|".join(EN_FUNCTION_WORDS) + r")\b", re.IGNORECASE)


def detect_language(counts: np.ndarray, text: str) -> str:
    """'zh', 'en' or 'other' from character-class counts.

    Letters are weighed as content: one CJK ideograph counts 1, four Latin letters count 1 (an English word
    carries about what one Chinese character does), any other letter 1/2. The winning script needs half of
    the weight; English also needs two English function words, which keeps out other Latin-script languages.
    """
    weights = {"zh": float(counts[CJK]), "en": counts[LATIN] / 4.0, "other": counts[LETTER] / 2.0}
    total = sum(weights.values())
    if total == 0:
        return "other"
    lang = max(weights, key=weights.get)
    if weights[lang] < 0.5 * total:
        return "other"
    if lang == "en":
        hits = _EN_STOPWORDS.finditer(text)
        if next(hits, None) is None or next(hits, None) is None:
            return "other"
    return lang


_P = 0x100000001B3  # odd, so it has an inverse modulo 2^64
_POWERS = np.ones(1, dtype=np.uint64)  # P^i and P^-i mod 2^64, grown on demand
_INV_POWERS = np.ones(1, dtype=np.uint64)


def _powers(length: int) -> tuple[np.ndarray, np.ndarray]:
    global _POWERS, _INV_POWERS
    if len(_POWERS) < length:
        size = max(length, 2 * len(_POWERS))
        one = np.ones(1, dtype=np.uint64)
        _POWERS = np.cumprod(np.r_[one, np.full(size - 1, _P, dtype=np.uint64)])
        _INV_POWERS = np.cumprod(np.r_[one, np.full(size - 1, pow(_P, -1, 1 << 64), dtype=np.uint64)])
    return _POWERS, _INV_POWERS


def rolling_hashes(cps: np.ndarray, n: int) -> np.ndarray:
    """64-bit polynomial hash sum((c + 1) * P^(n-1-j)) of every run of n consecutive code points (a whole text
    shorter than n gives one hash). Prefix sums of c * P^-j give every window in a few numpy passes whatever n
    is, rather than n passes or a Python step per character; all arithmetic wraps modulo 2^64."""
    length = len(cps)
    n = max(1, min(n, length))
    count = length - n + 1
    if length == 0:
        return np.zeros(0, dtype=np.uint64)
    powers, inverse = _powers(length)
    prefix = np.zeros(length + 1, dtype=np.uint64)
    np.cumsum((cps.astype(np.uint64) + np.uint64(1)) * inverse[:length], out=prefix[1:])
    return (prefix[n:] - prefix[:count]) * powers[n - 1:length]


def dup_ngram_ratio(cps: np.ndarray, n: int) -> float:
    """Share of characters covered by an n-character n-gram that occurs more than once in the text."""
    if len(cps) < 2 * n:
        return 0.0
    h = rolling_hashes(cps, n)
    ordered = np.sort(h)
    repeated = ordered[1:][ordered[1:] == ordered[:-1]]
    if len(repeated) == 0:  # the common case, one sort and out
        return 0.0
    starts = np.flatnonzero(np.isin(h, repeated))
    cover = np.zeros(len(cps) + 1, dtype=np.int32)
    np.add.at(cover, starts, 1)
    np.add.at(cover, starts + n, -1)
    return float(np.count_nonzero(np.cumsum(cover[:-1]))) / len(cps)


_LANGUAGE_IDS: dict = {}


def language_of(text: str, counts: np.ndarray, cfg: FilterConfig) -> tuple[bool, str]:
    """(wanted, language) of a document under the configured identifier and thresholds."""
    if cfg.language_id == "script":
        lang = detect_language(counts, text)
        return lang in cfg.languages, lang
    key = (cfg.languages, cfg.language_thresholds)
    if key not in _LANGUAGE_IDS:
        from corpus.langid import DEFAULT_THRESHOLD, LanguageId

        thresholds = {lang: DEFAULT_THRESHOLD for lang in cfg.languages}
        thresholds.update(cfg.language_thresholds)
        _LANGUAGE_IDS[key] = LanguageId(thresholds)
    return _LANGUAGE_IDS[key].keeps(text)


def first_failed_filter(lines: list[str], text: str, cfg: FilterConfig, info: dict | None = None) -> str | None:
    """Name of the first filter the document fails, or None. Cheap checks come first. `info` receives the
    document's language when the language filter ran."""
    n = len(text)
    if cfg.min_chars is not None and n < cfg.min_chars:
        return "too_short"
    if cfg.max_chars is not None and n > cfg.max_chars:
        return "too_long"
    cps = code_points(text)
    counts = np.bincount(CHAR_CLASS[cps], minlength=8)
    if cfg.languages is not None:
        wanted, lang = language_of(text, counts, cfg)
        if info is not None:
            info["language"] = lang
        if not wanted:
            return "language"
    visible = max(1, n - int(counts[SPACE]))
    if cfg.max_symbol_ratio is not None and counts[SYMBOL] / visible > cfg.max_symbol_ratio:
        return "symbols"
    if cfg.max_digit_ratio is not None and counts[DIGIT] / visible > cfg.max_digit_ratio:
        return "digits"
    if cfg.max_dup_line_ratio is not None and len(lines) > 1:
        if 1.0 - len(set(lines)) / len(lines) > cfg.max_dup_line_ratio:
            return "repeated_lines"
    if cfg.max_dup_ngram_ratio is not None and dup_ngram_ratio(cps, cfg.dup_ngram_chars) > cfg.max_dup_ngram_ratio:
        return "repeated_ngrams"
    return None


# ---------------------------------------------------------------------------------------------
# Sentences
# ---------------------------------------------------------------------------------------------
# A sentence ends after 。！？； (NFKC leaves 。 alone and folds ！？； to ASCII), after ASCII ! ? ; when a
# CJK character follows (folded Chinese punctuation), and after . ! ? followed by a space (English).
_SENTENCE_END = re.compile(r"(?<=[。！？；])|(?<=[.!?])(?= )|(?<=[!?;])(?=[\u3400-\u9fff\u3000-\u303f\uff00-\uffef])")


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) spans that tile the text; each span keeps its trailing space, so the document can be
    rebuilt from any subset of its sentences by concatenation."""
    cuts = [m.start() for m in _SENTENCE_END.finditer(text)]
    spans, start = [], 0
    for cut in cuts:
        while cut < len(text) and text[cut] == " ":
            cut += 1
        if cut > start:
            spans.append((start, cut))
            start = cut
    if start < len(text):
        spans.append((start, len(text)))
    return spans


# ---------------------------------------------------------------------------------------------
# MinHash
# ---------------------------------------------------------------------------------------------
class Signer:
    """MinHash signatures of character shingles, the same values datasketch computes.

    datasketch.MinHash(num_perm, seed, scheme="affine32") fed with 32-bit shingle hashes (identity
    hashfunc) pre-mixes each hash with the MurmurHash3 finalizer and keeps min(a * h + b mod 2^32) per
    permutation, with `a, b` drawn from `seed`. We take `a, b` from datasketch and apply that scheme to all
    shingles of a whole batch of texts at once: calling MinHash.update_batch per text costs a Python call
    per shingle and an object per text (6x slower on a Lu Xun + State of the Union sample, and letting
    datasketch SHA1 every shingle is 3x slower again). tests/test_prepare_data.py
    checks the signatures against datasketch's own, so LeanMinHash(seed=seed, hashvalues=row,
    scheme="affine32") of a row is exactly the MinHash of that text.
    """

    BLOCK = 8192  # shingles per numpy step: bounds the (block x num_perm) temporary to num_perm * 32 KB

    def __init__(self, num_perm: int, seed: int, shingle: int):
        self.num_perm, self.seed, self.shingle = num_perm, seed, shingle
        a, b = MinHash(num_perm=num_perm, seed=seed, scheme="affine32").permutations
        self.a, self.b = a.astype(np.uint32), b.astype(np.uint32)

    def shingle_hashes(self, text: str) -> np.ndarray:
        """32-bit hash of every `shingle` consecutive characters of the lower-cased text (spaces kept: they
        mark English word edges; case-folded so "The" and "the" shingle alike)."""
        h = rolling_hashes(code_points(text.lower()), self.shingle)
        return (h ^ (h >> np.uint64(32))).astype(np.uint32)

    def batch_shingle_hashes(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """shingle_hashes of every text, concatenated, and the count per text. One rolling hash runs over
        the joined texts and only the windows that lie inside one text are kept: per-text numpy calls
        would cost more than the hashing itself on sentence-sized texts."""
        k = self.shingle
        lowered = [t.lower() for t in texts]
        lens = np.array([len(t) for t in lowered], dtype=np.int64)
        starts = np.r_[0, np.cumsum(lens)[:-1]]  # of each text in the joined string
        counts = np.where(lens >= k, lens - k + 1, np.minimum(lens, 1))  # a short text is one shingle
        dest = np.r_[0, np.cumsum(counts)[:-1]]  # of each text's first shingle in the output
        out = np.empty(int(counts.sum()), dtype=np.uint64)
        every = rolling_hashes(code_points("".join(lowered)), k)
        long = lens >= k
        n = counts[long]
        local = np.arange(n.sum()) - np.repeat(np.r_[0, np.cumsum(n)[:-1]], n)  # 0.. within each text
        out[np.repeat(dest[long], n) + local] = every[np.repeat(starts[long], n) + local]
        for i in np.flatnonzero((lens > 0) & (lens < k)):
            out[dest[i]] = rolling_hashes(code_points(lowered[i]), k)[0]
        return (out ^ (out >> np.uint64(32))).astype(np.uint32), counts

    @staticmethod
    def fmix32(h: np.ndarray) -> np.ndarray:
        """MurmurHash3's 32-bit finalizer, as datasketch applies it before the permutations."""
        with np.errstate(over="ignore"):
            h = h ^ (h >> np.uint32(16))
            h = h * np.uint32(0x85EBCA6B)
            h = h ^ (h >> np.uint32(13))
            h = h * np.uint32(0xC2B2AE35)
            return h ^ (h >> np.uint32(16))

    def sign_many(self, texts: list[str]) -> np.ndarray:
        """(len(texts), num_perm) uint32 signatures; an empty text gets datasketch's empty signature."""
        out = np.full((len(texts), self.num_perm), np.iinfo(np.uint32).max, dtype=np.uint32)
        if not texts:
            return out
        flat, counts = self.batch_shingle_hashes(texts)
        flat = self.fmix32(flat)
        owner = np.repeat(np.arange(len(texts)), counts)  # text of each shingle
        with np.errstate(over="ignore"):
            for start in range(0, len(flat), self.BLOCK):
                # (num_perm, block): reducing along the contiguous axis is 5-10x faster than along axis 0
                block = self.a[:, None] * flat[None, start:start + self.BLOCK] + self.b[:, None]
                ids = owner[start:start + self.BLOCK]
                firsts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])  # runs of one text
                mins = np.minimum.reduceat(block, firsts, axis=1).T
                rows = ids[firsts]
                out[rows] = np.minimum(out[rows], mins)  # a text can span two blocks
        return out

    def sign(self, text: str) -> np.ndarray:
        return self.sign_many([text])[0]


def exact_key(text: str) -> int:
    """64-bit digest of the exact text for exact de-duplication (collisions: ~n^2/2^65, negligible)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")
