"""scripts/prepare_data.py on small corpora built here: normalization, each filter, exact / near-duplicate removal
at document and sentence level, deterministic and balanced shards, malformed input counted and reported."""
import gzip
import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest
from datasketch import MinHash, MinHashLSH

from conftest import ROOT

import corpus.pipeline as prepare_data
from corpus import dedup as prep_dedup, text as prep_text

WORDS = ("the of and to in that with have for on as was are you he she we they his her not but at by this "
         "river mountain library teacher window bridge garden kitchen winter summer morning evening station "
         "notebook harbour lantern meadow orchard violin compass saddle glacier canyon thunder whisper "
         "marble copper velvet cedar falcon badger otter heron maple willow ember frost amber cobalt "
         "quietly slowly bravely gently early later often seldom always never travel gather follow "
         "wander listen answer remember borrow carry describe explain imagine measure notice promise").split()


def english(rng: random.Random, words: int = 160) -> str:
    sentences, left = [], words
    while left > 0:
        n = min(left, rng.randint(8, 16))
        sentence = " ".join(rng.choice(WORDS) for _ in range(n))
        sentences.append(sentence[0].upper() + sentence[1:] + ".")
        left -= n
    return " ".join(sentences)


def chinese(rng: random.Random, chars: int = 400) -> str:
    out, left = [], chars
    while left > 0:
        n = min(left, rng.randint(12, 24))
        out.append("".join(chr(rng.randint(0x4E00, 0x9FA5)) for _ in range(n)) + "。")
        left -= n
    return "".join(out)


def edit(text: str, rng: random.Random, n: int) -> str:
    """n single-character substitutions away from the ends."""
    chars = list(text)
    for pos in rng.sample(range(10, len(chars) - 10), n):
        chars[pos] = "x" if chars[pos] != "x" else "y"
    return "".join(chars)


def run(tmp_path, inputs, *extra, shards=2, out="data"):
    out_dir = tmp_path / out
    if "--world-size" not in extra and "--num-shards" not in extra:
        extra += ("--num-shards", str(shards))
    argv = [str(p) for p in inputs] + ["-o", str(out_dir), "--no-progress",
                                        "--processes", "1", "--report", str(tmp_path / "report.json"),
                                        "--log-removed", str(tmp_path / "removed.jsonl"), *extra]
    result = prepare_data.run(prepare_data.parse_args(argv))
    lines = []
    for shard in sorted(out_dir.iterdir()):
        lines += shard.read_text(encoding="utf-8").splitlines()
    removed = [json.loads(x) for x in (tmp_path / "removed.jsonl").read_text(encoding="utf-8").splitlines()]
    return result, lines, removed


def shard_bytes(out_dir: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(out_dir.iterdir())}


# ------------------------------------------------------------------------------------------------------------
# Pieces
# ------------------------------------------------------------------------------------------------------------
def test_signatures_are_datasketch_minhashes():
    signer = prep_text.Signer(num_perm=64, seed=3, shingle=5)
    rng = random.Random(0)
    texts = [english(rng, 40), chinese(rng, 300), "abc", "", "İstanbul İİ mixed 大小写 TEXT", english(rng, 3000)]
    sigs = signer.sign_many(texts)
    for text, sig in zip(texts, sigs):
        reference = MinHash(num_perm=64, seed=3, hashfunc=lambda h: h, scheme="affine32")
        reference.update_batch(signer.shingle_hashes(text).tolist())
        assert np.array_equal(sig, reference.hashvalues), text[:30]


def test_normalization_nfkc_controls_whitespace_and_line_joins():
    raw = "Ｈｅｌｌｏ\u3000ｗｏｒｌｄ！\x07 tab\there\u200b\r\n\n  second   line \x00\n中文第一行\n中文第二行\ufeff\n"
    lines = prep_text.normalize_lines(raw)
    assert lines == ["Hello world! tab here", "second line", "中文第一行", "中文第二行"]
    joined = prep_text.join_lines(lines)
    assert joined == "Hello world! tab here second line 中文第一行中文第二行"
    assert len(joined.splitlines()) == 1


def test_sentence_spans_tile_the_text():
    text = "第一句话在这里。第二句!第三句? Then English. And more! Last one"
    spans = prep_text.sentence_spans(text)
    assert "".join(text[s:e] for s, e in spans) == text
    pieces = [text[s:e].strip() for s, e in spans]
    assert pieces == ["第一句话在这里。", "第二句!", "第三句?", "Then English.", "And more!", "Last one"]


