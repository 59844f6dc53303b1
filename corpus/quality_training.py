"""Train a quality model for prepare_data.py --quality-model (entry point: scripts/train_quality_model.py).

Reference text is given per language (--reference zh=DIR_OR_FILE ...): .txt files, one unit per non-blank line,
long lines cut into pieces of whole sentences of at most --unit-chars characters. Every tenth unit (by a hash of
its text, `held_out`) is held out: never trained on, it sets the score quantiles stored in the model (what
--quality-percentile refers to) and is what benchmarks/bench_quality.py measures on.

The classifier also needs poor text. Unless --poor LANG=PATH is given, it is made from the training units by the
corruptions in CORRUPTIONS (shuffled words, repeated lines, keyword lists, encoding garbage, menus and
boilerplate), which are also what the benchmark plants, with other seeds, in held-out text.

The shipped models were built by (see docs/quality.md):
    python scripts/train_quality_model.py --kind classifier --output corpus/models/quality-classifier.npz \\
        --reference zh=../shared/data/corpus/zh --reference en=../shared/data/corpus/en
"""
from __future__ import annotations

import argparse
import random
import sys
import time
import zlib
from pathlib import Path

import numpy as np

from common import HelpFormatter
from corpus import quality, text as textproc

# ---------------------------------------------------------------------------------------------
# Poor text made from good text
# ---------------------------------------------------------------------------------------------
MENU = {
    "en": ["Home", "About Us", "Contact", "Privacy Policy", "Terms of Use", "Login", "Sign up", "Cart", "FAQ",
           "Sitemap", "Next", "Previous", "Share", "Tweet", "Copyright 2021 All rights reserved.", "Read more",
           "Click here to subscribe", "Back to top", "Search", "Categories", "Tags", "Archives", "Comments (0)",
           "Posted by admin", "Leave a reply", "Related posts", "Menu", "Skip to content", "Cookie settings"],
    "zh": ["首页", "关于我们", "联系我们", "隐私政策", "用户协议", "登录", "注册", "购物车", "网站地图", "上一页",
           "下一页", "分享到", "版权所有", "返回顶部", "点击查看更多", "加入收藏", "设为首页", "热门文章", "相关阅读",
           "发表评论", "在线客服", "免责声明", "友情链接", "意见反馈", "扫码关注", "立即购买", "客服热线", "更多>>"],
}
SEPARATORS = [" | ", " > ", " / ", " · ", "  ", " - "]


def _words(text: str, lang: str) -> list[str]:
    """Shuffle units: words for English, characters (there are no spaces) for Chinese."""
    return list(text.replace(" ", "")) if lang == "zh" else text.split()


def shuffled(text: str, lang: str, rng: random.Random) -> str:
    words = _words(text, lang)
    rng.shuffle(words)
    return ("" if lang == "zh" else " ").join(words)


def repeated(text: str, lang: str, rng: random.Random) -> str:
    spans = textproc.sentence_spans(text)
    s, e = spans[rng.randrange(len(spans))] if spans else (0, len(text))
    piece = text[s:e].strip()[:120] or text[:60]
    return " ".join([piece] * rng.randint(3, 8))


def keywords(text: str, lang: str, rng: random.Random) -> str:
    if lang == "zh":
        chars = [c for c in text if textproc.CHAR_CLASS[ord(c)] == textproc.CJK]
        pool = ["".join(chars[i:i + 2]) for i in range(0, max(0, len(chars) - 1), 2)] or ["关键"]
    else:
        pool = [w.strip(".,;:!?\"'()") for w in text.split() if len(w.strip(".,;:!?\"'()")) >= 4] or ["keyword"]
    chosen = rng.sample(pool, min(len(pool), rng.randint(3, 7)))
    sep = rng.choice([", ", " ", " | ", "，" if lang == "zh" else "; "])
    return sep.join(rng.choice(chosen) for _ in range(rng.randint(12, 40)))


def garbage(text: str, lang: str, rng: random.Random) -> str:
    """Mis-decoded bytes: Chinese UTF-8 read as Latin-1 / Windows-1252 (mojibake); English with a share of its
    words replaced by byte soup (ASCII stays ASCII under any Latin decoding, so mojibake alone leaves it intact)."""
    if lang == "zh":
        return text.encode("utf-8").decode(rng.choice(["latin-1", "cp1252"]), errors="replace")
    soup = "ÃÂâ€™œžŸ¢£¤¥¦§¨©ª«¬®¯°±²³´µ¶·¸¹º»¼½¾¿ï»¿\ufffd"
    share = rng.uniform(0.3, 0.7)
    return " ".join("".join(rng.choice(soup) for _ in range(rng.randint(2, 8))) if rng.random() < share else w
                    for w in text.split())


def boilerplate(text: str, lang: str, rng: random.Random) -> str:
    sep = rng.choice(SEPARATORS)
    return sep.join(rng.choice(MENU[lang]) for _ in range(rng.randint(5, 14)))


CORRUPTIONS = {"shuffled": shuffled, "repeated": repeated, "keywords": keywords, "garbage": garbage,
               "boilerplate": boilerplate}


def corrupt_all(units: list[str], lang: str, seed: int) -> list[str]:
    """One poor unit per good unit, the corruptions taken in turn."""
    rng = random.Random(seed)
    kinds = list(CORRUPTIONS.values())
    return [normalized(kinds[i % len(kinds)](u, lang, rng)) for i, u in enumerate(units)]


