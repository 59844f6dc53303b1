"""DataEngine: packing with carry-over, rank assignment, determinism, epochs, resume, cache, parallel tokenization,
bad input, and the shipped sample corpus. Uses the released tokenizer in ../shared (skipped when absent)."""
import json
import multiprocessing as mp
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

import data.cache
from conftest import shared_path
from data_utils import DataEngine, DataWarning, list_data_files

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa quebec "
         "romeo sierra tango uniform victor whiskey xray yankee zulu").split()


def text_line(i: int, n_words: int) -> str:
    return f"line {i} " + " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(n_words))


def write_lines(path: Path, lines) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def expected_stream(sp, files_lines) -> np.ndarray:
    """The packing rule, written independently of data_utils: ids + EOS per line, lines under 20 (with EOS) out."""
    out = []
    for lines in files_lines:
        for line in lines:
            ids = sp.EncodeAsIds(line.strip()) + [2]
            if len(ids) >= 20:
                out.extend(ids)
    return np.array(out, dtype=np.int64)


def epoch_rows(engine) -> list:
    rows = []
    for _ in range(engine.steps_per_epoch):
        rows.extend(map(tuple, engine.get_data().tolist()))
    return rows


@pytest.fixture
def tok(released_tokenizer):
    """Path of the released 64000-piece tokenizer (EOS id 2)."""
    return released_tokenizer


@pytest.fixture(scope="module")
def sp():
    """The same tokenizer, to compute expected ids independently of data_utils."""
    return spm.SentencePieceProcessor(model_file=str(shared_path("baichuan-7b-tokenizer", "tokenizer.model")))


@pytest.fixture
def corpus(tmp_path):
    """Two files of lines of varied length (some far longer than a sample), one short line and one empty line."""
    a = [text_line(i, 5 + (i * 11) % 60) for i in range(30)] + ["too short", ""]
    b = [text_line(100 + i, 8 + (i * 13) % 45) for i in range(25)]
    d = tmp_path / "data"
    write_lines(d / "a.txt", a)
    write_lines(d / "b.txt", b)
    return d, [a, b]


def engine(data_dir, tok, mbs=2, max_length=31, **kw):
    kw.setdefault("num_workers", 1)
    kw.setdefault("show_progress", False)
    kw.setdefault("cache_dir", Path(data_dir).parent / "cache")
    kw.setdefault("world_size", 1)
    kw.setdefault("rank", 0)
    return DataEngine(data_dir, tok, mbs, max_length, **kw)


# ---------------------------------------------------------------------------------------------------------------


def test_packing_carries_lines_over_samples(corpus, tok, sp):
    data_dir, lines = corpus
    e = engine(data_dir, tok, mbs=1, max_length=31).load_data()
    stream = expected_stream(sp, lines)
    length = 32
    n = len(stream) // length
    assert e.num_tokens == len(stream) and e.num_samples == n and e.steps_per_epoch == n
    expected = sorted(tuple(stream[k * length:(k + 1) * length]) for k in range(n))
    assert sorted(epoch_rows(e)) == expected
    # Carry-over: only the final incomplete sample is unused, although lines are longer than a sample ...
    assert len(stream) - n * length < length
    assert max(len(sp.EncodeAsIds(x)) for f in lines for x in f) > length
    # ... whereas the reference's packing (a line's overflow past a sample dropped) gives other samples.
    reference, buf = [], []
    for f in lines:
        for x in f:
            ids = sp.EncodeAsIds(x.strip()) + [2]
            buf.extend(ids if len(ids) >= 20 else [])
            if len(buf) >= length:
                reference.append(tuple(buf[:length]))
                buf = []
    assert sorted(reference) != expected and len(reference) < n


