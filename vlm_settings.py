"""
train_ds.py's flags: the parser, each numeric flag's valid range, the flags that must agree, and the
DeepSpeed config as train_ds.py runs it. plan.py --vlm takes exactly these.
"""
import argparse
import json
import os

import torch

from configurator import UserError, check_ranges
from runtime import say


def build_parser(description=None):
    p = argparse.ArgumentParser(prog="train_ds.py", description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="Qwen/Qwen2-VL-2B-Instruct", help="hub id or local folder")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model folder's own Python code")
    p.add_argument("--data", default="data/vlm_demo/train.json", help="LLaVA or messages format, .json or .jsonl")
    p.add_argument("--image-folder", default=None,
                   help="image paths are relative to this (default: the data file's folder)")
    p.add_argument("--eval-data", default=None)
    p.add_argument("--eval-generate", type=int, default=0, metavar="N",
                   help="at each eval, also answer the first N eval records by generation and score them (exact "
                        "match, token F1; sample_vlm.py's scoring)")
    p.add_argument("--max-length", type=int, default=2048, help="longest sample in tokens, image tokens included")
    p.add_argument("--skip-long", action="store_true",
                   help="skip (and count) samples over --max-length instead of stopping")
    p.add_argument("--num-workers", type=int, default=2,
                   help="processes that decode and encode batches ahead of the GPU")
    p.add_argument("--min-pixels", type=int, default=256 * 28 * 28)
    p.add_argument("--max-pixels", type=int, default=1280 * 28 * 28)
    # LoRA / QLoRA
    p.add_argument("--use-lora", action="store_true")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=int, default=32)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--lora-target-modules", default=None,
                   help="comma-separated linear layer names, in the language model only "
                        "(default: all its linear layers)")
    p.add_argument("--vision-lora", action="store_true", help="LoRA in the vision tower's linear layers too")
    p.add_argument("--modules-to-save", default=None, help="comma-separated non-LoRA modules to train fully")
    # what trains besides the language model (fully, or its LoRA), each with its own peak learning rate
    p.add_argument("--train-projector", action="store_true",
                   help="train the projector (Qwen's merger, LLaVA's multi_modal_projector)")
    p.add_argument("--train-vision", action="store_true", help="train the vision tower (with LoRA, Qwen's merger too)")
    p.add_argument("--projector-lr", type=float, default=None, help="(default: --learning-rate)")
    p.add_argument("--vision-lr", type=float, default=None,
                   help="for --train-vision or --vision-lora (default: --learning-rate)")
    p.add_argument("--attn-implementation", choices=["sdpa", "flash_attention_2", "eager"], default=None,
                   help="(default: flash_attention_2 where flash-attn is installed and the dtype is 16-bit on a GPU, "
                        "else sdpa)")
    p.add_argument("--use-4bit", action="store_true", help="QLoRA: nf4 base weights (bitsandbytes), needs --use-lora")
    # optimisation
    p.add_argument("--batch-size", type=int, default=1, help="per GPU")
    p.add_argument("--gradient-accumulation-steps", type=int, default=1)
    p.add_argument("--learning-rate", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument("--grad-clip", type=float, default=1.0, help="largest gradient norm; 0 for no clipping")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute activations in backward: less memory, slower steps (default: on only where the "
                        "run would need more than half the device's memory without it)")
    p.add_argument("--max-nonfinite-steps", type=int, default=10,
                   help="stop after this many steps in a row with a NaN/inf loss (each one is skipped)")
    precision = p.add_mutually_exclusive_group()
    precision.add_argument("--bf16", action="store_true")
    precision.add_argument("--fp16", action="store_true")
    precision.add_argument("--fp32", action="store_true", help="(default: bf16 on GPUs that have it, fp32 on a CPU)")
    # DeepSpeed
    p.add_argument("--no-deepspeed", action="store_true", help="plain PyTorch, one process")
    p.add_argument("--deepspeed", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "ds_config.json"),
                   help="ZeRO config (default: ds_config.json beside this script; batch size, precision, clipping "
                        "filled in)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)  # from the launcher
    # output
    p.add_argument("--output-dir", default=None, help="default out-vlm (merge: <checkpoint>-merged)")
    p.add_argument("--save-steps", type=int, default=100)
    p.add_argument("--keep-last", type=int, default=2, help="checkpoints kept on disk")
    p.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="continue from the newest checkpoint in --output-dir, or from the one given; --resume auto: "
                        "from the newest if there is one, else start: one command for a run and its restarts")
    p.add_argument("--save-minutes", type=float, default=0,
                   help="also save at least this often (0: every --save-steps only): a reclaimed spot GPU loses less")
    p.add_argument("--max-hours", type=float, default=0,
                   help="save and exit cleanly before this many hours (a scheduler's or rental's limit; 0: none)")
    p.add_argument("--price-per-hour", type=float, default=0,
                   help="the whole job's USD per hour: the log line shows the cost so far and at the end")
    p.add_argument("--log-steps", type=int, default=1)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--wandb", action="store_true")
    p.add_argument("--wandb-project", default="vlm-finetune")
    # other jobs
    p.add_argument("--merge-lora", metavar="CHECKPOINT", default=None,
                   help="merge a checkpoint's adapter into its base model and exit (in the base's dtype, "
                        "or --bf16/--fp16/--fp32)")
    p.add_argument("--random-init", action="store_true",
                   help="random weights from --model's config (no weight download)")
    p.add_argument("--benchmark", action="store_true", help="time training on synthetic images; prints one JSON line")
    p.add_argument("--benchmark-image-size", type=int, default=448)
    p.add_argument("--benchmark-text-words", type=int, default=200)
    return p


