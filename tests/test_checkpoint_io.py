"""Checkpoints in and out: DeepSpeed checkpoint -> Hugging Face folder, --init_from, generation, loss plot.

Two short train.py runs (ZeRO-2 and ZeRO-3, 2 CPU ranks, fp32) are shared by every test through module fixtures;
the deepspeed launches (about 40 s each on 2 cores) are: the two runs, one run of tests/ds_engine_logits.py that
restores both with engine.load_checkpoint, and two --init_from runs of one step.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import FIXTURES, ROOT, free_port

import checkpoint.export as convert_checkpoint
from checkpoint.io import check_folder_config, load_folder_weights, resolve_checkpoint_tag
from models.configuration_baichuan import BaiChuanConfig
from models.modeling_baichuan import BaiChuanForCausalLM
from scripts import generate, plot_loss

TOKENIZER = ROOT / "tokenizer.model"
pytestmark = pytest.mark.skipif(not TOKENIZER.is_file(), reason="tokenizer.model missing at the repo root")
MICRO_BS, MAX_LENGTH, SEED = 2, 64, 42



def ds_config(path: Path, stage: int) -> Path:
    config = json.loads((ROOT / "config" / "deepspeed_tiny.json").read_text())
    config.update(train_micro_batch_size_per_gpu=MICRO_BS, gradient_accumulation_steps=1, steps_per_print=1)
    config["bf16"] = {"enabled": False}  # fp32, so exported and engine logits can be compared exactly
    config["scheduler"]["params"].update(warmup_num_steps=1, total_num_steps=3)
    config["zero_optimization"] = {"stage": stage}
    config["tensorboard"] = {"enabled": False}
    path.write_text(json.dumps(config))
    return path


def launch(script: Path, *args):
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
            str(script), *map(str, args)]


def train_cmd(workdir: Path, save: Path, stage: int, *extra):
    return launch(ROOT / "train.py", "--deepspeed", "--deepspeed_config", ds_config(workdir / f"ds{stage}.json", stage),
                  "--model_config", "tiny", "--data_dir", ROOT / "data_dir", "--tokenizer_path", TOKENIZER,
                  "--max_length", MAX_LENGTH, "--seed", SEED, "--checkpoint_saving_path", save,
                  "--cache_dir", workdir / "token-cache", "--num_workers", 1, *extra)


def run_together(cmds, timeout=420):
    """Start the launches at once (each mostly waits on imports and its peer rank) and wait for all."""
    procs = [subprocess.Popen(c, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for c in cmds]
    outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-4000:]
    return outputs


def losses(save: Path):
    return {r["step"]: r["loss"] for r in map(json.loads, (save / "metrics.jsonl").read_text().splitlines())}


def load(folder: Path):
    return BaiChuanForCausalLM.from_pretrained(folder).eval()


# ---------------------------------------------------------------------------------------------------------------
# Shared runs
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("ckio")


@pytest.fixture(scope="module")
def first_batches(workdir):
    """Each rank's first training batch, as train.py's DataEngine serves it (this also fills the token cache the
    launches read)."""
    from data import GlobalDataEngine

    return [GlobalDataEngine(ROOT / "data_dir", TOKENIZER, MICRO_BS, MAX_LENGTH, 2 * MICRO_BS, 3, world_size=2,
                             rank=rank, seed=SEED, cache_dir=workdir / "token-cache", num_workers=1,
                             show_progress=False).load_data().get_data()
            for rank in range(2)]


@pytest.fixture(scope="module")
def runs(workdir, first_batches):
    """{2: save dir, 3: save dir}: 3 steps each, checkpoints step2 and step3."""
    saves = {stage: workdir / f"zero{stage}" for stage in (2, 3)}
    run_together([train_cmd(workdir, saves[stage], stage, "--max_steps", 3, "--steps_per_epoch", 2, "--resume",
                            "none") for stage in (2, 3)])
    return saves


@pytest.fixture(scope="module")
def exported(runs, workdir):
    """{stage: fp32 folder of the latest tag}."""
    return {stage: convert_checkpoint.convert(save, workdir / f"hf{stage}", dtype="fp32")
            for stage, save in runs.items()}


@pytest.fixture(scope="module")
def batch():
    return torch.randint(3, 64000, (2, 33), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def engine_logits(runs, workdir, batch):
    """The training engines' own logits and loss on `batch`, after engine.load_checkpoint of step3."""
    torch.save(batch, workdir / "batch.pt")
    jobs = [f"{runs[stage]}:step3:{workdir / f'engine{stage}.pt'}" for stage in (2, 3)]
    run_together([launch(ROOT / "tests" / "ds_engine_logits.py", workdir / "batch.pt", *jobs)])
    return {stage: torch.load(workdir / f"engine{stage}.pt") for stage in (2, 3)}


