"""The global sample order, mixtures, cache checksums, binary refusal and data-setting refusals, in-process (no
launcher): engines for several (world size, rank) pairs are built side by side in one process."""
import json
from pathlib import Path

import numpy as np
import pytest

from data import GlobalDataEngine, make_engine
from data.cache import DataWarning
from data.order import compute_order, mixture_counts
from data.sources import files_for_rank, list_data_files

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "tokenizer.model"
pytestmark = pytest.mark.skipif(not TOKENIZER.is_file(), reason="tokenizer.model missing at the repo root")
SAMPLE_TEXT = [line for path in sorted((ROOT / "data_dir").glob("part-*.txt"))
               for line in path.read_text(encoding="utf-8").splitlines()]


def write(path: Path, lines) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def engine(data_dir, cache, world=1, rank=0, micro=2, global_bs=4, batches=12, **kw):
    return GlobalDataEngine(data_dir, TOKENIZER, micro, 32, global_bs, batches, world_size=world, rank=rank,
                            cache_dir=cache, num_workers=1, show_progress=False, **kw).load_data()


def global_batches(engines, batches):
    """[batch][global position] sample ids, assembled from every rank's micro-batches."""
    gas = engines[0].gas
    return [np.concatenate([e.sample_ids(b * gas + m) for e in engines for m in range(gas)]) for b in range(batches)]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """Two sources of very different sizes (a large "zh" and a small "en") and a mixture file for them."""
    root = tmp_path_factory.mktemp("mixed")
    data = root / "data"
    for i in range(3):
        write(data / "zh" / f"z{i}.txt", SAMPLE_TEXT[i * 150:(i + 1) * 150])
    write(data / "en" / "e0.txt", SAMPLE_TEXT[600:640])
    mix = root / "mix.json"
    mix.write_text(json.dumps({"sources": [{"name": "zh", "path": "zh", "weight": 0.7},
                                           {"name": "en", "path": "en/*.txt", "weight": 0.3}]}))
    return data, mix, root / "cache"


def test_global_batches_are_the_same_on_one_and_two_ranks(mixed):
    data, mix, cache = mixed
    one = [engine(data, cache, world=1, global_bs=8, micro=2, data_mix=mix)]
    two = [engine(data, cache, world=2, rank=r, global_bs=8, micro=2, data_mix=mix) for r in range(2)]
    four = [engine(data, cache, world=4, rank=r, global_bs=8, micro=1, data_mix=mix) for r in range(4)]
    assert one[0].gas == 4 and two[0].gas == 2 and four[0].gas == 2
    expect = global_batches(one, 12)
    for engines in (two, four):
        assert all(np.array_equal(a, b) for a, b in zip(global_batches(engines, 12), expect))
    # The rows served are the same tokens too, not only the same ids.
    rows_one = np.concatenate([one[0].batch_array(s) for s in range(4)])
    rows_two = np.concatenate([e.batch_array(s) for e in two for s in range(2)])
    assert np.array_equal(rows_one, rows_two)


def test_resume_on_another_world_size_neither_repeats_nor_skips(mixed):
    data, mix, cache = mixed
    # Uninterrupted on 1 rank: 10 global batches of 8.
    full = global_batches([engine(data, cache, world=1, global_bs=8, micro=4, data_mix=mix)], 10)
    # 2 ranks for 4 steps, then 1 rank from the checkpoint, then 2 ranks again from a later one.
    two = [engine(data, cache, world=2, rank=r, global_bs=8, micro=2, data_mix=mix) for r in range(2)]
    seen = global_batches(two, 4)
    for e in two:
        for _ in range(4 * e.gas):
            e.get_data()
    state = json.loads(json.dumps(two[0].state_dict()))  # what the checkpoint stores, through JSON
    assert state["global_samples"] == 32 and state["world_size"] == 2
    one = engine(data, cache, world=1, global_bs=8, micro=4, data_mix=mix)
    one.load_state_dict(state)
    seen += global_batches([one], 3)
    for _ in range(3 * one.gas):
        one.get_data()
    again = [engine(data, cache, world=2, rank=r, global_bs=8, micro=2, data_mix=mix) for r in range(2)]
    for e in again:
        e.load_state_dict(one.state_dict())
    seen += global_batches(again, 3)
    assert all(np.array_equal(a, b) for a, b in zip(seen, full))
    assert one.tokens_by_source() == {name: int(n) * 32 for name, n in zip(
        ("zh", "en"), np.bincount((np.concatenate(full[:7]) >= one.offsets[1]).astype(int), minlength=2))}


