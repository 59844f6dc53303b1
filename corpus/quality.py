"""Quality scoring of text units (documents, paragraphs, sentences) for prepare_data.py --quality-model.

Two kinds of scorer, one file format, one convention: a score per unit, higher is better, one model per language.

* ``perplexity`` (the CCNet recipe): an n-gram language model of good reference text. The score is the mean log2
  probability per token (perplexity = 2 ** -score). Tokens are lower-cased Latin words, digit runs and single
  other characters (so one Chinese character is one token). Smoothing is interpolated absolute discounting
  (Ney et al. 1994) over orders 1..N, with n-grams seen once pruned. Counting is a few numpy sorts over 64-bit
  n-gram keys: KenLM's pip module can only query models (its `lmplz` trainer is C++ outside the wheel) and
  nltk.lm counts in Python dictionaries, ~50x slower on the same text.
* ``classifier`` (fastText-style): a linear model, logistic regression on hashed token unigrams and bigrams
  (scikit-learn's HashingVectorizer + LogisticRegression, the same model fastText trains), good reference text
  against poor text. The score is the probability of "good".

A model file is a numpy .npz read with allow_pickle=False (a downloaded model is data, never code): a JSON header
(kind, languages, parameters, the quantiles of the scores of held-out reference text per language) and the
arrays of each language under "<lang>.<name>". Train one with scripts/train_quality_model.py.
"""
from __future__ import annotations

import json
import re
import zipfile
import zlib
from pathlib import Path

import numpy as np

FORMAT = "baichuan-quality-model/1"
KINDS = ("perplexity", "classifier")
SHIPPED = Path(__file__).resolve().parent / "models"
# Names accepted by --quality-model besides a path: the model this repository ships (see docs/quality.md)
NAMED = {"default": SHIPPED / "quality-classifier.npz"}
MIN_SCORE = -40.0  # score of a unit without a single token

_TOKEN = re.compile(r"[a-z\u00c0-\u024f]+|\d+|\S")


def tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


class QualityModelError(ValueError):
    """A model file that cannot be used; the message names the file."""


# ---------------------------------------------------------------------------------------------
# Perplexity: n-gram language model
# ---------------------------------------------------------------------------------------------
BOS, UNK = 0, 1
KEY_BITS = 20  # bits per token id in an n-gram key: vocabularies up to 1 M tokens, orders up to 3


def _ids(vocab: dict[str, int], units: list[str], order: int, with_lengths: bool = False):
    """Token ids of all units, each preceded by order-1 BOS, and the unit index of each predicted position
    (-1 on padding); with_lengths: also the characters of each predicted token."""
    seq, owner, lengths = [], [], []
    for u, text in enumerate(units):
        toks = tokens(text)
        seq += [BOS] * (order - 1) + [vocab.get(t, UNK) for t in toks]
        owner += [-1] * (order - 1) + [u] * len(toks)
        if with_lengths:
            lengths += [len(t) for t in toks]
    out = np.array(seq, dtype=np.uint64), np.array(owner, dtype=np.int64)
    return (*out, np.array(lengths, dtype=np.float64)) if with_lengths else out


def _keys(seq: np.ndarray, k: int) -> np.ndarray:
    """Key of the k-gram ending at every position (positions < k-1 see ids wrapped from the end; the caller
    only reads positions after a unit's BOS padding)."""
    key = seq.copy()
    for j in range(1, k):
        key |= np.roll(seq, j) << np.uint64(KEY_BITS * j)
    return key