def released_layout(model: BaiChuanForCausalLM, folder: Path, shards: int = 1) -> None:
    """The released baichuan-7B layout: config.json as published, pytorch_model.bin (or shards + index) with the
    rotary inv_freq buffers the released weights carry."""
    c = model.config
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["BaiChuanForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_baichuan.BaiChuanConfig",
                     "AutoModelForCausalLM": "modeling_baichuan.BaiChuanForCausalLM"},
        "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "hidden_size": c.hidden_size,
        "initializer_range": 0.02, "intermediate_size": c.intermediate_size, "max_position_embeddings": 4096,
        "model_type": "baichuan", "num_attention_heads": c.num_attention_heads,
        "num_hidden_layers": c.num_hidden_layers, "pad_token_id": 0, "rms_norm_eps": 1e-06,
        "tie_word_embeddings": False, "torch_dtype": "float32", "transformers_version": "4.29.1", "use_cache": True,
        "vocab_size": c.vocab_size}, indent=2))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    inv_freq = 1.0 / (10000 ** (torch.arange(0, c.head_dim, 2).float() / c.head_dim))
    for i in range(c.num_hidden_layers):
        state[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = inv_freq
    if shards == 1:
        torch.save(state, folder / "pytorch_model.bin")
        return
    names = list(state)
    weight_map = {}
    for k in range(shards):
        filename = f"pytorch_model-{k + 1:05d}-of-{shards:05d}.bin"
        part = {n: state[n] for n in names[k::shards]}
        torch.save(part, folder / filename)
        weight_map.update({n: filename for n in part})
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def folder_loss(folder: Path, batches) -> float:
    """The mean over ranks of a model folder's loss on each rank's batch: what train.py logs at step 1."""
    model = load(folder)
    with torch.no_grad():
        return sum(model(b, labels=b).loss.item() for b in batches) / len(batches)


# ---------------------------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("stage", [2, 3])
def test_exported_logits_equal_training_engine_logits(stage, exported, engine_logits, batch):
    model = load(exported[stage])
    with torch.no_grad():
        out = model(batch, labels=batch, return_logits=True)
    assert engine_logits[stage]["stage"] == stage
    torch.testing.assert_close(out.logits, engine_logits[stage]["logits"], rtol=0, atol=1e-6)
    assert out.loss.item() == pytest.approx(engine_logits[stage]["loss"], abs=1e-5)


def test_export_folder_loads_without_this_repository(exported, batch, workdir):
    folder = exported[3]
    files = {p.name for p in folder.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "modeling_baichuan.py",
            "configuration_baichuan.py", "tokenization_baichuan.py", "tokenizer.model", "tokenizer_config.json",
            "export_info.json"} <= files
    assert not any(f.endswith(".partial") for f in os.listdir(folder.parent))
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "configuration_baichuan.BaiChuanConfig",
                                  "AutoModelForCausalLM": "modeling_baichuan.BaiChuanForCausalLM"}
    assert config["architectures"] == ["BaiChuanForCausalLM"] and config["dtype"] == "float32"
    assert config["use_cache"] is True  # train.py's run turned it off
    assert not {"loss_chunk_size", "attention_backend", "norm_backend"} & set(config)  # run settings stay out
    info = json.loads((folder / "export_info.json").read_text())
    assert (info["tag"], info["step"], info["zero_stage"], info["world_size"]) == ("step3", 3, 3, 2)

    torch.save(batch, workdir / "batch-sub.pt")
    code = (
        "import json, sys, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "folder, batch, out = sys.argv[1:]\n"
        "m = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()\n"
        "t = AutoTokenizer.from_pretrained(folder, trust_remote_code=True, use_fast=False)\n"
        "with torch.no_grad():\n"
        "    torch.save(m(torch.load(batch)).logits, out)\n"
        "print(json.dumps({'cls': type(m).__name__, 'file': sys.modules[type(m).__module__].__file__,\n"
        "                  'tok': type(t).__name__, 'ids': t('登鹳雀楼').input_ids}))\n")
    home = workdir / "clean-home"
    home.mkdir(exist_ok=True)
    proc = subprocess.run([sys.executable, "-c", code, str(folder), str(workdir / "batch-sub.pt"),
                           str(workdir / "logits-sub.pt")], cwd=home, capture_output=True, text=True, timeout=120,
                          env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home),
                               "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["cls"] == "BaiChuanForCausalLM" and got["tok"] == "BaiChuanTokenizer"
    assert not got["file"].startswith(str(ROOT)), got["file"]  # the folder's own copy, not this repository
    import sentencepiece as spm
    assert got["ids"] == [1] + spm.SentencePieceProcessor(model_file=str(TOKENIZER)).encode("登鹳雀楼")
    with torch.no_grad():
        expected = load(folder)(batch).logits
    torch.testing.assert_close(torch.load(workdir / "logits-sub.pt"), expected, rtol=0, atol=0)


