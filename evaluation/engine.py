"""The few-shot multiple-choice engine both evaluation scripts use, plus model loading and shared flags.

A question is scored as in the reference scripts: the prompt's token ids go through the model and the
prediction is the argmax, over A-D, of the last position's logits at ``tokenizer(letter).input_ids[-1]``.

``mode="plain"`` is that computation: one question at a time, the whole prompt every time (only the last
position's logits are projected onto the vocabulary, which changes no number). ``mode="fast"`` (the
default) gets the same numbers with far less work:

* Questions are grouped by the number of shots their prompt kept. In a group, the token ids that every
  prompt starts with (the header and the shots: the same for every question of a subject) form the
  prefix. It is found on the *token ids* of the full prompts, so the model sees exactly the tokens the
  plain computation sees, whatever the tokenizer does at the prefix/question boundary.
* The prefix runs through the model once; its key/value cache is reused for every question of the group.
* The question parts run in batches of similar length (sorted, at most ``batch_size``, a new batch where
  padding would exceed 20%). They are left-padded *between* the cached prefix and the question, with the
  padding masked out and explicit position ids, so every row's last token sits at the last position and
  every real token keeps the position it has in the plain computation.
* Only the last position's logits are computed (``logits_to_keep=1`` where the model supports it).

In fp32 the two modes agree to float rounding (tests/test_evaluation_engine.py checks identical predictions);
in bf16 the cached/batched kernels round differently from the one-shot forward, so a near-tie can rarely go
the other way (benchmarks/bench_eval.py reports the agreement).
"""
import argparse
import inspect
import json
import os
from typing import Hashable, List, Optional, Sequence

import numpy as np
import torch

from evaluation.data import LETTERS


