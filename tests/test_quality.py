"""Quality models (perplexity and classifier), language id, and prepare_data.py's quality step."""
import json
import random

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from conftest import shared_path

import corpus.pipeline as prepare_data
from corpus import langid, quality, quality_training as qt

NOUNS = "river teacher window garden station lantern meadow violin falcon harbour library kitchen".split()
ADJECTIVES = "quiet old bright small careful distant golden patient".split()
VERBS = "watched followed carried remembered described answered visited".split()


def sentence(rng: random.Random) -> str:
    """Grammatical toy English, so word order carries signal."""
    return (f"The {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} {rng.choice(VERBS)} the {rng.choice(NOUNS)} "
            f"near the {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}.")


def paragraph(rng: random.Random) -> str:
    return " ".join(sentence(rng) for _ in range(rng.randint(2, 4)))


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """Both kinds trained on a toy English reference written here; {kind: path}."""
    folder = tmp_path_factory.mktemp("quality")
    rng = random.Random(0)
    (folder / "en.txt").write_text("\n".join(paragraph(rng) for _ in range(600)) + "\n", encoding="utf-8")
    paths = {}
    for kind in quality.KINDS:
        paths[kind] = folder / f"{kind}.npz"
        assert qt.main(["--kind", kind, "--reference", f"en={folder / 'en.txt'}", "-o", str(paths[kind]),
                        "--max-units", "400"]) == 0
    return paths


@pytest.mark.parametrize("kind", quality.KINDS)
def test_tiny_model_round_trip_and_separates_poor_text(tiny_models, kind):
    model = quality.QualityModel.load(tiny_models[kind])
    assert model.kind == kind and model.languages == ["en"]
    rng = random.Random(5)
    clean = [paragraph(rng) for _ in range(100)]
    good = model.score("en", clean)
    for name, corrupt in qt.CORRUPTIONS.items():
        poor = model.score("en", [qt.normalized(corrupt(u, "en", random.Random(i))) for i, u in enumerate(clean)])
        auc = roc_auc_score(np.r_[np.ones(100), np.zeros(100)], np.r_[good, poor])
        assert auc >= 0.9, (kind, name, auc)
    assert model.percentile("en", 0) <= model.percentile("en", 50) <= model.percentile("en", 100)


@pytest.mark.real_data
def test_shipped_model_separates_planted_poor_text_in_held_out_text():
    """>= 100 held-out units per language (never trained on), each corruption kind separately."""
    sources = {"zh": shared_path("corpus", "zh", "luxun_works.txt"),
               "en": shared_path("corpus", "en", "gutenberg", "austen-emma.txt")}
    kind = "classifier"
    model = quality.QualityModel.load("default")
    for lang, path in sources.items():
        units = [u for u in qt.read_units(str(path)) if qt.held_out(u)]
        clean = random.Random(1).sample(units, 120)
        good = model.score(lang, clean)
        for name, corrupt in qt.CORRUPTIONS.items():
            rng = random.Random(1000)
            poor = model.score(lang, [qt.normalized(corrupt(u, lang, rng)) for u in clean])
            auc = roc_auc_score(np.r_[np.ones(len(good)), np.zeros(len(poor))], np.r_[good, poor])
            assert auc >= 0.9, (kind, lang, name, auc)


