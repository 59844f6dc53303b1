"""BaiChuanTokenizer against SentencePiece itself, on the released baichuan-7B tokenizer.model."""
import pytest
import sentencepiece as spm

from models.tokenization_baichuan import BaiChuanTokenizer

TEXTS = [
    "登鹳雀楼->王之涣\n夜雨寄北->",
    "The quick brown fox jumps over the lazy dog.",
    "Pi is 3.14159265 and 2026-11-27 is a date; ４２ is full-width.",
    "emoji 😀🚀👍🏽 and rare characters 𠀀𪚥龘 and tabs\tand  double  spaces",
    "混合 English 与中文，标点！？「」",
    "   leading spaces and trailing   ",
]


@pytest.fixture
def pair(any_tokenizer):
    return BaiChuanTokenizer(vocab_file=str(any_tokenizer)), \
        spm.SentencePieceProcessor(model_file=str(any_tokenizer))


@pytest.mark.parametrize("text", TEXTS)
def test_ids_equal_sentencepiece_plus_bos(pair, text):
    tok, sp = pair
    assert tok(text).input_ids == [1] + sp.encode(text)
    assert tok.convert_ids_to_tokens(tok(text).input_ids[1:]) == sp.encode(text, out_type=str)


@pytest.mark.parametrize("text", TEXTS)
def test_decode_round_trips(pair, text):
    tok, sp = pair
    ids = tok(text).input_ids
    # NFKC folds full-width forms; what must round-trip is the normalized text SentencePiece itself decodes to.
    assert tok.decode(ids, skip_special_tokens=True) == sp.decode(sp.encode(text))
    if text == sp.decode(sp.encode(text)):
        assert tok.decode(ids, skip_special_tokens=True) == text


@pytest.mark.real_data  # the repository's tokenizer has its own twin: test_shipped_model_has_the_conventions
def test_released_conventions(released_tokenizer):
    tok, sp = BaiChuanTokenizer(vocab_file=str(released_tokenizer)), spm.SentencePieceProcessor(
        model_file=str(released_tokenizer))
    assert tok.vocab_size == 64000 == len(tok)
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.add_bos_token and not tok.add_eos_token
    assert sp.encode("12345") == [31106, 53, 54, 55, 56, 57]  # one piece per digit
    assert sp.encode("登鹳雀楼->王之涣\n夜雨寄北->")[9] == 5  # "\n" is its own piece
    rare = tok("𰻞").input_ids[1:]
    assert all(393 <= i <= 648 for i in rare[1:]), rare  # byte-fallback pieces
    assert tok.decode(rare) == "𰻞"


def test_eos_and_pairs(any_tokenizer):
    tok = BaiChuanTokenizer(vocab_file=str(any_tokenizer), add_eos_token=True)
    assert tok("你好").input_ids[-1] == 2 and tok("你好").input_ids[0] == 1
    no_bos = BaiChuanTokenizer(vocab_file=str(any_tokenizer), add_bos_token=False)
    assert no_bos("你好").input_ids[0] != 1


def test_save_and_load(pair, tmp_path):
    tok, _ = pair
    tok.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.model").read_bytes() == open(tok.vocab_file, "rb").read()
    again = BaiChuanTokenizer.from_pretrained(tmp_path)
    assert again(TEXTS[0]).input_ids == tok(TEXTS[0]).input_ids
    assert again.add_bos_token and not again.add_eos_token


def test_batch_left_padding(pair):
    tok, _ = pair
    tok.pad_token = tok.unk_token  # the released tokenizer has no pad piece; id 0 is the config's pad id
    tok.padding_side = "left"
    batch = tok(["短", "a much longer English prompt"], padding=True, return_tensors="pt")
    assert batch.input_ids[0, 0].item() == 0 and batch.attention_mask[0, 0].item() == 0
    assert batch.attention_mask[1].all()


def test_missing_and_bad_tokenizer_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="SentencePiece model file not found: .*nope.model"):
        BaiChuanTokenizer(vocab_file=str(tmp_path / "nope.model"))
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="bad.model is not a SentencePiece model"):
        BaiChuanTokenizer(vocab_file=str(bad))