class FewShotEngine:
    def __init__(self, model, tokenizer, letters: Sequence[str] = LETTERS, batch_size: int = 16,
                 mode: str = "fast"):
        if mode not in ("fast", "plain"):
            raise ValueError(f"mode must be 'fast' or 'plain', got {mode!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model.eval()
        self.mode = mode
        self.batch_size = batch_size
        # Exactly the reference's candidate ids: the last id of each letter encoded on its own.
        self.letter_ids = [tokenizer(letter).input_ids[-1] for letter in letters]
        if len(set(self.letter_ids)) != len(self.letter_ids):
            raise ValueError(f"the tokenizer maps the letters {list(letters)} to clashing ids {self.letter_ids}")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = pad if pad is not None else 0  # padding is masked out, any id does
        self.device = model.get_input_embeddings().weight.device
        params = inspect.signature(model.forward).parameters
        if "logits_to_keep" in params:
            self._last_only = {"logits_to_keep": 1}
        elif "num_logits_to_keep" in params:  # transformers < 4.50 spelling
            self._last_only = {"num_logits_to_keep": 1}
        else:
            self._last_only = {}
        # Work done by the last score() call: forward passes, tokens fed (cached prefixes counted once),
        # and padding tokens among them.
        self.stats = {"forward_passes": 0, "tokens": 0, "padding": 0}
        # Padded batches need position ids; a model without them still gets the cached prefix, one
        # question per forward pass (no padding, so the positions it derives itself are right).
        self._can_pad = "position_ids" in params

    # -----------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def score(self, seqs: Sequence[Sequence[int]], groups: Optional[Sequence[Hashable]] = None,
              progress=None) -> np.ndarray:
        """Letter logits, float32 [len(seqs), len(letters)], in the order of ``seqs``.

        ``groups`` (e.g. the number of shots of each prompt) limits prefix sharing to prompts of the same
        group; the shared prefix is found on the token ids, so any grouping gives the same numbers.
        ``progress``: anything with ``update(n)`` (a tqdm bar).
        """
        if any(len(s) == 0 for s in seqs):
            raise ValueError("an empty prompt cannot be scored")
        self.stats = {"forward_passes": 0, "tokens": 0, "padding": 0}
        if self.mode == "plain":
            return self._score_plain(seqs, progress)
        return self._score_fast(seqs, [0] * len(seqs) if groups is None else groups, progress)

    def _score_plain(self, seqs, progress) -> np.ndarray:
        out = np.empty((len(seqs), len(self.letter_ids)), dtype=np.float32)
        for i, ids in enumerate(seqs):
            input_ids = torch.tensor([list(ids)], dtype=torch.long, device=self.device)
            logits = self.model(input_ids=input_ids, use_cache=False, **self._last_only).logits[0, -1]
            out[i] = logits[self.letter_ids].float().cpu().numpy()
            self._count(len(ids), 0)
            if progress is not None:
                progress.update(1)
        return out

    def _score_fast(self, seqs, groups, progress) -> np.ndarray:
        out = np.empty((len(seqs), len(self.letter_ids)), dtype=np.float32)
        members = {}
        for i, g in enumerate(groups):
            members.setdefault(g, []).append(i)
        for idx in members.values():
            # Leave at least one token per question: its last position is what gets scored.
            p = min(shared_prefix_length([seqs[i] for i in idx]), min(len(seqs[i]) for i in idx) - 1)
            cache = _PrefixCache(self._run_prefix(seqs[idx[0]][:p])) if p > 0 else None
            for batch in self._batches(sorted(idx, key=lambda i: len(seqs[i]), reverse=True), seqs, p):
                past = cache.for_batch(len(batch)) if cache is not None else None
                out[batch] = self._score_suffixes(past, p, [seqs[i][p:] for i in batch])
                if progress is not None:
                    progress.update(len(batch))
        return out

    def _batches(self, order, seqs, p):
        """Split questions sorted longest first into batches of at most ``batch_size``.

        Longest first, so a batch too big for memory fails at once rather than at the end. A batch also ends
        where the next question is more than 20% (and 8 tokens) shorter than its first one: padding is work
        thrown away, and a few long questions would otherwise pad a whole batch of short ones.
        """
        step = self.batch_size if self._can_pad else 1
        batches = []
        for i in order:
            if batches and len(batches[-1]) < step:
                longest, length = len(seqs[batches[-1][0]]) - p, len(seqs[i]) - p
                if longest - length <= max(0.2 * longest, 8):
                    batches[-1].append(i)
                    continue
            batches.append([i])
        return batches

    def _run_prefix(self, ids):
        input_ids = torch.tensor([list(ids)], dtype=torch.long, device=self.device)
        out = self.model(input_ids=input_ids, use_cache=True, **self._last_only)
        self._count(len(ids), 0)
        if out.past_key_values is None:
            raise RuntimeError("the model returned no key/value cache; run with --engine plain")
        return out.past_key_values

    def _score_suffixes(self, past, p: int, suffixes: List[Sequence[int]]) -> np.ndarray:
        b, s = len(suffixes), max(len(x) for x in suffixes)
        input_ids = torch.full((b, s), self.pad_id, dtype=torch.long)
        real = torch.zeros((b, s), dtype=torch.long)
        for r, x in enumerate(suffixes):
            input_ids[r, s - len(x):] = torch.tensor(list(x), dtype=torch.long)
            real[r, s - len(x):] = 1
        kwargs = dict(input_ids=input_ids.to(self.device), use_cache=True, **self._last_only)
        if past is not None:
            kwargs["past_key_values"] = past
        if self._can_pad:
            kwargs["attention_mask"] = torch.cat([torch.ones((b, p), dtype=torch.long), real], 1).to(self.device)
            # Real tokens continue the prefix at positions p, p+1, ...; padding positions are never seen.
            kwargs["position_ids"] = (p + (real.cumsum(-1) - 1).clamp(min=0)).to(self.device)
        logits = self.model(**kwargs).logits[:, -1]
        self._count(b * s, b * s - sum(len(x) for x in suffixes))
        return logits[:, self.letter_ids].float().cpu().numpy()

    def _count(self, tokens: int, padding: int):
        self.stats["forward_passes"] += 1
        self.stats["tokens"] += tokens
        self.stats["padding"] += padding


