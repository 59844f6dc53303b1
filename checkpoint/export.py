"""Export a DeepSpeed checkpoint written by train.py as a Hugging Face model folder (the core of
scripts/convert_checkpoint.py).

    python scripts/convert_checkpoint.py checkpoints out/baichuan-7b-step2000 --tag step2000
    python scripts/convert_checkpoint.py checkpoints out/latest-fp32 --dtype fp32      # the tag `latest` names

The folder holds safetensors weights (one file, or shards of at most --max_shard_size with
``model.safetensors.index.json``), ``config.json`` with ``auto_map``, ``generation_config.json``, the tokenizer
(``tokenizer.model`` + ``tokenizer_config.json``) and the model's Python files, so that

    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

loads it anywhere, without this repository (inside it, the scripts load it without running its code);
``evaluation/evaluate_zh.py``, ``evaluation/evaluate_mmlu.py``,
``scripts/generate.py`` and ``train.py --init_from`` all take it. ``export_info.json`` records where it came from.

How: DeepSpeed's own ``zero_to_fp32`` rebuilds the fp32 master weights from every rank's optimizer partition
(ZeRO-2 or ZeRO-3, any number of ranks); it runs on the CPU and needs neither a GPU nor torch.distributed.
Memory: ZeRO-3 partitions are memory-mapped and each weight is gathered on its own, then written shard by shard,
so the peak is about one output shard; ZeRO-2 partitions are concatenated by DeepSpeed into one flat vector,
i.e. the consolidated fp32 weights once (28 GB for 7B). The model config comes from the checkpoint itself
(train.py stores it as client state), with ``use_cache`` turned back on.

``--format llama`` writes a standard Llama folder instead (q/k/v split, ``LlamaConfig``, a Llama tokenizer over
the same SentencePiece model) that loads with ``trust_remote_code=False``; see checkpoint/llama.py.

Only complete checkpoints are exported: a tag without ``complete.json`` (a job killed while saving) is refused,
and so is one whose files differ from those sealed or would run code when loaded (checkpoint/safety.py). The
tokenizer is the one the tag carries (train.py copies it in and records its sha256); ``run_config.json`` is
consulted only for checkpoints written before that.
"""
import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from checkpoint import llama
from checkpoint.io import open_tag, resolve_checkpoint_tag
from checkpoint.resume_rules import model_fields, tokenizer_sha256
from common import REPO_ROOT as ROOT, HelpFormatter
from models.configuration_baichuan import BaiChuanConfig
from models.modeling_baichuan import BaiChuanForCausalLM
from models.tokenization_baichuan import BaiChuanTokenizer

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("checkpoint_dir", help="train.py's --checkpoint_saving_path (the folder holding `latest` and "
                   "the step<N> tags)")
    p.add_argument("output_dir", help="Hugging Face model folder to write")
    p.add_argument("--tag", default=None, help="checkpoint tag to export, e.g. step2000 (default: the one "
                   "<checkpoint_dir>/latest names)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16",
                   help="dtype of the saved weights (the fp32 master weights are cast once; default bf16)")
    p.add_argument("--max_shard_size", default="5GB",
                   help="largest weights file before the weights are split into shards with an index, e.g. "
                        "'5GB', '500MB' or a number of bytes")
    p.add_argument("--tokenizer_path", default=None,
                   help="SentencePiece model the run trained with; refused unless it is the one the checkpoint "
                        "recorded (default: the copy inside the tag)")
    p.add_argument("--model_config", default=None,
                   help="preset or config.json, only for checkpoints that do not record their model config")
    p.add_argument("--format", choices=["baichuan", "llama"], default="baichuan",
                   help="baichuan: the released baichuan-7B layout (W_pack, our code, trust_remote_code); llama: a "
                        "standard Llama folder (q/k/v split, LlamaConfig, Llama tokenizer) that loads without remote "
                        "code (see checkpoint/llama.py)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace output_dir if it already holds a model folder")
    return p.parse_args(argv)


def export_config(model_config: dict, dtype: torch.dtype) -> BaiChuanConfig:
    config = BaiChuanConfig.from_dict(dict(model_config))
    # train.py turns the cache off; the exported model caches keys/values when generating. Run settings that
    # older checkpoints recorded (kernels, loss chunk) were dropped by BaiChuanConfig on the way in.
    config.use_cache = True
    config.architectures = ["BaiChuanForCausalLM"]
    config.dtype = dtype
    return config


