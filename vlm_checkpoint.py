"""
train_ds.py's checkpoints: written to a temp folder, synced, then renamed into place, so a crash
or a full disk never leaves half a checkpoint; under ZeRO-3 the weights are gathered from every
rank first. Resuming restores the weights, the optimizer, the step and every rank's RNG state.
"""
import functools
import json
import os
import re
import shutil

import torch

from configurator import UserError
from files import (
    atomic_torch_save,
    disk_write,
    fsync_dir,
    lock_folder,
    remove_dead_temps,
    remove_stale_temps,
    temp_path,
)
from runtime import barrier, rank, say, world_size
from training import get_rng_state, set_rng_state
from vlm_data import load_processor
from vlm_model import from_pretrained


def gathered_state_dict(model, trainable_only):
    """name -> full CPU tensor. Under ZeRO-3 each rank holds a slice of every parameter; gather
    them one at a time (saving without this writes an empty adapter). Collective: call on all ranks."""
    state = {}
    for name, param in model.named_parameters():
        if trainable_only and not param.requires_grad:
            continue
        if hasattr(param, "ds_id"):  # partitioned by ZeRO-3 (DeepSpeed's own test)
            import deepspeed
            with deepspeed.zero.GatheredParameters([param]):
                state[name] = param.detach().cpu().clone() if rank() == 0 else None
        else:
            state[name] = param.detach().cpu().clone()
    return state


def newest_checkpoint(folder):
    """folder's checkpoint-N with the largest N, or None."""
    steps = checkpoint_steps(folder)
    return os.path.join(folder, f"checkpoint-{steps[-1]}") if steps else None


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
    if rank() != 0:
        return None
    lock = lock_folder(args.output_dir, "--output-dir")
    for name in os.listdir(args.output_dir):
        if re.fullmatch(CHECKPOINT_TEMPS, name) and os.path.isdir(os.path.join(args.output_dir, name)):
            shutil.rmtree(os.path.join(args.output_dir, name))
    remove_stale_temps(args.output_dir, r"log\.jsonl")
    return lock


def discard_checkpoint(path):
    # rename, then delete: a kill halfway leaves a .tmp folder (removed at the next start), never half a checkpoint
    trash = os.path.join(os.path.dirname(path), ".tmp-" + os.path.basename(path) + "-old")
    os.replace(path, trash)
    shutil.rmtree(trash)


def save_checkpoint(step, engine, processor, args):
    final = os.path.join(args.output_dir, f"checkpoint-{step}")
    tmp = os.path.join(args.output_dir, f".tmp-checkpoint-{step}")
    saving = functools.partial(disk_write, f"checkpoint-{step}", args.output_dir, partial=tmp if rank() == 0 else None)
    if rank() == 0:
        with saving():
            os.makedirs(tmp)
    barrier()
    # one gather: a full fine-tune saves every weight, and the trainable ones are among them
    weights = gathered_state_dict(engine.model, trainable_only=args.use_lora)
    trainable = {name: weights[name] for name, param in engine.model.named_parameters() if param.requires_grad}
    with saving():
        if rank() == 0:  # LoRA: adapter_model.safetensors + adapter_config.json (modules_to_save included)
            engine.model.save_pretrained(tmp, state_dict=weights)
            processor.save_pretrained(tmp)
            with open(os.path.join(tmp, "run_args.json"), "w") as f:
                json.dump(dict(vars(args), world_size=world_size(), model_type=engine.model.config.model_type), f,
                          indent=2)
        engine.save_state(tmp, step, trainable)  # optimizer and step: DeepSpeed's files, or trainer_state.pt
        atomic_torch_save(get_rng_state(), os.path.join(tmp, f"rng_state_{rank()}.pt"))
    barrier()
    if rank() == 0:
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
        say(f"saved {final}")
    barrier()


# what a resume must share with the run it continues, and what it may change at the cost of the
# exact data order
SAME_MODEL = ("use_lora", "use_4bit", "lora_r", "lora_alpha", "lora_target_modules", "vision_lora", "modules_to_save",
              "train_projector", "train_vision")
SAME_DATA_ORDER = ("data", "batch_size", "gradient_accumulation_steps", "world_size", "seed")


