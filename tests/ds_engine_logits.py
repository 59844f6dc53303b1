"""Helper for test_checkpoint_io.py, run under the deepspeed launcher with the ranks that trained: rebuild the
training engine exactly as train.py does (ZeRO config and model config from the checkpoint), restore a tag with
engine.load_checkpoint and write the engine's logits and loss on a fixed batch (rank 0).

    python -m deepspeed.launcher.runner --num_gpus 2 tests/ds_engine_logits.py BATCH.pt CKPT_DIR:TAG:OUT.pt ...

Several checkpoints (ZeRO-2 and ZeRO-3) may be named; each gets its own engine, so one launch serves them all.
"""
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

from models.configuration_baichuan import BaiChuanConfig
from models.modeling_baichuan import BaiChuanForCausalLM
from training import recovery
from training.schedule import lr_scheduler_factory

batch_path, *jobs = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
deepspeed.init_distributed()
rank = dist.get_rank()
batch = torch.load(batch_path)
for job in jobs:
    ckpt_dir, tag, out = job.split(":")
    # Every rank's model-state file carries train.py's client state and the DeepSpeed config it ran with.
    files = sorted((Path(ckpt_dir) / tag).glob("*model_states.pt"))
    state = torch.load(files[0], map_location="cpu", weights_only=False)
    ds_config, config = state["ds_config"], BaiChuanConfig.from_dict(state["model_config"])
    if ds_config["zero_optimization"]["stage"] == 3:
        with deepspeed.zero.Init(config_dict_or_path=ds_config):
            model = BaiChuanForCausalLM(config)
    else:
        model = BaiChuanForCausalLM(config)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config,
                                      lr_scheduler=lr_scheduler_factory(ds_config))
    path, _ = engine.load_checkpoint(ckpt_dir, tag=tag)
    assert path is not None, f"engine.load_checkpoint found nothing at {ckpt_dir}/{tag}"
    engine.eval()
    with torch.no_grad():
        result = engine(batch, labels=batch, return_logits=True)  # every rank runs it: ZeRO-3 gathers weights
    if rank == 0:
        torch.save({"logits": result.logits.float(), "loss": result.loss.item(),
                    "stage": ds_config["zero_optimization"]["stage"]}, out)
    dist.barrier()
recovery.shutdown_distributed()  # gloo left to the interpreter's teardown can abort a finished rank
