"""
Fine-tune a vision-language model (Qwen2-VL, Qwen2.5-VL, LLaVA-1.5, ...) on images with
questions and answers: LoRA or QLoRA, on one GPU or many with DeepSpeed ZeRO.

    python data/vlm_demo/prepare.py
    python train_ds.py --no-deepspeed --use-lora          # one GPU, or a CPU for a smoke run
    deepspeed --num_gpus=2 train_ds.py --use-4bit --use-lora --batch-size 1 --gradient-accumulation-steps 8
    python train_ds.py --merge-lora out-vlm/checkpoint-100   # adapter + base -> one plain model

The heavy lifting is done by the model's own processor and chat template (transformers), peft,
bitsandbytes and DeepSpeed. Our own code: reading and checking the data, masking the loss to the
assistant's replies (vlm_data.py), checkpoints that survive crashes and ZeRO-3. `--help`: every flag.

The loss is on the assistant's replies only (with their end-of-turn token), averaged over every label
token of the global batch; long samples are never cut. Checkpoints are atomic and resume bit for bit
(--resume, or --resume auto for one command that starts and restarts a run); --save-minutes and
--max-hours suit spot GPUs and time limits. How each works, and why: docs/VLM.md.
"""


import functools
import importlib.util
import itertools
import json
import math
import os
import re
import signal
import statistics
import sys
import time
from contextlib import nullcontext
from types import SimpleNamespace

if __name__ == "__main__":  # Ctrl-C during the slow imports below: one line, not a traceback (training sets its own)
    signal.signal(signal.SIGINT, lambda *_: sys.exit("interrupted while starting: nothing was trained"))
if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # before torch starts its threads: the deepspeed launcher sets no
    # count (torchrun sets 1), and N processes that each use every core thrash (3x slower on a 2-core CPU)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // int(os.environ["WORLD_SIZE"]))))

import torch  # noqa: E402
from transformers import AutoConfig  # noqa: E402

import hardware  # noqa: E402
import training  # noqa: E402
from configurator import UserError, one_line_errors  # noqa: E402
from files import atomic_torch_save, disk_write, trim_jsonl  # noqa: E402
from memory import vlm_arch, vlm_checkpointing, vlm_flops_per_sample, vlm_start_line  # noqa: E402
from runtime import autocast, barrier, exit_processes, peak_memory_gib, rank, resolve_dtype, say, world_size  # noqa: E402
from vlm_checkpoint import (  # noqa: E402
    checkpoint_steps,
    claim_output_dir,
    merge_lora,
    resume_checkpoint,
    resume_path,
    save_checkpoint,
)
from vlm_data import (  # noqa: E402
    Batches,
    eval_indices,
    load_processor,
    measure_samples,
    measures_cache,
    read_samples,
    save_measures,
    synthetic_samples,
    train_indices,
)
from vlm_eval import score, summary  # noqa: E402
from vlm_model import load_model, param_groups  # noqa: E402
from vlm_settings import check_flags, deepspeed_config, parse_args  # noqa: E402


def check_args(args, zero3, dtype):
    """Every setting alone and together (vlm_settings.check_flags), then against this machine and
    --output-dir, before anything slow. Picks the attention implementation when none is given."""
    check_flags(args)
    check_attention(args, dtype)
    if args.no_deepspeed and world_size() > 1:
        raise UserError(f"--no-deepspeed runs one process, but the launcher started {world_size()}: drop "
                        "--no-deepspeed (DeepSpeed shares the work between them), or run python train_ds.py without a "
                        "launcher")
    if args.use_4bit:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise UserError("--use-4bit needs bitsandbytes: pip install bitsandbytes")
    if args.eval_generate and zero3:  # one rank generating alone would wait forever for the others' weights
        raise UserError("--eval-generate runs on rank 0 alone, which ZeRO-3's split weights cannot: use ZeRO-2 "
                        "(ds_config.json), or score checkpoints afterwards with sample_vlm.py")
    if args.use_4bit and zero3 and not (args.bf16 or args.fp16):
        raise UserError("--use-4bit with ZeRO-3 works only when the 4-bit weights are stored in the training dtype: "
             "add --bf16 (or --fp16), or use ds_config.json (ZeRO-2)")
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise UserError(f"--output-dir {args.output_dir} is a file, not a folder: choose another --output-dir")
    if not args.benchmark and checkpoint_steps(args.output_dir) and not args.resume:
        raise UserError(f"{args.output_dir} already holds checkpoints; pass --resume to continue, or another "
                        "--output-dir")


