"""train.py end to end on a tiny model: learning, logging, sampling, DDP, compile, exact resume."""
import os
import shutil

import pytest
import torch
from conftest import REPO, TINY, read_log, run_inline, run_script, tiny_hf_gpt2, torchrun


def assert_same_losses(a_dir, b_dir, tolerance):
    def losses(out_dir):  # a compiled run also logs how long it compiled
        return [r for r in read_log(out_dir) if 'compile_s' not in r]
    for a, b in zip(losses(a_dir), losses(b_dir), strict=True):
        assert a['iter'] == b['iter']
        for key in ('loss', 'val_loss', 'train_loss'):
            if key in a:
                assert abs(a[key] - b[key]) < tolerance, (key, a, b)


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
    assert set(steps[0]) == {'iter', 'loss', 'lr', 'dt_ms', 'tokens_per_s', 'mfu', 'peak_flops', 'peak_memory_gib',
                             'elapsed_s', 'data_wait'}
    assert 'Using device: cpu' in r.stdout
    ckpt = torch.load(out / 'ckpt.pt', weights_only=True)
    assert ckpt['best_val_loss'] == min(rec['val_loss'] for rec in evals)


def test_sample_from_a_fresh_checkpoint(finished_run):
    r = run_script('sample.py', f'--out_dir={finished_run}', '--num_samples=2', '--max_new_tokens=40', '--start=ROMEO:',
                   '--device=cpu')
    assert r.returncode == 0, r.stderr
    samples = r.stdout.split('\nROMEO:')[1:]
    assert len(samples) == 2
    assert all(len(s.split('---------------')[0]) == 40 + 1 for s in samples)  # 40 chars and print's newline


def test_sample_from_a_hugging_face_folder_with_a_file_prompt(tmp_path):
    tiny_hf_gpt2(tmp_path / 'hf', vocab_size=50257, n_positions=64)
    (tmp_path / 'prompt.txt').write_text('To be, or not to be')
    r = run_script('sample.py', f'--init_from={tmp_path / "hf"}', f'--start=FILE:{tmp_path / "prompt.txt"}',
                   '--num_samples=1', '--max_new_tokens=5', '--device=cpu')
    assert r.returncode == 0, r.stderr
    assert 'GPT-2 BPE encodings' in r.stdout
    assert r.stdout.split('GPT-2 BPE encodings\n')[1].startswith('To be, or not to be')


@pytest.mark.parametrize('optimizer', ['adamw', 'muon'])
def test_two_ddp_processes_train_like_one_with_the_same_global_batch(char_data, tmp_path, optimizer):
    args = [*TINY, f'--dataset={char_data}', '--max_iters=8', '--eval_interval=4', '--gradient_accumulation_steps=4',
            f'--optimizer={optimizer}']
    single = run_script('train.py', *args, f'--out_dir={tmp_path / "single"}')
    ddp = torchrun(*args, f'--out_dir={tmp_path / "ddp"}')
    assert single.returncode == 0 and ddp.returncode == 0, ddp.stderr
    # Muon orthogonalizes in bfloat16: the all-reduce's last-bit differences in the gradients grow a little
    assert_same_losses(tmp_path / 'single', tmp_path / 'ddp', 1e-5 if optimizer == 'adamw' else 1e-4)


def losses_after(out_dir, n):
    return [(r['iter'], r.get('loss'), r.get('val_loss')) for r in read_log(out_dir) if r['iter'] >= n]


@pytest.mark.parametrize('optimizer', ['adamw', 'muon'])
def test_resume_continues_bit_identically(char_data, tmp_path, optimizer):
    # dropout on, so the RNG state must be restored too; Muon's momentum must be restored as AdamW's moments
    args = [*TINY, f'--dataset={char_data}', '--eval_interval=3', '--dropout=0.1', '--max_iters=12',
            f'--optimizer={optimizer}']
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
    for out, extra in (('full', []), ('split', ['--max_iters=4'])):
        r = torchrun(*args, f'--out_dir={tmp_path / out}', *extra)
        assert r.returncode == 0, r.stderr[-3000:]
    r = torchrun(*args, f'--out_dir={tmp_path / "split"}', '--init_from=resume')
    assert r.returncode == 0, r.stderr
    full, split = losses_after(tmp_path / 'full', 4), losses_after(tmp_path / 'split', 4)
    assert len(full) == 8 - 4 + 1 and full == split  # iters 4..7 and the eval at 6, exactly equal


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