def test_mixture_shares_and_repeatability(mixed):
    data, mix, cache = mixed
    e = engine(data, cache, global_bs=10, micro=10, batches=50, data_mix=mix)
    zh, en = e.samples_per_source
    assert zh > 10 * en  # very different sizes; en is upsampled (many epochs) to reach its share
    ids = np.asarray(e.index)
    is_en = ids >= e.offsets[1]
    assert abs(is_en.mean() - 0.3) < 0.01
    per_batch = is_en.reshape(50, 10).sum(axis=1)
    assert set(per_batch) == {3}  # floor or ceil of 0.3 x 10 in every batch
    en_ids = ids[is_en] - e.offsets[1]
    epoch0 = en_ids[:en]
    assert sorted(epoch0) == list(range(en))  # a whole epoch before any repeat
    for _ in range(50):
        e.get_data()
    seen = e.tokens_by_source()
    assert seen == {"zh": 350 * 32, "en": 150 * 32}
    again = engine(data, cache, global_bs=10, micro=10, batches=50, data_mix=mix)
    assert np.array_equal(np.asarray(again.index), ids)
    # A longer horizon starts with the same batches.
    longer = engine(data, cache, global_bs=10, micro=10, batches=60, data_mix=mix)
    assert np.array_equal(np.asarray(longer.index)[:500], ids)


def test_largest_remainder_counts():
    counts = mixture_counts([0.55, 0.3, 0.15], 8, 40)  # ideal 4.4, 2.4, 1.2 per batch
    assert (counts.sum(axis=1) == 8).all()
    for s, ideal in enumerate((4.4, 2.4, 1.2)):
        assert set(counts[:, s]) <= {int(np.floor(ideal)), int(np.ceil(ideal))}
        assert abs(counts[:, s].cumsum() - ideal * np.arange(1, 41)).max() < 1.0
    ids = compute_order([50, 20], [0.5, 0.5], seed=3, batch_size=4, num_batches=30)
    assert np.array_equal(ids, compute_order([50, 20], [0.5, 0.5], seed=3, batch_size=4, num_batches=30))
    assert not np.array_equal(ids, compute_order([50, 20], [0.5, 0.5], seed=4, batch_size=4, num_batches=30))


def test_auto_weights_follow_the_temperature_rule(mixed, tmp_path):
    data, _, cache = mixed
    for temperature in (1, 3):
        mix = tmp_path / f"auto{temperature}.json"
        mix.write_text(json.dumps({"temperature": temperature, "sources": [
            {"name": "zh", "path": "zh", "weight": "auto"}, {"name": "en", "path": "en", "weight": "auto"}]}))
        e = engine(data, cache, data_mix=mix)
        tokens = np.array([st.total for st in e.streams], dtype=float)
        expect = tokens ** (1 / temperature) / (tokens ** (1 / temperature)).sum()
        assert np.allclose(e.weights, expect, rtol=1e-12)
    assert e.weights[1] > tokens[1] / tokens.sum()  # T = 3 lifts the small source above its natural share


def test_per_rank_order_keeps_the_reference_assignment(tmp_path):
    data = tmp_path / "data"
    for i in range(5):
        write(data / f"f{i}.txt", SAMPLE_TEXT[i * 60:(i + 1) * 60])
    files = list_data_files(data)
    for rank in range(2):
        e = make_engine("per_rank", data_dir=data, tokenizer_path=TOKENIZER, micro_batch_size=2, max_length=32,
                        global_batch_size=4, num_batches=3, world_size=2, rank=rank, cache_dir=tmp_path / "c",
                        num_workers=1, show_progress=False, data_mix=None).load_data()
        assert e.files == files_for_rank(files, 2, rank) == [files[i] for i in range(rank, 5, 2)]
    with pytest.raises(ValueError, match="--data_mix needs --data_order global"):
        make_engine("per_rank", data_dir=data, tokenizer_path=TOKENIZER, micro_batch_size=2, max_length=32,
                    data_mix="mix.json")