def words_from(rng, vocabulary: str, n: int) -> str:
    return " ".join(rng.choice(vocabulary.split()) for _ in range(n)) + "."


RUSSIAN = "это длинный русский текст который не является ни китайским ни английским языком мы пишем слово дом"
FRENCH = "ceci est un long texte en français écrit pour vérifier le filtre de langue du script avec des mots"
FILTER_CASES = {  # name -> (lines of a document that fails only that filter, filters to switch off to pass it)
    "too_short": (lambda rng: ["This is a short line of text."], ["min_chars"]),
    "too_long": (lambda rng: [english(rng, 400)], ["max_chars"]),
    "language_ru": (lambda rng: [words_from(rng, RUSSIAN, 60)], ["languages"]),
    "language_fr": (lambda rng: [words_from(rng, FRENCH, 60)], ["languages"]),
    "symbols": (lambda rng: [english(rng, 40) + " $$ ## << >> @@ || {{ }} == ++ ** ~~ ^^ %% && // \\\\"],
                ["max_symbol_ratio"]),
    "digits": (lambda rng: [" ".join(f"{w} {rng.randint(10**6, 10**9)}" for w in english(rng, 30).split())],
               ["max_digit_ratio"]),
    # a repeated line is also a repeated n-gram, so the n-gram rule has to go as well
    "repeated_lines": (lambda rng: [english(rng, 10)] * 3 + [english(rng, 30)], ["max_dup_line_ratio",
                                                                                  "max_dup_ngram_ratio"]),
    "repeated_ngrams": (lambda rng: [english(rng, 8) + " " + english(rng, 6) * 6], ["max_dup_ngram_ratio"]),
}


@pytest.mark.parametrize("case", sorted(FILTER_CASES))
def test_each_filter_removes_what_it_should(case):
    make, switches = FILTER_CASES[case]
    lines = make(random.Random(case))
    text = prep_text.join_lines(lines)
    cfg = prep_text.FilterConfig(max_chars=1000)
    expected = "language" if case.startswith("language") else case
    assert prep_text.first_failed_filter(lines, text, cfg) == expected
    # and nothing else fails it: with its filter(s) off the document passes
    off = prep_text.FilterConfig(**{"max_chars": 1000, **{name: None for name in switches}})
    assert prep_text.first_failed_filter(lines, text, off) is None


def test_good_documents_pass_the_filters():
    rng = random.Random(1)
    cfg = prep_text.FilterConfig()
    mixed = chinese(rng, 80) + " with some English words " + chinese(rng, 60)
    for text in [english(rng), chinese(rng), mixed]:
        assert prep_text.first_failed_filter([text], text, cfg) is None, text[:40]


def test_language_detection():
    rng = random.Random(2)
    detect = lambda t: prep_text.detect_language(np.bincount(prep_text.CHAR_CLASS[prep_text.code_points(t)],
                                                             minlength=8), t)
    assert detect(chinese(rng)) == "zh"
    assert detect(english(rng)) == "en"
    assert detect("これは日本語のテキストです。ひらがなとカタカナがたくさんあります。") == "other"
    assert detect("12345 !!! ???") == "other"


def test_key_table_merges_keep_every_key():
    table = prep_dedup.KeyTable(merge_every=50)
    rng = np.random.default_rng(0)
    keys = rng.integers(0, 2**63, (1000, 3), dtype=np.uint64)
    for i, row in enumerate(keys.tolist()):
        table.add(row, i)
        table.maybe_merge()
    assert len(table) == 3000 and len(table.keys) >= 2950 and len(table.recent) < 50  # merged as it went
    batch = table.batch(np.concatenate([keys, rng.integers(0, 2**63, (100, 3), dtype=np.uint64)]))
    assert [table.query(batch, i) for i in range(1100)] == [{i} for i in range(1000)] + [set()] * 100
    mixed = table.batch(np.array([[keys[7, 0], 1, 2], [3, keys[9, 2], keys[11, 1]]], dtype=np.uint64))
    assert table.query(mixed, 0) == {7} and table.query(mixed, 1) == {9, 11}


