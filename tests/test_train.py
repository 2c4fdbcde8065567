"""train.py end to end on a tiny model: learning, logging, sampling, DDP, exact resume."""
import os

import torch

from conftest import TINY, read_log, run_script, torchrun


def test_val_loss_falls_and_best_is_never_overwritten(char_data, tmp_path):
    out = tmp_path / 'out'
    r = run_script('train.py', *TINY, f'--dataset={char_data}', f'--out_dir={out}', '--max_iters=60',
                   '--eval_interval=20', '--learning_rate=1e-2', '--always_save_checkpoint=False')
    assert r.returncode == 0, r.stderr
    log = read_log(out)
    evals = [rec for rec in log if 'val_loss' in rec]
    assert [rec['iter'] for rec in evals] == [0, 20, 40, 60]
    assert evals[-1]['val_loss'] < evals[0]['val_loss'] - 0.5
    steps = [rec for rec in log if 'loss' in rec]
    assert [rec['iter'] for rec in steps] == list(range(60))
    assert set(steps[0]) == {'iter', 'loss', 'lr', 'dt_ms', 'tok_per_s', 'mfu'}
    assert 'Using device: cpu' in r.stdout
    ckpt = torch.load(out / 'ckpt.pt', weights_only=True)
    assert ckpt['best_val_loss'] == min(rec['val_loss'] for rec in evals)


def test_sample_from_a_fresh_checkpoint(char_data, tmp_path):
    out = tmp_path / 'out'
    assert run_script('train.py', *TINY, f'--dataset={char_data}', f'--out_dir={out}', '--max_iters=4',
                      '--eval_interval=2').returncode == 0
    r = run_script('sample.py', f'--out_dir={out}', '--num_samples=2', '--max_new_tokens=40', '--start=ROMEO:',
                   '--device=cpu')
    assert r.returncode == 0, r.stderr
    samples = r.stdout.split('\nROMEO:')[1:]
    assert len(samples) == 2
    assert all(len(s.split('---------------')[0]) == 40 + 1 for s in samples)  # 40 chars and print's newline


def test_sample_from_a_hugging_face_folder_with_a_file_prompt(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=64)).save_pretrained(tmp_path / 'hf')
    (tmp_path / 'prompt.txt').write_text('To be, or not to be')
    r = run_script('sample.py', f'--init_from={tmp_path / "hf"}', f'--start=FILE:{tmp_path / "prompt.txt"}',
                   '--num_samples=1', '--max_new_tokens=5', '--device=cpu')
    assert r.returncode == 0, r.stderr
    assert 'No meta.pkl found, assuming GPT-2 encodings' in r.stdout
    assert r.stdout.split('encodings...\n')[1].startswith('To be, or not to be')


def test_two_ddp_processes_train_like_one_with_the_same_global_batch(char_data, tmp_path):
    args = [*TINY, f'--dataset={char_data}', '--max_iters=8', '--eval_interval=4', '--gradient_accumulation_steps=4']
    single = run_script('train.py', *args, f'--out_dir={tmp_path / "single"}')
    ddp = torchrun(*args, f'--out_dir={tmp_path / "ddp"}')
    assert single.returncode == 0 and ddp.returncode == 0, ddp.stderr
    for a, b in zip(read_log(tmp_path / 'single'), read_log(tmp_path / 'ddp'), strict=True):
        assert a['iter'] == b['iter']
        for key in ('loss', 'val_loss', 'train_loss'):
            if key in a:
                assert abs(a[key] - b[key]) < 1e-5, (key, a, b)


def losses_after(out_dir, n):
    return [(r['iter'], r.get('loss'), r.get('val_loss')) for r in read_log(out_dir) if r['iter'] >= n]


