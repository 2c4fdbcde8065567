import pytest

import hardware


@pytest.mark.parametrize('device_name,key', [
    ('NVIDIA H100 80GB HBM3', 'H100'), ('NVIDIA H100 PCIe', 'H100 PCIe'), ('NVIDIA H100 NVL', 'H100 NVL'),
    ('NVIDIA H200', 'H200'), ('NVIDIA GH200 480GB', 'GH200'), ('NVIDIA B200', 'B200'), ('NVIDIA H800', 'H800'),
    ('NVIDIA A100-SXM4-40GB', 'A100 40GB'), ('NVIDIA A100 80GB PCIe', 'A100 80GB'), ('NVIDIA A10G', 'A10G'),
    ('NVIDIA L40S', 'L40S'), ('NVIDIA L40', 'L40'), ('NVIDIA L4', 'L4'), ('Tesla T4', 'T4'),
    ('NVIDIA GeForce RTX 4060 Ti', 'RTX 4060 Ti'), ('NVIDIA GeForce RTX 4090', 'RTX 4090'),
    # variants are not their base card: an unknown peak, never a guess
    ('NVIDIA GeForce RTX 4070 Ti', None), ('NVIDIA GeForce RTX 4080 SUPER', None), ('NVIDIA GeForce RTX 3090 Ti', None),
    ('NVIDIA RTX 6000 Ada Generation', None), ('NVIDIA Graphics Device', None),
])
def test_gpus_are_matched_by_their_exact_name(device_name, key):
    assert hardware.match_gpu(device_name) == key


def test_every_known_device_name_leads_to_a_gpu_entry():
    assert set(hardware.DEVICE_NAMES.values()) <= set(hardware.GPUS)


def test_the_cpu_matmul_peak_is_measured_once_in_under_a_second():
    import time
    hardware.CPU_PEAKS.pop('float32', None)
    start = time.perf_counter()
    peak = hardware.cpu_matmul_peak('float32')
    assert time.perf_counter() - start < 1.0 and 1e9 < peak < 1e14  # a real CPU's FLOP/s
    assert hardware.peak_flops('cpu', 'float32') == peak  # measured once: every log line has the same reference
    assert hardware.mfu_text(0.5, 'cpu') == "50.00% of this CPU's measured matmul peak"
    assert hardware.mfu_text(0.5, 'cuda') == "50.00%" and hardware.mfu_text(None, 'cuda') == "n/a (unknown peak)"