def test_compact_lsh_finds_what_minhashlsh_finds():
    """Same banding as datasketch.MinHashLSH: same candidates on similar and unrelated signatures."""
    rng = random.Random(4)
    signer = prep_text.Signer(128, 0, 5)
    base = [english(rng, 120) for _ in range(30)]
    queries = [edit(t, rng, k) for t in base for k in (1, 6, 20)] + [english(rng, 120) for _ in range(20)]
    compact = prep_dedup.CompactLSH(0.8, 128, 0)
    reference = MinHashLSH(threshold=0.8, num_perm=128)
    batch = compact.batch(signer.sign_many(base))
    for i, sig in enumerate(signer.sign_many(base)):
        compact.insert(batch, i, i)
        reference.insert(i, MinHash(num_perm=128, seed=0, hashvalues=sig, scheme="affine32"))
    compact.end_batch()
    qsigs = signer.sign_many(queries)
    qbatch = compact.batch(qsigs)
    answers = [compact.query(qbatch, i) for i in range(len(queries))]
    expected = [set(reference.query(MinHash(num_perm=128, seed=0, hashvalues=s, scheme="affine32"))) for s in qsigs]
    assert answers == expected
    assert sum(bool(a) for a in answers) >= 30  # the 1-edit copies at least
    assert not any(answers[-20:])  # unrelated texts match nothing


def test_shard_plan_is_balanced_by_bytes():
    lengths = np.random.default_rng(0).integers(1, 5000, 2000)
    order, bounds = prepare_data.shard_plan(lengths, 7, seed=1, shuffle=True)
    assert sorted(order.tolist()) == list(range(2000))
    sizes = [int(lengths[order[bounds[k]:bounds[k + 1]]].sum()) for k in range(7)]
    assert sum(sizes) == lengths.sum()
    assert max(sizes) - min(sizes) <= 2 * lengths.max()


# ------------------------------------------------------------------------------------------------------------
# End to end
# ------------------------------------------------------------------------------------------------------------
@pytest.fixture
def corpus(tmp_path):
    """20 distinct English and 20 distinct Chinese documents, an exact copy, edited near-copies in both
    languages, and a boilerplate sentence (one edited variant) appended to several distinct documents."""
    rng = random.Random(7)
    distinct = [english(rng) for _ in range(20)] + [chinese(rng) for _ in range(20)]
    boiler = ("This article was first published by the Example Daily News Agency and is reproduced here "
              "with the kind permission of the editors, who reserve every right to the original text.")
    boiler_edit = boiler.replace("Example", "Exbmple")
    tails = [english(rng) + " " + boiler, english(rng) + " " + boiler, english(rng) + " " + boiler_edit]
    only_boiler = "Short intro. " + boiler
    near = [edit(distinct[0], rng, 3), edit(distinct[25], rng, 3)]
    docs = distinct + [distinct[3]] + near + tails + [only_boiler]
    path = tmp_path / "raw" / "docs.txt"
    path.parent.mkdir()
    path.write_text("\n".join(docs) + "\n", encoding="utf-8")
    return {"path": path, "distinct": distinct, "near": near, "tails": tails, "boiler": boiler,
            "boiler_edit": boiler_edit}


def test_duplicates_removed_at_both_granularities_distinct_kept(tmp_path, corpus):
    result, lines, removed = run(tmp_path, [corpus["path"]], "--min-chars", "40")
    out = set(lines)
    assert all(doc in out for doc in corpus["distinct"]), "a distinct document was lost"
    assert not any(doc in out for doc in corpus["near"]), "an edited near-copy survived"
    steps = {r["source"].rsplit(":", 1)[1]: r for r in removed}
    assert steps["41"]["step"] == "exact_duplicate" and steps["41"]["duplicate_of"].endswith(":4")
    assert steps["42"]["step"] == "near_duplicate_document" and steps["42"]["duplicate_of"].endswith(":1")
    assert steps["43"]["step"] == "near_duplicate_document" and steps["43"]["duplicate_of"].endswith(":26")
    # the boilerplate sentence stays in the first document that has it and leaves the other two
    with_boiler = [line for line in lines if corpus["boiler"] in line or corpus["boiler_edit"] in line]
    assert len(with_boiler) == 1 and with_boiler[0] == corpus["tails"][0]
    for tail in corpus["tails"][1:]:
        assert tail.rsplit(" This article", 1)[0] in out
    assert steps["47"]["step"] == "near_duplicate_sentences"  # left with only "Short intro."
    assert result["sentences_removed"] == 3
    assert len(lines) == 40 + 3
    removed_chars = sum(result["removed_characters"].values())
    assert result["characters_in"] == result["characters_out"] + removed_chars
    assert result["documents_in"] == len(lines) + sum(result["removed_documents"].values())


