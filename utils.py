"""
What the scripts share, each in one place: reporting a user's mistake in one line, settings'
ranges, device and dtype, the output folder's lock and cleanup, crash-safe writes and full-disk
errors, the training loop's mechanics (schedule, stop signals, log.jsonl, non-finite stop, peak
memory), RNG state for exact resume, batch offsets, checkpoint and dataset-metadata loading, wandb.
"""
import errno
import importlib.util
import json
import math
import os
import pickle
import random
import re
import resource
import shutil
import signal
import socket
import sys
import time
from contextlib import contextmanager, nullcontext

import numpy as np
import torch

import gpt_lora
from model import PRETRAINED


def fail(message):
    """A mistake the user can fix: one line on stderr naming it and the fix, exit 1, no traceback.
    Under DDP only rank 0 says it; the other ranks exit quietly."""
    if int(os.environ.get("RANK", "0")) != 0:
        sys.exit(1)
    sys.exit(f"error: {message}")


# -----------------------------------------------------------------------------
# settings: each one's valid range, checked once before any expensive step

INTERVAL = re.compile(r"([\[(])\s*(-?[\w.]+)\s*,\s*(-?[\w.]+)\s*([\])])")


def in_interval(value, interval):
    """Is value a number in an interval written as in maths: '[1, inf)', '(0, 1]', '[0, 1)'?
    (NaN and infinities fail every comparison that matters, so they are out.)"""
    left, low, high, right = INTERVAL.fullmatch(interval).groups()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    low, high = float(low), float(high)
    return (value >= low if left == "[" else value > low) and (value <= high if right == "]" else value < high)


def check_ranges(settings, ranges, flag=lambda name: name):
    """Fail on the first setting outside its interval. ranges: name -> '[1, inf)' etc.; a value of
    None passes (it means 'off'). flag turns a name into what the user typed (--keep-last)."""
    for name, interval in ranges.items():
        value = settings[name]
        if value is not None and not in_interval(value, interval):
            fail(f"{flag(name)} must be in {interval}, got {value!r}")


TRAIN_RANGES = {  # train.py's numeric settings; bench.py and plan.py take the same ones
    'eval_interval': '[1, inf)', 'log_interval': '[1, inf)', 'eval_iters': '[1, inf)', 'keep_last': '[0, inf)',
    'patience': '[0, inf)', 'gradient_accumulation_steps': '[1, inf)', 'batch_size': '[1, inf)',
    'block_size': '[1, inf)', 'n_layer': '[1, inf)', 'n_head': '[1, inf)', 'n_embd': '[1, inf)', 'dropout': '[0, 1)',
    'learning_rate': '[0, inf)', 'max_iters': '[0, inf)', 'weight_decay': '[0, inf)', 'beta1': '[0, 1)',
    'beta2': '[0, 1)', 'grad_clip': '[0, inf)', 'max_nonfinite_steps': '[1, inf)', 'warmup_iters': '[0, inf)',
    'lr_decay_iters': '[0, inf)', 'min_lr': '[0, inf)', 'seed': '[0, 4294967296)',
    'lora_rank': '[0, inf)', 'lora_alpha': '(0, inf)', 'lora_dropout': '[0, 1)',
    'muon_learning_rate': '(0, inf)', 'muon_momentum': '[0, 1)',
}


