"""
Time training iterations of any train.py config on synthetic tokens: one table row and one JSON line.

$ python bench.py config/quickstart_shakespeare_char.py
$ python bench.py config/gpt2_124m_single_gpu.py --batch_size=16 --compile=True --dtype=bfloat16
$ torchrun --standalone --nproc_per_node=8 bench.py config/gpt2_124m_multi_gpu.py
$ python bench.py config/finetune_shakespeare.py --fused_loss=True --profile=True  # and a trace

Takes train.py's settings (same config files and --key=value) plus bench_warmup, bench_iters and
profile. The model is built with random weights in the config's shape (no download, no data files).
An iteration is what train.py runs: its learning rate, gradient_accumulation_steps micro-batches
(split among the torchrun processes), each a forward and a backward, then train.py's optimizer step
(training.optimizer_step: clip, skip a non-finite step). What differs: one fixed batch of random
tokens (no data loading), no evals, and no log or stop-signal checks (train.py's periodic host
syncs). Warm-up iterations (compilation included) are not timed. The timed ones run back to back
with one device sync at the end: tokens/s is the whole window's, and the per-iteration times (CUDA
events on a GPU) give the median and the spread. MFU is against the GPU's dense bf16 peak from
hardware.py, or on a CPU against its matmul peak, measured after the timed window (hardware.cpu_matmul_peak).
Peak memory is torch.cuda.max_memory_allocated on CUDA and the process's max RSS on a CPU.
--profile=True writes the timed window as a trace (chrome://tracing or ui.perfetto.dev) and, on a CPU,
splits its time: matmuls, attention, the optimizer step, other operators, and the rest (Python, dispatch).
"""
import signal
import sys

signal.signal(signal.SIGINT, lambda *_: sys.exit("interrupted"))  # Ctrl-C at any time: one line, no traceback
import datetime  # noqa: E402
import json
import os
import statistics
import time
from contextlib import nullcontext

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import hardware
import runtime
from configurator import UserError, check_ranges, settings
from gpt_settings import check_train_settings, gpt_shape, train_defaults
from model import GPT, GPTConfig
from training import cosine_lr, optimizer_step, set_learning_rate

# train.py's settings, and bench's own: untimed iterations, timed ones, a trace of them
config, _ = settings(dict(train_defaults(), bench_warmup=3, bench_iters=10, profile=False))
check_train_settings(config)
check_ranges(config, {"bench_warmup": "[0, inf)", "bench_iters": "[1, inf)"})
if config["fsdp"]:
    raise UserError("bench.py times one process or DDP, not FSDP yet: drop --fsdp=True")

# -----------------------------------------------------------------------------
device, device_type = runtime.resolve_device(config["device"])
dtype = runtime.resolve_dtype(config["dtype"], device_type)
rank, local_rank, world_size, device, accumulation = \
    runtime.start_ddp(device, device_type, config["backend"], config["gradient_accumulation_steps"])
torch.manual_seed(config["seed"] + rank)
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True
ctx = runtime.autocast(device_type, dtype)
kernels = runtime.attention_kernels(config["attention_backend"], device_type, config["dropout"])
kernels.__enter__()  # for the whole run, as in train.py

shape = gpt_shape(config)  # the shape train.py would build (init_from gpt2* sizes, meta.pkl vocab)
model_args = {k: shape[k] for k in ("n_layer", "n_head", "n_embd", "bias", "vocab_size")}
model = GPT(GPTConfig(block_size=config["block_size"], dropout=config["dropout"], **model_args)).to(device)
model.activation_checkpointing = config["activation_checkpointing"]
model.fused_loss = config["fused_loss"]
with open(os.devnull, "w") as quiet, torch.no_grad():  # configure_optimizers prints parameter counts
    sys.stdout, stdout = quiet, sys.stdout
    try:
        optimizer = model.configure_optimizers(config["weight_decay"], config["learning_rate"],
                                               (config["beta1"], config["beta2"]), device_type, config["optimizer"],
                                               config["muon_learning_rate"], config["muon_momentum"])
    except ImportError:
        raise UserError("optimizer='adamw8bit' needs bitsandbytes: pip install bitsandbytes")
    finally:
        sys.stdout = stdout
blocker = config["compile"] and runtime.compile_blocker(device_type)
if blocker and rank == 0:
    print(f"torch.compile cannot run here ({blocker}): timing eager")
step_model = model
if config["compile"] and not blocker:
    step_model = torch.compile(model, mode=None if config["compile_mode"] == "default" else config["compile_mode"])
if world_size > 1:
    step_model = DDP(step_model, device_ids=[local_rank] if device_type == "cuda" else None,
                     gradient_as_bucket_view=True)
scaler = torch.amp.GradScaler(device_type, enabled=(dtype == "float16"))
batch_size, block_size = config["batch_size"], config["block_size"]
generator = torch.Generator().manual_seed(config["seed"] + rank)
tokens = torch.randint(0, shape["vocab_size"], (batch_size, block_size + 1), generator=generator).to(device)
X, Y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


params = [p for p in model.parameters() if p.requires_grad]
skip_on_device = all(group.get("fused") for group in optimizer.param_groups)  # as train.py decides it