def test_steps_can_be_switched_off(tmp_path, corpus):
    result, lines, _ = run(tmp_path, [corpus["path"]], "--min-chars", "40", "--no-exact-dedup", "--no-doc-dedup",
                           "--no-sentence-dedup")
    assert len(lines) == 47 and result["sentences_removed"] == 0
    result, lines, removed = run(tmp_path, [corpus["path"]], "--no-exact-dedup", "--no-sentence-dedup",
                                 "--threshold", "0.95", "--overwrite", "--min-chars", "40")
    assert {r["step"] for r in removed} == {"near_duplicate_document"}  # the exact copy, J = 1


def test_normalization_and_filters_can_be_switched_off(tmp_path):
    wide = "Ｔｈｉｓ　ｌｉｎｅ is written in full-width letters and it is long enough to pass the filters."
    raw = tmp_path / "raw.txt"
    raw.write_text(f"{wide}\nToo short to keep.\n", encoding="utf-8")
    result, lines, _ = run(tmp_path, [raw], "--num-shards", "1", out="default")
    assert lines == ["This line is written in full-width letters and it is long enough to pass the filters."]
    assert result["removed_documents"]["too_short"] == 1
    result, lines, _ = run(tmp_path, [raw], "--num-shards", "1", "--no-normalize", "--no-filters", out="raw")
    assert sorted(lines) == sorted([wide, "Too short to keep."])


def test_backends_agree(tmp_path, corpus):
    run(tmp_path, [corpus["path"]], out="compact")
    run(tmp_path, [corpus["path"]], "--lsh-backend", "datasketch", out="datasketch")
    assert shard_bytes(tmp_path / "compact") == shard_bytes(tmp_path / "datasketch")


def test_output_is_deterministic_balanced_and_one_document_per_line(tmp_path):
    rng = random.Random(11)
    docs = [english(rng, rng.randint(30, 300)) for _ in range(150)] + [chinese(rng, rng.randint(60, 500))
                                                                       for _ in range(150)]
    raw = tmp_path / "raw.jsonl"
    raw.write_text("".join(json.dumps({"text": d.replace(". ", ".\n", 1)}) + "\n" for d in docs), encoding="utf-8")
    args = ["--world-size", "3", "--shards-per-rank", "2", "--seed", "5"]
    one, lines, _ = run(tmp_path, [raw], *args, "--processes", "1", out="p1")
    (tmp_path / "spill").mkdir()
    run(tmp_path, [raw], *args, "--processes", "2", "--tmp-dir", str(tmp_path / "spill"), out="p2")
    run(tmp_path, [raw], *args, "--processes", "2", "--seed", "6", out="other_seed")
    a, b, c = shard_bytes(tmp_path / "p1"), shard_bytes(tmp_path / "p2"), shard_bytes(tmp_path / "other_seed")
    assert list(a) == [f"part-{k:05d}.txt" for k in range(6)]
    assert a == b, "output depends on the number of processes"
    assert a != c, "the seed does not change the shuffle"
    assert sorted(b"".join(a.values()).splitlines()) == sorted(b"".join(c.values()).splitlines())
    sizes = [len(v) for v in a.values()]
    longest = max(len(line.encode()) + 1 for line in lines)
    assert max(sizes) - min(sizes) <= 2 * longest
    assert len(lines) == one["documents_out"] == 300  # all distinct, none filtered
    assert all("\n" not in line and line == line.strip() for line in lines)
    assert sorted(lines) == sorted(docs)  # all distinct and clean; the newline inside became a space again
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # staging removed
    assert list((tmp_path / "spill").iterdir()) == []