def parse_args(argv=None, description=None):
    p = build_parser(description)
    p.error = one_line(p)
    return p.parse_args(argv)


def one_line(parser):
    """An argparse error as a UserError (its one line), not usage + error."""
    def error(message):
        raise UserError(f"{message} (see python {parser.prog} --help)")
    return error


RANGES = {  # every numeric flag's valid values; None (not given) passes
    "max_length": "[1, inf)", "num_workers": "[0, 64]", "min_pixels": "[1, inf)", "max_pixels": "[1, inf)",
    "lora_r": "[1, inf)", "lora_alpha": "(0, inf)", "lora_dropout": "[0, 1)", "batch_size": "[1, inf)",
    "gradient_accumulation_steps": "[1, inf)", "learning_rate": "[0, inf)", "projector_lr": "[0, inf)",
    "vision_lr": "[0, inf)", "weight_decay": "[0, inf)", "warmup_steps": "[0, inf)", "grad_clip": "[0, inf)",
    "epochs": "(0, inf)", "max_steps": "[1, inf)", "max_nonfinite_steps": "[1, inf)", "save_steps": "[1, inf)",
    "log_steps": "[1, inf)", "keep_last": "[1, inf)", "seed": "[0, 4294967296)", "benchmark_image_size": "[28, 8192]",
    "benchmark_text_words": "[1, inf)", "eval_generate": "[0, inf)", "save_minutes": "[0, inf)",
    "max_hours": "[0, inf)", "price_per_hour": "[0, inf)",
}


def check_flags(args, ranges=RANGES):
    """The flags alone and together, as far as they need nothing of this machine: ranges, the parts that
    train, LoRA-only flags, the pixel budget. UserError for the first that cannot work."""
    check_ranges(vars(args), ranges, flag=lambda name: "--" + name.replace("_", "-"))
    check_parts(args)
    if args.max_pixels < args.min_pixels:
        raise UserError(f"--max-pixels {args.max_pixels} is below --min-pixels {args.min_pixels}: "
                        "raise it or lower --min-pixels")
    for flag, value in (("--lora-target-modules", args.lora_target_modules),
                        ("--modules-to-save", args.modules_to_save)):
        if value is not None and not args.use_lora:
            raise UserError(f"{flag} needs --use-lora: without it every weight of the language model trains")
    if args.use_4bit and not args.use_lora:
        raise UserError("--use-4bit needs --use-lora: 4-bit weights cannot be trained directly, "
                        "only adapters on top of them")
    if args.eval_generate and not args.eval_data:
        raise UserError("--eval-generate answers records of --eval-data: give --eval-data")


def check_parts(args):
    needs = {"--vision-lora": (args.vision_lora, args.use_lora, "--use-lora"),
             "--projector-lr": (args.projector_lr is not None, args.train_projector, "--train-projector"),
             "--vision-lr": (args.vision_lr is not None, args.train_vision or args.vision_lora,
                             "--train-vision or --vision-lora")}
    for flag, (given, allowed, needed) in needs.items():
        if given and not allowed:
            raise UserError(f"{flag} needs {needed}: without it nothing it applies to trains")
    if args.train_vision and args.vision_lora:
        raise UserError("--train-vision trains the whole vision tower; --vision-lora adapters on a frozen one: "
                        "choose one")


def read_deepspeed(path):
    """A DeepSpeed config file as a dict, checked to be one."""
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8
        raise UserError(f"--deepspeed {path}: {e}")
    if not isinstance(config, dict) or not all(isinstance(config.get(key, {}), dict)
                                               for key in ("zero_optimization", "bf16", "fp16")):
        raise UserError(f"--deepspeed {path}: a DeepSpeed config is a JSON object (see ds_config.json)")
    return config


def deepspeed_config(args, dtype, world_size):
    """The ZeRO config train_ds.py runs with: the file's, with what the flags decide filled in."""
    config = read_deepspeed(args.deepspeed)
    # one source of truth: these come from the flags, whatever the file says; the file's other
    # precision settings (loss_scale_window, ...) are kept, with a dynamic fp16 loss scale by default
    config.update(train_micro_batch_size_per_gpu=args.batch_size,
                  gradient_accumulation_steps=args.gradient_accumulation_steps,
                  train_batch_size=args.batch_size * args.gradient_accumulation_steps * world_size,
                  gradient_clipping=args.grad_clip,  # 0: no clipping, as without DeepSpeed
                  bf16={**config.get("bf16", {}), "enabled": dtype == torch.bfloat16},
                  fp16={"loss_scale": 0, "initial_scale_power": 16, **config.get("fp16", {}),
                        "enabled": dtype == torch.float16})
    if config.get("zero_optimization", {}).get("overlap_comm"):
        say(f"warning: --deepspeed {args.deepspeed} sets overlap_comm, a known cause of zero or NaN losses: "
            "set it to false")
    if "auto" in json.dumps(config):
        raise UserError(f"--deepspeed {args.deepspeed}: replace the \"auto\" values with numbers "
                        "(this script fills in only batch size, precision and clipping)")
    return config
