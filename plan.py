"""
Will it fit, how fast, what will it cost: computed from the model's shape, before any GPU is rented.

$ python plan.py config/finetune_gpt2_medium.py --batch_size=2          # same configs/overrides as train.py
$ python plan.py config/gpt2_124m_multi_gpu.py --gpus=8 --gpu=A100_40GB  # one GPU kind, memory breakdown at 8
$ python plan.py --vlm --model Qwen/Qwen2-VL-2B-Instruct --use-4bit --use-lora --batch-size 1   # train_ds.py flags
$ python plan.py --update-docs [docs/PLANNING.md]                         # regenerate the planning tables

GPT mode takes plan's own settings as --gpu=NAME (spaces as _), --gpus=N, --price=USD_per_GPU_hour, --mfu=0.35;
VLM mode as --gpu NAME --gpus N --price P --mfu M.

What is counted (bytes of tensors alive at the peak, i.e. what torch.cuda.max_memory_allocated reports):
weights, gradients, DDP's gradient buckets, optimizer state (AdamW fp32 or bitsandbytes 8-bit),
autocast's 16-bit weight copies, activations saved for backward (flash/SDPA attention: no T x T
matrix; activation checkpointing keeps only each block's input plus one block being recomputed),
the logits and the float32 loss buffers, and the input batches. A workspace allowance (CUDA context,
cuBLAS/NCCL buffers, allocator fragmentation) is added before comparing with a GPU's memory.
The arithmetic is memory.py's; this file turns it into tables. Times are FLOPs / (peak x MFU).
"""
import contextlib
import io
import json
import math
import os
import re
import statistics
import sys

import files
import hardware
from configurator import UserError, check_ranges, configure, one_line_errors
from gpt_settings import check_train_settings, gpt_shape, train_defaults
from memory import (
    FRAGMENTATION,
    GiB,
    gpt_checkpoint_bytes,
    gpt_flops_per_token,
    gpt_lora_settings,
    gpt_memory,
    gpt_params,
    llava_patches,
    needed_bytes,
    vlm_arch,
    vlm_flops_per_sample,
    vlm_memory,
    vlm_params,
    vlm_step,
    zero_settings,
)
from training import human_time
from vlm_settings import RANGES, build_parser, check_flags, one_line, read_deepspeed