def find_tokenizer(checkpoint_dir: Path, tag_dir: Path, client: dict, tokenizer_path: Optional[str]) -> Path:
    """The tokenizer the checkpoint was trained with: the tag's own copy, or `tokenizer_path` when its sha256 is
    the one recorded. Checkpoints from before tokenizers were recorded fall back to run_config.json."""
    recorded = (client.get("run_settings") or {}).get("tokenizer")
    if tokenizer_path:
        path = Path(tokenizer_path)
        if not path.is_file():
            raise FileNotFoundError(f"--tokenizer_path {path}: no such file")
    elif recorded:
        path = tag_dir / "tokenizer.model"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: the checkpoint records tokenizer sha256 {recorded[:12]}... "
                                    "but its copy is gone; pass --tokenizer_path with that tokenizer")
    else:
        path = _run_config_tokenizer(checkpoint_dir)
    if recorded and tokenizer_sha256(path) != recorded:
        raise ValueError(f"tokenizer {path} (sha256 {tokenizer_sha256(path)[:12]}...) is not the one {tag_dir} was "
                         f"trained with (sha256 {recorded[:12]}...)")
    return path


def _run_config_tokenizer(checkpoint_dir: Path) -> Path:
    run_config = checkpoint_dir / "run_config.json"
    if not run_config.is_file():
        raise FileNotFoundError(f"{run_config} is missing, so the run's tokenizer is unknown; pass --tokenizer_path")
    recorded = json.loads(run_config.read_text(encoding="utf-8"))["args"]["tokenizer_path"]
    # train.py records the path as given, usually relative to the repository root it was launched from.
    for path in (Path(recorded), ROOT / recorded):
        if path.is_file():
            return path
    raise FileNotFoundError(f"{run_config} records tokenizer_path {recorded!r}, which is not found from here or "
                            f"from {ROOT}; pass --tokenizer_path")


def parse_size(text) -> int:
    text = str(text).strip().upper()
    for unit, factor in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("GIB", 2**30), ("MIB", 2**20),
                         ("KIB", 2**10), ("B", 1)):
        if text.endswith(unit) and text[:-len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(text[:-len(unit)]) * factor)
    if text.isdigit():
        return int(text)
    raise ValueError(f"--max_shard_size {text!r}: expected a size such as 5GB, 500MB or a number of bytes")


def own_tensor(t: torch.Tensor) -> torch.Tensor:
    """`t` in storage of its own: a ZeRO-2 weight is a view into one flat vector, and safetensors refuses tensors
    that share storage. Copying only then keeps the peak memory at one shard."""
    return t if t.untyped_storage().nbytes() == t.nbytes else t.clone()


def prepare_output(output_dir: Path, overwrite: bool) -> Path:
    """A fresh temporary sibling folder to write into; it replaces output_dir only once everything is written."""
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        if not overwrite:
            raise FileExistsError(f"{output_dir} exists and is not empty; pass --overwrite to replace it")
        if not (output_dir / "config.json").is_file():
            raise FileExistsError(f"{output_dir} is not a model folder (no config.json); refusing to replace it "
                                  "even with --overwrite")
    tmp = output_dir.parent / f".{output_dir.name}.partial"
    if tmp.exists():
        shutil.rmtree(tmp)  # left by an export that was killed; ours by its name
    tmp.mkdir(parents=True)
    return tmp


