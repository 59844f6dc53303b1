"""evaluation/evaluate_ppl.py: curves against plain cross-entropy through transformers' Llama, outputs, refusals."""
import json
import math
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common import REPO_ROOT
from evaluation import evaluate_ppl as ppl
from test_rope_scaling import MAX_POS, llama_twin, tiny_model

BUCKET = 8


def reference_bucket_means(llama, docs, length, spans):
    """Mean loss by bucket of document position, from full logits and plain cross-entropy, window by window."""
    sums, counts = {}, {}
    for doc in docs:
        if len(doc) < length:
            continue
        for start, end, first in spans:
            ids = torch.tensor([doc[start:end]])
            with torch.no_grad():
                logits = llama(ids, use_cache=False).logits[0]  # [w, vocab]
            losses = F.cross_entropy(logits[:-1].double(), ids[0, 1:], reduction="none")  # predicts start+1..end-1
            for pos in range(first, end):
                b = pos // BUCKET
                sums[b] = sums.get(b, 0.0) + losses[pos - start - 1].item()
                counts[b] = counts.get(b, 0) + 1
    return {b: sums[b] / counts[b] for b in sums}, counts


@pytest.mark.parametrize("scaling", [None, {"type": "dynamic", "factor": 2.0}])
def test_curves_equal_plain_cross_entropy_through_llama(scaling):
    model = tiny_model(rope_scaling=scaling)
    llama = llama_twin(model)
    gen = torch.Generator().manual_seed(1)
    docs = [torch.randint(3, 256, (n,), generator=gen).tolist() for n in (90, 70, 45, 20, 10)]
    lengths, window, stride = [16, 40, 90], MAX_POS, 12  # 90 - 32 is no multiple of 12: a short last step
    curves = ppl.evaluate_model(model, docs, lengths, ["whole", "sliding"], bucket=BUCKET, window=window,
                                stride=stride, batch_size=2, loss_chunk=16)
    assert [(c.mode, c.length) for c in curves] == [("whole", 16), ("whole", 40), ("whole", 90),
                                                    ("sliding", 16), ("sliding", 40), ("sliding", 90)]
    for curve in curves:
        expected_docs = sum(len(d) >= curve.length for d in docs)
        assert (curve.documents, curve.skipped) == (expected_docs, len(docs) - expected_docs)
        if curve.mode == "whole":
            spans = [(0, curve.length, 1)]
        else:
            # Windows of exactly `window` tokens ending at window, window + stride, ..., then the length.
            ends = list(range(window, curve.length, stride)) + [curve.length] if curve.length > window \
                else [curve.length]
            spans = [(max(0, e - window), e, 1 if i == 0 else ends[i - 1]) for i, e in enumerate(ends)]
        means, counts = reference_bucket_means(llama, docs, curve.length, spans)
        summary = curve.summary()
        assert summary["tokens"] == expected_docs * (curve.length - 1)  # every token but the first, once
        got = {b["start"] // BUCKET: b for b in summary["buckets"]}
        assert set(means) == {k for k, b in got.items() if b["tokens"]}
        for k, mean in means.items():
            assert got[k]["tokens"] == counts[k]
            assert got[k]["loss"] == pytest.approx(mean, rel=1e-5)
            assert got[k]["ppl"] == pytest.approx(math.exp(mean), rel=1e-5)


def test_sliding_equals_whole_within_the_window_and_differs_past_it():
    model = tiny_model()
    docs = [torch.randint(3, 256, (80,), generator=torch.Generator().manual_seed(2)).tolist()]
    whole, sliding = ppl.evaluate_model(model, docs, [80], ["whole", "sliding"], bucket=BUCKET, window=MAX_POS,
                                        stride=8)
    w, s = whole.summary()["buckets"], sliding.summary()["buckets"]
    for k in range(MAX_POS // BUCKET):  # positions the first window covers: the same forward
        assert s[k]["loss"] == pytest.approx(w[k]["loss"], rel=1e-5)
    assert any(abs(a["loss"] - b["loss"]) > 1e-4 for a, b in zip(w[MAX_POS // BUCKET:], s[MAX_POS // BUCKET:]))


def test_token_losses_chunking_changes_nothing():
    model = tiny_model()
    ids = torch.randint(3, 256, (3, 50))
    full = F.cross_entropy(model(ids).logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    for chunk in (1, 7, 4096):
        torch.testing.assert_close(ppl.token_losses(model, ids, chunk), full, rtol=1e-6, atol=1e-6)


def test_sliding_windows_cover_every_token_once():
    for length, window, stride in [(100, 32, 12), (96, 32, 16), (20, 32, 8), (33, 32, 32)]:
        spans = ppl.sliding_windows(length, window, stride)
        scored = [p for a, b, first in spans for p in range(first, b)]
        assert scored == list(range(1, length))
        assert all(b - a == min(window, length) for a, b, _ in spans)
        assert all(first - a >= min(window, length) - stride or a == 0 for a, b, first in spans)


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    from models.tokenization_baichuan import BaiChuanTokenizer
    folder = tmp_path_factory.mktemp("ppl") / "tiny64"
    model = tiny_model(vocab_size=64000)
    model.config.max_position_embeddings = 64
    model.save_pretrained(folder)
    BaiChuanTokenizer(vocab_file=str(REPO_ROOT / "tokenizer.model")).save_pretrained(folder)
    return folder


def books(tmp_path):
    folder = tmp_path / "books"
    (folder / "sub").mkdir(parents=True)
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex bad jugglers".split()
    rng = np.random.default_rng(0)
    (folder / "a.txt").write_text(" ".join(rng.choice(words, 400)) + "\n", encoding="utf-8")
    (folder / "sub" / "b.txt").write_text(" ".join(rng.choice(words, 400)) + "\n", encoding="utf-8")
    (folder / "short.txt").write_text("too short\n", encoding="utf-8")
    return folder


def test_command_writes_json_csv_png_and_marks_extrapolation(tmp_path, model_folder, capsys):
    out = tmp_path / "out"
    run_dir, val_dir = tmp_path / "run", tmp_path / "val"
    run_dir.mkdir(), val_dir.mkdir()
    (run_dir / "run_config.json").write_text(json.dumps({"args": {"val_dir": str(val_dir)}}))
    (val_dir / "part-0000.txt").write_text("a short held-out document\n\n" + "fox " * 200 + "\n")
    results = ppl.main(["--model", str(model_folder), "--data", str(books(tmp_path)), "--held_out", str(run_dir),
                        "--lengths", "32", "128",
                        "--bucket", "32", "--rope_scaling", "none", "linear:2", "--output_dir", str(out),
                        "--device", "cpu", "--batch_size", "2"])
    data = json.loads((out / "ppl.json").read_text())
    assert data["settings"]["documents"] == 5  # 3 files + 2 held-out lines (the empty line is no document)
    rows = {(r["rope_scaling"] and r["rope_scaling"]["type"], r["mode"], r["length"]): r for r in data["results"]}
    assert len(rows) == 8 == len(results)
    for (kind, mode, length), r in rows.items():
        assert r["max_position_embeddings"] == 64
        assert r["documents"] == 3 and r["skipped"] == 2  # short ones are counted, not silently dropped
        assert r["tokens"] == 3 * (length - 1)
        # A length past max_position_embeddings is measured and marked; sliding windows stay within it.
        assert r["extrapolation"] == (mode == "whole" and length == 128)
        assert math.isfinite(r["ppl"]) and r["ppl"] > 1
    # The variant reached the model: linear scaling changes the numbers even within the training length.
    assert rows[("linear", "whole", 32)]["loss"] != rows[(None, "whole", 32)]["loss"]
    assert rows[("linear", "whole", 32)]["rope_scaling"] == {"type": "linear", "rope_type": "linear", "factor": 2.0}
    lines = (out / "ppl.csv").read_text().splitlines()
    assert lines[0].startswith("model,rope_scaling,mode,length")
    assert len(lines) == 1 + sum(len(r["buckets"]) for r in data["results"])
    png = (out / "ppl.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
    width, height = struct.unpack(">II", png[16:24])
    assert (width, height) == (1280, 420)  # two panels of 6.4 x 4.2 inches at 100 dpi
    assert len(png) > 10_000  # curves, axes and legends, not an empty canvas
    table = capsys.readouterr().out
    assert "extrapolation" in table and "tiny64" in table


def test_bad_input_is_a_clear_error(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n", encoding="utf-8")
    (tmp_path / "no_text").mkdir()
    (tmp_path / "no_text" / "notes.md").write_text("# not a .txt\n")
    base = ["--model", str(tmp_path), "--output_dir", str(tmp_path / "out"), "--lengths", "64"]
    with pytest.raises(SystemExit, match=r"empty\.txt: empty file"):
        ppl.main(base + ["--data", str(empty)])
    with pytest.raises(SystemExit, match=r"no_text: folder holds no \.txt file"):
        ppl.main(base + ["--data", str(tmp_path / "no_text")])
    binary = tmp_path / "data.txt"
    binary.write_bytes(b"text\x00\x01\x02")
    with pytest.raises(SystemExit, match=r"data\.txt: holds NUL bytes"):
        ppl.main(base + ["--data", str(binary)])
    with pytest.raises(SystemExit):
        ppl.main(["--model", "m", "--data", "d", "--lengths", "1024", "65536"])
    assert "--lengths [65536] exceed --max_eval_length 32768" in capsys.readouterr().err
    with pytest.raises(SystemExit, match=r"--held_out .*: no run_config.json"):
        ppl.main(base + ["--held_out", str(tmp_path / "no_text")])
    (tmp_path / "run_config.json").write_text(json.dumps({"args": {"val_dir": None, "val_fraction": None}}))
    with pytest.raises(SystemExit, match=r"run_config.json records neither --val_dir nor --val_fraction"):
        ppl.main(base + ["--held_out", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"--rope_scaling 'yarn:2'"):
        ppl.main(base + ["--data", str(tmp_path / "no_text"), "--rope_scaling", "yarn:2"])


def test_held_out_of_a_val_fraction_run_is_what_the_data_path_held_out(tmp_path):
    """--held_out of a --val_fraction run: exactly the documents the data path gave validation, none it trained on,
    read from the run's --data_dir less its token cache."""
    import sentencepiece as spm
    from data.cache import EOS_TOKEN_ID, encode_lines
    from data.sources import list_data_files

    data, run = tmp_path / "data", tmp_path / "run"
    (data / "sub").mkdir(parents=True), run.mkdir()
    rng = np.random.default_rng(1)
    words = "river stone cloud lantern copper meadow violin harbor".split()
    lines = [" ".join(rng.choice(words, 12)) for _ in range(60)]
    # What the split must see as the data path does: surrounding spaces stripped, undecodable bytes replaced.
    (data / "a.txt").write_bytes("\n".join(f"  {t}\t" for t in lines[:30]).encode() + b"\n\n")
    (data / "sub" / "b.txt").write_bytes(b"\n".join(t.encode() + b" \xff" for t in lines[30:]))
    (data / "cache").mkdir()  # a non-hidden --cache_dir inside --data_dir is not data
    (data / "cache" / "x.txt").write_text("\n".join(lines) + "\n")
    (run / "run_config.json").write_text(json.dumps({"args": {"val_dir": None, "val_fraction": 0.3,
                                                               "data_dir": str(data), "cache_dir": str(data / "cache")}}))
    docs = ppl.held_out_documents(run)

    sp = spm.SentencePieceProcessor(model_file=str(REPO_ROOT / "tokenizer.model"))
    def sides(want):  # documents (token tuples) of one side of the split, as the data path tokenizes them
        out = []
        for path in list_data_files(data, exclude=[data / "cache"]):
            tokens = encode_lines(sp, path.read_bytes(), 1, EOS_TOKEN_ID, np.int32, (0.3, want))[0]
            ends = np.flatnonzero(tokens == EOS_TOKEN_ID)  # every document ends with EOS
            out += [tuple(d.tolist()) for d in np.split(tokens, ends + 1)[:-1]]
        return [d[:-1] for d in out if len(d) > 1]  # without EOS; the blank line is a document of no tokens
    evaluated = [tuple(sp.encode(text)) for _, text in docs]
    held, trained = sides(True), sides(False)
    assert 8 <= len(evaluated) <= 30 and len(evaluated) + len(trained) == 60
    assert sorted(evaluated) == sorted(held) and not set(evaluated) & set(trained)
    assert all(str(data / "cache") not in name for name, _ in docs)
    assert any(name.startswith(f"{data / 'sub' / 'b.txt'}:") and text.endswith("\ufffd") for name, text in docs)

    (run / "run_config.json").write_text(json.dumps({"args": {"val_fraction": 0.3, "data_dir": str(tmp_path / "no")}}))
    with pytest.raises(ppl.PplError, match=r"records --data_dir '.*no', which is not a folder"):
        ppl.held_out_documents(run)