ROOT = os.path.dirname(os.path.abspath(__file__))
BENCHMARKS = os.path.join(ROOT, "BENCHMARKS.md")
COUNTS = (1, 2, 4, 8)
# MFU assumptions used until BENCHMARKS.md has GPU measurements (then the median measured MFU is used).
# Not measured here: GPT is nanoGPT's reported ~29% on A100 (124M on OpenWebText), rounded to 30%;
# the VLM figure is lower because LoRA/QLoRA runs small batches and dequantizes 4-bit weights.
DEFAULT_MFU = {"gpt": 0.30, "vlm": 0.20}
DOCS_RUNS = [  # (title, plan.py's arguments) for the tables of docs/PLANNING.md; --gpus gives the count
    ("GPT-2 124M pretraining", "config/gpt2_124m_multi_gpu.py --gpus=8"),
    ("GPT-2 medium finetune", "config/finetune_gpt2_medium.py --gpus=1"),
    ("GPT-2 XL finetune", "config/finetune_shakespeare.py --gpus=1"),
    ("GPT-2 large full finetune with FSDP",
     "config/finetune_gpt2_medium.py --init_from=gpt2-large --fsdp=True --gpus=2"),
    ("GPT-2 XL full finetune with FSDP", "config/finetune_gpt2_xl_fsdp.py --gpus=2"),
    ("GPT-2 small class model for classify.py (IMDB, AG News)", "config/classify_imdb.py --gpus=1"),
    ("GPT-2 medium LoRA class model for classify.py", "config/classify_imdb.py config/lora_gpt2_medium.py --gpus=1"),
    ("Qwen2-VL-2B QLoRA, 448x448 image + text, 512 tokens",
     "--vlm --use-4bit --use-lora --batch-size 1 --gradient-accumulation-steps 8 --max-length 512 --max-pixels 200704 "
     "--max-steps 1000 --gpus 1"),
    ("Qwen2-VL-2B LoRA bf16, 448x448 image + text, 512 tokens",
     "--vlm --use-lora --batch-size 1 --gradient-accumulation-steps 8 --max-length 512 --max-pixels 200704 "
     "--max-steps 1000 --gpus 1"),
    ("LLaVA-1.5-13B QLoRA, 336x336 image (576 tokens) + text, 1024 tokens",
     "--vlm --model llava-hf/llava-1.5-13b-hf --use-4bit --use-lora --batch-size 1 --gradient-accumulation-steps 8 "
     "--max-length 1024 --max-steps 1000 --gpus 1"),
    ("LLaVA-1.5-13B LoRA bf16, 336x336 image (576 tokens) + text, 1024 tokens",
     "--vlm --model llava-hf/llava-1.5-13b-hf --use-lora --batch-size 1 --gradient-accumulation-steps 8 "
     "--max-length 1024 --max-steps 1000 --gpus 2"),
    ("LLaVA-1.5-13B full finetune (ZeRO-3 where it must), 336x336 image + text, 1024 tokens",
     "--vlm --model llava-hf/llava-1.5-13b-hf --batch-size 1 --gradient-accumulation-steps 8 "
     "--max-length 1024 --max-steps 1000 --gpus 8"),
]
DOCS_GPUS = ["T4", "V100", "RTX 4060 Ti", "RTX 4070", "RTX 4080", "RTX 4090", "RTX 5060 Ti", "RTX 5070", "RTX 5080",
             "RTX 5090", "A6000", "L4", "A100 40GB", "A100 80GB", "H100", "H200"]
PLAN_RANGES = {"gpus": "[1, inf)", "price": "[0, inf)", "mfu": "(0, 1]"}  # plan's own options


# -----------------------------------------------------------------------------
# reading the arguments: GPT mode takes train.py's settings, VLM mode train_ds.py's flags

def gpt_config(argv):
    """train.py's defaults with config files and --key=value applied (printing silenced)."""
    config = train_defaults()
    with contextlib.redirect_stdout(io.StringIO()):
        configure(argv, config)
    check_train_settings(config)
    return config


def split_plan_options(argv):
    """Pull plan's own --gpu/--gpus/--price/--mfu out of a train.py-style argument list."""
    options, rest = {"gpu": None, "gpus": None, "price": None, "mfu": None}, []
    for arg in argv:
        key, sep, value = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        if key in options and sep:
            try:
                options[key] = value.replace("_", " ") if key == "gpu" else \
                    (int(value) if key == "gpus" else float(value))
            except ValueError:
                raise UserError(f"--{key}={value}: expected a {'whole number' if key == 'gpus' else 'number'}")
        else:
            rest.append(arg)
    check_ranges(options, PLAN_RANGES, flag=lambda name: f"--{name}")
    return options, rest


def vlm_parser():
    """train_ds.py's own flags (so plan.py accepts exactly what train_ds.py does), plus plan's."""
    p = build_parser("memory, time and cost of a train_ds.py run (takes its flags)")
    p.prog = "plan.py --vlm"
    p.error = one_line(p)
    p.add_argument("--vlm", action="store_true")
    p.add_argument("--gpu", default=None, help="plan only: one GPU kind (default: all in hardware.py)")
    p.add_argument("--gpus", type=int, default=None, help="plan only: GPU count (default: 1, 2, 4, 8)")
    p.add_argument("--price", type=float, default=None, help="plan only: USD per GPU-hour")
    p.add_argument("--mfu", type=float, default=None, help="plan only: MFU to assume")
    return p


