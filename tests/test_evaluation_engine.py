"""The few-shot engine and the two evaluation scripts, on a tiny random model with a 64000-piece tokenizer, over
the project's benchmark fixtures (and the real files, for the engine equality, where present).

The fast engine (cached few-shot prefix, padded batches, last-position logits) must give the predictions
of the plain one-question-at-a-time full-prompt computation. In fp32 their letter logits differ only by
float rounding (~1e-7 here), far below the gaps between the four logits, so identical argmax is a firm
check rather than luck; the tests assert both.
"""
import csv
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import FIXTURES, ROOT
from evaluation import categories as cats
from evaluation.data import load_agieval, load_ceval, load_gaokao, load_mmlu
from evaluation.engine import FewShotEngine, load_model_and_tokenizer, predict
from evaluation.prompts import PromptStyle, fit_prompt

ATOL = 1e-4  # fp32 rounding between cached/batched and one-shot forwards is ~1e-7
DATA = FIXTURES / "benchmarks"
# The fixtures' prompts are short: this context limit makes shots drop for some questions, as 2048 does for the
# long passages of the real files.
SHORT_CONTEXT = (150, 200, 260)


def save_tokenizer(path):
    from models.tokenization_baichuan import BaiChuanTokenizer
    BaiChuanTokenizer(vocab_file=str(ROOT / "tokenizer.model")).save_pretrained(path)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A model folder as this project writes it: config + weights + code (trust_remote_code) + tokenizer.

    Its context (4096) fits every prompt of the reference protocol (at most 2048 tokens), so the scorers are
    compared on the reference's prompts; the tiny preset's 512 positions would drop shots.
    """
    from models.configuration_baichuan import BaiChuanConfig
    from models.modeling_baichuan import BaiChuanForCausalLM
    path = tmp_path_factory.mktemp("models") / "tiny-baichuan"
    torch.manual_seed(0)
    BaiChuanForCausalLM(BaiChuanConfig.from_name("tiny", max_position_embeddings=4096)).save_pretrained(path)
    save_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return load_model_and_tokenizer(str(tiny_dir), device_map="cpu")


def requests_for(tokenizer, data=DATA, max_length=SHORT_CONTEXT):
    """A few subjects of each task, including over-long prompts whose shots get dropped; `max_length` is one
    context limit, or a tuple used by subject in turn."""
    limits = iter(max_length * 6 if isinstance(max_length, tuple) else [max_length] * 6)
    out = []
    for s in load_mmlu(data / "mmlu", subjects=["abstract_algebra", "high_school_european_history"],
                       max_questions=5):
        limit = next(limits)
        out.append([fit_prompt(PromptStyle("en", s.name), s.dev, q, tokenizer, limit) for q in s.test])
    for s in load_ceval(data / "ceval", "val", ["high_school_biology", "law"], max_questions=6):
        style, limit = PromptStyle("zh", cats.CEVAL_PROMPT_NAMES[s.name]), next(limits)
        out.append([fit_prompt(style, s.dev, q, tokenizer, limit) for q in s.test])
    (g,) = load_gaokao(data / "gaokao-bench", subjects=["2010-2022_Math_I_MCQs"], max_questions=5)
    limit = next(limits)
    out.append([fit_prompt(PromptStyle("zh", "高考数学"), g.dev, q, tokenizer, limit) for q in g.test])
    (a,) = load_agieval(data / "agieval", subjects=["sat-en"], max_questions=4)
    limit = next(limits)
    out.append([fit_prompt(PromptStyle("en", "SAT_English"), a.dev, q, tokenizer, limit) for q in a.test])
    return out


def plain_scores(model, tokenizer, subject_requests):
    plain = FewShotEngine(model, tokenizer, mode="plain")
    return [plain.score([r.ids for r in reqs]) for reqs in subject_requests]


@pytest.fixture(scope="module")
def reference(tiny, bench):
    """Requests of every task and the plain computation's letter logits for them, computed once."""
    model, tokenizer = tiny
    subject_requests = requests_for(tokenizer, bench, SHORT_CONTEXT if bench == DATA else 2048)
    return subject_requests, plain_scores(model, tokenizer, subject_requests)


def assert_same(fast, subject_requests, references, grouping="shots"):
    for reqs, ref in zip(subject_requests, references):
        seqs = [r.ids for r in reqs]
        groups = {"shots": [r.shots for r in reqs], "none": None, "each": list(range(len(reqs)))}[grouping]
        got = fast.score(seqs, groups)
        np.testing.assert_allclose(got, ref, atol=ATOL, rtol=0)
        assert predict(got)[0] == predict(ref)[0]
        np.testing.assert_allclose(predict(got)[1], predict(ref)[1], atol=ATOL)
        # The check has teeth: the letter logits are far apart compared with the tolerance.
        gaps = np.diff(np.sort(ref, axis=1), axis=1).min(axis=1)
        assert (gaps > 10 * ATOL).mean() > 0.8


def test_fast_engine_equals_plain_computation(tiny, reference):
    model, tokenizer = tiny
    subject_requests, references = reference
    shots = {r.shots for reqs in subject_requests for r in reqs}
    assert len(shots) > 2  # several shot groups (dropped shots) within and across subjects
    # batch 3: batches of unequal question lengths, i.e. padding between the prefix and the question
    assert_same(FewShotEngine(model, tokenizer, batch_size=3), subject_requests, references)
    assert_same(FewShotEngine(model, tokenizer, batch_size=16), subject_requests, references)


def test_prefix_is_found_on_token_ids_whatever_the_grouping(tiny, reference):
    model, tokenizer = tiny
    fast = FewShotEngine(model, tokenizer, batch_size=4)
    subject_requests, references = reference
    assert_same(fast, subject_requests[:3], references[:3], "none")  # all in one group
    assert_same(fast, subject_requests[:3], references[:3], "each")  # no sharing at all


def test_legacy_tuple_cache_and_models_without_position_ids(tiny, reference, monkeypatch):
    """Older remote code (e.g. the released baichuan-7B) returns ((k, v), ...) caches."""
    model, tokenizer = tiny
    subject_requests, references = reference
    engine = FewShotEngine(model, tokenizer, batch_size=3)
    real = engine._run_prefix
    monkeypatch.setattr(engine, "_run_prefix", lambda ids: real(ids).to_legacy_cache())
    assert_same(engine, subject_requests[2:4], references[2:4])
    engine._can_pad = False  # a model whose forward has no position_ids: one question per pass
    assert_same(engine, subject_requests[2:4], references[2:4])


def test_hugging_face_llama_folder(tmp_path):
    """A transformers-native model (DynamicCache, logits_to_keep) goes through the same engine."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64000, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    save_tokenizer(tmp_path)
    model, tokenizer = load_model_and_tokenizer(str(tmp_path), device_map="cpu")
    subject_requests = [reqs for i, reqs in enumerate(requests_for(tokenizer)) if i in (0, 2)]
    assert_same(FewShotEngine(model, tokenizer, batch_size=3), subject_requests,
                plain_scores(model, tokenizer, subject_requests))


BROKEN_TOKENIZER = """
from transformers import PreTrainedTokenizer


class BaiChuanTokenizer(PreTrainedTokenizer):  # like the released file: sp_model used before it exists
    def __init__(self, vocab_file, **kwargs):
        super().__init__(**kwargs)
        self.sp_model = None

    @property
    def vocab_size(self):
        return self.sp_model.get_piece_size()

    def get_vocab(self):
        return {self.sp_model.id_to_piece(i): i for i in range(self.vocab_size)}