def check_train_settings(config):
    """train.py's settings, alone and together: one line for the first one that cannot work."""
    check_ranges(config, TRAIN_RANGES)
    c = config
    if c['n_embd'] % c['n_head']:
        fail(f"n_embd={c['n_embd']} is not divisible by n_head={c['n_head']}: every head gets n_embd/n_head channels")
    if c['decay_lr'] and c['lr_decay_iters'] <= c['warmup_iters']:
        fail(f"lr_decay_iters={c['lr_decay_iters']} must be larger than warmup_iters={c['warmup_iters']} "
             "(the cosine decay runs between them), or set --decay_lr=False")
    if c['decay_lr'] and c['min_lr'] > c['learning_rate']:
        fail(f"min_lr={c['min_lr']} is above learning_rate={c['learning_rate']}: the decay would raise it; "
             "set --min_lr (learning_rate/10 is usual) or --decay_lr=False")
    if c['optimizer'] not in ('adamw', 'adamw8bit', 'muon'):
        fail(f"optimizer='{c['optimizer']}' is unknown: use adamw, adamw8bit or muon")
    if c['optimizer'] == 'muon' and not c['learning_rate']:
        fail("optimizer='muon' scales Muon's rate with the schedule of learning_rate: give learning_rate > 0")
    if c['optimizer'] == 'muon' and not hasattr(torch.optim, 'Muon'):
        fail(f"optimizer='muon' needs torch.optim.Muon (PyTorch 2.9 or newer; this is {torch.__version__})")
    if c['compile_mode'] not in COMPILE_MODES:
        fail(f"compile_mode='{c['compile_mode']}' is unknown: use {', '.join(COMPILE_MODES)}")
    if c['attention_backend'] not in ATTENTION_BACKENDS:
        fail(f"attention_backend='{c['attention_backend']}' is unknown: use {', '.join(ATTENTION_BACKENDS)}")
    if c['backend'] not in ('nccl', 'gloo'):
        fail(f"backend='{c['backend']}' is unknown: use nccl (GPUs) or gloo")
    if not c['out_dir'] or not c['dataset']:
        fail("out_dir and dataset must not be empty")
    init_from = c['init_from']
    if not (init_from in ('scratch', 'resume') or init_from in PRETRAINED or os.path.isdir(init_from)):
        fail(f"init_from='{init_from}' is neither scratch, resume, one of {', '.join(PRETRAINED)}, "
             "nor a folder with a Hugging Face GPT-2 checkpoint")
    unknown = set(c['lora_targets'].split(',')) - set(gpt_lora.TARGETS)
    if unknown:
        fail(f"lora_targets='{c['lora_targets']}' names {', '.join(sorted(unknown))}: use a comma-separated "
             f"list of {', '.join(gpt_lora.TARGETS)}")
    if c['lora_rank'] and init_from == 'scratch':
        fail("lora_rank > 0 adapts a pretrained model: use --init_from=gpt2 (or gpt2-medium, ..., or a Hugging Face "
             "folder), or --lora_rank=0 to train from scratch")
    if c['lora_rank'] and importlib.util.find_spec('peft') is None:
        fail("lora_rank > 0 needs peft: pip install peft")


# -----------------------------------------------------------------------------
# device and dtype

