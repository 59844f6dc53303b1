"""The steps of benchmarks/gpu_check.py. Each runs in its own process (forked from a server that has imported
torch, transformers and the model once) and returns its checks and figures; the runner records them.

Tolerances in bf16. A bf16 path is compared with the fp32 computation on the same weights and inputs, and must be
no further from it than twice the distance of the plain eager bf16 computation, plus one bf16 rounding of the
largest reference value (2**-8 of it): the rule of flash-attn's own tests ("FlashAttention's numerical error is
at most twice the numerical error of a Pytorch implementation", tests/test_flash_attn.py). A fixed tolerance
would be either too loose to catch a wrong kernel or too tight for bf16; this one scales with what bf16 can do
at the shapes at hand. fp32 paths are compared directly (they differ by summation order only).
"""
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

# Imported here, not in the steps, so the fork server pays for them once.
import transformers  # noqa: F401
from common import free_port, pick_device_and_dtype, write_atomic
from evaluation.data import LETTERS, Question
from evaluation.engine import FewShotEngine, load_model_and_tokenizer, predict
from evaluation.prompts import PromptStyle, fit_prompt
from models.configuration_baichuan import BaiChuanConfig
from models.kernels import linear_cross_entropy
from models.modeling_baichuan import (ATTENTION_FUNCTIONS, BaiChuanForCausalLM, RMSNorm, flash_attn_func,
                                      fused_rms_norm_affine, select_attention)
from models.tokenization_baichuan import BaiChuanTokenizer

ROOT = Path(__file__).resolve().parents[1]
BF16_FLOOR = 2 ** -8  # one bf16 rounding, relative to the largest value
FP32_RTOL = 1e-4  # fp32 paths that differ in summation order only


class Skip(Exception):
    """The step cannot run here (no GPU, a package missing); the message says why."""


@dataclass
class Context:
    device: str  # "cuda" or "cpu"
    workdir: Path  # this step's scratch folder
    deadline: float  # time.time() by which the step must be done (the runner kills it then)
    log: Path  # this step's log, where its subprocesses write too
    smoke: bool = False  # a GPU step on CPU with tiny shapes: checks the script, measures nothing
    checks: list = field(default_factory=list)
    data: dict = field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    def check(self, name: str, ok: bool, **detail):
        self.checks.append({"name": name, "passed": bool(ok), **{k: _plain(v) for k, v in detail.items()}})
        return ok

    def left(self) -> float:
        return max(1.0, self.deadline - time.time())