# --- refusals ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec, message", [
    ({"sources": [{"name": "a", "path": "nope", "weight": 1}]}, r"source 'a' names .*nope, which does not exist"),
    ({"sources": [{"name": "a", "path": "zh/*.md", "weight": 1}]}, r"source 'a' \('zh/\*\.md'\) matches no data"),
    ({"sources": [{"name": "a", "path": "zh", "weight": -1}]}, r"source 'a' weight must be a number >= 0"),
    ({"sources": [{"name": "a", "path": "zh", "weight": 0}, {"name": "b", "path": "en", "weight": 0}]},
     "the weights sum to 0"),
    ({"sources": [{"name": "a", "path": "zh", "weight": 1, "wieght": 2}]},
     r"source 0 has unknown key\(s\) \['wieght'\]"),
    ({"sources": [{"name": "a", "path": "zh", "weight": 1}], "temp": 2}, r"unknown key\(s\) \['temp'\]"),
    ({"sources": [{"name": "a", "path": "zh", "weight": "auto"}]}, 'needs a top-level "temperature"'),
    ({"sources": [{"name": "a", "path": "../x", "weight": 1}]}, "must stay inside data_dir"),
    ({"sources": [{"name": "a", "path": "zh", "weight": 1}, {"name": "b", "path": "zh/z0.txt", "weight": 1}]},
     "belongs to both 'a' and 'b'"),
])
def test_bad_mixtures_are_named(mixed, tmp_path, spec, message):
    data, _, cache = mixed
    mix = tmp_path / "bad-mix.json"
    mix.write_text(json.dumps(spec))
    with pytest.raises(ValueError, match=message) as info:
        engine(data, cache, data_mix=mix)
    assert "bad-mix.json" in str(info.value)


def test_refused_resume_names_the_difference(mixed, tmp_path):
    data, mix, cache = mixed
    base = engine(data, cache, data_mix=mix)
    base.get_data(), base.get_data()
    state = base.state_dict()
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"sources": [{"name": "zh", "path": "zh", "weight": 0.5},
                                             {"name": "en", "path": "en", "weight": 0.5}]}))
    for kw, field in ((dict(data_mix=other), "mixture"), (dict(data_mix=mix, seed=7), "seed"),
                      (dict(data_mix=mix, global_bs=8), "global_batch_size")):
        e = engine(data, cache, **kw)
        with pytest.raises(ValueError, match=f"{field}: checkpoint .*--allow_data_change"):
            e.load_state_dict(state)
        e.load_state_dict(state, allow_data_change=True)  # goes on from the same global sample count
        assert e.global_samples == 4
    with pytest.raises(ValueError, match=r"global batch 6 is not a whole multiple of micro-batch 2 x world size 2"):
        engine(data, cache, world=2, global_bs=6, data_mix=mix)


def test_damaged_or_foreign_cache_entry_is_an_error_at_first_use(tmp_path):
    data = tmp_path / "data"
    write(data / "a.txt", SAMPLE_TEXT[:80])
    engine(data, tmp_path / "cache")
    (binfile,) = (tmp_path / "cache").glob("*.bin")
    good = binfile.read_bytes()
    ids = np.frombuffer(good, dtype=np.uint16).copy()
    ids[5:40] = 0  # same size, damaged content: the size check alone would pass it
    binfile.write_bytes(ids.tobytes())
    with pytest.raises(ValueError, match=r"token cache entry .*\.bin \(for .*a\.txt\) fails its checksum"):
        engine(data, tmp_path / "cache").get_data()
    # An entry "built by another tokenizer": ids past this vocabulary, with a checksum that matches them.
    ids = np.frombuffer(good, dtype=np.uint16).copy()
    ids[7] = 65000
    binfile.write_bytes(ids.tobytes())
    meta = binfile.with_suffix(".json")
    import hashlib

    m = json.loads(meta.read_text())
    m["blake2b"] = hashlib.blake2b(ids.tobytes(), digest_size=16).hexdigest()
    meta.write_text(json.dumps(m))
    with pytest.raises(ValueError, match=r"holds id 65000, past the tokenizer's 64000 pieces"):
        engine(data, tmp_path / "cache").get_data()


