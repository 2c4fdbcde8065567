"""
The GPUs we know, in one place: memory, dense bf16/fp16 tensor peak (FP32 accumulate, no
sparsity, from the vendors' spec sheets) and a default hourly price per GPU. model.py reads the
peak for MFU; plan.py reads all of it. A GPU missing here gets "unknown peak", never a guess.
"""
import torch

# name: (memory GiB, dense bf16 TFLOP/s, default USD per GPU-hour). Prices are rough on-demand
# cloud rates (late 2026) for planning only; override them with plan.py --price.
GPUS = {
    "H200": (141, 989.4, 3.50),
    "H100": (80, 989.4, 2.50),  # SXM; the PCIe card is matched separately below
    "H100 PCIe": (80, 756.0, 2.20),
    "A100 80GB": (80, 312.0, 1.50),
    "A100 40GB": (40, 312.0, 1.20),
    "L40S": (48, 362.1, 1.00),
    "A6000": (48, 154.8, 0.80),
    "L4": (24, 121.0, 0.70),
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


def match_gpu(device_name):
    """Map a CUDA device name ('NVIDIA H100 80GB HBM3', 'NVIDIA GeForce RTX 4090') to a GPUS key."""
    name = device_name.upper().replace("GEFORCE ", "")
    if "H100" in name and "PCIE" in name:
        return "H100 PCIe"
    if "A100" in name:
        return "A100 40GB" if "40GB" in name else "A100 80GB"
    # longest keys first so 'RTX 4060 Ti' wins over 'RTX 4060' and 'L40S' over 'L4'
    for key in sorted(GPUS, key=len, reverse=True):
        if key.upper() in name:
            if key == "L4" and "L40" in name:
                continue
            return key
    return None


def peak_flops(device):
    """Dense bf16/fp16 peak FLOP/s of the GPU `device` is on, or None when unknown or not a GPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    key = match_gpu(torch.cuda.get_device_name(device))
    return GPUS[key][1] * 1e12 if key else None
