import os

import torch
from test_model import tiny_gpt

import runtime


def test_the_cpu_attention_kernels_give_the_same_logits():
    model, idx = tiny_gpt(), torch.randint(0, 50, (2, 16))
    logits = []
    for backend in ('auto', 'flash', 'math'):  # efficient and cudnn run on CUDA only
        with runtime.attention_kernels(backend, 'cpu'), torch.no_grad():
            logits.append(model(idx)[0])
    assert all(torch.allclose(logits[0], other, atol=1e-5) for other in logits[1:])


def test_auto_dtype_skips_emulated_bfloat16(monkeypatch):
    # a T4 or V100: is_bf16_supported() says True through emulation, which is slower than fp16
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda including_emulation=True: including_emulation)
    assert runtime.resolve_dtype('auto', 'cuda') == 'float16'
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda including_emulation=True: True)
    assert runtime.resolve_dtype('auto', 'cuda') == 'bfloat16'


def test_cpu_processes_of_a_launcher_that_sets_no_thread_count_share_the_cores(monkeypatch):
    threads = torch.get_num_threads()
    monkeypatch.delenv('OMP_NUM_THREADS', raising=False)
    monkeypatch.setenv('WORLD_SIZE', '2')  # as the deepspeed launcher leaves it, on a CPU
    try:
        runtime.share_cpu_cores()
        assert torch.get_num_threads() == max(1, os.cpu_count() // 2)
        torch.set_num_threads(threads)
        monkeypatch.setenv('OMP_NUM_THREADS', '1')  # torchrun's: left as it is
        runtime.share_cpu_cores()
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(threads)
