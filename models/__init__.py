"""baichuan-7B architecture: configuration, modeling and tokenization, Hugging Face compatible."""
from .configuration_baichuan import BaiChuanConfig, PRESETS_DIR

__all__ = ["BaiChuanConfig", "PRESETS_DIR"]
