"""baichuan-7B architecture: configuration, modeling and tokenization, Hugging Face compatible."""
from .configuration_baichuan import BaiChuanConfig, PRESETS_DIR

__all__ = ["BaiChuanConfig", "PRESETS_DIR", "register_auto_classes"]


def register_auto_classes() -> None:
    """Make transformers' Auto classes build a `model_type: baichuan` folder with this package's classes, so such
    a folder loads with trust_remote_code=False and the Python files it carries never run."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .modeling_baichuan import BaiChuanForCausalLM
    from .tokenization_baichuan import BaiChuanTokenizer

    for register in (lambda: AutoConfig.register("baichuan", BaiChuanConfig),
                     lambda: AutoModelForCausalLM.register(BaiChuanConfig, BaiChuanForCausalLM),
                     lambda: AutoTokenizer.register(BaiChuanConfig, slow_tokenizer_class=BaiChuanTokenizer)):
        try:
            register()
        except ValueError as e:  # registered already in this process
            if "already" not in str(e):
                raise
