"""Model FLOPs per trained token and device peaks, for MFU (train.py's log, scripts/benchmark_train.py).

Kept apart from train.py so the benchmark can use them without DeepSpeed installed.
"""
from typing import Optional

# Dense bf16 peak TFLOPS, matched in this order against the device name: specific names before the names they
# contain ("H100 PCIe" before "H100", "H200" before "H20").
PEAK_TFLOPS = {"A800": 312.0, "A100": 312.0, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H800": 989.0,
               "H100": 989.0, "H200": 989.0, "H20": 148.0}


def peak_tflops_for(device_name: str) -> Optional[float]:
    """The dense bf16 peak for a device name such as torch.cuda.get_device_name()'s, or None if unknown."""
    return next((v for k, v in PEAK_TFLOPS.items() if k in device_name), None)


def flops_per_token(config, seq_len: int) -> float:
    """Model FLOPs per trained token: 6N for the matmuls (forward + backward) plus attention's scores and mixing
    (PaLM appendix B); recomputation under activation checkpointing is not counted, as MFU requires."""
    n = config.num_parameters() - config.vocab_size * config.hidden_size  # embedding lookups are not matmuls
    return 6 * n + 12 * config.num_hidden_layers * config.hidden_size * seq_len
