"""The native Llama export (checkpoint/llama.py): same logits, same greedy text, same token ids, no remote code."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, shared_path


@pytest.fixture(scope="module")
def vocab():
    return str(ROOT / "tokenizer.model")


@pytest.fixture(scope="module")
def pair(tmp_path_factory, vocab):
    """A tiny random model (norm weights away from 1, so every tensor matters) and its Llama folder."""
    from checkpoint.llama import save_llama_folder
    from models.configuration_baichuan import BaiChuanConfig
    from models.modeling_baichuan import BaiChuanForCausalLM
    torch.manual_seed(0)
    model = BaiChuanForCausalLM(BaiChuanConfig.from_name("tiny")).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    folder = tmp_path_factory.mktemp("llama") / "tiny-llama"
    save_llama_folder(model, vocab, folder)
    return model, folder


def sample_lines(real: bool):
    """Chinese and English lines of the shipped corpus sample, and of the real corpus where present."""
    files = sorted((ROOT / "data_dir").glob("*.txt"))
    if real:
        corpus = shared_path("corpus")
        files += sorted(corpus.glob("zh/*.txt")) + sorted(corpus.glob("en/*.txt"))
    lines = []
    for path in files:
        with open(path, encoding="utf-8") as f:
            lines += [line.rstrip("\n") for _, line in zip(range(50), f) if line.strip()]
    return lines


def test_logits_and_greedy_generation_equal_ours(pair):
    from transformers import LlamaForCausalLM
    model, folder = pair
    llama = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "auto_map" not in config
    assert not list(folder.glob("*.py"))
    ids = torch.randint(3, 64000, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(llama(ids).logits, model(ids).logits, rtol=0, atol=1e-5)
        kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
        assert llama.generate(ids[:1, :8], **kwargs).tolist() == model.generate(ids[:1, :8], **kwargs).tolist()


def test_llama_tokenizer_gives_our_ids(any_tokenizer, tmp_path):
    """Default loading (the fast tokenizer.json) and the slow one give SentencePiece's ids, BOS in front, except
    at the very start of a text that starts with a space or a multi-character user-defined symbol (documented)."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    from checkpoint.llama import save_llama_tokenizer
    save_llama_tokenizer(str(any_tokenizer), tmp_path)
    sp = spm.SentencePieceProcessor(model_file=str(any_tokenizer))
    fast = AutoTokenizer.from_pretrained(tmp_path)
    slow = AutoTokenizer.from_pretrained(tmp_path, use_fast=False)
    assert type(fast).__name__ == "LlamaTokenizerFast" and type(slow).__name__ == "LlamaTokenizer"
    from sentencepiece import sentencepiece_model_pb2
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(any_tokenizer).read_bytes())
    user = [p.piece for p in proto.pieces if p.type == p.USER_DEFINED and len(p.piece) > 1]
    special = ["数字 123 和 English", "以下是中国关于法学考试的单项选择题，请选出其中的正确答案。\n\n答案：",
               "ｆｕｌｌ　width　１２３，！", "a\n\nb\tc <p>x</p> <unk> <s>", "2001年5月22日", "x <br> y"]
    lines = sample_lines(real=any_tokenizer != ROOT / "tokenizer.model")
    assert sum(any("\u4e00" <= ch <= "\u9fff" for ch in line) for line in lines) > 100  # Chinese and English
    mismatch = 0
    for text in special + lines:
        want = sp.encode(text)
        assert fast(text).input_ids[0] == 1 and slow(text).input_ids[0] == 1  # BOS, as our tokenizer
        assert slow(text, add_special_tokens=False).input_ids == want, text[:80]
        got = fast(text, add_special_tokens=False).input_ids
        if got != want:  # only at the start of the text, and only for the documented starts
            mismatch += 1
            assert text[:1].isspace() or any(text.startswith(u) for u in user), text[:80]
            tail = max(len(want) - 3, 0)
            assert got[len(got) - tail:] == want[len(want) - tail:]
        assert fast.decode(want) == sp.decode(want)
    assert mismatch < 0.2 * len(lines)


def test_loads_without_remote_code_outside_the_repository(pair, tmp_path):
    model, folder = pair
    code = ("import json, sys, torch\n"
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
            "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=False).eval()\n"
            "t = AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=False)\n"
            "ids = t('登鹳雀楼 white sun', return_tensors='pt').input_ids\n"
            "with torch.no_grad():\n"
            "    print(json.dumps({'cls': type(m).__name__, 'ids': ids[0].tolist(),\n"
            "                      'logits': m(ids).logits[0, -1, :5].tolist()}))\n")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code, str(folder)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["cls"] == "LlamaForCausalLM"
    with torch.no_grad():
        expected = model(torch.tensor([got["ids"]])).logits[0, -1, :5]
    torch.testing.assert_close(torch.tensor(got["logits"]), expected, rtol=0, atol=1e-5)


def test_rope_scaling_is_carried_over(vocab, tmp_path):
    from transformers import LlamaForCausalLM

    from checkpoint.llama import save_llama_folder
    from models.configuration_baichuan import BaiChuanConfig
    from models.modeling_baichuan import BaiChuanForCausalLM
    torch.manual_seed(1)
    config = BaiChuanConfig.from_name("tiny", rope_scaling={"type": "linear", "factor": 4.0})
    model = BaiChuanForCausalLM(config).eval()
    save_llama_folder(model, vocab, tmp_path / "scaled")
    llama = LlamaForCausalLM.from_pretrained(tmp_path / "scaled", dtype=torch.float32).eval()
    assert llama.config.rope_scaling["factor"] == 4.0
    ids = torch.randint(3, 64000, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(llama(ids).logits, model(ids).logits, rtol=0, atol=1e-5)
