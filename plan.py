"""
Will it fit, how fast, what will it cost: computed from the model's shape, before any GPU is rented.

$ python plan.py config/finetune_gpt2_medium.py --batch_size=2          # same configs/overrides as train.py
$ python plan.py config/gpt2_124m_multi_gpu.py --gpus=8 --gpu=A100_40GB  # one GPU kind, memory breakdown at 8
$ python plan.py --vlm --model Qwen/Qwen2-VL-2B-Instruct --use-4bit --use-lora --batch-size 1   # train_ds.py flags
$ python plan.py --update-readme [README.md]                              # regenerate the README's tables

GPT mode takes plan's own settings as --gpu=NAME (spaces as _), --gpus=N, --price=USD_per_GPU_hour, --mfu=0.35;
VLM mode as --gpu NAME --gpus N --price P --mfu M.

What is counted (bytes of tensors alive at the peak, i.e. what torch.cuda.max_memory_allocated reports):
weights, gradients, DDP's gradient buckets, optimizer state (AdamW fp32 or bitsandbytes 8-bit),
autocast's 16-bit weight copies, activations saved for backward (flash/SDPA attention: no T x T
matrix; activation checkpointing keeps only each block's input plus one block being recomputed),
the logits and the float32 loss buffers, and the input batches. A workspace allowance (CUDA context,
cuBLAS/NCCL buffers, allocator fragmentation) is added before comparing with a GPU's memory.
Eager-mode accounting: torch.compile usually saves somewhat less. Times are FLOPs / (peak x MFU).
"""
import argparse
import contextlib
import io
import json
import math
import os
import re
import statistics
import sys

import hardware
import utils

ROOT = os.path.dirname(os.path.abspath(__file__))
GiB = 1024 ** 3
COUNTS = (1, 2, 4, 8)
# MFU assumptions used until BENCHMARKS.md has GPU measurements (then the median measured MFU is used).
# Not measured here: GPT is nanoGPT's reported ~29% on A100 (124M on OpenWebText), rounded to 30%;
# the VLM figure is lower because LoRA/QLoRA runs small batches and dequantizes 4-bit weights.
DEFAULT_MFU = {"gpt": 0.30, "vlm": 0.20}
# memory a run needs beyond its tensors: CUDA context + cuBLAS workspace, NCCL buffers with >1 GPU,
# and the caching allocator's fragmentation (a fraction of the tensor peak). An allowance, not measured.
CONTEXT_BYTES, NCCL_BYTES, FRAGMENTATION = 0.6 * GiB, 0.4 * GiB, 0.05
# Qwen2-VL-2B-Instruct's architecture: the default --model, planned offline without its config.json
QWEN2_VL_2B = dict(
    text=dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
              num_key_value_heads=2, vocab_size=151936),
    vision=dict(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4, patch_size=14, spatial_merge_size=2,
                temporal_patch_size=2, in_chans=3),
    tie_word_embeddings=True)
BUILTIN_MODELS = {"Qwen/Qwen2-VL-2B-Instruct": QWEN2_VL_2B, "Qwen/Qwen2-VL-2B": QWEN2_VL_2B}
README_GPT_RUNS = [  # (title, config file, GPU count) for the README's GPT table
    ("GPT-2 124M pretraining (config/gpt2_124m_multi_gpu.py)", "config/gpt2_124m_multi_gpu.py", 8),
    ("GPT-2 medium finetune (config/finetune_gpt2_medium.py)", "config/finetune_gpt2_medium.py", 1),
    ("GPT-2 XL finetune (config/finetune_shakespeare.py)", "config/finetune_shakespeare.py", 1),
]
README_VLM_RUNS = [  # (title, train_ds.py flags, GPU count) for the README's VLM table
    ("Qwen2-VL-2B QLoRA, 448x448 image + text, 512 tokens",
     "--use-4bit --use-lora --batch-size 1 --gradient-accumulation-steps 8 --max-length 512 --max-pixels 200704 --max-steps 1000", 1),
    ("Qwen2-VL-2B LoRA bf16, 448x448 image + text, 512 tokens",
     "--use-lora --batch-size 1 --gradient-accumulation-steps 8 --max-length 512 --max-pixels 200704 --max-steps 1000", 1),
]
README_GPUS = ["RTX 4060 Ti", "RTX 4070", "RTX 4080", "RTX 4090", "RTX 5060 Ti", "RTX 5070", "RTX 5080",
               "RTX 5090", "A6000", "L4", "A100 40GB", "A100 80GB", "H100", "H200"]


fail = utils.fail


# -----------------------------------------------------------------------------
# GPT (train.py): parameters, FLOPs and memory from the config