class _PrefixCache:
    """The key/value cache of a few-shot prefix, handed out batch by batch.

    The model appends the questions' keys/values to the cache it is given, so a ``Cache`` object
    (transformers' ``DynamicCache``) is cropped back to the prefix before every batch and reused. Its rows all
    hold the same prefix, so a batch of another size takes an expanded view of the first row: the model's own
    concatenation is then the only copy of the prefix per batch. Caches of other layer types go through the
    public ``batch_repeat_interleave``/``batch_select_indices`` (one more copy when the batch size changes).
    Legacy ``((k, v), ...)`` tuples are handed out as expanded views.
    """

    def __init__(self, cache):
        self.length = None
        if isinstance(cache, (tuple, list)):
            # Keys/values may be views into the fused QKV output; keep compact copies.
            self.cache = tuple(tuple(t.contiguous() for t in layer) for layer in cache)
        else:
            self.cache = cache
            self.length = cache.get_seq_length()
        self.rows = 1

    def for_batch(self, batch: int):
        if self.length is None:
            return tuple(tuple(t.expand(batch, *t.shape[1:]) for t in layer) for layer in self.cache)
        self.cache.crop(self.length)  # drop the previous batch's questions
        if batch != self.rows:
            layers = getattr(self.cache, "layers", None)
            if layers and all(type(layer).__name__ == "DynamicLayer" for layer in layers):
                # DynamicLayer only ever concatenates onto its tensors, so views are safe.
                for layer in layers:
                    layer.keys = layer.keys[:1].expand(batch, *layer.keys.shape[1:])
                    layer.values = layer.values[:1].expand(batch, *layer.values.shape[1:])
            elif self.rows == 1:
                self.cache.batch_repeat_interleave(batch)
            else:
                self.cache.batch_select_indices(torch.zeros(batch, dtype=torch.long))
            self.rows = batch
        return self.cache


def shared_prefix_length(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the longest token prefix common to all sequences."""
    first = seqs[0]
    n = min(len(s) for s in seqs)
    for s in seqs[1:]:
        i = 0
        while i < n and s[i] == first[i]:
            i += 1
        n = i
        if n == 0:
            break
    return n


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row softmax over the letter logits, in fp32 as the reference."""
    return torch.softmax(torch.from_numpy(np.asarray(logits, dtype=np.float32)), dim=-1).numpy()


def predict(logits: np.ndarray):
    """(letters, probabilities): argmax of the softmaxed letter logits, the first letter on a tie."""
    probs = softmax(logits)
    return [LETTERS[j] for j in probs.argmax(axis=-1)], probs


# ---------------------------------------------------------------------------------------------------
# Model loading and the flags both scripts share
# ---------------------------------------------------------------------------------------------------

def add_runtime_args(parser: argparse.ArgumentParser):
    g = parser.add_argument_group("model placement and engine")
    g.add_argument("--gpu_idx", type=str, default=None,
                   help="GPUs to use, e.g. '0' or '0,1' (sets CUDA_VISIBLE_DEVICES, as the reference)")
    g.add_argument("--device_map", type=str, default="auto",
                   help="'auto': spread over the visible GPUs (accelerate), CPU when there is none; 'cpu'; "
                        "or any from_pretrained device_map such as 'cuda:0' or 'balanced'")
    g.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default="auto",
                   help="weights dtype; auto = bfloat16 on GPU, float32 on CPU")
    g.add_argument("--batch_size", type=int, default=16,
                   help="questions per forward pass in the fast engine (lower it if memory runs out)")
    g.add_argument("--max_length", type=int, default=2048,
                   help="shots are dropped one at a time (the one nearest the question first) while the prompt "
                        "is longer than this many tokens or than the model's max_position_embeddings, whichever "
                        "is smaller; a question that does not fit alone is an error")
    g.add_argument("--engine", choices=["fast", "plain"], default="fast",
                   help="fast: cached few-shot prefix + batches; plain: the reference's one-question-at-a-"
                        "time full-prompt forward (same predictions, much slower)")
    g.add_argument("--subjects", type=str, default=None,
                   help="comma-separated subset of subjects (default: all)")
    g.add_argument("--max_questions", type=int, default=None,
                   help="score only the first N questions of each subject (smoke tests)")
    add_trust_remote_code_arg(g)
    return parser


def select_gpus(gpu_idx: Optional[str] = None, ngpu: Optional[int] = None):
    """Restrict the visible GPUs before CUDA starts, as the reference's ``--gpu_idx`` did."""
    if gpu_idx is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu_idx
    elif ngpu is not None and "CUDA_VISIBLE_DEVICES" not in os.environ:
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(ngpu))


