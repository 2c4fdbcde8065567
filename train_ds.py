"""
Fine-tune a vision-language model (Qwen2-VL, Qwen2.5-VL, LLaVA-1.5, ...) on images with
questions and answers: LoRA or QLoRA, on one GPU or many with DeepSpeed ZeRO.

    python data/vlm_demo/prepare.py
    python train_ds.py --no-deepspeed --use-lora          # one GPU, or a CPU for a smoke run
    deepspeed --num_gpus=2 train_ds.py --use-4bit --use-lora --batch-size 1 --gradient-accumulation-steps 8
    python train_ds.py --merge-lora out-vlm/checkpoint-100   # adapter + base -> one plain model

The heavy lifting is done by the model's own processor and chat template (transformers), peft,
bitsandbytes and DeepSpeed. Our own code: reading and checking the data, masking the loss to the
assistant's replies, and checkpoints that survive crashes and ZeRO-3. `--help` lists every flag.

Labels: the loss is on the assistant's replies only, each with its end-of-turn token. The replies
are found by rendering the conversation turn by turn with the model's chat template, so any
template that renders turns in order works. Long samples are never truncated (a cut could land
inside an image's tokens): they stop the run, or --skip-long drops and counts them.

DeepSpeed: batch size, accumulation, precision and clipping come from the flags and are written
into the ZeRO config (which must hold no "auto"); the optimizer and schedule are ours (AdamW;
DeepSpeed's CPU Adam under optimizer offload). overlap_comm is off in the shipped configs: it is
known to give NaN or zero losses. Under ZeRO-3 a batch without any image gets a fully masked blank
image, so every rank runs the vision tower and none waits forever for the others; 4-bit weights
need --bf16/--fp16 there (ZeRO-3 splits only floating-point storage: bnb_4bit_quant_storage).

Checkpoints: out-vlm/checkpoint-N/ holds the adapter (or the full model), the processor,
run_args.json, the optimizer (DeepSpeed's files under deepspeed/, sharded per rank, or
trainer_state.pt) and every rank's RNG state; under ZeRO-3 the weights are gathered first (else
the adapter would be empty). It is written to .tmp-checkpoint-N/, synced, then renamed into
place: a crash or a full disk mid-save leaves the older ones intact. SIGTERM or Ctrl-C finishes
the step, saves and exits (with the deepspeed launcher, signal the training processes: it kills
its children a few seconds after a signal). --resume continues with the same weights, optimizer,
step, schedule, data position and RNG states: bit for bit on a CPU in fp32 (tested).
"""
import argparse
import functools
import json
import math
import os
import re
import resource
import shutil
import signal
import statistics
import sys
import time
from contextlib import contextmanager, nullcontext

if __name__ == "__main__":  # Ctrl-C during the slow imports below: one line, not a traceback (training sets its own)
    signal.signal(signal.SIGINT, lambda *_: sys.exit("interrupted while starting: nothing was trained"))

import torch  # noqa: E402
from PIL import Image, UnidentifiedImageError  # noqa: E402
from safetensors import SafetensorError  # noqa: E402
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor  # noqa: E402

from utils import (atomic_torch_save, atomic_write_text, check_ranges, fail, fsync_dir, get_rng_state,  # noqa: E402
                   has_native_bf16, init_wandb, lock_folder, remove_stale_temps, resolve_dtype, set_rng_state,
                   temp_path, write_failure)

VISION_MODULES = ["visual", "vision_tower", "multi_modal_projector"]  # Qwen2-VL / LLaVA names; kept 16-bit, frozen
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
RANK, WORLD_SIZE = 0, 1  # set from the launcher's environment under DeepSpeed


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="Qwen/Qwen2-VL-2B-Instruct", help="hub id or local folder")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model folder's own Python code")
    p.add_argument("--data", default="data/vlm_demo/train.json", help="LLaVA or messages format, .json or .jsonl")
    p.add_argument("--image-folder", default=None, help="image paths are relative to this (default: the data file's folder)")
    p.add_argument("--eval-data", default=None)
    p.add_argument("--max-length", type=int, default=2048, help="longest sample in tokens, image tokens included")
    p.add_argument("--skip-long", action="store_true", help="skip (and count) samples over --max-length instead of stopping")
    p.add_argument("--min-pixels", type=int, default=256 * 28 * 28)
    p.add_argument("--max-pixels", type=int, default=1280 * 28 * 28)
    # LoRA / QLoRA
    p.add_argument("--use-lora", action="store_true")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=int, default=32)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--lora-target-modules", default=None,
                   help="comma-separated module names (default: every linear layer of the language model)")
    p.add_argument("--modules-to-save", default=None,
                   help="comma-separated non-LoRA modules to train fully, e.g. multi_modal_projector")
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
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--max-nonfinite-steps", type=int, default=10,
                   help="stop after this many steps in a row with a NaN/inf loss (each one is skipped)")
    precision = p.add_mutually_exclusive_group()
    precision.add_argument("--bf16", action="store_true")
    precision.add_argument("--fp16", action="store_true")
    precision.add_argument("--fp32", action="store_true", help="(default: bf16 on GPUs that have it, fp32 on a CPU)")
    # DeepSpeed
    p.add_argument("--no-deepspeed", action="store_true", help="plain PyTorch, one process")
    p.add_argument("--deepspeed", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "ds_config.json"),
                   help="ZeRO config (default: ds_config.json beside this script; batch size, precision, clipping filled in)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)  # from the launcher
    # output
    p.add_argument("--output-dir", default=None, help="default out-vlm (merge: <checkpoint>-merged)")
    p.add_argument("--save-steps", type=int, default=100)
    p.add_argument("--keep-last", type=int, default=2, help="checkpoints kept on disk")
    p.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="continue from the newest checkpoint in --output-dir, or from the one given")
    p.add_argument("--log-steps", type=int, default=1)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--wandb", action="store_true")
    p.add_argument("--wandb-project", default="vlm-finetune")
    # other jobs
    p.add_argument("--merge-lora", metavar="CHECKPOINT", default=None, help="merge a checkpoint's adapter into its base model and exit")
    p.add_argument("--random-init", action="store_true", help="random weights from --model's config (no weight download)")
    p.add_argument("--benchmark", action="store_true", help="time training on synthetic images; prints one JSON line")
    p.add_argument("--benchmark-image-size", type=int, default=448)
    p.add_argument("--benchmark-text-words", type=int, default=200)
    return p