def check_attention(args, dtype):
    flash_ready = (importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()
                   and dtype != torch.float32)
    if args.attn_implementation is None:
        args.attn_implementation = "flash_attention_2" if flash_ready else "sdpa"
    elif args.attn_implementation == "flash_attention_2" and not flash_ready:
        raise UserError("--attn-implementation flash_attention_2 needs a GPU, a 16-bit dtype (--bf16/--fp16) and the "
                        "flash-attn package (pip install flash-attn --no-build-isolation): use sdpa instead")


def choose_dtype(args):
    """--bf16/--fp16/--fp32, else what train.py's dtype='auto' picks (bf16 where the GPU has it natively)."""
    asked = "bfloat16" if args.bf16 else "float16" if args.fp16 else "float32" if args.fp32 else "auto"
    name = resolve_dtype(asked, "cuda" if torch.cuda.is_available() else "cpu", fp16_flag="--fp16")
    if asked == "auto" and name == "float16" and is_qwen(args):
        say("warning: this GPU has no bfloat16, so training runs in fp16, in which Qwen2 models are known to overflow "
            "(NaN losses): if they appear, use --fp32 or a GPU with bfloat16")
    return getattr(torch, name)


def is_qwen(args):
    try:
        config = AutoConfig.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
        return config.model_type.startswith("qwen")
    except (OSError, ValueError):  # no readable config: load_processor says so in one line, later
        return False


# -----------------------------------------------------------------------------
# processes: one, or one per GPU under DeepSpeed (the helpers are no-ops in a single process)

ONE_PROCESS = dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29500")


def start_processes(ds_config):
    """This process's device; under DeepSpeed, after joining the other processes (gloo on CPUs). Returns
    (device, the launcher variables set here for a lone DeepSpeed process: main() removes them at the end)."""
    added = {}
    if ds_config is not None:
        import deepspeed
        added = {key: value for key, value in ONE_PROCESS.items() if key not in os.environ}
        os.environ.update(added)
        deepspeed.init_distributed(dist_backend=None if torch.cuda.is_available() else "gloo")
        one_line_errors()  # again: the process group's own hook prefixes every line of stderr with the rank
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device, added


# -----------------------------------------------------------------------------
# engine: DeepSpeed or plain PyTorch, chosen once in main(). Both give the loop and the checkpoints
# the same: model, forward (the module to call), optimizer, peak_lrs, autocast, backward(loss), clip()
# (the norm as a device tensor, or None where DeepSpeed clips and grad_norm() reads it), step(finite,
# grad_norm), save_state(folder, step, trainable_state) and load_state(folder)

