"""The held-out validation loss per --data_mix source (training/validation.py), in-process: no launcher."""
import json
import math
import random
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

from data.cache import EOS_TOKEN_ID, MIN_LINE_TOKENS, is_held_out
from models.configuration_baichuan import BaiChuanConfig
from models.modeling_baichuan import BaiChuanForCausalLM
from training.validation import build_validation

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "tokenizer.model"
MAX_LENGTH = 64
EN = "the of river model light stone paper garden window music number evening market winter".split()
ZH = list("我们今天学习中文的方法山水天气城市朋友音乐历史")


def write_corpus(root: Path, lines_per_file=40, seed=0):
    """Two sources, two files each: en/ (English words) and zh/ (Chinese characters), one document a line."""
    rng = random.Random(seed)
    for source, words, sep in (("en", EN, " "), ("zh", ZH, "")):
        for part in range(2):
            lines = [sep.join(rng.choice(words) for _ in range(rng.randint(30, 60))) for _ in range(lines_per_file)]
            (root / source).mkdir(parents=True, exist_ok=True)
            (root / source / f"part{part}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def make_args(tmp_path, monkeypatch, *extra):
    import train

    mix = tmp_path / "mix.json"
    mix.write_text(json.dumps({"sources": [{"name": "en", "path": "en", "weight": 0.7},
                                           {"name": "zh", "path": "zh", "weight": 0.3}]}))
    monkeypatch.setattr("sys.argv", ["train.py", "--deepspeed_config", "x.json", "--data_mix", str(mix),
                                     "--tokenizer_path", str(TOKENIZER), "--max_length", str(MAX_LENGTH),
                                     "--num_workers", "1", "--cache_dir", str(tmp_path / "cache"), *extra])
    return train.parse_args()


def independent_samples(folder: Path, wanted: int, holdout=None):
    """The first `wanted` packed samples of the folder's files in path order, tokenized here with SentencePiece."""
    sp = spm.SentencePieceProcessor(model_file=str(TOKENIZER))
    stream = []
    for path in sorted(folder.rglob("*.txt")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if holdout is not None and not is_held_out(line.strip(), holdout):
                continue
            ids = sp.EncodeAsIds(line.strip()) + [EOS_TOKEN_ID]
            if len(ids) >= MIN_LINE_TOKENS:
                stream += ids
    assert len(stream) >= wanted * (MAX_LENGTH + 1)
    return [torch.tensor(stream[i * (MAX_LENGTH + 1):(i + 1) * (MAX_LENGTH + 1)]) for i in range(wanted)]


def independent_loss(model, samples):
    """Token-weighted mean next-token cross-entropy, computed from the logits."""
    total, count = 0.0, 0
    with torch.no_grad():
        for s in samples:
            logits = model(s[None]).logits[0, :-1].double()  # [max_length, vocab]
            total += torch.nn.functional.cross_entropy(logits, s[1:], reduction="sum").item()
            count += MAX_LENGTH
    return total / count


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = BaiChuanConfig.from_json_file(str(ROOT / "config" / "model" / "tiny.json"))
    config.use_cache = False
    return BaiChuanForCausalLM(config).eval()


def test_val_dir_loss_per_source_equals_independent_computation(tmp_path, monkeypatch, model):
    write_corpus(tmp_path / "val")
    args = make_args(tmp_path, monkeypatch, "--val_dir", str(tmp_path / "val"), "--eval_tokens", str(4 * MAX_LENGTH))
    validation = build_validation(args, 0, 1, "cpu")
    result = validation.evaluate(model)
    per_source = {name: independent_loss(model, independent_samples(tmp_path / "val" / name, 2))
                  for name in ("en", "zh")}  # 4 samples split equally over 2 sources
    for name, loss in per_source.items():
        assert result[f"val_loss/{name}"] == pytest.approx(loss, abs=1e-5), name
        assert result[f"val_ppl/{name}"] == pytest.approx(math.exp(result[f"val_loss/{name}"]))
    assert result["val_loss"] == pytest.approx(sum(per_source.values()) / 2, abs=1e-5)
    assert result["val_tokens"] == 4 * MAX_LENGTH
    assert abs(per_source["en"] - per_source["zh"]) > 1e-3  # the two sources are really told apart
    assert not model.training


def test_val_fraction_per_source_same_forward_count_on_every_rank(tmp_path, monkeypatch, model):
    write_corpus(tmp_path / "data", lines_per_file=120)
    args = make_args(tmp_path, monkeypatch, "--data_dir", str(tmp_path / "data"), "--val_fraction", "0.3",
                     "--eval_tokens", str(6 * MAX_LENGTH))
    ranks = [build_validation(args, r, 2, "cpu") for r in range(2)]
    # 6 samples, 3 per source, 2 per rank and source: 4 forward calls on each rank, real or weight 0.
    assert [len(v.batches) for v in ranks] == [4, 4]
    assert [sum(w for _, w, _ in v.batches) for v in ranks] == [4.0, 4.0]
    # Rank 0 reads part0 of each source: its held-out documents, packed in file order.
    for i, name in enumerate(ranks[0].names):
        mine = [b[0] for b, _, s in ranks[0].batches if s == i]
        expected = independent_samples(_only(tmp_path, name, "part0.txt"), 2, holdout=0.3)
        assert [m.tolist() for m in mine] == [e.tolist() for e in expected], name
    result = ranks[0].evaluate(model)  # no process group: this rank's share alone
    assert {"val_loss/en", "val_loss/zh", "val_ppl/en", "val_ppl/zh"} <= set(result)
    assert result["val_tokens"] == 4 * MAX_LENGTH


def _only(tmp_path, source, name):
    """A folder holding just one file of a source, for the independent tokenization."""
    folder = tmp_path / "only" / source
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes((tmp_path / "data" / source / name).read_bytes())
    return folder


def test_bad_mixture_for_validation_is_refused_naming_flag_and_source(tmp_path, monkeypatch):
    write_corpus(tmp_path / "val", lines_per_file=3)
    (tmp_path / "val2" / "en").mkdir(parents=True)
    (tmp_path / "val2" / "en" / "a.txt").write_text("x\n")
    args = make_args(tmp_path, monkeypatch, "--val_dir", str(tmp_path / "val2"))
    with pytest.raises(ValueError, match=r"--val_dir .*val2: --data_mix .*source 'zh' names .*does not exist"):
        build_validation(args, 0, 1, "cpu")
    args = make_args(tmp_path, monkeypatch, "--val_dir", str(tmp_path / "val"), "--eval_tokens", str(40 * MAX_LENGTH))
    with pytest.raises(ValueError, match=r"--val_dir .*val, source 'en' holds \d+ sample\(s\).* fewer than the 20"):
        build_validation(args, 0, 1, "cpu")