def convert(checkpoint_dir, output_dir, tag: Optional[str] = None, dtype: str = "bf16", max_shard_size="5GB",
            tokenizer_path: Optional[str] = None, model_config: Optional[str] = None,
            overwrite: bool = False, format: str = "baichuan") -> Path:
    """Write the Hugging Face folder for `checkpoint_dir`/`tag`; returns output_dir. The function behind the CLI."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file
    from transformers import GenerationConfig
    from transformers.dynamic_module_utils import custom_object_save

    checkpoint_dir, output_dir = Path(checkpoint_dir), Path(output_dir)
    if format not in ("baichuan", "llama"):
        raise ValueError(f"--format {format!r}: choose baichuan or llama")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose one of {sorted(DTYPES)}")
    torch_dtype = DTYPES[dtype]
    shard_bytes = parse_size(max_shard_size)
    tag = resolve_checkpoint_tag(checkpoint_dir, tag)
    tag_dir = checkpoint_dir / tag
    client = open_tag(checkpoint_dir, tag)  # before zero_to_fp32 unpickles the tag with weights_only=False
    fields = client.get("model_config")
    if model_config is not None:
        given = BaiChuanConfig.from_name(model_config)
        if fields is not None:
            theirs = model_fields(BaiChuanConfig.from_dict(dict(fields)))
            diffs = [f"{k}: checkpoint {theirs.get(k)!r}, --model_config {v!r}"
                     for k, v in model_fields(given).items() if theirs.get(k) != v]
            if diffs:
                raise ValueError(f"{tag_dir} records its model config; --model_config {model_config} differs: "
                                 + "; ".join(diffs))
        fields = given.to_dict()
    if fields is None:
        raise ValueError(f"{tag_dir} records no model_config (not written by train.py?); pass --model_config")
    config = export_config(fields, torch_dtype)
    tokenizer = BaiChuanTokenizer(vocab_file=str(find_tokenizer(checkpoint_dir, tag_dir, client, tokenizer_path)))
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"tokenizer {tokenizer.vocab_file} has {tokenizer.vocab_size} pieces but the model's "
                         f"vocab_size is {config.vocab_size}: not the tokenizer this model was trained with")

    # The names and shapes the exported weights must have, from a model that allocates nothing.
    with torch.device("meta"):
        skeleton = BaiChuanForCausalLM(config)
    want = {name: tuple(p.shape) for name, p in skeleton.state_dict().items()}

    tmp = prepare_output(output_dir, overwrite)  # before the slow part, so a wrong output folder fails at once
    umask = os.umask(0)
    os.umask(umask)
    try:
        try:
            # lazy_mode: ZeRO-3 weights stay as references into the memory-mapped partitions until written.
            state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag, lazy_mode=True)
        except (FileNotFoundError, ValueError, KeyError, RuntimeError) as e:
            raise RuntimeError(f"{tag_dir} is marked complete but DeepSpeed cannot read it (a file was deleted "
                               f"or damaged after saving?): {e}") from e
        have = {name: tuple(t.shape) for name, t in state.items()}
        problems = []
        if sorted(set(want) - set(have)):
            problems.append(f"missing {sorted(set(want) - set(have))[:6]}")
        if sorted(set(have) - set(want)):
            problems.append(f"unexpected {sorted(set(have) - set(want))[:6]}")
        wrong = [f"{n} {have[n]} (config wants {want[n]})" for n in sorted(set(want) & set(have))
                 if have[n] != want[n]]
        if wrong:
            problems.append("wrong shapes: " + ", ".join(wrong[:6]))
        if problems:
            raise ValueError(f"{tag_dir}: the checkpoint's weights do not fit its model config: "
                             + "; ".join(problems))

        if format == "llama":
            want, state = llama.llama_shapes(want), llama.SplitQKV(state)
        # Plan shards on meta tensors of the output dtype (transformers' file names), then fill one at a time.
        plan = split_torch_state_dict_into_shards(
            {n: torch.empty(s, dtype=torch_dtype, device="meta") for n, s in want.items()},
            filename_pattern="model{suffix}.safetensors", max_shard_size=shard_bytes)
        for filename, names in plan.filename_to_tensors.items():
            shard = {n: own_tensor(state.pop(n).contiguous().to(torch_dtype)) for n in names}
            save_file(shard, str(tmp / filename), metadata={"format": "pt"})
            os.chmod(tmp / filename, 0o666 & ~umask)  # safetensors creates it owner-only; a release is shared
            del shard
        if plan.is_sharded:
            index = {"metadata": {"total_size": plan.metadata["total_size"]}, "weight_map": plan.tensor_to_filename}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        del state

        if format == "llama":
            llama_config = llama.llama_config(config, torch_dtype)
            llama_config.save_pretrained(tmp)
            GenerationConfig.from_model_config(llama_config).save_pretrained(tmp)
            llama.save_llama_tokenizer(tokenizer.vocab_file, tmp)
        else:
            custom_object_save(skeleton, tmp, config=config)  # modeling_baichuan.py (+ its imports), auto_map entry
            config.save_pretrained(tmp)  # config.json, configuration_baichuan.py
            GenerationConfig.from_model_config(config).save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)  # tokenizer.model, tokenizer_config.json, tokenization_baichuan.py
        info = {"source": str(checkpoint_dir.resolve()), "tag": tag, "step": client.get("step"), "dtype": dtype,
                "deepspeed_version": client.get("ds_version"), "world_size": client.get("dp_world_size"),
                "zero_stage": (client.get("ds_config") or {}).get("zero_optimization", {}).get("stage"),
                "tokenizer": str(Path(tokenizer.vocab_file).resolve()), "format": format, "time": time.time()}
        (tmp / "export_info.json").write_text(json.dumps(info, indent=2) + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if output_dir.exists():
        shutil.rmtree(output_dir)
    tmp.rename(output_dir)
    return output_dir


def main(argv=None):
    args = parse_args(argv)
    try:
        out = convert(args.checkpoint_dir, args.output_dir, tag=args.tag, dtype=args.dtype,
                      max_shard_size=args.max_shard_size, tokenizer_path=args.tokenizer_path,
                      model_config=args.model_config, overwrite=args.overwrite, format=args.format)
    except (OSError, ValueError, RuntimeError) as e:
        sys.exit(f"convert_checkpoint: error: {e}")
    files = sorted(p.name for p in out.iterdir())
    print(f"wrote {out}: {', '.join(files)}")


if __name__ == "__main__":
    main()