def test_llama_format_export_equals_the_baichuan_export(runs, exported, workdir, batch):
    """--format llama: the same checkpoint as a standard Llama folder (q/k/v split, no remote code)."""
    from transformers import LlamaForCausalLM
    folder = convert_checkpoint.convert(runs[3], workdir / "llama3", dtype="fp32", format="llama")
    assert {"q_proj", "k_proj", "v_proj"} <= {n.split(".")[-2] for n in load_file_names(folder)}
    assert "auto_map" not in json.loads((folder / "config.json").read_text())
    assert json.loads((folder / "export_info.json").read_text())["format"] == "llama"
    llama = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(llama(batch).logits, load(exported[3])(batch).logits, rtol=0, atol=1e-5)


def load_file_names(folder: Path):
    from safetensors import safe_open
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return list(f.keys())


def test_tag_choice_latest_and_named(runs, exported, workdir, batch):
    step2 = convert_checkpoint.convert(runs[2], workdir / "hf2-step2", tag="step2", dtype="fp32")
    assert json.loads((step2 / "export_info.json").read_text())["step"] == 2
    assert json.loads((exported[2] / "export_info.json").read_text())["tag"] == "step3"  # what `latest` names
    with torch.no_grad():
        a, b = load(step2)(batch).logits, load(exported[2])(batch).logits
    assert (a - b).abs().max() > 1e-4  # a training step lies between them


def test_bf16_sharded_export(runs, exported, workdir):
    folder = convert_checkpoint.convert(runs[3], workdir / "hf3-bf16", dtype="bf16", max_shard_size="3MB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in folder.glob("model-*.safetensors"))
    assert len(shards) >= 3 and set(index["weight_map"].values()) == set(shards)
    assert not (folder / "model.safetensors").exists()
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    from safetensors import safe_open
    for path in folder.glob("model-*.safetensors"):
        with safe_open(str(path), framework="pt") as f:  # a tensor larger than the limit gets a shard of its own
            assert path.stat().st_size <= 3_000_000 or len(list(f.keys())) == 1, path.name
    fp32 = load(exported[3]).state_dict()
    bf16 = BaiChuanForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).state_dict()
    assert set(bf16) == set(fp32)
    for name, tensor in bf16.items():
        assert tensor.dtype == torch.bfloat16
        torch.testing.assert_close(tensor, fp32[name].to(torch.bfloat16), rtol=0, atol=0, msg=name)


def test_cli_writes_and_refuses_to_overwrite(runs, workdir, capsys):
    out = workdir / "hf-cli"
    convert_checkpoint.main([str(runs[2]), str(out), "--dtype", "fp32", "--tokenizer_path", str(TOKENIZER)])
    assert "model.safetensors" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="exists and is not empty; pass --overwrite"):
        convert_checkpoint.main([str(runs[2]), str(out)])
    convert_checkpoint.main([str(runs[2]), str(out), "--overwrite", "--tag", "step2"])
    assert json.loads((out / "export_info.json").read_text())["tag"] == "step2"
    (workdir / "not-a-model").mkdir()
    (workdir / "not-a-model" / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="not a model folder"):
        convert_checkpoint.main([str(runs[2]), str(workdir / "not-a-model"), "--overwrite"])
    assert (workdir / "not-a-model" / "notes.txt").read_text() == "mine"