def _lookup(sorted_keys: np.ndarray, values: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(found, value) for each key in a sorted key table."""
    if len(sorted_keys) == 0:
        return np.zeros(len(keys), dtype=bool), np.zeros(len(keys), dtype=values.dtype)
    pos = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
    found = sorted_keys[pos] == keys
    return found, np.where(found, values[pos], 0)


def repeated_share(seq: np.ndarray, owner: np.ndarray, units: int) -> np.ndarray:
    """Per unit, the share of its token trigrams that occur more than once in it. An n-gram model rates a
    fluent sentence said five times as fluent, and a bag of n-grams sees the sentence once; this is what sees
    the repetition."""
    predicted = owner >= 0
    keys = _keys(seq, 3)[predicted] ^ (owner[predicted].astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15))
    _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    repeated = (counts[inverse] > 1).astype(np.float64)
    n = np.bincount(owner[predicted], minlength=units)
    return np.bincount(owner[predicted], weights=repeated, minlength=units) / np.maximum(n, 1)


class NgramLM:
    """score = L + GAIN * (L - U) - REPEAT_BITS * repeated_share, with L the mean log2 probability per token
    under the n-gram model and U under its unigram part alone.

    L - U is what the context adds: shuffled words keep their unigram probabilities and lose the gain, while
    the spread of L between genres (verse, law, encyclopedia) largely cancels in it. A unit that is one phrase
    over and over loses up to REPEAT_BITS bits per token: the gain term rewards a phrase that predicts its own
    repetition, so this has to outweigh it. GAIN and REPEAT_BITS were set on benchmarks/bench_quality.py."""

    DISCOUNT = 0.75
    GAIN = 2.0
    REPEAT_BITS = 20.0
    # An unseen token costs this many bits per character on top of p(<unk>): <unk> is one class for every
    # unseen token, so without it a run of byte soup looks like a run of rare names.
    UNSEEN_BITS_PER_CHAR = 1.5

    def __init__(self, vocab: list[str], arrays: dict[str, np.ndarray], order: int):
        self.vocab_list = vocab
        self.vocab = {t: i for i, t in enumerate(vocab)}
        self.arrays, self.order = arrays, order

    @classmethod
    def train(cls, units: list[str], order: int = 3, min_count: int = 2, max_vocab: int = 50_000,
              prune: int = 2) -> "NgramLM":
        counts: dict[str, int] = {}
        for text in units:
            for t in tokens(text):
                counts[t] = counts.get(t, 0) + 1
        kept = sorted((t for t, c in counts.items() if c >= min_count), key=lambda t: (-counts[t], t))
        vocab = ["<s>", "<unk>"] + kept[:min(max_vocab, (1 << KEY_BITS) - 2)]
        model = cls(vocab, {}, order)
        seq, owner = _ids(model.vocab, units, order)
        predicted = owner >= 0
        arrays = {"unigram": np.bincount(seq[predicted].astype(np.int64), minlength=len(vocab)).astype(np.uint32)}
        for k in range(2, order + 1):
            keys = _keys(seq, k)[predicted]
            grams, grams_n = np.unique(keys, return_counts=True)
            ctx, ctx_total = np.unique(keys >> np.uint64(KEY_BITS), return_counts=True)
            _, ctx_types = np.unique(grams >> np.uint64(KEY_BITS), return_counts=True)  # same order as ctx
            keep = grams_n >= prune
            arrays[f"keys{k}"], arrays[f"counts{k}"] = grams[keep], grams_n[keep].astype(np.uint32)
            keep = ctx_total >= prune
            arrays[f"ctx{k}"] = ctx[keep]
            arrays[f"ctx_total{k}"] = ctx_total[keep].astype(np.uint32)
            arrays[f"ctx_types{k}"] = ctx_types[keep].astype(np.uint32)
        model.arrays = arrays
        return model

    def score_many(self, units: list[str]) -> np.ndarray:
        """Score of each unit (see the class docstring); MIN_SCORE for a unit without tokens."""
        seq, owner, lengths = _ids(self.vocab, units, self.order, with_lengths=True)
        predicted = owner >= 0
        a, d = self.arrays, self.DISCOUNT
        unigram = a["unigram"].astype(np.float64)
        p = (unigram[seq[predicted].astype(np.int64)] + 0.5) / (unigram.sum() + 0.5 * len(unigram))
        log_unigram = np.log2(p)
        for k in range(2, self.order + 1):
            keys = _keys(seq, k)[predicted]
            found, total = _lookup(a[f"ctx{k}"], a[f"ctx_total{k}"], keys >> np.uint64(KEY_BITS))
            _, types = _lookup(a[f"ctx{k}"], a[f"ctx_types{k}"], keys >> np.uint64(KEY_BITS))
            _, count = _lookup(a[f"keys{k}"], a[f"counts{k}"], keys)
            total = np.maximum(total, 1).astype(np.float64)
            interpolated = (np.maximum(count - d, 0.0) + d * types * p) / total
            p = np.where(found, interpolated, p)
        unseen = self.UNSEEN_BITS_PER_CHAR * np.where(seq[predicted] == UNK, lengths, 0)
        units_of = owner[predicted]
        n = np.bincount(units_of, minlength=len(units))
        mean = np.bincount(units_of, weights=np.log2(p) - unseen, minlength=len(units)) / np.maximum(n, 1)
        gain = mean - np.bincount(units_of, weights=log_unigram - unseen, minlength=len(units)) / np.maximum(n, 1)
        score = mean + self.GAIN * gain - self.REPEAT_BITS * repeated_share(seq, owner, len(units))
        return np.where(n > 0, score, MIN_SCORE)

    def to_arrays(self) -> tuple[dict, dict[str, np.ndarray]]:
        vocab = np.frombuffer("\n".join(self.vocab_list).encode("utf-8"), dtype=np.uint8)
        return {"order": self.order}, {"vocab": vocab, **self.arrays}

    @classmethod
    def from_arrays(cls, params: dict, arrays: dict[str, np.ndarray]) -> "NgramLM":
        vocab = arrays.pop("vocab").tobytes().decode("utf-8").split("\n")
        return cls(vocab, arrays, int(params["order"]))


# ---------------------------------------------------------------------------------------------
# Classifier: hashed unigrams + bigrams, logistic regression
# ---------------------------------------------------------------------------------------------
def _features(text: str) -> list[str]:
    toks = tokens(text)
    return toks + [a + " " + b for a, b in zip(toks, toks[1:])]


class _HashVocab(dict):
    """Token ids without a vocabulary, for repeated_share: a stable 20-bit hash of the token."""

    def get(self, token, default=None):
        return zlib.crc32(token.encode("utf-8")) & ((1 << KEY_BITS) - 1)


class LinearClassifier:
    def __init__(self, coef: np.ndarray, intercept: float):
        from sklearn.feature_extraction.text import HashingVectorizer

        self.coef, self.intercept = coef.astype(np.float32), float(intercept)
        self.vectorizer = HashingVectorizer(analyzer=_features, n_features=len(coef) - 1, alternate_sign=False,
                                            norm="l2")

    @classmethod
    def train(cls, good: list[str], poor: list[str], n_features: int = 1 << 18, c: float = 4.0,
              seed: int = 0) -> "LinearClassifier":
        from sklearn.linear_model import LogisticRegression

        model = cls(np.zeros(n_features + 1, dtype=np.float32), 0.0)
        y = np.r_[np.ones(len(good)), np.zeros(len(poor))]
        fit = LogisticRegression(C=c, max_iter=1000, random_state=seed).fit(model.features(good + poor), y)
        return cls(fit.coef_[0], fit.intercept_[0])

    def features(self, units: list[str]):
        """(units, n_features + 1): L2-normalised hashed unigrams and bigrams, then repeated_share (a bag of
        n-grams cannot see that a phrase repeats: its direction is the same as the phrase said once)."""
        from scipy.sparse import csr_matrix, hstack

        seq, owner = _ids(_HashVocab(), units, 3)
        share = repeated_share(seq, owner, len(units))
        return hstack([self.vectorizer.transform(units), csr_matrix(share[:, None])], format="csr")

    def score_many(self, units: list[str]) -> np.ndarray:
        """Probability that each unit is good text."""
        logits = self.features(units) @ self.coef + self.intercept
        return 1.0 / (1.0 + np.exp(-logits))

    def to_arrays(self) -> tuple[dict, dict[str, np.ndarray]]:
        return {}, {"coef": self.coef.astype(np.float16), "intercept": np.array([self.intercept])}

    @classmethod
    def from_arrays(cls, params: dict, arrays: dict[str, np.ndarray]) -> "LinearClassifier":
        return cls(arrays["coef"], float(arrays["intercept"][0]))


SCORERS = {"perplexity": NgramLM, "classifier": LinearClassifier}


# ---------------------------------------------------------------------------------------------
# Model file
# ---------------------------------------------------------------------------------------------
class QualityModel:
    """Per-language scorers of one kind, the quantiles of held-out reference scores, and the default thresholds."""

    def __init__(self, kind: str, scorers: dict, quantiles: dict[str, list[float]], path: str = "<memory>"):
        self.kind, self.scorers, self.quantiles, self.path = kind, scorers, quantiles, path

    @property
    def languages(self) -> list[str]:
        return sorted(self.scorers)

    def score(self, lang: str, units: list[str]) -> np.ndarray:
        if lang not in self.scorers:
            raise QualityModelError(f"quality model {self.path} has no scorer for language {lang!r} "
                                    f"(it has {', '.join(self.languages)})")
        return np.asarray(self.scorers[lang].score_many(units), dtype=np.float64) if units else np.zeros(0)

    def percentile(self, lang: str, q: float) -> float:
        """Score below which q percent of the held-out reference units of `lang` fall."""
        return float(np.interp(q, np.linspace(0, 100, len(self.quantiles[lang])), self.quantiles[lang]))

    def default_threshold(self, lang: str) -> float:
        """Classifier: probability 0.5; perplexity: the 5th percentile of the reference."""
        return 0.5 if self.kind == "classifier" else self.percentile(lang, 5.0)

    def save(self, path: str | Path) -> None:
        header = {"format": FORMAT, "kind": self.kind, "languages": {}}
        arrays = {}
        for lang, scorer in self.scorers.items():
            params, own = scorer.to_arrays()
            header["languages"][lang] = {"params": params, "quantiles": self.quantiles[lang]}
            arrays.update({f"{lang}.{name}": value for name, value in own.items()})
        arrays["header"] = np.frombuffer(json.dumps(header).encode("utf-8"), dtype=np.uint8)
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez_compressed(tmp, **arrays)
        tmp.replace(path)

    @classmethod
    def load(cls, name: str | Path) -> "QualityModel":
        path = NAMED.get(str(name), Path(name))
        if not path.is_file():
            raise QualityModelError(f"quality model {path} does not exist (train one with "
                                    "scripts/train_quality_model.py, or use one of: " + ", ".join(NAMED) + ")")
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {key: data[key] for key in data.files}
            header = json.loads(arrays.pop("header").tobytes().decode("utf-8"))
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
            raise QualityModelError(f"quality model {path} is not a quality model file ({type(err).__name__}: "
                                    f"{err})") from None
        if header.get("format") != FORMAT or header.get("kind") not in SCORERS:
            raise QualityModelError(f"quality model {path}: unknown format {header.get('format')!r} / kind "
                                    f"{header.get('kind')!r}")
        scorers, quantiles = {}, {}
        for lang, info in header["languages"].items():
            own = {key.split(".", 1)[1]: value for key, value in arrays.items() if key.startswith(lang + ".")}
            scorers[lang] = SCORERS[header["kind"]].from_arrays(info["params"], own)
            quantiles[lang] = info["quantiles"]
        return cls(header["kind"], scorers, quantiles, str(path))


# ---------------------------------------------------------------------------------------------
# Units and the per-document step of prepare_data.py
# ---------------------------------------------------------------------------------------------
LEVELS = ("document", "paragraph", "sentence")


def split_units(lines: list[str], level: str, join_lines, sentence_spans) -> list[str]:
    """The units of one normalized document: the whole text, its lines, or its sentences."""
    text = join_lines(lines)
    if level == "document":
        return [text]
    if level == "paragraph":
        return list(lines)
    return [text[s:e].strip() for s, e in sentence_spans(text)]


class Histogram:
    """Fixed-bin histogram of scores per language (bins from the model's reference quantiles), so memory does not
    grow with the corpus."""

    BINS = 30

    def __init__(self, model: QualityModel):
        self.edges, self.counts = {}, {}
        for lang in model.languages:
            q = model.quantiles[lang]
            low, high = q[0], q[-1]
            if model.kind == "classifier":
                low, high = 0.0, 1.0
            else:  # poor text scores far below the reference: room below it
                low -= (high - low)
            self.edges[lang] = np.linspace(low, high, self.BINS + 1)
            self.counts[lang] = np.zeros(self.BINS + 2, dtype=np.int64)  # + below and above the edges

    def add(self, lang: str, scores: np.ndarray) -> None:
        if lang in self.edges and len(scores):
            self.counts[lang] += np.bincount(np.searchsorted(self.edges[lang], scores, side="right"),
                                             minlength=self.BINS + 2)

    def to_dict(self) -> dict:
        return {lang: {"edges": [round(float(e), 4) for e in self.edges[lang]],
                       "counts_below_between_above": self.counts[lang].tolist()} for lang in self.edges}

    def render(self, thresholds: dict[str, float], width: int = 40) -> str:
        lines = []
        for lang in self.edges:
            counts, edges = self.counts[lang], self.edges[lang]
            if counts.sum() == 0:
                continue
            lines.append(f"quality scores, {lang} ({counts.sum():,} units; '<' marks the threshold "
                         f"{thresholds.get(lang, float('nan')):.3f}):")
            peak = max(1, counts.max())
            labels = [f"< {edges[0]:.3f}"] + [f"{edges[i]:.3f} .. {edges[i + 1]:.3f}" for i in range(len(edges) - 1)] \
                + [f">= {edges[-1]:.3f}"]
            t = thresholds.get(lang)
            for i, (label, n) in enumerate(zip(labels, counts)):
                low = -np.inf if i == 0 else edges[i - 1]
                mark = "<" if t is not None and low <= t < (edges[i] if i < len(edges) else np.inf) else " "
                if n or mark == "<":
                    lines.append(f"  {label:>20} {mark} {n:>10,} {'#' * int(round(width * n / peak))}")
        return "\n".join(lines)


class QualityStep:
    """The quality step of prepare_data.py for one document: score its units, drop those below the threshold of
    the document's language. Built in each worker process from the model path."""

    def __init__(self, model_name: str, level: str, thresholds: dict[str, float]):
        self.model = QualityModel.load(model_name)
        self.level, self.thresholds = level, thresholds

    def apply_many(self, documents: list[list[str]], langs: list[str], join_lines, sentence_spans) -> list:
        """apply() for many documents, with one scoring call per language."""
        units = [split_units(lines, self.level, join_lines, sentence_spans) if lang in self.thresholds else []
                 for lines, lang in zip(documents, langs)]
        scores = [None] * len(documents)
        for lang in set(langs) & set(self.thresholds):
            mine = [i for i, other in enumerate(langs) if other == lang]
            flat = self.model.score(lang, [u for i in mine for u in units[i]])
            bounds = np.cumsum([0] + [len(units[i]) for i in mine])
            for k, i in enumerate(mine):
                scores[i] = flat[bounds[k]:bounds[k + 1]]
        return [self.apply(lines, lang, join_lines, sentence_spans, s)
                for lines, lang, s in zip(documents, langs, scores)]

    def apply(self, lines: list[str], lang: str, join_lines, sentence_spans, scores=None):
        """(kept text, scores, kept mask), or (None, None, None) when the model has no scorer for `lang`."""
        if lang not in self.thresholds:
            return None, None, None
        if scores is None:
            scores = self.model.score(lang, split_units(lines, self.level, join_lines, sentence_spans))
        keep = scores >= self.thresholds[lang]
        if self.level == "paragraph":
            units = lines
            kept = join_lines([u for u, k in zip(units, keep) if k])
        else:  # sentence units keep their separating spaces when put back together
            text = join_lines(lines)
            if self.level == "document":
                kept = text if keep[0] else ""
            else:
                kept = "".join(text[s:e] for (s, e), k in zip(sentence_spans(text), keep) if k).strip()
        return kept, scores, keep


def resolve_thresholds(model: QualityModel, languages, threshold: str | None, percentile: str | None
                       ) -> dict[str, float]:
    """Per-language thresholds from --quality-threshold / --quality-percentile ('X' for every language or
    'zh=X,en=Y'), else the model's defaults. Raises QualityModelError for a language the model lacks."""
    wanted = list(languages) if languages is not None else model.languages
    missing = [lang for lang in wanted if lang not in model.languages]
    if missing:
        raise QualityModelError(f"quality model {model.path} has no scorer for language(s) {', '.join(missing)} "
                                f"(it has {', '.join(model.languages)}); train one with "
                                f"scripts/train_quality_model.py --reference {missing[0]}=PATH, or leave "
                                f"{missing[0]} out of --languages")

    def per_language(value: str, flag: str) -> dict[str, float]:
        if "=" not in value:
            return {lang: float(value) for lang in wanted}
        out = {}
        for item in value.split(","):
            lang, _, number = item.partition("=")
            if lang.strip() not in wanted:
                raise QualityModelError(f"{flag} {item!r}: {lang.strip()!r} is not among {', '.join(wanted)}")
            out[lang.strip()] = float(number)
        return out

    thresholds = {lang: model.default_threshold(lang) for lang in wanted}
    if threshold:
        thresholds.update(per_language(threshold, "--quality-threshold"))
    if percentile:
        thresholds.update({lang: model.percentile(lang, q)
                           for lang, q in per_language(percentile, "--quality-percentile").items()})
    return thresholds