def iteration(i):
    """One train.py iteration: the learning rate of its schedule, the micro-batches (gradients all-reduced
    after the last), then train.py's own optimizer step (training.optimizer_step)."""
    c = config
    lr = cosine_lr(i, c["learning_rate"], c["min_lr"], c["warmup_iters"], c["lr_decay_iters"]) if c["decay_lr"] \
        else c["learning_rate"]
    set_learning_rate(optimizer, lr)
    for micro_step in range(accumulation):
        if world_size > 1:
            step_model.require_backward_grad_sync = micro_step == accumulation - 1
        with ctx:
            loss = step_model(X, Y)[1] / accumulation
        scaler.scale(loss).backward()
    optimizer_step(optimizer, scaler, params, c["grad_clip"], skip_on_device)


def sync():
    if device_type == "cuda":
        torch.cuda.synchronize()


def clock():
    """A timestamp taken in stream order: a CUDA event on a GPU (read after the sync), else the host clock."""
    if device_type != "cuda":
        return time.perf_counter()
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def seconds(start, end):
    return start.elapsed_time(end) / 1000 if device_type == "cuda" else end - start


for i in range(config["bench_warmup"]):
    iteration(i)
sync()
if device_type == "cuda":
    torch.cuda.reset_peak_memory_stats()
profiler = torch.profiler.profile() if config["profile"] else nullcontext()
with profiler:
    start = time.perf_counter()
    marks = [clock()]
    for i in range(config["bench_iters"]):
        iteration(config["bench_warmup"] + i)
        marks.append(clock())
    sync()  # the only wait for the device in the timed window
    window = time.perf_counter() - start
times = [seconds(a, b) for a, b in zip(marks, marks[1:])]
trace, split = None, None
if config["profile"]:
    trace = f"bench_trace_{datetime.datetime.now():%Y%m%d_%H%M%S}_rank{rank}.json"  # never over an older trace
    profiler.export_chrome_trace(trace)


def category(op):
    """Where an operator's own time goes, by its name."""
    name = op.lower()
    if any(k in name for k in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")):
        return "matmuls"
    if "scaled_dot_product" in name or "flash_attention" in name:
        return "attention"
    if any(k in name for k in ("adam", "muon", "_foreach", "optimizer")):
        return "optimizer"
    return "other operators"


if config["profile"] and device_type == "cpu":  # operators' own (self) time, in the timed window
    split, others = {"matmuls": 0.0, "attention": 0.0, "optimizer": 0.0, "other operators": 0.0}, {}
    for event in profiler.key_averages():
        split[category(event.key)] += event.self_cpu_time_total / 1e6
        if category(event.key) == "other operators":
            others[event.key] = event.self_cpu_time_total / 1e6
    split["outside operators (Python, dispatch)"] = max(0.0, window - sum(split.values()))
    split = {k: round(v / window, 3) for k, v in split.items()}
    largest = sorted(others.items(), key=lambda kv: -kv[1])[:6]
    split["largest other operators"] = {k: round(v / window, 3) for k, v in largest}

# -----------------------------------------------------------------------------
tokens_per_iter = batch_size * block_size * accumulation * world_size  # all processes
dt = window / len(times)
mfu = model.estimate_mfu(tokens_per_iter / world_size, dt, dtype)  # a CPU's matmul peak is measured here, after timing
if rank == 0:
    if device_type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        import platform
        device_name = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    peak_memory = runtime.peak_memory_gib(device)
    load = os.getloadavg()
    result = {
        "bench": "gpt", "date": datetime.date.today().isoformat(), "device": device_name, "torch": torch.__version__,
        "config": " ".join(sys.argv[1:]), "params": model.get_num_params(), "processes": world_size,
        "batch_size": batch_size, "gradient_accumulation_steps": accumulation * world_size, "block_size": block_size,
        "dtype": dtype, "compile": config["compile"], "compile_mode": config["compile_mode"],
        "attention_backend": config["attention_backend"], "optimizer": config["optimizer"],
        "activation_checkpointing": config["activation_checkpointing"], "fused_loss": config["fused_loss"],
        "tokens_per_s": round(tokens_per_iter / dt, 1), "ms_per_iter": round(dt * 1000, 2),
        "ms_per_iter_median": round(statistics.median(times) * 1000, 2), "ms_per_iter_min": round(min(times) * 1000, 2),
        "ms_per_iter_max": round(max(times) * 1000, 2), "mfu": round(mfu, 4) if mfu is not None else "n/a",
        "mfu_of": "this CPU's measured matmul peak" if device_type == "cpu" else "the GPU's datasheet bf16 peak",
        "peak_flops": hardware.peak_flops(device, dtype),
        "peak_memory_gib": round(peak_memory, 3),
        "peak_memory_kind": "max_memory_allocated" if device_type == "cuda" else "max RSS",
        "timed_iters": len(times), "warmup_iters": config["bench_warmup"], "torch_threads": torch.get_num_threads(),
        "load_average_1m": round(load[0], 2), "trace": trace, "time_split": split,
    }
    mfu_text = hardware.mfu_text(mfu, device_type)
    print("| date | device | torch | config | tokens/s | ms/iter (min-max) | MFU | peak memory | load (1 min) |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {result['date']} | {world_size} x {device_name} | {torch.__version__} | `{result['config']}` "
          f"| {tokens_per_iter / dt:,.0f} | {dt * 1000:.1f} ({min(times) * 1000:.1f}-{max(times) * 1000:.1f}) "
          f"| {mfu_text} | {peak_memory:.2f} GiB ({result['peak_memory_kind']}) | {load[0]:.2f} |")
    print(json.dumps(result))
runtime.exit_processes()  # under torchrun: leave the group, and skip the interpreter's shutdown
