"""Watching a run: the learning-rate schedule, the metrics log, held-out validation and document-aware packing."""
import math

import pytest
import torch

from models.configuration_baichuan import BaiChuanConfig
from models.modeling_baichuan import BaiChuanForCausalLM, DocumentMask
from training.documents import document_inputs
from training.schedule import WarmupCosine, schedule_from_config

EOS = 2


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    fields = dict(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=128, use_cache=False)
    fields.update(overrides)
    model = BaiChuanForCausalLM(BaiChuanConfig(**fields)).eval()
    model.loss_chunk_size = 0  # these tests read the logits of a forward with labels
    return model


def packed_rows(seed=0):
    """Two rows of documents (each ending with EOS) packed end to end; the first row starts mid-document."""
    g = torch.Generator().manual_seed(seed)
    docs = [[*torch.randint(3, 512, (n,), generator=g).tolist(), EOS] for n in (6, 11, 3, 9, 14, 4, 7)]
    # The documents as they appear in the rows: the first and the last piece of row 0 are cut by packing.
    pieces = [[docs[0][2:], docs[1], docs[2], docs[3][:5]], [docs[4], docs[5], docs[6]]]
    width = 40
    for docs_of_row in pieces:
        if docs_of_row[-1][-1] != EOS:  # the cut document runs on to the first EOS of the padding
            docs_of_row[-1] = docs_of_row[-1] + [EOS]
        docs_of_row += [[EOS]] * (width - sum(map(len, docs_of_row)))  # then one-token documents
    rows = [[t for d in docs_of_row for t in d] for docs_of_row in pieces]
    return torch.tensor(rows), pieces


def test_document_inputs_restart_positions_and_drop_cross_document_labels():
    batch, pieces = packed_rows()
    out = document_inputs(batch, EOS)
    for r, docs in enumerate(pieces):
        expected_pos = [i for d in docs for i in range(len(d))]
        expected_doc = [j for j, d in enumerate(docs) for _ in d]
        assert out["position_ids"][r].tolist() == expected_pos
        assert out["document_ids"][r].tolist() == expected_doc
        firsts = {sum(map(len, docs[:j])) for j in range(1, len(docs))}
        assert [i for i, y in enumerate(out["labels"][r].tolist()) if y == -100] == sorted(firsts)


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_packed_loss_equals_documents_run_one_by_one(backend):
    model = tiny_model(attn_implementation=backend)
    batch, pieces = packed_rows()
    inputs = document_inputs(batch, EOS)
    with torch.no_grad():
        packed = model(batch, **inputs).loss
        # Each document alone: its summed next-token loss and the number of predictions it makes.
        total, count = 0.0, 0
        for docs in pieces:
            for d in docs:
                if len(d) < 2:
                    continue
                ids = torch.tensor([d])
                total += model(ids, labels=ids).loss.item() * (len(d) - 1)
                count += len(d) - 1
    assert packed.item() == pytest.approx(total / count, abs=1e-5)
    # Without the mask the packed rows attend across documents: a different loss.
    with torch.no_grad():
        plain = model(batch, labels=batch).loss.item()
    assert abs(plain - packed.item()) > 1e-3


def test_document_mask_of_one_document_is_plain_causal_attention():
    model = tiny_model()
    ids = torch.randint(3, 512, (2, 24))
    with torch.no_grad():
        plain = model(ids, labels=ids).logits
        one_doc = model(ids, labels=ids, document_ids=torch.zeros_like(ids),
                        position_ids=torch.arange(24).expand(2, 24)).logits
    torch.testing.assert_close(one_doc, plain, rtol=0, atol=1e-5)


def test_document_mask_varlen_layout():
    ids = torch.tensor([[0, 0, 1, 1, 1, 2], [0, 1, 1, 1, 1, 1]])
    cu, longest = DocumentMask(ids).varlen()
    assert cu.tolist() == [0, 2, 5, 6, 7, 12] and longest == 5
    dense = DocumentMask(ids).dense()
    assert dense.shape == (2, 1, 6, 6)
    assert dense[0, 0, 3].tolist() == [False, False, True, True, False, False]


