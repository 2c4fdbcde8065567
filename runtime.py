"""
The process a script runs in: its rank (and printing on rank 0 only), its device and dtype, autocast,
DDP, attention kernels, torch.compile's prerequisites and peak memory. One resolution for every script.
"""
import os
import re
import resource
import shutil
import sys
from contextlib import nullcontext

import torch

from configurator import UserError, one_line_errors


def rank():
    """This process's rank under torchrun or deepspeed; 0 alone."""
    return int(os.environ.get("RANK", "0"))


def world_size():
    """How many processes the launcher started; 1 alone."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def say(*args):
    """print on rank 0 only: one voice for the whole job."""
    if rank() == 0:
        print(*args, flush=True)


def autocast(device_type, dtype):
    """The forward's mixed-precision context: none in float32."""
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    return nullcontext() if dtype == torch.float32 else torch.autocast(device_type=device_type, dtype=dtype)


# -----------------------------------------------------------------------------
# device, dtype, processes

def resolve_device(device):
    """'auto' -> cuda, else mps, else cpu. Returns (device, device_type); an unknown or absent
    device is a one-line error."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    device_type = device.split(":")[0]
    if not re.fullmatch(r"(cpu|mps|cuda(:\d+)?)", device):
        raise UserError(f"device='{device}' is unknown: use auto, cpu, cuda, cuda:N or mps")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device='{device}' but CUDA is not available here: use --device=cpu (or auto)")
    if device_type == "cuda" and ":" in device and int(device.split(":")[1]) >= torch.cuda.device_count():
        raise UserError(f"device='{device}' but only {torch.cuda.device_count()} GPU(s) are visible: use cuda:0 .. "
             f"cuda:{torch.cuda.device_count() - 1}")
    if device_type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"device='{device}' but MPS is not available here: use --device=cpu (or auto)")
    return device, device_type


def start_ddp(device, device_type, backend, gradient_accumulation_steps):
    """Under torchrun: one GPU per process and the process group joined. Returns (rank, local_rank,
    world_size, this process's device, its share of the global gradient_accumulation_steps)."""
    if int(os.environ.get("RANK", -1)) == -1:
        return 0, 0, 1, device, gradient_accumulation_steps
    rank, local_rank, world_size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    if gradient_accumulation_steps % world_size:
        raise UserError(f"gradient_accumulation_steps={gradient_accumulation_steps} is not divisible by the "
             f"{world_size} processes: make it a multiple of {world_size}")
    if device_type == "cuda":
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    torch.distributed.init_process_group(backend=backend if device_type == "cuda" else "gloo")
    one_line_errors()  # again: the process group's own hook prefixes every line of stderr with the rank
    return rank, local_rank, world_size, device, gradient_accumulation_steps // world_size


def exit_processes(wandb_run=None):
    """The end of a run, once all is saved: wandb finished, and each process of a multi-process job leaves the
    group and exits without the interpreter's shutdown. There a gloo worker thread can still free a tensor, ask
    for the GIL and abort the process (SIGABRT, 'terminate called without an active exception';
    pytorch/pytorch#190489), so a finished job would exit non-zero."""
    if wandb_run:
        wandb_run.finish()
    if world_size() > 1 and torch.distributed.is_initialized():
        torch.distributed.barrier()  # no process tears the group down while rank 0 is still saving
        torch.distributed.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def barrier():
    """Wait for every process (a no-op in a single process)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def has_native_bf16():
    # is_bf16_supported() alone says True on T4/V100, which only emulate it (slower than fp16)
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


def resolve_dtype(dtype, device_type, fp16_flag="--dtype=float16"):
    """'auto' -> bfloat16 on GPUs that have it, float16 on older GPUs, float32 elsewhere. fp16_flag: how
    the script's user asks for float16."""
    if dtype == "auto":
        return ("bfloat16" if has_native_bf16() else "float16") if device_type == "cuda" else "float32"
    if dtype not in ("float32", "bfloat16", "float16"):
        raise UserError(f"dtype='{dtype}' is unknown: use auto, float32, bfloat16 or float16")
    if dtype == "bfloat16" and device_type == "cuda" and not has_native_bf16():
        raise UserError(f"{torch.cuda.get_device_name()} has no bfloat16: use {fp16_flag}")
    return dtype


# -----------------------------------------------------------------------------
# kernels and compilation

COMPILE_MODES = ('default', 'max-autotune', 'max-autotune-no-cudagraphs')


ATTENTION_BACKENDS = ('auto', 'flash', 'cudnn', 'efficient', 'math')


def attention_kernels(backend, device_type, dropout=0.0):
    """The context manager that picks scaled_dot_product_attention's kernel. 'auto' leaves PyTorch's
    choice, except on Hopper GPUs, where cuDNN's attention goes first (reported faster there than flash)."""
    if backend == "flash" and device_type == "cpu" and dropout:
        raise UserError("attention_backend='flash' on a CPU has no dropout: use auto or math, or --dropout=0")
    from torch.nn.attention import SDPBackend, sdpa_kernel
    if backend == "auto":
        if device_type == "cuda" and torch.cuda.get_device_capability()[0] == 9:
            order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                     SDPBackend.MATH]
            return sdpa_kernel(order, set_priority=True)
        return nullcontext()
    if backend in ("cudnn", "efficient") and device_type != "cuda":
        raise UserError(f"attention_backend='{backend}' runs on CUDA GPUs only: "
                        f"use auto, flash or math on {device_type}")
    return sdpa_kernel({"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                        "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[backend])


def compile_blocker(device_type):
    """Why torch.compile cannot work here (no Triton for GPUs, no C++ compiler for CPUs), or None."""
    if device_type == "cuda":
        from torch.utils._triton import has_triton
        return None if has_triton() else "Triton is not installed"
    if device_type == "cpu" \
            and not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "clang++", "c++")):
        return "no C++ compiler found"
    return None


# -----------------------------------------------------------------------------
# memory

def peak_memory_gib(device):
    """The run's peak: what PyTorch allocated on a GPU, the process's max RSS elsewhere."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB
