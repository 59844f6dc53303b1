"""Our protocol inside lm-evaluation-harness: the YAMLs of evaluation/lm_eval_tasks/ with a Llama export.

One tiny random model (context 4096, so every prompt fits) is written twice: as this project's folder, which
our scripts score, and as a standard Llama folder (checkpoint/llama.py), which lm-eval loads without remote code.
The per-question prompts, predictions and letter probabilities must agree. lm-eval is the optional extra
``pip install -e ".[lmeval]"``; CI installs it.
"""
import csv
import json

import numpy as np
import pytest
import torch

from conftest import FIXTURES, ROOT

DATA = FIXTURES / "benchmarks"  # the project's own fixtures, in the official layouts

N = 3  # questions per subject: the comparison is per question, a few show it


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from checkpoint.llama import save_llama_folder
    from models.configuration_baichuan import BaiChuanConfig
    from models.modeling_baichuan import BaiChuanForCausalLM
    from models.tokenization_baichuan import BaiChuanTokenizer
    vocab = str(ROOT / "tokenizer.model")
    root = tmp_path_factory.mktemp("lm_eval_models")
    torch.manual_seed(0)
    model = BaiChuanForCausalLM(BaiChuanConfig.from_name("tiny", max_position_embeddings=4096)).eval()
    model.save_pretrained(root / "tiny-baichuan")
    BaiChuanTokenizer(vocab_file=vocab).save_pretrained(root / "tiny-baichuan")
    save_llama_folder(model, vocab, root / "tiny-llama")
    return root / "tiny-baichuan", root / "tiny-llama"


def test_task_files_are_generated_from_the_subject_lists():
    from evaluation.lm_eval_tasks import make_tasks
    expected = make_tasks.files()
    for name, text in expected.items():
        path = make_tasks.HERE / name
        assert path.is_file() and path.read_text(encoding="utf-8") == text, \
            f"{path} is stale: run python -m evaluation.lm_eval_tasks.make_tasks"
    written = {str(p.relative_to(make_tasks.HERE)) for p in make_tasks.HERE.rglob("*yaml")}
    assert written == set(expected)
    assert sum(name.count("/baichuan_mmlu_") for name in expected) == 57


def ours(folder, tmp_path, monkeypatch):
    """{task: [(prompt or None, probabilities)]} from evaluate_mmlu.py and evaluate_zh.py."""
    from evaluation import evaluate_mmlu, evaluate_zh
    monkeypatch.chdir(tmp_path)
    out = {}
    evaluate_mmlu.main(["-m", str(folder), "-d", str(DATA / "mmlu"), "-s", "mmlu", "--subjects",
                        "abstract_algebra", "--max_questions", str(N), "--device_map", "cpu"])
    with open(tmp_path / "mmlu" / f"results_{folder.name}" / "abstract_algebra.csv", newline="") as f:
        out["baichuan_mmlu_abstract_algebra"] = [(None, [float(x) for x in r[7:11]]) for r in list(csv.reader(f))[1:]]
    for task, data, subject in (("ceval", "ceval", "law"), ("cmmlu", "cmmlu", "ancient_chinese")):
        evaluate_zh.main(["--model_name_or_path", str(folder), "--task", task, "--data_dir", str(DATA / data),
                          "--output_dir", task, "--subjects", subject, "--max_questions", str(N),
                          "--device_map", "cpu"])
        split = {"ceval": "val", "cmmlu": "test"}[task]  # evaluate_zh.py writes <output_dir>/<split>/
        entries = json.loads((tmp_path / task / split / f"{subject}.json").read_text(encoding="utf-8"))
        out[f"baichuan_{task}_{subject}"] = [(e["prompt"], [e["probs"][x] for x in "ABCD"]) for e in entries]
    return out


def test_lm_eval_with_our_tasks_gives_our_predictions(folders, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval", reason="lm-eval is the optional extra: pip install -e '.[lmeval]'")
    import lm_eval
    from lm_eval.tasks import TaskManager

    from evaluation.lm_eval_tasks.make_tasks import HERE
    baichuan, llama = folders
    for env, data in (("MMLU_DATA_PATH", "mmlu"), ("CEVAL_DATA_PATH", "ceval"), ("CMMLU_DATA_PATH", "cmmlu")):
        monkeypatch.setenv(env, str(DATA / data))
    expected = ours(baichuan, tmp_path, monkeypatch)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    results = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={llama},add_bos_token=False,dtype=float32,trust_remote_code=False",
        tasks=list(expected), limit=N, log_samples=True, device="cpu", batch_size=4,
        task_manager=TaskManager(include_path=str(HERE)))
    for task, rows in expected.items():
        samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
        assert len(samples) == len(rows) == N
        for sample, (prompt, probs) in zip(samples, rows):
            contexts = {arg[0] for arg in sample["arguments"]}
            assert [arg[1] for arg in sample["arguments"]] == [" A", " B", " C", " D"]
            if prompt is not None:
                assert contexts == {prompt}  # the reference's prompt, character for character
            lls = np.array([float(r[0]) for r in sample["filtered_resps"]])
            theirs = torch.softmax(torch.tensor(lls), dim=-1).numpy()  # the four letters' softmax
            np.testing.assert_allclose(theirs, probs, atol=1e-5, rtol=0)
            assert int(np.argmax(theirs)) == int(np.argmax(probs))
        assert (np.ptp([p for _, p in rows], axis=1) > 1e-3).all()  # distinct probabilities: the check has teeth
