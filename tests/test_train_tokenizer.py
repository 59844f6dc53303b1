"""scripts/train_tokenizer.py and scripts/tokenizer_stats.py on tiny corpora, and the shipped tokenizer.model.

The tiny runs train a few-hundred-piece model in well under a second; the shipped-model tests read the released
tokenizer and the corpus from ../shared/data (skipped when it is absent).
"""
import random
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as model_pb2

from conftest import ROOT, shared_path

import corpus.tokenizer_training as train_tokenizer
from corpus.tokenizer_training import USER_DEFINED_SYMBOLS
from scripts import tokenizer_stats

SHIPPED = ROOT / "tokenizer.model"
N_META = 3 + len(USER_DEFINED_SYMBOLS) + 256  # ids below this are identical in every model the script writes
TINY_VOCAB = 800

EN_WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly hex every jovial boxer "
            "and then they all went home to sleep in the warm house by the river").split()
ZH_WORDS = ["中国", "人民", "共和", "春天", "花开", "明月", "故乡", "法律", "规定", "公民", "权利", "义务", "国家",
            "山水", "江河", "风雨", "天下", "学习", "工作", "生活"]


def _write_tiny_corpus(root: Path) -> Path:
    """A deterministic zh+en corpus of a few hundred lines, with numbers, runs of spaces and one very long line."""
    rng = random.Random(0)
    (root / "en").mkdir(parents=True)
    (root / "zh").mkdir(parents=True)
    en = []
    for i in range(300):
        words = [rng.choice(EN_WORDS) for _ in range(rng.randint(5, 15))]
        sep = "  " if i % 2 == 0 else " "
        en.append(sep.join(words) + f" in {1700 + i}.")
    # One line far above --max-sentence-length: it must be split, not dropped.
    en.append(" ".join(f"Sentence Ж{i} is about the {rng.choice(EN_WORDS)} {rng.choice(EN_WORDS)}."
                       for i in range(100)))
    zh = ["".join(rng.choice(ZH_WORDS) for _ in range(rng.randint(4, 12))) + f"，第{i}条。" for i in range(300)]
    (root / "en" / "a.txt").write_text("\n".join(en) + "\n", encoding="utf-8")
    (root / "zh" / "b.txt").write_text("\n\n".join(zh) + "\n", encoding="utf-8")
    # Excluded by default, like the WikiText-2 evaluation splits.
    (root / "en" / "wikitext2_test.txt").write_text("Ψ zzzqqq zzzqqq\n" * 200, encoding="utf-8")
    return root