class DeepSpeedEngine:
    """DeepSpeed scales each loss by 1/accumulation and steps at the boundary; ZeRO (stages 1-3)
    skips the update and clears the gradients when their norm is not finite."""

    def __init__(self, args, model, ds_config):
        import deepspeed
        groups = param_groups(model, args)
        if ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none") != "none":
            from deepspeed.ops.adam import DeepSpeedCPUAdam  # ZeRO-Offload steps on the CPU with its own Adam
            optimizer = DeepSpeedCPUAdam(groups, lr=args.learning_rate, weight_decay=args.weight_decay)
        else:
            optimizer = torch.optim.AdamW(groups, lr=args.learning_rate, weight_decay=args.weight_decay)
        self.forward, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        self.model, self.peak_lrs, self.autocast = model, [g["peak_lr"] for g in groups], nullcontext()

    def backward(self, loss):  # the loss is already this micro-batch's share of the global batch's mean, and
        self.forward.backward(loss * world_size(), scale_wrt_gas=False)  # ZeRO averages gradients over the ranks
        self.forward.step()

    def clip(self):  # DeepSpeed clips at its step
        return None

    def grad_norm(self):
        norm = self.forward.get_global_grad_norm()
        return math.nan if norm is None else float(norm)

    def step(self, finite, grad_norm):  # DeepSpeed skipped a non-finite update itself
        return finite

    def save_state(self, folder, step, trainable_state):  # the optimizer (sharded per rank under ZeRO) and the step
        self.forward.save_checkpoint(folder, tag="deepspeed", client_state={"step": step},
                                     exclude_frozen_parameters=True)

    def load_state(self, folder):
        _, client_state = self.forward.load_checkpoint(folder, tag="deepspeed", load_module_strict=False)
        if client_state is None:
            raise ValueError("no DeepSpeed state in it")
        return client_state["step"]


class PlainEngine:
    """One process: fp32 master weights, the forward under autocast, AdamW, a GradScaler for fp16."""

    def __init__(self, args, model, device, dtype):
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        for param in self.trainable:
            param.data = param.data.float()
        if not args.use_4bit:  # 4-bit weights were placed by device_map and must not be moved
            model.to(device)
        groups = param_groups(model, args)
        self.optimizer = torch.optim.AdamW(groups, lr=args.learning_rate, weight_decay=args.weight_decay,
                                           fused=device.type == "cuda")
        self.scaler = torch.amp.GradScaler(enabled=dtype == torch.float16)
        self.model = self.forward = model
        self.peak_lrs, self.grad_clip = [g["peak_lr"] for g in groups], args.grad_clip
        self.autocast = autocast(device.type, dtype)

    def backward(self, loss):  # the loss is already this micro-batch's share of the step's mean
        self.scaler.scale(loss).backward()

    def clip(self):  # --grad-clip 0: no clipping (as DeepSpeed's gradient_clipping 0); the norm still flags inf/NaN
        self.scaler.unscale_(self.optimizer)
        return torch.nn.utils.clip_grad_norm_(self.trainable, self.grad_clip if self.grad_clip > 0 else math.inf)

    def step(self, finite, grad_norm):
        finite = finite and (math.isfinite(grad_norm) or self.scaler.is_enabled())  # fp16: the scaler skips overflows
        if finite:
            self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return finite

    def save_state(self, folder, step, trainable_state):
        atomic_torch_save({"step": step, "trainable": trainable_state, "optimizer": self.optimizer.state_dict(),
                           "scaler": self.scaler.state_dict()}, os.path.join(folder, "trainer_state.pt"))

    def load_state(self, folder):
        state = torch.load(os.path.join(folder, "trainer_state.pt"), map_location="cpu", weights_only=True)
        if set(state["trainable"]) != {name for name, p in self.model.named_parameters() if p.requires_grad}:
            raise ValueError("its trainable parameters differ from this run's (other LoRA or model flags?)")
        self.model.load_state_dict(state["trainable"], strict=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        return state["step"]


# -----------------------------------------------------------------------------
# the loop: the schedule and the data order are pure functions of the step, so resuming restores both

def loader(samples, indices, order, data, args, device, run=None):
    """Batches of samples, encoded in --num-workers processes ahead of the GPU; `order` lists the items.
    Its own generator: the global RNG (dropout's, saved in checkpoints) must not feed the workers' seeds.
    A data error met while encoding (an image that header checks cannot catch: truncated) is its one line.
    The time spent waiting for each batch is added to run.data_s."""
    batches = torch.utils.data.DataLoader(Batches(samples, data.processor, indices, data.dummy_image), batch_size=None,
                                          sampler=order, num_workers=args.num_workers, pin_memory=device.type == "cuda",
                                          prefetch_factor=4 if args.num_workers else None,
                                          generator=torch.Generator().manual_seed(args.seed),
                                          worker_init_fn=functools.partial(start_worker,
                                                                           data.lock and data.lock.fileno()))
    batches, start = iter(batches), time.time()
    for batch in batches:
        if run is not None:
            run.data_s += time.time() - start
        if "error" in batch:
            raise UserError(batch["error"])
        yield batch
        start = time.time()


def start_worker(lock_fd, worker_id):
    """A worker is forked with our open files. Its copy of --output-dir's lock is closed, so the kernel
    frees the lock when we die (kill -9 included), not seconds later when orphaned workers notice. Its
    stderr goes quiet: its errors reach us through the DataLoader, and an orphan's are noise."""
    if lock_fd is not None:
        os.close(lock_fd)  # a worker ends with os._exit: its copy of the file object never closes it again
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)