def resolve_device(device):
    """'auto' -> cuda, else mps, else cpu. Returns (device, device_type); an unknown or absent
    device is a one-line error."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    device_type = device.split(":")[0]
    if not re.fullmatch(r"(cpu|mps|cuda(:\d+)?)", device):
        fail(f"device='{device}' is unknown: use auto, cpu, cuda, cuda:N or mps")
    if device_type == "cuda" and not torch.cuda.is_available():
        fail(f"device='{device}' but CUDA is not available here: use --device=cpu (or auto)")
    if device_type == "cuda" and ":" in device and int(device.split(":")[1]) >= torch.cuda.device_count():
        fail(f"device='{device}' but only {torch.cuda.device_count()} GPU(s) are visible: use cuda:0 .. "
             f"cuda:{torch.cuda.device_count() - 1}")
    if device_type == "mps" and not torch.backends.mps.is_available():
        fail(f"device='{device}' but MPS is not available here: use --device=cpu (or auto)")
    return device, device_type


def start_ddp(device, device_type, backend, gradient_accumulation_steps):
    """Under torchrun: one GPU per process and the process group joined. Returns (rank, local_rank,
    world_size, this process's device, its share of the global gradient_accumulation_steps)."""
    if int(os.environ.get("RANK", -1)) == -1:
        return 0, 0, 1, device, gradient_accumulation_steps
    rank, local_rank, world_size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    if gradient_accumulation_steps % world_size:
        fail(f"gradient_accumulation_steps={gradient_accumulation_steps} is not divisible by the "
             f"{world_size} processes: make it a multiple of {world_size}")
    if device_type == "cuda":
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    torch.distributed.init_process_group(backend=backend if device_type == "cuda" else "gloo")
    return rank, local_rank, world_size, device, gradient_accumulation_steps // world_size


def has_native_bf16():
    # is_bf16_supported() alone says True on T4/V100, which only emulate it (slower than fp16)
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


def resolve_dtype(dtype, device_type):
    """'auto' -> bfloat16 on GPUs that have it, float16 on older GPUs, float32 elsewhere."""
    if dtype == "auto":
        return ("bfloat16" if has_native_bf16() else "float16") if device_type == "cuda" else "float32"
    if dtype not in ("float32", "bfloat16", "float16"):
        fail(f"dtype='{dtype}' is unknown: use auto, float32, bfloat16 or float16")
    if dtype == "bfloat16" and device_type == "cuda" and not has_native_bf16():
        fail(f"{torch.cuda.get_device_name()} has no bfloat16: use --dtype=float16")
    return dtype


COMPILE_MODES = ('default', 'max-autotune', 'max-autotune-no-cudagraphs')
ATTENTION_BACKENDS = ('auto', 'flash', 'cudnn', 'efficient', 'math')


def attention_kernels(backend, device_type, dropout=0.0):
    """The context manager that picks scaled_dot_product_attention's kernel. 'auto' leaves PyTorch's
    choice, except on Hopper GPUs, where cuDNN's attention goes first (reported faster there than flash)."""
    if backend == "flash" and device_type == "cpu" and dropout:
        fail("attention_backend='flash' on a CPU has no dropout: use auto or math, or --dropout=0")
    from torch.nn.attention import SDPBackend, sdpa_kernel
    if backend == "auto":
        if device_type == "cuda" and torch.cuda.get_device_capability()[0] == 9:
            order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
            return sdpa_kernel(order, set_priority=True)
        return nullcontext()
    if backend in ("cudnn", "efficient") and device_type != "cuda":
        fail(f"attention_backend='{backend}' runs on CUDA GPUs only: use auto, flash or math on {device_type}")
    return sdpa_kernel({"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                        "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[backend])


def compile_blocker(device_type):
    """Why torch.compile cannot work here (no Triton for GPUs, no C++ compiler for CPUs), or None."""
    if device_type == "cuda":
        from torch.utils._triton import has_triton
        return None if has_triton() else "Triton is not installed"
    if device_type == "cpu" and not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "clang++", "c++")):
        return "no C++ compiler found"
    return None


# -----------------------------------------------------------------------------
# the output folder: one run at a time, and only our own files are ever removed

def lock_folder(folder, what="--out_dir"):
    """Create folder and hold its lock file for this process's lifetime (keep the returned file
    open). A second run on the same folder is refused; the kernel frees the lock when a run dies,
    even by kill -9, so it never stays stuck."""
    try:
        os.makedirs(folder, exist_ok=True)
        lock = open(os.path.join(folder, ".lock"), "a+")
    except OSError as e:
        fail(f"{what} '{folder}' is not writable ({write_failure(e, os.path.dirname(os.path.abspath(folder)))}): "
             f"choose another {what}")
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; runs are trusted not to collide
        return lock
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.seek(0)
        owner = (lock.read().split() or ["?"])[0]
        fail(f"another run (pid {owner}) is using {what} '{folder}': wait for it to end, or choose another {what}")
    try:
        lock.seek(0)
        lock.truncate()
        lock.write(f"{os.getpid()} {socket.gethostname()} {time.time()}\n")  # unique: other nodes check they see it
        lock.flush()
    except OSError as e:  # a full disk takes even these few bytes
        fail(f"cannot write in {what} '{folder}' ({write_failure(e, folder)}): {what_to_do(e, 'free disk space')}")
    return lock


def temp_path(path):
    # the one shape of our temp files: .<final name>.tmp<pid>, beside the final file
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}.tmp{os.getpid()}")