def test_resume_continues_bit_identically(char_data, tmp_path):
    # dropout on, so the RNG state must be restored too
    args = [*TINY, f'--dataset={char_data}', '--eval_interval=3', '--dropout=0.1', '--max_iters=12']
    assert run_script('train.py', *args, f'--out_dir={tmp_path / "full"}').returncode == 0
    assert run_script('train.py', *args, f'--out_dir={tmp_path / "split"}', '--max_iters=7').returncode == 0
    r = run_script('train.py', *args, f'--out_dir={tmp_path / "split"}', '--init_from=resume')
    assert r.returncode == 0, r.stderr
    assert 'Resuming training from' in r.stdout
    full, split = losses_after(tmp_path / 'full', 7), losses_after(tmp_path / 'split', 7)
    assert len(full) == 12 - 7 + 2 and full == split  # iters 7..11 and evals at 9 and 12, exactly equal


def test_resume_runs_an_eval_the_checkpoint_was_saved_before(char_data, tmp_path):
    # a checkpoint saved on a signal at an eval iteration has not had that eval yet
    args = [*TINY, f'--dataset={char_data}', '--eval_interval=3', '--max_iters=9']
    assert run_script('train.py', *args, f'--out_dir={tmp_path / "full"}').returncode == 0
    split = tmp_path / 'split'
    assert run_script('train.py', *args, f'--out_dir={split}', '--max_iters=6').returncode == 0
    ckpt = torch.load(split / 'ckpt.pt', weights_only=True)
    ckpt['last_eval_iter'] = 3  # as if saved just before the eval at 6, which the log then lacks too
    torch.save(ckpt, split / 'ckpt.pt')
    log = (split / 'log.jsonl').read_text().splitlines(keepends=True)
    assert 'val_loss' in log[-1]
    (split / 'log.jsonl').write_text(''.join(log[:-1]))
    assert run_script('train.py', *args, f'--out_dir={split}', '--init_from=resume').returncode == 0
    assert losses_after(tmp_path / 'full', 0) == losses_after(split, 0)  # the eval at 6 once, same values


def test_resume_under_ddp_continues_bit_identically(char_data, tmp_path):
    args = [*TINY, f'--dataset={char_data}', '--eval_interval=3', '--dropout=0.1', '--max_iters=8']
    assert torchrun(*args, f'--out_dir={tmp_path / "full"}').returncode == 0
    assert torchrun(*args, f'--out_dir={tmp_path / "split"}', '--max_iters=4').returncode == 0
    r = torchrun(*args, f'--out_dir={tmp_path / "split"}', '--init_from=resume')
    assert r.returncode == 0, r.stderr
    assert losses_after(tmp_path / 'full', 4) == losses_after(tmp_path / 'split', 4)


def test_patience_stops_when_val_loss_stops_improving(char_data, tmp_path):
    out = tmp_path / 'out'
    r = run_script('train.py', *TINY, f'--dataset={char_data}', f'--out_dir={out}', '--max_iters=50',
                   '--eval_interval=5', '--learning_rate=0.0', '--min_lr=0.0', '--patience=2')
    assert r.returncode == 0, r.stderr
    assert 'early stopping' in r.stdout
    assert max(rec['iter'] for rec in read_log(out)) == 10  # evals at 0, 5 and 10: two without improvement


def test_keeps_last_checkpoints_and_the_best(char_data, tmp_path):
    out = tmp_path / 'out'
    r = run_script('train.py', *TINY, f'--dataset={char_data}', f'--out_dir={out}', '--max_iters=8',
                   '--eval_interval=2', '--learning_rate=1e-2', '--keep_last=2')
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(out)) == ['.lock', 'best.pt', 'ckpt-0000004.pt', 'ckpt-0000006.pt', 'ckpt.pt', 'log.jsonl']
    assert torch.load(out / 'ckpt-0000006.pt', weights_only=True)['iter_num'] == 6
    best = torch.load(out / 'best.pt', weights_only=True)
    assert best['best_val_loss'] == min(r['val_loss'] for r in read_log(out) if 'val_loss' in r)