def test_malformed_input_is_counted_and_reported(tmp_path, capsys):
    rng = random.Random(3)
    good = [english(rng) for _ in range(4)]
    raw = tmp_path / "raw"
    (raw / "sub").mkdir(parents=True)
    (raw / "bad_utf8.txt").write_bytes(good[0].encode() + b"\n\xff\xfe not utf-8 \xc3\x28\n" + good[1].encode() + b"\n")
    (raw / "broken.jsonl").write_text(json.dumps({"text": good[2]}) + "\n{\"text\": \"unterminated\n"
                                      + json.dumps({"title": "no text"}) + "\n" + json.dumps([1, 2]) + "\n")
    (raw / "empty.txt").write_bytes(b"")
    (raw / "sub" / "truncated.txt.gz").write_bytes(gzip.compress(((good[3] + "\n") * 50).encode())[:-20])
    (raw / "sub" / "ok.jsonl.gz").write_bytes(gzip.compress((json.dumps({"text": good[3]}) + "\n").encode()))
    (raw / "notes.md").write_text("not an input")
    result, lines, _ = run(tmp_path, [raw], "--no-doc-dedup", "--no-sentence-dedup", "--no-exact-dedup")
    bad = result["malformed_input"]
    assert bad["bad_utf8_lines"] == 1 and "bad_utf8.txt:2" in result["malformed_locations"]["bad_utf8_lines"][0]
    assert bad["bad_json_lines"] == 1 and "broken.jsonl:2" in result["malformed_locations"]["bad_json_lines"][0]
    assert bad["json_lines_without_text"] == 2
    assert bad["files_without_documents"] == 1
    assert "empty.txt" in result["malformed_locations"]["files_without_documents"][0]
    assert bad["unreadable_files"] == 1 and "truncated.txt.gz" in result["malformed_locations"]["unreadable_files"][0]
    assert bad["skipped_unsupported_files"] == 1
    assert set(good) <= set(lines)  # every good document before and after the bad lines made it
    printed = capsys.readouterr().out
    assert "bad_utf8_lines: 1" in printed and "bad_utf8.txt:2" in printed and "unreadable_files: 1" in printed
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["malformed_input"] == bad

    with pytest.raises(SystemExit, match=r"bad_utf8\.txt:2"):
        run(tmp_path, [raw / "bad_utf8.txt"], "--on-error", "fail", out="strict")


def test_txt_document_modes(tmp_path):
    rng = random.Random(5)
    paras = [english(rng, 40) for _ in range(4)]
    raw = tmp_path / "book.txt"
    raw.write_text(f"{paras[0]}\n{paras[1]}\n\n{paras[2]}\n\n\n{paras[3]}\n", encoding="utf-8")
    _, lines, _ = run(tmp_path, [raw], "--txt-docs", "blank", "--num-shards", "1", out="blank")
    assert sorted(lines) == sorted([paras[0] + " " + paras[1], paras[2], paras[3]])
    _, lines, _ = run(tmp_path, [raw], "--txt-docs", "file", "--num-shards", "1", out="file")
    assert lines == [" ".join(paras)]


def test_output_dir_is_protected_and_overwrite_replaces_old_shards(tmp_path, corpus):
    run(tmp_path, [corpus["path"]], "--num-shards", "4")
    with pytest.raises(SystemExit, match="not empty"):
        run(tmp_path, [corpus["path"]])
    run(tmp_path, [corpus["path"]], "--num-shards", "2", "--overwrite")
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["part-00000.txt", "part-00001.txt"]
    (tmp_path / "data" / "notes.txt").write_text("x")
    with pytest.raises(SystemExit, match="not shards"):
        run(tmp_path, [corpus["path"]], "--overwrite")


def test_a_run_that_dies_while_writing_leaves_no_shard(tmp_path, corpus, monkeypatch):
    calls = []

    def dying_fsync(fd):
        calls.append(fd)
        if len(calls) == 2:  # while the second shard is being written
            raise OSError("disk gone")

    monkeypatch.setattr(prepare_data.os, "fsync", dying_fsync)
    with pytest.raises(OSError, match="disk gone"):
        run(tmp_path, [corpus["path"]], "--num-shards", "3")
    assert list((tmp_path / "data").iterdir()) == []  # not even the finished first shard
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # staging cleaned up


def test_bad_flags_and_missing_inputs_are_named(tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        run(tmp_path, [tmp_path / "nope.txt"])
    (tmp_path / "x.csv").write_text("a")
    with pytest.raises(SystemExit, match="unsupported suffix"):
        run(tmp_path, [tmp_path / "x.csv"])
    for flags in (["--languages", "xx"], ["--languages", "fr", "--language-id", "script"],
                  ["--language-threshold", "fr=0.5"]):
        with pytest.raises(SystemExit):
            prepare_data.parse_args([str(tmp_path), "-o", "d", "--num-shards", "2", *flags])


def test_help_explains_memory_bound():
    text = prepare_data.build_parser().format_help()
    assert "memory:" in text and "per kept document" in text and "stream" in text