def to_device(batch, device):
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


def labelled(batch):  # the tokens the loss is over (the model shifts labels by one)
    return int((batch["labels"][:, 1:] != -100).sum())


def sum_over_ranks(values, device):
    """Numbers or device tensors, summed over the ranks: one all-reduce, one host sync."""
    tensor = torch.stack([torch.as_tensor(value, dtype=torch.float64, device=device) for value in values])
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(tensor)
    return tensor.tolist()


def train_step(engine, batches, step_labels, flags, device):
    """Forward and backward over this rank's micro-batches of one step, then the update. Each
    micro-batch's mean loss is weighted by its share of the label tokens of the whole global batch
    (every micro-batch of every rank), so every token counts the same, as with HF Trainer's
    num_items_in_batch. Returns the step's loss, tokens, flags (stop, save now: true if any rank's is),
    grad norm and whether the update was applied: the same on every rank."""
    loss_sum, tokens = torch.zeros((), device=device), 0
    for batch in batches:
        tokens += int(batch["attention_mask"].sum())
        share = labelled(batch) / step_labels
        with engine.autocast:  # no KV cache in training; passed per call, so the saved config keeps the base's
            loss = engine.forward(**to_device(batch, device), use_cache=False).loss * share
        engine.backward(loss)
        loss_sum += loss.detach().float()
    grad_norm = engine.clip()  # plain: a device tensor, read in the one sync below; DeepSpeed: None (its own)
    totals = sum_over_ranks([loss_sum, tokens, *flags] + ([] if grad_norm is None else [grad_norm]), device)
    loss, grad_norm = totals[0], totals[4] if grad_norm is not None else engine.grad_norm()
    applied = engine.step(math.isfinite(loss), grad_norm)  # NaN on any rank: skipped on all
    return loss, int(totals[1]), [flag > 0 for flag in totals[2:4]], grad_norm, applied


@torch.no_grad()
def estimate_eval_loss(engine, data, args, device):
    """The eval set's loss per label token. Each rank scores its share of the batches; all run the
    same number of forwards (ZeRO-3 needs that), so one short of a batch re-scores batch 0 unweighted."""
    batches = math.ceil(len(data.eval) / args.batch_size)
    mine = range(rank(), math.ceil(batches / world_size()) * world_size(), world_size())
    indices = functools.partial(eval_indices, batch_size=args.batch_size, sample_count=len(data.eval))
    engine.forward.eval()
    loss_sum, count = torch.zeros((), device=device), 0
    for i, batch in zip(mine, loader(data.eval, indices, [i if i < batches else 0 for i in mine], data, args, device)):
        with engine.autocast:
            loss = engine.forward(**to_device(batch, device), use_cache=False).loss
        weight = labelled(batch) if i < batches else 0
        loss_sum, count = loss_sum + loss.float() * weight, count + weight
    engine.forward.train()
    loss_sum, count = sum_over_ranks([loss_sum, count], device)
    return loss_sum / count


