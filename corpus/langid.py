"""Language identification for prepare_data.py: py3langid's Naive Bayes model over byte n-grams (97 languages).

The model (model.npz.xz, 4.5 MB) ships inside the py3langid wheel and is read with numpy, so nothing is downloaded
at first use and nothing is unpickled. Two adjustments for a pretraining filter:

* Chinese varieties are one language here: the model tells Wu and Cantonese apart from Mandarin, and calls a
  quarter of the Chinese Wikipedia paragraphs of ../shared/data/corpus Wu, so their probabilities add up under
  "zh" (`GROUPS`). A confidence is the summed probability of a group.
* Only the first `SAMPLE_BYTES` UTF-8 bytes of a document are read: the model walks them in a Python loop, and a
  few hundred bytes tell Chinese from English from German as well as a whole book does.

A document is kept when its language is in the wanted list and its confidence reaches that language's threshold.
"""
from __future__ import annotations

import functools

import numpy as np

GROUPS = {"zh": ("zh", "wuu", "yue")}
SAMPLE_BYTES = 384
DEFAULT_THRESHOLD = 0.5


@functools.lru_cache(maxsize=1)
def _model():
    """The model and the group of each of its classes, loaded once per process (~2 s)."""
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    model = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    # float16 weights make each matrix product several times slower than the byte walk itself
    model.nb_ptc = np.asarray(model.nb_ptc, dtype=np.float32)
    model._full_model = (model.nb_ptc, model.nb_pc, model.nb_classes)
    members = {member: group for group, names in GROUPS.items() for member in names}
    return model, [members.get(label, label) for label in model.nb_classes]


class LanguageId:
    """classify(text) -> (language, confidence); keeps(text) under per-language thresholds."""

    def __init__(self, thresholds: dict[str, float] | None = None):
        self.model, self.group_of = _model()
        self.groups = sorted(set(self.group_of))
        self.group_index = np.array([self.groups.index(g) for g in self.group_of])
        self.thresholds = dict(thresholds or {})
        unknown = set(self.thresholds) - set(self.languages())
        if unknown:
            raise ValueError(f"unknown language code(s) {sorted(unknown)}; the model knows "
                             f"{', '.join(sorted(self.languages()))}")

    def languages(self) -> list[str]:
        return sorted(set(self.group_of))

    def classify(self, text: str) -> tuple[str, float]:
        sample = text.encode("utf-8")[:SAMPLE_BYTES].decode("utf-8", errors="ignore")
        probs = np.bincount(self.group_index, weights=self.model._decide(sample), minlength=len(self.groups))
        best = int(probs.argmax())
        return self.groups[best], float(probs[best])

    def keeps(self, text: str) -> tuple[bool, str]:
        """(kept, language): kept when the language is wanted and confident enough."""
        lang, confidence = self.classify(text)
        threshold = self.thresholds.get(lang)
        return threshold is not None and confidence >= threshold, lang


def parse_thresholds(languages: str, thresholds: str | None) -> dict[str, float]:
    """--languages zh,en and --language-threshold en=0.7 -> {"zh": 0.5, "en": 0.7}."""
    wanted = {lang.strip(): DEFAULT_THRESHOLD for lang in languages.split(",") if lang.strip()}
    for item in (thresholds or "").split(","):
        if not item.strip():
            continue
        lang, sep, value = item.partition("=")
        if not sep or lang.strip() not in wanted:
            raise ValueError(f"{item!r}: expected LANG=VALUE with LANG one of --languages {','.join(wanted)}")
        wanted[lang.strip()] = float(value)
    return wanted
