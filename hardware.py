"""
The GPUs we know, in one place: memory, dense bf16/fp16 tensor peak (FP32 accumulate, no
sparsity, from the vendors' spec sheets) and a default hourly price per GPU. model.py reads the
peak for MFU; plan.py reads all of it. A device is matched by its exact CUDA name: a GPU missing
here (or one whose vendor publishes no tensor peak) gets "unknown peak", never a guess.
"""
import platform
import time

import torch

# name: (memory GiB, dense bf16 TFLOP/s or None if unpublished, default USD per GPU-hour). Prices
# are rough on-demand cloud rates (late 2026) for planning only; override them with plan.py --price.
GPUS = {
    "B200": (180, 2250.0, 5.50),
    "H200": (141, 989.4, 3.50),
    "H200 NVL": (141, 835.5, 3.30),
    "GH200": (96, 989.4, 3.00),
    "H100": (80, 989.4, 2.50),  # SXM
    "H100 NVL": (94, 835.5, 2.40),
    "H100 PCIe": (80, 756.0, 2.20),
    "H800": (80, 989.4, 2.50),
    "H800 PCIe": (80, 756.0, 2.20),
    "A100 80GB": (80, 312.0, 1.50),
    "A100 40GB": (40, 312.0, 1.20),
    "L40S": (48, 362.05, 1.00),
    "L40": (48, 181.05, 0.90),
    "A40": (48, 149.7, 0.60),
    "A10": (24, 125.0, 0.60),
    "A10G": (24, None, 0.75),  # AWS's A10 variant: NVIDIA publishes no tensor peak for it
    "L4": (24, 121.0, 0.70),
    "V100": (16, 125.0, 0.50),  # no bf16: the fp16 peak (SXM2)
    "T4": (16, 65.0, 0.35),  # no bf16: the fp16 peak
    "A6000": (48, 154.8, 0.80),
    "RTX 5090": (32, 209.5, 0.70),
    "RTX 5080": (16, 112.6, 0.40),
    "RTX 5070": (12, 61.7, 0.30),
    "RTX 5060 Ti": (16, 47.4, 0.25),
    "RTX 4090": (24, 165.2, 0.45),
    "RTX 4080": (16, 97.5, 0.35),
    "RTX 4070": (12, 58.4, 0.25),
    "RTX 4060 Ti": (16, 44.2, 0.20),
    "RTX 3090": (24, 71.0, 0.25),
}

# CUDA device names (torch.cuda.get_device_name, without 'NVIDIA '/'GeForce '/'Tesla ') -> GPUS key.
# Exact: an RTX 4070 Ti is not a 4070, a 4080 SUPER not a 4080, an H100 NVL not an SXM.
DEVICE_NAMES = {
    "B200": "B200",
    "H200": "H200", "H200 NVL": "H200 NVL",
    "GH200 480GB": "GH200", "GH200 144G HBM3e": "GH200",
    "H100 80GB HBM3": "H100", "H100 SXM5 80GB": "H100", "H100 NVL": "H100 NVL", "H100 PCIe": "H100 PCIe",
    "H800": "H800", "H800 PCIe": "H800 PCIe",
    "A100-SXM4-80GB": "A100 80GB", "A100 80GB PCIe": "A100 80GB",
    "A100-SXM4-40GB": "A100 40GB", "A100-PCIE-40GB": "A100 40GB",
    "L40S": "L40S", "L40": "L40", "A40": "A40", "A10": "A10", "A10G": "A10G", "L4": "L4",
    "V100-SXM2-16GB": "V100", "V100-SXM2-32GB": "V100", "T4": "T4",
    "RTX A6000": "A6000",
    "RTX 5090": "RTX 5090", "RTX 5080": "RTX 5080", "RTX 5070": "RTX 5070", "RTX 5060 Ti": "RTX 5060 Ti",
    "RTX 4090": "RTX 4090", "RTX 4080": "RTX 4080", "RTX 4070": "RTX 4070", "RTX 4060 Ti": "RTX 4060 Ti",
    "RTX 3090": "RTX 3090",
}