"""


def test_released_style_folder_with_broken_code_falls_back(tiny_dir, tiny, tmp_path, capsys):
    """With --trust_remote_code, the released baichuan-7B folder's own code fails on current transformers; ours
    takes over. (Without the flag, ours is used from the start.)"""
    import shutil
    folder = tmp_path / "released-like"
    shutil.copytree(tiny_dir, folder)
    (folder / "modeling_baichuan.py").write_text("import xformers_is_not_installed\n", encoding="utf-8")
    (folder / "tokenization_baichuan.py").write_text(BROKEN_TOKENIZER, encoding="utf-8")
    model, tokenizer = load_model_and_tokenizer(str(folder), device_map="cpu", trust_remote_code=True)
    out = capsys.readouterr().out
    assert "its model code failed" in out and "its tokenizer code failed" in out
    reference_model, reference_tokenizer = tiny
    text = "以下是中国关于法学考试的单项选择题，请选出其中的正确答案。\nAnswer:"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert ids == reference_tokenizer(text, add_special_tokens=False).input_ids
    np.testing.assert_allclose(FewShotEngine(model, tokenizer).score([ids]),
                               FewShotEngine(reference_model, reference_tokenizer).score([ids]), atol=1e-6)


def test_letter_ids_are_the_reference_ones(tiny):
    model, tokenizer = tiny
    engine = FewShotEngine(model, tokenizer)
    assert engine.letter_ids == [tokenizer(letter).input_ids[-1] for letter in "ABCD"]
    assert tokenizer("A").input_ids[0] != tokenizer.bos_token_id  # loaded with add_bos_token=False


# ---------------------------------------------------------------------------------------------------
# The scripts: outputs and summary lines
# ---------------------------------------------------------------------------------------------------

def test_evaluate_mmlu_outputs(tiny_dir, tmp_path, capsys):
    from evaluation import evaluate_mmlu
    summary = evaluate_mmlu.main(["-m", str(tiny_dir), "-d", str(DATA / "mmlu"), "-s", str(tmp_path),
                                  "--subjects", "abstract_algebra,marketing", "--max_questions", "6",
                                  "--device_map", "cpu", "--batch_size", "4"])
    out = capsys.readouterr().out
    results = tmp_path / "results_tiny-baichuan"
    cors = {}
    for subject in ("abstract_algebra", "marketing"):
        with open(results / f"{subject}.csv", newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
        assert rows[0] == ["0", "1", "2", "3", "4", "5", "tiny-baichuan_correct"] + [
            f"tiny-baichuan_choice{x}_probs" for x in "ABCD"] + ["shots"]
        raw = list(csv.reader(open(DATA / "mmlu" / "test" / f"{subject}_test.csv", newline="",
                                   encoding="utf-8")))[:6]
        assert [r[:6] for r in rows[1:]] == raw
        for r in rows[1:]:
            probs = [float(x) for x in r[7:11]]
            assert r[11] == "5"
            assert abs(sum(probs) - 1) < 1e-5
            assert r[6] == str("ABCD"[int(np.argmax(probs))] == r[5])
        cors[subject] = [r[6] == "True" for r in rows[1:]]
        assert f"Average accuracy {np.mean(cors[subject]):.3f} - {subject}\n" in out
    assert f"Average accuracy {np.mean(cors['abstract_algebra']):.3f} - math\n" in out
    assert f"Average accuracy {np.mean(cors['marketing']):.3f} - business\n" in out
    assert f"Average accuracy {np.mean(cors['abstract_algebra']):.3f} - STEM\n" in out
    assert f"Average accuracy {np.mean(cors['marketing']):.3f} - other (business, health, misc.)\n" in out
    average = np.mean(cors["abstract_algebra"] + cors["marketing"])
    assert f"Average accuracy: {average:.3f}\n" in out
    assert "- physics" not in out  # subcategories without subjects in this run are not printed
    assert summary["average"] == pytest.approx(average)
    assert json.loads((results / "summary.json").read_text())["questions"] == 12


def test_evaluate_mmlu_plain_engine_gives_the_same_files(tiny_dir, tmp_path):
    from evaluation import evaluate_mmlu
    args = ["-m", str(tiny_dir), "-d", str(DATA / "mmlu"), "--subjects", "college_physics",
            "--max_questions", "5", "--device_map", "cpu"]
    evaluate_mmlu.main(args + ["-s", str(tmp_path / "fast")])
    evaluate_mmlu.main(args + ["-s", str(tmp_path / "plain"), "--engine", "plain"])
    read = lambda d: list(csv.reader(open(d / "results_tiny-baichuan" / "college_physics.csv")))  # noqa: E731
    fast, plain = read(tmp_path / "fast"), read(tmp_path / "plain")
    assert [r[:7] for r in fast] == [r[:7] for r in plain]
    np.testing.assert_allclose(np.array([r[7:] for r in fast[1:]], float),
                               np.array([r[7:] for r in plain[1:]], float), atol=ATOL)


def zh(args, capsys=None):
    from evaluation import evaluate_zh
    return evaluate_zh.main(args + ["--device_map", "cpu", "--batch_size", "4"])


def test_evaluate_zh_ceval_outputs_and_summary(tiny_dir, tmp_path, capsys):
    subjects = ["law", "high_school_physics", "high_school_biology"]
    summary = zh(["--model_name_or_path", str(tiny_dir), "--data_dir", str(DATA / "ceval"),
                  "--output_dir", str(tmp_path), "--subjects", ",".join(subjects), "--max_questions", "5"])
    out = capsys.readouterr().out
    acc = json.loads((tmp_path / "val" / "acc.json").read_text())
    assert list(acc) == subjects
    for subject in subjects:
        entries = json.loads((tmp_path / "val" / f"{subject}.json").read_text(encoding="utf-8"))
        raw = list(csv.reader(open(DATA / "ceval" / "val" / f"{subject}_val.csv", newline="",
                                   encoding="utf-8")))[1:6]
        assert [e["id"] for e in entries] == [r[0] for r in raw]  # file order
        for e, r in zip(entries, raw):
            assert {"id", "prompt", "answer", "correct"} <= set(e)
            assert e["answer"] in "ABCD" and e["correct"] == (e["answer"] == r[6]) and e["gold"] == r[6]
            assert e["prompt"].endswith(f"\n{r[1]}\nA. {r[2]}\nB. {r[3]}\nC. {r[4]}\nD. {r[5]}\n答案：")
            assert e["answer"] == max(e["probs"], key=e["probs"].get)
        assert acc[subject] == pytest.approx(np.mean([e["correct"] for e in entries]))
    table = summary["summary"]
    assert table["Average"] == pytest.approx(np.mean(list(acc.values())))
    assert table["Avg(Hard)"] == pytest.approx(acc["high_school_physics"])  # the only hard subject here
    assert table["STEM"] == pytest.approx((acc["high_school_physics"] + acc["high_school_biology"]) / 2)
    assert table["Humanities"] == pytest.approx(acc["law"])
    assert "| Model 5-shot | Average | Avg(Hard) | STEM | Humanities |" in out  # no Social Science/Other here
    assert re.search(r"\| tiny-baichuan \| (\d+\.\d \| ){3}\d+\.\d \|\n", out)
    assert json.loads((tmp_path / "val" / "summary.json").read_text())["summary"] == table


def test_evaluate_zh_ceval_test_split_writes_the_submission_file(tiny_dir, tmp_path, capsys):
    zh(["--model_name_or_path", str(tiny_dir), "--data_dir", str(DATA / "ceval"), "--split", "test",
        "--output_dir", str(tmp_path), "--subjects", "law,logic", "--max_questions", "3"])
    submission = json.loads((tmp_path / "test" / "submission.json").read_text())
    assert list(submission) == ["law", "logic"]
    raw = list(csv.reader(open(DATA / "ceval" / "test" / "law_test.csv", newline="", encoding="utf-8")))
    assert list(submission["law"]) == [r[0] for r in raw[1:4]]
    assert set(submission["law"].values()) <= set("ABCD")
    assert not (tmp_path / "val" / "acc.json").exists()
    entries = json.loads((tmp_path / "test" / "law.json").read_text())
    assert [e["answer"] for e in entries] == list(submission["law"].values())
    assert all(e["correct"] is None for e in entries)
    assert "leaderboard submission file" in capsys.readouterr().out


def test_shuffled_shots_are_seeded(tiny_dir, tmp_path):
    base = ["--model_name_or_path", str(tiny_dir), "--data_dir", str(DATA / "ceval"),
            "--subjects", "logic", "--max_questions", "3"]

    def prompts(name, *extra):
        zh(base + ["--output_dir", str(tmp_path / name), *extra])
        return [e["prompt"] for e in json.loads((tmp_path / name / "val" / "logic.json").read_text())]

    fixed = prompts("fixed")
    seeded = prompts("seed1", "--shuffle_shots", "--seed", "1")
    assert prompts("seed1-again", "--shuffle_shots", "--seed", "1") == seeded
    assert prompts("seed2", "--shuffle_shots", "--seed", "2") != seeded
    assert seeded != fixed and len(set(seeded)) == len(seeded)  # a fresh order for every question
    assert os.path.commonprefix(fixed).count("\n答案：") == 5  # fixed shots: one shared few-shot prefix
    assert os.path.commonprefix(seeded).count("\n答案：") < 5


@pytest.mark.parametrize("task, data, subject, columns", [
    ("cmmlu", "cmmlu", "ancient_chinese", "| Average | Social Science | China specific |"),
    ("gaokao", "gaokao-bench", "2010-2022_Physics_MCQs", "| Average |"),
    ("agieval", "agieval", "logiqa-en", "| Average |"),
])
def test_other_tasks_run(tiny_dir, tmp_path, capsys, task, data, subject, columns):
    summary = zh(["--model_name_or_path", str(tiny_dir), "--task", task, "--data_dir", str(DATA / data),
                  "--output_dir", str(tmp_path), "--subjects", subject, "--max_questions", "3"])
    out = capsys.readouterr().out
    assert columns in out
    assert len(json.loads((tmp_path / "test" / f"{subject}.json").read_text())) == 3
    assert summary["questions"] == {subject: 3}
    if task == "gaokao":
        assert re.search(r"2010-2022_Physics_MCQs: left out \d+ item\(s\): multiple answers", out)


def test_readme_command_line_runs_as_a_script(tiny_dir, tmp_path):
    """The reference README's command: model under OPENMODEL_PATH, data from CEVAL_DATA_PATH."""
    env = dict(os.environ, OPENMODEL_PATH=str(tiny_dir.parent), CEVAL_DATA_PATH=str(DATA / "ceval"))
    cmd = [sys.executable, "evaluation/evaluate_zh.py", "--gpu_idx", "0", "--model_id", tiny_dir.name,
           "--task", "ceval", "--shot", "5", "--split", "test", "--show_detail", "--subjects", "law",
           "--max_questions", "2", "--device_map", "cpu", "--output_dir", str(tmp_path)]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Predict answer with ABCD probs:" in run.stdout  # --show_detail
    assert "以下是中国关于法学考试的单项选择题" in run.stdout
    assert json.loads((tmp_path / "test" / "submission.json").read_text())["law"].keys() == {"0", "1"}


def test_command_line_errors_are_clear(tiny_dir, tmp_path, monkeypatch, capsys):
    from evaluation import evaluate_mmlu, evaluate_zh
    from evaluation.data import DataError
    monkeypatch.delenv("CEVAL_DATA_PATH", raising=False)
    monkeypatch.delenv("OPENMODEL_PATH", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        evaluate_zh.main(["--model_name_or_path", str(tiny_dir)])
    assert exit_info.value.code == 2 and "pass --data_dir or set CEVAL_DATA_PATH" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate_zh.main(["--data_dir", str(tmp_path)])
    assert "no model: pass --model_name_or_path" in capsys.readouterr().err
    with pytest.raises(DataError, match=f"MMLU data folder not found: {tmp_path / 'missing'}"):
        evaluate_mmlu.main(["-m", str(tiny_dir), "-d", str(tmp_path / "missing")])
    with pytest.raises(DataError, match=r"law_dev\.csv: 5 few-shot examples, --shot asks for 6"):
        zh(["--model_name_or_path", str(tiny_dir), "--data_dir", str(DATA / "ceval"), "--subjects", "law",
            "--shot", "6", "--output_dir", str(tmp_path)])
