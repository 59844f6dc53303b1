"""Resume on another world size through the real deepspeed launcher (CPU ranks, gloo, fp32, ZeRO-2, tiny preset):
a 2-rank run checkpointed at step 4 goes on on 1 rank, and a 1-rank run checkpointed at step 4 goes on on 2 ranks;
both give the losses of the uninterrupted 2-rank run (the global batch, 4 samples, is the same throughout).
Four launches; on a quiet 2-core machine about a minute each (slow, like tests/test_train.py)."""
import json
import shutil

import pytest

from test_train import TOKENIZER, ds_config, losses, run, train_cmd

pytestmark = pytest.mark.skipif(not TOKENIZER.is_file(), reason="tokenizer.model missing at the repo root")
STEPS = 8


def cmd(save, config, nproc, *extra):
    return train_cmd(save, config, "--max_steps", STEPS, "--save_every", 4, *extra, nproc=nproc)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("world")


@pytest.fixture(scope="module")
def configs(workdir):
    # micro 2: 2 ranks x accumulation 1 or 1 rank x accumulation 2 make the same global batch of 4.
    return {n: ds_config(workdir / f"ds{n}.json", micro_bs=2, gas=3 - n, total_steps=STEPS) for n in (1, 2)}


@pytest.fixture(scope="module")
def reference(workdir, configs):
    """8 steps on 2 ranks, checkpoints step4 and step8: the uninterrupted run, and the 2-rank half of 2 -> 1."""
    save = workdir / "two-ranks"
    proc = run(cmd(save, configs[2], 2, "--resume", "none"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return save


@pytest.fixture(scope="module")
def one_rank(workdir, configs):
    """4 steps on 1 rank, checkpoint step4: the 1-rank half of 1 -> 2."""
    save = workdir / "one-rank"
    proc = run(cmd(save, configs[1], 1, "--resume", "none", "--max_steps", 4))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return save


def test_one_rank_gives_the_two_rank_losses(reference, one_rank):
    ref = losses(reference)
    assert losses(one_rank) == pytest.approx({s: ref[s] for s in range(1, 5)}, abs=1e-5)
    record = json.loads((reference / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["tokens_by_source"] == {"all": STEPS * 4 * 64}


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)])
def test_resume_on_another_world_size(reference, one_rank, workdir, configs, before, after):
    save = workdir / f"from{before}to{after}"
    first = {2: reference, 1: one_rank}[before]
    save.mkdir()
    shutil.copytree(first / "step4", save / "step4")
    shutil.copy(first / "metrics.jsonl", save / "metrics.jsonl")  # train.py drops the lines after step 4
    (save / "latest").write_text("step4")
    proc = run(cmd(save, configs[after], after))  # --resume auto: step4, written by `before` ranks
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resumed from" in proc.stdout
    assert (save / "universal" / "step4" / "complete.json").is_file()
    assert losses(save) == pytest.approx(losses(reference), abs=1e-5)
    assert json.loads((save / "step8" / "complete.json").read_text())["world_size"] == after