def gpt_shape(config, model_args=None):
    """n_layer, n_head, n_embd, vocab_size, block_size, bias as train.py will build them."""
    from model import PRETRAINED
    shape = {k: config[k] for k in ("n_layer", "n_head", "n_embd", "block_size", "bias")}
    shape["vocab_size"] = 50304
    init_from = config["init_from"]
    if init_from in PRETRAINED:
        shape.update(PRETRAINED[init_from], vocab_size=50257, bias=True)
    elif os.path.isdir(init_from):
        from model import GPT
        try:
            hf = GPT.hf_config_args(init_from)
        except ValueError as e:
            fail(str(e))
        shape.update({k: hf[k] for k in ("n_layer", "n_head", "n_embd", "vocab_size")}, bias=True)
    else:
        meta = os.path.join("data", config["dataset"], "meta.pkl")
        if init_from == "scratch" and os.path.exists(meta):
            shape["vocab_size"] = utils.load_meta(meta)["vocab_size"]
    shape.update({k: model_args[k] for k in shape if model_args and model_args.get(k) is not None})
    return shape


def gpt_params(shape):
    """Parameter tensors of model.GPT as (numel, is_matmul_weight); wte is tied to lm_head."""
    C, L, b = shape["n_embd"], shape["n_layer"], shape["bias"]
    norm = [(C, False)] + ([(C, False)] if b else [])

    def linear(n_in, n_out):
        return [(n_in * n_out, True)] + ([(n_out, False)] if b else [])
    block = norm + linear(C, 3 * C) + linear(C, C) + norm + linear(C, 4 * C) + linear(4 * C, C)
    return [(shape["vocab_size"] * C, True), (shape["block_size"] * C, False)] + block * L + norm


def gpt_flops_per_token(shape):
    """Training FLOPs per token, as model.GPT.flops_per_token: 6N (non-embedding N) + attention."""
    n = sum(numel for numel, _ in gpt_params(shape)) - shape["block_size"] * shape["n_embd"]
    return 6 * n + 12 * shape["n_layer"] * shape["n_embd"] * shape["block_size"]


def adamw_bytes(numels):
    # exp_avg + exp_avg_sq in fp32, and a float32 `step` tensor per parameter
    return sum(8 * n + 4 for n in numels)


def adamw8bit_bytes(numels):
    # bitsandbytes: uint8 moments + one fp32 absmax per 256-value block; tensors under 4096 values keep
    # fp32 moments; the two 256-entry quantization maps are shared by all tensors
    total = 2 * 256 * 4
    for n in numels:
        total += 2 * n + 2 * 4 * math.ceil(n / 256) if n >= 4096 else 8 * n
    return total


def gpt_memory(config, shape, batch_size, world_size, dtype):
    """Per-GPU bytes at the peak of a train.py step (DDP over world_size GPUs), by component."""
    params = gpt_params(shape)
    numels = [n for n, _ in params]
    n_params = sum(numels)
    C, L, H, V = shape["n_embd"], shape["n_layer"], shape["n_head"], shape["vocab_size"]
    tokens = batch_size * config["block_size"]
    act = 4 if dtype == "float32" else 2  # autocast's matmul outputs; LayerNorm inputs stay fp32 (the residual)
    dropout_masks = 2 * C if config["dropout"] > 0 else 0  # bool masks after attention and MLP
    # per token per block: ln_1 and ln_2 inputs (fp32) + their mean/rstd, the 16-bit inputs of
    # c_attn and c_fc, q/k/v, attention output + logsumexp, the MLP's 4C hidden before and after GELU
    per_block = 2 * 4 * C + 16 + act * (C + 3 * C + C + C + 4 * C + 4 * C) + 4 * H + dropout_masks
    if config["activation_checkpointing"]:
        activations = tokens * (L * 4 * C + per_block)  # block inputs, and one block recomputed in backward
    else:
        activations = tokens * L * per_block
    activations += tokens * (4 * C + 8 + act * C)  # ln_f input and lm_head's 16-bit input
    optimizer = adamw8bit_bytes(numels) if config["optimizer"] == "adamw8bit" else adamw_bytes(numels)
    return {
        "weights": 4 * n_params,
        "gradients": 4 * n_params,
        "DDP buckets": 4 * n_params if world_size > 1 else 0,  # DDP reduces a flat copy of the gradients
        "optimizer": optimizer,
        "16-bit weight copies": 0 if act == 4 else 2 * sum(n for n, matmul in params if matmul),
        "activations": activations,
        # logits in the autocast dtype, and in backward three float32 (B,T,V) buffers: log_softmax's
        # output, its incoming gradient and the gradient it returns
        "logits + loss": tokens * V * (act + 12),
        "inputs": tokens * 32,  # X, Y and the prefetched next X, Y as int64
    }


def gpt_setups(config):
    """Ways to run a config, from plain to most memory-saving: (flags, settings) pairs."""
    yield "", {}
    if not config["activation_checkpointing"]:
        yield "--activation_checkpointing=True", {"activation_checkpointing": True}
    if config["optimizer"] != "adamw8bit":
        yield "--optimizer=adamw8bit", {"optimizer": "adamw8bit"}
        if not config["activation_checkpointing"]:
            yield "--activation_checkpointing=True --optimizer=adamw8bit", {"activation_checkpointing": True, "optimizer": "adamw8bit"}


# -----------------------------------------------------------------------------
# VLM (train_ds.py): Qwen2-VL parameters from its config, memory for LoRA/QLoRA/full and ZeRO

