"""
What both trainers' loops share (train.py and train_ds.py): the learning-rate schedule, stop
signals, the non-finite stop, the long-run clocks, costs and hints, every RNG state for exact resume,
the metrics log and wandb.
"""
import math
import os
import random
import signal
import time

import numpy as np
import torch

import files
import hardware
from configurator import UserError

# -----------------------------------------------------------------------------
# the loop's mechanics

def human_time(seconds):
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


def cosine_lr(step, max_lr, min_lr, warmup, decay_steps):
    """Linear warmup over `warmup` steps, then a cosine from max_lr to min_lr at decay_steps; min_lr after."""
    if step < warmup:
        return max_lr * (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, decay_steps - warmup))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)


def catch_stop_signals():
    """SIGTERM (spot instances, schedulers) and Ctrl-C: note the signal's name so the loop finishes
    its step, saves and exits; a second one stops at once. Returns (the names caught, a function
    that puts the previous handlers back)."""
    caught = []

    def note(signum, frame):
        caught.append(signal.Signals(signum).name)
        signal.signal(signum, signal.SIG_DFL)
    previous = {sig: signal.signal(sig, note) for sig in (signal.SIGTERM, signal.SIGINT)}
    return caught, lambda: [signal.signal(sig, handler) for sig, handler in previous.items()]


def stop_if_diverged(in_a_row, limit, what, advice, last_checkpoint):
    """Each non-finite step is skipped; `limit` of them in a row end the run, the checkpoint kept."""
    if in_a_row >= limit:
        raise UserError(f"loss was not finite for {in_a_row} {what}: {advice}; the last checkpoint "
             f"({last_checkpoint or 'none saved yet'}) is untouched")


# -----------------------------------------------------------------------------
# long runs on rented GPUs: a save on a clock, a time budget, the cost, and where the time goes.
# Rank 0's clock decides; the trainers pass its decision to every rank in the sync they do anyway.

def save_due(last_save, minutes):
    return bool(minutes) and time.time() - last_save >= 60 * minutes


def out_of_time(start, max_hours, reserve_s):
    """True when stopping now is the last chance to save before max_hours since start: reserve_s is
    what may still come first (the steps to the next check point, the longest save so far)."""
    return bool(max_hours) and time.time() - start + reserve_s >= 3600 * max_hours


def long_run_fields(wall_s, data_s, elapsed_s, eta_s, price_per_hour, gpus):
    """A log line's ETA (eta_s None while compiling), the share of wall_s spent waiting for batches, the cost
    since the start and at the end (price_per_hour: the whole job's), and each GPU's NVML readings:
    (log.jsonl fields, their text for the log line)."""
    record = {"data_wait": round(data_s / max(wall_s, 1e-9), 4)}
    text = [f"ETA {human_time(eta_s) if eta_s is not None else 'n/a (compiling)'}",
            f"data wait {record['data_wait']:.0%}"]
    if price_per_hour:
        record["cost_usd"] = round(price_per_hour * elapsed_s / 3600, 4)
        text.append(f"${record['cost_usd']:.2f} since the start")
        if eta_s is not None:
            record["projected_cost_usd"] = round(price_per_hour * (elapsed_s + eta_s) / 3600, 4)
            text[-1] += f", ${record['projected_cost_usd']:.2f} at the end"
    record.update(hardware.read_gpu_telemetry(gpus))
    if "gpu_util" in record:
        text.append("gpu " + ", ".join(f"{u}% {m:.1f}GiB {t}C {w}W" for u, m, t, w in zip(
            record["gpu_util"], record["gpu_memory_gib"], record["gpu_temp_c"], record["gpu_power_w"])))
    return record, " | ".join(text)


SLOW_DATA, LOW_UTILIZATION, LINES = 0.10, 80, 3  # a share of the time; % busy; log lines in a row


def slow_hints(record, said, data_fix, batch_fix):
    """Hints, each once per run (said: a dict the loop keeps), when for 3 log lines in a row the loop has
    waited for its batches over 10% of the time, or the GPUs have been under 80% busy (with the likely cause)."""
    hints, util = [], record.get("gpu_util")
    said["waiting"] = said.get("waiting", 0) + 1 if record["data_wait"] > SLOW_DATA else 0
    said["idle"] = said.get("idle", 0) + 1 if util and sum(util) / len(util) < LOW_UTILIZATION else 0
    if said["waiting"] >= LINES and not said.get("data"):
        said["data"] = True
        hints.append(f"hint: {record['data_wait']:.0%} of the time goes to waiting for the next batch: {data_fix} "
                     "(docs/TROUBLESHOOTING.md)")
    if said["idle"] >= LINES and not said.get("util"):
        said["util"] = True
        cause = "the wait for data" if said["waiting"] else f"a batch too small to keep the GPU busy: {batch_fix}"
        hints.append(f"hint: the GPUs have been under {LOW_UTILIZATION}% busy for {LINES} log lines; likely cause: "
                     f"{cause} (docs/TROUBLESHOOTING.md)")
    return hints