def parse_vlm(argv):
    args = vlm_parser().parse_args(argv)
    check_flags(args, {**RANGES, **PLAN_RANGES})  # train_ds.py's own checks, and plan's ranges
    return args


def read_ds_config(path):
    """memory.zero_settings of a DeepSpeed config file (train_ds.py's reader); None without DeepSpeed."""
    return None if path is None else zero_settings(read_deepspeed(path))


def parse(argv):
    """(run description, plan's own options) from train.py's settings or, with --vlm, train_ds.py's flags."""
    if "--vlm" in argv:
        args = parse_vlm(argv)
        return vlm_run(args), {k: getattr(args, k) for k in ("gpu", "gpus", "price", "mfu")}
    options, rest = split_plan_options(argv)
    config = gpt_config(rest)
    if config["gradient_accumulation_steps"] % (options["gpus"] or 1):
        raise UserError(f"gradient_accumulation_steps={config['gradient_accumulation_steps']} "
                        f"is not divisible by --gpus={options['gpus']}")
    return gpt_run(config), options


# -----------------------------------------------------------------------------
# a run description: what the one planning path below needs to know of a model and its run.
# memory(micro_batch, gpu_count, settings) -> bytes by component; setups(gpu_count) -> the ways to
# run it, plain to most memory-saving, as (flags, settings); samples are sequences (GPT) or
# conversations (VLM), per optimizer step and per GPU unless said otherwise.

GPT_SETUPS = [{}, {"fused_loss": True}, {"fused_loss": True, "activation_checkpointing": True},
              {"fused_loss": True, "optimizer": "adamw8bit"},
              {"fused_loss": True, "activation_checkpointing": True, "optimizer": "adamw8bit"}]
# on several GPUs also FSDP: the model state split among them (AdamW only), last with it in host memory
FSDP_SETUPS = [dict(setup, fsdp=True, optimizer="adamw") for setup in GPT_SETUPS[:3]] \
    + [{"fsdp": True, "fused_loss": True, "activation_checkpointing": True, "fsdp_offload": True}]


def gpt_setups(config, count=1):
    """The setups as (flags, settings) for this config on count GPUs: only what it changes, each once; with
    --fsdp=True given, only FSDP's on several GPUs. FSDP's exact AdamW comes before DDP's 8-bit one."""
    ddp, fsdp = ([] if config["fsdp"] and count > 1 else GPT_SETUPS), (FSDP_SETUPS if count > 1 else [])
    setups = {}
    for settings in ddp[:3] + fsdp[:3] + ddp[3:] + fsdp[3:]:
        changed = {k: v for k, v in settings.items() if config[k] != v}
        setups.setdefault(" ".join(f"--{k}={v}" for k, v in changed.items()), changed)
    return list(setups.items())