def vlm_arch(model, model_config=None):
    """The text and vision sizes of --model: a given config dict, a local folder's config.json, or built-in."""
    cfg = model_config
    if cfg is None and os.path.isfile(os.path.join(model, "config.json")):
        try:
            with open(os.path.join(model, "config.json"), encoding="utf-8") as f:
                cfg = json.load(f)
        except (OSError, ValueError) as e:
            fail(f"{model}/config.json cannot be read ({type(e).__name__}: {e})")
        if not isinstance(cfg, dict):
            fail(f"{model}/config.json is not a model config")
    if cfg is None:
        if model not in BUILTIN_MODELS:
            fail(f"no architecture for --model {model}: pass a local model folder (with config.json) "
                 f"or one of {', '.join(BUILTIN_MODELS)}")
        return BUILTIN_MODELS[model]
    text = cfg.get("text_config") or cfg  # transformers 5 nests the text sizes; older files do not
    vision = cfg.get("vision_config") or {}
    keys = QWEN2_VL_2B["text"]
    if "depth" not in vision or not all(isinstance(text.get(k), int) for k in keys):
        fail(f"{model}: only Qwen2-VL-style models (vision_config with depth, embed_dim) are planned")
    tied = cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
    return dict(text={k: text[k] for k in keys},
                vision={k: vision.get(k, QWEN2_VL_2B["vision"][k]) for k in QWEN2_VL_2B["vision"]},
                tie_word_embeddings=tied)


def vlm_params(arch):
    """Parameter counts by group: LM linear weights (quantized by 4-bit, LoRA's targets), other LM
    tensors (embeddings, norms, biases), lm_head, the vision tower; and the LM linear shapes."""
    t, v = arch["text"], arch["vision"]
    h, i, L, V = t["hidden_size"], t["intermediate_size"], t["num_hidden_layers"], t["vocab_size"]
    kv = t["num_key_value_heads"] * h // t["num_attention_heads"]
    linears = [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)] * L  # q k v o gate up down
    e, m, hidden = v["embed_dim"], v["spatial_merge_size"] ** 2 * v["embed_dim"], int(v["embed_dim"] * v["mlp_ratio"])
    vision_block = 4 * e + 3 * e * e + 3 * e + e * e + e + 2 * e * hidden + hidden + e
    vision = (v["in_chans"] * v["temporal_patch_size"] * v["patch_size"] ** 2 * e + v["depth"] * vision_block
              + 2 * e + m * m + m + m * h + h)
    return dict(linears=linears, lm_linear=sum(a * b for a, b in linears), lm_bias=L * (h + 2 * kv),  # q/k/v biases
                lm_other=V * h + L * (h + 2 * kv + 2 * h) + h,  # embed, q/k/v biases, 2 norms per layer, final norm
                lm_head=0 if arch["tie_word_embeddings"] else V * h, vision=vision)


def nf4_bytes(numel):
    # bitsandbytes nf4 with double quantization: 4-bit values, a uint8 absmax per 64 values, an fp32
    # absmax per 256 of those, and per tensor a 16-entry code, a 256-entry code and an offset (fp32)
    blocks = math.ceil(numel / 64)
    return math.ceil(numel / 2) + blocks + 4 * math.ceil(blocks / 256) + 4 * (16 + 256 + 1)


def read_ds_config(path):
    if path is None:
        return {"stage": 0, "offload_optimizer": False, "offload_param": False, "bucket": 0}
    try:
        with open(path) as f:
            zero = json.load(f).get("zero_optimization", {})
    except (OSError, json.JSONDecodeError) as e:
        fail(f"--deepspeed {path}: {e}")
    stage = zero.get("stage", 0)
    bucket = zero.get("reduce_bucket_size", 5e8)
    return {"stage": stage, "offload_optimizer": zero.get("offload_optimizer", {}).get("device", "none") != "none",
            "offload_param": zero.get("offload_param", {}).get("device", "none") != "none",
            "bucket": bucket if isinstance(bucket, (int, float)) else 5e8}