def match_gpu(device_name):
    """A CUDA device name ('NVIDIA H100 80GB HBM3', 'NVIDIA GeForce RTX 4090') -> a GPUS key, or None."""
    name = " ".join(device_name.split())
    for prefix in ("NVIDIA ", "GeForce ", "Tesla "):
        name = name.removeprefix(prefix)
    return DEVICE_NAMES.get(name)


def cpu_name():
    """This CPU's model name, for the benchmarks' headers."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def native_bf16(device_type):
    """Whether the device computes in bfloat16 natively: a CUDA GPU from Ampere on, a CPU with AVX512-BF16 or
    AMX (read from /proc/cpuinfo: elsewhere assumed not); others only emulate it, slower than float32."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return device_type == "cpu" and ("avx512_bf16" in flags or "amx_bf16" in flags)


def peak_flops(device, dtype="float32"):
    """The peak FLOP/s MFU is measured against: a GPU's dense bf16/fp16 datasheet figure (None when
    unknown), a CPU's measured matmul peak in dtype (cpu_matmul_peak); None elsewhere (mps)."""
    device = torch.device(device)
    if device.type == "cpu":
        return cpu_matmul_peak(dtype)
    if device.type != "cuda":
        return None
    key = match_gpu(torch.cuda.get_device_name(device))
    return GPUS[key][1] * 1e12 if key and GPUS[key][1] else None


CPU_PEAKS = {}  # dtype -> FLOP/s, measured once per process


def cpu_matmul_peak(dtype="float32", size=1024, seconds=0.1):
    """This CPU's matmul peak: the fastest of size x size matmuls in dtype over about `seconds`, on the
    threads torch uses. No datasheet gives a CPU's reachable FLOP/s (cores, clocks, vector units and
    other processes all vary), so it is measured, once, at start-up."""
    if dtype not in CPU_PEAKS:
        a, b = (torch.randn(size, size, dtype=getattr(torch, dtype)) for _ in range(2))
        a @ b  # warm-up: the first call allocates and picks kernels
        best, start = 0.0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            t = time.perf_counter()
            a @ b
            best = max(best, 2 * size ** 3 / (time.perf_counter() - t))
        CPU_PEAKS[dtype] = best
    return CPU_PEAKS[dtype]


def mfu_text(mfu, device_type):
    """A log line's MFU, saying what it is a fraction of on a CPU."""
    if mfu is None:
        return "n/a (unknown peak)"
    return f"{mfu:.2%}" + (" of this CPU's measured matmul peak" if device_type == "cpu" else "")


# -----------------------------------------------------------------------------
# what the node's GPUs are doing, through NVML (the optional nvidia-ml-py). Read at log lines only:
# NVML asks the driver, not a CUDA stream, so a reading adds no device sync.

def open_gpu_telemetry(say=print):
    """NVML handles of this node's GPUs; where there is nothing to read, [] and a one-line note said."""
    handles, note = gpu_handles()
    if note:
        say(note)
    return handles


def gpu_handles():
    try:
        import pynvml
        pynvml.nvmlInit()
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
    except Exception as e:  # no module, no driver, an NVML error: telemetry is optional, never a failure
        return [], (f"GPU telemetry off ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'unavailable'}); "
                    "pip install nvidia-ml-py on a GPU machine to log utilization, memory, temperature and power")
    return (handles, None) if handles else ([], "GPU telemetry off: NVML sees no GPU")


def read_gpu_telemetry(handles):
    """Each GPU's utilization (% of the last sample period with a kernel running), memory used (GiB),
    temperature (C) and power (W), as log.jsonl fields; {} if a reading fails."""
    if not handles:
        return {}
    import pynvml
    try:
        return {"gpu_util": [pynvml.nvmlDeviceGetUtilizationRates(h).gpu for h in handles],
                "gpu_memory_gib": [round(pynvml.nvmlDeviceGetMemoryInfo(h).used / 2**30, 2) for h in handles],
                "gpu_temp_c": [pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU) for h in handles],
                "gpu_power_w": [round(pynvml.nvmlDeviceGetPowerUsage(h) / 1000) for h in handles]}  # from mW
    except Exception:  # a GPU fallen off the bus is for the training loop to notice, not the log line
        return {}
