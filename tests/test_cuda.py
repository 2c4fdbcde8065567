"""The paths only a GPU takes, on small models, in a few minutes: run `python -m pytest tests/test_cuda.py -v`
on a machine with CUDA. Skipped (with the reason) everywhere else, CI included.

Each test prints what it measured (pytest -s shows it) so the results can go into BENCHMARKS.md."""
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, read_log, run_script, torchrun

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason='needs a CUDA GPU (torch.cuda.is_available() is False)')

# small enough for any GPU, big enough for real kernels (flash attention, fused AdamW, Inductor)
GPU = ['--n_layer=2', '--n_head=4', '--n_embd=128', '--block_size=64', '--batch_size=8',
       '--gradient_accumulation_steps=2', '--device=cuda', '--eval_iters=4', '--warmup_iters=2', '--log_interval=1']


def losses(out_dir, start=0):
    return [(r['iter'], r.get('loss'), r.get('val_loss')) for r in read_log(out_dir) if r['iter'] >= start]


def test_compiled_bfloat16_training_learns(char_data, tmp_path):
    if not torch.cuda.is_bf16_supported(including_emulation=False):
        pytest.skip(f'{torch.cuda.get_device_name()} has no native bfloat16')
    r = run_script('train.py', *GPU, f'--dataset={char_data}', f'--out_dir={tmp_path}', '--dtype=bfloat16',
                   '--compile=True', '--max_iters=60', '--eval_interval=30', '--learning_rate=3e-3', timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    evals = [rec['val_loss'] for rec in read_log(tmp_path) if 'val_loss' in rec]
    print(f"bf16 compiled: val loss {evals}; last step {read_log(tmp_path)[-1]}")
    assert evals[-1] < evals[0] - 0.5


def test_float16_with_the_grad_scaler_learns(char_data, tmp_path):
    r = run_script('train.py', *GPU, f'--dataset={char_data}', f'--out_dir={tmp_path}', '--dtype=float16',
                   '--compile=False', '--max_iters=60', '--eval_interval=30', '--learning_rate=3e-3')
    assert r.returncode == 0, r.stderr[-3000:]
    evals = [rec['val_loss'] for rec in read_log(tmp_path) if 'val_loss' in rec]
    print(f"fp16 + scaler: val loss {evals}")
    assert evals[-1] < evals[0] - 0.5 and 'skipped' not in r.stdout.split('step 30')[-1]


def test_resume_on_the_gpu_continues_like_an_unbroken_run(char_data, tmp_path):
    # the checkpoint's RNG states were loaded onto the GPU before, and every resume crashed
    args = [*GPU, f'--dataset={char_data}',
            '--dtype=bfloat16' if torch.cuda.is_bf16_supported(False) else '--dtype=float16',
            '--compile=False', '--dropout=0.1', '--eval_interval=5', '--max_iters=16']
    assert run_script('train.py', *args, f'--out_dir={tmp_path / "full"}').returncode == 0
    assert run_script('train.py', *args, f'--out_dir={tmp_path / "split"}', '--max_iters=10').returncode == 0
    r = run_script('train.py', *args, f'--out_dir={tmp_path / "split"}', '--init_from=resume')
    assert r.returncode == 0, r.stderr[-3000:]
    full, split = losses(tmp_path / 'full', 10), losses(tmp_path / 'split', 10)
    print(f"resume: unbroken {full}\n        resumed {split}")
    assert [i for i, _, _ in full] == [i for i, _, _ in split]
    for (_, a, va), (_, b, vb) in zip(full, split):
        # GPU kernels are not bit-deterministic: equal within what 16-bit autocast allows
        assert abs((a or va) - (b or vb)) < 2e-2


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason='needs two GPUs')
def test_two_gpu_ddp_trains_like_one(char_data, tmp_path):
    args = [*GPU, f'--dataset={char_data}', '--dtype=float32', '--compile=True', '--max_iters=8', '--eval_interval=4',
            '--gradient_accumulation_steps=4']
    single = run_script('train.py', *args, f'--out_dir={tmp_path / "single"}', timeout=900)
    ddp = torchrun(*args, f'--out_dir={tmp_path / "ddp"}', timeout=900)
    assert single.returncode == 0 and ddp.returncode == 0, ddp.stderr[-3000:]
    for (i, a, va), (j, b, vb) in zip(losses(tmp_path / 'single'), losses(tmp_path / 'ddp'), strict=True):
        assert i == j and abs((a or va) - (b or vb)) < 1e-3  # TF32 matmuls


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason='needs two GPUs')
def test_two_gpu_fsdp_in_bfloat16_trains_like_one(char_data, tmp_path):
    args = [*GPU, f'--dataset={char_data}', '--dtype=bfloat16', '--compile=False', '--max_iters=8',
            '--eval_interval=4', '--gradient_accumulation_steps=4']
    single = run_script('train.py', *args, f'--out_dir={tmp_path / "single"}', timeout=900)
    fsdp = torchrun(*args, '--fsdp=True', f'--out_dir={tmp_path / "fsdp"}', timeout=900)
    assert single.returncode == 0 and fsdp.returncode == 0, fsdp.stderr[-3000:]
    pairs = list(zip(losses(tmp_path / 'single'), losses(tmp_path / 'fsdp'), strict=True))
    print(f"FSDP bf16: {[(i, round(a or va, 4), round(b or vb, 4)) for (i, a, va), (_, b, vb) in pairs]}")
    for (i, a, va), (j, b, vb) in pairs:
        assert i == j and abs((a or va) - (b or vb)) < 2e-2  # bf16 parameters in FSDP, autocast in one process


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason='needs two GPUs')
def test_two_gpu_fsdp_peak_memory_is_within_15_percent_of_plan(char_data, tmp_path):
    import memory
    sizes = dict(n_layer=6, n_head=6, n_embd=384, block_size=256, bias=False)
    r = torchrun(*GPU, *(f'--{k}={v}' for k, v in sizes.items()), '--batch_size=16', f'--dataset={char_data}',
                 '--dtype=bfloat16', '--compile=False', '--max_iters=4', '--eval_interval=4',
                 '--gradient_accumulation_steps=2', '--fsdp=True', f'--out_dir={tmp_path}', timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    measured = max(e.get('peak_memory_gib') or 0 for e in read_log(tmp_path)) * 2**30
    vocab_size = torch.load(tmp_path / 'ckpt.pt', weights_only=False)['model_args']['vocab_size']
    predicted = sum(memory.gpt_memory(dict(sizes, vocab_size=vocab_size), 16, 2, 'bfloat16', fused_loss=True,
                                      fsdp=True).values())
    print(f"FSDP on 2 GPUs: plan.py peak {predicted / 2**30:.3f} GiB, max_memory_allocated "
          f"{measured / 2**30:.3f} GiB, ratio {predicted / measured:.3f}")
    assert 0.85 < predicted / measured < 1.15


def test_nvml_telemetry_reaches_the_log(char_data, tmp_path):
    pytest.importorskip('pynvml', reason='needs nvidia-ml-py: pip install -e ".[gpu]"')
    r = run_script('train.py', *GPU, f'--dataset={char_data}', f'--out_dir={tmp_path}', '--compile=False',
                   '--max_iters=6', '--eval_interval=100')
    assert r.returncode == 0, r.stderr[-3000:]
    last = [e for e in read_log(tmp_path) if 'loss' in e][-1]
    print(f"NVML: {[(k, last[k]) for k in ('gpu_util', 'gpu_memory_gib', 'gpu_temp_c', 'gpu_power_w')]}")
    assert len(last['gpu_util']) == torch.cuda.device_count() and all(0 <= u <= 100 for u in last['gpu_util'])
    assert all(m > 0 for m in last['gpu_memory_gib']) and all(w > 0 for w in last['gpu_power_w'])


def test_sample_from_a_gpu_checkpoint(char_data, tmp_path):
    assert run_script('train.py', *GPU, f'--dataset={char_data}', f'--out_dir={tmp_path}', '--compile=False',
                      '--max_iters=4', '--eval_interval=4').returncode == 0
    r = run_script('sample.py', f'--out_dir={tmp_path}', '--device=cuda', '--num_samples=3', '--max_new_tokens=50',
                   '--start=ROMEO:', '--compile=True')
    assert r.returncode == 0, r.stderr[-3000:]
    samples = r.stdout.split('\nROMEO:')[1:]
    assert len(samples) == 3 and all(len(s.split('---------------')[0]) == 50 + 1 for s in samples)


def test_bench_reports_mfu_on_a_known_gpu():
    import hardware
    r = run_script('bench.py', '--n_layer=4', '--n_head=4', '--n_embd=256', '--block_size=256', '--batch_size=16',
                   '--device=cuda', '--compile=True', '--bench_warmup=3', '--bench_iters=10', timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    print(r.stdout.strip().splitlines()[-2])
    result = json.loads(r.stdout.strip().splitlines()[-1])
    known = hardware.match_gpu(torch.cuda.get_device_name()) is not None
    assert result['tokens_per_s'] > 0 and (isinstance(result['mfu'], float) if known else result['mfu'] == 'n/a')


@pytest.mark.parametrize('backend', ['flash', 'cudnn', 'efficient', 'math'])
def test_bench_with_each_attention_kernel(backend):
    r = run_script('bench.py', '--n_layer=4', '--n_head=4', '--n_embd=256', '--block_size=256', '--batch_size=16',
                   '--gradient_accumulation_steps=1', '--device=cuda', '--dtype=bfloat16', '--compile=False',
                   f'--attention_backend={backend}', '--bench_warmup=3', '--bench_iters=20', timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    print(r.stdout.strip().splitlines()[-2])


@pytest.mark.parametrize('mode', ['max-autotune-no-cudagraphs', 'max-autotune'])
def test_bench_with_each_compile_mode(mode):
    r = run_script('bench.py', '--n_layer=4', '--n_head=4', '--n_embd=256', '--block_size=256', '--batch_size=16',
                   '--gradient_accumulation_steps=2', '--device=cuda', '--compile=True', f'--compile_mode={mode}',
                   '--bench_warmup=3', '--bench_iters=20', timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    print(r.stdout.strip().splitlines()[-2])


def test_fused_loss_on_the_gpu_gives_the_plain_loss_and_gradients_in_less_memory():
    from model import GPT, GPTConfig
    results = []
    for fused in (False, True):
        torch.manual_seed(0)
        model = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=256, block_size=512, vocab_size=50304)).cuda()
        model.fused_loss = fused
        x = torch.randint(0, 50304, (8, 512), device='cuda')
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        with torch.autocast('cuda', dtype=torch.bfloat16):
            loss = model(x, x.roll(-1, 1))[1]
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters()])
        results.append((loss.item(), grads, torch.cuda.max_memory_allocated()))
    (plain, g_plain, m_plain), (fused, g_fused, m_fused) = results
    print(f"fused_loss: loss {plain:.5f} -> {fused:.5f}, peak {m_plain / 2**30:.3f} -> {m_fused / 2**30:.3f} GiB")
    assert abs(plain - fused) < 2e-2 and (g_plain - g_fused).abs().max() < 2e-2 * g_plain.abs().max()
    assert m_fused < 0.7 * m_plain