def test_line_length_rule_counts_eos(tmp_path, tok, sp):
    # "x" + k ones encodes to k + 1 pieces with this tokenizer (digits are single pieces).
    kept, dropped = "x" + "1" * 18, "x" + "1" * 17
    assert len(sp.EncodeAsIds(kept)) == 19 and len(sp.EncodeAsIds(dropped)) == 18
    write_lines(tmp_path / "data" / "f.txt", [kept, dropped] * 4)
    e = engine(tmp_path / "data", tok, mbs=1, max_length=19).load_data()  # a sample is exactly one kept line
    assert e.num_samples == 4
    assert e.file_stats[0]["kept"] == 4 and e.file_stats[0]["short"] == 4
    assert e.get_data()[0].tolist() == sp.EncodeAsIds(kept) + [2]


def test_stream_crosses_file_boundaries_in_sorted_order(tmp_path, tok, sp):
    d = tmp_path / "data"
    # Written in an order that differs from the sorted one; sorting is by relative path, subfolders included.
    files = {"b.txt": [text_line(1, 30)], "a10.txt": [text_line(2, 25)], "a2.txt": [text_line(3, 33)],
             "sub/c.txt": [text_line(4, 28)]}
    for name, lines in files.items():
        write_lines(d / name, lines)
    order = ["a10.txt", "a2.txt", "b.txt", "sub/c.txt"]
    assert [p.relative_to(d).as_posix() for p in list_data_files(d)] == order
    e = engine(d, tok, mbs=1, max_length=15).load_data()
    stream = expected_stream(sp, [files[n] for n in order])
    n = len(stream) // 16
    assert sorted(epoch_rows(e)) == sorted(tuple(stream[k * 16:(k + 1) * 16]) for k in range(n))


def test_rank_file_assignment_ignores_hidden_and_cache(tmp_path, tok):
    d = tmp_path / "data"
    for i in range(5):
        write_lines(d / f"shard-{i}.txt", [text_line(i * 10 + j, 40) for j in range(4)])
    write_lines(d / ".hidden.txt", ["x"])
    write_lines(d / ".cache" / "junk.txt", ["x"])
    write_lines(d / "mycache" / "junk.txt", ["x"])
    names = lambda e: [p.name for p in e.files]  # noqa: E731
    e0 = engine(d, tok, world_size=2, rank=0, cache_dir=d / "mycache")
    e1 = engine(d, tok, world_size=2, rank=1, cache_dir=d / "mycache")
    assert len(e0.all_files) == 5
    assert names(e0) == ["shard-0.txt", "shard-2.txt", "shard-4.txt"]
    assert names(e1) == ["shard-1.txt", "shard-3.txt"]
    # The default cache folder is <data_dir>/.cache and is not data either.
    e = engine(d, tok, cache_dir=None)
    assert e.cache_dir == d / ".cache" and len(e.all_files) == 6  # mycache/ is data when not the cache