def parse_args(argv=None):
    p = build_parser()
    p.error = lambda message: fail(f"{message} (see python train_ds.py --help)")  # one line, not usage + error
    return p.parse_args(argv)


RANGES = {  # every numeric flag's valid values; None (not given) passes
    "max_length": "[1, inf)", "min_pixels": "[1, inf)", "max_pixels": "[1, inf)", "lora_r": "[1, inf)",
    "lora_alpha": "(0, inf)", "lora_dropout": "[0, 1)", "batch_size": "[1, inf)", "gradient_accumulation_steps": "[1, inf)",
    "learning_rate": "[0, inf)", "weight_decay": "[0, inf)", "warmup_steps": "[0, inf)", "grad_clip": "[0, inf)",
    "epochs": "(0, inf)", "max_steps": "[1, inf)", "max_nonfinite_steps": "[1, inf)", "save_steps": "[1, inf)",
    "log_steps": "[1, inf)", "keep_last": "[1, inf)", "seed": "[0, 4294967296)", "benchmark_image_size": "[28, 8192]",
    "benchmark_text_words": "[1, inf)",
}


def check_args(args, zero3):
    """Every setting alone and together, before anything slow: one line for the first that cannot work."""
    check_ranges(vars(args), RANGES, flag=lambda name: "--" + name.replace("_", "-"))
    if args.max_pixels < args.min_pixels:
        fail(f"--max-pixels {args.max_pixels} is below --min-pixels {args.min_pixels}: raise it or lower --min-pixels")
    for flag, value in (("--lora-target-modules", args.lora_target_modules), ("--modules-to-save", args.modules_to_save)):
        if value is not None and not args.use_lora:
            fail(f"{flag} needs --use-lora: without it every weight of the language model trains")
    if args.use_4bit and not args.use_lora:
        fail("--use-4bit needs --use-lora: 4-bit weights cannot be trained directly, only adapters on top of them")
    if args.use_4bit:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            fail("--use-4bit needs bitsandbytes: pip install bitsandbytes")
    if args.use_4bit and zero3 and not (args.bf16 or args.fp16):
        fail("--use-4bit with ZeRO-3 works only when the 4-bit weights are stored in the training dtype: "
             "add --bf16 (or --fp16), or use ds_config.json (ZeRO-2)")
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        fail(f"--output-dir {args.output_dir} is a file, not a folder: choose another --output-dir")
    if not args.benchmark and checkpoint_steps(args.output_dir) and not args.resume:
        fail(f"{args.output_dir} already holds checkpoints; pass --resume to continue, or another --output-dir")


# -----------------------------------------------------------------------------
# data: read both formats into one, check every record before any training starts

def read_records(path):
    if os.path.isdir(path):
        fail(f"data file {path} is a folder: give the .json or .jsonl file in it")
    if not os.path.isfile(path):
        fail(f"data file {path} not found (for the demo set run: python data/vlm_demo/prepare.py)")
    try:
        with open(path, encoding="utf-8") as f:
            if path.endswith(".jsonl"):
                records = [parse_json_line(line, f"{path} line {number}") for number, line in enumerate(f, 1)
                           if line.strip()]
            else:
                records = json.load(f)
    except UnicodeDecodeError:
        fail(f"{path} is not UTF-8 text: save it as UTF-8")
    except json.JSONDecodeError as e:
        fail(f"{path} is not valid JSON: {e}")
    except OSError as e:
        fail(f"cannot read {path}: {e.strerror}")
    if not isinstance(records, list):
        fail(f"{path} must hold a list of objects (one per sample), not a JSON {type(records).__name__}")
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            fail(f"{path} record {index} is a JSON {type(record).__name__}, not an object (one per sample)")
    return records


def parse_json_line(line, where):
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        fail(f"{where} is not valid JSON ({e.msg} at column {e.pos + 1})")


def split_placeholders(content, where):
    """A message's content -> typed items, with {"type": "image"} where `<image>` stood."""
    if isinstance(content, list):  # already typed, as in the processor's own format
        for item in content:
            if not (isinstance(item, dict) and (item.get("type") == "image" or
                                                item.get("type") == "text" and isinstance(item.get("text"), str))):
                fail(f"{where}: a content list holds only {{\"type\": \"text\", \"text\": \"...\"}} and "
                     f"{{\"type\": \"image\"}} items, not {json.dumps(item)[:80]}")
        return content
    if not isinstance(content, str):
        fail(f"{where}: message content must be a string or a list, not {json.dumps(content)[:80]}")
    items = []
    for i, text in enumerate(content.split("<image>")):
        if i > 0:
            items.append({"type": "image"})
        if text.strip():
            items.append({"type": "text", "text": text.strip()})
    return items