def train(args, engine, data, device, start_step, max_steps):
    """Steps start_step..max_steps, a checkpoint every --save-steps (and --save-minutes); SIGTERM, Ctrl-C
    and a near --max-hours finish the step, save and stop. Returns each step's (seconds, tokens) for the
    benchmark. Rank 0's clock decides the timed saves and stop; the step's one all-reduce tells the others."""
    run = start_log(args, start_step)
    accumulation = args.gradient_accumulation_steps
    indices = functools.partial(train_indices, world_size=world_size(), batch_size=args.batch_size,
                                sample_count=len(data.train), seed=args.seed)
    micro_batches = iter(loader(data.train, functools.partial(indices, rank=rank()),
                                range(start_step * accumulation, max_steps * accumulation), data, args, device, run))
    stop_signals, restore_signal_handlers = training.catch_stop_signals()
    timings, nonfinite_in_a_row, nonfinite_total, elapsed = [], 0, 0, 0.0
    engine.forward.train()
    try:
        last = time.time()
        for step in range(start_step, max_steps):
            lr = set_learning_rates(engine, args, step, max_steps)
            step_labels = sum(data.label_tokens[i] for micro in range(step * accumulation, (step + 1) * accumulation)
                              for r in range(world_size()) for i in indices(micro, r))
            late = rank() == 0 and training.out_of_time(run.start, args.max_hours, 2 * elapsed + run.longest_save)
            flags = [len(stop_signals) + late, rank() == 0 and training.save_due(run.saved, args.save_minutes)]
            loss, tokens, (stopping, save_now), grad_norm, finite = train_step(
                engine, itertools.islice(micro_batches, accumulation), step_labels, flags, device)
            elapsed, last, done = time.time() - last, time.time(), step + 1  # the step's sync ends it
            timings.append((elapsed, tokens))
            if done % args.log_steps == 0 or done == max_steps:
                log_step(run, args, device, done, max_steps, loss, lr, grad_norm, tokens, elapsed)
            nonfinite_in_a_row = 0 if finite else nonfinite_in_a_row + 1
            nonfinite_total += not finite
            if not finite:
                stop_if_nonfinite(args, done, nonfinite_in_a_row)
            # no save while the loss is not finite: the weights may be ruined, the last good checkpoint stays
            scheduled = done % args.save_steps == 0 or done == max_steps
            if finite and not args.benchmark and (scheduled or stopping or save_now):  # timed saves skip the eval
                evaluate_and_save(run, engine, data, args, device, done, evaluate=scheduled and not stopping)
                run.saved, run.longest_save = time.time(), max(run.longest_save, time.time() - last)
                last = time.time()  # the next step's time excludes the save
            if stopping:
                say(f"{f'--max-hours {args.max_hours} is near' if late else 'stopped by a signal'}: saved after step "
                    f"{done}; continue with --resume (or the same command with --resume auto)")
                break
    finally:
        restore_signal_handlers()
    if nonfinite_total:
        say(f"{nonfinite_total} step(s) skipped for a non-finite loss")
    if run.wandb:
        run.wandb.finish()
    return timings


def start_log(args, start_step):
    """Where the metrics go (rank 0: log.jsonl, which a resume trims to the steps before its own, and
    wandb), the GPUs' telemetry, and the run's clocks: its start, its last save, the data wait."""
    path = os.path.join(args.output_dir, "log.jsonl") if rank() == 0 and not args.benchmark else None
    if path:  # "step": the name older runs gave the iteration
        trim_jsonl(path, lambda record: isinstance(record.get("iter", record.get("step")), int)
                   and record.get("iter", record.get("step")) <= start_step)
    name = os.path.basename(os.path.abspath(args.output_dir))
    wandb_run = training.init_wandb(args.wandb_project, name, vars(args)) if args.wandb and rank() == 0 else None
    gpus, now = hardware.open_gpu_telemetry(say) if rank() == 0 else [], time.time()
    return SimpleNamespace(path=path, wandb=wandb_run, start=now, first_step=start_step, gpus=gpus, hinted={},
                           saved=now, longest_save=0.0, window=now, data_s=0.0)