def normalized(text: str) -> str:
    """What prepare_data.py scores: the unit after its normalization."""
    return textproc.join_lines(textproc.normalize_lines(text))


# ---------------------------------------------------------------------------------------------
# Reference text
# ---------------------------------------------------------------------------------------------
def held_out(unit: str) -> bool:
    return zlib.crc32(unit.encode("utf-8")) % 10 == 0


def pieces(line: str, unit_chars: int) -> list[str]:
    """A normalized line cut after whole sentences into pieces of at most about unit_chars characters."""
    text = textproc.join_lines(textproc.normalize_lines(line))
    out, start = [], 0
    for s, e in textproc.sentence_spans(text):
        if e - start > unit_chars and s > start:
            out.append(text[start:s].strip())
            start = s
    if start < len(text):
        out.append(text[start:].strip())
    return [p for p in out if p]


def read_units(source: str, unit_chars: int = 400, min_chars: int = 40) -> list[str]:
    path = Path(source)
    if not path.exists():
        raise SystemExit(f"error: reference {path} does not exist")
    files = sorted(p for p in path.rglob("*.txt")) if path.is_dir() else [path]
    units = []
    for file in files:
        with open(file, encoding="utf-8", errors="strict") as f:
            try:
                for line in f:
                    if line.strip():
                        units += [p for p in pieces(line, unit_chars) if len(p) >= min_chars]
            except UnicodeDecodeError as err:
                raise SystemExit(f"error: reference file {file} is not UTF-8 ({err})") from None
    return units


def split(units: list[str], max_units: int, seed: int) -> tuple[list[str], list[str]]:
    """(training units, held-out units), each at most max_units, sampled with the seed."""
    train = [u for u in units if not held_out(u)]
    test = [u for u in units if held_out(u)]
    rng = random.Random(seed)
    return (rng.sample(train, min(max_units, len(train))), rng.sample(test, min(max_units, len(test))))


def train(kind: str, references: dict[str, str], poor: dict[str, str], max_units: int, seed: int,
          unit_chars: int = 400, log=print) -> quality.QualityModel:
    scorers, quantiles = {}, {}
    for lang, source in sorted(references.items()):
        t0 = time.perf_counter()
        units = read_units(source, unit_chars)
        good, test = split(units, max_units, seed)
        if len(good) < 10 or len(test) < 2:
            raise SystemExit(f"error: reference corpus {source} for language {lang!r} has {len(units)} units of "
                             f">= 40 characters; at least 10 training and 2 held-out units are needed")
        if kind == "perplexity":
            scorer = quality.NgramLM.train(good)
        else:
            bad = read_units(poor[lang], unit_chars) if lang in poor else corrupt_all(good, lang, seed)
            if not bad:
                raise SystemExit(f"error: poor text {poor.get(lang)} for language {lang!r} is empty")
            scorer = quality.LinearClassifier.train(good, bad, seed=seed)
        scores = scorer.score_many(test)
        scorers[lang] = scorer
        quantiles[lang] = [round(float(x), 5) for x in np.percentile(scores, np.linspace(0, 100, 101))]
        log(f"{lang}: {len(good):,} training units, {len(test):,} held out; held-out score median "
            f"{np.median(scores):.3f}, 5th percentile {np.percentile(scores, 5):.3f} "
            f"({time.perf_counter() - t0:.1f} s)")
    return quality.QualityModel(kind, scorers, quantiles)


def _pairs(items: list[str], flag: str) -> dict[str, str]:
    out = {}
    for item in items or []:
        lang, sep, value = item.partition("=")
        if not sep or not lang or not value:
            raise SystemExit(f"error: {flag} {item!r}: expected LANG=PATH, e.g. {flag} zh=corpus/zh")
        out[lang] = value
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--kind", choices=quality.KINDS, required=True, help="perplexity (n-gram LM) or classifier")
    p.add_argument("--reference", action="append", required=True, metavar="LANG=PATH",
                   help="good text of one language: a .txt file or a folder of them (repeat per language)")
    p.add_argument("--poor", action="append", metavar="LANG=PATH",
                   help="classifier only: poor text of one language (default: made from the reference by the "
                        "corruptions shuffled, repeated, keywords, garbage, boilerplate)")
    p.add_argument("--output", "-o", required=True, help="model file to write (.npz)")
    p.add_argument("--max-units", type=int, default=20000,
                   help="training units per language, sampled (default 20000)")
    p.add_argument("--unit-chars", type=int, default=400,
                   help="reference lines are cut into pieces of whole sentences of about this many characters "
                        "(default 400)")
    p.add_argument("--seed", type=int, default=0, help="sampling and corruption seed (default 0)")
    args = p.parse_args(argv)
    references = _pairs(args.reference, "--reference")
    poor = _pairs(args.poor, "--poor")
    if args.kind == "perplexity" and poor:
        p.error("--poor is for --kind classifier")
    if set(poor) - set(references):
        p.error(f"--poor for {sorted(set(poor) - set(references))} without a --reference for it")
    model = train(args.kind, references, poor, args.max_units, args.seed, args.unit_chars)
    model.save(args.output)
    print(f"wrote {args.output} ({Path(args.output).stat().st_size / 1e6:.2f} MB): {args.kind}, languages "
          f"{', '.join(model.languages)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