def test_zero3_checkpoint_resumes_on_one_rank_with_the_same_losses(runs, workdir):
    """Universal resume under ZeRO-3 (test_train_world_size covers ZeRO-2): the 2-rank run's step2 resumed on one
    rank, micro-batch 2 x accumulation 2 = the same global batch of 4, must give the 2-rank run's step-3 loss."""
    save = workdir / "zero3-on-one-rank"
    save.mkdir()
    shutil.copytree(runs[3] / "step2", save / "step2")
    shutil.copy(runs[3] / "metrics.jsonl", save / "metrics.jsonl")  # train.py drops the lines after the tag
    (save / "latest").write_text("step2")
    config = json.loads(ds_config(workdir / "ds3-one-rank.json", 3).read_text())
    config["gradient_accumulation_steps"] = 2
    (workdir / "ds3-one-rank.json").write_text(json.dumps(config))
    cmd = train_cmd(workdir, save, 3, "--max_steps", 3, "--steps_per_epoch", 2)
    cmd[cmd.index("--num_gpus") + 1] = "1"
    cmd[cmd.index("--deepspeed_config") + 1] = str(workdir / "ds3-one-rank.json")
    run_together([cmd])
    assert (save / "universal" / "step2" / "complete.json").is_file()
    assert json.loads((save / "step3" / "complete.json").read_text())["world_size"] == 1
    assert losses(save)[3] == pytest.approx(losses(runs[3])[3], abs=1e-5)


def _copy_run(src: Path, dst: Path, tags, latest=None, drop_marker=None, drop_file=None):
    """A cheap copy of a run: tag folders of symlinked files, optionally without a marker or a file."""
    dst.mkdir()
    shutil.copy(src / "run_config.json", dst)
    for tag in tags:
        (dst / tag).mkdir()
        for f in (src / tag).iterdir():
            if f.name == drop_file or (tag == drop_marker and f.name == "complete.json"):
                continue
            (dst / tag / f.name).symlink_to(f)
    if latest:
        (dst / "latest").write_text(latest)
    return dst


def test_bad_checkpoint_folders_are_clear_errors(runs, workdir):
    out = workdir / "never-written"
    no_latest = _copy_run(runs[2], workdir / "no-latest", ["step2", "step3"])
    with pytest.raises(FileNotFoundError, match=r"no `latest` file.*pass --tag.*complete tags: step2, step3"):
        convert_checkpoint.convert(no_latest, out)
    with pytest.raises(FileNotFoundError, match=r"--tag step9: there is no checkpoint folder .*step9 \(complete "
                                                r"tags: step2, step3\)"):
        convert_checkpoint.convert(no_latest, out, tag="step9")
    half = _copy_run(runs[3], workdir / "half", ["step2", "step3"], latest="step2", drop_marker="step3")
    with pytest.raises(ValueError, match=r"step3 is a half-written checkpoint \(no complete.json.*complete tags: "
                                         r"step2; half-written: step3"):
        convert_checkpoint.convert(half, out, tag="step3")
    assert resolve_checkpoint_tag(half) == "step2"
    damaged = _copy_run(runs[3], workdir / "damaged", ["step3"], latest="step3",
                        drop_file="zero_pp_rank_1_mp_rank_00_optim_states.pt")
    with pytest.raises(ValueError, match=r"zero_pp_rank_1_mp_rank_00_optim_states.pt is missing: it was written when "
                                         r"step3 was sealed"):
        convert_checkpoint.convert(damaged, out)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert_checkpoint.convert(workdir / "nowhere", out)
    other = workdir / "other-config.json"
    other.write_text(json.dumps(dict(json.loads((ROOT / "config" / "model" / "tiny.json").read_text()),
                                     intermediate_size=128)))
    with pytest.raises(ValueError, match=r"records its model config; --model_config .*other-config.json differs: "
                                         r"model.intermediate_size: checkpoint 176, --model_config 128"):
        convert_checkpoint.convert(runs[2], out, model_config=str(other))
    with pytest.raises(FileNotFoundError, match="--tokenizer_path .*missing.model: no such file"):
        convert_checkpoint.convert(runs[2], out, tokenizer_path=str(workdir / "missing.model"))
    with pytest.raises(SystemExit, match="convert_checkpoint: error: .*no `latest` file"):
        convert_checkpoint.main([str(no_latest), str(out)])
    assert not out.exists() and not (workdir / ".never-written.partial").exists()