def remove_stale_temps(folder, final_names):
    """Delete what a killed run left half-written: temp files of ours only, i.e. .<name>.tmp<pid>
    where <name> matches the regex final_names (the files a script writes). Nothing else."""
    pattern = re.compile(rf"\.({final_names})\.tmp\d+")
    for name in os.listdir(folder):
        if pattern.fullmatch(name) and os.path.isfile(os.path.join(folder, name)):
            os.remove(os.path.join(folder, name))


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_dead_temps(path):
    """What a killed run of ours left beside path: temp_path(path)'s files or folders whose process is
    gone (a live one may be another run writing the same path). Nothing else."""
    folder, name = os.path.split(os.path.abspath(path))
    pattern = re.compile(rf"\.{re.escape(name)}\.tmp(\d+)")
    for entry in os.listdir(folder) if os.path.isdir(folder) else []:
        match = pattern.fullmatch(entry)
        if match and not pid_alive(int(match.group(1))):
            target = os.path.join(folder, entry)
            if os.path.isdir(target) and not os.path.islink(target):
                shutil.rmtree(target, ignore_errors=True)
            else:
                os.remove(target)


def claim_out_dir(folder, our_files, new_run, overwrite):
    """train.py's out_dir for this run: locked, our half-written temp files of a killed run
    removed, and another run's files (our_files, a regex) kept unless overwrite. Returns the lock."""
    lock = lock_folder(folder)
    remove_stale_temps(folder, our_files)
    previous_run = sorted(name for name in os.listdir(folder) if re.fullmatch(our_files, name))
    if previous_run and new_run:
        if not overwrite:
            fail(f"out_dir '{folder}' holds another run ({', '.join(previous_run)}): continue it with "
                 "--init_from=resume, choose another --out_dir, or pass --overwrite=True to replace it")
        for name in previous_run:
            os.remove(os.path.join(folder, name))
    return lock


def check_shared_folder(folder, device):
    """Under DDP: every rank sees the lock file rank 0 has just written in folder, else several
    nodes do not share it (rank 0 writes checkpoints, every rank reads them on resume)."""
    import torch.distributed as dist
    path = os.path.join(folder, ".lock")
    written = [open(path).read() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(written)
    try:
        with open(path) as f:
            sees_it = f.read() == written[0]
    except OSError:
        sees_it = False
    blind = torch.tensor(float(not sees_it), device=device)
    dist.all_reduce(blind)
    if blind.item():
        fail(f"{int(blind.item())} process(es) cannot see out_dir '{folder}' as rank 0 wrote it: with several "
             "nodes, out_dir must be on a filesystem that every node shares (NFS, Lustre, ...)")


# -----------------------------------------------------------------------------
# crash-safe writes: a temp file, fsync, then an atomic rename over the target

def atomic_write(path, write):
    """Call write(f) on a temp file beside path, then rename it over path: a crash or a full disk
    leaves path as it was and no temp file. Write failures come out as OSError (torch's zip writer
    reports a full disk as RuntimeError)."""
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except RuntimeError as e:
        raise OSError(errno.EIO, f"write failed ({str(e).splitlines()[0][-120:]})") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def atomic_torch_save(obj, path):
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path, text):
    atomic_write(path, lambda f: f.write(text.encode()))


def check_output_file(path, overwrite, flag, inputs=(), overwrite_flag="--overwrite"):
    """A file the user names for a script to write: never one of its inputs, never replaced unless
    overwrite, in a folder that exists. Checked before any slow work."""
    if os.path.exists(path) and any(os.path.exists(p) and os.path.samefile(path, p) for p in inputs):
        fail(f"{flag} {path} is one of this run's inputs: choose another {flag}")
    if os.path.isdir(path):
        fail(f"{flag} {path} is a folder: give a file name")
    if os.path.exists(path) and not overwrite:
        fail(f"{flag} {path} exists: pass another {flag}, or {overwrite_flag} to replace it")
    if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        fail(f"{flag} {path}: its folder does not exist")


def write_output_file(path, write, what):
    """write(f) into path atomically (see atomic_write): a full disk is one line and an older file
    of that name stays whole."""
    with disk_write(what, os.path.dirname(os.path.abspath(path)), then=f"{path} is as it was: free disk space"):
        atomic_write(path, write)