@pytest.mark.parametrize('fused_loss', [False, True])
def test_plan_peak_memory_is_within_a_fifth_of_max_memory_allocated(fused_loss):
    import memory
    from model import GPT, GPTConfig
    shape = dict(n_layer=6, n_head=6, n_embd=384, block_size=512, bias=False, vocab_size=50304)
    predicted = sum(memory.gpt_memory(shape, batch_size=16, world_size=1, dtype='bfloat16',
                                      fused_loss=fused_loss).values())
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model = GPT(GPTConfig(**{k: shape[k] for k in ('n_layer', 'n_head', 'n_embd', 'block_size', 'bias',
                                                   'vocab_size')})).cuda()
    model.fused_loss = fused_loss
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 'cuda')
    x = torch.randint(0, 50304, (16, 512), device='cuda')
    for _ in range(2):  # the second step has the optimizer state and both batches alive
        with torch.autocast('cuda', dtype=torch.bfloat16):
            _, loss = model(x, x)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    measured = torch.cuda.max_memory_allocated()
    print(f"fused_loss={fused_loss}: plan.py peak {predicted / 2**30:.3f} GiB, "
          f"max_memory_allocated {measured / 2**30:.3f} GiB, "
          f"ratio {predicted / measured:.3f}")
    assert 0.8 < predicted / measured < 1.25