def set_learning_rates(engine, args, step, max_steps):
    """Each parameter group's rate on the shared cosine schedule, from its own peak (this run's, not a
    checkpoint's); returns the language model's (--learning-rate's) for the log."""
    for group, peak in zip(engine.optimizer.param_groups, engine.peak_lrs):
        group["lr"] = training.cosine_lr(step, peak, 0.1 * peak, args.warmup_steps, max_steps)
    return training.cosine_lr(step, args.learning_rate, 0.1 * args.learning_rate, args.warmup_steps, max_steps)


def log_step(run, args, device, done, max_steps, loss, lr, grad_norm, tokens, elapsed):
    samples_per_s = args.batch_size * args.gradient_accumulation_steps * world_size() / elapsed
    now = time.time()
    eta_s = (max_steps - done) * (now - run.start) / (done - run.first_step)
    extra, extra_text = training.long_run_fields(now - run.window, run.data_s, now - run.start, eta_s,
                                                 args.price_per_hour, run.gpus)
    run.window, run.data_s = now, 0.0
    record = {"iter": done, "loss": loss, "lr": lr, "grad_norm": grad_norm, "samples_per_s": samples_per_s,
              "tokens_per_s": tokens / elapsed, "peak_memory_gib": peak_memory_gib(device),
              "elapsed_s": round(now - run.start, 3), **extra}
    say(f"step {done}/{max_steps} | loss {loss:.4f} | lr {lr:.2e} | grad norm {grad_norm:.3f} | "
        f"{samples_per_s:.2f} samples/s | {record['tokens_per_s']:.0f} tokens/s | "
        f"peak mem {record['peak_memory_gib']:.2f} GiB | {extra_text}")
    training.log_metrics(run.path, run.wandb, record)
    for hint in training.slow_hints(extra, run.hinted, "raise --num-workers (they encode the images), or use a "
                                    "faster disk", "raise --batch-size (plan.py --vlm: what fits)"):
        say(hint)


def stop_if_nonfinite(args, done, in_a_row):
    say(f"step {done}: loss not finite, step skipped ({in_a_row} in a row)")
    saved = checkpoint_steps(args.output_dir)
    training.stop_if_diverged(in_a_row, args.max_nonfinite_steps, f"steps in a row (last at step {done})",
                     "lower --learning-rate, or use --bf16 instead of --fp16",
                     f"checkpoint-{saved[-1]}" if saved else None)


def evaluate_and_save(run, engine, data, args, device, done, evaluate):
    """The eval set's loss (if there is one, and not when a signal asks us to stop), then a checkpoint."""
    if data.eval and evaluate:
        record = {"iter": done, "val_loss": estimate_eval_loss(engine, data, args, device)}
        if args.eval_generate:
            record.update(generation_scores(engine, data, args, device))
        say(f"step {done} | eval loss {record['val_loss']:.4f}" + (f" | exact match {record['eval_exact_match']:.4f} | "
                                                               f"token F1 {record['eval_token_f1']:.4f}"
                                                               if args.eval_generate else ""))
        training.log_metrics(run.path, run.wandb, dict(record, elapsed_s=round(time.time() - run.start, 3)))
    save_checkpoint(done, engine, data.processor, args)


def generation_scores(engine, data, args, device):
    """The first --eval-generate eval records answered by generation on rank 0 (the others wait), scored
    as sample_vlm.py scores them: exact match and token F1."""
    scores = [0.0, 0.0]
    if rank() == 0:
        engine.model.eval()
        with engine.autocast:
            records = score(engine.model, data.processor, data.eval[:args.eval_generate], device, args.batch_size)
        engine.model.train()
        scores = list(summary(records))
    scores = sum_over_ranks(scores, device)  # rank 0's, handed to all
    return {"eval_exact_match": scores[0], "eval_token_f1": scores[1]}


# -----------------------------------------------------------------------------
# --benchmark: training on synthetic samples, timed (--merge-lora: vlm_checkpoint.merge_lora)

