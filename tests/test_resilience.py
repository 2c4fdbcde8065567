"""Interrupted runs: kill -9 at any moment, SIGTERM/SIGINT, non-finite losses, a dying DDP rank,
and a failed write never cost more than the last checkpoint interval or corrupt a checkpoint."""
import errno
import glob
import os
import random
import signal
import subprocess
import time

import pytest
import torch
from conftest import (
    TINY,
    assert_one_line_error,
    fill_up,
    kill_one_torchrun_worker,
    read_log,
    run_script,
    start_script,
    wait_for,
)

import files
from configurator import UserError

# big enough that a checkpoint takes a few milliseconds to write, so kills can land inside a save
KILL_ARGS = ['--n_layer=2', '--n_head=4', '--n_embd=128', '--block_size=32', '--batch_size=4',
             '--gradient_accumulation_steps=1', '--compile=False', '--device=cpu', '--eval_iters=1',
             '--eval_interval=2', '--log_interval=1', '--warmup_iters=2', '--dropout=0.1', '--max_iters=80']


def mtime(path):
    return path.stat().st_mtime_ns if path.exists() else None


@pytest.mark.slow
def test_kill_9_at_random_moments_then_resume_finishes_like_an_uninterrupted_run(char_data, tmp_path):
    args = [*KILL_ARGS, f'--dataset={char_data}']
    reference = tmp_path / 'reference'
    assert run_script('train.py', *args, f'--out_dir={reference}').returncode == 0
    out = tmp_path / 'killed'
    rng = random.Random(0)
    kills = kills_in_save = 0
    while kills < 20 or (kills_in_save < 5 and kills < 40):  # a fast disk saves quickly: try more often
        resume = (out / 'ckpt.pt').exists()
        # a run killed before its first checkpoint left only a log: start over, replacing it
        proc = start_script('train.py', *args, f'--out_dir={out}',
                            '--init_from=resume' if resume else '--overwrite=True')
        if kills % 2:  # let one save complete, then kill inside the next one
            saved_at = mtime(out / 'ckpt.pt')
            wait_for(lambda: mtime(out / 'ckpt.pt') != saved_at or proc.poll() is not None, 60)
            in_save = wait_for(lambda: (out / f'.ckpt.pt.tmp{proc.pid}').exists() or proc.poll() is not None, 20)
            kills_in_save += bool(in_save and proc.poll() is None)
        else:
            time.sleep(rng.uniform(0.3, 2.5))
        if proc.poll() is not None:
            break  # finished before we could kill it
        proc.kill()
        _, stderr = proc.communicate()
        assert 'error:' not in stderr and 'Traceback' not in stderr, stderr  # every resume loaded
        kills += 1
    final = run_script('train.py', *args, f'--out_dir={out}', '--init_from=resume')
    assert final.returncode == 0, final.stderr
    assert kills >= 20 and kills_in_save >= 5, (kills, kills_in_save)
    assert torch.load(out / 'ckpt.pt', weights_only=True)['iter_num'] == 80
    assert not glob.glob(str(out / '.*tmp*'))
    # same iterations, same losses, bit for bit, as the run that was never interrupted
    assert [(r['iter'], r.get('loss'), r.get('val_loss')) for r in read_log(out)] == \
           [(r['iter'], r.get('loss'), r.get('val_loss')) for r in read_log(reference)]