# ---------------------------------------------------------------------------------------------------------------
# --init_from
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def released_folder(workdir):
    """A released-layout folder whose weights are clearly not a fresh initialisation (scaled lm_head)."""
    torch.manual_seed(7)
    model = BaiChuanForCausalLM(BaiChuanConfig.from_name("tiny"))
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    released_layout(model, workdir / "released")
    return workdir / "released"


@pytest.fixture(scope="module")
def init_runs(exported, released_folder, workdir):
    """One step from the exported ZeRO-3 folder under ZeRO-2, and from the released layout under ZeRO-3."""
    saves = {"exported": workdir / "init-exported", "released": workdir / "init-released"}
    run_together([
        train_cmd(workdir, saves["exported"], 2, "--max_steps", 1, "--resume", "none", "--init_from", exported[3]),
        train_cmd(workdir, saves["released"], 3, "--max_steps", 1, "--resume", "none", "--init_from",
                  released_folder)])
    return saves


def test_init_from_exported_folder_first_step_loss(init_runs, exported, first_batches):
    expected = folder_loss(exported[3], first_batches)
    assert losses(init_runs["exported"])[1] == pytest.approx(expected, abs=2e-5)
    fresh = BaiChuanForCausalLM(BaiChuanConfig.from_name("tiny"))  # what the loss would be had nothing loaded
    with torch.no_grad():
        assert abs(fresh(first_batches[0], labels=first_batches[0]).loss.item() - expected) > 1e-3


def test_init_from_released_layout_under_zero3(init_runs, released_folder, first_batches):
    expected = folder_loss(released_folder, first_batches)
    assert expected > 20  # the scaled lm_head: far from an untrained model's ln(64000) = 11.07
    assert losses(init_runs["released"])[1] == pytest.approx(expected, rel=1e-5)
    run_config = json.loads((init_runs["released"] / "run_config.json").read_text())
    assert run_config["deepspeed"]["zero_optimization"]["stage"] == 3


def test_released_sharded_bin_layout_loads(released_folder, workdir, batch):
    reference = load(released_folder)
    sharded = workdir / "released-sharded"
    released_layout(reference, sharded, shards=3)
    check_folder_config(sharded, BaiChuanConfig.from_name("tiny"))
    model = BaiChuanForCausalLM(BaiChuanConfig.from_name("tiny"))
    load_folder_weights(model, sharded)
    with torch.no_grad():
        torch.testing.assert_close(model(batch).logits, reference(batch).logits, rtol=0, atol=0)
        torch.testing.assert_close(load(sharded)(batch).logits, reference(batch).logits, rtol=0, atol=0)


