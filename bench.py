"""
Time training steps of any train.py config on synthetic tokens: one table row and one JSON line.

$ python bench.py config/quickstart_shakespeare_char.py
$ python bench.py config/gpt2_124m_single_gpu.py --batch_size=16 --compile=True --dtype=bfloat16
$ python bench.py config/finetune_shakespeare.py --optimizer=adamw8bit --activation_checkpointing=True

Takes train.py's settings (same config files and --key=value) plus bench_warmup and bench_iters.
The model is built with random weights in the config's shape (no download, no data files); each
iteration is one micro-batch forward + backward + optimizer step (no gradient accumulation). Warm-up
iterations (compilation included) are not timed; the result is the median of the timed iterations.
MFU is against the GPU's dense bf16 peak from hardware.py ("n/a" on a CPU). Peak memory is
torch.cuda.max_memory_allocated on CUDA and the process's max RSS on a CPU.
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

import utils
from configurator import ConfigError, configure, read_defaults
from memory import gpt_shape
from model import GPT, GPTConfig

config = read_defaults(os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py"))
config.update(bench_warmup=3, bench_iters=10)  # untimed iterations, then timed ones
try:
    configure(sys.argv[1:], config)
except ConfigError as e:
    utils.fail(str(e))
utils.check_train_settings(config)
utils.check_ranges(config, {"bench_warmup": "[0, inf)", "bench_iters": "[1, inf)"})

# -----------------------------------------------------------------------------
device, device_type = utils.resolve_device(config["device"])
dtype = utils.resolve_dtype(config["dtype"], device_type)
torch.manual_seed(config["seed"])
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True
ctx = nullcontext() if dtype == "float32" else torch.autocast(device_type=device_type, dtype=getattr(torch, dtype))

shape = gpt_shape(config)  # the shape train.py would build (init_from gpt2* sizes, meta.pkl vocab)
model_args = {k: shape[k] for k in ("n_layer", "n_head", "n_embd", "bias", "vocab_size")}
model = GPT(GPTConfig(block_size=config["block_size"], dropout=config["dropout"], **model_args)).to(device)
model.activation_checkpointing = config["activation_checkpointing"]
with open(os.devnull, "w") as quiet, torch.no_grad():  # configure_optimizers prints parameter counts
    sys.stdout, stdout = quiet, sys.stdout
    try:
        optimizer = model.configure_optimizers(config["weight_decay"], config["learning_rate"],
                                               (config["beta1"], config["beta2"]), device_type, config["optimizer"])
    except ImportError:
        utils.fail("optimizer='adamw8bit' needs bitsandbytes: pip install bitsandbytes")
    finally:
        sys.stdout = stdout
blocker = config["compile"] and utils.compile_blocker(device_type)
if blocker:
    print(f"torch.compile cannot run here ({blocker}): timing eager")
step_model = torch.compile(model) if config["compile"] and not blocker else model
scaler = torch.amp.GradScaler(device_type, enabled=(dtype == "float16"))
batch_size, block_size = config["batch_size"], config["block_size"]
generator = torch.Generator().manual_seed(config["seed"])
tokens = torch.randint(0, shape["vocab_size"], (batch_size, block_size + 1), generator=generator).to(device)
X, Y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def sync():
    if device_type == "cuda":
        torch.cuda.synchronize()


def train_step():
    with ctx:
        _, loss = step_model(X, Y)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(model.parameters(), config["grad_clip"] or float("inf"))
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss


if device_type == "cuda":
    torch.cuda.reset_peak_memory_stats()
for _ in range(config["bench_warmup"]):
    train_step()
sync()
times = []
for _ in range(config["bench_iters"]):
    t0 = time.perf_counter()
    loss = train_step()
    loss.item()  # waits for the step, on any device
    sync()
    times.append(time.perf_counter() - t0)

# -----------------------------------------------------------------------------
dt = statistics.median(times)
tokens_per_iter = batch_size * block_size
mfu = model.estimate_mfu(tokens_per_iter, dt)
if device_type == "cuda":
    device_name = torch.cuda.get_device_name(device)
else:
    import platform
    device_name = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
peak_memory = utils.peak_memory_gib(device) * 1024 ** 3
load = os.getloadavg()
result = {
    "bench": "gpt", "date": datetime.date.today().isoformat(), "device": device_name, "torch": torch.__version__,
    "config": " ".join(sys.argv[1:]), "params": model.get_num_params(), "batch_size": batch_size,
    "block_size": block_size, "dtype": dtype, "compile": config["compile"], "optimizer": config["optimizer"],
    "activation_checkpointing": config["activation_checkpointing"], "tokens_per_s": round(tokens_per_iter / dt, 1),
    "ms_per_iter": round(dt * 1000, 2), "mfu": round(mfu, 4) if mfu is not None else "n/a",
    "peak_memory_gib": round(peak_memory / 1024 ** 3, 3),
    "peak_memory_kind": "max_memory_allocated" if device_type == "cuda" else "max RSS",
    "timed_iters": len(times), "warmup_iters": config["bench_warmup"], "torch_threads": torch.get_num_threads(),
    "load_average_1m": round(load[0], 2),
}
mfu_text = f"{mfu * 100:.1f}%" if mfu is not None else "n/a"
print("| date | device | torch | config | tokens/s | ms/iter | MFU | peak memory | load (1 min) |")
print("|---|---|---|---|---|---|---|---|---|")
print(f"| {result['date']} | {device_name} | {torch.__version__} | `{result['config']}` | {tokens_per_iter / dt:,.0f} "
      f"| {dt * 1000:.1f} | {mfu_text} | {peak_memory / 1024 ** 3:.2f} GiB ({result['peak_memory_kind']}) | {load[0]:.2f} |")
print(json.dumps(result))