def benchmark_samples(args):
    count = args.batch_size * args.gradient_accumulation_steps * world_size() * (args.max_steps or 10)
    with disk_write("the benchmark images", args.output_dir, then="free disk space and run again"):
        samples = synthetic_samples(os.path.join(args.output_dir, "synthetic-images"), count, args.benchmark_image_size,
                                    args.benchmark_text_words, args.seed, write_images=rank() == 0)
    barrier()  # rank 0 has written the images
    return samples


def report_benchmark(args, timings, dtype, device):
    """One JSON line for BENCHMARKS.md: the median step after a warm-up step or two. MFU: achieved
    FLOP/s over the GPUs' dense bf16 peak; "n/a" on a CPU, an unknown GPU, or a model memory.py cannot size."""
    measured = timings[min(2, len(timings) - 1):]
    seconds = statistics.median(elapsed for elapsed, _ in measured)
    tokens = statistics.median(count for _, count in measured)
    samples_per_step = args.batch_size * args.gradient_accumulation_steps * world_size()
    pixels = min(max(args.benchmark_image_size ** 2, args.min_pixels), args.max_pixels)  # as the processor resizes
    try:  # the FLOPs plan.py counts, for a sample of the size measured
        flops = vlm_flops_per_sample(vlm_arch(args.model), tokens / samples_per_step, pixels, args.use_lora,
                                     args.gradient_checkpointing)
    except ValueError:  # neither a Qwen2-VL-like model nor LLaVA
        flops = None
    peak = hardware.peak_flops(device, str(dtype).replace("torch.", ""))  # a CPU's measured; None: unknown GPU
    mfu = round(flops * samples_per_step / seconds / (world_size() * peak), 4) if flops and peak else "n/a"
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    result = {"bench": "vlm", "model": args.model, "device": device_name, "torch": torch.__version__,
              "world_size": world_size(), "use_lora": args.use_lora, "use_4bit": args.use_4bit,
              "dtype": str(dtype).replace("torch.", ""), "samples_per_step": samples_per_step,
              "ms_per_step": 1000 * seconds,
              "samples_per_s": samples_per_step / seconds, "tokens_per_s": tokens / seconds, "mfu": mfu,
              "mfu_of": "this CPU's measured matmul peak" if device.type == "cpu" else "the GPU's datasheet bf16 peak",
              "peak_memory_gib": peak_memory_gib(device)}
    say(json.dumps(result))


# -----------------------------------------------------------------------------

def checked_samples(args, path, samples, processor):
    """A data file's samples that fit, each one's label-token count, and its measures with their cache
    file in --output-dir (a resume does not measure again)."""
    cache_file = measures_cache(args.output_dir, path, model=args.model, image_folder=args.image_folder,
                                min_pixels=args.min_pixels, max_pixels=args.max_pixels)
    return (*measure_samples(path, samples, processor, args.max_length, args.skip_long, cache_file), cache_file)


def read_data_files(args):
    """The samples of --data and --eval-data, their form checked: fast, so before anything else."""
    files = {"train": None if args.benchmark else args.data, "eval": args.eval_data}
    return files, {kind: read_samples(path, args.image_folder) for kind, path in files.items() if path}


def load_data(args, zero3, data_files, samples):
    """The training and eval samples, checked, and the processor; then --output-dir is claimed:
    nothing is written there before the data passed its checks."""
    processor = load_processor(args.model, args.trust_remote_code, args.min_pixels, args.max_pixels)
    checked = {kind: checked_samples(args, data_files[kind], samples[kind], processor) for kind in samples}
    lock = claim_output_dir(args)  # held while we run (a DataLoader worker closes its copy)
    measures = [(measures, cache_file) for _, _, measures, cache_file in checked.values()]
    if args.benchmark:
        synthetic = benchmark_samples(args)
        checked["train"] = (synthetic, measure_samples("the benchmark", synthetic, processor, math.inf, False)[1])
    # the loss is normalised by the label tokens; under ZeRO-3 a batch without images gets a tiny masked one
    return SimpleNamespace(train=checked["train"][0], label_tokens=checked["train"][1], processor=processor,
                           eval=checked["eval"][0] if "eval" in checked else [], dummy_image=zero3, lock=lock,
                           measures=measures)


