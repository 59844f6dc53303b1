"""Prompts never pass the model's context: shots are dropped (the one nearest the question first) and the
number kept is recorded per question; a question that does not fit alone is an error naming subject and row.

The fixture is a C-Eval-layout folder written here, scored by a tiny model whose context is 160 positions."""
import csv
import json
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

CONTEXT = 160
HEADER = ["id", "question", "A", "B", "C", "D", "answer"]


def write_csv(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([HEADER] + rows)


@pytest.fixture(scope="module")
def short_model(tmp_path_factory):
    from models.configuration_baichuan import BaiChuanConfig
    from models.modeling_baichuan import BaiChuanForCausalLM
    from models.tokenization_baichuan import BaiChuanTokenizer
    path = tmp_path_factory.mktemp("short") / "tiny-160"
    torch.manual_seed(0)
    BaiChuanForCausalLM(BaiChuanConfig.from_name("tiny", max_position_embeddings=CONTEXT)).save_pretrained(path)
    BaiChuanTokenizer(vocab_file=str(ROOT / "tokenizer.model")).save_pretrained(path)
    return path


def shot(i):
    return [str(i), f"第{i}题：一段较长的题干，用来让五个示例放不进模型的上下文。", "甲", "乙", "丙", "丁", "A"]


def run(model, data, out, capsys):
    from evaluation import evaluate_zh
    summary = evaluate_zh.main(["--model_name_or_path", str(model), "--data_dir", str(data), "--subjects", "law",
                                "--output_dir", str(out), "--device_map", "cpu"])
    return summary, capsys.readouterr().out


def test_prompts_longer_than_the_context_drop_the_shots_nearest_the_question(short_model, tmp_path, capsys):
    data = tmp_path / "ceval"
    write_csv(data / "dev" / "law_dev.csv", [shot(i) for i in range(5)])
    write_csv(data / "val" / "law_val.csv", [["0", "短题？", "一", "二", "三", "四", "B"],
                                             ["1", "一道长一些的题目，" * 6, "一", "二", "三", "四", "C"]])
    summary, out = run(short_model, data, tmp_path / "out", capsys)
    entries = json.loads((tmp_path / "out" / "val" / "law.json").read_text(encoding="utf-8"))
    shots = [e["shots"] for e in entries]
    assert all(k < 5 for k in shots) and shots[0] > shots[1]  # the longer question keeps fewer shots
    from models.tokenization_baichuan import BaiChuanTokenizer
    tokenizer = BaiChuanTokenizer(vocab_file=str(short_model / "tokenizer.model"))
    for e, k in zip(entries, shots):
        assert len(tokenizer(e["prompt"], add_special_tokens=False).input_ids) <= CONTEXT
        assert e["prompt"].count("答案：") == k + 1
        assert f"第{k - 1}题" in e["prompt"] and f"第{k}题" not in e["prompt"]  # the first k shots were kept
    assert summary["fewer_shots"] == 2 and summary["config"]["max_length"] == CONTEXT
    assert f"limited to the model's max_position_embeddings {CONTEXT}" in out
    assert "2 question(s) used fewer than 5 shots" in out


def test_a_question_that_does_not_fit_alone_is_a_named_error(short_model, tmp_path, capsys):
    from evaluation.prompts import PromptTooLong
    data = tmp_path / "ceval"
    write_csv(data / "dev" / "law_dev.csv", [shot(i) for i in range(5)])
    write_csv(data / "val" / "law_val.csv", [["0", "短题？", "一", "二", "三", "四", "B"],
                                             ["1", "非常长的题目。" * 200, "一", "二", "三", "四", "C"]])
    with pytest.raises(PromptTooLong, match=r"subject 'law', .*law_val\.csv, row 2: the question alone is \d+ "
                                            rf"tokens, longer than the limit of {CONTEXT}"):
        run(short_model, data, tmp_path / "out", capsys)


def test_the_scripts_end_a_refusal_with_its_message_and_no_traceback(tmp_path):
    """evaluate_zh.py and evaluate_mmlu.py run main through common.run_cli with their expected errors."""
    from common import run_cli
    from evaluation.prompts import PromptTooLong

    def refuse():
        raise PromptTooLong("ceval/val/law_val.csv row 3 does not fit the context alone")

    with pytest.raises(SystemExit) as exit_info:
        run_cli(refuse, expected=(PromptTooLong,))
    assert exit_info.value.code == "error: ceval/val/law_val.csv row 3 does not fit the context alone"
    with pytest.raises(ValueError):  # anything not expected is a bug and keeps its traceback
        run_cli(lambda: int("x"), expected=(PromptTooLong,))
    # A missing data folder is found before the model loads.
    for script, model, out in (("evaluate_zh.py", "--model_name_or_path", "--output_dir"),
                               ("evaluate_mmlu.py", "--model", "--save_dir")):
        proc = subprocess.run([sys.executable, str(ROOT / "evaluation" / script), model, str(tmp_path / "no-model"),
                               "--data_dir", str(tmp_path / "no-data"), out, str(tmp_path / "out")], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 1, proc.stderr[-2000:]
        assert proc.stderr.startswith("error: ") and "no-data" in proc.stderr and "Traceback" not in proc.stderr
