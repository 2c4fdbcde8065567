"""FSDP2 in train.py on CPU processes (gloo): it trains like one process, resumes exactly, and its checkpoints
are the same format as every other layout's."""
import os
import shutil

import pytest
import torch
from conftest import REPO, TINY, assert_one_line_error, run_inline, run_script, torchrun
from test_train import assert_same_losses

ARGS = [*TINY, '--eval_interval=4', '--gradient_accumulation_steps=4']


@pytest.fixture(scope='module')
def runs(char_data, tmp_path_factory):
    """out_dirs of: one process and FSDP on two, 8 iterations straight; FSDP stopped at 4 and resumed by
    FSDP and by one process; one process stopped at 4 and resumed by FSDP."""
    root = tmp_path_factory.mktemp('fsdp')
    args = [*ARGS, f'--dataset={char_data}']

    def train(out, iters, processes, resume=False):
        launch = torchrun if processes == 2 else lambda *a: run_script('train.py', *a)
        extra = ['--fsdp=True'] if processes == 2 else []
        r = launch(*args, *extra, f'--out_dir={root / out}', f'--max_iters={iters}',
                   *(['--init_from=resume'] if resume else []))
        assert r.returncode == 0, r.stderr[-3000:]
    train('single', 8, 1)
    train('fsdp', 8, 2)
    train('fsdp-half', 4, 2)
    train('single-half', 4, 1)
    for source, name, processes in (('fsdp-half', 'fsdp-resumed', 2), ('fsdp-half', 'fsdp-then-one', 1),
                                    ('single-half', 'one-then-fsdp', 2)):
        shutil.copytree(root / source, root / name)
        train(name, 8, processes, resume=True)
    return root


def test_two_fsdp_processes_train_like_one_with_the_same_global_batch(runs):
    assert_same_losses(runs / 'single', runs / 'fsdp', 1e-5)


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
                            (['--eval_hellaswag=True'], 'fsdp=True does not run with eval_hellaswag yet')):
        assert_one_line_error(run_inline('train.py', *base, *extra), expected)
    assert not (tmp_path / 'out').exists()


def test_bench_and_plan_say_they_do_not_count_fsdp_yet():
    assert_one_line_error(run_inline('bench.py', '--fsdp=True'), 'bench.py times one process or DDP, not FSDP yet')
    assert_one_line_error(run_inline('plan.py', '--fsdp=True'), 'plan.py counts one process or DDP')
