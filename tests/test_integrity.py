"""Integrity and security: what a failed launch, a damaged file or a downloaded folder holds may not change what is
trained or exported, or run code.

Two launches (2 CPU ranks, tiny model) serve every test: a run whose disk "fills" while rank 1 re-writes a tag
that an earlier run had sealed (tests/faulty_train.py), and a resume of it that is refused for changed settings.
Everything else is in-process on copies of that run, with the crafted files made here.
"""
import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, free_port

import checkpoint.export
import checkpoint.io
import checkpoint.safety
from checkpoint.resume_rules import check_allowed_names, compare_settings, run_settings, stored_settings
from checkpoint.safety import UnsafeCheckpointError

TOKENIZER = ROOT / "tokenizer.model"
pytestmark = pytest.mark.skipif(not TOKENIZER.is_file(), reason="tokenizer.model missing at the repo root")
OPTIM1 = "zero_pp_rank_1_mp_rank_00_optim_states.pt"


def ds_config(path: Path) -> Path:
    config = json.loads((ROOT / "config" / "deepspeed_tiny.json").read_text())
    config.update(train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=1, steps_per_print=1)
    config["scheduler"]["params"].update(warmup_num_steps=1, total_num_steps=8)
    config["zero_optimization"] = {"stage": 2}
    config["tensorboard"] = {"enabled": False}
    path.write_text(json.dumps(config))
    return path


def launch(script: Path, save: Path, workdir: Path, *extra, env=None):
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
           str(script), "--deepspeed", "--deepspeed_config", str(ds_config(workdir / "ds.json")),
           "--data_dir", str(ROOT / "data_dir"), "--tokenizer_path", str(TOKENIZER), "--max_length", "64",
           "--checkpoint_saving_path", str(save), "--cache_dir", str(workdir / "token-cache"), "--num_workers", "1",
           *map(str, extra)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=480,
                          env=dict(os.environ, **(env or {})))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("integrity")


@pytest.fixture(scope="module")
def faulty_run(workdir):
    """4 steps, tags every 2. step4 exists already, sealed by an earlier run; rank 1's write of step4 hits a full
    disk. Returns (save dir, launcher output, run_config.json bytes after the run)."""
    save = workdir / "run"
    (save / "step4").mkdir(parents=True)
    (save / "step4" / "complete.json").write_text('{"step": 4, "world_size": 2}')
    proc = launch(ROOT / "tests" / "faulty_train.py", save, workdir, "--model_config", "tiny", "--max_steps", 4,
                  "--steps_per_epoch", 2, "--resume", "none",
                  env={"FAULT_RANK": "1", "FAULT_FILE": f"step4/{OPTIM1}", "FAULT_ERRNO": str(errno.ENOSPC)})
    assert (save / "step2" / "complete.json").is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return save, proc, (save / "run_config.json").read_bytes()


@pytest.fixture(scope="module")
def refused_launch(faulty_run, workdir):
    """--resume auto (step2) with another seed and a model config whose shapes are the same: refused."""
    save = faulty_run[0]
    config = json.loads((ROOT / "config" / "model" / "tiny.json").read_text())
    config.update(rope_theta=500000.0, rms_norm_eps=1e-5)
    (workdir / "tiny-rope.json").write_text(json.dumps(config))
    return launch(ROOT / "train.py", save, workdir, "--model_config", workdir / "tiny-rope.json", "--max_steps", 6,
                  "--steps_per_epoch", 2, "--seed", 7, "--allow_config_change", "model.rms_norm_eps")


def copy_tag(save: Path, dst: Path, tag="step2") -> Path:
    """A cheap copy of one complete tag (files symlinked; replace one to craft it) with `latest` naming it."""
    (dst / tag).mkdir(parents=True)
    for f in (save / tag).iterdir():
        (dst / tag / f.name).symlink_to(f)
    shutil.copy(save / "run_config.json", dst)
    (dst / "latest").write_text(tag)
    return dst


def reseal(tag_dir: Path) -> None:
    """Record the current file sizes in the seal, as someone who crafted the folder would."""
    seal = json.loads((tag_dir / "complete.json").read_text())
    seal["files"] = checkpoint.safety.file_sizes(tag_dir)
    (tag_dir / "complete.json").unlink()
    (tag_dir / "complete.json").write_text(json.dumps(seal))


