"""Helper for test_train.py, run under the deepspeed launcher: a few steps on fixed global batches, each rank
taking its slice of rows. Writes the rank-averaged losses and the final weights (rank 0) to argv[2]."""
import json
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

from models.configuration_baichuan import BaiChuanConfig
from models.modeling_baichuan import BaiChuanForCausalLM
from training import recovery

config_path, out = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
deepspeed.init_distributed()
rank, world = dist.get_rank(), dist.get_world_size()
ds_config = json.loads(Path(config_path).read_text())
micro_bs = ds_config["train_micro_batch_size_per_gpu"]
torch.manual_seed(0)
model = BaiChuanForCausalLM(BaiChuanConfig.from_name("tiny", use_cache=False))
engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
data = torch.Generator().manual_seed(1)
losses = []
for step in range(3):
    batch = torch.randint(3, 64000, (4, 33), generator=data)  # the same global batch on every rank
    rows = batch[rank * micro_bs:(rank + 1) * micro_bs]
    loss = engine(rows, labels=rows).loss
    engine.backward(loss)
    engine.step()
    total = loss.detach().clone()
    dist.all_reduce(total)
    losses.append(total.item() / world)
if rank == 0:
    torch.save({"losses": losses, "params": {n: p.detach().clone() for n, p in engine.module.named_parameters()}}, out)
recovery.shutdown_distributed()  # gloo left to the interpreter's teardown can abort a finished rank