def test_world_defaults_from_env(corpus, tok, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    e = DataEngine(corpus[0], tok, 1, 31, num_workers=1, cache_dir=False)
    assert (e.world_size, e.rank) == (2, 1) and [p.name for p in e.files] == ["b.txt"]
    assert e.show_progress is False  # progress bar on rank 0 only


def test_batches_are_deterministic_and_reshuffled_per_epoch(corpus, tok):
    data_dir, _ = corpus
    a = engine(data_dir, tok, mbs=2).load_data()
    b = engine(data_dir, tok, mbs=2).load_data()
    seq_a = [a.get_data().tolist() for _ in range(2 * a.steps_per_epoch)]
    seq_b = [b.get_data().tolist() for _ in range(2 * b.steps_per_epoch)]
    assert seq_a == seq_b
    other = engine(data_dir, tok, mbs=2, seed=7).load_data()
    seq_c = [other.get_data().tolist() for _ in range(a.steps_per_epoch)]
    assert seq_c != seq_a[:a.steps_per_epoch]
    first, second = seq_a[:a.steps_per_epoch], seq_a[a.steps_per_epoch:]
    assert first != second  # a new order each epoch
    assert sorted(map(tuple, sum(first, []))) == sorted(map(tuple, sum(second, [])))  # same samples


def test_epoch_rollover_never_runs_out(corpus, tok):
    e = engine(corpus[0], tok, mbs=3).load_data()
    spe = e.steps_per_epoch
    assert e.num_samples // 3 == spe and spe > 1
    for _ in range(3 * spe + 1):
        batch = e.get_data()
    assert (e.epoch, e.position, e.step) == (3, 1, 3 * spe + 1)
    assert batch.shape == (3, 32) and str(batch.dtype) == "torch.int64" and batch.device.type == "cpu"
    assert int(batch.max()) < 64000 and int(batch.min()) >= 0


@pytest.mark.parametrize("epochs", [0, 1])  # within the first epoch, and past its end
def test_resume_continues_with_next_unseen_batch(corpus, tok, epochs):
    a = engine(corpus[0], tok, mbs=2).load_data()
    served = epochs * a.steps_per_epoch + 3
    for _ in range(served):
        a.get_data()
    state = json.loads(json.dumps(a.state_dict()))  # must survive a JSON checkpoint
    assert state["step"] == served and state["epoch"] * a.steps_per_epoch + state["position"] == served
    following = [a.get_data().tolist() for _ in range(4)]
    b = engine(corpus[0], tok, mbs=2).load_data()
    b.load_state_dict(state)
    assert [b.get_data().tolist() for _ in range(4)] == following


def test_resume_rejects_other_settings_or_data(corpus, tok):
    data_dir, _ = corpus
    state = engine(data_dir, tok, mbs=2).load_data().state_dict()
    with pytest.raises(ValueError, match="micro_batch_size: checkpoint 2, now 1"):
        engine(data_dir, tok, mbs=1).load_data().load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        engine(data_dir, tok, mbs=2, seed=1).load_data().load_state_dict(state)
    write_lines(data_dir / "c.txt", [text_line(500 + i, 30) for i in range(5)])
    with pytest.raises(ValueError, match="fingerprint"):
        engine(data_dir, tok, mbs=2).load_data().load_state_dict(state)
    with pytest.raises(RuntimeError, match="load_data"):
        engine(data_dir, tok, mbs=2).load_state_dict(state)
    with pytest.raises(RuntimeError, match="load_data"):
        engine(data_dir, tok, mbs=2).get_data()


def test_cache_is_reused_and_invalidated_by_content(corpus, tok, monkeypatch):
    data_dir, lines = corpus
    first = engine(data_dir, tok).load_data()
    cache = data_dir.parent / "cache"
    assert len(list(cache.glob("*.bin"))) == 2 and len(list(cache.glob("*.json"))) == 2
    assert not list(cache.glob("*.tmp-*"))
    rows = [first.get_data().tolist() for _ in range(3)]

    calls = []
    real = data.cache.encode_lines
    monkeypatch.setattr(data.cache, "encode_lines", lambda *a: calls.append(1) or real(*a))
    again = engine(data_dir, tok).load_data()
    assert calls == [] and again.num_tokens == first.num_tokens
    assert [again.get_data().tolist() for _ in range(3)] == rows
    tokens = again._stream.entries[0].tokens
    assert isinstance(tokens, np.memmap) and tokens.dtype == np.uint16

    write_lines(data_dir / "b.txt", lines[1] + [text_line(999, 50)])  # same name, new content
    changed = engine(data_dir, tok).load_data()
    assert len(calls) == 1  # only b.txt tokenized again
    assert changed.num_tokens > first.num_tokens
    assert len(list(cache.glob("*.bin"))) == 3


def test_damaged_cache_entry_is_rebuilt_with_a_warning(corpus, tok):
    data_dir, _ = corpus
    first = engine(data_dir, tok).load_data()
    victim = sorted((data_dir.parent / "cache").glob("*.bin"))[0]
    victim.write_bytes(victim.read_bytes()[:-2])
    with pytest.warns(DataWarning, match="damaged cache entry"):
        again = engine(data_dir, tok).load_data()
    assert again.num_tokens == first.num_tokens
    assert [again.get_data().tolist() for _ in range(2)] == [first.get_data().tolist() for _ in range(2)]


def test_parallel_tokenization_matches_serial(corpus, tok, monkeypatch):
    data_dir, _ = corpus
    monkeypatch.setattr(data.cache, "CHUNK_BYTES", 300)  # several chunks per file, cut at line boundaries
    serial = engine(data_dir, tok, cache_dir=False, num_workers=1).load_data()
    parallel = engine(data_dir, tok, cache_dir=data_dir.parent / "pcache", num_workers=2).load_data()
    assert parallel.num_tokens == serial.num_tokens
    assert [s["lines"] for s in parallel.file_stats] == [s["lines"] for s in serial.file_stats] == [32, 25]
    assert ([parallel.get_data().tolist() for _ in range(serial.steps_per_epoch)]
            == [serial.get_data().tolist() for _ in range(serial.steps_per_epoch)])


def _rank_main(init_file, rank, data_dir, tok, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        e = DataEngine(data_dir, tok, 1, 31, num_workers=1, show_progress=False, cache_dir=False)
        try:
            e.load_data()
        except Exception as err:  # the test checks each rank's error
            result = {"error": f"{type(err).__name__}: {err}"}
        else:
            for _ in range(e.steps_per_epoch + 2):
                e.get_data()
            dist.barrier()  # every rank got here: no rank ran out early
            result = {"rank": e.rank, "world": e.world_size, "local": e.num_samples, "spe": e.steps_per_epoch,
                      "state": e.state_dict()}
        Path(out_dir, f"{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def run_two_ranks(tmp_path, data_dir, tok) -> list:
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_rank_main, args=(tmp_path / "init", r, data_dir, tok, tmp_path)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        if p.exitcode is None:
            p.kill()
        assert p.exitcode == 0
    return [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]


def test_ranks_with_unequal_shards_agree_on_steps(tmp_path, tok):
    d = tmp_path / "data"
    write_lines(d / "big.txt", [text_line(i, 40) for i in range(40)])
    write_lines(d / "small.txt", [text_line(100 + i, 40) for i in range(10)])
    res = run_two_ranks(tmp_path, d, tok)
    assert [(r["rank"], r["world"]) for r in res] == [(0, 2), (1, 2)]
    assert res[0]["local"] > 2 * res[1]["local"]  # shards really differ
    assert res[0]["spe"] == res[1]["spe"] == res[1]["local"]  # the smaller rank's epoch length
    assert res[0]["state"] == res[1]["state"]  # one saved state restores every rank


def test_a_failing_rank_stops_the_others_instead_of_hanging(tmp_path, tok):
    d = tmp_path / "data"
    write_lines(d / "a.txt", [text_line(i, 40) for i in range(10)])
    write_lines(d / "b.txt", ["short", "lines", "only"])  # rank 1's only file
    res = run_two_ranks(tmp_path, d, tok)
    assert res[1]["error"].startswith("ValueError: no line of at least 20 tokens") and "b.txt" in res[1]["error"]
    assert res[0]["error"].startswith("RuntimeError: rank 0: another rank could not load its data")


# --- bad input -------------------------------------------------------------------------------------------------


def test_missing_and_empty_data_dir(tmp_path, tok):
    with pytest.raises(FileNotFoundError, match="data_dir not found: .*nowhere"):
        engine(tmp_path / "nowhere", tok)
    d = tmp_path / "empty"
    write_lines(d / ".only_hidden", ["x"])
    with pytest.raises(ValueError, match=r"no data files in .*empty.*hidden"):
        engine(d, tok, cache_dir=None)
    write_lines(tmp_path / "afile", ["x"])
    with pytest.raises(NotADirectoryError, match="afile"):
        engine(tmp_path / "afile", tok)


def test_fewer_files_than_ranks_says_how_many(corpus, tok):
    with pytest.raises(ValueError, match=r"holds 2 data file\(s\) but world_size is 4.*at least 4 files"):
        engine(corpus[0], tok, world_size=4, rank=3)
    with pytest.raises(ValueError, match="rank 2 is not valid for world_size 2"):
        engine(corpus[0], tok, world_size=2, rank=2)


def test_undecodable_bytes_are_counted_and_located(tmp_path, tok, sp):
    d = tmp_path / "data"
    good = [text_line(i, 30) for i in range(6)]
    raw = [line.encode() for line in good]
    raw[2] = raw[2] + b" \xff\xfe broken"
    raw[4] = b"\xc3" + raw[4]
    d.mkdir()
    (d / "mixed.txt").write_bytes(b"\n".join(raw) + b"\n")
    with pytest.warns(DataWarning, match=r"mixed\.txt: 2 line\(s\) had undecodable UTF-8 bytes.*first at line 3"):
        e = engine(d, tok, mbs=1, max_length=15).load_data()
    assert e.file_stats[0]["bad"] == 2 and e.file_stats[0]["kept"] == 6
    fixed = raw[2].decode("utf-8", errors="replace")
    assert e.num_tokens == len(expected_stream(sp, [good[:2] + [fixed] + good[3:4]
                                                    + [raw[4].decode("utf-8", "replace")] + good[5:]]))
    with pytest.warns(DataWarning, match="first at line 3"):  # still reported when the cache is used
        engine(d, tok, mbs=1, max_length=15).load_data()


def test_file_without_usable_line_is_named(corpus, tok):
    data_dir, _ = corpus
    write_lines(data_dir / "c_short.txt", ["tiny", "", "also tiny"])
    (data_dir / "d_empty.txt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"no line of at least 20 tokens.*c_short\.txt \(3 lines\).*d_empty\.txt"):
        engine(data_dir, tok).load_data()


def test_too_little_data_for_one_batch(corpus, tok):
    with pytest.raises(ValueError, match=r"rank 0 holds \d+ tokens .*fewer than one batch"):
        engine(corpus[0], tok, mbs=64, max_length=4096).load_data()


def test_tokenizer_that_does_not_load(corpus, tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer not found: .*missing.model"):
        engine(corpus[0], tmp_path / "missing.model")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a sentencepiece model")
    with pytest.raises(ValueError, match="could not load the SentencePiece tokenizer .*bad.model"):
        engine(corpus[0], bad)


def test_bad_sizes_and_eos(corpus, tok):
    with pytest.raises(ValueError, match="micro_batch_size must be a positive integer"):
        engine(corpus[0], tok, mbs=0)
    with pytest.raises(ValueError, match="has EOS id 2 but the data uses eos_id=3"):
        engine(corpus[0], tok, eos_id=3)


def test_unwritable_cache_dir_is_an_error(corpus, tok, tmp_path):
    blocker = tmp_path / "file_not_folder"
    blocker.write_text("x")
    with pytest.raises(PermissionError, match="file_not_folder"):
        engine(corpus[0], tok, cache_dir=blocker / "cache")


# --- the shipped sample corpus ---------------------------------------------------------------------------------


def test_sample_corpus_matches_its_generator():
    from scripts import make_sample_data

    assert make_sample_data.main(["--check", "--output", str(ROOT / "data_dir")]) == 0


def test_sample_corpus_serves_eight_ranks(tok, tmp_path):
    data_dir = ROOT / "data_dir"
    files = sorted(p.name for p in data_dir.glob("*.txt"))
    assert files == [f"part-{i:04d}.txt" for i in range(8)]
    text = "".join((data_dir / f).read_text(encoding="utf-8") for f in files)
    assert 100_000 < len(text.encode()) < 1_000_000
    assert sum("\u4e00" <= ch <= "\u9fff" for ch in text) > 20_000 and sum(ch.isascii() and ch.isalpha()
                                                                          for ch in text) > 50_000
    for rank in range(8):
        e = engine(data_dir, tok, mbs=4, max_length=256, world_size=8, rank=rank,
                   cache_dir=tmp_path / "cache").load_data()
        lines = sum(s["lines"] for s in e.file_stats)
        assert sum(s["kept"] for s in e.file_stats) >= 0.99 * lines  # the corpus is written to pass the filter
        assert e.steps_per_epoch >= 3