class MakesMarker:
    """Unpickling this calls open(marker, 'w'): code execution, detectable by the file it creates."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


# ---------------------------------------------------------------------------------------------------------------
# 1. A failed launch leaves the record of the run; export takes the tokenizer from the checkpoint
# ---------------------------------------------------------------------------------------------------------------

def test_refused_launch_leaves_run_record_and_export_uses_the_tags_tokenizer(faulty_run, refused_launch, workdir):
    save, _, run_config = faulty_run
    log = refused_launch.stdout + refused_launch.stderr
    assert refused_launch.returncode != 0
    assert "model.rope_theta: checkpoint 10000.0, now 500000.0" in log and "seed: checkpoint 42, now 7" in log
    assert "--allow_config_change model.rope_theta --allow_config_change seed" in log
    assert "model.rms_norm_eps" not in log.split("would change")[1].split("Restore")[0]  # allowed by the flag
    assert (save / "run_config.json").read_bytes() == run_config  # the refused launch did not rewrite it

    # Even a run_config.json that names another tokenizer does not change what is exported.
    import sentencepiece as spm
    corpus = workdir / "other-corpus.txt"
    corpus.write_text("\n".join(f"line {i} of another corpus with other words {i * 7}" for i in range(200)))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(workdir / "other"), vocab_size=60,
                                   minloglevel=2)
    other = workdir / "other.model"
    copy = copy_tag(save, workdir / "run-config-lies")
    record = json.loads((copy / "run_config.json").read_text())
    record["args"]["tokenizer_path"] = str(other)
    (copy / "run_config.json").unlink()
    (copy / "run_config.json").write_text(json.dumps(record))
    out = checkpoint.export.convert(copy, workdir / "hf-tok", dtype="fp32")
    assert (out / "tokenizer.model").read_bytes() == TOKENIZER.read_bytes()
    with pytest.raises(ValueError, match=r"other.model \(sha256 .*\) is not the one .*step2 was trained with"):
        checkpoint.export.convert(copy, workdir / "hf-tok2", tokenizer_path=str(other))


# ---------------------------------------------------------------------------------------------------------------
# 2. The resume table
# ---------------------------------------------------------------------------------------------------------------

def test_resume_refuses_changed_settings_by_name_unless_allowed(faulty_run):
    from models.configuration_baichuan import BaiChuanConfig

    save = faulty_run[0]
    stored = stored_settings(checkpoint.io.open_tag(save, "step2"))
    ds = json.loads(ds_config(save.parent / "ds-table.json").read_text())
    ds["scheduler"]["params"]["total_num_steps"] = 8

    def current(seed=42, world=2, **model):
        return run_settings(BaiChuanConfig.from_name("tiny", **model), ds, seed, 64, world, TOKENIZER,
                            stored["data_fingerprint"])

    assert compare_settings(stored, current()) == []
    assert compare_settings(stored, current(use_cache=False)) == []  # free (kernels are not config fields)
    with pytest.raises(ValueError, match=r"model.max_position_embeddings: checkpoint 512, now 4096; model.rope_theta: "
                                         r"checkpoint 10000.0, now 1000000.0"):
        compare_settings(stored, current(rope_theta=1e6, max_position_embeddings=4096))
    assert len(compare_settings(stored, current(rope_theta=1e6), ["model.rope_theta"])) == 1
    assert len(compare_settings(stored, current(rope_theta=1e6, rms_norm_eps=1e-5), ["model"])) == 2
    with pytest.raises(ValueError, match="global_batch_size: checkpoint 4, now 8"):
        compare_settings(stored, current(world=4))  # world size is free, the global batch is not
    assert compare_settings(stored, current(seed=1, world=4), ["data"])  # the group --allow_data_change names
    with pytest.raises(ValueError, match=r"--allow_config_change 'steps': not a setting of the resume table"):
        check_allowed_names(["steps"])
    # A checkpoint from before run_settings existed is still checked on its model config.
    old = stored_settings({"model_config": BaiChuanConfig.from_name("tiny").to_dict()})
    with pytest.raises(ValueError, match="model.rms_norm_eps"):
        compare_settings(old, current(rms_norm_eps=1e-5))


# ---------------------------------------------------------------------------------------------------------------
# 3 and 9. Re-writing a tag unseals it first; a full disk is named on every rank
# ---------------------------------------------------------------------------------------------------------------

def test_full_disk_while_rewriting_a_sealed_tag(faulty_run):
    save, proc, _ = faulty_run
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0
    bad = save / "step4" / OPTIM1
    assert f"writing {bad} failed: [Errno 28 ENOSPC] No space left on device; this file needs about" in log
    assert "free on that file system" in log
    assert f"The last complete checkpoint, {save / 'step2'} (named by `latest`), stays valid." in log
    # Rank 0 did not fail itself, and says why it stops.
    assert "rank 0: saving checkpoint step4 failed on another rank: rank 1: CheckpointWriteError: writing" in log, \
        log[-3000:]
    assert not (save / "step4" / "complete.json").exists()  # the earlier seal was removed before re-writing
    assert (save / "latest").read_text() == "step2"
    with pytest.raises(ValueError, match="step4 is a half-written checkpoint"):
        checkpoint.io.resolve_checkpoint_tag(save, "step4")


class FakeEngine:
    """What save_checkpoint needs of a DeepSpeed engine: a checkpoint engine and a save that writes through it."""

    def __init__(self):
        self.checkpoint_engine = type("CE", (), {"save": lambda self, state, path: torch.save(state, path)})()

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        os.makedirs(os.path.join(save_dir, tag), exist_ok=True)
        for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
            self.checkpoint_engine.save(dict(client_state, w=torch.zeros(1000)), os.path.join(save_dir, tag, name))


@pytest.fixture
def gloo_group():
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_io_faults_name_file_errno_and_valid_checkpoint(tmp_path, monkeypatch, gloo_group):
    save = tmp_path / "ckpt"
    checkpoint.io.save_checkpoint(FakeEngine(), save, "step1", {"step": 1}, {"step": 1})
    assert json.loads((save / "step1" / "complete.json").read_text())["files"]["mp_rank_00_model_states.pt"] > 4000

    def full(path):
        if path.name.startswith("zero_pp"):
            raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(checkpoint.safety, "io_fault_hook", full)
    with pytest.raises(OSError, match=r"writing .*step2/zero_pp_rank_0_mp_rank_00_optim_states.pt failed: \[Errno 28 "
                                      r"ENOSPC\] No space left on device; this file needs about 0.00 MB, .* free on "
                                      r"that file system. The last complete checkpoint, .*step1 \(named by `latest`\)"):
        checkpoint.io.save_checkpoint(FakeEngine(), save, "step2", {"step": 2}, {"step": 2})
    assert not (save / "step2" / "complete.json").exists() and (save / "latest").read_text() == "step1"
    monkeypatch.setattr(checkpoint.safety, "io_fault_hook", None)

    def read_only(path, data, fsync=True):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))
    monkeypatch.setattr(checkpoint.io, "write_atomic", read_only)
    with pytest.raises(OSError, match=r"sealing .*step3 failed: \[Errno 13\] Permission denied \(.*tokenizer.model\)"
                                      r". The last complete checkpoint, .*step1"):
        checkpoint.io.save_checkpoint(FakeEngine(), save, "step3", {"step": 3}, {"step": 3},
                                      files={"tokenizer.model": TOKENIZER})
    assert not (save / "step3" / "complete.json").exists()


@pytest.mark.parametrize("code", [errno.EACCES, errno.EROFS])
def test_folder_read_only_mid_run_leaves_latest_valid(code, tmp_path, monkeypatch, gloo_group):
    """Two tags sealed, then the folder stops taking writes (permissions changed or remounted read-only; root
    ignores permissions, so the fault is injected): saving a new tag, or re-writing the sealed one `latest`
    names, stops with the file and errno, and `latest` and both sealed tags stay as they were."""
    save = tmp_path / "ckpt"
    for step in (1, 2):
        checkpoint.io.save_checkpoint(FakeEngine(), save, f"step{step}", {"step": step}, {"step": step})
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(save.rglob("*")) if p.is_file()}

    def read_only(path):
        if save in path.parents:
            raise OSError(code, os.strerror(code), str(path))
    monkeypatch.setattr(checkpoint.safety, "io_fault_hook", read_only)
    name = errno.errorcode[code]
    with pytest.raises(OSError, match=rf"writing {save}/step3/mp_rank_00_model_states.pt failed: \[Errno {code} "
                                      rf"{name}\] {os.strerror(code)}; {save}/step3 is not writable .* The last "
                                      rf"complete checkpoint, {save}/step2 \(named by `latest`\), stays valid."):
        checkpoint.io.save_checkpoint(FakeEngine(), save, "step3", {"step": 3}, {"step": 3})
    with pytest.raises(OSError, match=rf"preparing {save}/step2 failed: \[Errno {code}\] {os.strerror(code)}: "
                                      rf"'{save}/step2/complete.json'. The last complete checkpoint, {save}/step2"):
        checkpoint.io.save_checkpoint(FakeEngine(), save, "step2", {"step": 2}, {"step": 2})
    monkeypatch.setattr(checkpoint.safety, "io_fault_hook", None)
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in before} == before
    assert not list((save / "step3").glob("*.pt")) and (save / "latest").read_text() == "step2"
    assert checkpoint.io.resolve_checkpoint_tag(save) == "step2"
    assert checkpoint.io.resolve_checkpoint_tag(save, "step1") == "step1"
    assert checkpoint.io.open_tag(save, "step2")["step"] == 2 and checkpoint.io.open_tag(save, "step1")["step"] == 1
    with pytest.raises(ValueError, match="step3 is a half-written checkpoint"):
        checkpoint.io.resolve_checkpoint_tag(save, "step3")


def test_truncated_or_missing_file_is_named(faulty_run, workdir):
    save = faulty_run[0]
    copy = copy_tag(save, workdir / "truncated")
    target = copy / "step2" / OPTIM1
    data = target.read_bytes()
    target.unlink()
    target.write_bytes(data[:len(data) // 2])
    with pytest.raises(UnsafeCheckpointError, match=rf"{target} has {len(data) // 2} bytes but was sealed with "
                                                    rf"{len(data)}: it was truncated"):
        checkpoint.export.convert(copy, workdir / "hf-trunc")
    reseal(copy / "step2")  # a seal that agrees: the file itself is still unreadable, and named
    with pytest.raises(UnsafeCheckpointError, match=rf"checkpoint file {target} is damaged"):
        checkpoint.io.open_tag(copy, "step2")
    target.unlink()
    with pytest.raises(UnsafeCheckpointError, match=rf"{target} is missing"):
        checkpoint.export.convert(copy, workdir / "hf-trunc")


# ---------------------------------------------------------------------------------------------------------------
# 4. Loading runs no pickled code
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("crafted", ["mp_rank_00_model_states.pt", OPTIM1])
def test_crafted_checkpoint_file_runs_no_code(crafted, faulty_run, workdir):
    save = faulty_run[0]
    copy = copy_tag(save, workdir / f"crafted-{crafted}")
    marker = workdir / f"marker-{crafted}"
    target = copy / "step2" / crafted
    state = checkpoint.safety.safe_load(target)
    target.unlink()
    torch.save(dict(state, payload=MakesMarker(marker)), target)
    reseal(copy / "step2")
    with pytest.raises(UnsafeCheckpointError, match=rf"{target} is refused: loading it would run code"):
        checkpoint.export.convert(copy, workdir / f"hf-{crafted}")
    with pytest.raises(UnsafeCheckpointError, match=rf"{target} is refused"):
        checkpoint.io.open_tag(copy, checkpoint.io.resolve_resume_tag(copy, "auto"))  # what train.py does
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------------------
# 5. trust_remote_code is off unless asked for
# ---------------------------------------------------------------------------------------------------------------

def test_model_folders_run_no_code_without_the_flag(faulty_run, workdir):
    from evaluation.engine import load_model_and_tokenizer
    from scripts import generate

    folder = checkpoint.export.convert(faulty_run[0], workdir / "hf-code", dtype="fp32", tag="step2")
    marker = workdir / "marker-code"
    payload = f"open({str(marker)!r}, 'w').close()\n"
    for name in ("modeling_baichuan.py", "configuration_baichuan.py", "tokenization_baichuan.py"):
        (folder / name).write_text(payload + (folder / name).read_text())
    model, tokenizer = load_model_and_tokenizer(str(folder), device_map="cpu")
    assert type(model).__module__ == "models.modeling_baichuan" and tokenizer("登鹳雀楼").input_ids
    model, tokenizer = generate.load(str(folder), "cpu", torch.float32)
    assert type(tokenizer).__module__ == "models.tokenization_baichuan"
    assert not marker.exists()

    other = workdir / "hf-other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "made_up", "auto_map": {
        "AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.XForCausalLM"}}))
    for name in ("configuration_x.py", "modeling_x.py"):
        (other / name).write_text(payload)
    with pytest.raises(ValueError, match="needs its own Python code to load .* pass --trust_remote_code only if"):
        load_model_and_tokenizer(str(other), device_map="cpu")
    with pytest.raises(SystemExit, match="generate: error: .*pass --trust_remote_code"):
        generate.main(["--model", str(other), "--device", "cpu"])
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------------------
# 6. Tags are names, not paths
# ---------------------------------------------------------------------------------------------------------------

def test_tags_that_are_paths_are_refused(tmp_path):
    save = tmp_path / "ckpt"
    (save / "step2").mkdir(parents=True)
    (save / "step2" / "complete.json").write_text("{}")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "complete.json").write_text("{}")
    for bad in ("../outside", str(outside), "step2/../../outside", ".hidden", "step2/"):
        (save / "latest").write_text(bad)
        with pytest.raises(ValueError, match=r"`latest` in .*: .* is not a checkpoint tag"):
            checkpoint.io.resolve_resume_tag(save, "auto")
        with pytest.raises(ValueError, match=r"--tag: .* is not a checkpoint tag \(a name such as step2000"):
            checkpoint.io.resolve_checkpoint_tag(save, bad)
    for good in ("step2", "step2000_universal", "final-v1.2"):
        assert checkpoint.io.validate_tag(good) == good
    (save / "latest").write_text("step2")
    assert checkpoint.io.resolve_resume_tag(save, "auto") == "step2"
