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



def test_exit_processes_flushes_and_exits_zero_under_a_launcher(tmp_path):
    # two gloo processes leave by os._exit: what they printed (to a pipe, so buffered) must still arrive
    import socket
    import subprocess
    import sys

    from conftest import ENV, REPO
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    code = ("import torch.distributed as dist, runtime\n"
            "dist.init_process_group('gloo')\n"
            "print('rank', dist.get_rank(), 'done')\n"
            "runtime.exit_processes()\n"
            "print('not reached')\n")
    env = {key: value for key, value in ENV.items() if key != 'PYTHONUNBUFFERED'}
    procs = [subprocess.Popen([sys.executable, '-c', code], cwd=REPO, stdout=subprocess.PIPE, text=True,
                              env=dict(env, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE='2', MASTER_ADDR='127.0.0.1',
                                       MASTER_PORT=str(port))) for r in (0, 1)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outputs == ['rank 0 done\n', 'rank 1 done\n']


def test_exit_processes_alone_finishes_wandb_and_returns():
    finished = []

    class Run:
        def finish(self):
            finished.append(True)
    runtime.exit_processes(Run())  # one process: nothing to leave, and the caller goes on
    assert finished == [True]
