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