def to_messages(record, where, image_folder):
    """LLaVA (`image` + `conversations` from human/gpt) or messages (`images` + `messages`) -> one form."""
    if "conversations" in record:
        turns_key, role_key, content_key, images_key = "conversations", "from", "value", "image"
    elif "messages" in record:
        turns_key, role_key, content_key, images_key = "messages", "role", "content", "images"
    else:
        fail(f"{where}: no 'conversations' (LLaVA format) or 'messages' key")
    turns, images = record[turns_key], record.get(images_key)
    if not isinstance(turns, list) or not all(isinstance(turn, dict) for turn in turns):
        fail(f"{where}: '{turns_key}' must be a list of objects with '{role_key}' and '{content_key}'")
    if not turns:
        fail(f"{where}: empty conversation")
    images = [] if images is None else [images] if isinstance(images, str) else images
    if not isinstance(images, list) or not all(isinstance(name, str) for name in images):
        fail(f"{where}: '{images_key}' must be an image file name or a list of them")
    messages = []
    for turn in turns:
        role = turn.get(role_key)
        if not isinstance(role, str) or role not in ROLES:
            fail(f"{where}: unknown role {role!r} (use human/gpt or user/assistant/system)")
        messages.append({"role": ROLES[role], "content": split_placeholders(turn.get(content_key, ""), where)})
    placeholders = sum(item.get("type") == "image" for m in messages for item in m["content"])
    if placeholders != len(images):
        fail(f"{where}: {placeholders} <image> placeholder(s) but {len(images)} image(s); they must match")
    return messages, [os.path.join(image_folder, name) for name in images]


def load_image(path, where):
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        fail(f"{where}: image {path} not found (check --image-folder)")
    except Image.DecompressionBombError as e:  # not an OSError
        fail(f"{where}: image {path} is too large to decode safely ({e}): shrink it")
    except (UnidentifiedImageError, OSError) as e:
        fail(f"{where}: image {path} is unreadable ({e})")


def read_samples(path, image_folder=None):
    """Read a data file and check every record's form; returns (messages, image paths, where) per
    record. Needs no processor, so it runs before anything slow."""
    image_folder = image_folder or os.path.dirname(os.path.abspath(path))
    samples = []
    for index, record in enumerate(read_records(path)):
        where = f"{path} record {index}" + (f" (id {record['id']})" if "id" in record else "")
        samples.append((*to_messages(record, where, image_folder), where))
    return samples


def measure_samples(path, samples, processor, args):
    """Encode every sample once: its images open, it fits --max-length, it has a reply to learn."""
    kept, too_long = [], 0
    for sample in samples:
        where = sample[2]
        batch = encode([sample], processor)
        length = batch["input_ids"].shape[1]
        if length > args.max_length:  # never truncate: a cut could land inside an image's tokens
            if not args.skip_long:
                fail(f"{where}: {length} tokens (image tokens included) is longer than --max-length "
                     f"{args.max_length}; raise it, lower --max-pixels, or pass --skip-long")
            too_long += 1
            continue
        if (batch["labels"] == -100).all():  # its loss would be 0/0
            fail(f"{where}: no assistant reply to learn from (every token is masked): add a gpt/assistant turn "
                 "or remove the record")
        kept.append(sample)
    if too_long:
        log(f"skipped {too_long} sample(s) of {path} longer than --max-length {args.max_length}")
    if not kept:
        fail(f"{path}: no samples left to train on")
    return kept


# -----------------------------------------------------------------------------
# encoding: the processor builds the inputs; we build the labels

def assistant_spans(messages, processor):
    """Character spans of the assistant's replies (with their end-of-turn marker) in the chat text."""
    def render(msgs, generation_prompt):
        return processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)
    text, spans = render(messages, False), []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, through = render(messages[:i], True), render(messages[: i + 1], False)
        if not (text.startswith(through) and through.startswith(before)):
            fail("the chat template does not render a conversation turn by turn, so the assistant's "
                 "replies cannot be located; use a model whose template does (e.g. Qwen2-VL, LLaVA-1.5)")
        spans.append((len(before), len(through.rstrip())))
    return text, spans


def assistant_labels(text, spans, input_ids, processor):
    """input_ids of one sample (image placeholders expanded) -> labels: the token where it starts
    inside an assistant span, -100 elsewhere (system, user, image tokens)."""
    tokenizer, image_token_id = processor.tokenizer, image_token_id_of(processor)
    plain = tokenizer(text, return_offsets_mapping=True)  # placeholders not yet expanded
    labels, j = [], 0
    for token, (start, _) in zip(plain["input_ids"], plain["offset_mapping"]):
        if token == image_token_id:  # the processor repeated this placeholder once per image patch
            while j < len(input_ids) and input_ids[j] == image_token_id:
                labels.append(-100)
                j += 1
            continue
        assert input_ids[j] == token, "processor and tokenizer disagree on the text tokens"
        labels.append(token if any(a <= start < b for a, b in spans) else -100)
        j += 1
    assert j == len(input_ids)
    return labels


def image_token_id_of(processor):
    token_id = getattr(processor, "image_token_id", None)
    return token_id if token_id is not None else processor.tokenizer.convert_tokens_to_ids(processor.image_token)


def encode(samples, processor, dummy_image_size=None):
    """A list of samples -> one padded batch with labels. `dummy_image_size` adds a fully masked
    row with one blank image, so a text-only batch still runs the vision tower: under ZeRO-3 every
    rank must gather the same parameters or the job hangs."""
    rendered = [assistant_spans(messages, processor) for messages, _, _ in samples]
    images = [load_image(path, where) for _, paths, where in samples for path in paths]
    texts = [text for text, _ in rendered]
    if dummy_image_size and not images:
        texts.append(processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}]}], tokenize=False))
        images.append(Image.new("RGB", (dummy_image_size, dummy_image_size)))
        rendered.append((texts[-1], []))
    batch = processor(text=texts, images=images or None, padding=True, return_tensors="pt")
    labels = torch.full_like(batch["input_ids"], -100)
    for row, (text, spans) in enumerate(rendered):
        real = batch["attention_mask"][row].bool()  # padding may be on either side
        labels[row, real] = torch.tensor(assistant_labels(text, spans, batch["input_ids"][row, real].tolist(), processor))
    batch["labels"] = labels
    return batch