@pytest.mark.parametrize('sig', [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_a_checkpoint_and_exits_cleanly(sig, char_data, tmp_path):
    out = tmp_path / 'out'
    proc = start_script('train.py', *TINY, f'--dataset={char_data}', f'--out_dir={out}', '--max_iters=100000',
                       '--eval_interval=100000')
    assert wait_for(lambda: (out / 'log.jsonl').exists() and len(read_log(out)) >= 4, 60)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    last_iter = read_log(out)[-1]['iter']
    assert torch.load(out / 'ckpt.pt', weights_only=True)['iter_num'] == last_iter + 1
    r = run_script('train.py', *TINY, f'--dataset={char_data}', f'--out_dir={out}', '--init_from=resume',
                   f'--max_iters={last_iter + 3}', '--eval_interval=100000')
    assert r.returncode == 0, r.stderr
    assert [rec['iter'] for rec in read_log(out)][-3:] == [last_iter, last_iter + 1, last_iter + 2]


def test_non_finite_loss_is_skipped_then_stops_and_keeps_the_checkpoint(char_data, tmp_path):
    out = tmp_path / 'out'
    assert run_script('train.py', *TINY, f'--dataset={char_data}', f'--out_dir={out}', '--max_iters=2',
                      '--eval_interval=2').returncode == 0
    before = (out / 'ckpt.pt').read_bytes()
    r = run_script('train.py', *TINY, f'--dataset={char_data}', f'--out_dir={out}', '--init_from=resume',
                   '--learning_rate=1e30', '--max_iters=50', '--max_nonfinite_steps=3', '--decay_lr=False')
    assert r.returncode != 0
    assert 'step skipped (1 in a row)' in r.stdout
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith('error: loss was not finite for 3 iterations in a row (last at iter')
    assert 'lower learning_rate' in last and 'checkpoint (iter 2) is untouched' in last
    assert (out / 'ckpt.pt').read_bytes() == before


def test_a_dying_ddp_rank_ends_the_whole_job(char_data, tmp_path):
    out = tmp_path / 'out'
    proc = start_script('train.py', *TINY, f'--dataset={char_data}', f'--out_dir={out}', '--max_iters=100000',
                        '--eval_interval=100000', torchrun=2, stderr=subprocess.DEVNULL)
    try:
        assert wait_for(lambda: (out / 'log.jsonl').exists() and len(read_log(out)) >= 3, 120)
        assert kill_one_torchrun_worker(proc) != 0
    finally:
        proc.kill()


class Unpicklable:
    def __reduce__(self):
        raise OSError(28, 'No space left on device')  # what a full disk looks like mid-write


def test_a_failed_save_leaves_the_previous_checkpoint_intact(tmp_path):
    path = tmp_path / 'ckpt.pt'
    files.atomic_torch_save({'iter_num': 1, 'w': torch.ones(1000)}, path)
    before = path.read_bytes()
    with pytest.raises(OSError):
        files.atomic_torch_save({'w': torch.zeros(1000), 'bad': Unpicklable()}, path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ['ckpt.pt']  # no temp file left behind


def test_a_full_disk_is_one_line_and_keeps_the_last_checkpoint_and_log(small_disk, char_data):
    # ~105K parameters: a 1.3 MB checkpoint fits once on the 2 MiB disk, but not beside a second one
    out = small_disk / 'out'
    args = [*TINY, '--n_embd=64', f'--dataset={char_data}', f'--out_dir={out}', '--eval_interval=2']
    r = run_script('train.py', *args, '--max_iters=4')
    assert r.returncode == 1 and 'Traceback' not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(f'error: could not save a checkpoint in {out} (')
    assert 'the previous one is intact' in r.stderr and 'MiB free' in r.stderr
    assert torch.load(out / 'ckpt.pt', weights_only=True)['iter_num'] == 2
    ours = ['.lock', 'best.pt', 'ckpt-0000002.pt', 'ckpt.pt', 'log.jsonl']  # ckpt-* is a hard link: no space
    assert sorted(os.listdir(out)) == ours  # and no temp file left
    log = (out / 'log.jsonl').read_text()
    fill_up(small_disk)  # now not a byte free: resuming must rewrite the log, and cannot
    r = run_script('train.py', *args, '--max_iters=4', '--init_from=resume')
    assert r.returncode == 1 and 'Traceback' not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(f'error: could not rewrite {out / "log.jsonl"}')
    assert sorted(os.listdir(out)) == ours and (out / 'log.jsonl').read_text() == log


@pytest.mark.parametrize('error, advice', [
    (errno.ENOSPC, 'free disk space'), (errno.EROFS, 'the folder is read-only or not yours'),
    (errno.EACCES, 'the folder is read-only or not yours'), (errno.ENOTEMPTY, 'something else was written there')])
def test_a_failed_write_says_what_to_do_for_its_cause(error, advice, tmp_path):
    with pytest.raises(UserError) as exit_info:
        with files.disk_write('the export x', str(tmp_path), then='free disk space'):
            raise OSError(error, os.strerror(error))
    assert str(exit_info.value).startswith(f'could not save the export x ({os.strerror(error)}')
    assert advice in str(exit_info.value)
    assert ('MiB free' in str(exit_info.value)) == (error == errno.ENOSPC)  # space left, where space is the cause


def test_a_new_run_into_a_full_disk_is_one_line(small_disk, char_data):
    fill_up(small_disk)
    r = run_script('train.py', *TINY, f'--dataset={char_data}', f'--out_dir={small_disk / "out"}', '--max_iters=2')
    assert_one_line_error(r, f"cannot write in --out_dir '{small_disk / 'out'}' (No space left on device")


def test_an_output_file_on_a_full_disk_is_one_line_and_the_old_one_stays_whole(small_disk):
    old = small_disk / 'predictions.jsonl'
    old.write_text('the results of an earlier run\n' * 1000)
    fill_up(small_disk)
    with pytest.raises(UserError) as exit_info:
        files.write_output_file(str(old), lambda f: f.write(b'new results\n' * 100000), f'the predictions {old}')
    assert_one_line_error((1, f'error: {exit_info.value}'), 'No space left on device')
    assert old.read_text() == 'the results of an earlier run\n' * 1000
    assert sorted(os.listdir(small_disk)) == ['filler', 'predictions.jsonl']  # no temp file left


def test_one_command_starts_a_run_and_every_restart_after_sigterm_or_kill_9_continues_it_exactly(char_data, tmp_path):
    args = [*TINY, f'--dataset={char_data}', '--max_iters=400', '--eval_interval=50', '--dropout=0.1']
    assert run_script('train.py', *args, f'--out_dir={tmp_path / "reference"}').returncode == 0
    out = tmp_path / 'run'
    out.mkdir()
    (out / 'log.jsonl').write_text('{"iter": 0, "loss": 99.0}\n')  # a start killed before its first checkpoint
    command = [*args, f'--out_dir={out}', '--auto_resume=True']
    proc = start_script('train.py', *command)
    assert wait_for(lambda: (out / 'ckpt.pt').exists(), 60)
    proc.send_signal(signal.SIGTERM)  # a spot instance reclaimed: it saves and exits
    assert proc.wait(timeout=60) == 0
    stopped_at = torch.load(out / 'ckpt.pt', weights_only=True)['iter_num']
    assert stopped_at >= 50  # the signal came after the first checkpoint (or at the end, on a fast machine)
    if stopped_at < 400:  # the same command resumes; killed without warning once it has saved again
        proc = start_script('train.py', *command)
        assert wait_for(lambda: torch.load(out / 'ckpt.pt', weights_only=True)['iter_num'] > stopped_at
                        or proc.poll() is not None, 60)
        proc.kill()
        proc.wait()
    assert run_script('train.py', *command).returncode == 0  # and once more: it finishes
    assert [(r['iter'], r.get('loss'), r.get('val_loss')) for r in read_log(out)] == \
           [(r['iter'], r.get('loss'), r.get('val_loss')) for r in read_log(tmp_path / 'reference')]
    # a checkpoint of a run started elsewhere is never taken for this one's
    r = run_script('train.py', *command, '--init_from=gpt2')
    assert r.returncode == 1 and "belongs to a run started from init_from='scratch', not 'gpt2'" in r.stderr