def gpt_run(config):
    """train.py's run, from its settings (global gradient_accumulation_steps)."""
    shape = gpt_shape(config)
    dtype = "bfloat16" if config["dtype"] == "auto" else config["dtype"]
    sequences = config["batch_size"] * config["gradient_accumulation_steps"]  # per iteration, all GPUs
    tokens_per_iter = sequences * config["block_size"]
    n_params = sum(n for n, _, _ in gpt_params(shape))
    flops_per_token = gpt_flops_per_token(shape, lora=config["lora_rank"] > 0)
    lora = f", LoRA rank {config['lora_rank']} on {config['lora_targets']}" if config["lora_rank"] else ""

    def memory(micro_batch, count, settings):
        run = dict(config, **settings)
        return gpt_memory(shape, micro_batch, count, dtype, run["optimizer"], run["activation_checkpointing"],
                          run["dropout"], *gpt_lora_settings(run), run["fused_loss"], run["fsdp"], run["fsdp_offload"])

    def flops_per_sample(settings):
        checkpointing = dict(config, **settings)["activation_checkpointing"]  # one more forward: 2N on 6N (4N: LoRA)
        return flops_per_token * ((1.5 if config["lora_rank"] else 4 / 3) if checkpointing else 1) \
            * config["block_size"]

    def where(world):
        return (f"batch_size={config['batch_size']} per GPU, "
                f"{f'{world} GPUs with ' + ('FSDP' if config['fsdp'] else 'DDP') if world > 1 else '1 GPU'}, {dtype}")
    about = (f"model: {config['init_from']} with n_layer={shape['n_layer']} n_head={shape['n_head']} "
             f"n_embd={shape['n_embd']} vocab={shape['vocab_size']} block={config['block_size']}: "
             f"{n_params / 1e6:.1f}M parameters, {flops_per_token / 1e9:.2f} GFLOP per token (training)\n"
             f"run: {tokens_per_iter:,} tokens/iter x {config['max_iters']:,} iters = "
             f"{tokens_per_iter * config['max_iters']:,} tokens; optimizer {config['optimizer']}, "
             f"activation_checkpointing={config['activation_checkpointing']}, fused_loss={config['fused_loss']}{lora}"
             + (f"\nFSDP: each save gathers the whole checkpoint onto rank 0's host memory, "
                f"{gpt_checkpoint_bytes(shape) / GiB:.1f} GiB on top of the process" if config["fsdp"] else ""))
    return dict(
        kind="gpt", about=about, batch_size=config["batch_size"], settings={}, where=where, memory=memory,
        setups=lambda count: gpt_setups(config, count),
        samples_per_gpu=lambda count: sequences // count if sequences % count == 0 else 0,
        flags=lambda micro, accumulation, count, setup:  # train.py takes the global accumulation
            f"--batch_size={micro} --gradient_accumulation_steps={accumulation * count} {setup}".strip(),
        flops_per_sample=flops_per_sample, total_samples=lambda count: sequences * config["max_iters"],
        tokens_per_sample=config["block_size"],
        time_note="time = FLOPs / (GPUs x dense bf16 peak x MFU), 4/3 more FLOPs with checkpointing (3/2 under LoRA)")


def vlm_run(args):
    """train_ds.py's run, from its flags. Gradient checkpointing, unless set, is planned on: train_ds.py turns it
    off only where the run would need under half the GPU without it (--no-gradient-checkpointing plans that)."""
    args.gradient_checkpointing = args.gradient_checkpointing is not False
    try:
        arch = vlm_arch(args.model)
    except ValueError as e:
        raise UserError(str(e))
    step = vlm_step(args)
    zero = read_ds_config(None if args.no_deepspeed else args.deepspeed)
    samples = args.batch_size * args.gradient_accumulation_steps  # per GPU per step, as train_ds.py counts
    flops = vlm_flops_per_sample(arch, args.max_length, args.max_pixels, args.use_lora, args.gradient_checkpointing)
    params = vlm_params(arch)
    total = params["lm_linear"] + params["lm_other"] + params["lm_head"] + params["vision"]
    lora = sum(args.lora_r * (a + b) for a, b in params["linears"]) if args.use_lora else 0
    mode = "no DeepSpeed" if zero is None else \
        f"DeepSpeed ZeRO-{zero['stage']}" + (" + CPU offload" if zero["offload_optimizer"] else "")
    method = f"{'4-bit ' if args.use_4bit else ''}{'LoRA' if args.use_lora else 'full finetune'}"
    side = arch["vision"].get("image_size")  # LLaVA's CLIP: one fixed size, whatever --max-pixels says
    image = f"{side}x{side} pixels ({llava_patches(arch) - 1} tokens)" if arch["kind"] == "llava" \
        else f"{args.max_pixels:,} pixels"
    about = (f"model: {args.model}: {total / 1e9:.2f}B parameters "
             f"(language model {(total - params['vision']) / 1e9:.2f}B, vision {params['vision'] / 1e6:.0f}M, frozen)"
             + (f"; LoRA r={args.lora_r}: {lora / 1e6:.1f}M trainable" if lora else "")
             + f"\nper sample (worst case): {args.max_length} tokens, one image of {image}; "
             f"{flops / 1e12:.2f} TFLOP per sample (training)")

    def setups(count):  # (flags, ZeRO settings); on one GPU plain PyTorch instead of ZeRO-2 (nothing to split)
        names = ["ds_config.json" if count > 1 else None, "ds_config_zero3.json", "ds_config_zero3_offload.json"]
        return [(f"--deepspeed {name}", read_ds_config(os.path.join(ROOT, name))) if name else ("--no-deepspeed", None)
                for name in names]
    return dict(
        kind="vlm", about=about, batch_size=args.batch_size, settings=zero,
        where=lambda world: f"batch {args.batch_size}, {world} GPU(s), {mode}, {method}",
        memory=lambda micro, count, settings: vlm_memory(arch, count, settings, **dict(step, batch_size=micro)),
        setups=setups, samples_per_gpu=lambda count: samples,
        flags=lambda micro, accumulation, count, setup:
            f"{setup} --batch-size {micro} --gradient-accumulation-steps {accumulation}",
        flops_per_sample=lambda settings: flops, total_samples=lambda count: vlm_total_samples(args, count),
        tokens_per_sample=args.max_length,
        time_note=f"{vlm_total_samples(args, 1):,} samples on 1 GPU "
                  f"({'--max-steps' if args.max_steps else 'epochs x ' + str(args.data)})")


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
            raise UserError(f"--data {args.data} cannot be read ({type(e).__name__}: {e})")
    return math.ceil(args.epochs * records / per_step) * per_step