def link_or_copy(src, dst):
    # a hard link costs no disk; the atomic rename keeps dst whole either way
    tmp = temp_path(dst)
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def is_write_failure(error):
    """A full disk, as each library reports it: OSError (Python, transformers), SafetensorError, a
    RuntimeError from torch's zip writer, a bare Exception '... (os error 28)' from tokenizers."""
    from safetensors import SafetensorError
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
        fail(f"could not save {what} ({write_failure(error, folder)}); {what_to_do(error, then)}")


NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)
TAKEN = (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR)


def write_failure(error, folder):
    """What to tell the user when a save failed: the reason, and the disk space left where the
    disk may be the cause."""
    reason = error.strerror or str(error)
    if error.errno in NOT_WRITABLE + TAKEN:
        return reason
    try:
        free = f", {shutil.disk_usage(folder).free / 2**20:.1f} MiB free"
    except OSError:
        free = ""
    return f"{reason}{free}"


def what_to_do(error, then):
    """The fix for a failed write: `then` (free disk space, the usual cause) unless the error says otherwise."""
    if error.errno in NOT_WRITABLE:
        return "the folder is read-only or not yours: fix its permissions, or write somewhere else"
    if error.errno in TAKEN:
        return "something else was written there meanwhile (another run?): write somewhere else"
    return then


def fsync_dir(folder):
    # make the rename itself durable; not every OS lets us open a directory
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# -----------------------------------------------------------------------------
# the training loop's mechanics, the same in train.py and train_ds.py

def barrier():
    """Wait for every process (a no-op in a single process)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


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
        fail(f"loss was not finite for {in_a_row} {what}: {advice}; the last checkpoint "
             f"({last_checkpoint or 'none saved yet'}) is untouched")


def append_jsonl(path, record):
    """One line of a run's log.jsonl; a full disk is one line, not a traceback."""
    try:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as e:
        fail(f"could not write {path} ({write_failure(e, os.path.dirname(os.path.abspath(path)))}): "
             "free disk space and resume")


def trim_jsonl(path, keep):
    """Keep the records of a log for which keep(record) holds (a resumed run writes the later ones
    again); a line a kill cut short goes too. Rewritten atomically: a kill meanwhile loses nothing."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                record = json.loads(line) if line.endswith("\n") else None
            except ValueError:
                record = None
            if isinstance(record, dict) and keep(record):
                kept.append(line)
    try:
        atomic_write_text(path, "".join(kept))
    except OSError as e:
        fail(f"could not rewrite {path} ({write_failure(e, os.path.dirname(os.path.abspath(path)))}): "
             "free disk space and resume")


def peak_memory_gib(device):
    """The run's peak: what PyTorch allocated on a GPU, the process's max RSS elsewhere."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


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
# batches: where each one starts is a pure function of its position in the run

MASK64 = 2**64 - 1


def splitmix64(x):
    """One step of SplitMix64 (Steele, Lea and Flood, 2014): a 64-bit counter-based hash whose
    outputs are fixed by its definition, on every Python, NumPy and torch version."""
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def batch_offsets(seed, split, iter_index, batch_index, count, high):
    """count window starts in [0, high) for the batch at (seed, split, iteration, micro-batch):
    a resumed or re-sharded run sees exactly the batches an uninterrupted one would."""
    key = 0
    for part in (seed, split, iter_index, batch_index):
        key = splitmix64(key ^ (part & MASK64))  # & MASK64: iteration -1 (evals) hashes like any other
    return [splitmix64(key ^ i) % high for i in range(count)]


def load_checkpoint(path, required, hint="", mmap=False):
    """A train.py checkpoint read onto the CPU (with mmap, a tensor is read only when used), checked
    to be a dict holding the keys `required`. hint ends the error lines."""
    try:
        checkpoint = torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)
    except Exception as e:  # a damaged file: whatever torch.load raises, the file is at fault
        fail(f"{path} is truncated or corrupt ({type(e).__name__}){hint}")
    missing = set(required) - set(checkpoint if isinstance(checkpoint, dict) else ())
    if missing:
        fail(f"{path} is not a train.py checkpoint (it lacks {', '.join(sorted(missing))}){hint}")
    return checkpoint