def test_bad_models_and_references_are_named(tmp_path, tiny_models):
    src = tmp_path / "in.txt"
    src.write_text("hello\n", encoding="utf-8")
    base = [str(src), "-o", str(tmp_path / "out"), "--num-shards", "1"]
    with pytest.raises(SystemExit):
        prepare_data.parse_args(base + ["--quality-model", str(tmp_path / "missing.npz")])
    with pytest.raises(quality.QualityModelError, match="missing.npz does not exist"):
        quality.QualityModel.load(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(quality.QualityModelError, match="junk.npz is not a quality model"):
        quality.QualityModel.load(tmp_path / "junk.npz")
    # an English-only model asked to judge Chinese
    with pytest.raises(quality.QualityModelError, match="no scorer for language.*zh"):
        quality.resolve_thresholds(quality.QualityModel.load(tiny_models["classifier"]), ("zh", "en"), None, None)
    with pytest.raises(SystemExit):
        prepare_data.parse_args(base + ["--quality-model", str(tiny_models["classifier"])])  # --languages zh,en
    # an empty reference corpus
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="empty.*has 0 units"):
        qt.main(["--kind", "perplexity", "--reference", f"en={tmp_path / 'empty'}", "-o", str(tmp_path / "m.npz")])
    with pytest.raises(SystemExit, match="does not exist"):
        qt.main(["--kind", "perplexity", "--reference", f"en={tmp_path / 'nope'}", "-o", str(tmp_path / "m.npz")])


@pytest.mark.parametrize("level", quality.LEVELS)
def test_prepare_data_drops_poor_units_and_keeps_scores(tmp_path, tiny_models, level):
    rng = random.Random(3)
    menu = " · ".join(qt.MENU["en"][:8])  # "|" would make the symbols filter take it first
    docs = [[paragraph(rng), menu, paragraph(rng)] for _ in range(6)] + [[paragraph(rng)] for _ in range(4)] \
        + [[" · ".join(qt.MENU["en"][8 + k:22 + k])] for k in range(3)]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": "\n".join(d)}) + "\n" for d in docs), encoding="utf-8")
    scores = tmp_path / "scores.jsonl"
    argv = [str(src), "-o", str(tmp_path / "out"), "--num-shards", "1", "--processes", "1", "--no-progress",
            "--languages", "en", "--quality-model", str(tiny_models["classifier"]), "--quality-level", level,
            "--quality-scores", str(scores), "--no-doc-dedup", "--no-sentence-dedup", "--no-exact-dedup"]
    result = prepare_data.run(prepare_data.parse_args(argv))
    out = (tmp_path / "out" / "part-00000.txt").read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in scores.read_text().splitlines()]
    histogram = result["quality"]["histogram"]["en"]["counts_below_between_above"]
    assert sum(histogram) == len(rows) == result["quality"]["units"]["scored"]
    assert all(row["kept"] == (row["score"] >= 0.5) for row in rows)
    assert len(out) == 10 and result["removed_documents"]["quality"] == 3  # the documents that are only a menu
    if level == "document":  # a menu between two paragraphs does not sink the document
        assert len(rows) == 13 and sum("Privacy Policy" in line for line in out) == 6
    else:  # the menu goes, the prose stays
        assert not any("Privacy Policy" in line for line in out)
        assert result["removed_characters"]["quality"] >= 9 * len(menu)
    assert result["characters_in"] == result["characters_out"] + sum(result["removed_characters"].values())


def test_language_id_model_groups_chinese_and_rejects_other_languages():
    ident = langid.LanguageId({"zh": 0.5, "en": 0.5})
    assert ident.keeps("我们的国家是一个统一的多民族国家，各民族人民共同创造了灿烂的文化。") == (True, "zh")
    assert ident.keeps("臺灣位於東亞，是一個島嶼，首都是臺北市，人口約兩千三百萬。") == (True, "zh")  # traditional
    assert ident.keeps("It was a bright cold day in April, and the clocks were striking thirteen.") == (True, "en")
    assert ident.keeps("Der schnelle braune Fuchs springt über den faulen Hund und läuft weg.") == (False, "de")
    strict = langid.LanguageId({"en": 1.01})
    assert strict.keeps("It was a bright cold day in April, and the clocks were striking thirteen.")[0] is False
    assert langid.parse_thresholds("zh,en", "en=0.8") == {"zh": 0.5, "en": 0.8}
    with pytest.raises(ValueError):
        langid.parse_thresholds("zh,en", "fr=0.8")