# -----------------------------------------------------------------------------
# the MFU assumption: measured figures in BENCHMARKS.md win over the default.
# The benchmark record, one JSON line per run, as bench.py (GPT) and train_ds.py --benchmark (VLM)
# print it: {"bench": "gpt" or "vlm", "device": CUDA name or "cpu ...", ..., "mfu": a fraction, or
# "n/a" where the GPU's peak is unknown}. Lines may sit in ``` blocks or `backticks`.

def measured_mfu(kind, path=BENCHMARKS):
    """Median MFU of the 'kind' ("gpt" or "vlm") records in a BENCHMARKS.md measured on a GPU, or None."""
    if not os.path.exists(path):
        return None
    values = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip().strip("`")
            if not (line.startswith("{") and '"bench"' in line):
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            mfu, device = record.get("mfu"), str(record.get("device", ""))
            if record.get("bench") == kind and isinstance(mfu, (int, float)) and not device.lower().startswith("cpu"):
                values.append(mfu)
    return statistics.median(values) if values else None


def mfu_assumption(kind, override=None, benchmarks=BENCHMARKS):
    """(MFU, how it was chosen) for 'gpt' or 'vlm'."""
    if override:
        return override, "given with --mfu"
    measured = measured_mfu(kind, benchmarks)
    if measured:
        return measured, "median of the GPU measurements in BENCHMARKS.md"
    return DEFAULT_MFU[kind], "assumed, not measured: no GPU figures in BENCHMARKS.md yet"


# -----------------------------------------------------------------------------
# one path for both: per-GPU fit, micro-batch and flags; the GPU x count table; the breakdown

def pick_gpus(name):
    planned = [key for key, (_, peak, _) in hardware.GPUS.items() if peak]  # time needs a published peak
    if name is None:
        return planned
    name = name.replace("_", " ")  # --gpu=A100_40GB in every mode, as the error below says
    key = hardware.match_gpu(name) or (name if name in hardware.GPUS else None)
    if key is None:
        raise UserError(f"unknown GPU '{name}': use one of {', '.join(planned)} (spaces as _ in --gpu=)")
    if key not in planned:
        raise UserError(f"{key} has no published tensor peak, so its time cannot be planned: "
                        f"pick one of {', '.join(planned)}")
    return [key]