def load_gpt(path, hint, reuse=None):
    """The GPT in a train.py checkpoint, and the checkpoint: read onto the CPU memory-mapped, so its
    optimizer state is never read. One line (ending in hint: what to do) when there is none. A LoRA
    checkpoint on the base of `reuse` adds its adapter to that model (see gpt_lora.load)."""
    if not os.path.isfile(path):
        fail(f"no checkpoint at {path}: {hint}")
    checkpoint = load_checkpoint(path, ('model', 'model_args'), mmap=True)
    if checkpoint.get('lora') is not None and importlib.util.find_spec('peft') is None:
        fail(f"{path} holds LoRA adapters, which need peft: pip install peft")
    try:
        return gpt_lora.load(checkpoint, reuse=reuse), checkpoint
    except ValueError as e:
        fail(f"{path}: {e}")


# -----------------------------------------------------------------------------
# dataset metadata

class PlainUnpickler(pickle.Unpickler):
    # plain dicts, lists, strings and numbers need no class lookups; anything else could run code
    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"it refers to {module}.{name}; only plain values are allowed")


def load_meta(path):
    """A dataset's meta.pkl (vocab_size, and stoi/itos for characters), read without running any
    code it may carry, and checked."""
    try:
        with open(path, "rb") as f:
            meta = PlainUnpickler(f).load()
    except Exception as e:  # a file from elsewhere: any unpickling failure is that file's fault
        fail(f"{path} cannot be read ({type(e).__name__}: {e}): prepare the dataset again")
    if not isinstance(meta, dict) or not isinstance(meta.get("vocab_size"), int) or not 1 <= meta["vocab_size"] <= 2**16:
        fail(f"{path} needs a 'vocab_size' between 1 and 65536: prepare the dataset again")
    if "stoi" in meta or "itos" in meta:
        stoi, itos = meta.get("stoi"), meta.get("itos")
        if not (isinstance(stoi, dict) and isinstance(itos, dict)
                and all(isinstance(k, str) and isinstance(v, int) for k, v in stoi.items())
                and all(isinstance(k, int) and isinstance(v, str) for k, v in itos.items())
                and max(itos, default=-1) < meta["vocab_size"]):
            fail(f"{path}: 'stoi' and 'itos' must map characters to ids below vocab_size and back: prepare the dataset again")
    return meta


def dataset_vocabulary(data_dir):
    """A dataset's character vocabulary (id -> character) from its meta.pkl, or None (GPT-2 BPE)."""
    meta_path = os.path.join(data_dir, "meta.pkl")
    if not os.path.exists(meta_path):
        return None
    meta = load_meta(meta_path)
    if "itos" not in meta:
        fail(f"{meta_path} has no character vocabulary (stoi/itos): prepare the dataset again")
    return meta["itos"]


def checkpoint_vocabulary(checkpoint):
    """The character vocabulary a train.py checkpoint was trained with, or None for GPT-2's BPE. Newer
    checkpoints carry it; an older one is read from its dataset's meta.pkl, where that still is."""
    if "vocabulary" in checkpoint:
        return checkpoint["vocabulary"]
    config = checkpoint.get("config")
    dataset = config.get("dataset") if isinstance(config, dict) else None
    return dataset_vocabulary(os.path.join("data", dataset)) if isinstance(dataset, str) else None


def token_file_stats(path, scan_tokens=2**28):
    """(token count, largest token id) of a uint16 token file; the id is read from the first
    scan_tokens only, so that a 9B-token file costs a second, not minutes."""
    size = os.path.getsize(path)
    if size % 2:
        fail(f"{path} has {size} bytes, an odd count, but holds uint16 tokens: it is truncated or not a token file")
    if size == 0:
        return 0, -1
    tokens = np.memmap(path, dtype=np.uint16, mode="r")
    top = max(int(tokens[i:i + 2**24].max()) for i in range(0, min(len(tokens), scan_tokens), 2**24))
    return size // 2, top


# -----------------------------------------------------------------------------

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
