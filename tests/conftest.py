import os
import subprocess
import sys

# tiny models run fastest on one thread, and pytest -n 2 already uses both cores: more threads
# only oversubscribe them (set before torch is imported)
os.environ.setdefault('OMP_NUM_THREADS', '1')

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO), 'shared')
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, 'data'))
if 'TIKTOKEN_CACHE_DIR' not in os.environ and os.path.isdir(os.path.join(SHARED, 'tiktoken_cache')):
    os.environ['TIKTOKEN_CACHE_DIR'] = os.path.join(SHARED, 'tiktoken_cache')

ENV = dict(os.environ, PYTHONUNBUFFERED='1', WANDB_MODE='disabled')

# a model small enough that a run takes seconds
TINY = ['--n_layer=2', '--n_head=2', '--n_embd=32', '--block_size=32', '--batch_size=4',
        '--gradient_accumulation_steps=2', '--compile=False', '--device=cpu', '--eval_iters=4',
        '--warmup_iters=2', '--log_interval=1']


def command(script, *args, torchrun=0):
    """The command line that runs one of the repo's scripts, under torchrun with that many processes."""
    launcher = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={torchrun}'] \
        if torchrun else [sys.executable]
    return [*launcher, os.path.join(REPO, script), *map(str, args)]


def run_script(script, *args, timeout=300, env=None, torchrun=0, **kwargs):
    """Run one of the repo's scripts as a user would (from the repo root); returns the CompletedProcess."""
    return subprocess.run(command(script, *args, torchrun=torchrun), cwd=kwargs.pop('cwd', REPO),
                          env=dict(ENV, **(env or {})), capture_output=True, text=True, timeout=timeout, **kwargs)


def start_script(script, *args, torchrun=0, env=None, **kwargs):
    """Start one of the repo's scripts and return the Popen (for signals and kills)."""
    kwargs.setdefault('stdout', subprocess.DEVNULL)
    kwargs.setdefault('stderr', subprocess.PIPE)
    return subprocess.Popen(command(script, *args, torchrun=torchrun), cwd=REPO, env=dict(ENV, **(env or {})),
                            text=True, **kwargs)


def torchrun(*args, nproc=2, timeout=300, env=None):
    """train.py under torchrun with nproc processes (gloo on the CPU)."""
    return run_script('train.py', *args, torchrun=nproc, timeout=timeout, env=env)


def tiny_hf_gpt2(folder, seed=0, **sizes):
    """A random Hugging Face GPT2LMHeadModel saved to folder (1 layer, width 16, unless sizes say)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    config = dict(n_layer=1, n_head=2, n_embd=16, vocab_size=100, n_positions=32, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(GPT2Config(**dict(config, **sizes))).eval()
    model.save_pretrained(folder)
    return model


def run_inline(script, *args):
    """Run one of the repo's scripts in this process, as `python script args` would, and return
    (exit code, the message it exited with: a UserError's one line). Cheap, for inputs refused before
    any real work: any other exception escapes and fails the calling test, as a traceback would."""
    import gc
    import runpy
    import signal

    from configurator import UserError
    argv, handler = sys.argv, signal.getsignal(signal.SIGINT)
    sys.argv = [script, *map(str, args)]
    try:
        runpy.run_path(os.path.join(REPO, script), run_name='__main__')
        code = 0
    except SystemExit as e:
        code = e.code
    except UserError as e:
        code = f"error: {e}"  # what one_line_errors prints
    finally:
        sys.argv = argv
        signal.signal(signal.SIGINT, handler)  # the scripts install their own
        gc.collect()  # the run's globals sit in a reference cycle: free them, and the out_dir lock they hold
    return (1, code) if isinstance(code, str) else (code or 0, '')


def assert_one_line_error(result, fragment):
    """A finished process (CompletedProcess) or run_inline's (code, message) exited non-zero with
    one line 'error: ...' containing fragment, and no traceback."""
    if isinstance(result, tuple):
        code, last = result
        assert code != 0 and '\n' not in last, result
    else:
        code = result.returncode
        assert code != 0 and 'Traceback' not in result.stderr, result.stderr
        last = result.stderr.strip().splitlines()[-1]
    assert last.startswith('error: ') and fragment in last, last


def read_log(out_dir):
    import json
    with open(os.path.join(out_dir, 'log.jsonl')) as f:
        return [json.loads(line) for line in f]


def free_port():
    """A TCP port no one listens on now (a launcher's rendezvous must not collide with another test's)."""
    import socket
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def kill_one_torchrun_worker(proc, timeout=90):
    """kill -9 one of torchrun's two worker processes; return torchrun's exit code."""
    import signal
    with open(f'/proc/{proc.pid}/task/{proc.pid}/children') as f:
        workers = [int(pid) for pid in f.read().split()]
    assert len(workers) == 2
    os.kill(workers[1], signal.SIGKILL)
    return proc.wait(timeout=timeout)


def wait_for(condition, timeout):
    """Poll condition() every millisecond until it holds (True) or timeout seconds pass (False)."""
    import time
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return True
        time.sleep(0.001)
    return False


@pytest.fixture
def small_disk(tmp_path):
    """A real 2 MiB filesystem (tmpfs), where the test may mount one."""
    disk = tmp_path / 'disk'
    disk.mkdir()
    mounted = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=2m', 'tmpfs', str(disk)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f'cannot mount a small tmpfs here (needs root): {mounted.stderr.strip()}')
    try:
        yield disk
    finally:
        subprocess.run(['umount', '--lazy', str(disk)], check=True)  # a file still open in this process: detach now


def fill_up(disk):
    with open(disk / 'filler', 'wb') as f:
        try:
            while True:
                f.write(b'\0' * 65536)
                f.flush()
        except OSError:
            pass


@pytest.fixture(scope='session')
def char_data(tmp_path_factory):
    """The first 100K characters of tiny Shakespeare as a char-level dataset folder."""
    from prepare_text import encode_chars, write_dataset
    with open(os.path.join(REPO, 'data', 'shakespeare_char', 'input.txt')) as f:
        text = f.read()[:100_000]
    folder = tmp_path_factory.mktemp('shakespeare_char_small')
    tokens, meta = encode_chars([text])
    write_dataset(tokens, meta, str(folder))
    return str(folder)


@pytest.fixture(scope='session')
def finished_run(char_data, tmp_path_factory):
    """A tiny train.py run that finished (its checkpoint at iter 2), trained once per test process:
    copy it (shutil.copytree) before a test changes it."""
    out = tmp_path_factory.mktemp('finished_run')
    r = run_script('train.py', *TINY, f'--dataset={char_data}', f'--out_dir={out}', '--max_iters=2',
                   '--eval_interval=2')
    assert r.returncode == 0, r.stderr
    return str(out)


def write_checkpoint(folder, checkpoint):
    """checkpoint (a dict, or anything torch.save takes) as folder/ckpt.pt, where train.py writes it."""
    import torch
    os.makedirs(folder, exist_ok=True)
    torch.save(checkpoint, os.path.join(folder, 'ckpt.pt'))
    return str(folder)