def _train_args(corpus: Path, output: Path, vocab_size: int = TINY_VOCAB):
    return ["--corpus", str(corpus / "zh"), str(corpus / "en"), "--output", str(output),
            "--vocab-size", str(vocab_size), "--max-sentence-length", "512", "--quiet"]


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory) -> Path:
    return _write_tiny_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def tiny_model(tiny_corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("model") / "tok" / "tokenizer.model"
    assert train_tokenizer.main(_train_args(tiny_corpus, out)) == 0
    return out


def _proto(path: Path) -> model_pb2.ModelProto:
    proto = model_pb2.ModelProto()
    proto.ParseFromString(Path(path).read_bytes())
    return proto


def check_conventions(path: Path, vocab_size: int) -> None:
    """The released tokenizer's conventions, checked on the pieces and on actual encodings."""
    sp = spm.SentencePieceProcessor(model_file=str(path))
    proto = _proto(path)
    assert sp.get_piece_size() == vocab_size
    assert proto.trainer_spec.model_type == model_pb2.TrainerSpec.BPE

    # Special ids: <unk>=0, <s>=1, </s>=2, no pad (the model config's pad/bos/eos rely on it).
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    assert [sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert sp.is_unknown(0) and sp.is_control(1) and sp.is_control(2)

    # The user-defined pieces at ids 3..392, then the 256 byte pieces at 393..648, and nothing else of those kinds.
    T = model_pb2.ModelProto.SentencePiece
    for i, symbol in enumerate(USER_DEFINED_SYMBOLS, start=3):
        assert proto.pieces[i].piece == symbol and proto.pieces[i].type == T.USER_DEFINED, i
    assert sp.piece_to_id("\n") == 5 and sp.piece_to_id("\t") == 6
    for b in range(256):
        assert proto.pieces[393 + b].piece == f"<0x{b:02X}>" and proto.pieces[393 + b].type == T.BYTE
    learned = proto.pieces[N_META:]
    assert all(p.type == T.NORMAL for p in learned)
    assert all(1 <= len(p.piece) <= 10 for p in learned)  # max_sentencepiece_length 10

    # Newlines and tabs are their own pieces, not normalized to spaces.
    ids = sp.encode("a\nb\tc")
    assert 5 in ids and 6 in ids
    assert sp.decode(ids) == "a\nb\tc"

    # Runs of spaces are kept, at the start, inside and at the end.
    for text in ["a   b", "  lead", "end  ", "x \t  y", "一  二"]:
        assert sp.decode(sp.encode(text)) == text, repr(text)

    # Each digit is its own piece, and no learned piece holds a digit.
    ids = sp.encode("pi is 3.14159, 2024年有12个月")
    with_digits = [sp.id_to_piece(i) for i in ids if not sp.is_byte(i) and any(c.isdigit() for c in sp.id_to_piece(i))]
    assert with_digits == list("314159" "2024" "12")
    assert not [p.piece for p in learned if any(c in "0123456789" for c in p.piece)]

    # Characters never seen in training fall back to their UTF-8 bytes: no <unk>, exact round trip.
    for text in ["😀", "𠀀", "ꙮ"]:
        ids = sp.encode(text)
        assert 0 not in ids
        assert [i for i in ids if sp.is_byte(i)] and sp.decode(ids) == text, repr(text)

    # NFKC: full-width letters and the ideographic space become their ASCII forms.
    assert proto.normalizer_spec.name == "nmt_nfkc"
    assert sp.decode(sp.encode("ｆｕｌｌ\u3000ｗｉｄｔｈ")) == "full width"
    assert proto.normalizer_spec.add_dummy_prefix and not proto.normalizer_spec.remove_extra_whitespaces


# ----------------------------------------------------------------------------------------------- tiny training runs

def test_tiny_model_has_the_released_conventions(tiny_model):
    check_conventions(tiny_model, TINY_VOCAB)


def test_tiny_model_learned_from_long_lines_and_not_from_excluded_files(tiny_model):
    sp = spm.SentencePieceProcessor(model_file=str(tiny_model))
    vocab = {sp.id_to_piece(i) for i in range(sp.get_piece_size())}
    # "Ж" occurs only in the line longer than --max-sentence-length, which SentencePiece alone would drop whole;
    # with character_coverage 1 every character trained on gets a piece.
    assert "Ж" in vocab
    assert "Ψ" not in vocab and not any("zzz" in piece for piece in vocab)
    assert "▁▁" in vocab  # learned from the lines with double spaces


def test_training_is_deterministic(tiny_corpus, tiny_model, tmp_path):
    again = tmp_path / "again.model"
    assert train_tokenizer.main(_train_args(tiny_corpus, again)) == 0
    assert again.read_bytes() == tiny_model.read_bytes()


def test_cli_runs_as_a_script(tiny_corpus, tmp_path):
    out = tmp_path / "cli.model"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "train_tokenizer.py"),
                           *_train_args(tiny_corpus, out, vocab_size=750)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "training on" in proc.stderr
    assert spm.SentencePieceProcessor(model_file=str(out)).get_piece_size() == 750


def test_failed_training_leaves_the_old_model_untouched(tiny_corpus, tmp_path):
    out = tmp_path / "tokenizer.model"
    out.write_bytes(b"previous model")
    with pytest.raises(SystemExit, match="--vocab-size 50000"):
        train_tokenizer.main(_train_args(tiny_corpus, out, vocab_size=50000))
    assert out.read_bytes() == b"previous model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.model"]  # no temporary file left behind


@pytest.mark.parametrize("flags, message", [
    (["--vocab-size", "600"], "leaves no room"),
    (["--character-coverage", "1.5"], "--character-coverage"),
    (["--heldout-every", "-1"], "--heldout-every"),
])
def test_bad_flags_are_refused(tiny_corpus, tmp_path, flags, message):
    with pytest.raises(SystemExit, match=message):
        train_tokenizer.main(_train_args(tiny_corpus, tmp_path / "x.model") + flags)