def load_model_and_tokenizer(path: str, device_map: str = "auto", dtype: str = "auto",
                             trust_remote_code: bool = False):
    """Any Hugging Face causal-LM folder, with the reference's tokenizer settings.

    A ``model_type: baichuan`` folder (the released baichuan-7B, or one this project exported) is built with this
    project's classes, so the Python files in the folder never run. Other folders whose config asks for their own
    code are refused unless ``trust_remote_code`` (--trust_remote_code) is set. With it, a baichuan folder's own
    code runs; where that code fails (the released tokenizer touches ``sp_model`` before creating it with current
    transformers, transformers#27171; its model code imports xformers) this project's classes are used instead,
    with a printed note.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from models import register_auto_classes

    if os.path.sep in path and not os.path.isdir(path):
        raise FileNotFoundError(f"model folder not found: {path}")
    register_auto_classes()
    on_gpu = torch.cuda.is_available() and device_map != "cpu"
    if dtype == "auto":
        torch_dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if on_gpu \
            else torch.float32
    else:
        torch_dtype = getattr(torch, dtype)
    kwargs = dict(dtype=torch_dtype)
    if on_gpu:
        kwargs["device_map"] = device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
    except Exception as e:  # noqa: BLE001 - any failure of the folder's own code; re-raised unless baichuan
        refuse_remote_code(path, e, trust_remote_code)
        if not (trust_remote_code and _is_baichuan_folder(path)):
            raise
        print(f"note: {path}: its model code failed ({type(e).__name__}: {str(e)[:200]}); "
              "loading it with this project's BaiChuanForCausalLM")
        from models.modeling_baichuan import BaiChuanForCausalLM
        model = BaiChuanForCausalLM.from_pretrained(path, **kwargs)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, use_fast=False, trust_remote_code=trust_remote_code,
                                                  add_bos_token=False, add_eos_token=False)
    except Exception as e:  # noqa: BLE001
        refuse_remote_code(path, e, trust_remote_code)
        vocab = os.path.join(path, "tokenizer.model")
        if not (_is_baichuan_folder(path) and os.path.isfile(vocab)):
            raise
        print(f"note: {path}: its tokenizer code failed ({type(e).__name__}: {str(e)[:200]}); "
              "loading tokenizer.model with this project's BaiChuanTokenizer")
        from models.tokenization_baichuan import BaiChuanTokenizer
        tokenizer = BaiChuanTokenizer(vocab_file=vocab, add_bos_token=False, add_eos_token=False)
    return model.eval(), tokenizer


def prompt_limit(model, max_length: int) -> int:
    """The most tokens a prompt may have: ``--max_length``, and never more than the model's context."""
    if max_length < 1:
        raise ValueError(f"--max_length must be >= 1, got {max_length}")
    context = getattr(model.config, "max_position_embeddings", None)
    if context is not None and context < max_length:
        print(f"note: prompts are limited to the model's max_position_embeddings {context}, below "
              f"--max_length {max_length}")
        return int(context)
    return max_length


def refuse_remote_code(path, error: BaseException, trust_remote_code: bool) -> None:
    """Re-raise transformers' refusal to run a folder's own code as an error that names the flag."""
    if not trust_remote_code and "trust_remote_code" in str(error):
        raise ValueError(f"{path} needs its own Python code to load (its config's auto_map), which is not run by "
                         "default: pass --trust_remote_code only if you trust that folder") from error


def add_trust_remote_code_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trust_remote_code", action="store_true",
                        help="run the Python files of a model folder that needs them (default: off; baichuan "
                             "folders load with this project's classes without it)")


def _is_baichuan_folder(path: str) -> bool:
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            return json.load(f).get("model_type") == "baichuan"
    except (OSError, ValueError):
        return False


def model_name(path: str) -> str:
    """The last component of a model folder or hub id, for output names."""
    return os.path.basename(os.path.normpath(path)) or path


def parse_subjects(text: Optional[str]) -> Optional[List[str]]:
    return [s.strip() for s in text.split(",") if s.strip()] if text else None