def _plain(value):
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max |x - ref| / max |ref|, in fp32."""
    ref = ref.float()
    return ((x.float() - ref).abs().max() / ref.abs().max().clamp(min=1e-30)).item()


def bf16_rule(c: Context, name: str, err: float, baseline: float) -> bool:
    tol = 2 * baseline + BF16_FLOOR
    return c.check(name, err <= tol, error=err, tolerance=tol, eager_bf16_error=baseline)


# ------------------------------------------------------------------------------------------------------------
# Step 1: environment
# ------------------------------------------------------------------------------------------------------------

PACKAGES = ("torch", "transformers", "deepspeed", "accelerate", "huggingface_hub", "tokenizers", "safetensors",
            "sentencepiece", "numpy", "triton", "flash_attn", "apex", "protobuf", "pydantic")


def _command_output(cmd):
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        return (out.stdout or out.stderr).strip() or None
    except (OSError, subprocess.SubprocessError) as e:
        return f"unavailable ({type(e).__name__})"


def _requirements() -> dict:
    pins = {}
    for line in (ROOT / "requirements.txt").read_text(encoding="utf-8").splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[name.strip().lower().replace("-", "_")] = version.strip()
    return pins


def env(c: Context):
    from importlib import metadata

    versions = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            try:
                versions[name] = metadata.version(name)
            except metadata.PackageNotFoundError:
                versions[name] = None
    c.data["versions"] = versions
    c.data["transformers_path"] = str(Path(transformers.__file__).parent)
    c.data["torch_cuda"] = torch.version.cuda
    c.data["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    c.data["nvidia_smi"] = _command_output(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                            "--format=csv,noheader"])
    c.data["nvcc"] = (_command_output(["nvcc", "--version"]) or "").splitlines()[-1:] or None
    c.data["ninja"] = _command_output(["ninja", "--version"])
    c.data["flash_attn_importable"] = flash_attn_func is not None
    c.data["apex_rmsnorm_importable"] = fused_rms_norm_affine is not None
    c.data["cuda_available"] = torch.cuda.is_available()
    if c.data["cuda_available"]:
        try:  # the first CUDA use in this process: fails here if the fork server had started CUDA
            props = torch.cuda.get_device_properties(0)
            a = torch.randn(1024, 1024, device="cuda", dtype=torch.bfloat16)
            c.data["matmul_ok"] = bool(torch.isfinite(a @ a).all())
            c.data.update(gpu=props.name, capability=f"{props.major}.{props.minor}",
                          memory_gib=round(props.total_memory / 2 ** 30, 1),
                          multiprocessors=props.multi_processor_count, bf16=torch.cuda.is_bf16_supported())
            q = torch.zeros(1, 1, 2, 64, device="cuda", dtype=torch.bfloat16)
            c.data["attention_auto_choice"] = select_attention("auto", q, None)
        except Exception as e:  # noqa: BLE001 - recorded; the runner retries with fresh interpreters
            c.data["cuda_error"] = f"{type(e).__name__}: {e}"
        c.check("CUDA usable in a step process", "cuda_error" not in c.data, error=c.data.get("cuda_error"))
    pins = _requirements()
    for name in ("transformers", "deepspeed"):
        c.check(f"{name} at the version of requirements.txt", versions.get(name) == pins.get(name),
                found=versions.get(name), pinned=pins.get(name))
    c.data["deepspeed_ops"] = _deepspeed_ops()


def _deepspeed_ops():
    """Which DeepSpeed ops can be built here (ds_report's 'compatible' column); nothing is built."""
    try:
        from deepspeed.ops.op_builder.all_ops import ALL_OPS
    except Exception as e:  # noqa: BLE001
        return f"unavailable: {type(e).__name__}: {e}"
    ops = {}
    for name, builder in sorted(ALL_OPS.items()):
        try:
            ops[name] = bool(builder.is_compatible(verbose=False))
        except Exception as e:  # noqa: BLE001
            ops[name] = f"error: {type(e).__name__}: {e}"
    return ops


# ------------------------------------------------------------------------------------------------------------
# Step 2: correctness
# ------------------------------------------------------------------------------------------------------------

def small_config(c: Context, **overrides) -> BaiChuanConfig:
    """Head size 128 as at 7B, so the kernels run the tile sizes training uses."""
    fields = (dict(vocab_size=4096, hidden_size=1024, intermediate_size=2816, num_attention_heads=8)
              if c.cuda else dict(vocab_size=512, hidden_size=256, intermediate_size=688, num_attention_heads=2))
    fields.update(num_hidden_layers=2, max_position_embeddings=4096)
    fields.update(overrides)
    return BaiChuanConfig(**fields)


def make_model(config, seed=0):
    torch.manual_seed(seed)
    model = BaiChuanForCausalLM(config)
    model.loss_chunk_size = 0  # forward_backward compares the logits, which a chunked loss does not return
    model.set_norm_backend("torch")
    with torch.no_grad():  # non-trivial norm weights, so a skipped or misapplied norm cannot hide behind ones
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def forward_backward(model, ids, attention_mask=None):
    """Logits [b, s, V] and parameter gradients of the loss, the model left unchanged."""
    model.zero_grad(set_to_none=True)
    out = model(ids, attention_mask=attention_mask, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out.logits.detach(), grads


def grads_rule(c: Context, name: str, grads, ref, eager):
    """The bf16 rule on every gradient tensor; one check naming the worst tensor."""
    worst = None
    for n in ref:
        err, base = rel_err(grads[n], ref[n]), rel_err(eager[n], ref[n])
        ratio = err / (2 * base + BF16_FLOOR)
        if worst is None or ratio > worst[0]:
            worst = (ratio, n, err, base)
    ratio, n, err, base = worst
    return c.check(name, ratio <= 1, worst_tensor=n, error=err, tolerance=2 * base + BF16_FLOOR,
                   eager_bf16_error=base)


def attention_kernels(c: Context, backends):
    """Each attention function alone, bf16 against fp32 eager on the same values: a whole model's bf16 error
    would hide a kernel a few percent off; one attention's error is a bf16 rounding or two."""
    b, n, s, d = (2, 8, 512, 128) if c.cuda else (1, 2, 64, 128)
    torch.manual_seed(3)
    q, k, v = (torch.randn(b, n, s, d, device=c.device).bfloat16() for _ in range(3))
    g = torch.randn(b, n, s, d, device=c.device).bfloat16()

    def run(fn, dtype, tail=None):
        qq, kk, vv = (t.to(dtype, copy=True).requires_grad_() for t in (q, k, v))
        if tail:  # the last `tail` queries after a cache of the others: bottom-right causal alignment
            with torch.no_grad():
                return fn(qq[:, :, -tail:], kk, vv, None)
        out = fn(qq, kk, vv, None)
        out.backward(g.to(dtype))
        return [out.detach(), qq.grad, kk.grad, vv.grad]

    eager = ATTENTION_FUNCTIONS["eager"]
    ref, base = run(eager, torch.float32), run(eager, torch.bfloat16)
    ref_tail, base_tail = run(eager, torch.float32, 7), run(eager, torch.bfloat16, 7)
    for backend in backends:
        got = run(ATTENTION_FUNCTIONS[backend], torch.bfloat16)
        for i, what in enumerate(("output", "dq", "dk", "dv")):
            bf16_rule(c, f"bf16 {backend} kernel {what}", rel_err(got[i], ref[i]), rel_err(base[i], ref[i]))
        tail = run(ATTENTION_FUNCTIONS[backend], torch.bfloat16, 7)
        bf16_rule(c, f"bf16 {backend} kernel, 7 queries after a cache", rel_err(tail, ref_tail),
                  rel_err(base_tail, ref_tail))


def attention_parity(c: Context):
    """SDPA and flash-attn 2 (where importable) against eager: logits and gradients, unpadded and padded."""
    b, s = (2, 1024) if c.cuda else (2, 128)
    config = small_config(c)  # make_model: torch RMSNorm; apex's, where importable, is checked on its own below
    ref_model = make_model(config).to(c.device)
    torch.manual_seed(1)
    ids = torch.randint(3, config.vocab_size, (b, s), device=c.device)
    pad = torch.ones(b, s, dtype=torch.long, device=c.device)
    pad[1, : s // 4] = 0  # a left-padded row: the masked path (SDPA with a mask; flash-attn cannot take it)

    backends = ["eager", "sdpa"] + (["flash_attention_2"] if flash_attn_func is not None and c.cuda else [])
    c.data["backends"] = backends
    if c.cuda:
        q = torch.zeros(1, 1, 2, 128, device=c.device, dtype=torch.bfloat16)
        chosen = select_attention("auto", q, None)
        c.check("'auto' picks flash-attn 2 when importable, else SDPA", chosen == (
            "flash_attention_2" if flash_attn_func is not None else "sdpa"), chosen=chosen)

    attention_kernels(c, backends[1:])

    ref_model.config._attn_implementation = "eager"
    ref_logits, ref_grads = forward_backward(ref_model, ids)
    ref_model.config._attn_implementation = "sdpa"
    logits, grads = forward_backward(ref_model, ids)
    c.check("fp32 SDPA logits = eager", rel_err(logits, ref_logits) <= FP32_RTOL, error=rel_err(logits, ref_logits),
            tolerance=FP32_RTOL)
    worst = max(rel_err(grads[n], ref_grads[n]) for n in ref_grads)
    c.check("fp32 SDPA gradients = eager", worst <= FP32_RTOL, error=worst, tolerance=FP32_RTOL)

    # bf16: every backend against the fp32 eager reference, held to the eager bf16 error (module docstring)
    bf16 = make_model(config).to(device=c.device, dtype=torch.bfloat16)
    results = {}
    for backend in backends:
        bf16.config._attn_implementation = backend
        results[backend] = forward_backward(bf16, ids)
    eager_logits, eager_grads = results["eager"]
    c.data["bf16_eager_logits_error"] = rel_err(eager_logits, ref_logits)
    for backend in backends[1:]:
        bf16_rule(c, f"bf16 {backend} logits", rel_err(results[backend][0], ref_logits),
                  rel_err(eager_logits, ref_logits))
        grads_rule(c, f"bf16 {backend} gradients", results[backend][1], ref_grads, eager_grads)

    # A padded batch, compared on real tokens only (padding positions predict nothing).
    ref_model.config._attn_implementation = "eager"
    real = s // 4  # row 1's first real position; row 0 is unpadded and was checked above
    with torch.no_grad():
        ref_padded = ref_model(ids, attention_mask=pad).logits[1, real:]  # [real tokens of row 1, V]
        outs = {}
        for backend in backends:
            bf16.config._attn_implementation = backend
            outs[backend] = bf16(ids, attention_mask=pad).logits[1, real:]
    base = rel_err(outs["eager"], ref_padded)
    for backend in backends[1:]:
        bf16_rule(c, f"bf16 {backend} padded-batch logits", rel_err(outs[backend], ref_padded), base)

    if fused_rms_norm_affine is not None and c.cuda:
        bf16.config._attn_implementation = "eager"
        for module in bf16.modules():
            if isinstance(module, RMSNorm):
                module.backend = "apex"
        apex_logits, apex_grads = forward_backward(bf16, ids)
        bf16_rule(c, "bf16 apex RMSNorm logits", rel_err(apex_logits, ref_logits), rel_err(eager_logits, ref_logits))
        grads_rule(c, "bf16 apex RMSNorm gradients", apex_grads, ref_grads, eager_grads)
    else:
        c.data["apex_rmsnorm"] = "not checked: apex is not importable" if c.cuda else "not checked: CUDA only"


def fused_loss(c: Context):
    """models/kernels.py's chunked linear + cross-entropy against the plain computation, and its memory."""
    n, h, v, chunk = (4096, 1024, 64000, 1024) if c.cuda else (512, 128, 8000, 128)
    torch.manual_seed(0)
    hidden = torch.randn(n, h, device=c.device)
    weight = torch.randn(v, h, device=c.device) / math.sqrt(h) * 4  # logits of a few units, as in training
    labels = torch.randint(0, v, (n,), device=c.device)
    labels[::7] = -100

    def plain(hd, w):
        return F.cross_entropy(F.linear(hd, w).float(), labels, ignore_index=-100, reduction="sum")

    def loss_and_grads(fn, dtype):
        hd = hidden.to(dtype, copy=True).requires_grad_()
        w = weight.to(dtype, copy=True).requires_grad_()
        loss = fn(hd, w)
        (loss / 3.0).backward()  # a non-unit upstream gradient, as the model's mean gives
        return loss.detach(), hd.grad, w.grad

    fused = lambda hd, w: linear_cross_entropy(hd, w, labels, chunk)  # noqa: E731
    ref = loss_and_grads(plain, torch.float32)
    got = loss_and_grads(fused, torch.float32)
    for name, a, b in zip(("loss", "hidden gradient", "weight gradient"), got, ref):
        err = rel_err(a, b)
        c.check(f"fp32 fused {name} = plain", err <= FP32_RTOL, error=err, tolerance=FP32_RTOL)

    # bf16: inputs rounded to bf16 once; the fp32 computation on those same values is the reference.
    h16, w16 = hidden.bfloat16(), weight.bfloat16()
    hidden, weight = h16.float(), w16.float()
    ref = loss_and_grads(plain, torch.float32)
    plain16 = loss_and_grads(plain, torch.bfloat16)
    fused16 = loss_and_grads(fused, torch.bfloat16)
    for i, name in enumerate(("loss", "hidden gradient", "weight gradient")):
        bf16_rule(c, f"bf16 fused {name}", rel_err(fused16[i], ref[i]), rel_err(plain16[i], ref[i]))

    if c.cuda:  # the point of the kernel: the [tokens, vocab] logits never exist whole
        peaks = {}
        for name, fn in (("plain", plain), ("fused", fused)):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            loss_and_grads(fn, torch.bfloat16)
            torch.cuda.synchronize()
            peaks[name] = (torch.cuda.max_memory_allocated() - before) / 2 ** 30
        c.data["peak_extra_gib"] = peaks
        c.check("bf16 fused loss peak memory under half the plain one", peaks["fused"] < peaks["plain"] / 2,
                fused_gib=peaks["fused"], plain_gib=peaks["plain"], tokens=n, vocab=v, chunk=chunk)


def kv_cache_generation(c: Context):
    """Cached generation against uncached, on the device; decode steps against the full forward in bf16;
    scripts/generate.py's device and dtype choice."""
    config = small_config(c)
    model = make_model(config).to(c.device).eval()
    torch.manual_seed(2)
    prompt = torch.randint(3, config.vocab_size, (1, 9), device=c.device)
    kw = dict(max_new_tokens=24, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        for backend in ("sdpa", "eager"):
            model.config._attn_implementation = backend
            cached = model.generate(prompt, use_cache=True, **kw)
            uncached = model.generate(prompt, use_cache=False, **kw)
            c.check(f"fp32 {backend}: greedy generation with the cache = without", torch.equal(cached, uncached),
                    new_tokens=kw["max_new_tokens"])
        # a left-padded batch (masked attention with a cache) gives each prompt's own continuation
        model.config._attn_implementation = "auto"
        prompts = [torch.randint(3, config.vocab_size, (n,), device=c.device) for n in (11, 5, 8)]
        width = max(len(p) for p in prompts)
        ids = torch.zeros(len(prompts), width, dtype=torch.long, device=c.device)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
        batched = model.generate(ids, attention_mask=mask, use_cache=True, **kw)
        same = all(torch.equal(batched[i, width:], model.generate(p[None], use_cache=True, **kw)[0, len(p):])
                   for i, p in enumerate(prompts))
        c.check("fp32: left-padded batch generation = each prompt alone", same)

        # bf16 with the default kernels (flash-attn 2 where importable): one-token and 8-token decode steps after
        # a cache, against the fp32 full forward; held to the bf16 full forward's error.
        seq = torch.randint(3, config.vocab_size, (2, 64), device=c.device)
        ref = model(seq).logits
        bf16 = make_model(config).to(device=c.device, dtype=torch.bfloat16).eval()
        bf16.config._attn_implementation = "auto"
        full = bf16(seq).logits
        for block in (1, 8):
            out = bf16(seq[:, :40], use_cache=True)
            past, pieces = out.past_key_values, [out.logits]
            for start in range(40, 64, block):
                step = bf16(seq[:, start:start + block], past_key_values=past, use_cache=True)
                past = step.past_key_values
                pieces.append(step.logits)
            decoded = torch.cat(pieces[1:], dim=1)  # [2, 24, V]: positions 40-63, each after a cache
            bf16_rule(c, f"bf16 auto: {block}-token decode steps after a cache = full forward",
                      rel_err(decoded, ref[:, 40:]), rel_err(full[:, 40:], ref[:, 40:]))

    import scripts.generate as generate_script  # a script: imported for its main(), run in this process

    device, dtype = pick_device_and_dtype("auto", "auto")
    want = ("cuda", torch.bfloat16) if c.cuda else ("cpu", torch.float32)
    c.check("the default device and dtype of generate.py", (device, dtype) == want, device=device,
            dtype=str(dtype))
    out = c.workdir / "generated.jsonl"
    generate_script.main(["--model", str(tiny_model_folder(c.workdir)), "--prompt", "The capital of",
                          "--max_new_tokens", "8", "--no_stream", "--output", str(out)])
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    c.check("scripts/generate.py generates on the default device", len(records) == 1 and records[0]["completion"],
            completion=records[0]["completion"] if records else None)


def tiny_model_folder(workdir: Path) -> Path:
    """A random tiny-preset model folder as this project exports it (config, weights, code, tokenizer), made
    once per run and shared by the steps that load one."""
    path = workdir.parent / "tiny-model"
    if not (path / "config.json").is_file():
        tmp = workdir / "tiny-model.tmp"
        torch.manual_seed(0)
        BaiChuanForCausalLM(BaiChuanConfig.from_name("tiny")).save_pretrained(tmp)
        BaiChuanTokenizer(vocab_file=str(ROOT / "tokenizer.model")).save_pretrained(tmp)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    return path


def generated_subject(language: str, count: int, seed: int):
    """Addition questions with four options: a benchmark's shape, no benchmark file needed."""
    rng = random.Random(seed)
    questions = []
    for i in range(count):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        options = [a + b, a + b + 1, a + b - 10, a + b + 10]
        rng.shuffle(options)
        text = f"What is {a} + {b}?" if language == "en" else f"{a} 加 {b} 等于多少？"
        questions.append(Question(id=str(i), question=text, options=[str(o) for o in options],
                                  answer=LETTERS[options.index(a + b)], where=f"generated item {i}"))
    return questions[:5], questions[5:]  # five shots, the rest to score


def evaluation_engine(c: Context):
    """The fast few-shot engine (cached prefix, padded batches) against the plain one-question-at-a-time path,
    with the model loaded as the evaluation scripts load it (device_map, dtype auto)."""
    folder = tiny_model_folder(c.workdir)
    fp32, tokenizer = load_model_and_tokenizer(str(folder), device_map="cuda:0" if c.cuda else "cpu",
                                               dtype="float32")
    requests = []
    for language, name in (("en", "elementary_mathematics"), ("zh", "小学数学")):
        dev, test = generated_subject(language, 17, seed=len(requests))
        requests += [fit_prompt(PromptStyle(language, name), dev, q, tokenizer, 2048) for q in test]
    seqs, groups = [r.ids for r in requests], [r.shots for r in requests]
    c.data["questions"] = len(seqs)

    def scores(model, mode):
        return torch.from_numpy(FewShotEngine(model, tokenizer, batch_size=4, mode=mode).score(seqs, groups))

    ref, fast = scores(fp32, "plain"), scores(fp32, "fast")
    err = rel_err(fast, ref)
    c.check("fp32 fast-engine letter logits = plain", err <= FP32_RTOL, error=err, tolerance=FP32_RTOL)
    same = predict(fast.numpy())[0] == predict(ref.numpy())[0]
    c.check("fp32 fast-engine predictions = plain", same, questions=len(seqs))
    del fp32

    # bf16, loaded as evaluate_mmlu.py / evaluate_zh.py do on a GPU (device_map auto, dtype auto = bf16)
    if c.cuda:
        bf16, _ = load_model_and_tokenizer(str(folder))
        c.check("the evaluation loader puts the model on the GPU in bf16",
                bf16.lm_head.weight.is_cuda and bf16.dtype == torch.bfloat16, dtype=str(bf16.dtype))
    else:
        bf16, _ = load_model_and_tokenizer(str(folder), device_map="cpu", dtype="bfloat16")
    plain16, fast16 = scores(bf16, "plain"), scores(bf16, "fast")
    bf16_rule(c, "bf16 fast-engine letter logits", rel_err(fast16, ref), rel_err(plain16, ref))
    agree = sum(a == b for a, b in zip(predict(fast16.numpy())[0], predict(plain16.numpy())[0]))
    c.data["bf16_prediction_agreement"] = f"{agree}/{len(seqs)}"  # a near-tie may go either way in bf16


def document_mask(c: Context):
    """Packed documents (train.py --document_mask): a packed row's logits equal each document's run alone, for
    every attention kernel (flash-attn's variable-length one where importable)."""
    import inspect

    if "document_ids" not in inspect.signature(BaiChuanForCausalLM.forward).parameters:
        raise Skip("the model takes no document_ids on this branch (train.py --document_mask)")
    config = small_config(c)
    lengths = [[300, 500, 224], [1024]] if c.cuda else [[40, 60, 28], [128]]  # documents of each row
    torch.manual_seed(4)
    ids = torch.randint(3, config.vocab_size, (len(lengths), sum(lengths[0])), device=c.device)  # [b, s]
    doc = torch.stack([torch.cat([torch.full((n,), i) for i, n in enumerate(row)]) for row in lengths])  # [b, s]
    pos = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths])  # [b, s], 0 at each start
    doc, pos = doc.to(c.device), pos.to(c.device)

    def alone(model):
        """Each document through the model by itself, laid back in place: [b, s, V]."""
        rows = []
        for r, row in enumerate(lengths):
            starts = [sum(row[:i]) for i in range(len(row))]
            rows.append(torch.cat([model(ids[r:r + 1, a:a + n]).logits[0] for a, n in zip(starts, row)]))
        return torch.stack(rows)

    backends = ["eager", "sdpa"] + (["flash_attention_2"] if flash_attn_func is not None and c.cuda else [])
    fp32 = make_model(config).to(c.device).eval()
    bf16 = make_model(config).to(device=c.device, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        fp32.config._attn_implementation = bf16.config._attn_implementation = "eager"
        ref, base = alone(fp32), alone(bf16)
        for backend in backends[:2]:
            fp32.config._attn_implementation = backend
            err = rel_err(fp32(ids, position_ids=pos, document_ids=doc).logits, ref)
            c.check(f"fp32 {backend}: packed documents = each alone", err <= FP32_RTOL, error=err,
                    tolerance=FP32_RTOL)
        for backend in backends:
            bf16.config._attn_implementation = backend
            bf16_rule(c, f"bf16 {backend}: packed documents = each alone",
                      rel_err(bf16(ids, position_ids=pos, document_ids=doc).logits, ref), rel_err(base, ref))


# ------------------------------------------------------------------------------------------------------------
# Step 2 (end): DeepSpeed through the real launcher
# ------------------------------------------------------------------------------------------------------------

def losses(save: Path) -> dict:
    records = [json.loads(line) for line in (save / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    return {r["step"]: r for r in records}


def deepspeed_train(c: Context):
    """train.py for 20 steps on one GPU (ZeRO-2, bf16, NCCL) through the deepspeed launcher, then again from its
    step-10 checkpoint: the loss falls, and the resumed steps' losses equal the uninterrupted ones exactly.

    Eager attention: its backward is deterministic on CUDA (flash/SDPA backward accumulate with atomics), so a
    correct resume reproduces every loss bit for bit and any difference is a resume bug, not noise.
    """
    import deepspeed  # noqa: F401 - fail here, clearly, where it is not installed

    micro, seq = (8, 256) if c.cuda else (2, 64)
    ds = json.loads((ROOT / "config" / "deepspeed_tiny.json").read_text(encoding="utf-8"))
    ds.update(train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=1, steps_per_print=1)
    ds["bf16"] = {"enabled": c.cuda}
    ds["optimizer"]["params"]["torch_adam"] = True  # torch's AdamW: no CUDA op to compile
    ds["scheduler"]["params"].update(warmup_num_steps=4, total_num_steps=20)
    ds["zero_optimization"] = {"stage": 2, "overlap_comm": False, "contiguous_gradients": True}
    ds["tensorboard"] = {"enabled": False}
    config = c.workdir / "ds_config.json"
    config.write_text(json.dumps(ds, indent=2), encoding="utf-8")
    save = c.workdir / "checkpoints"

    def train(*extra):
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port",
               str(free_port()), str(ROOT / "train.py"), "--deepspeed", "--deepspeed_config", str(config),
               "--model_config", "tiny", "--data_dir", str(ROOT / "data_dir"), "--tokenizer_path",
               str(ROOT / "tokenizer.model"), "--max_length", str(seq), "--checkpoint_saving_path", str(save),
               "--cache_dir", str(c.workdir / "token-cache"), "--num_workers", "2", "--max_steps", "20",
               "--steps_per_epoch", "10", "--attention_backend", "eager", *extra]
        start, offset = time.time(), c.log.stat().st_size
        # NCCL_DEBUG=INFO: NCCL names itself in the log when train.py's first collective starts it
        env = dict(os.environ, NCCL_DEBUG="INFO") if c.cuda else None
        proc = subprocess.run(cmd, cwd=ROOT, env=env, timeout=c.left())  # output to the step's log as it comes
        log = c.log.read_text(encoding="utf-8", errors="replace")[offset:]
        if proc.returncode:
            raise RuntimeError(f"train.py exited with {proc.returncode}:\n{log[-3000:]}")
        return log, time.time() - start

    log, seconds = train("--resume", "none")
    full = losses(save)
    c.data["uninterrupted_seconds"] = seconds
    c.data["losses"] = {s: r["loss"] for s, r in full.items()}
    first, last = (sum(full[s]["loss"] for s in steps) / 4 for steps in (range(1, 5), range(17, 21)))
    c.check("20 steps logged", sorted(full) == list(range(1, 21)), steps=sorted(full))
    c.check("the loss falls (mean of steps 17-20 < mean of steps 1-4 - 1)", last < first - 1, first=first,
            last=last)
    if c.cuda:
        c.check("the collectives run on NCCL", "NCCL INFO" in log)
        c.check("MFU is logged (the device's peak is known)", full[20].get("mfu") is not None,
                mfu=full[20].get("mfu"), tflops=full[20].get("tflops"))

    log, seconds = train("--resume", "step10")
    resumed = losses(save)
    c.data["resume_seconds"] = seconds
    c.check("the second run resumed from step10", "resumed from" in log and "step10" in log)
    diffs = {s: abs(resumed[s]["loss"] - full[s]["loss"]) for s in range(11, 21) if s in resumed}
    c.check("resumed losses (steps 11-20) = uninterrupted, exactly",
            len(diffs) == 10 and all(d == 0 for d in diffs.values()),
            max_abs_diff=max(diffs.values(), default=None), steps=sorted(diffs))


# ------------------------------------------------------------------------------------------------------------
# Step 3: throughput against Llama
# ------------------------------------------------------------------------------------------------------------

TARGETS = {"mfu": 0.5, "speed_vs_llama": 1.2, "mem_vs_llama": 1.0}  # the throughput issue's targets


def benchmark_script() -> Path:
    for path in (ROOT / "benchmarks" / "benchmark_train.py", ROOT / "scripts" / "benchmark_train.py"):
        if path.is_file():
            return path
    raise FileNotFoundError("benchmark_train.py is neither in benchmarks/ nor in scripts/")


def run_benchmark(c: Context, models, out: Path):
    if c.cuda:
        # accumulation over 4 micro-batches, as config/deepspeed.json: the optimizer step is paid once per 4
        shape = ["--preset", "7b", "--num_layers", "4", "--seq_len", "4096", "--micro_batch", "1", "--grad_accum",
                 "4", "--loss_chunk_size", "1024", "--warmup", "3", "--steps", "10"]
    else:
        shape = ["--preset", "tiny", "--vocab_size", "512", "--seq_len", "64", "--warmup", "1", "--steps", "2"]
    cmd = [sys.executable, str(benchmark_script()), *shape, "--models", *models, "--json", str(out)]
    c.data["command"] = " ".join(cmd[1:]).replace(str(ROOT) + "/", "")
    offset = c.log.stat().st_size
    proc = subprocess.run(cmd, cwd=ROOT, timeout=c.left())  # its output goes to the step's log as it comes
    log = c.log.read_text(encoding="utf-8", errors="replace")[offset:]
    if proc.returncode:
        raise RuntimeError(f"benchmark_train.py exited with {proc.returncode}:\n{log[-3000:]}")
    result = json.loads(out.read_text(encoding="utf-8"))
    c.data["benchmark"] = result
    c.data["table"] = [line for line in log.splitlines() if line.startswith("|")]
    return result


def check_targets(c: Context, row: dict, llama: dict):
    """The throughput issue's targets for one of our rows, against a Llama row (None: not measured)."""
    speed = row["tokens_per_sec"] / llama["tokens_per_sec"] if llama else None
    mem = row["peak_mem_gib"] / llama["peak_mem_gib"] if llama else None
    c.data.setdefault("ratios", {})[row["variant"]] = {"speed_vs_llama": speed, "mem_vs_llama": mem,
                                                       "mfu": row["mfu"]}
    if c.smoke:
        return  # CPU shapes measure nothing
    name = row["variant"]
    c.check(f"{name}: MFU >= {TARGETS['mfu']:.0%}", row["mfu"] is not None and row["mfu"] >= TARGETS["mfu"],
            mfu=row["mfu"])
    c.check(f"{name}: >= {TARGETS['speed_vs_llama']}x Llama's tokens/s", speed is not None
            and speed >= TARGETS["speed_vs_llama"], speed_vs_llama=speed, llama=llama and llama["variant"])
    c.check(f"{name}: peak memory <= Llama's", mem is not None and mem <= TARGETS["mem_vs_llama"],
            mem_vs_llama=mem)


def throughput(c: Context):
    """benchmark_train.py, eager kernels: ours against Llama (SDPA; and flash-attn 2 where importable)."""
    models = ["ours", "llama"] + (["llama_sdpa"] if flash_attn_func is not None and c.cuda else [])
    result = run_benchmark(c, models, c.workdir.parent / "throughput.json")
    rows = result["rows"]
    llamas = [r for r in rows if r["variant"].startswith("llama")]
    fastest = max(llamas, key=lambda r: r["tokens_per_sec"])  # the strongest baseline
    for row in rows:
        if row["variant"].startswith("ours"):
            check_targets(c, row, fastest)


def throughput_compiled(c: Context):
    """benchmark_train.py with torch.compile on every decoder layer (ours), against the Llama rows of the
    eager throughput step (its JSON; compiling takes the time, so this runs alone and last)."""
    eager = c.workdir.parent / "throughput.json"
    llamas = []
    if eager.is_file():
        llamas = [r for r in json.loads(eager.read_text(encoding="utf-8"))["rows"] if r["variant"].startswith("llama")]
    result = run_benchmark(c, ["ours_compiled"], c.workdir / "throughput_compiled.json")
    fastest = max(llamas, key=lambda r: r["tokens_per_sec"]) if llamas else None
    if fastest is None:
        c.data["note"] = "no Llama rows: the throughput step did not finish, so no ratios"
    for row in result["rows"]:
        check_targets(c, row, fastest)


# ------------------------------------------------------------------------------------------------------------
# Entry point of a step process
# ------------------------------------------------------------------------------------------------------------

STEPS = {f.__name__: f for f in (env, attention_parity, fused_loss, kv_cache_generation, evaluation_engine,
                                 document_mask, deepspeed_train, throughput, throughput_compiled)}


def run_step(name: str, device: str, workdir: str, deadline: float, smoke: bool, result_path: str, log: str):
    """Run one step and write {"status", "checks", "data", "reason" | "error"} to result_path (JSON); its
    output goes to ``log``, which stdout and stderr already point at."""
    c = Context(device=device, workdir=Path(workdir), deadline=deadline, log=Path(log), smoke=smoke)
    c.workdir.mkdir(parents=True, exist_ok=True)
    if device == "cpu":
        # CPU shapes here are tiny: a second thread gains little, and on a busy machine its spin-waits cost
        # several times the work (on a loaded 2-core machine: 71 s against 4 s for kv_cache_generation's
        # model calls).
        torch.set_num_threads(1)
    torch.manual_seed(0)
    try:
        STEPS[name](c)
        failed = [ch["name"] for ch in c.checks if not ch["passed"]]
        result = {"status": "failed" if failed else "passed"}
        if failed:
            result["error"] = "failed checks: " + "; ".join(failed)
    except Skip as e:
        result = {"status": "skipped", "reason": str(e)}
    except Exception as e:  # noqa: BLE001 - recorded, and the next step runs
        result = {"status": "failed", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    result.update(checks=c.checks, data=c.data)
    write_atomic(result_path, json.dumps(result, indent=2, default=str))
    sys.stdout.flush()
    sys.stderr.flush()