def test_mismatched_model_folders_are_clear_errors(released_folder, workdir):
    tiny = BaiChuanConfig.from_name("tiny")
    with pytest.raises(ValueError, match=r"does not match --model_config: hidden_size: folder 64 vs --model_config "
                                         r"4096.*num_hidden_layers: folder 2 vs --model_config 32"):
        check_folder_config(released_folder, BaiChuanConfig.from_name("7b"))
    llama = workdir / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps(dict(json.loads((released_folder / "config.json").read_text()),
                                                       model_type="llama", architectures=["LlamaForCausalLM"])))
    with pytest.raises(ValueError, match=r"model_type 'llama', architectures \['LlamaForCausalLM'\]; this trainer "
                                         r"builds BaiChuanForCausalLM"):
        check_folder_config(llama, tiny)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        check_folder_config(workdir / "nowhere", tiny)

    state = torch.load(released_folder / "pytorch_model.bin")
    cases = {
        "missing": ({k: v for k, v in state.items() if k != "model.layers.1.mlp.up_proj.weight"},
                    r"missing 1 weight\(s\): \['model.layers.1.mlp.up_proj.weight'\]"),
        "shape": (dict(state, **{"model.norm.weight": torch.ones(65)}),
                  r"wrong shapes: model.norm.weight \(65,\) \(model wants \(64,\)\)"),
        "unexpected": (dict(state, **{"model.extra.weight": torch.ones(3)}),
                       r"unexpected 1 weight\(s\): \['model.extra.weight'\]"),
    }
    for name, (bad_state, message) in cases.items():
        folder = workdir / f"bad-{name}"
        folder.mkdir()
        shutil.copy(released_folder / "config.json", folder)
        torch.save(bad_state, folder / "pytorch_model.bin")
        model = BaiChuanForCausalLM(tiny)
        before = model.model.norm.weight.detach().clone()
        with pytest.raises(ValueError, match=message):
            load_folder_weights(model, folder)
        torch.testing.assert_close(model.model.norm.weight, before)  # checked before anything is copied
    sharded = workdir / "bad-shard"
    released_layout(load(released_folder), sharded, shards=2)
    (sharded / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(FileNotFoundError, match=r"lists shard\(s\) missing from the folder: "
                                                r"\['pytorch_model-00002-of-00002.bin'\]"):
        load_folder_weights(BaiChuanForCausalLM(tiny), sharded)
    with pytest.raises(FileNotFoundError, match="no model.safetensors, pytorch_model.bin"):
        load_folder_weights(BaiChuanForCausalLM(tiny), llama)


# ---------------------------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------------------------

def test_generate_reference_prompt_is_deterministic_and_streams(exported, workdir, capsys):
    folder = str(exported[2])
    first = generate.main(["--model", folder, "--device", "cpu", "--output", str(workdir / "g1.jsonl")])
    streamed = capsys.readouterr().out
    second = generate.main(["--model", folder, "--device", "cpu", "--no_stream"])
    printed = capsys.readouterr().out
    assert first == second and len(first) == 1
    assert first[0]["prompt"] == generate.REFERENCE_PROMPT
    assert first[0]["text"].startswith("登鹳雀楼->王之涣\n夜雨寄北->") and first[0]["completion"]
    assert streamed.strip() == printed.strip() == first[0]["text"].strip()
    assert [json.loads(line) for line in (workdir / "g1.jsonl").read_text(encoding="utf-8").splitlines()] == first


def test_generate_greedy_matches_argmax_and_batches_match_single(exported, workdir):
    folder = str(exported[3])
    prompts = workdir / "prompts.txt"
    prompts.write_text("登鹳雀楼->王之涣\\n夜雨寄北->\nhello world, this is a longer prompt than the others\n你好\n",
                       encoding="utf-8")
    flags = ["--model", folder, "--device", "cpu", "--max_new_tokens", "8", "--repetition_penalty", "1.0"]
    batched = generate.main(flags + ["--prompt_file", str(prompts), "--batch_size", "3"])
    single = [generate.main(flags + ["--prompt", p["prompt"].replace("\n", "\\n")])[0] for p in batched]
    assert [p["prompt"] for p in batched] == ["登鹳雀楼->王之涣\n夜雨寄北->",
                                              "hello world, this is a longer prompt than the others", "你好"]
    assert batched == single  # left padding is masked: a prompt's output does not depend on its batch

    # Greedy = argmax of full forward passes, token by token, without the cache.
    model, tokenizer = generate.load(folder, "cpu", torch.float32)
    ids = tokenizer(batched[1]["prompt"], return_tensors="pt").input_ids
    with torch.no_grad():
        for _ in range(8):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert tokenizer.decode(ids[0], skip_special_tokens=True) == batched[1]["text"]


def test_generate_sampling_is_seeded_and_bad_input_is_clear(exported, workdir):
    folder = str(exported[2])
    flags = ["--model", folder, "--device", "cpu", "--max_new_tokens", "12", "--do_sample", "--temperature", "1.5",
             "--top_k", "0", "--no_stream"]
    a, b = generate.main(flags + ["--seed", "1"]), generate.main(flags + ["--seed", "1"])
    others = [generate.main(flags + ["--seed", str(s)])[0]["completion"] for s in (2, 3)]
    assert a == b and any(o != a[0]["completion"] for o in others)
    with pytest.raises(SystemExit, match="no such file"):
        generate.main(["--model", folder, "--prompt_file", str(workdir / "missing.txt")])
    bad = workdir / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": 3}\n', encoding="utf-8")
    with pytest.raises(SystemExit, match=r"bad.jsonl, line 2: expected a JSON string or an object"):
        generate.main(["--model", folder, "--prompt_file", str(bad)])
    with pytest.raises(SystemExit, match="not a model folder"):
        generate.main(["--model", str(workdir)])


# ---------------------------------------------------------------------------------------------------------------
# Evaluation scripts take the exported folder
# ---------------------------------------------------------------------------------------------------------------

def test_evaluation_scripts_take_the_exported_folder(exported, workdir, capsys):
    from evaluation import evaluate_mmlu, evaluate_zh
    folder = str(exported[3])
    data = FIXTURES / "benchmarks"
    mmlu = evaluate_mmlu.main(["-m", folder, "-d", str(data / "mmlu"), "-s", str(workdir / "mmlu"),
                               "--subjects", "abstract_algebra", "--max_questions", "3", "--device_map", "cpu"])
    assert mmlu["questions"] == 3 and mmlu["config"]["dtype"] == "torch.float32"
    ceval = evaluate_zh.main(["--model_name_or_path", folder, "--data_dir", str(data / "ceval"),
                              "--output_dir", str(workdir / "ceval"), "--subjects", "law", "--max_questions", "3",
                              "--device_map", "cpu"])
    assert ceval["questions"] == {"law": 3}
    assert "Average accuracy:" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------------
# Loss plot
# ---------------------------------------------------------------------------------------------------------------

def test_plot_loss_writes_png_of_every_run(runs, workdir):
    out = workdir / "plots" / "loss.png"
    fig = plot_loss.plot([str(runs[2]), str(runs[3] / "metrics.jsonl")], out, smooth=2)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    ax_loss, ax_speed = fig.axes
    assert [t.get_text() for t in ax_loss.get_legend().get_texts()] == ["zero2 (mean of 2)", "zero3 (mean of 2)"]
    raw = ax_loss.get_lines()[0]  # zero2 as logged
    assert list(raw.get_xdata()) == [1, 2, 3] and list(raw.get_ydata()) == [losses(runs[2])[s] for s in (1, 2, 3)]
    assert len(ax_speed.get_lines()) == 2
    fig = plot_loss.plot([str(runs[2])], workdir / "tokens.png", labels=["a"], x="tokens")
    # 2 ranks x micro-batch 2 x 64 tokens per step
    assert list(fig.axes[0].get_lines()[0].get_xdata()) == pytest.approx([s * 256 / 1e9 for s in (1, 2, 3)])


def test_plot_loss_bad_metrics_are_clear_errors(workdir, capsys):
    bad = workdir / "bad-metrics"
    bad.mkdir()
    with pytest.raises(SystemExit, match=r"bad-metrics/metrics.jsonl: no such metrics file"):
        plot_loss.main([str(bad), "-o", str(workdir / "x.png")])
    metrics = bad / "metrics.jsonl"
    metrics.write_text("\n")
    with pytest.raises(SystemExit, match=r"metrics.jsonl: no records \(empty metrics file\)"):
        plot_loss.main([str(bad), "-o", str(workdir / "x.png")])
    metrics.write_text('{"step": 1, "loss": 2.5}\n{"step": 2, "loss": 2.4\n')
    with pytest.raises(SystemExit, match=r"metrics.jsonl, line 2: not valid JSON"):
        plot_loss.main([str(bad), "-o", str(workdir / "x.png")])
    metrics.write_text('{"step": 1, "loss": 2.5}\n{"step": 2, "lr": 0.1}\n')
    with pytest.raises(SystemExit, match=r"metrics.jsonl, line 2: expected an object with numeric 'step' and"):
        plot_loss.main([str(bad), "-o", str(workdir / "x.png")])
    metrics.write_text('{"step": 1, "loss": 2.5}\n')
    with pytest.raises(SystemExit, match=r"--x tokens: .*run_config.json is missing"):
        plot_loss.main([str(bad), "-o", str(workdir / "x.png"), "--x", "tokens"])
    assert not (workdir / "x.png").exists()


def test_evaluate_ppl_reads_a_checkpoint_tag_through_the_export(runs, exported, workdir):
    """evaluate_ppl on train.py's checkpoint folder and a tag gives the curve of the folder exported from it."""
    from evaluation import evaluate_ppl

    book = workdir / "ppl-book.txt"
    book.write_text("the quick brown fox jumps over the lazy dog, " * 40 + "\n", encoding="utf-8")
    curves = {}
    for name, model in (("checkpoint", [str(runs[2]), "--tag", "step3"]), ("folder", [str(exported[2])])):
        curves[name] = evaluate_ppl.main(["--model", *model, "--data", str(book), "--lengths", "48", "--bucket", "16",
                                          "--modes", "whole", "--device", "cpu",
                                          "--output_dir", str(workdir / f"ppl-{name}")])[0]
    assert curves["checkpoint"]["model"] == "zero2@step3"
    assert curves["checkpoint"]["tokens"] == curves["folder"]["tokens"] == 47
    for a, b in zip(curves["checkpoint"]["buckets"], curves["folder"]["buckets"]):
        assert a["tokens"] == b["tokens"] and a["loss"] == pytest.approx(b["loss"], rel=1e-6)