def synthetic_samples(folder, count, size, words, seed):
    """Benchmark data: noise images with a question and a long answer of repeated words."""
    generator = torch.Generator().manual_seed(seed)
    os.makedirs(folder, exist_ok=True)
    samples = []
    for i in range(count):
        path = os.path.join(folder, f"{i}.png")
        if RANK == 0 and not os.path.exists(path):
            pixels = torch.randint(0, 256, (size, size, 3), dtype=torch.uint8, generator=generator)
            Image.fromarray(pixels.numpy()).save(path)
        answer = " ".join(["the red circle on the stage"] * (words // 6 + 1))
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe the image"}]},
                    {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
        samples.append((messages, [path], f"synthetic sample {i}"))
    barrier()
    return samples


# -----------------------------------------------------------------------------
# model: Auto classes, optional 4-bit, LoRA on the language model's linear layers

def load_processor(args):
    try:
        processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=args.trust_remote_code,
                                                  min_pixels=args.min_pixels, max_pixels=args.max_pixels)
    except (OSError, ValueError) as e:
        fail(f"cannot load a processor from {args.model}: {str(e).splitlines()[0]}")
    if not getattr(processor, "chat_template", None) and not getattr(processor.tokenizer, "chat_template", None):
        fail(f"{args.model} has no chat template; use an instruction-tuned model or add one to its processor")
    processor.tokenizer.padding_side = "right"
    return processor


def is_vision(name):
    return any(part in VISION_MODULES for part in name.split("."))


def language_model_linear_layers(model):
    """A regex peft matches against full module names: every nn.Linear (bnb's 4-bit ones included)
    under the language model, none in the vision tower, not lm_head."""
    leaves = {name.split(".")[-1] for name, module in model.named_modules()
              if isinstance(module, torch.nn.Linear) and "language_model" in name and not is_vision(name)}
    return rf".*language_model.*\.({'|'.join(sorted(leaves))})"


def load_model(args, model_path, dtype, device, zero3):
    from transformers import BitsAndBytesConfig
    kwargs = dict(dtype=dtype, trust_remote_code=args.trust_remote_code)
    if args.use_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype,
            bnb_4bit_quant_storage=dtype if zero3 else torch.uint8,  # ZeRO-3 partitions only float storage
            llm_int8_skip_modules=[f"model.{name}" for name in VISION_MODULES] + ["lm_head"])
        if not zero3:
            kwargs["device_map"] = {"": device}
    model = AutoModelForImageTextToText.from_pretrained(model_path, **kwargs)
    model.config.use_cache = False
    model.requires_grad_(not args.use_lora)
    for name, param in model.named_parameters():
        if is_vision(name):  # the vision tower stays frozen
            param.requires_grad_(False)
    checkpointing = {"gradient_checkpointing_kwargs": {"use_reentrant": False}}
    if args.use_4bit:
        from peft import prepare_model_for_kbit_training
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.gradient_checkpointing, **checkpointing)
        for name, param in model.named_parameters():
            if is_vision(name):  # it upcast everything to fp32; the frozen vision tower need not be
                param.data = param.data.to(dtype)
    elif args.gradient_checkpointing:
        model.gradient_checkpointing_enable(**checkpointing)
        if args.use_lora:
            model.enable_input_require_grads()  # else checkpointed blocks see no input needing grad
    if args.use_lora:
        model = add_lora(model, args)
    return model


def add_lora(model, args):
    from peft import LoraConfig, get_peft_model
    targets = args.lora_target_modules.split(",") if args.lora_target_modules else language_model_linear_layers(model)
    to_save = args.modules_to_save.split(",") if args.modules_to_save else None
    names = [name for name, _ in model.named_modules()]
    for wanted in to_save or []:  # peft ignores a name that matches nothing: the user would train less than asked
        if not any(name == wanted or name.endswith("." + wanted) for name in names):
            fail(f"--modules-to-save {wanted}: {args.model} has no module of that name")
    try:
        config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                            target_modules=targets, modules_to_save=to_save)
        return get_peft_model(model, config)
    except ValueError as e:  # e.g. no module of that name, or one that is not a linear layer
        given = f"--lora-target-modules {args.lora_target_modules}" if args.lora_target_modules else "the default LoRA targets"
        fail(f"{given}: peft refused them ({str(e).splitlines()[0].rstrip('(')}); name linear layers of the "
             "language model with --lora-target-modules, e.g. q_proj,v_proj")


# -----------------------------------------------------------------------------
# distributed helpers (no-ops in a single process)

def barrier():
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def mean_over_ranks(value):
    if not torch.distributed.is_initialized():
        return value
    tensor = torch.tensor(float(value), dtype=torch.float64)
    if torch.distributed.get_backend() == "nccl":
        tensor = tensor.cuda()
    torch.distributed.all_reduce(tensor)
    return tensor.item() / WORLD_SIZE


def log(message):
    if RANK == 0:
        print(message, flush=True)


def peak_memory_gib():
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # CPU: max RSS (kB on Linux)


# -----------------------------------------------------------------------------
# checkpoints: written to a temp folder, then renamed into place, so a crash never leaves half a one

def gathered_state_dict(model, zero3, trainable_only):
    """name -> full CPU tensor. Under ZeRO-3 each rank holds a slice of every parameter; gather
    them one at a time (saving without this writes an empty adapter). Collective: call on all ranks."""
    state = {}
    for name, param in model.named_parameters():
        if trainable_only and not param.requires_grad:
            continue
        if zero3:
            import deepspeed
            with deepspeed.zero.GatheredParameters([param]):
                state[name] = param.detach().cpu().clone() if RANK == 0 else None
        else:
            state[name] = param.detach().cpu().clone()
    return state


