"""FSDP2 in train.py on CPU processes (gloo): it trains like one process, resumes exactly, and its checkpoints
are the same format as every other layout's."""
import os
import shutil
import subprocess

import pytest
import torch
from conftest import (
    REPO,
    TINY,
    assert_one_line_error,
    kill_one_torchrun_worker,
    read_log,
    run_inline,
    run_script,
    start_script,
    torchrun,
    wait_for,
)
from test_train import assert_same_losses

import memory
import plan
from gpt_settings import gpt_shape
from model import GPT

ARGS = [*TINY, '--eval_interval=4', '--gradient_accumulation_steps=4']


@pytest.fixture(scope='module')
def runs(char_data, tmp_path_factory):
    """out_dirs of: one process and FSDP on two, 8 iterations straight; FSDP stopped at 4 and resumed by
    FSDP and by one process; one process stopped at 4 and resumed by FSDP."""
    root = tmp_path_factory.mktemp('fsdp')
    args = [*ARGS, f'--dataset={char_data}']

    def train(out, iters, processes, resume=False, *extra):
        launch = torchrun if processes == 2 else lambda *a: run_script('train.py', *a)
        extra = ['--fsdp=True', *extra] if processes == 2 else []
        r = launch(*args, *extra, f'--out_dir={root / out}', f'--max_iters={iters}',
                   *(['--init_from=resume'] if resume else []))
        assert r.returncode == 0, r.stderr[-3000:]
    train('single', 8, 1)
    train('fsdp', 8, 2)
    train('fsdp-offload', 8, 2, False, '--fsdp_offload=True', '--compile=True', '--activation_checkpointing=True')
    train('fsdp-half', 4, 2)
    train('single-half', 4, 1)
    for source, name, processes in (('fsdp-half', 'fsdp-resumed', 2), ('fsdp-half', 'fsdp-then-one', 1),
                                    ('single-half', 'one-then-fsdp', 2)):
        shutil.copytree(root / source, root / name)
        train(name, 8, processes, resume=True)
    return root


def test_two_fsdp_processes_train_like_one_with_the_same_global_batch(runs):
    assert_same_losses(runs / 'single', runs / 'fsdp', 1e-5)


def test_offload_compile_and_activation_checkpointing_train_alike_under_fsdp(runs):
    assert_same_losses(runs / 'single', runs / 'fsdp-offload', 1e-4)  # compiled kernels round differently


def test_an_fsdp_run_resumes_exactly(runs):
    assert_same_losses(runs / 'fsdp', runs / 'fsdp-resumed', 1e-6)


def test_a_checkpoint_resumes_across_layouts(runs):
    assert_same_losses(runs / 'single', runs / 'fsdp-then-one', 1e-5)  # FSDP on 2 -> one process
    assert_same_losses(runs / 'single', runs / 'one-then-fsdp', 1e-5)  # one process -> FSDP on 2
    fsdp, single = (torch.load(runs / name / 'ckpt.pt', weights_only=True) for name in ('fsdp', 'single'))
    assert fsdp['model'].keys() == single['model'].keys()  # one format: whole tensors, the same names
    assert all(fsdp['model'][k].shape == single['model'][k].shape for k in fsdp['model'])
    assert fsdp['optimizer']['param_groups'][0]['params'] == single['optimizer']['param_groups'][0]['params']


def test_sample_and_export_read_an_fsdp_checkpoint(runs, tmp_path):
    r = run_script('sample.py', f'--out_dir={runs / "fsdp"}', '--num_samples=1', '--max_new_tokens=5', '--device=cpu')
    assert r.returncode == 0, r.stderr
    assert run_inline('export.py', f'--out_dir={runs / "fsdp"}', f'--export_dir={tmp_path / "hf"}')[0] == 0
    assert os.path.isfile(tmp_path / 'hf' / 'config.json')


