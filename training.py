"""
What both trainers' loops share (train.py and train_ds.py): the learning-rate schedule, stop
signals, the non-finite stop, every RNG state for exact resume, the metrics log and wandb.
"""
import math
import os
import random
import signal

import numpy as np
import torch

import files
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
METRICS = ('iter', 'loss', 'val_loss', 'lr', 'tokens_per_s', 'elapsed_s', 'peak_memory_gib')


def log_metrics(path, wandb_run, record):
    """One record of a run's metrics, keyed by 'iter': a line of log.jsonl at path (None: no file) and
    a wandb step (None: no wandb)."""
    if path:
        files.append_jsonl(path, record)
    if wandb_run:
        wandb_run.log(record, step=record['iter'])


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
