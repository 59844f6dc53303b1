"""Resume on another world size through the real deepspeed launcher (CPU ranks, gloo, fp32, ZeRO-2, tiny preset).

Three launches: the uninterrupted run on 2 ranks (checkpoints every 2 steps); its step2 resumed on 1 rank to the
end (2 -> 1, saving step4 as a 1-rank checkpoint); that step4 resumed on 2 ranks (1 -> 2). The global batch of 4
samples is the same throughout (micro-batch 2 x 2 ranks, or x 2 accumulation steps on 1 rank), so every run must
give the uninterrupted run's losses."""
import json
import shutil

import pytest

from test_train import TOKENIZER, ds_config, losses, run, train_cmd

pytestmark = pytest.mark.skipif(not TOKENIZER.is_file(), reason="tokenizer.model missing at the repo root")
STEPS = 6


def cmd(save, config, nproc, *extra):
    return train_cmd(save, config, "--max_steps", STEPS, "--save_every", 2, *extra, nproc=nproc)


def resume_copy(source, tag, save):
    """A checkpoint folder holding only `source`'s `tag`, as if the run had stopped there."""
    save.mkdir()
    shutil.copytree(source / tag, save / tag)
    shutil.copy(source / "metrics.jsonl", save / "metrics.jsonl")  # train.py drops the lines after the tag
    (save / "latest").write_text(tag)
    return save


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("world")


@pytest.fixture(scope="module")
def configs(workdir):
    return {n: ds_config(workdir / f"ds{n}.json", micro_bs=2, gas=3 - n, total_steps=STEPS) for n in (1, 2)}


@pytest.fixture(scope="module")
def reference(workdir, configs):
    save = workdir / "two-ranks"
    proc = run(cmd(save, configs[2], 2, "--resume", "none"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return save


@pytest.fixture(scope="module")
def two_to_one(reference, workdir, configs):
    save = resume_copy(reference, "step2", workdir / "two-to-one")
    proc = run(cmd(save, configs[1], 1))  # --resume auto: step2, written by 2 ranks
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resumed from" in proc.stdout
    return save


@pytest.fixture(scope="module")
def one_to_two(two_to_one, workdir, configs):
    save = resume_copy(two_to_one, "step4", workdir / "one-to-two")
    proc = run(cmd(save, configs[2], 2))  # step4, written by 1 rank
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return save


def test_two_ranks_to_one(reference, two_to_one):
    assert (two_to_one / "universal" / "step2" / "complete.json").is_file()
    assert losses(two_to_one) == pytest.approx(losses(reference), abs=1e-5)
    assert json.loads((two_to_one / "step4" / "complete.json").read_text())["world_size"] == 1
    record = json.loads((two_to_one / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["tokens_by_source"] == {"all": STEPS * 4 * 64}  # global samples x max_length, whatever the world


def test_one_rank_to_two(reference, one_to_two):
    assert (one_to_two / "universal" / "step4" / "complete.json").is_file()
    assert losses(one_to_two) == pytest.approx(losses(reference), abs=1e-5)
    assert json.loads((one_to_two / "step6" / "complete.json").read_text())["world_size"] == 2