def vlm_memory(arch, args, world_size, ds):
    """Per-GPU bytes at the peak of a train_ds.py step, by component. ds: read_ds_config's dict."""
    p = vlm_params(arch)
    t, v = arch["text"], arch["vision"]
    h, i, L, V = t["hidden_size"], t["intermediate_size"], t["num_hidden_layers"], t["vocab_size"]
    lora = [args.lora_r * n for a, b in p["linears"] for n in (a, b)] if args.use_lora else []  # A and B per linear
    base_lm = p["lm_linear"] + p["lm_other"] + p["lm_head"]
    deepspeed = ds["stage"] > 0 or not args.no_deepspeed
    wide = 2 if args.bf16 or args.fp16 or not args.fp32 else 4  # the model's dtype (bf16 on GPUs)
    # trainable tensors: LoRA adapters, or (full finetune) every LM tensor; the vision tower stays frozen
    trainable = lora if args.use_lora else [n for n, _ in [(p["lm_linear"], 0), (p["lm_other"], 0), (p["lm_head"], 0)] if n]
    n_trainable = sum(trainable)
    if args.use_4bit:  # nf4 LM linears; prepare_model_for_kbit_training upcasts the rest of the LM to fp32,
        # but bitsandbytes casts the 4-bit layers' biases back to the compute dtype in their first forward
        frozen = sum(nf4_bytes(a * b) for a, b in p["linears"]) + wide * (p["vision"] + p["lm_bias"])
        frozen += (wide if deepspeed else 4) * (p["lm_other"] - p["lm_bias"] + p["lm_head"])
    elif args.use_lora:
        frozen = wide * (base_lm + p["vision"])
    else:
        frozen = wide * p["vision"]
    shards = world_size if ds["stage"] >= 1 else 1
    if not deepspeed:  # train_ds.py keeps trainable weights in fp32, the optimizer runs on the GPU
        weights, grads, optimizer, buffers = frozen + 4 * n_trainable, 4 * n_trainable, adamw_bytes(trainable), 0
    else:  # DeepSpeed: 16-bit weights and gradients, fp32 master weights + moments in the optimizer
        weights = frozen + (wide if args.use_lora or not args.use_4bit else 0) * n_trainable
        grads = wide * n_trainable / (shards if ds["stage"] >= 2 else 1) + 4 * n_trainable / shards
        optimizer = 0 if ds["offload_optimizer"] else 12 * n_trainable / shards
        buffers = wide * min(ds["bucket"], max(n_trainable, 1)) if ds["stage"] >= 2 else 0
        if ds["stage"] == 3:  # weights partitioned; ZeRO-Offload keeps only the gathered layer on the GPU
            layer = (frozen + wide * n_trainable) / max(L, 1)
            weights = 2 * layer if ds["offload_param"] else weights / world_size + 2 * layer
    # activations per sample: the language model over max_length tokens. 16-bit, or fp32 under 4-bit
    # (the upcast norms make the residual stream fp32). Checkpointing keeps each layer's input and
    # recomputes one layer in backward; a layer saves its norms' fp32 inputs, the attention's q/k/v
    # and output, the MLP's gate/up/SiLU outputs and LoRA's inputs.
    tokens = args.batch_size * args.max_length
    a = 4 if args.use_4bit else wide
    kv = t["num_key_value_heads"] * h // t["num_attention_heads"]
    lora_inputs = (3 * h + h + 2 * h + i) * (a + 1) + 7 * a * args.lora_r if args.use_lora and args.lora_dropout > 0 else 0
    per_layer = 2 * 4 * h + a * (h + 2 * kv + h + h + 3 * i) + 4 * t["num_attention_heads"] + lora_inputs
    if not args.use_lora:
        per_layer += a * (2 * h + i)  # full finetuning also saves every linear's input
    activations = tokens * ((L * a * h + per_layer) if args.gradient_checkpointing else L * per_layer)
    # the frozen vision tower runs without autograd: only one block's working set at a time
    patches = args.batch_size * args.max_pixels // (v["patch_size"] ** 2)
    vision_work = patches * wide * (4 * v["embed_dim"] + 2 * int(v["embed_dim"] * v["mlp_ratio"]))
    logits = tokens * V * ((4 if args.fp32 else wide) + 12)  # 16-bit logits, then three fp32 (B,T,V) buffers in the loss
    return {"weights": weights, "gradients": grads, "optimizer": optimizer, "DeepSpeed buffers": buffers,
            "activations": activations, "vision forward": vision_work, "logits + loss": logits}


def vlm_flops_per_sample(arch, args):
    """FLOPs one sample executes: LM forward + backward (input gradients only with LoRA), one more
    forward when checkpointing, and the frozen vision tower's forward (no backward)."""
    p, t, v = vlm_params(arch), arch["text"], arch["vision"]
    T, h, L = args.max_length, t["hidden_size"], t["num_hidden_layers"]
    matmul = p["lm_linear"] + t["vocab_size"] * h  # lm_head is a matmul even when tied
    forward = T * (2 * matmul + 4 * L * h * T)  # attention counted non-causal, as nanoGPT's 12*L*C*T
    # backward: input gradients (as much as the forward) plus weight gradients, which LoRA skips
    backward = 2 * forward if not args.use_lora else T * (2 * matmul + 8 * L * h * T)
    recompute = forward if args.gradient_checkpointing else 0
    P, e = args.max_pixels // (v["patch_size"] ** 2), v["embed_dim"]
    vision = 2 * p["vision"] * P + 4 * v["depth"] * e * P * P
    return forward + backward + recompute + vision


# -----------------------------------------------------------------------------
# the MFU assumption: measured figures in BENCHMARKS.md win over the default

def measured_mfu(kind, path=os.path.join(ROOT, "BENCHMARKS.md")):
    """Median MFU of bench.py's JSON lines in BENCHMARKS.md measured on a GPU, or None."""
    if not os.path.exists(path):
        return None
    values = []
    with open(path) as f:
        for line in f:
            line = line.strip().strip("`")
            if line.startswith("{") and '"bench"' in line:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if row.get("bench") == kind and isinstance(row.get("mfu"), (int, float)):
                    values.append(row["mfu"])
    return statistics.median(values) if values else None


def mfu_assumption(kind, override=None):
    """(MFU, how it was chosen) for 'gpt' or 'vlm'."""
    if override:
        return override, "given with --mfu"
    measured = measured_mfu(kind)
    if measured:
        return measured, "median of the GPU measurements in BENCHMARKS.md"
    return DEFAULT_MFU[kind], "assumed, not measured: no GPU figures in BENCHMARKS.md yet"