def test_what_fsdp_does_not_run_yet_is_one_line(char_data, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    base = [*ARGS, f'--dataset={char_data}', f'--out_dir={tmp_path / "out"}', '--fsdp=True']
    for extra, expected in ((['--optimizer=muon'], "fsdp=True does not run with optimizer='muon' yet"),
                            (['--init_from=gpt2', '--lora_rank=4'], 'fsdp=True does not run with LoRA yet'),
                            (['--dtype=float16'], 'fsdp=True does not run with float16 yet'),
                            (['--eval_hellaswag=True'], 'fsdp=True does not run with eval_hellaswag yet'),
                            (['--fsdp=False', '--fsdp_offload=True'], "fsdp_offload=True offloads FSDP's shards")):
        assert_one_line_error(run_inline('train.py', *base, *extra), expected)
    assert not (tmp_path / 'out').exists()


def test_fsdp_without_torchrun_says_it_is_a_plain_run(char_data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    assert run_inline('train.py', *ARGS, f'--dataset={char_data}', f'--out_dir={tmp_path}', '--fsdp=True',
                      '--max_iters=2')[0] == 0
    assert 'fsdp=True without torchrun: nothing to shard, a plain run' in capsys.readouterr().out
    assert torch.load(tmp_path / 'ckpt.pt', weights_only=True)['iter_num'] == 2


def test_bench_says_it_does_not_time_fsdp_yet():
    assert_one_line_error(run_inline('bench.py', '--fsdp=True'), 'bench.py times one process or DDP, not FSDP yet')


def test_a_dying_fsdp_rank_ends_the_job_and_the_last_checkpoint_loads(char_data, tmp_path):
    out = tmp_path / 'out'
    proc = start_script('train.py', *ARGS, f'--dataset={char_data}', f'--out_dir={out}', '--max_iters=100000',
                        '--fsdp=True', torchrun=2, stderr=subprocess.DEVNULL)
    try:
        assert wait_for(lambda: (out / 'log.jsonl').exists() and any('val_loss' in r and r['iter'] >= 8
                                                                       for r in read_log(out)), 120)
        assert kill_one_torchrun_worker(proc) != 0
    finally:
        proc.kill()
    checkpoint = torch.load(out / 'ckpt.pt', weights_only=True)
    assert checkpoint['iter_num'] >= 4 and GPT.from_checkpoint(checkpoint).config.n_layer == 2


def test_plan_fits_gpt2_xl_on_two_24gb_gpus_only_with_fsdp(capsys):
    config = os.path.join(REPO, 'config', 'finetune_gpt2_xl_fsdp.py')
    plan.plan([config, '--gpus=2', '--gpu=RTX_4090'])
    out = capsys.readouterr().out
    assert "2 GPUs with FSDP" in out
    assert "| RTX 4090 | 2 | yes | `--batch_size=2 --gradient_accumulation_steps=16`" in out
    shape = gpt_shape(plan.gpt_config([config]))
    ddp = memory.gpt_memory(shape, 1, 2, 'bfloat16', fused_loss=True, activation_checkpointing=True)
    assert memory.needed_bytes(ddp, 2) > 24 * memory.GiB  # AdamW's whole state on every card: no micro-batch fits
    plan.plan([config, '--gpus=2', '--gpu=RTX_4080', '--init_from=gpt2-large'])  # GPT-2 large on 2 x 16 GB
    assert "| RTX 4080 | 2 | yes |" in capsys.readouterr().out


# -----------------------------------------------------------------------------
# memory.py's FSDP terms against the real shards of two CPU processes

def shard_bytes(rank, port, shape, results):
    import torch.distributed as dist
    from test_plan import optimizer_tensors, tensor_bytes

    import gpt_checkpoint
    from model import GPT, GPTConfig
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=2)
    model = GPT(GPTConfig(**shape))
    model.fully_shard('float32')
    optim = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 'cpu')
    x = torch.randint(0, shape['vocab_size'], (2, shape['block_size']))
    model(x, x)[1].backward()
    optim.step()
    params = list(model.parameters())
    weights, _, optim_state = gpt_checkpoint.full_state(model, optim)
    results[rank] = dict(weights=tensor_bytes([p.to_local() for p in params]),
                         gradients=tensor_bytes([p.grad.to_local() for p in params]),
                         optimizer=tensor_bytes([getattr(t, '_local_tensor', t) for t in optimizer_tensors(optim)]),
                         gathered=sum({t.data_ptr(): t.nbytes for t in [*weights.values(), *(
                             v for s in (optim_state or {}).get('state', {}).values() for v in s.values())]}.values()))
    dist.destroy_process_group()


def test_planned_fsdp_bytes_are_the_real_shards_and_the_gathered_checkpoint():
    from conftest import free_port
    shape = dict(n_layer=2, n_head=2, n_embd=64, block_size=15, bias=True, vocab_size=97)  # odd rows: padded shards
    results = torch.multiprocessing.Manager().dict()
    torch.multiprocessing.spawn(shard_bytes, args=(free_port(), shape, results), nprocs=2)
    planned = memory.gpt_memory(shape, batch_size=2, world_size=2, dtype='float32', fsdp=True)
    for part in ('weights', 'gradients', 'optimizer'):  # rank 0 holds the padded chunks, the largest
        assert results[0][part] == planned[part] and results[1][part] <= planned[part], part
    assert results[0]['gathered'] == memory.gpt_checkpoint_bytes(shape)  # rank 0's host, at a save
    assert results[1]['gathered'] == 0
    whole = memory.gpt_memory(shape, batch_size=2, world_size=2, dtype='float32')  # DDP: a whole copy each
    assert planned['optimizer'] < 0.6 * whole['optimizer']