def test_bad_corpus_paths_and_files_are_named(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(SystemExit, match="nope does not exist"):
        train_tokenizer.main(["--corpus", str(missing), "--output", str(tmp_path / "x.model")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no .txt files under .*empty"):
        train_tokenizer.main(["--corpus", str(tmp_path / "empty"), "--output", str(tmp_path / "x.model")])
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(SystemExit, match="latin1.txt is not valid UTF-8"):
        train_tokenizer.main(["--corpus", str(bad), "--output", str(tmp_path / "x.model")])


# ---------------------------------------------------------------------------------------------- input preparation

@pytest.mark.parametrize("line", [
    " ".join(f"This is sentence {i}, which says \"hello\"! Right?" for i in range(200)),
    "".join(f"第{i}条：公民的合法的私有财产不受侵犯。“国家依照法律规定保护公民的私有财产权。”" for i in range(100)),
    "无标点的长句" * 300,  # no sentence end at all: cut at character boundaries
])
def test_split_long_line_fits_and_keeps_the_text(line):
    max_bytes = 256
    chunks = train_tokenizer.split_long_line(line, max_bytes)
    assert len(chunks) > 1
    assert all(0 < len(c.encode("utf-8")) <= max_bytes for c in chunks)
    assert all(c == c.strip(" ") for c in chunks)
    # Only the spaces at the cuts are dropped.
    assert "".join(chunks).replace(" ", "") == line.replace(" ", "")
    if "!" in line or "。" in line:
        assert all(c.endswith(("?", "。”", "。")) for c in chunks[:-1])


def test_short_lines_are_left_alone():
    assert train_tokenizer.split_long_line("  two  spaces  ", 256) == ["  two  spaces  "]


def test_heldout_chunks_are_exactly_the_ones_not_trained_on(tiny_corpus):
    files = train_tokenizer.corpus_files([tiny_corpus / "zh", tiny_corpus / "en"])
    assert not any(f.name.startswith("wikitext2") for f in files)
    every = 7
    chunks = list(train_tokenizer.iter_chunks(files, 512))
    trained = train_tokenizer.training_sentences(files, 512, every, 0, seed=1)
    heldout = tokenizer_stats.heldout_sample(tiny_corpus / "zh", every, 512) + \
        tokenizer_stats.heldout_sample(tiny_corpus / "en", every, 512)
    assert trained and heldout
    assert sorted(trained + heldout) == sorted(chunks)
    assert not set(trained) & set(heldout)


def test_max_sentences_keeps_a_seeded_subset(tiny_corpus):
    files = train_tokenizer.corpus_files([tiny_corpus])
    full = train_tokenizer.training_sentences(files, 512, 0, 0, seed=1)
    a = train_tokenizer.training_sentences(files, 512, 0, 50, seed=1)
    b = train_tokenizer.training_sentences(files, 512, 0, 50, seed=1)
    c = train_tokenizer.training_sentences(files, 512, 0, 50, seed=2)
    assert len(a) == 50 and a == b and a != c
    assert set(a) <= set(full)


# -------------------------------------------------------------------------------------------------- tokenizer_stats

def test_stats_count_tokens_chars_and_bytes(tiny_model, tmp_path):
    zh, en = tmp_path / "zh.txt", tmp_path / "en.txt"
    zh.write_text("春天花开，明月故乡。\n\n法律规定公民的权利和义务。\n", encoding="utf-8")
    en.write_text("the quick brown fox\njumps over the lazy dog in 1999.\n", encoding="utf-8")
    samples = {"zh": tokenizer_stats.read_sample([zh]), "en": tokenizer_stats.read_sample([en])}
    assert len(samples["zh"]) == 2  # the blank line is not a sample line
    row = tokenizer_stats.model_stats(tiny_model, samples)
    sp = spm.SentencePieceProcessor(model_file=str(tiny_model))
    assert row["vocab"] == TINY_VOCAB
    for lang, lines in samples.items():
        tokens = sum(len(sp.encode(line)) for line in lines)
        text = "".join(lines)
        c = row[lang]
        assert (c.tokens, c.chars, c.bytes) == (tokens, len(text), len(text.encode("utf-8")))
        assert c.tokens_per_char == pytest.approx(tokens / len(text))
        assert c.bytes_per_token == pytest.approx(len(text.encode("utf-8")) / tokens)


def test_stats_cli_prints_one_row_per_model(tiny_model, tmp_path, capsys):
    zh, en = tmp_path / "zh.txt", tmp_path / "en.txt"
    zh.write_text("春天花开\n", encoding="utf-8")
    en.write_text("the quick brown fox\n", encoding="utf-8")
    other = tmp_path / "other.model"
    other.write_bytes(tiny_model.read_bytes())
    assert tokenizer_stats.main([str(tiny_model), str(other), "--zh", str(zh), "--en", str(en)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("| model | vocab | zh tokens/char")
    assert len(lines) == 4 and str(other) in lines[3] and f"| {TINY_VOCAB} |" in lines[2]
    with pytest.raises(SystemExit, match="missing.model does not exist"):
        tokenizer_stats.main([str(tmp_path / "missing.model"), "--zh", str(zh), "--en", str(en)])
    with pytest.raises(SystemExit, match="sample file .*absent.txt does not exist"):
        tokenizer_stats.main([str(tiny_model), "--zh", str(tmp_path / "absent.txt"), "--en", str(en)])


# ------------------------------------------------------------------------------------ the shipped tokenizer.model

def test_shipped_model_has_the_conventions():
    assert SHIPPED.is_file(), "tokenizer.model missing at the repository root: run scripts/train_tokenizer.py"
    check_conventions(SHIPPED, 64000)


@pytest.mark.real_data
def test_shipped_model_is_a_drop_in_for_the_released_one(released_tokenizer):
    ours, released = _proto(SHIPPED), _proto(released_tokenizer)
    for field in ("name", "add_dummy_prefix", "remove_extra_whitespaces", "escape_whitespaces"):
        assert getattr(ours.normalizer_spec, field) == getattr(released.normalizer_spec, field), field
    for field in ("model_type", "vocab_size", "byte_fallback", "character_coverage", "max_sentencepiece_length",
                  "max_sentence_length", "num_sub_iterations", "unk_id", "bos_id", "eos_id", "pad_id",
                  "split_by_whitespace", "split_by_unicode_script", "split_by_number", "treat_whitespace_as_suffix"):
        assert getattr(ours.trainer_spec, field) == getattr(released.trainer_spec, field), field
    # Every special, user-defined and byte piece sits at the same id with the same type.
    assert len(ours.pieces) == len(released.pieces) == 64000
    for i in range(N_META):
        assert (ours.pieces[i].piece, ours.pieces[i].type) == (released.pieces[i].piece, released.pieces[i].type), i
    # Hence text made of those pieces encodes to the same ids, apart from the learned "▁" prefix piece.
    a = spm.SentencePieceProcessor(model_file=str(SHIPPED))
    b = spm.SentencePieceProcessor(model_file=str(released_tokenizer))
    text = "2024\n\t０１。《》<reserved_7>"
    assert a.encode(text)[1:] == b.encode(text)[1:]


@pytest.mark.real_data
def test_shipped_model_is_what_the_script_builds_from_the_corpus(tmp_path):
    corpus = shared_path("corpus")
    out = tmp_path / "tokenizer.model"
    assert train_tokenizer.main(["--corpus", str(corpus), "--output", str(out), "--quiet"]) == 0
    assert out.read_bytes() == SHIPPED.read_bytes(), (
        "tokenizer.model differs from a fresh run of scripts/train_tokenizer.py on ../shared/data/corpus")


@pytest.mark.real_data
def test_shipped_model_compresses_held_out_corpus_text_no_worse_than_released(released_tokenizer):
    corpus = shared_path("corpus")
    samples = {lang: tokenizer_stats.heldout_sample(corpus / lang) for lang in ("zh", "en")}
    ours = tokenizer_stats.model_stats(SHIPPED, samples)
    released = tokenizer_stats.model_stats(released_tokenizer, samples)
    for lang in samples:
        # Trained on this corpus's domain, ours should not need more tokens than the released one on unseen chunks.
        assert ours[lang].tokens <= released[lang].tokens * 1.02, lang
        assert ours[lang].chars == released[lang].chars


@pytest.mark.real_data
def test_shipped_model_normalizes_like_the_released_one(released_tokenizer):
    """The NFKC tables differ only where a newer Unicode version gave new characters a compatibility mapping."""
    a = spm.SentencePieceProcessor(model_file=str(SHIPPED))
    b = spm.SentencePieceProcessor(model_file=str(released_tokenizer))
    differ = []
    for cp in range(0x20, 0x30000):
        if 0xD800 <= cp < 0xE000:  # surrogates
            continue
        ch = chr(cp)
        if a.normalize(ch) != b.normalize(ch):
            differ.append(ch)
    # sentencepiece 0.2.3's table adds ~160 mappings (e.g. U+A7F2 -> "C", U+107xx modifier letters), all for
    # characters that the released table leaves unchanged.
    assert len(differ) < 200
    assert all(b.normalize(ch) == "\u2581" + ch for ch in differ), [hex(ord(ch)) for ch in differ[:10]]