def checkpoint_steps(folder):
    found = []
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        match = re.fullmatch(r"checkpoint-(\d+)", name)
        if match:
            found.append(int(match.group(1)))
    return sorted(found)


CHECKPOINT_TEMPS = r"\.tmp-checkpoint-\d+(-old)?"  # the folders a save (or a discard) of ours passes through


def claim_output_dir(args):
    """Rank 0 holds --output-dir's lock for the whole run, so a second run on it is refused, and
    removes what a killed run of ours left half-written: our own temp names only, never a user's.
    Returns the lock: keep it referenced."""
    if RANK != 0:
        return None
    lock = lock_folder(args.output_dir, "--output-dir")
    for name in os.listdir(args.output_dir):
        if re.fullmatch(CHECKPOINT_TEMPS, name) and os.path.isdir(os.path.join(args.output_dir, name)):
            shutil.rmtree(os.path.join(args.output_dir, name))
    remove_stale_temps(args.output_dir, r"log\.jsonl")
    return lock


def is_write_failure(error):
    """A full disk, as each library reports it: OSError (Python, transformers), SafetensorError, a
    RuntimeError from torch's zip writer, a bare Exception '... (os error 28)' from tokenizers."""
    return (isinstance(error, (OSError, SafetensorError)) or "(os error" in str(error)
            or isinstance(error, RuntimeError) and "inline_container" in str(error))


@contextmanager
def disk_write(what, folder, then="the previous checkpoint is intact: free disk space and resume", partial=None):
    """A write that a full disk can stop ends in one line: what, why, the space left and what to do.
    partial: a half-written folder to remove, giving its space back."""
    try:
        yield
    except Exception as e:
        if not is_write_failure(e):
            raise  # a bug, not the disk: shown in full
        if partial:
            shutil.rmtree(partial, ignore_errors=True)
        error = e if isinstance(e, OSError) else OSError(0, (str(e).strip().splitlines() or [type(e).__name__])[0])
        fail(f"could not save {what} ({write_failure(error, folder)}); {then}")


def discard_checkpoint(path):
    # rename, then delete: a kill halfway leaves a .tmp folder (removed at the next start), never half a checkpoint
    trash = os.path.join(os.path.dirname(path), ".tmp-" + os.path.basename(path) + "-old")
    os.replace(path, trash)
    shutil.rmtree(trash)


def save_checkpoint(step, model, engine, optimizer, scaler, processor, args, zero3):
    final = os.path.join(args.output_dir, f"checkpoint-{step}")
    tmp = os.path.join(args.output_dir, f".tmp-checkpoint-{step}")
    saving = functools.partial(disk_write, f"checkpoint-{step}", args.output_dir, partial=tmp if RANK == 0 else None)
    if RANK == 0:
        with saving():
            os.makedirs(tmp)
    barrier()
    trainable = gathered_state_dict(model, zero3, trainable_only=True)
    full = None if args.use_lora else gathered_state_dict(model, zero3, trainable_only=False)
    with saving():
        if RANK == 0:
            if args.use_lora:  # adapter_model.safetensors + adapter_config.json (modules_to_save included)
                model.save_pretrained(tmp, state_dict=trainable)
            else:
                model.save_pretrained(tmp, state_dict=full)
            processor.save_pretrained(tmp)
            with open(os.path.join(tmp, "run_args.json"), "w") as f:
                json.dump(vars(args), f, indent=2)
            if engine is None:
                atomic_torch_save({"step": step, "trainable": trainable, "optimizer": optimizer.state_dict(),
                                   "scaler": scaler.state_dict()}, os.path.join(tmp, "trainer_state.pt"))
        if engine is not None:  # optimizer state (sharded per rank under ZeRO) and step, by DeepSpeed
            engine.save_checkpoint(tmp, tag="deepspeed", client_state={"step": step}, exclude_frozen_parameters=True)
        atomic_torch_save(get_rng_state(), os.path.join(tmp, f"rng_state_{RANK}.pt"))
    barrier()
    if RANK == 0:
        with saving():  # some filesystems report a full disk only here
            for root, _, files in os.walk(tmp):  # everything on disk before the folder appears
                for name in files:
                    with open(os.path.join(root, name), "rb+") as f:
                        os.fsync(f.fileno())
                fsync_dir(root)
        if os.path.exists(final):  # re-saving a step (resumed from an older checkpoint)
            discard_checkpoint(final)
        os.replace(tmp, final)
        fsync_dir(args.output_dir)
        for old in checkpoint_steps(args.output_dir)[: -args.keep_last]:
            discard_checkpoint(os.path.join(args.output_dir, f"checkpoint-{old}"))
        log(f"saved {final}")
    barrier()


def append_log(log_path, metrics):
    with disk_write("log.jsonl", os.path.dirname(log_path)):
        with open(log_path, "a") as f:
            f.write(json.dumps(metrics) + "\n")


def trim_log(log_path, step):
    """Keep the log lines of steps up to `step`: resuming logs the later ones again. A line a kill or
    a full disk cut short is dropped too. Rewritten atomically: a kill meanwhile loses no line."""
    kept = []
    with open(log_path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                if line.endswith("\n") and json.loads(line)["step"] <= step:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):  # not one of our complete lines
                pass
    with disk_write("log.jsonl", os.path.dirname(log_path)):
        atomic_write_text(log_path, "".join(kept))