@pytest.fixture(scope='module')
def tiny_qwen(tmp_path_factory):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from vlm_fixtures import write_qwen2_vl
    root = tmp_path_factory.mktemp('vlm')
    subprocess.run([sys.executable, os.path.join(REPO, 'data/vlm_demo/prepare.py'), '--out-dir', str(root / 'demo'),
                    '--num-train', '16', '--num-val', '4', '--size', '56'], check=True, capture_output=True)
    return write_qwen2_vl(str(root / 'qwen')), str(root / 'demo' / 'train.json')


def vlm_args(tiny_qwen):
    model, data = tiny_qwen
    return ['--model', model, '--data', data, '--min-pixels', str(56 * 56), '--max-pixels', str(56 * 56),
            '--use-lora', '--max-steps', '6', '--save-steps', '6', '--learning-rate', '1e-2', '--warmup-steps', '0']


def test_train_ds_qlora_on_the_gpu(tiny_qwen, tmp_path):
    r = run_script('train_ds.py', *vlm_args(tiny_qwen), '--use-4bit', '--no-deepspeed', '--output-dir', tmp_path,
                   timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    log = read_log(tmp_path)
    print(f"QLoRA: losses {[round(e['loss'], 4) for e in log]}, peak {log[-1]['peak_memory_gib']:.3f} GiB")
    assert len(log) == 6 and log[-1]['loss'] < log[0]['loss']


def test_train_ds_deepspeed_zero2_on_the_gpu(tiny_qwen, tmp_path):
    command = ['deepspeed', '--num_gpus=1', os.path.join(REPO, 'train_ds.py'), *vlm_args(tiny_qwen),
               '--output-dir', str(tmp_path)]
    r = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    log = read_log(tmp_path)
    print(f"ZeRO-2: losses {[round(e['loss'], 4) for e in log]}")
    assert len(log) == 6 and log[-1]['loss'] < log[0]['loss']


def test_sample_vlm_answers_with_4bit_weights_on_the_gpu(tiny_qwen, tmp_path):
    # a QLoRA checkpoint, asked through its 4-bit base: the answers come back and are scored
    r = run_script('train_ds.py', *vlm_args(tiny_qwen), '--use-4bit', '--no-deepspeed',
                   '--output-dir', tmp_path / 'run', timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    val = os.path.join(os.path.dirname(tiny_qwen[1]), 'val.jsonl')
    r = run_script('sample_vlm.py', '--checkpoint', tmp_path / 'run' / 'checkpoint-6', '--data', val, '--use-4bit',
                   '--max-new-tokens', '4', '--min-pixels', str(56 * 56), '--max-pixels', str(56 * 56),
                   '--output', tmp_path / 'preds.jsonl', timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    records = [json.loads(line) for line in open(tmp_path / 'preds.jsonl')]
    print(f"sample_vlm.py --use-4bit: {r.stdout.strip().splitlines()[-2]}")
    assert len(records) == 4 and '4 records: exact match' in r.stdout
