"""The standard Llama layout of an exported model (``convert_checkpoint.py --format llama``).

The architecture is transformers' ``LlamaForCausalLM`` once the fused ``W_pack`` projection is split: its rows
are q, k and v in that order, each ``[hidden, hidden]``. So the folder written here holds
``q_proj``/``k_proj``/``v_proj`` weights, a ``LlamaConfig`` and a Llama tokenizer over the same SentencePiece
model, and every tool that reads Llama folders (transformers, lm-eval, vLLM, TGI, llama.cpp's converter) loads
it without remote code.

The tokenizer needs care. The fast tokenizer transformers converts from a SentencePiece model (what
``AutoTokenizer`` and most serving tools load) does not give SentencePiece's ids for this model: it adds the
dummy-prefix ``▁`` after every user-defined symbol (digits, "，", "\\n" ...) and normalizes those symbols away.
``fast_tokenizer`` builds a ``tokenizer.json`` that follows SentencePiece instead:

* single-character user-defined symbols are left to the BPE model (the trainer never merges them), hidden
  from the NFKC charsmap so that "，" or "\\n" stay what they are; longer ones ("<br>", "---") are added tokens;
* the dummy prefix ``▁`` is added once, at the start of the text;
* ``<s>``/``</s>``/``<unk>`` written in the text are plain text, as SentencePiece treats them
  (``split_special_tokens``).

One difference remains, at the very start of a text that starts with a space or with a multi-character
user-defined symbol ("<SEP>", "---"): SentencePiece's dummy prefix there gives a lone ``▁`` (or, for a model
trained with whitespace-only pieces, "▁▁") that the fast tokenizer does not. Everywhere else the ids are the
same (tests/test_llama_export.py checks the shipped corpus sample; prompts of the evaluation protocol never
start with a space). The slow ``LlamaTokenizer`` (``use_fast=False``) gives SentencePiece's ids there too.
"""
from pathlib import Path
from typing import Dict, Tuple

import torch

QKV = ("q_proj", "k_proj", "v_proj")


def llama_shapes(baichuan_shapes: Dict[str, Tuple[int, ...]]) -> Dict[str, Tuple[int, ...]]:
    """Weight names and shapes of the Llama layout, from those of our model."""
    out = {}
    for name, shape in baichuan_shapes.items():
        if name.endswith("self_attn.W_pack.weight"):
            for part in QKV:
                out[name.replace("W_pack", part)] = (shape[0] // 3, shape[1])  # [3h, h] -> 3 x [h, h]
        else:
            out[name] = shape
    return out


class SplitQKV:
    """A view of our state dict under Llama names: ``pop("...q_proj.weight")`` splits ``W_pack`` once and keeps
    k and v until they are asked for, so the weights are still read one at a time."""

    def __init__(self, state):
        self.state, self.parts = state, {}

    def pop(self, name: str) -> torch.Tensor:
        for i, part in enumerate(QKV):
            if f"self_attn.{part}." in name:
                if name not in self.parts:
                    packed = self.state.pop(name.replace(part, "W_pack")).contiguous()
                    for p, t in zip(QKV, packed.chunk(3, dim=0)):  # [3h, h] -> 3 x [h, h]
                        self.parts[name.replace(part, p)] = t
                return self.parts.pop(name)
        return self.state.pop(name)


def llama_config(config, dtype: torch.dtype):
    """The ``LlamaConfig`` of the same model: multi-head attention (as many key/value heads as heads)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_attention_heads, hidden_act=config.hidden_act,
        max_position_embeddings=config.max_position_embeddings, rms_norm_eps=config.rms_norm_eps,
        rope_theta=config.rope_theta, rope_scaling=getattr(config, "rope_scaling", None),
        tie_word_embeddings=config.tie_word_embeddings, attention_bias=False, mlp_bias=False,
        pad_token_id=config.pad_token_id, bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
        use_cache=True, architectures=["LlamaForCausalLM"], dtype=dtype)


def fast_tokenizer(vocab_file: str):
    """A ``tokenizers.Tokenizer`` that gives SentencePiece's ids for this BPE model (see the module notes)."""
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers.convert_slow_tokenizer import SentencePieceExtractor

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(vocab_file).read_bytes())
    if proto.trainer_spec.model_type != proto.trainer_spec.BPE:
        raise ValueError(f"{vocab_file}: a {proto.trainer_spec.ModelType.Name(proto.trainer_spec.model_type)} "
                         "SentencePiece model; the Llama export supports BPE models (what train_tokenizer.py writes)")
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    _, merges = SentencePieceExtractor(vocab_file).extract()
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=proto.pieces[proto.trainer_spec.unk_id].piece,
                               fuse_unk=True, byte_fallback=proto.trainer_spec.byte_fallback))
    user = [p.piece for p in proto.pieces if p.type == p.USER_DEFINED]
    steps = []
    if proto.normalizer_spec.precompiled_charsmap:
        charsmap = normalizers.Precompiled(proto.normalizer_spec.precompiled_charsmap)
        # Unicode noncharacters (U+FDD0...) never occur in text: they carry the symbols past the charsmap.
        hidden = {u: chr(0xFDD0 + i) for i, u in enumerate(
            u for u in user if len(u) == 1 and charsmap.normalize_str(u) != u)}
        if len(hidden) > 32:
            raise ValueError(f"{vocab_file}: more than 32 user-defined symbols that NFKC changes")
        steps += [normalizers.Replace(u, h) for u, h in hidden.items()] + [charsmap]
        steps += [normalizers.Replace(h, u) for u, h in hidden.items()]
    steps += [normalizers.Replace(" ", "▁")]
    tok.normalizer = normalizers.Sequence(steps)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if proto.normalizer_spec.add_dummy_prefix else "never", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(p.piece, normalized=False, special=True) for p in proto.pieces
                            if p.type in (p.CONTROL, p.UNKNOWN)])
    tok.add_tokens([AddedToken(u, normalized=False, special=False) for u in user if len(u) > 1])
    return tok


def save_llama_tokenizer(vocab_file: str, out_dir) -> None:
    """tokenizer.model, tokenizer.json and tokenizer_config.json: BOS in front, no EOS, as our tokenizer."""
    from transformers import LlamaTokenizerFast

    tokenizer = LlamaTokenizerFast(
        vocab_file=str(vocab_file), tokenizer_object=fast_tokenizer(str(vocab_file)), unk_token="<unk>",
        bos_token="<s>", eos_token="</s>", add_bos_token=True, add_eos_token=False,
        # legacy: the slow LlamaTokenizer (use_fast=False) then encodes as SentencePiece does.
        legacy=True, split_special_tokens=True, clean_up_tokenization_spaces=False)
    tokenizer.save_pretrained(str(out_dir))


def save_llama_folder(model, vocab_file: str, out_dir, dtype: torch.dtype = torch.float32) -> None:
    """Write a loaded ``BaiChuanForCausalLM`` as a Llama folder (safetensors, config, tokenizer): for a model
    already in memory or a baichuan-format folder; ``convert_checkpoint.py --format llama`` does the same
    from a training checkpoint without building the model."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = SplitQKV(dict(model.state_dict()))
    names = llama_shapes({n: tuple(t.shape) for n, t in model.state_dict().items()})
    save_file({n: state.pop(n).to(dtype).contiguous() for n in names}, str(out_dir / "model.safetensors"),
              metadata={"format": "pt"})
    config = llama_config(model.config, dtype)
    config.save_pretrained(out_dir)
    GenerationConfig.from_model_config(config).save_pretrained(out_dir)
    save_llama_tokenizer(vocab_file, out_dir)