@pytest.mark.slow
def test_compiled_training_with_the_fused_loss_and_autotuning_matches_eager(char_data, tmp_path):
    args = [*TINY, f'--dataset={char_data}', '--max_iters=6', '--eval_interval=3', '--n_layer=1']
    eager = run_script('train.py', *args, '--fused_loss=False', f'--out_dir={tmp_path / "eager"}')
    compiled = run_script('train.py', *args, '--compile=True', '--compile_mode=max-autotune-no-cudagraphs',
                          '--fused_loss=True', f'--out_dir={tmp_path / "compiled"}', timeout=600)
    assert eager.returncode == 0 and compiled.returncode == 0, compiled.stderr[-2000:]
    assert 'compiling the model' in compiled.stdout
    assert_same_losses(tmp_path / 'eager', tmp_path / 'compiled', 1e-3)


@pytest.mark.slow
def test_compiled_ddp_trains_like_one_eager_process(char_data, tmp_path):
    # compiled first, then wrapped: Dynamo compiles inside DDP's forward (its bucketed graph)
    args = [*TINY, f'--dataset={char_data}', '--max_iters=4', '--eval_interval=2', '--n_layer=1',
            '--gradient_accumulation_steps=2']
    single = run_script('train.py', *args, f'--out_dir={tmp_path / "single"}')
    ddp = torchrun(*args, '--compile=True', f'--out_dir={tmp_path / "ddp"}', timeout=600, env=dict(TORCH_LOGS='dynamo'))
    assert single.returncode == 0 and ddp.returncode == 0, ddp.stderr[-3000:]
    # the first graph Dynamo compiles ([0/0], the one training runs) was split at DDP's gradient buckets;
    # a probe compiled before the DDP wrap gave [0/0] without it, and only later recompiles had it
    assert '[0/0] DDPOptimizer used bucket cap' in ddp.stderr
    assert_same_losses(tmp_path / 'single', tmp_path / 'ddp', 1e-3)


def test_a_plain_iteration_does_not_wait_for_the_device(char_data, tmp_path, monkeypatch):
    # every .item() is a host-device sync on a GPU: only logs, evals and periodic checks may have one
    calls = []
    for name in ('item', 'tolist'):
        method = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, method=method: calls.append(1) or method(self))
    monkeypatch.chdir(REPO)
    code, message = run_inline('train.py', *TINY, f'--dataset={char_data}', f'--out_dir={tmp_path}', '--max_iters=40',
                               '--eval_interval=40', '--eval_iters=1', '--log_interval=1000')
    assert code == 0, message
    assert len(calls) <= 40 / 4, len(calls)  # before: three per iteration; now 4 in evals, 5 checks, 1 at the end


def test_checkpoints_are_read_onto_the_cpu(finished_run, char_data, tmp_path, monkeypatch):
    # on a GPU, RNG states loaded onto the device crashed every resume; sampling held the optimizer there
    out = shutil.copytree(finished_run, tmp_path / 'out')
    placed = []
    load = torch.load
    monkeypatch.setattr(torch, 'load',
                        lambda *a, **k: placed.append((k.get('map_location'), k.get('mmap'))) or load(*a, **k))
    monkeypatch.chdir(REPO)
    assert run_inline('train.py', *TINY, f'--dataset={char_data}', f'--out_dir={out}', '--init_from=resume',
                      '--max_iters=3')[0] == 0
    assert run_inline('sample.py', f'--out_dir={out}', '--max_new_tokens=2', '--num_samples=1', '--device=cpu')[0] == 0
    assert placed == [('cpu', False), ('cpu', True)]  # sampling maps the file: the optimizer state is never read


def test_sample_draws_all_samples_in_one_batch(finished_run, monkeypatch):
    from model import GPT
    out = finished_run
    batches = []
    generate = GPT.generate
    monkeypatch.setattr(GPT, 'generate',
                        lambda self, idx, *a, **k: batches.append(idx.shape[0]) or generate(self, idx, *a, **k))
    monkeypatch.chdir(REPO)
    assert run_inline('sample.py', f'--out_dir={out}', '--max_new_tokens=3', '--num_samples=5', '--device=cpu')[0] == 0
    assert batches == [5]


def test_a_rank_that_cannot_see_out_dir_is_refused(char_data, tmp_path):
    # two "nodes" whose out_dir are different folders: rank 1 starts in another working directory
    fake = tmp_path / 'elsewhere'
    fake.mkdir()
    (fake / 'sitecustomize.py').write_text(
        f"import os\nif os.environ.get('RANK') == '1':\n    os.chdir({str(fake)!r})\n")
    r = run_script('train.py', *TINY, f'--dataset={char_data}', '--out_dir=out-not-shared', '--max_iters=2', torchrun=2,
                   cwd=tmp_path, env=dict(PYTHONPATH=str(fake)))
    assert r.returncode != 0
    assert "1 process(es) cannot see out_dir 'out-not-shared' as rank 0 wrote it" in r.stderr
    assert 'a filesystem that every node shares' in r.stderr