def resume_checkpoint(args, model, engine, optimizer, scaler):
    """Load model, optimizer, step and RNG states; returns the step to continue from. The data
    position and the learning rate are functions of the step, so they follow."""
    if args.resume == "latest":
        steps = checkpoint_steps(args.output_dir)
        if not steps:
            fail(f"--resume: no checkpoint-* folder in {args.output_dir}")
        path = os.path.join(args.output_dir, f"checkpoint-{steps[-1]}")
    else:
        path = args.resume
    if not os.path.isdir(path):
        fail(f"--resume: checkpoint {path} not found")
    try:
        if engine is not None:
            _, client_state = engine.load_checkpoint(path, tag="deepspeed", load_module_strict=False)
            if client_state is None:
                raise ValueError("no DeepSpeed state in it")
            step = client_state["step"]
        else:
            state = torch.load(os.path.join(path, "trainer_state.pt"), map_location="cpu", weights_only=True)
            trainable = {name for name, p in model.named_parameters() if p.requires_grad}
            if set(state["trainable"]) != trainable:
                raise ValueError("its trainable parameters differ from this run's (other LoRA or model flags?)")
            model.load_state_dict(state["trainable"], strict=False)
            optimizer.load_state_dict(state["optimizer"])
            scaler.load_state_dict(state["scaler"])
            step = state["step"]
    except SystemExit:
        raise
    except Exception as e:
        fail(f"--resume: cannot load {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    rng_path = os.path.join(path, f"rng_state_{RANK}.pt")
    if os.path.exists(rng_path):
        set_rng_state(torch.load(rng_path, weights_only=True))
    else:
        log(f"warning: {path} has no RNG state for rank {RANK}; dropout will differ from an unbroken run")
    log(f"resumed from {path} at step {step}")
    return step


def merge_lora(args):
    """Adapter checkpoint -> one plain model (base weights + LoRA deltas) for from_pretrained."""
    from peft import PeftModel
    checkpoint = args.merge_lora.rstrip("/")
    run_args_path = os.path.join(checkpoint, "run_args.json")
    if not os.path.isfile(os.path.join(checkpoint, "adapter_config.json")) or not os.path.isfile(run_args_path):
        fail(f"--merge-lora: {checkpoint} is not a LoRA checkpoint of train_ds.py (no adapter_config.json/run_args.json)")
    try:
        with open(run_args_path, encoding="utf-8") as f:
            run = json.load(f)
    except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8
        fail(f"--merge-lora: cannot read {run_args_path} ({e}): it is not a checkpoint of train_ds.py")
    if not isinstance(run, dict) or not isinstance(run.get("model"), str):
        fail(f"--merge-lora: {run_args_path} names no base model: it is not a checkpoint of train_ds.py")
    output_dir = (args.output_dir or checkpoint + "-merged").rstrip("/")
    if os.path.exists(output_dir) and (not os.path.isdir(output_dir) or os.listdir(output_dir)):
        fail(f"--merge-lora: {output_dir} already exists and is not an empty folder; pass another --output-dir")
    remote_code = run.get("trust_remote_code", False)
    dtype = choose_dtype(args)  # full precision weights, never 4-bit: merging into nf4 would lose the delta
    model = AutoModelForImageTextToText.from_pretrained(run["model"], dtype=dtype, trust_remote_code=remote_code)
    model = PeftModel.from_pretrained(model, checkpoint).merge_and_unload()
    tmp = temp_path(output_dir)  # this process's own name (its pid): a folder of the user's is never touched
    with disk_write(f"the merged model {output_dir}", os.path.dirname(os.path.abspath(output_dir)),
                    then="free disk space and merge again", partial=tmp):
        model.save_pretrained(tmp)
        AutoProcessor.from_pretrained(checkpoint, trust_remote_code=remote_code).save_pretrained(tmp)
        if os.path.exists(output_dir):
            os.rmdir(output_dir)  # empty, checked above
        os.replace(tmp, output_dir)
    print(f"merged {checkpoint} into {run['model']} and wrote {output_dir}")


# -----------------------------------------------------------------------------

def choose_dtype(args):
    if args.bf16 or args.fp16 or args.fp32:
        if args.bf16 and torch.cuda.is_available() and not has_native_bf16():
            fail(f"{torch.cuda.get_device_name()} has no bfloat16: use --fp16")
        return torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32
    name = resolve_dtype("auto", "cuda" if torch.cuda.is_available() else "cpu")  # native bf16 only, as train.py
    return getattr(torch, name)


def deepspeed_config(args, dtype):
    try:
        with open(args.deepspeed, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8
        fail(f"--deepspeed {args.deepspeed}: {e}")
    if not isinstance(config, dict) or not isinstance(config.get("zero_optimization", {}), dict):
        fail(f"--deepspeed {args.deepspeed}: a DeepSpeed config is a JSON object (see ds_config.json)")
    # one source of truth: these come from the flags, whatever the file says
    config.update(train_micro_batch_size_per_gpu=args.batch_size, gradient_accumulation_steps=args.gradient_accumulation_steps,
                  train_batch_size=args.batch_size * args.gradient_accumulation_steps * WORLD_SIZE,
                  gradient_clipping=args.grad_clip,  # 0: no clipping, as without DeepSpeed
                  bf16={"enabled": dtype == torch.bfloat16},
                  fp16={"enabled": dtype == torch.float16, "loss_scale": 0, "initial_scale_power": 16})
    if "auto" in json.dumps(config):
        fail(f"--deepspeed {args.deepspeed}: replace the \"auto\" values with numbers (this script fills in only batch size, precision and clipping)")
    return config


def main(argv=None):
    global RANK, WORLD_SIZE
    args = parse_args(argv)
    if args.merge_lora:
        return merge_lora(args)
    args.output_dir = args.output_dir or "out-vlm"
    use_deepspeed = not args.no_deepspeed
    if use_deepspeed:  # set by the launcher (deepspeed, torchrun); `python train_ds.py` alone is one process
        RANK, WORLD_SIZE = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    dtype = choose_dtype(args)
    ds_config = deepspeed_config(args, dtype) if use_deepspeed else None
    zero3 = bool(ds_config) and ds_config.get("zero_optimization", {}).get("stage", 0) == 3
    check_args(args, zero3)
    # data first: a bad file or record should stop us before minutes of model loading
    train_samples = [] if args.benchmark else read_samples(args.data, args.image_folder)
    eval_samples = read_samples(args.eval_data, args.image_folder) if args.eval_data else []
    if use_deepspeed:
        import deepspeed
        for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29500").items():
            os.environ.setdefault(key, value)
        deepspeed.init_distributed(dist_backend=None if torch.cuda.is_available() else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.manual_seed(args.seed)

    processor = load_processor(args)
    if not args.benchmark:
        train_samples = measure_samples(args.data, train_samples, processor, args)
    if args.eval_data:
        eval_samples = measure_samples(args.eval_data, eval_samples, processor, args)
    output_lock = claim_output_dir(args)  # noqa: F841 -- held while we run; nothing was written before
    samples_per_step = args.batch_size * args.gradient_accumulation_steps * WORLD_SIZE
    if args.benchmark:
        count = samples_per_step * (args.max_steps if args.max_steps is not None else 10)
        with disk_write("the benchmark images", args.output_dir, then="free disk space and run again"):
            train_samples = synthetic_samples(os.path.join(args.output_dir, "synthetic-images"), count,
                                              args.benchmark_image_size, args.benchmark_text_words, args.seed)
    max_steps = args.max_steps if args.max_steps is not None else \
        max(1, math.ceil(args.epochs * len(train_samples) / samples_per_step))
    log(f"{len(train_samples)} training samples, {samples_per_step} per step, {max_steps} steps")
    if RANK == 0:
        import plan  # one line: expected peak memory, tokens per step, time; warns if it will not fit
        log(plan.vlm_startup_line(args, WORLD_SIZE, device, max_steps, ds_config))

    model_path = args.model
    if args.random_init:  # save random weights once, then load them the normal way (4-bit needs from_pretrained)
        model_path = os.path.join(args.output_dir, "random-init")
        if RANK == 0 and not os.path.exists(model_path):
            config = AutoConfig.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
            random_model = AutoModelForImageTextToText.from_config(config, trust_remote_code=args.trust_remote_code)
            with disk_write("the random-init weights", args.output_dir, "free disk space and run again", partial=model_path):
                random_model.save_pretrained(model_path)
        barrier()
    if zero3:
        from transformers.integrations import HfDeepSpeedConfig
        keep_alive = HfDeepSpeedConfig(ds_config)  # noqa: F841 -- makes from_pretrained load ZeRO-3 partitioned
    model = load_model(args, model_path, dtype, device, zero3)
    trainable = [p for p in model.parameters() if p.requires_grad]
    parameter_count = lambda params: sum(getattr(p, "ds_numel", p.numel()) for p in params)  # ZeRO-3: numel() is 0
    log(f"{parameter_count(trainable):,} trainable of {parameter_count(model.parameters()):,} parameters")

    engine, scaler = None, torch.amp.GradScaler(enabled=dtype == torch.float16 and not use_deepspeed)
    if use_deepspeed:
        offload = ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none") != "none"
        if offload:  # ZeRO-Offload steps the optimizer on the CPU with DeepSpeed's own Adam
            from deepspeed.ops.adam import DeepSpeedCPUAdam
            optimizer = DeepSpeedCPUAdam(trainable, lr=args.learning_rate, weight_decay=args.weight_decay)
        else:
            optimizer = torch.optim.AdamW(trainable, lr=args.learning_rate, weight_decay=args.weight_decay)
        engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    else:
        for param in trainable:  # fp32 master weights; the forward runs under autocast
            param.data = param.data.float()
        if not args.use_4bit:  # 4-bit weights were placed by device_map and must not be moved
            model.to(device)
        optimizer = torch.optim.AdamW(trainable, lr=args.learning_rate, weight_decay=args.weight_decay,
                                      fused=device.type == "cuda")
    start_step = resume_checkpoint(args, model, engine, optimizer, scaler) if args.resume else 0

    # the schedule and the data order are pure functions of the step: resuming restores both
    def get_lr(step):
        if step < args.warmup_steps:
            return args.learning_rate * (step + 1) / (args.warmup_steps + 1)
        progress = (step - args.warmup_steps) / max(1, max_steps - args.warmup_steps)
        return args.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))

    @functools.lru_cache(maxsize=4)
    def epoch_order(epoch):
        return torch.randperm(len(train_samples), generator=torch.Generator().manual_seed(args.seed + epoch)).tolist()

    def get_batch(step, micro_step):
        first = ((step * args.gradient_accumulation_steps + micro_step) * WORLD_SIZE + RANK) * args.batch_size
        picked = [train_samples[epoch_order(p // len(train_samples))[p % len(train_samples)]]
                  for p in range(first, first + args.batch_size)]
        return encode(picked, processor, dummy_image_size=dummy_size).to(device)

    dummy_size = int(math.sqrt(args.min_pixels)) if zero3 else None
    autocast = torch.autocast(device.type, dtype=dtype) if not use_deepspeed and dtype != torch.float32 else nullcontext()
    forward = engine if engine is not None else model

    @torch.no_grad()
    def estimate_eval_loss():
        # every rank scores every eval sample: ranks run the same forwards (ZeRO-3 needs that)
        forward.eval()
        losses = []
        for start in range(0, len(eval_samples), args.batch_size):
            with autocast:
                batch = encode(eval_samples[start:start + args.batch_size], processor, dummy_size).to(device)
                losses.append(forward(**batch).loss.item())
        forward.train()
        return sum(losses) / len(losses)

    os.makedirs(args.output_dir, exist_ok=True)
    log_path = os.path.join(args.output_dir, "log.jsonl")
    if RANK == 0 and os.path.exists(log_path) and not args.benchmark:
        trim_log(log_path, start_step)
    wandb_run = init_wandb(args.wandb_project, os.path.basename(os.path.abspath(args.output_dir)), vars(args)) \
        if args.wandb and RANK == 0 else None

    # SIGTERM (spot instances, schedulers) or Ctrl-C: finish the step, save, exit cleanly
    stop_signals = []
    previous_handlers = {sig: signal.signal(sig, lambda signum, frame: stop_signals.append(signum))
                         for sig in (signal.SIGTERM, signal.SIGINT)}
    forward.train()
    step_times, step_tokens = [], []
    nonfinite_in_a_row = nonfinite_total = 0
    for step in range(start_step, max_steps):
        lr = get_lr(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.time()
        loss_sum, tokens = 0.0, 0
        for micro_step in range(args.gradient_accumulation_steps):
            batch = get_batch(step, micro_step)
            tokens += int(batch["attention_mask"].sum())
            with autocast:
                loss = forward(**batch).loss
            if engine is not None:
                # DeepSpeed scales by 1/accumulation and steps at the boundary; ZeRO (stages 1-3) skips
                # the update and clears the gradients when their norm is not finite (was_step_applied())
                engine.backward(loss)
                engine.step()
            else:
                scaler.scale(loss / args.gradient_accumulation_steps).backward()
            loss_sum += loss.item() / args.gradient_accumulation_steps
        loss_mean = mean_over_ranks(loss_sum)  # NaN/inf on any rank makes it so on every rank: one decision
        finite = math.isfinite(loss_mean)
        if engine is None:
            scaler.unscale_(optimizer)
            # --grad-clip 0: no clipping (as DeepSpeed's gradient_clipping 0), but the norm still flags inf/NaN
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, args.grad_clip if args.grad_clip > 0 else math.inf)
            finite = finite and (math.isfinite(grad_norm) or scaler.is_enabled())  # fp16: the scaler skips overflows
            if finite:
                scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.time() - t0
        tokens_all = mean_over_ranks(tokens) * WORLD_SIZE
        step_times.append(elapsed)
        step_tokens.append(tokens_all)
        done = step + 1
        if done % args.log_steps == 0 or done == max_steps:
            metrics = {"step": done, "loss": loss_mean, "lr": lr, "samples_per_s": samples_per_step / elapsed,
                       "tokens_per_s": tokens_all / elapsed, "peak_memory_gib": peak_memory_gib()}
            log(f"step {done}/{max_steps} | loss {loss_mean:.4f} | lr {lr:.2e} | {metrics['samples_per_s']:.2f} samples/s "
                f"| {metrics['tokens_per_s']:.0f} tokens/s | peak mem {metrics['peak_memory_gib']:.2f} GiB")
            if RANK == 0 and not args.benchmark:
                append_log(log_path, metrics)
            if wandb_run:
                wandb_run.log(metrics, step=done)
        nonfinite_in_a_row = 0 if finite else nonfinite_in_a_row + 1
        nonfinite_total += not finite
        if not finite:
            log(f"step {done}: loss not finite, step skipped ({nonfinite_in_a_row} in a row)")
        if nonfinite_in_a_row >= args.max_nonfinite_steps:
            saved = checkpoint_steps(args.output_dir)
            fail(f"loss was not finite for {nonfinite_in_a_row} steps in a row (last at step {done}): lower "
                 f"--learning-rate, or use --bf16 instead of --fp16; the last checkpoint "
                 f"({f'checkpoint-{saved[-1]}' if saved else 'none saved yet'}) is untouched")
        stopping = mean_over_ranks(len(stop_signals)) > 0  # every rank must take the same decision
        # no save while the loss is not finite: the weights may be ruined, the last good checkpoint stays
        if not args.benchmark and not nonfinite_in_a_row and (done % args.save_steps == 0 or done == max_steps or stopping):
            if eval_samples and not stopping:
                eval_loss = estimate_eval_loss()
                log(f"step {done} | eval loss {eval_loss:.4f}")
                if wandb_run:
                    wandb_run.log({"eval_loss": eval_loss}, step=done)
            save_checkpoint(done, model, engine, optimizer, scaler, processor, args, zero3)
        if stopping:
            log(f"stopped by a signal after step {done}; continue with --resume")
            break
    for sig, handler in previous_handlers.items():
        signal.signal(sig, handler)
    if nonfinite_total:
        log(f"{nonfinite_total} step(s) skipped for a non-finite loss")

    if args.benchmark:  # median over the steps after a warm-up step or two
        measured = slice(min(2, len(step_times) - 1), None)
        seconds = statistics.median(step_times[measured])
        result = {"benchmark": "train_ds", "model": args.model, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                  "torch": torch.__version__, "world_size": WORLD_SIZE, "use_lora": args.use_lora, "use_4bit": args.use_4bit,
                  "dtype": str(dtype).replace("torch.", ""), "samples_per_step": samples_per_step, "ms_per_step": 1000 * seconds,
                  "samples_per_s": samples_per_step / seconds, "tokens_per_s": statistics.median(step_tokens[measured]) / seconds,
                  "peak_memory_gib": peak_memory_gib()}
        log(json.dumps(result))
    if wandb_run:
        wandb_run.finish()


if __name__ == "__main__":
    main()
