"""Document near-duplicate removal checks each LSH candidate by the exact Jaccard of the shingle sets, and a key of
the compact LSH can then have several owners."""
import json
import random

import numpy as np

import corpus.pipeline as prepare_data
from corpus import dedup, text as textproc
from test_prepare_data import WORDS, edit, english


def test_key_table_keeps_every_owner_of_a_shared_key():
    table = dedup.KeyTable(merge_every=4)
    table.add([1, 2, 3], 0)
    table.add([3, 4, 5], 1, fresh=False)  # 3 is shared: 0 keeps it, 1 joins
    batch = table.batch(np.array([[3, 9, 9], [4, 9, 9], [1, 9, 9]], dtype=np.uint64))
    assert [table.query(batch, i) for i in range(3)] == [{0, 1}, {1}, {0}]
    table.maybe_merge(force=True)
    table.add([3, 7, 8], 2, fresh=False)
    table.maybe_merge(force=True)
    batch = table.batch(np.array([[3, 9, 9], [7, 5, 9], [9, 9, 9]], dtype=np.uint64))
    assert [table.query(batch, i) for i in range(3)] == [{0, 1, 2}, {1, 2}, set()]


def test_recall_banding_finds_pairs_at_the_threshold():
    for threshold in (0.5, 0.7, 0.8, 0.9):
        bands, rows = dedup.recall_params(threshold, 128)
        assert bands * rows <= 128
        assert 1 - (1 - threshold ** rows) ** bands >= 0.995
        old_bands, old_rows = dedup.lsh_params(threshold, 128)
        assert 1 - (1 - threshold ** old_rows) ** old_bands < 0.9  # what the check makes affordable


def _run(tmp_path, name, docs, *extra):
    src = tmp_path / f"{name}.txt"
    src.write_text("\n".join(docs) + "\n", encoding="utf-8")
    out, log = tmp_path / name, tmp_path / f"{name}.removed.jsonl"
    argv = [str(src), "-o", str(out), "--num-shards", "1", "--no-progress", "--processes", "1", "--no-shuffle",
            "--no-sentence-dedup", "--threshold", "0.5", "--log-removed", str(log), *extra]
    result = prepare_data.run(prepare_data.parse_args(argv))
    removed = {int(r["source"].rsplit(":", 1)[1]) - 1: r for r in map(json.loads, log.read_text().splitlines())}
    return result, removed


def test_only_documents_at_the_threshold_are_removed(tmp_path):
    rng = random.Random(7)
    signer = textproc.Signer(128, 0, 5)
    originals = [english(rng, 100) for _ in range(40)]
    close = [edit(o, rng, 40) for o in originals]  # Jaccard with the original 0.51 .. 0.59
    far = [edit(o, rng, 70) for o in originals]  # 0.34 .. 0.44
    docs = originals + close + far
    sets = [dedup.shingle_set(signer, d) for d in docs]

    def best_jaccard_with_kept(i, removed):
        return max(dedup.jaccard(sets[i], sets[k]) for k in range(i) if k not in removed)

    result, removed = _run(tmp_path, "checked", docs)
    assert result["candidates_checked"] >= 40
    assert all(r["step"] == "near_duplicate_document" for r in removed.values())
    assert set(range(40, 80)) <= set(removed)  # every copy above the threshold
    for i, record in removed.items():
        of = int(record["duplicate_of"].rsplit(":", 1)[1]) - 1
        assert dedup.jaccard(sets[i], sets[of]) >= 0.5
    for i in range(80, 120):
        if i in removed:
            continue
        assert best_jaccard_with_kept(i, removed) < 0.5  # kept: nothing kept is that close

    # Unchecked, datasketch's banding misses copies above the threshold and removes documents far below it.
    _, unchecked = _run(tmp_path, "unchecked", docs, "--no-candidate-check")
    assert not set(range(40, 80)) <= set(unchecked)
    assert any(best_jaccard_with_kept(i, unchecked) < 0.45 for i in unchecked)


def test_sentence_candidates_are_checked_too(tmp_path):
    rng = random.Random(11)
    signer = textproc.Signer(128, 0, 5)
    bases = [" ".join(rng.choice(WORDS) for _ in range(30)).capitalize() + "." for _ in range(12)]
    variants = [(b, edit(b, rng, 4), edit(b, rng, 24)) for b in bases]  # the base, a near copy, a far one
    docs = []
    for base, close, far in variants:
        docs += [f"{english(rng, 20)} {base} {english(rng, 20)}", f"{english(rng, 20)} {close} {english(rng, 20)}",
                 f"{english(rng, 20)} {far} {english(rng, 20)}"]
    src = tmp_path / "in.txt"
    src.write_text("\n".join(docs) + "\n", encoding="utf-8")
    argv = [str(src), "-o", str(tmp_path / "out"), "--num-shards", "1", "--no-progress", "--processes", "1",
            "--no-shuffle", "--no-doc-dedup", "--sentence-threshold", "0.5", "--sentence-min-chars", "20"]
    result = prepare_data.run(prepare_data.parse_args(argv))
    out = (tmp_path / "out" / "part-00000.txt").read_text(encoding="utf-8")
    assert result["sentence_candidates_rejected"] >= 1
    base_set = lambda b: dedup.shingle_set(signer, b)
    for base, close, far in variants:
        assert base in out
        if dedup.jaccard(base_set(base), base_set(close)) >= 0.5:
            assert close not in out
        if dedup.jaccard(base_set(base), base_set(far)) < 0.5:
            assert far in out