# -----------------------------------------------------------------------------
# per-GPU fit, micro-batch and flags; the GPU x count table

def needed_bytes(memory, world_size):
    """What a GPU must hold: the tensors plus the workspace allowance."""
    peak = sum(memory.values())
    return peak * (1 + FRAGMENTATION) + CONTEXT_BYTES + (NCCL_BYTES if world_size > 1 else 0)


def gpt_best(config, shape, gpu, count, mfu, price):
    """The first setup that fits `count` x `gpu` with the largest micro-batch keeping tokens/iter."""
    memory_gib, tflops, default_price = hardware.GPUS[gpu]
    sequences = config["batch_size"] * config["gradient_accumulation_steps"]  # per iteration, all GPUs
    micro_batches = [m for m in range(sequences // count, 0, -1) if sequences % (m * count) == 0]
    dtype = "bfloat16" if config["dtype"] == "auto" else config["dtype"]
    for flags, settings in gpt_setups(config):
        trial = dict(config, **settings)
        for micro in micro_batches:
            memory = gpt_memory(trial, shape, micro, count, dtype)
            need = needed_bytes(memory, count)
            if need <= memory_gib * GiB:
                flops = gpt_flops_per_token(shape) * (4 / 3 if trial["activation_checkpointing"] else 1)
                tokens_per_s = count * tflops * 1e12 * mfu / flops
                seconds = sequences * config["block_size"] * config["max_iters"] / tokens_per_s
                accum = sequences // micro
                flags = f"--batch_size={micro} --gradient_accumulation_steps={accum} {flags}".strip()
                cost = seconds / 3600 * count * (price if price is not None else default_price)
                return dict(fits=True, micro=micro, flags=flags, peak=sum(memory.values()), need=need,
                            tokens_per_s=tokens_per_s, seconds=seconds, cost=cost)
    return dict(fits=False)


def vlm_setups(args, count):
    """(flags, ds_config path or None) from plain to most memory-saving for `count` GPUs."""
    if count == 1:
        yield "--no-deepspeed", None
    else:
        yield "--deepspeed ds_config.json", "ds_config.json"
    yield "--deepspeed ds_config_zero3.json", "ds_config_zero3.json"
    yield "--deepspeed ds_config_zero3_offload.json", "ds_config_zero3_offload.json"


def vlm_best(arch, args, gpu, count, mfu, price):
    memory_gib, tflops, default_price = hardware.GPUS[gpu]
    samples = args.batch_size * args.gradient_accumulation_steps  # per GPU per step, as train_ds.py
    for flags, ds_path in vlm_setups(args, count):
        ds = read_ds_config(os.path.join(ROOT, ds_path) if ds_path else None)
        for micro in [m for m in range(samples, 0, -1) if samples % m == 0]:
            trial = argparse.Namespace(**dict(vars(args), batch_size=micro, no_deepspeed=ds_path is None))
            memory = vlm_memory(arch, trial, count, ds)
            need = needed_bytes(memory, count)
            if need <= memory_gib * GiB:
                samples_per_s = count * tflops * 1e12 * mfu / vlm_flops_per_sample(arch, args)
                seconds = vlm_total_samples(args, count) / samples_per_s
                flags = f"{flags} --batch-size {micro} --gradient-accumulation-steps {samples // micro}"
                cost = seconds / 3600 * count * (price if price is not None else default_price)
                return dict(fits=True, micro=micro, flags=flags, peak=sum(memory.values()), need=need,
                            tokens_per_s=samples_per_s * args.max_length, seconds=seconds, cost=cost)
    return dict(fits=False)


def vlm_total_samples(args, count):
    per_step = args.batch_size * args.gradient_accumulation_steps * count
    if args.max_steps:
        return args.max_steps * per_step
    records = 1000  # without the data file: plan for 1000 samples per epoch
    if args.data and os.path.isfile(args.data):
        try:
            with open(args.data, encoding="utf-8") as f:
                records = sum(1 for line in f if line.strip()) if args.data.endswith(".jsonl") else len(json.load(f))
        except (OSError, ValueError, TypeError) as e:
            fail(f"--data {args.data} cannot be read ({type(e).__name__}: {e})")
    return math.ceil(args.epochs * records / per_step) * per_step


def dollars(amount):
    return f"${amount:,.0f}" if amount >= 10 else f"${amount:.2f}"


def human_time(seconds):
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


def table(rows_by_gpu, counts_by_row):
    """Markdown rows: GPU, count, fits, micro-batch + flags, peak, tokens/s, time, cost."""
    lines = ["| GPU | GPUs | fits | flags | peak GiB (tensors / needed) | tokens/s | time | cost |",
             "|---|---|---|---|---|---|---|---|"]
    for gpu, count, row in rows_by_gpu:
        if not row["fits"]:
            lines.append(f"| {gpu} | {count} | no | - | - | - | - | - |")
            continue
        lines.append(f"| {gpu} | {count} | yes | `{row['flags']}` | {row['peak'] / GiB:.1f} / {row['need'] / GiB:.1f} "
                     f"| {row['tokens_per_s']:,.0f} | {human_time(row['seconds'])} | {dollars(row['cost'])} |")
    return "\n".join(lines)


def breakdown(memory, world_size, where):
    total = sum(memory.values())
    lines = [f"per-GPU memory at the peak ({where}):"]
    for name, value in memory.items():
        if value:
            lines.append(f"  {name:<22}{value / GiB:8.2f} GiB")
    lines.append(f"  {'tensors (peak alloc.)':<22}{total / GiB:8.2f} GiB   <- compare torch.cuda.max_memory_allocated")
    lines.append(f"  {'+ workspace allowance':<22}{(needed_bytes(memory, world_size) - total) / GiB:8.2f} GiB   "
                 f"(CUDA context, cuBLAS/NCCL, {FRAGMENTATION:.0%} fragmentation)")
    lines.append(f"  {'needed':<22}{needed_bytes(memory, world_size) / GiB:8.2f} GiB")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# command lines: GPT mode reads train.py's settings, VLM mode train_ds.py's flags

def gpt_config(args):
    """train.py's defaults with config files and --key=value applied (printing silenced)."""
    from configurator import ConfigError, configure, read_defaults
    config = read_defaults(os.path.join(ROOT, "train.py"))
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            configure(args, config)
    except ConfigError as e:
        fail(str(e))
    utils.check_train_settings(config)
    return config


def split_plan_options(argv):
    """Pull plan's own --gpu/--gpus/--price/--mfu out of a train.py-style argument list."""
    options, rest = {"gpu": None, "gpus": None, "price": None, "mfu": None}, []
    for arg in argv:
        key, sep, value = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        if key in options and sep:
            try:
                options[key] = value.replace("_", " ") if key == "gpu" else (int(value) if key == "gpus" else float(value))
            except ValueError:
                fail(f"--{key}={value}: expected a {'whole number' if key == 'gpus' else 'number'}")
        else:
            rest.append(arg)
    utils.check_ranges(options, PLAN_RANGES, flag=lambda name: f"--{name}")
    return options, rest


PLAN_RANGES = {"gpus": "[1, inf)", "price": "[0, inf)", "mfu": "(0, 1]"}  # plan's own options


def pick_gpus(name):
    planned = [key for key, (_, peak, _) in hardware.GPUS.items() if peak]  # time needs a published peak
    if name is None:
        return planned
    key = hardware.match_gpu(name) or (name if name in hardware.GPUS else None)
    if key is None:
        fail(f"unknown GPU '{name}': use one of {', '.join(planned)} (spaces as _ in --gpu=)")
    if key not in planned:
        fail(f"{key} has no published tensor peak, so its time cannot be planned: pick one of {', '.join(planned)}")
    return [key]


def plan_gpt(argv):
    options, rest = split_plan_options(argv)
    config = gpt_config(rest)
    shape = gpt_shape(config)
    mfu, why = mfu_assumption("gpt", options["mfu"])
    tokens_per_iter = config["batch_size"] * config["gradient_accumulation_steps"] * config["block_size"]
    n_params = sum(n for n, _ in gpt_params(shape))
    print(f"model: {config['init_from']} with n_layer={shape['n_layer']} n_head={shape['n_head']} n_embd={shape['n_embd']} "
          f"vocab={shape['vocab_size']} block={config['block_size']}: {n_params / 1e6:.1f}M parameters, "
          f"{gpt_flops_per_token(shape) / 1e9:.2f} GFLOP per token (training)")
    print(f"run: {tokens_per_iter:,} tokens/iter x {config['max_iters']:,} iters = {tokens_per_iter * config['max_iters']:,} tokens; "
          f"optimizer {config['optimizer']}, activation_checkpointing={config['activation_checkpointing']}")
    world = options["gpus"] or 1
    if config["gradient_accumulation_steps"] % world:
        fail(f"gradient_accumulation_steps={config['gradient_accumulation_steps']} is not divisible by --gpus={world}")
    dtype = "bfloat16" if config["dtype"] == "auto" else config["dtype"]
    memory = gpt_memory(config, shape, config["batch_size"], world, dtype)
    where = f"{world} GPUs with DDP" if world > 1 else "1 GPU"
    print(breakdown(memory, world, f"batch_size={config['batch_size']} per GPU, {where}, {dtype}"))
    print(f"MFU {mfu:.0%} ({why}); time = FLOPs / (GPUs x dense bf16 peak x MFU), 4/3 more FLOPs with checkpointing")
    counts = [options["gpus"]] if options["gpus"] else COUNTS
    rows = [(gpu, c, gpt_best(config, shape, gpu, c, mfu, options["price"])) for gpu in pick_gpus(options["gpu"]) for c in counts]
    print(table(rows, counts))


def vlm_parser():
    """train_ds.py's own flags (so plan.py accepts exactly what train_ds.py does), plus plan's."""
    from train_ds import build_parser
    p = build_parser()
    p.prog, p.description = "plan.py --vlm", "memory, time and cost of a train_ds.py run (takes its flags)"
    p.error = lambda message: fail(f"{message} (see plan.py --vlm --help)")  # one line, not usage + error
    p.add_argument("--vlm", action="store_true")
    p.add_argument("--gpu", default=None, help="plan only: one GPU kind (default: all in hardware.py)")
    p.add_argument("--gpus", type=int, default=None, help="plan only: GPU count (default: 1, 2, 4, 8)")
    p.add_argument("--price", type=float, default=None, help="plan only: USD per GPU-hour")
    p.add_argument("--mfu", type=float, default=None, help="plan only: MFU to assume")
    return p


def parse_vlm(argv):
    args = vlm_parser().parse_args(argv)
    if args.use_4bit and not args.use_lora:
        fail("--use-4bit needs --use-lora: 4-bit weights cannot be trained directly, only adapters on top of them")
    utils.check_ranges(vars(args), {"batch_size": "[1, inf)", "gradient_accumulation_steps": "[1, inf)",
                                    "max_length": "[1, inf)", "max_pixels": "[1, inf)", "lora_r": "[1, inf)",
                                    "epochs": "(0, inf)", "max_steps": "[1, inf)", **PLAN_RANGES},
                       flag=lambda name: "--" + name.replace("_", "-"))
    return args


def plan_vlm(argv):
    args = parse_vlm(argv)
    arch = vlm_arch(args.model)
    p = vlm_params(arch)
    total = p["lm_linear"] + p["lm_other"] + p["lm_head"] + p["vision"]
    lora = sum(args.lora_r * (a + b) for a, b in p["linears"]) if args.use_lora else 0
    print(f"model: {args.model}: {total / 1e9:.2f}B parameters (language model {(total - p['vision']) / 1e9:.2f}B, "
          f"vision {p['vision'] / 1e6:.0f}M, frozen)" + (f"; LoRA r={args.lora_r}: {lora / 1e6:.1f}M trainable" if lora else ""))
    print(f"per sample (worst case): {args.max_length} tokens, one image of {args.max_pixels:,} pixels; "
          f"{vlm_flops_per_sample(arch, args) / 1e12:.2f} TFLOP per sample (training)")
    world = args.gpus or 1
    ds = read_ds_config(None if args.no_deepspeed else args.deepspeed)
    mode = "no DeepSpeed" if args.no_deepspeed else f"DeepSpeed ZeRO-{ds['stage']}" + (" + CPU offload" if ds["offload_optimizer"] else "")
    memory = vlm_memory(arch, args, world, ds)
    print(breakdown(memory, world, f"batch {args.batch_size}, {world} GPU(s), {mode}, "
                                   f"{'4-bit ' if args.use_4bit else ''}{'LoRA' if args.use_lora else 'full finetune'}"))
    mfu, why = mfu_assumption("vlm", args.mfu)
    print(f"MFU {mfu:.0%} ({why}); {vlm_total_samples(args, 1):,} samples on 1 GPU "
          f"({'--max-steps' if args.max_steps else 'epochs x ' + str(args.data)})")
    counts = [args.gpus] if args.gpus else COUNTS
    rows = [(gpu, c, vlm_best(arch, args, gpu, c, mfu, args.price)) for gpu in pick_gpus(args.gpu) for c in counts]
    print(table(rows, counts))


# -----------------------------------------------------------------------------
# startup lines for train.py and train_ds.py

def detected_gpu(device):
    """(GPUS key or None, total memory bytes) of a CUDA device; (None, None) elsewhere."""
    import torch
    if not str(device).startswith("cuda") or not torch.cuda.is_available():
        return None, None
    key = hardware.match_gpu(torch.cuda.get_device_name(device))
    return (key if key and hardware.GPUS[key][1] else None), torch.cuda.get_device_properties(device).total_memory


def fit_line(need, gpu_memory, device, hint):
    if gpu_memory is None or need <= gpu_memory:
        return ""
    return (f"\nwarning: this run needs ~{need / GiB:.1f} GiB per GPU but {device} has {gpu_memory / GiB:.1f} GiB: "
            f"it will likely run out of memory; {hint} (python plan.py ... shows what fits)")


def startup_line(config, world_size, device, model_args=None):
    """train.py's one-line estimate: peak memory, tokens/iter, time to max_iters; plus a warning line
    when it will not fit the detected GPU. config: train.py's settings (global grad accumulation)."""
    shape = gpt_shape(config, model_args)
    dtype = config["dtype"]
    if dtype == "auto":
        dtype = utils.resolve_dtype("auto", str(device).split(":")[0])
    memory = gpt_memory(config, shape, config["batch_size"], world_size, dtype)
    need = needed_bytes(memory, world_size)
    tokens_per_iter = config["batch_size"] * config["gradient_accumulation_steps"] * config["block_size"]
    gpu, gpu_memory = detected_gpu(device)
    line = f"plan: peak ~{sum(memory.values()) / GiB:.2f} GiB of tensors per process, {tokens_per_iter:,} tokens/iter"
    if gpu:
        mfu, why = mfu_assumption("gpt")
        flops = gpt_flops_per_token(shape) * (4 / 3 if config["activation_checkpointing"] else 1)
        seconds = tokens_per_iter * config["max_iters"] * flops / (world_size * hardware.GPUS[gpu][1] * 1e12 * mfu)
        line += f", ~{human_time(seconds)} to max_iters={config['max_iters']} at {mfu:.0%} MFU ({why.split(':')[0]})"
    hint = "try --activation_checkpointing=True, --optimizer=adamw8bit or a smaller --batch_size"
    return line + fit_line(need, gpu_memory, device, hint)


def vlm_startup_line(args, world_size, device, max_steps, ds_config=None, model_config=None):
    """train_ds.py's one-line estimate. args: its argparse namespace; ds_config: the DeepSpeed dict it
    uses (None without DeepSpeed); model_config: the model's config as a dict, if loaded."""
    args = argparse.Namespace(**dict(vars(vlm_parser().parse_args([])), **vars(args)))
    zero = (ds_config or {}).get("zero_optimization", {})
    ds = read_ds_config(None)
    if ds_config is not None:
        ds.update(stage=zero.get("stage", 0), offload_optimizer=zero.get("offload_optimizer", {}).get("device", "none") != "none",
                  offload_param=zero.get("offload_param", {}).get("device", "none") != "none",
                  bucket=zero.get("reduce_bucket_size", 5e8) if isinstance(zero.get("reduce_bucket_size", 5e8), (int, float)) else 5e8)
    try:
        arch = vlm_arch(args.model, model_config)
    except SystemExit as e:  # a model plan.py cannot size (not Qwen2-VL-like) must not stop training
        return f"plan: no estimate ({str(e).removeprefix('error: ')})"
    memory = vlm_memory(arch, args, world_size, ds)
    tokens = args.batch_size * args.gradient_accumulation_steps * world_size * args.max_length
    gpu, gpu_memory = detected_gpu(device)
    line = f"plan: peak ~{sum(memory.values()) / GiB:.2f} GiB of tensors per GPU, up to {tokens:,} tokens/step"
    if gpu:
        mfu, why = mfu_assumption("vlm")
        samples = max_steps * args.batch_size * args.gradient_accumulation_steps * world_size
        seconds = samples * vlm_flops_per_sample(arch, args) / (world_size * hardware.GPUS[gpu][1] * 1e12 * mfu)
        line += f", ~{human_time(seconds)} for {max_steps} steps at {mfu:.0%} MFU ({why.split(':')[0]})"
    hint = "try --use-4bit, a smaller --batch-size or --max-length, or ZeRO-3 (--deepspeed ds_config_zero3.json)"
    return line + fit_line(needed_bytes(memory, world_size), gpu_memory, device, hint)


# -----------------------------------------------------------------------------
# README tables: regenerated between <!-- plan:NAME --> and <!-- /plan:NAME --> markers

def readme_tables():
    mfu, why = mfu_assumption("gpt")
    parts = []
    for title, config_file, count in README_GPT_RUNS:
        config = gpt_config([os.path.join(ROOT, config_file)])
        shape = gpt_shape(config)
        rows = [(gpu, count, gpt_best(config, shape, gpu, count, mfu, None)) for gpu in README_GPUS]
        parts.append(f"**{title}**, {count} GPU(s):\n\n{table(rows, [count])}")
    gpt = "\n\n".join(parts) + f"\n\nMFU {mfu:.0%} ({why}); default $/GPU-hour from hardware.py."
    mfu, why = mfu_assumption("vlm")
    parts = []
    for title, flags, count in README_VLM_RUNS:
        args = parse_vlm(flags.split())
        arch = vlm_arch(args.model)
        rows = [(gpu, count, vlm_best(arch, args, gpu, count, mfu, None)) for gpu in README_GPUS]
        parts.append(f"**{title}** (`{flags}`), {count} GPU(s):\n\n{table(rows, [count])}")
    vlm = "\n\n".join(parts) + f"\n\nMFU {mfu:.0%} ({why}); default $/GPU-hour from hardware.py."
    return {"gpt-table": gpt, "vlm-table": vlm}


def update_readme(path="README.md"):
    """Replace only the text between each pair of plan markers; everything else stays byte for byte."""
    if not os.path.isfile(path):
        fail(f"{path} not found")
    with open(path) as f:
        text = f.read()
    updated = []
    for name, body in readme_tables().items():
        pattern = re.compile(rf"(<!-- plan:{name} -->\n).*?(<!-- /plan:{name} -->)", re.S)
        if pattern.search(text):
            note = "<!-- generated by `python plan.py --update-readme`: edit plan.py, not this table -->\n"
            text = pattern.sub(lambda m: m.group(1) + note + body + "\n" + m.group(2), text)
            updated.append(name)
    if not updated:
        fail(f"{path} has no '<!-- plan:gpt-table -->' ... '<!-- /plan:gpt-table -->' (or vlm-table) markers, each on its own line")
    with open(path, "w") as f:
        f.write(text)
    print(f"updated {', '.join(updated)} in {path}")


if __name__ == "__main__":
    argv = sys.argv[1:]
    if argv[:1] == ["--update-readme"]:
        update_readme(*argv[1:2])
    elif "--vlm" in argv:
        plan_vlm(argv)
    else:
        plan_gpt(argv)