# ----------------------------------------------------------------------------------------------------------
# The schedule


def test_schedule_first_step_is_warmup_not_zero_and_last_is_floor():
    s = WarmupCosine(total_num_steps=10, warmup_num_steps=4, warmup_min_ratio=0.0, cos_min_ratio=0.1,
                     warmup_type="linear")
    assert [s.ratio(k) for k in range(1, 5)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert s.ratio(10) == pytest.approx(0.1) and s.ratio(11) == pytest.approx(0.1)
    assert s.ratio(7) == pytest.approx(0.1 + 0.9 * (1 + math.cos(math.pi * 3 / 6)) / 2)
    assert s(0) == s.ratio(1)  # LambdaLR's index 0 is optimizer step 1


def test_schedule_from_config_refuses_what_it_cannot_drive():
    with pytest.raises(ValueError, match="drives WarmupCosineLR only"):
        schedule_from_config({"scheduler": {"type": "WarmupLR", "params": {}}})
    with pytest.raises(ValueError, match=r"\['warmup_max_lr'\] are not understood"):
        schedule_from_config({"scheduler": {"type": "WarmupCosineLR", "params": {
            "total_num_steps": 5, "warmup_num_steps": 1, "warmup_max_lr": 1.0}}})
    with pytest.raises(ValueError, match="warmup_type"):
        schedule_from_config({"scheduler": {"type": "WarmupCosineLR", "params": {
            "total_num_steps": 5, "warmup_num_steps": 1, "warmup_type": "cubic"}}})


# ----------------------------------------------------------------------------------------------------------
# Held-out documents


def test_held_out_documents_never_reach_the_training_stream(tmp_path):
    from data_utils import DataEngine, is_held_out
    from test_train import TOKENIZER
    from conftest import ROOT

    def documents(engine):
        tokens = [engine.sample_array(i) for i in range(engine.num_samples)]
        flat = torch.from_numpy(__import__("numpy").concatenate(tokens)).tolist()
        docs, cur = set(), []
        for t in flat:
            cur.append(t)
            if t == EOS:
                docs.add(tuple(cur))
                cur = []
        return docs

    kw = dict(micro_batch_size=1, max_length=64, world_size=1, rank=0, cache_dir=tmp_path, num_workers=1)
    train = DataEngine(ROOT / "data_dir", TOKENIZER, holdout=(0.2, False), **kw).load_data()
    held = DataEngine(ROOT / "data_dir", TOKENIZER, holdout=(0.2, True), **kw).load_data()
    everything = DataEngine(ROOT / "data_dir", TOKENIZER, **kw).load_data()
    assert 0.1 < held.num_tokens / everything.num_tokens < 0.3
    # Whole documents only (the first and last of each stream may be cut by the sample boundary).
    train_docs, held_docs = documents(train), documents(held)
    assert held_docs and not (train_docs & held_docs)
    assert train.num_tokens + held.num_tokens == everything.num_tokens
    assert train.fingerprint != everything.fingerprint  # a resume cannot silently change sides
    # The split is a function of the text alone.
    assert is_held_out("some document", 0.5) == is_held_out("some document", 0.5)
    assert sum(is_held_out(f"doc {i}", 0.25) for i in range(4000)) == pytest.approx(1000, abs=120)


def test_bad_validation_flags_are_refused_at_launch(tmp_path, monkeypatch, capsys):
    import train
    from training.validation import build_validation

    base = ["train.py", "--deepspeed_config", "x.json"]
    for extra, message in ((["--val_fraction", "0.7"], "--val_fraction must lie in (0, 0.5]"),
                           (["--val_fraction", "0"], "--val_fraction must lie in (0, 0.5]"),
                           (["--val_fraction", "0.1", "--val_dir", "v"], "not both")):
        monkeypatch.setattr("sys.argv", base + extra)
        with pytest.raises(SystemExit):
            train.parse_args()
        assert message in capsys.readouterr().err
    monkeypatch.setattr("sys.argv", base + ["--val_dir", str(tmp_path / "absent")])
    args = train.parse_args()
    args.tokenizer_path, args.max_length, args.num_workers, args.cache_dir = "tokenizer.model", 64, 1, tmp_path
    with pytest.raises(FileNotFoundError, match=r"--val_dir .*absent: data_dir not found"):
        build_validation(args, 0, 1, "cpu")
    (tmp_path / "empty").mkdir()
    args.val_dir = str(tmp_path / "empty")
    with pytest.raises(ValueError, match=r"--val_dir .*empty: no data files"):
        build_validation(args, 0, 1, "cpu")


# ----------------------------------------------------------------------------------------------------------
# Through the launcher: our run against a textbook PyTorch loop, validation, and the metrics log

STEPS, WARMUP, PEAK, EVAL_TOKENS = 6, 2, 2e-3, 256


@pytest.fixture(scope="module")
def watched(tmp_path_factory):
    """The same 6-step, 2-rank ZeRO-2 run from one initial folder, with validation every 3 steps and without."""
    import json

    from test_train import ds_config, run, train_cmd

    work = tmp_path_factory.mktemp("watch")
    torch.manual_seed(0)
    init = work / "init"
    BaiChuanForCausalLM(BaiChuanConfig.from_name("tiny")).save_pretrained(init)
    val = work / "val"
    val.mkdir()
    from conftest import ROOT
    lines = (ROOT / "data_dir" / "part-0007.txt").read_text(encoding="utf-8").splitlines()
    (val / "a.txt").write_text("\n".join(lines[:40]) + "\n", encoding="utf-8")
    (val / "b.txt").write_text("\n".join(lines[40:80]) + "\n", encoding="utf-8")
    config = ds_config(work / "ds.json", total_steps=STEPS)
    cfg = json.loads(config.read_text())
    cfg["scheduler"]["params"]["warmup_num_steps"] = WARMUP
    cfg["optimizer"]["params"]["lr"] = PEAK
    config.write_text(json.dumps(cfg))
    runs = {}
    for name, extra in (("eval", ["--val_dir", val, "--eval_every", 3, "--eval_tokens", EVAL_TOKENS]),
                        ("plain", [])):
        save = work / name
        proc = run(train_cmd(save, config, "--max_steps", STEPS, "--save_every", STEPS, "--resume", "none",
                             "--init_from", init, *extra))
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        runs[name] = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    return {"init": init, "val": val, "runs": runs, "work": work}


def textbook_loop(init, steps):
    """transformers' LlamaForCausalLM + torch AdamW + LambdaLR + clip_grad_norm_ over the batches the two ranks
    draw; returns per step (loss, lr applied, grad norm before clipping) and the model after each step."""
    import copy
    import json

    from conftest import ROOT
    from data import GlobalDataEngine
    from test_model import to_llama
    from test_train import TOKENIZER

    cfg = json.loads((ROOT / "config" / "deepspeed_tiny.json").read_text())["optimizer"]["params"]
    ours = BaiChuanForCausalLM.from_pretrained(init)
    llama = to_llama(ours).train()
    opt = torch.optim.AdamW(llama.parameters(), lr=PEAK, betas=tuple(cfg["betas"]), eps=cfg["eps"],
                            weight_decay=cfg["weight_decay"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(STEPS, WARMUP, 0.0, 0.1, "linear"))
    # train.py's default global order: global batch 4 = micro-batch 2 x 2 ranks.
    engines = [GlobalDataEngine(ROOT / "data_dir", TOKENIZER, 2, 64, 4, steps, world_size=2, rank=r, num_workers=1,
                                cache_dir=False, show_progress=False).load_data() for r in range(2)]
    # Each rank runs the engines' load_data sync alone here; both hold enough samples for 6 steps either way.
    out, models = [], []
    for k in range(steps):
        opt.zero_grad()
        losses = []
        for e in engines:
            batch = torch.from_numpy(e.batch_array(k))
            losses.append(llama(batch, labels=batch).loss)
        loss = sum(losses) / 2  # DeepSpeed averages the two ranks' gradients
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(llama.parameters(), 1.0)
        lr = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
        out.append((loss.item(), lr, norm.item()))
        models.append(copy.deepcopy(llama).eval())
    return out, models


def independent_val_loss(model, val_dir):
    """Tokenize the held-out files with SentencePiece directly, as the data rules say, and average the loss
    of the first EVAL_TOKENS predictions' samples over full logits."""
    import sentencepiece as spm

    from test_train import TOKENIZER

    sp = spm.SentencePieceProcessor(model_file=str(TOKENIZER))
    stream = []
    for path in sorted(val_dir.iterdir()):
        for line in path.read_text(encoding="utf-8").split("\n")[:-1]:
            ids = sp.encode(line.strip()) + [EOS]
            if len(ids) >= 20:
                stream += ids
    n = EVAL_TOKENS // 64
    batch = torch.tensor(stream[:n * 65]).view(n, 65)  # [samples, max_length + 1]
    with torch.no_grad():
        logits = model(batch[:, :-1]).logits.float()  # [n, 64, vocab]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)).item()


@pytest.fixture(scope="module")
def textbook(watched):
    return textbook_loop(watched["init"], STEPS)


def test_training_agrees_with_a_textbook_loop_and_logs_each_figure_for_its_step(watched, textbook):
    ours = [r for r in watched["runs"]["plain"] if "loss" in r]
    assert [r["step"] for r in ours] == list(range(1, STEPS + 1))
    reference, _ = textbook
    norms = [norm for _, _, norm in reference]
    for i, (record, (loss, lr, norm)) in enumerate(zip(ours, reference)):
        assert record["loss"] == pytest.approx(loss, abs=1e-5), record["step"]
        assert record["lr"] == pytest.approx(lr, rel=1e-12), record["step"]
        # The step's own norm (ZeRO-2 sums the partitions' squares in another order: 1e-4 apart), not a
        # neighbour's.
        assert record["grad_norm"] == pytest.approx(norm, rel=1e-3), record["step"]
        assert all(abs(record["grad_norm"] - other) > abs(record["grad_norm"] - norm)
                   for j, other in enumerate(norms) if j != i), record["step"]
        assert record["window_steps"] == 1
    # The schedule as configured: the first step warms up (not 0), step W is the peak, the last is the floor.
    assert [r["lr"] for r in ours[:WARMUP]] == pytest.approx([PEAK / WARMUP * k for k in range(1, WARMUP + 1)])
    assert ours[-1]["lr"] == pytest.approx(0.1 * PEAK)


def test_validation_loss_is_right_and_changes_no_training_step(watched, textbook):
    runs = watched["runs"]
    train_eval = {r["step"]: r["loss"] for r in runs["eval"] if "loss" in r}
    train_plain = {r["step"]: r["loss"] for r in runs["plain"] if "loss" in r}
    assert train_eval == train_plain  # exactly: evaluation does not change training
    val = {r["step"]: r for r in runs["eval"] if "val_loss" in r}
    assert sorted(val) == [0, 3, 6]  # at the start, every --eval_every steps and at the end
    assert all(r["val_tokens"] == EVAL_TOKENS for r in val.values())
    assert val[0]["val_ppl"] == pytest.approx(math.exp(val[0]["val_loss"]))
    start = BaiChuanForCausalLM.from_pretrained(watched["init"]).eval()
    assert val[0]["val_loss"] == pytest.approx(independent_val_loss(start, watched["val"]), abs=1e-5)
    _, models = textbook
    for step in (3, 6):
        assert val[step]["val_loss"] == pytest.approx(independent_val_loss(models[step - 1], watched["val"]),
                                                      abs=1e-4), step
    assert val[6]["val_loss"] < val[0]["val_loss"] - 0.2


def test_plot_loss_draws_validation_and_benchmark_curves(tmp_path):
    import json

    from conftest import ROOT
    import importlib.util

    spec = importlib.util.spec_from_file_location("plot_loss", ROOT / "scripts" / "plot_loss.py")
    plot_loss = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot_loss)
    records = [{"step": 0, "val_loss": 11.0, "val_ppl": 6e4}]
    records += [{"step": s, "loss": 10.0 - s / 10, "tokens_per_sec": 100.0} for s in range(1, 11)]
    records += [{"step": 5, "val_loss": 9.6}, {"step": 5, "eval/mmlu/acc": 0.25, "eval/mmlu/p_correct": 0.26},
                {"step": 10, "val_loss": 9.2}, {"step": 10, "eval/mmlu/acc": 0.3, "eval/mmlu/p_correct": 0.27}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    fig = plot_loss.plot([str(tmp_path)], tmp_path / "out.png", labels=["run"])
    ax_loss, ax_eval, _ = fig.axes
    train, val = ax_loss.get_lines()
    assert list(train.get_xdata()) == list(range(1, 11))
    assert list(val.get_xdata()) == [0, 5, 10] and list(val.get_ydata()) == [11.0, 9.6, 9.2]
    assert list(ax_eval.get_lines()[0].get_ydata()) == [0.25, 0.3]
    assert (tmp_path / "out.png").read_bytes()[:4] == b"\x89PNG"


# ----------------------------------------------------------------------------------------------------------
# Benchmarks during training, under ZeRO-3, against the evaluation script on the exported checkpoint


def write_mmlu_fixture(root):
    """Two MMLU subjects in the hendrycks layout: 5 dev rows and 5 test rows each."""
    import csv
    import random

    rng = random.Random(0)
    for subject in ("abstract_algebra", "anatomy"):
        for split, rows in (("dev", 5), ("test", 5)):
            (root / split).mkdir(parents=True, exist_ok=True)
            with open(root / split / f"{subject}_{split}.csv", "w", newline="", encoding="utf-8") as f:
                w = csv.writer(f)
                for i in range(rows):
                    a, b = rng.randint(2, 99), rng.randint(2, 99)
                    options = [str(a + b + d) for d in rng.sample([0, 1, 2, 3], 4)]
                    w.writerow([f"What is {a} plus {b}? ({subject} {split} {i})", *options,
                                "ABCD"[options.index(str(a + b))]])


def test_eval_tasks_subset_is_seeded_and_bad_tasks_are_clear_errors(tmp_path):
    from test_train import TOKENIZER
    from training.eval_tasks import EvalTasks, parse_eval_tasks

    assert parse_eval_tasks("mmlu:200, ceval:50") == [("mmlu", 200), ("ceval", 50)]
    with pytest.raises(ValueError, match="unknown task 'mmmlu'"):
        parse_eval_tasks("mmmlu:20")
    with pytest.raises(ValueError, match="needs a question count"):
        parse_eval_tasks("mmlu")
    write_mmlu_fixture(tmp_path / "mmlu")
    a = EvalTasks("mmlu:6", tmp_path, TOKENIZER, seed=1).tasks["mmlu"]
    b = EvalTasks("mmlu:6", tmp_path, TOKENIZER, seed=1).tasks["mmlu"]
    c = EvalTasks("mmlu:6", tmp_path, TOKENIZER, seed=2).tasks["mmlu"]
    assert len(a) == 6 and a == b and a != c
    assert len({tuple(ids) for ids, _ in a}) == 6
    assert len(EvalTasks("mmlu:500", tmp_path, TOKENIZER, seed=1).tasks["mmlu"]) == 10  # all there are
    with pytest.raises(ValueError, match=r"--eval_tasks ceval \(.*ceval\): C-Eval data folder not found"):
        EvalTasks("ceval:5", tmp_path, TOKENIZER, seed=1)
    (tmp_path / "mmlu" / "test" / "anatomy_test.csv").write_text("only,three,fields\n")
    with pytest.raises(ValueError, match=r"--eval_tasks mmlu .*anatomy_test.csv, row 1: expected 6 fields"):
        EvalTasks("mmlu:6", tmp_path, TOKENIZER, seed=1)


def test_zero3_run_scores_benchmarks_as_the_script_does_on_its_export(tmp_path):
    """ZeRO-3, 2 ranks, --val_fraction, --document_mask and --eval_tasks together: the in-loop MMLU accuracy
    and mean probability of the right letter equal evaluate_mmlu.py's on the exported checkpoint."""
    import json

    from test_train import ds_config, run, train_cmd

    write_mmlu_fixture(tmp_path / "bench" / "mmlu")
    save = tmp_path / "run"
    proc = run(train_cmd(save, ds_config(tmp_path / "ds3.json", stage=3, total_steps=4), "--max_steps", 4,
                         "--save_every", 2, "--resume", "none", "--val_fraction", 0.2, "--eval_tokens", 128,
                         "--eval_every", 0, "--document_mask", "--eval_tasks", "mmlu:9",
                         "--eval_data_dir", tmp_path / "bench"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r for r in records if "eval/mmlu/acc" in r}
    assert sorted(evals) == [2, 4] and evals[4]["eval/mmlu/questions"] == 9  # 9 of 10: 5 + 4 per rank, padded
    assert sorted(r["step"] for r in records if "val_loss" in r) == [0, 4]
    assert all(math.isfinite(r["loss"]) for r in records if "loss" in r)

    # The same 9 questions through the evaluation script on the exported step-4 checkpoint.
    import importlib.util

    from conftest import ROOT
    from training.eval_tasks import EvalTasks

    chosen = EvalTasks("mmlu:9", tmp_path / "bench", ROOT / "tokenizer.model", seed=42).tasks["mmlu"]
    spec = importlib.util.spec_from_file_location("convert_checkpoint", ROOT / "scripts" / "convert_checkpoint.py")
    convert = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(convert)
    convert.main([str(save), str(tmp_path / "export"), "--tag", "step4", "--dtype", "fp32"])
    from evaluation import evaluate_mmlu

    evaluate_mmlu.main(["-m", str(tmp_path / "export"), "-d", str(tmp_path / "bench" / "mmlu"), "-s",
                        str(tmp_path / "results"), "--device_map", "cpu", "--engine", "plain"])
    script = {}  # prompt ids -> (correct, probability of the right letter)
    import csv

    from evaluation.data import load_mmlu
    from evaluation.prompts import PromptStyle, fit_prompt

    from models.tokenization_baichuan import BaiChuanTokenizer
    tok = BaiChuanTokenizer(vocab_file=str(ROOT / "tokenizer.model"), add_bos_token=False, add_eos_token=False)
    for subject in load_mmlu(tmp_path / "bench" / "mmlu"):
        with open(tmp_path / "results" / "results_export" / f"{subject.name}.csv", encoding="utf-8") as f:
            header, *rows = list(csv.reader(f))
        columns = [header.index(f"export_choice{letter}_probs") for letter in "ABCD"]
        for q, row in zip(subject.test, rows):
            ids = fit_prompt(PromptStyle("en", subject.name), subject.dev[:5], q, tok, 2048).ids
            probs = [float(row[c]) for c in columns]
            script[tuple(ids)] = (row[6] == "True", probs["ABCD".index(q.answer)])
    picked = [script[tuple(ids)] for ids, _ in chosen]
    assert evals[4]["eval/mmlu/acc"] == pytest.approx(sum(c for c, _ in picked) / 9, abs=1e-12)
    assert evals[4]["eval/mmlu/p_correct"] == pytest.approx(sum(p for _, p in picked) / 9, abs=1e-6)
