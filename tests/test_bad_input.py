"""Every mistake a user can make gets one line naming the problem and the fix, a non-zero exit,
and leaves earlier results untouched."""
import hashlib
import os
import pickle
import shutil

import pytest

from conftest import TINY, run_script


@pytest.fixture(scope='module')
def finished_run(char_data, tmp_path_factory):
    out = tmp_path_factory.mktemp('finished_run')
    r = run_script('train.py', *TINY, f'--dataset={char_data}', f'--out_dir={out}', '--max_iters=2', '--eval_interval=2')
    assert r.returncode == 0, r.stderr
    return str(out)


@pytest.fixture
def results(finished_run, tmp_path):
    """A copy of a finished run's out_dir that a bad command must leave as it is."""
    out = tmp_path / 'out'
    shutil.copytree(finished_run, out)
    return out


def snapshot(folder):
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in sorted(os.listdir(folder))}


def assert_one_line_error(r, fragment):
    assert r.returncode != 0
    assert 'Traceback' not in r.stderr, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith('error: ') and fragment in last, r.stderr


def make_dataset(folder, n_tokens, vocab_size=None):
    import numpy as np
    os.makedirs(folder, exist_ok=True)
    for split in ('train', 'val'):
        np.arange(n_tokens, dtype=np.uint16).tofile(os.path.join(folder, f'{split}.bin'))
    if vocab_size:
        with open(os.path.join(folder, 'meta.pkl'), 'wb') as f:
            pickle.dump({'vocab_size': vocab_size}, f)
    return folder


def tiny_hf_gpt2(folder):
    from transformers import GPT2Config, GPT2LMHeadModel
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=100, n_positions=32)).save_pretrained(folder)
    return folder


CASES = {
    'unknown config key': (['--batch_sise=3'], 'unknown setting --batch_sise; did you mean batch_size'),
    'wrong value type': (['--max_iters=ten'], "max_iters must be int like the default"),
    'missing config file': (['config/no_such_config.py'], "config file 'config/no_such_config.py' not found"),
    'dataset folder missing': (['--dataset=no_such_data'], 'data/no_such_data/train.bin not found: prepare the data first'),
    'batch_size zero': (['--batch_size=0'], 'batch_size must be > 0'),
    'block_size negative': (['--block_size=-8'], 'block_size must be > 0'),
    'init_from unknown': (['--init_from=gpt3'], "init_from='gpt3' is neither scratch, resume"),
    'dtype unknown': (['--dtype=float64'], "dtype='float64' is unknown"),
    'device without cuda': (['--device=cuda'], "CUDA is not available here: use --device=cpu"),
    'resume with other n_layer': (['--init_from=resume', '--n_layer=3'],
                                  'the checkpoint has n_layer=2 but n_layer=3 was given'),
}


@pytest.mark.parametrize('case', CASES)
def test_bad_setting(case, results, char_data):
    args, fragment = CASES[case]
    before = snapshot(results)
    r = run_script('train.py', *TINY, f'--dataset={char_data}', f'--out_dir={results}', *args)
    assert_one_line_error(r, fragment)
    assert snapshot(results) == before


def test_train_bin_shorter_than_a_block(results, tmp_path):
    data = make_dataset(tmp_path / 'short', 20)
    r = run_script('train.py', *TINY, f'--dataset={data}', f'--out_dir={results}')
    assert_one_line_error(r, 'has 20 tokens, fewer than block_size+1=33')


def test_meta_vocabulary_larger_than_the_model(results, tmp_path):
    data = make_dataset(tmp_path / 'big_vocab', 1000, vocab_size=100)
    before = snapshot(results)
    r = run_script('train.py', *TINY, f'--dataset={data}', f'--out_dir={results}', '--init_from=resume')
    assert_one_line_error(r, "has 100 tokens but the model's vocabulary has 61")
    assert snapshot(results) == before


@pytest.mark.parametrize('damage', ['missing', 'truncated', 'corrupt'])
def test_resume_from_a_damaged_checkpoint(damage, results, char_data):
    ckpt = results / 'ckpt.pt'
    if damage == 'missing':
        ckpt.unlink()
    elif damage == 'truncated':
        ckpt.write_bytes(ckpt.read_bytes()[:ckpt.stat().st_size // 2])
    else:
        ckpt.write_bytes(b'\x00garbage' * 1000)
    before = snapshot(results)
    r = run_script('train.py', *TINY, f'--dataset={char_data}', f'--out_dir={results}', '--init_from=resume')
    assert_one_line_error(r, 'no checkpoint at' if damage == 'missing' else 'is truncated or corrupt')
    assert snapshot(results) == before


def test_gradient_accumulation_not_divisible_by_processes(char_data, tmp_path):
    env = dict(RANK='0', LOCAL_RANK='0', WORLD_SIZE='3')
    r = run_script('train.py', *TINY, f'--dataset={char_data}', f'--out_dir={tmp_path}',
                   '--gradient_accumulation_steps=4', env=env)
    assert_one_line_error(r, 'gradient_accumulation_steps=4 is not divisible by the 3 processes')


def test_block_size_larger_than_the_pretrained_model(char_data, tmp_path):
    hf = tiny_hf_gpt2(tmp_path / 'hf')
    r = run_script('train.py', *TINY, f'--dataset={char_data}', f'--out_dir={tmp_path / "out"}',
                   f'--init_from={hf}', '--block_size=64')
    assert_one_line_error(r, "block_size=64 is larger than")


def test_out_dir_not_writable(char_data, tmp_path):
    blocker = tmp_path / 'a_file'
    blocker.write_text('not a folder')
    r = run_script('train.py', *TINY, f'--dataset={char_data}', f'--out_dir={blocker / "out"}')
    assert_one_line_error(r, 'is not writable')


def test_sample_without_a_checkpoint(tmp_path):
    r = run_script('sample.py', f'--out_dir={tmp_path}')
    assert_one_line_error(r, 'no checkpoint at')


def test_bfloat16_on_a_gpu_without_it(char_data, tmp_path):
    # pretend to be a pre-Ampere GPU (a T4): train.py must refuse bf16 before touching the device
    fake = tmp_path / 'fake_gpu'
    fake.mkdir()
    (fake / 'sitecustomize.py').write_text(
        "import torch\n"
        "torch.cuda.is_available = lambda: True\n"
        "torch.cuda.is_bf16_supported = lambda *a, **k: False\n"
        "torch.cuda.get_device_name = lambda *a, **k: 'Tesla T4'\n")
    r = run_script('train.py', *TINY, f'--dataset={char_data}', f'--out_dir={tmp_path / "out"}', '--device=cuda',
                   '--dtype=bfloat16', env=dict(PYTHONPATH=str(fake)))
    assert_one_line_error(r, 'Tesla T4 has no bfloat16: use --dtype=float16')
    assert not (tmp_path / 'out').exists()