def best_fit(run, gpu, count, mfu, price):
    """The first setup that fits `count` x `gpu`, with the largest micro-batch keeping the samples per step."""
    memory_gib, tflops, default_price = hardware.GPUS[gpu]
    per_gpu = run["samples_per_gpu"](count)
    for setup, settings in run["setups"](count):
        for micro in [m for m in range(per_gpu, 0, -1) if per_gpu % m == 0]:
            memory = run["memory"](micro, count, settings)
            need = needed_bytes(memory, count)
            if need <= memory_gib * GiB:
                samples_per_s = count * tflops * 1e12 * mfu / run["flops_per_sample"](settings)
                seconds = run["total_samples"](count) / samples_per_s
                cost = seconds / 3600 * count * (price if price is not None else default_price)
                return dict(fits=True, flags=run["flags"](micro, per_gpu // micro, count, setup),
                            peak=sum(memory.values()), micro=micro, micro_steps=per_gpu // micro,
                            settings=settings, need=need, tokens_per_s=samples_per_s * run["tokens_per_sample"],
                            seconds=seconds, cost=cost,
                            # such runs at once per GPU (one class model each)
                            side_by_side=int(memory_gib * GiB // need))
    return dict(fits=False)


def dollars(amount):
    return f"${amount:,.0f}" if amount >= 10 else f"${amount:.2f}"


def table(rows):
    """Markdown rows from (GPU, count, best_fit's dict): fits, micro-batch + flags, peak, how many such runs fit
    on each GPU at once (e.g. one class model each, classify.py's workflow), tokens/s, time, cost."""
    lines = ["| GPU | GPUs | fits | flags | peak GiB (tensors / needed) | runs side by side | tokens/s | time | cost |",
             "|---|---|---|---|---|---|---|---|---|"]
    for gpu, count, row in rows:
        if not row["fits"]:
            lines.append(f"| {gpu} | {count} | no | - | - | - | - | - | - |")
            continue
        lines.append(f"| {gpu} | {count} | yes | `{row['flags']}` | {row['peak'] / GiB:.1f} / {row['need'] / GiB:.1f} "
                     f"| {row['side_by_side']} | {row['tokens_per_s']:,.0f} | {human_time(row['seconds'])} "
                     f"| {dollars(row['cost'])} |")
    return "\n".join(lines)


def breakdown(memory, world_size, where):
    total, needed = sum(memory.values()), needed_bytes(memory, world_size)
    lines = [f"per-GPU memory at the peak ({where}):"]
    for name, value in memory.items():
        if value:
            lines.append(f"  {name:<22}{value / GiB:8.2f} GiB")
    lines.append(f"  {'tensors (peak alloc.)':<22}{total / GiB:8.2f} GiB   <- compare torch.cuda.max_memory_allocated")
    lines.append(f"  {'+ workspace allowance':<22}{(needed - total) / GiB:8.2f} GiB   "
                 f"(CUDA context, cuBLAS/NCCL, {FRAGMENTATION:.0%} fragmentation)")
    lines.append(f"  {'needed':<22}{needed / GiB:8.2f} GiB")
    return "\n".join(lines)


def plan(argv):
    """The command line: the run as given, its memory at the peak, then what fits on which GPUs."""
    run, options = parse(argv)
    gpus = pick_gpus(options["gpu"])
    world = options["gpus"] or 1
    mfu, why = mfu_assumption(run["kind"], options["mfu"])
    print(run["about"])
    print(breakdown(run["memory"](run["batch_size"], world, run["settings"]), world, run["where"](world)))
    print(f"MFU {mfu:.0%} ({why}); {run['time_note']}")
    counts = [options["gpus"]] if options["gpus"] else COUNTS
    rows = [(gpu, count, best_fit(run, gpu, count, mfu, options["price"])) for gpu in gpus for count in counts]
    print(table(rows))
    print(trade_off(run, rows))


def trade_off(run, rows):
    """One line on the micro-batch chosen for the first run that fits, against the config's own."""
    fitting = [(gpu, count, row) for gpu, count, row in rows if row["fits"]]
    if not fitting:
        return "nothing fits: fewer samples per step, more GPUs or a bigger GPU"
    gpu, count, row = fitting[0]
    if row["micro"] == run["batch_size"]:
        return (f"micro-batch on {gpu} x {count}: the config's own, {row['micro']}, "
                f"in {row['micro_steps']} micro-step(s)")
    own = sum(run["memory"](run["batch_size"], count, row["settings"]).values()) / GiB
    own_steps = run["samples_per_gpu"](count) // run["batch_size"]
    return (f"micro-batch on {gpu} x {count}: {row['micro']} in {row['micro_steps']} micro-step(s), "
            f"{row['peak'] / GiB:.1f} GiB of tensors, instead of the config's {run['batch_size']} in {own_steps} "
            f"({own:.1f} GiB): the same samples per step in "
            f"{'fewer, larger' if row['micro'] > run['batch_size'] else 'more, smaller'} matmuls. The time column "
            "counts FLOPs at one MFU, so it does not show the speed difference; bench.py measures it")


# -----------------------------------------------------------------------------
# docs/PLANNING.md's tables: regenerated between <!-- plan:NAME --> and <!-- /plan:NAME --> markers

def docs_tables():
    """Region name ('gpt-table', 'vlm-table') -> its markdown: one table per DOCS_RUNS entry over DOCS_GPUS."""
    parts = {}
    for title, arguments in DOCS_RUNS:
        # config files are found beside plan.py, whatever the working directory
        run, options = parse([os.path.join(ROOT, a) if a.endswith(".py") else a for a in arguments.split()])
        mfu, why = mfu_assumption(run["kind"])
        rows = [(gpu, options["gpus"], best_fit(run, gpu, options["gpus"], mfu, None)) for gpu in DOCS_GPUS]
        part = f"**{title}**, {options['gpus']} GPU(s) (`python plan.py {arguments}`):\n\n{table(rows)}"
        parts.setdefault(run["kind"],
                         ([], f"MFU {mfu:.0%} ({why}); default $/GPU-hour from hardware.py."))[0].append(part)
    return {f"{kind}-table": "\n\n".join(tables) + "\n\n" + note for kind, (tables, note) in parts.items()}


def update_docs(path=os.path.join(ROOT, "docs", "PLANNING.md")):
    """Replace only the text between each pair of plan markers; everything else stays byte for byte."""
    if not os.path.isfile(path):
        raise UserError(f"{path} not found")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path} ({type(e).__name__}: {e}): "
                        "give the UTF-8 planning page (docs/PLANNING.md)")
    updated = []
    for name, body in docs_tables().items():
        pattern = re.compile(rf"(<!-- plan:{name} -->\n).*?(<!-- /plan:{name} -->)", re.S)
        if pattern.search(text):
            note = "<!-- generated by `python plan.py --update-docs`: edit plan.py, not this table -->\n"
            text = pattern.sub(lambda m: m.group(1) + note + body + "\n" + m.group(2), text)
            updated.append(name)
    if not updated:
        raise UserError(f"{path} has no '<!-- plan:gpt-table -->' ... '<!-- /plan:gpt-table -->' (or vlm-table) "
                        "markers, each on its own line")
    files.write_output_file(path, lambda f: f.write(text.encode("utf-8")), f"the planning page {path}")
    print(f"updated {', '.join(updated)} in {path}")


# -----------------------------------------------------------------------------
if __name__ == "__main__":
    one_line_errors()
    argv = sys.argv[1:]
    if argv[:1] == ["--update-docs"]:
        update_docs(*argv[1:2])
    elif argv[:1] == ["--update-readme"]:
        raise UserError("--update-readme is now --update-docs: the tables moved to docs/PLANNING.md")
    else:
        plan(argv)