# -----------------------------------------------------------------------------
# exact resume: every RNG the next step may draw from

def get_rng_state():
    """As tensors and plain values (weights_only-safe). CUDA: this process's own device only, so
    a run saved on 8 GPUs resumes on 1."""
    py_version, py_internal, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": [py_version, list(py_internal), py_gauss],
        "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss, np_gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def all_rng_states():
    """Every process's get_rng_state, in rank order (a collective under DDP: every rank calls it)."""
    states = [None] * (torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1)
    if torch.distributed.is_initialized():
        torch.distributed.all_gather_object(states, get_rng_state())
    return states if torch.distributed.is_initialized() else [get_rng_state()]


def set_rng_state(state):
    """The inverse of get_rng_state; the tensors may come from any map_location."""
    py_version, py_internal, py_gauss = state["python"]
    random.setstate((py_version, tuple(py_internal), py_gauss))
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_name, np_keys.cpu().numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(state["torch"].cpu())
    if torch.cuda.is_available() and torch.is_tensor(state.get("cuda")):
        torch.cuda.set_rng_state(state["cuda"].cpu())


# -----------------------------------------------------------------------------
# metrics

def init_wandb(project, run_name, config):
    """Start wandb; with no API key or no network, run offline and say so instead of crashing."""
    import netrc

    import wandb
    mode = os.environ.get("WANDB_MODE") or None
    if mode is None and not os.environ.get("WANDB_API_KEY"):
        try:  # where `wandb login` keeps the key
            has_key = netrc.netrc().authenticators("api.wandb.ai") is not None
        except (OSError, netrc.NetrcParseError):
            has_key = False
        if not has_key:
            print("wandb: no API key found, logging offline (run `wandb sync` later to upload)")
            mode = "offline"
    try:
        return wandb.init(project=project, name=run_name, config=config, mode=mode)
    except Exception as e:
        print(f"wandb: could not start online ({type(e).__name__}), logging offline instead")
        return wandb.init(project=project, name=run_name, config=config, mode="offline")


# the names both trainers give the same things in log.jsonl and wandb (plot.py reads them); a record
# may carry more (train_loss, grad_norm, samples_per_s, mfu, ...)
METRICS = ('iter', 'loss', 'val_loss', 'lr', 'tokens_per_s', 'elapsed_s', 'peak_memory_gib', 'data_wait', 'cost_usd',
           'projected_cost_usd', 'gpu_util', 'gpu_memory_gib', 'gpu_temp_c', 'gpu_power_w')  # gpu_*: one per GPU


def log_metrics(path, wandb_run, record):
    """One record of a run's metrics, keyed by 'iter': a line of log.jsonl at path (None: no file) and
    a wandb step (None: no wandb)."""
    if path:
        files.append_jsonl(path, record)
    if wandb_run:  # a chart per GPU: gpu_util/0, gpu_util/1, ...
        wandb_run.log({f'{k}/{i}' if isinstance(v, list) else k: x for k, v in record.items()
                       for i, x in (enumerate(v) if isinstance(v, list) else [(0, v)])}, step=record['iter'])


def optimizer_step(optim, scaler, params, grad_clip, skip_on_device):
    """After the backward passes: unscale, clip (grad_clip 0: no clipping; the norm still flags inf/NaN),
    step unless the gradients are not finite, zero them. The skip costs no host sync where it can:
    the fp16 scaler and fused AdamW (found_inf) decide on the device; other optimizers on the host.
    Returns 'skipped' as a device tensor (train.py and bench.py run exactly this step)."""
    scaler.unscale_(optim)
    # the norm is the same on every process (gradients are all-reduced): a shared skip decision
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float('inf'))
    if hasattr(grad_norm, 'full_tensor'):  # FSDP: the norm of the whole gradient, as a DTensor
        grad_norm = grad_norm.full_tensor()
    skipped = ~torch.isfinite(grad_norm)
    if scaler.is_enabled():
        scaler.step(optim)  # fp16: the scaler skips non-finite steps itself
    elif skip_on_device:
        optim.found_inf = skipped.float()  # fused AdamW leaves weights and state as they were
        optim.step()
    elif not skipped.item():
        optim.step()
    scaler.update()
    optim.zero_grad(set_to_none=True)
    return skipped


def set_learning_rate(optim, lr):
    """lr for every parameter group, scaled by its lr_ratio (Muon's: muon_learning_rate / learning_rate)."""
    for group in optim.param_groups:
        group['lr'] = lr * group.get('lr_ratio', 1.0)