def resume_path(args):
    """The checkpoint --resume names (or the newest in --output-dir), checked against this run's flags
    before anything slow: another model or other trainable parts are refused, another data order noted."""
    path = newest_checkpoint(args.output_dir) if args.resume in ("latest", "auto") else args.resume
    if path is None and args.resume == "auto":
        return None  # nothing yet: a new run
    if path is None:
        raise UserError(f"--resume: no checkpoint-* folder in {args.output_dir}")
    if not os.path.isdir(path):
        raise UserError(f"--resume: checkpoint {path} not found")
    try:
        with open(os.path.join(path, "run_args.json"), encoding="utf-8") as f:
            trained = json.load(f)
    except (OSError, ValueError):
        trained = None
    if not isinstance(trained, dict):
        raise UserError(f"--resume: {path} is not a checkpoint of train_ds.py (it has no readable run_args.json): "
             f"give a checkpoint-N folder")
    if not same_model(trained.get("model"), args.model):
        raise UserError(f"--resume: {path} was trained from --model {trained.get('model')}, not {args.model}: "
                        "resume with that --model, or start a new run in another --output-dir")
    now = dict(vars(args), world_size=world_size())
    for key in SAME_MODEL:
        if key in trained and trained[key] != now[key]:
            flag = "--" + key.replace("_", "-")
            raise UserError(f"--resume: {path} was trained with {flag} {trained[key]}, this run has {now[key]}: "
                            "resume with the flags it was trained with, or start a new run in another --output-dir")
    for key in SAME_DATA_ORDER:
        if key in trained and trained[key] != now[key]:
            say(f"note: {key.replace('_', ' ')} {now[key]} where {path} had {trained[key]}: the samples from here on "
                "are not those of an unbroken run")
    return path


def same_model(trained, given):
    if isinstance(trained, str) and os.path.isdir(trained) and os.path.isdir(given):
        return os.path.samefile(trained, given)  # one folder, however it is spelled
    return trained == given


def resume_checkpoint(path, engine):
    """Load model, optimizer, step and RNG states; returns the step to continue from. The data
    position and the learning rate are functions of the step, so they follow."""
    try:
        step = engine.load_state(path)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"--resume: cannot load {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    rng_path = os.path.join(path, f"rng_state_{rank()}.pt")
    if os.path.exists(rng_path):
        set_rng_state(torch.load(rng_path, weights_only=True))
    else:
        say(f"warning: {path} has no RNG state for rank {rank()}; dropout will differ from an unbroken run")
    say(f"resumed from {path} at step {step}")
    return step


# -----------------------------------------------------------------------------
# --merge-lora: an adapter checkpoint as one plain model

def merge_lora(args):
    """Adapter checkpoint -> one plain model (base weights + LoRA deltas) for from_pretrained."""
    from peft import PeftModel
    checkpoint = args.merge_lora.rstrip("/")
    if not os.path.isfile(os.path.join(checkpoint, "adapter_config.json")):  # an --output-dir: its newest, as --resume
        checkpoint = newest_checkpoint(checkpoint) or checkpoint
    run_args_path = os.path.join(checkpoint, "run_args.json")
    if not os.path.isfile(os.path.join(checkpoint, "adapter_config.json")) or not os.path.isfile(run_args_path):
        raise UserError(f"--merge-lora: {checkpoint} is not a LoRA checkpoint of train_ds.py (no "
                        "adapter_config.json/run_args.json)")
    try:
        with open(run_args_path, encoding="utf-8") as f:
            run = json.load(f)
    except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8
        raise UserError(f"--merge-lora: cannot read {run_args_path} ({e}): it is not a checkpoint of train_ds.py")
    if not isinstance(run, dict) or not isinstance(run.get("model"), str):
        raise UserError(f"--merge-lora: {run_args_path} names no base model: it is not a checkpoint of train_ds.py")
    output_dir = (args.output_dir or checkpoint + "-merged").rstrip("/")
    if os.path.exists(output_dir) and (not os.path.isdir(output_dir) or os.listdir(output_dir)):
        raise UserError(f"--merge-lora: {output_dir} already exists and is not an empty folder; pass another "
                        "--output-dir")
    remote_code = args.trust_remote_code  # from this command line only: a checkpoint's files never turn it on
    remove_dead_temps(output_dir)  # what a killed merge into the same folder left behind
    # full precision weights, never 4-bit (merging into nf4 would lose the delta); by default the base
    # model's own dtype (its config's), so the merged model is as large as the base, not fp32
    dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32 if args.fp32 else "auto"
    model = from_pretrained(run["model"], dtype=dtype, trust_remote_code=remote_code)
    model = PeftModel.from_pretrained(model, checkpoint).merge_and_unload()
    tmp = temp_path(output_dir)  # this process's own name (its pid): a folder of the user's is never touched
    with disk_write(f"the merged model {output_dir}", os.path.dirname(os.path.abspath(output_dir)),
                    then="free disk space and merge again", partial=tmp):
        model.save_pretrained(tmp)
        load_processor(checkpoint, remote_code, run.get("min_pixels"), run.get("max_pixels")).save_pretrained(tmp)
        if os.path.exists(output_dir):
            os.rmdir(output_dir)  # empty, checked above
        os.replace(tmp, output_dir)
    print(f"merged {checkpoint} into {run['model']} and wrote {output_dir}")
