"""train.py with a failing disk, for test_integrity.py (run under the deepspeed launcher like train.py).

FAULT_RANK, FAULT_FILE (a path suffix such as step4/zero_pp_rank_1_mp_rank_00_optim_states.pt) and FAULT_ERRNO say
which rank's write of which checkpoint file fails, as a full disk (28) or a read-only folder (13) would."""
import os
from pathlib import Path

import torch.distributed as dist

import checkpoint.safety
import train


def fault(path: Path) -> None:
    if dist.get_rank() == int(os.environ["FAULT_RANK"]) and str(path).endswith(os.environ["FAULT_FILE"]):
        code = int(os.environ["FAULT_ERRNO"])
        raise OSError(code, os.strerror(code), str(path))


checkpoint.safety.io_fault_hook = fault
train.main()