def save_data_measures(args, data):
    """Into --output-dir once the run is set up: one that fails before leaves no cache behind."""
    for measures, cache_file in data.measures if rank() == 0 else ():
        with disk_write("the data measures", args.output_dir, then="free disk space and run again"):
            save_measures(cache_file, measures)


def build_engine(args, dtype, device, ds_config, zero3):
    """The model, wrapped in DeepSpeed or in our plain loop: the one place that differs."""
    if zero3:
        from transformers.integrations import HfDeepSpeedConfig
        keep_alive = HfDeepSpeedConfig(ds_config)  # noqa: F841 -- makes from_pretrained load ZeRO-3 partitioned
    model = load_model(args, dtype, device, zero3)
    return PlainEngine(args, model, device, dtype) if ds_config is None else DeepSpeedEngine(args, model, ds_config)


def main(argv=None):
    args = parse_args(argv, __doc__)
    if args.merge_lora:
        return merge_lora(args)
    args.output_dir = args.output_dir or "out-vlm"
    dtype = choose_dtype(args)
    ds_config = None if args.no_deepspeed else deepspeed_config(args, dtype, world_size())  # decided here, once
    zero3 = ds_config is not None and ds_config.get("zero_optimization", {}).get("stage", 0) == 3
    check_args(args, zero3, dtype)
    resume_from = resume_path(args) if args.resume else None
    data_files, samples = read_data_files(args)
    device, launcher_variables = start_processes(ds_config)
    try:
        torch.manual_seed(args.seed)
        fine_tune(args, dtype, ds_config, zero3, resume_from, load_data(args, zero3, data_files, samples), device)
    finally:  # what we set for a lone DeepSpeed process goes: nothing after us in this process is under a launcher
        for key in launcher_variables:
            os.environ.pop(key, None)


def fine_tune(args, dtype, ds_config, zero3, resume_from, data, device):
    """The run, once its data is checked: steps, the model in its engine, the resume, the loop."""
    samples_per_step = args.batch_size * args.gradient_accumulation_steps * world_size()
    max_steps = args.max_steps or max(1, math.ceil(args.epochs * len(data.train) / samples_per_step))
    say(f"{len(data.train)} training samples, {samples_per_step} per step, {max_steps} steps")
    saved_step = re.fullmatch(r"checkpoint-(\d+)", os.path.basename(os.path.normpath(resume_from or "")))
    if saved_step and int(saved_step.group(1)) > max_steps:
        raise UserError(f"--resume: {resume_from} is at step {saved_step.group(1)}, past this run's {max_steps} "
                        "steps: raise --max-steps (or --epochs) to train on")
    if saved_step and int(saved_step.group(1)) == max_steps:
        say(f"{resume_from} is at step {max_steps}, this run's last: nothing to train (raise --max-steps to go on)")
    if args.gradient_checkpointing is None:  # off where the memory allows: it recomputes every layer each step
        args.gradient_checkpointing, why = vlm_checkpointing(args, world_size(), device, ds_config)
        say(why)
    say(vlm_start_line(args, world_size(), device, ds_config))  # expected peak memory; warns if it will not fit
    engine = build_engine(args, dtype, device, ds_config, zero3)
    start_step = resume_checkpoint(resume_from, engine) if resume_from else 0
    save_data_measures(args, data)
    timings = train(args, engine, data, device, start_step, max_steps)
    if data.lock:  # free --output-dir now, not when the garbage is collected: another run may follow in this process
        data.lock.close()
    if args.benchmark:
        report_benchmark(args, timings, dtype, device)


if __name__ == "__main__":
    one_line_errors()
    main()
    exit_processes()  # under a launcher: skip the interpreter's shutdown (see runtime.exit_processes)