def test_a_checked_entry_is_not_read_again_until_its_file_changes(tmp_path, monkeypatch):
    """An elastic restart on a large corpus must not read the whole cache again: a stamp beside each checked entry
    lets a start skip the read while the .bin is untouched; any write to it brings the full check back."""
    import hashlib
    import os
    from types import SimpleNamespace

    import data.cache

    data_dir = tmp_path / "data"
    write(data_dir / "a.txt", SAMPLE_TEXT[:80])
    engine(data_dir, tmp_path / "cache")  # tokenizes: the fresh entry is stamped with its largest id
    (binfile,) = (tmp_path / "cache").glob("*.bin")
    ids = np.fromfile(binfile, dtype=np.uint16)
    assert json.loads(binfile.with_suffix(".verified").read_text())["max_id"] == int(ids.max())
    checksums = []

    def counting_blake2b(*args, **kwargs):
        checksums.append(1)
        return hashlib.blake2b(*args, **kwargs)

    monkeypatch.setattr(data.cache, "hashlib", SimpleNamespace(blake2b=counting_blake2b, sha256=hashlib.sha256,
                                                               new=hashlib.new))
    again = engine(data_dir, tmp_path / "cache")
    assert checksums == []  # the stamp matched: no read of the .bin
    assert again.get_data().tolist() == engine(data_dir, False).get_data().tolist()
    # Damage that keeps the size and puts the modification time back still changes the file's change time.
    before = binfile.stat()
    damaged = ids.copy()
    damaged[5:40] = 0
    binfile.write_bytes(damaged.tobytes())
    os.utime(binfile, ns=(before.st_atime_ns, before.st_mtime_ns))
    with pytest.raises(ValueError, match=r"fails its checksum"):
        engine(data_dir, tmp_path / "cache")
    assert checksums  # checked in full again


def test_bad_arguments_are_named(tmp_path):
    """The global engine makes the per-rank engine's checks (data.sources.check_engine_args), and its own sizes."""
    with pytest.raises(FileNotFoundError, match="data_dir not found: .*nowhere"):
        engine(tmp_path / "nowhere", tmp_path / "cache")
    (tmp_path / "afile").write_text("x\n")
    with pytest.raises(NotADirectoryError, match="data_dir is not a folder: .*afile"):
        engine(tmp_path / "afile", tmp_path / "cache")
    write(tmp_path / "data" / "a.txt", SAMPLE_TEXT[:80])
    with pytest.raises(ValueError, match="global_batch_size must be a positive integer, got 0"):
        engine(tmp_path / "data", tmp_path / "cache", global_bs=0)
    with pytest.raises(ValueError, match="seed must be a non-negative integer, got -1"):
        engine(tmp_path / "data", tmp_path / "cache", seed=-1)


def test_binary_file_is_refused_with_its_name(tmp_path):
    data = tmp_path / "data"
    write(data / "a.txt", SAMPLE_TEXT[:80])
    rng = np.random.default_rng(0)
    (data / "libfoo.so").write_bytes(b"\x7fELF" + rng.integers(0, 256, 20000, dtype=np.uint8).tobytes())
    with pytest.raises(ValueError, match=r"libfoo\.so does not look like UTF-8 text \(\d+ NUL byte"):
        engine(data, tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("*.bin.tmp-*"))
    # Text that is mostly undecodable, without NUL bytes, is refused too; a few bad lines only warn.
    (data / "libfoo.so").unlink()
    write(data / "latin1.txt", [])
    (data / "latin1.txt").write_bytes(b"".join(b"caf\xe9 " * 30 + b"\n" for _ in range(10)))
    with pytest.raises(ValueError, match=r"latin1\.txt does not look like UTF-8 text \(0 NUL byte\(s\), 10 of 10"):
        engine(data, tmp_path / "cache")
    with pytest.warns(DataWarning, match=r"latin1\.txt: 10 line\(s\) had undecodable"):
        engine(data, tmp_path / "cache", max_bad_line_fraction=1.0)


def test_offline_tokenization_leaves_nothing_to_tokenize(mixed, tmp_path, monkeypatch, capsys):
    from data.cache import TokenCache
    from data.offline import main as tokenize_data

    data, mix, _ = mixed
    cache = tmp_path / "offline"
    assert tokenize_data(["--data_dir", str(data), "--tokenizer_path", str(TOKENIZER), "--cache_dir", str(cache),
                        "--num_workers", "1", "--data_mix", str(mix)]) == 0
    out = capsys.readouterr().out
    assert "4 files (0 already cached)" in out and "tokens/s" in out
    monkeypatch.setattr(TokenCache, "tokenize", lambda *a, **k: pytest.fail("tokenized at start"))
    e = engine(data, cache, data_mix=mix)
    assert e.num_tokens == int(out.split(" tokens (")[0].rsplit(" ", 1)[1])
