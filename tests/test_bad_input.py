"""Every mistake a user can make gets one line naming the problem and the fix, a non-zero exit,
and leaves earlier results untouched. One table per script: adding a case is one line.

Most cases run the script in this process (run_inline): they are refused before any real work,
so a case costs milliseconds, not a new Python. Real processes are kept for what only a process
shows: signals, locks between processes, a full disk, a fake GPU."""
import hashlib
import os
import pickle
import shutil
import signal

import numpy as np
import pytest
import torch
from conftest import (
    REPO,
    TINY,
    assert_one_line_error,
    read_log,
    run_inline,
    run_script,
    start_script,
    tiny_hf_gpt2,
    wait_for,
    write_checkpoint,
)

# -----------------------------------------------------------------------------
# fixtures: a finished run, and a folder of broken things to feed the scripts

@pytest.fixture
def results(finished_run, tmp_path):
    """A copy of a finished run's out_dir that a bad command must leave as it is."""
    out = tmp_path / 'out'
    shutil.copytree(finished_run, out)
    return out


def snapshot(folder):
    # every file's bytes; .lock holds only the pid of the last run that took it
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest()
            for name in sorted(os.listdir(folder)) if name != '.lock'}


class RunsCode:
    def __reduce__(self):  # unpickling this runs code: what a malicious meta.pkl does
        return (os.system, (f'touch {MARKER}',))


MARKER = os.path.join(os.environ.get('TMPDIR', '/tmp'), f'meta_pkl_ran_code_{os.getpid()}')


def write_tokens(folder, tokens, meta=None, raw_meta=None):
    os.makedirs(folder, exist_ok=True)
    for split in ('train', 'val'):
        np.asarray(tokens, dtype=np.uint16).tofile(os.path.join(folder, f'{split}.bin'))
    if meta is not None or raw_meta is not None:
        with open(os.path.join(folder, 'meta.pkl'), 'wb') as f:
            f.write(raw_meta if raw_meta is not None else pickle.dumps(meta))
    return str(folder)


def lora_checkpoint(base, good):
    """A LoRA checkpoint on the Hugging Face folder base, with the other entries of the checkpoint good."""
    import dataclasses

    import gpt_lora
    from model import GPT
    model = GPT.from_pretrained(base)
    gpt_lora.add(model, 2, 4.0, 0.0, gpt_lora.TARGETS)
    weights, lora = gpt_lora.checkpoint_weights(model)
    return dict(good, model=weights, lora=lora, model_args=dataclasses.asdict(model.config))


@pytest.fixture(scope='module')
def bad(finished_run, tmp_path_factory):
    """name -> path of each broken input, for the {name} placeholders in the tables."""
    root = tmp_path_factory.mktemp('bad')
    chars = {'stoi': {'a': 0, 'b': 1}, 'itos': {0: 'a', 1: 'b'}}
    good = torch.load(os.path.join(finished_run, 'ckpt.pt'), weights_only=True)
    tiny_hf_gpt2(root / 'hf')
    paths = {
        'short_data': write_tokens(root / 'short', range(20)),
        'odd_bytes': write_tokens(root / 'odd', range(1000)),
        'corrupt_meta': write_tokens(root / 'corrupt_meta', [0] * 1000, raw_meta=b'\x80\x04garbage'),
        'meta_without_vocab': write_tokens(root / 'no_vocab', [0] * 1000, meta={'stoi': {}}),
        'meta_with_code': write_tokens(root / 'code', [0] * 1000, raw_meta=pickle.dumps({'vocab_size': RunsCode()})),
        'meta_too_small': write_tokens(root / 'small_vocab', range(60), meta=dict(chars, vocab_size=2)),
        'meta_too_big': write_tokens(root / 'big_vocab', [i % 100 for i in range(1000)], meta={'vocab_size': 100}),
        'ckpt_list': write_checkpoint(root / 'ckpt_list', [1, 2, 3]),
        'ckpt_no_optimizer': write_checkpoint(root / 'ckpt_no_optimizer',
                                              {k: v for k, v in good.items() if k != 'optimizer'}),
        'ckpt_wrong_weights': write_checkpoint(root / 'ckpt_wrong_weights',
                                               dict(good, model_args=dict(good['model_args'], n_embd=64))),
        'ckpt_bad_args': write_checkpoint(root / 'ckpt_bad_args',
                                          dict(good, model_args=dict(good['model_args'], n_head=0))),
        'hf': str(root / 'hf'),
        'hf_no_config': str(root / 'hf_no_config'),
        'not_utf8': str(root / 'latin1.py'),
        'prompt_not_utf8': str(root / 'prompt.txt'),
        'a_file': str(root / 'a_file'),
        'fresh': str(root / 'fresh'),  # an out_dir with no run in it
        # the finished run's 61 characters in another order, and the same ids without characters (BPE)
        'other_chars': write_tokens(root / 'other_chars', [i % 61 for i in range(1000)],
                                    meta={'vocab_size': 61, 'itos': {i: chr(200 + i) for i in range(61)},
                                          'stoi': {chr(200 + i): i for i in range(61)}}),
        'bpe_data': write_tokens(root / 'bpe_data', [i % 61 for i in range(1000)]),
    }
    os.makedirs(paths['hf_no_config'])
    with open(os.path.join(paths['odd_bytes'], 'val.bin'), 'ab') as f:
        f.write(b'\x01')
    for name, damage in (('hf_bad_json', b'{"n_layer": '), ('hf_missing_keys', b'{"n_layer": 1}')):
        paths[name] = str(shutil.copytree(paths['hf'], root / name))
        with open(os.path.join(paths[name], 'config.json'), 'wb') as f:
            f.write(damage)
    for name in ('changed', 'gone'):  # LoRA checkpoints whose base folder is later replaced, or deleted
        base = str(shutil.copytree(paths['hf'], root / f'base_{name}'))
        paths[f'lora_base_{name}'] = write_checkpoint(root / f'lora_base_{name}', lora_checkpoint(base, good))
    tiny_hf_gpt2(root / 'base_changed', seed=1)
    shutil.rmtree(root / 'base_gone')
    paths['hf_bad_weights'] = str(shutil.copytree(paths['hf'], root / 'hf_bad_weights'))
    with open(os.path.join(paths['hf_bad_weights'], 'model.safetensors'), 'wb') as f:
        f.write(b'\x00' * 64)
    for name in ('not_utf8', 'prompt_not_utf8'):
        with open(paths[name], 'wb') as f:
            f.write('batch_size = 3  # café\n'.encode('latin-1'))
    with open(paths['a_file'], 'w') as f:
        f.write('not a folder')
    return paths


def fill(args, paths):
    return [arg.format(**paths) for arg in args]


# -----------------------------------------------------------------------------
# train.py: (what, arguments, exit code, words the error line must contain)

TRAIN = [
    ('unknown setting', ['--batch_sise=3'], 1, 'unknown setting --batch_sise; did you mean batch_size'),
    ('wrong type', ['--max_iters=ten'], 1, 'max_iters must be int like the default'),
    ('no value', ['--compile'], 1, "'--compile' has no value"),
    ('missing config file', ['config/no_such_config.py'], 1, "config file 'config/no_such_config.py' not found"),
    ('config file not UTF-8', ['{not_utf8}'], 1, 'is not UTF-8'),
    ('dataset missing', ['--dataset=no_such_data'], 1, 'data/no_such_data/train.bin not found: prepare the data first'),
    ('batch_size 0', ['--batch_size=0'], 1, 'batch_size must be in [1, inf), got 0'),
    ('block_size negative', ['--block_size=-8'], 1, 'block_size must be in [1, inf)'),
    ('accumulation 0', ['--gradient_accumulation_steps=0'], 1, 'gradient_accumulation_steps must be in [1, inf)'),
    ('eval_iters 0', ['--eval_iters=0'], 1, 'eval_iters must be in [1, inf)'),
    ('eval_interval 0', ['--eval_interval=0'], 1, 'eval_interval must be in [1, inf)'),
    ('log_interval 0', ['--log_interval=0'], 1, 'log_interval must be in [1, inf)'),
    ('keep_last negative', ['--keep_last=-1'], 1, 'keep_last must be in [0, inf)'),
    ('patience negative', ['--patience=-1'], 1, 'patience must be in [0, inf)'),
    ('n_layer 0', ['--n_layer=0'], 1, 'n_layer must be in [1, inf)'),
    ('n_head 0', ['--n_head=0'], 1, 'n_head must be in [1, inf)'),
    ('n_embd 0', ['--n_embd=0'], 1, 'n_embd must be in [1, inf)'),
    ('heads do not divide the width', ['--n_embd=30', '--n_head=4'], 1, 'n_embd=30 is not divisible by n_head=4'),
    ('dropout 1', ['--dropout=1.0'], 1, 'dropout must be in [0, 1)'),
    ('dropout negative', ['--dropout=-0.1'], 1, 'dropout must be in [0, 1)'),
    ('learning_rate negative', ['--learning_rate=-1e-3'], 1, 'learning_rate must be in [0, inf)'),
    ('learning_rate infinite', ['--learning_rate=1e999'], 1, 'learning_rate must be in [0, inf), got inf'),
    ('max_iters negative', ['--max_iters=-1'], 1, 'max_iters must be in [0, inf)'),
    ('weight_decay negative', ['--weight_decay=-0.1'], 1, 'weight_decay must be in [0, inf)'),
    ('beta1 1', ['--beta1=1.0'], 1, 'beta1 must be in [0, 1)'),
    ('beta2 negative', ['--beta2=-0.5'], 1, 'beta2 must be in [0, 1)'),
    ('grad_clip negative', ['--grad_clip=-1.0'], 1, 'grad_clip must be in [0, inf)'),
    ('max_nonfinite_steps 0', ['--max_nonfinite_steps=0'], 1, 'max_nonfinite_steps must be in [1, inf)'),
    ('warmup negative', ['--warmup_iters=-1'], 1, 'warmup_iters must be in [0, inf)'),
    ('decay shorter than warmup', ['--warmup_iters=100', '--lr_decay_iters=50'], 1,
     'lr_decay_iters=50 must be larger than warmup_iters=100'),
    ('decay_lr off allows any lengths',
     ['--warmup_iters=100', '--lr_decay_iters=50', '--decay_lr=False', '--optimizer=x'], 1, "optimizer='x' is unknown"),
    ('min_lr above learning_rate', ['--min_lr=1e-2', '--learning_rate=1e-3'], 1,
     'min_lr=0.01 is above learning_rate=0.001'),
    ('min_lr negative', ['--min_lr=-1e-5'], 1, 'min_lr must be in [0, inf)'),
    ('seed negative', ['--seed=-1'], 1, 'seed must be in [0, 4294967296)'),
    ('seed too large', ['--seed=99999999999'], 1, 'seed must be in [0, 4294967296)'),
    ('optimizer unknown', ['--optimizer=sgd'], 1, "optimizer='sgd' is unknown: use adamw, adamw8bit or muon"),
    ('muon without a learning_rate', ['--optimizer=muon', '--learning_rate=0.0', '--min_lr=0.0'], 1,
     'give learning_rate > 0'),
    ('compile_mode unknown', ['--compile_mode=fast'], 1, "compile_mode='fast' is unknown: use default, max-autotune"),
    ('attention_backend unknown', ['--attention_backend=xformers'], 1, "attention_backend='xformers' is unknown"),
    ('a CUDA-only attention kernel on the CPU', ['--attention_backend=efficient', '--device=cpu'], 1,
     "attention_backend='efficient' runs on CUDA GPUs only: use auto, flash or math on cpu"),
    ('backend unknown', ['--backend=mpi2'], 1, "backend='mpi2' is unknown"),
    ('init_from unknown', ['--init_from=gpt3'], 1, "init_from='gpt3' is neither scratch, resume"),
    ('dtype unknown', ['--dtype=float64'], 1, "dtype='float64' is unknown"),
    ('device unknown', ['--device=tpu'], 1, "device='tpu' is unknown"),
    ('device malformed', ['--device=cuda:x'], 1, "device='cuda:x' is unknown"),
    ('device without CUDA', ['--device=cuda'], 1, 'CUDA is not available here: use --device=cpu'),
    ('out_dir empty', ['--out_dir='], 1, 'out_dir, dataset and hellaswag_file must not be empty'),
    ('out_dir is a file', ['--out_dir={a_file}'], 1, 'is not writable'),
    ('out_dir inside a file', ['--out_dir={a_file}/out'], 1, 'is not writable'),
    ('new run over a finished one', ['--max_iters=4'], 1, 'holds another run (best.pt, ckpt.pt, log.jsonl)'),
    ('train.bin shorter than a block', ['--dataset={short_data}'], 1, 'has 20 tokens, fewer than block_size+1=33'),
    ('token file of odd size', ['--dataset={odd_bytes}'], 1, 'has 2001 bytes, an odd count'),
    ('meta.pkl corrupt', ['--dataset={corrupt_meta}'], 1, 'meta.pkl cannot be read'),
    ('meta.pkl without vocab_size', ['--dataset={meta_without_vocab}'], 1, "meta.pkl needs a 'vocab_size'"),
    ('meta.pkl that runs code', ['--dataset={meta_with_code}'], 1, 'only plain values are allowed'),
    ('meta.pkl smaller than the tokens', ['--dataset={meta_too_small}'], 1, 'holds token id 59 but'),
    ('meta vocabulary larger than the model', ['--dataset={meta_too_big}', '--init_from=resume'], 1,
     "has 100 tokens but the model's vocabulary has 61"),
    ('resume with another n_layer', ['--init_from=resume', '--n_layer=3'], 1,
     'the checkpoint has n_layer=2 but n_layer=3'),
    ('resume without a checkpoint', ['--init_from=resume', '--out_dir={hf_no_config}'], 1, 'no checkpoint at'),
    ('checkpoint is a list', ['--init_from=resume', '--out_dir={ckpt_list}'], 1, 'is not a train.py checkpoint'),
    ('checkpoint without optimizer', ['--init_from=resume', '--out_dir={ckpt_no_optimizer}'], 1, 'it lacks optimizer'),
    ('checkpoint weights not its args', ['--init_from=resume', '--out_dir={ckpt_wrong_weights}'], 1,
     'its weights do not fit its model_args'),
    ('checkpoint args malformed', ['--init_from=resume', '--out_dir={ckpt_bad_args}'], 1, 'it holds no GPT'),
    ('HF folder without config', ['--init_from={hf_no_config}', '--out_dir={fresh}'], 1, 'has no config.json'),
    ('HF config not JSON', ['--init_from={hf_bad_json}', '--out_dir={fresh}'], 1,
     'is not a GPT-2 config (JSONDecodeError'),
    ('HF config missing sizes', ['--init_from={hf_missing_keys}', '--out_dir={fresh}'], 1,
     'is not a GPT-2 config (KeyError'),
    ('HF weights broken', ['--init_from={hf_bad_weights}', '--out_dir={fresh}'], 1, 'cannot load its weights'),
    ('LoRA on a model from scratch', ['--lora_rank=4', '--out_dir={fresh}'], 1,
     'lora_rank > 0 adapts a pretrained model'),
    ('LoRA target unknown', ['--lora_targets=c_attn,q_proj'], 1, "names q_proj: use a comma-separated list of c_attn"),
    ('lora_alpha 0', ['--lora_alpha=0'], 1, 'lora_alpha must be in (0, inf)'),
    ('resume a full run with LoRA', ['--init_from=resume', '--lora_rank=4'], 1,
     'the checkpoint has lora_rank=0 but lora_rank=4'),
    ('LoRA base replaced since', ['--init_from=resume', '--out_dir={lora_base_changed}'], 1,
     'now has other weights than those its adapter was trained on'),
    ('LoRA base deleted since', ['--init_from=resume', '--out_dir={lora_base_gone}'], 1, 'its base model'),
    ('block_size above the pretrained one', ['--init_from={hf}', '--block_size=64', '--out_dir={fresh}'], 1,
     'block_size=64 is larger than'),
    ('flash attention with dropout on a CPU', ['--attention_backend=flash', '--dropout=0.1'], 1,
     "attention_backend='flash' on a CPU has no dropout: use auto or math"),
    ('lora_rank above the width', ['--init_from={hf}', '--lora_rank=32', '--out_dir={fresh}'], 1,
     "lora_rank=32 is above the model's width n_embd=16"),
    ('resume with another optimizer', ['--init_from=resume', '--optimizer=adamw8bit'], 1,
     "was trained with optimizer='adamw', whose state cannot become 'adamw8bit's: resume with --optimizer=adamw"),
    ('resume past max_iters', ['--init_from=resume', '--max_iters=1'], 1, 'is at iter 2, past max_iters=1'),
    ('resume on other characters', ['--init_from=resume', '--dataset={other_chars}'], 1,
     'has another vocabulary than'),
    ('resume a char-level model on BPE tokens', ['--init_from=resume', '--dataset={bpe_data}'], 1,
     'has another vocabulary than'),
]


@pytest.mark.parametrize('case', TRAIN, ids=[c[0] for c in TRAIN])
def test_train_refuses(case, results, char_data, bad, monkeypatch):
    _, args, exit_code, words = case
    monkeypatch.chdir(REPO)
    before = snapshot(results)
    code, message = run_inline('train.py', *TINY, f'--dataset={char_data}', f'--out_dir={results}', '--max_iters=2',
                               *fill(args, bad))
    assert code == exit_code
    assert_one_line_error((code, message), words)
    assert snapshot(results) == before
    assert not os.path.exists(MARKER)  # the malicious meta.pkl never ran


@pytest.mark.parametrize('damage', ['truncated', 'corrupt'])
def test_train_resume_from_a_damaged_checkpoint(damage, results, char_data, monkeypatch):
    ckpt = results / 'ckpt.pt'
    ckpt.write_bytes(ckpt.read_bytes()[:ckpt.stat().st_size // 2] if damage == 'truncated' else b'\x00garbage' * 1000)
    before = snapshot(results)
    monkeypatch.chdir(REPO)
    result = run_inline('train.py', *TINY, f'--dataset={char_data}', f'--out_dir={results}', '--init_from=resume')
    assert_one_line_error(result, 'is truncated or corrupt')
    assert snapshot(results) == before


def test_a_resume_notes_what_changes_and_eval_only_evaluates_the_checkpoint(results, char_data, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    before = snapshot(results)
    args = [*TINY, f'--dataset={char_data}', f'--out_dir={results}', '--init_from=resume']
    assert run_inline('train.py', *args, '--max_iters=2') == (0, '')  # already there: says so, trains nothing
    assert 'at max_iters=2 already: nothing to train' in capsys.readouterr().out
    assert run_inline('train.py', *args, '--max_iters=1', '--eval_only=True') == (0, '')
    assert 'step 2: train loss' in capsys.readouterr().out  # evaluated, though the checkpoint came from an eval
    assert snapshot(results) == before
    r = run_script('train.py', *args, '--max_iters=3', '--batch_size=2', '--seed=7')
    assert r.returncode == 0, r.stderr
    assert 'note: batch_size=2 where the checkpoint had 4: the batches from here on are not those of an unbroken run' \
        in r.stdout and 'note: seed=7 where the checkpoint had 1337' in r.stdout


def test_train_gradient_accumulation_not_divisible_by_processes(char_data, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    for key, value in dict(RANK='0', LOCAL_RANK='0', WORLD_SIZE='3').items():
        monkeypatch.setenv(key, value)
    result = run_inline('train.py', *TINY, f'--dataset={char_data}', f'--out_dir={tmp_path}',
                        '--gradient_accumulation_steps=4')
    assert_one_line_error(result, 'gradient_accumulation_steps=4 is not divisible by the 3 processes')


# -----------------------------------------------------------------------------
# a new or concurrent run never loses a checkpoint or a log, and never deletes the user's files

def test_overwrite_replaces_the_old_run_and_nothing_else(results, char_data):
    (results / 'notes.txt').write_text('mine')
    (results / 'ckpt-old.pt').write_text('mine too: not a name we write')
    r = run_script('train.py', *TINY, f'--dataset={char_data}', f'--out_dir={results}', '--max_iters=4',
                   '--eval_interval=4', '--overwrite=True')
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(results)) == ['.lock', 'best.pt', 'ckpt-old.pt', 'ckpt.pt', 'log.jsonl', 'notes.txt']
    assert read_log(results)[0]['iter'] == 0 and read_log(results)[-1]['iter'] == 4  # a new log, not the old one


def test_start_up_cleanup_deletes_only_our_own_temp_files(results, char_data):
    ours = ['.ckpt.pt.tmp123', '.best.pt.tmp7', '.ckpt-0000002.pt.tmp9', '.log.jsonl.tmp42']
    users = ['.notes.tmp1', 'model.pt.tmp', '.ckpt.pt.tmpfile', 'x.tmp5']
    for name in ours + users:
        (results / name).write_text('half written' if name in ours else 'the user\'s')
    r = run_script('train.py', *TINY, f'--dataset={char_data}', f'--out_dir={results}', '--init_from=resume',
                   '--max_iters=3', '--eval_interval=100')
    assert r.returncode == 0, r.stderr
    left = set(os.listdir(results))
    assert not left & set(ours) and set(users) <= left


def test_a_second_run_on_the_same_out_dir_is_refused_while_the_first_goes_on(char_data, tmp_path):
    out = tmp_path / 'out'
    args = [*TINY, f'--dataset={char_data}', f'--out_dir={out}', '--eval_interval=100000']
    first = start_script('train.py', *args, '--max_iters=100000')
    try:
        assert wait_for(lambda: (out / 'log.jsonl').exists(), 60)
        second = run_script('train.py', *args, '--init_from=resume', '--max_iters=5')
        assert_one_line_error(second, f'another run (pid {first.pid}) is using --out_dir')
        assert first.poll() is None  # the first one was not disturbed
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=60) == 0, first.stderr.read()
    finally:
        first.kill()
    # the lock died with its run: resuming now works
    next_iter = torch.load(out / 'ckpt.pt', weights_only=True)['iter_num'] + 1
    third = run_script('train.py', *args, '--init_from=resume', f'--max_iters={next_iter}')
    assert third.returncode == 0, third.stderr


# -----------------------------------------------------------------------------
# sample.py

SAMPLE = [
    ('unknown setting', ['--num_sample=2'], 1, 'did you mean num_samples'),
    ('num_samples 0', ['--num_samples=0'], 1, 'num_samples must be in [1, inf)'),
    ('max_new_tokens 0', ['--max_new_tokens=0'], 1, 'max_new_tokens must be in [1, inf)'),
    ('temperature negative', ['--temperature=-1.0'], 1, 'temperature must be in [0, inf)'),
    ('top_k negative', ['--top_k=-5'], 1, 'top_k must be in [0, inf)'),
    ('top_p 0', ['--top_p=0.0'], 1, 'top_p must be in (0, 1]'),
    ('top_p above 1', ['--top_p=1.5'], 1, 'top_p must be in (0, 1]'),
    ('seed negative', ['--seed=-3'], 1, 'seed must be in [0, 4294967296)'),
    ('device unknown', ['--device=tpu'], 1, "device='tpu' is unknown"),
    ('device without CUDA', ['--device=cuda'], 1, 'CUDA is not available here'),
    ('dtype unknown', ['--dtype=int8'], 1, "dtype='int8' is unknown"),
    ('init_from unknown', ['--init_from=gpt5'], 1, "init_from='gpt5' is neither resume"),
    ('no checkpoint', ['--out_dir={hf_no_config}'], 1, 'no checkpoint at'),
    ('checkpoint_name missing', ['--checkpoint_name=nope.pt'], 1, 'nope.pt: train one first'),
    ('checkpoint is a list', ['--out_dir={ckpt_list}'], 1, 'is not a train.py checkpoint'),
    ('checkpoint weights not its args', ['--out_dir={ckpt_wrong_weights}'], 1, 'its weights do not fit its model_args'),
    ('LoRA base replaced since', ['--out_dir={lora_base_changed}'], 1, 'now has other weights than those its adapter'),
    ('prompt file missing', ['--start=FILE:/no/such/prompt.txt'], 1, 'cannot read the prompt file'),
    ('prompt file not UTF-8', ['--start=FILE:{prompt_not_utf8}'], 1, 'give a UTF-8 text file'),
    ('empty prompt', ['--start='], 1, 'the prompt is empty'),
    ('prompt outside the vocabulary', ['--start=\u00e9t\u00e9'], 1, "characters outside the model's vocabulary"),
    ('HF config not JSON', ['--init_from={hf_bad_json}'], 1, 'is not a GPT-2 config'),
]


@pytest.mark.parametrize('case', SAMPLE, ids=[c[0] for c in SAMPLE])
def test_sample_refuses(case, finished_run, char_data, bad, monkeypatch):
    _, args, exit_code, words = case
    monkeypatch.chdir(REPO)
    code, message = run_inline('sample.py', f'--out_dir={finished_run}', '--device=cpu', '--max_new_tokens=2',
                               *fill(args, bad))
    assert code == exit_code
    assert_one_line_error((code, message), words)


def test_sample_refuses_a_meta_pkl_that_runs_code(results, tmp_path, bad, monkeypatch):
    ckpt = torch.load(results / 'ckpt.pt', weights_only=True)
    ckpt['config']['dataset'] = bad['meta_with_code']  # an older checkpoint: sample.py reads data/<dataset>/meta.pkl
    del ckpt['vocabulary']
    torch.save(ckpt, results / 'ckpt.pt')
    monkeypatch.chdir(REPO)
    assert_one_line_error(run_inline('sample.py', f'--out_dir={results}', '--device=cpu'),
                          'only plain values are allowed')
    assert not os.path.exists(MARKER)


# -----------------------------------------------------------------------------
# bench.py and plan.py

BENCH = [
    ('bench_iters 0', ['--bench_iters=0'], 1, 'bench_iters must be in [1, inf)'),
    ('bench_warmup negative', ['--bench_warmup=-1'], 1, 'bench_warmup must be in [0, inf)'),
    ('unknown setting', ['--batch_sise=2'], 1, 'unknown setting --batch_sise'),
    ('batch_size 0', ['--batch_size=0'], 1, 'batch_size must be in [1, inf)'),
    ('heads do not divide the width', ['--n_head=5'], 1, 'is not divisible by n_head=5'),
    ('optimizer unknown', ['--optimizer=lion'], 1, "optimizer='lion' is unknown"),
    ('device unknown', ['--device=npu'], 1, "device='npu' is unknown"),
    ('dtype unknown', ['--dtype=half'], 1, "dtype='half' is unknown"),
    ('compile_mode unknown', ['--compile_mode=reduce'], 1, "compile_mode='reduce' is unknown"),
]

PLAN = [
    ('gpus 0', ['--gpus=0'], 1, '--gpus must be in [1, inf), got 0'),
    ('gpus not a number', ['--gpus=two'], 1, '--gpus=two: expected a whole number'),
    ('price negative', ['--price=-1'], 1, '--price must be in [0, inf)'),
    ('mfu 0', ['--mfu=0'], 1, '--mfu must be in (0, 1]'),
    ('mfu above 1', ['--mfu=35'], 1, '--mfu must be in (0, 1]'),
    ('unknown GPU', ['--gpu=Voodoo_5'], 1, "unknown GPU 'Voodoo 5'"),
    ('unknown setting', ['--n_layers=3'], 1, 'unknown setting --n_layers; did you mean n_layer'),
    ('not a setting: a variable of train.py', ['--iter_num=5'], 1, 'unknown setting --iter_num'),
    ('batch_size 0', ['--batch_size=0'], 1, 'batch_size must be in [1, inf)'),
    ('accumulation not divisible by GPUs', ['--gradient_accumulation_steps=5', '--gpus=2'], 1,
     'gradient_accumulation_steps=5 is not divisible by --gpus=2'),
    ('HF config not JSON', ['--init_from={hf_bad_json}'], 1, 'is not a GPT-2 config'),
    ('meta.pkl that runs code', ['--dataset={meta_with_code}'], 1, 'only plain values are allowed'),
    ('vlm: unknown flag', ['--vlm', '--batch-sise', '2'], 1, 'unrecognized arguments: --batch-sise'),
    ('vlm: gpus 0', ['--vlm', '--gpus', '0'], 1, '--gpus must be in [1, inf)'),
    ('vlm: batch size 0', ['--vlm', '--batch-size', '0'], 1, '--batch-size must be in [1, inf)'),
    ('vlm: max steps 0', ['--vlm', '--max-steps', '0'], 1, '--max-steps must be in [1, inf)'),
    ('vlm: 4-bit without LoRA', ['--vlm', '--use-4bit'], 1, '--use-4bit needs --use-lora'),
    ('vlm: model config not JSON', ['--vlm', '--model', '{hf_bad_json}'], 1, 'config.json cannot be read'),
    ('vlm: not a Qwen2-VL', ['--vlm', '--model', '{hf}'], 1, 'only Qwen2-VL-style and LLaVA models are planned'),
    ('vlm: data not JSON', ['--vlm', '--data', '{not_utf8}'], 1, 'cannot be read'),
    ('vlm: min pixels above max', ['--vlm', '--min-pixels', '5000', '--max-pixels', '1000'], 1,
     '--max-pixels 1000 is below --min-pixels 5000'),
    ('vlm: lora dropout 1', ['--vlm', '--use-lora', '--lora-dropout', '1'], 1, '--lora-dropout must be in [0, 1)'),
    ('docs file not UTF-8', ['--update-docs', '{not_utf8}'], 1, 'UnicodeDecodeError'),
]


@pytest.mark.parametrize('script,case', [('bench.py', c) for c in BENCH] + [('plan.py', c) for c in PLAN],
                         ids=[f'bench: {c[0]}' for c in BENCH] + [f'plan: {c[0]}' for c in PLAN])
def test_bench_and_plan_refuse(script, case, bad, monkeypatch):
    _, args, exit_code, words = case
    monkeypatch.chdir(REPO)
    code, message = run_inline(script, *fill(args, bad))
    assert code == exit_code
    assert_one_line_error((code, message), words)


# -----------------------------------------------------------------------------
# what only a real process shows

def test_bfloat16_on_a_gpu_without_it(char_data, tmp_path):
    # pretend to be a pre-Ampere GPU (a T4, which only emulates bf16): refuse before touching anything
    fake = tmp_path / 'fake_gpu'
    fake.mkdir()
    (fake / 'sitecustomize.py').write_text(
        "import torch\n"
        "torch.cuda.is_available = lambda: True\n"
        "torch.cuda.is_bf16_supported = lambda including_emulation=True: including_emulation\n"
        "torch.cuda.get_device_name = lambda *a, **k: 'Tesla T4'\n")
    r = run_script('train.py', *TINY, f'--dataset={char_data}', f'--out_dir={tmp_path / "out"}', '--device=cuda',
                   '--dtype=bfloat16', env=dict(PYTHONPATH=str(fake)))
    assert_one_line_error(r, 'Tesla T4 has no bfloat16: use --dtype=float16')
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('script', ['train.py', 'sample.py'])
def test_ctrl_c_while_starting_is_one_line(script, tmp_path):
    # a config file runs while the script starts: it says so, then waits for our Ctrl-C
    started = tmp_path / 'started'
    # short sleeps: a signal the kernel hands to another thread is still acted on within 0.1 s
    (tmp_path / 'slow_config.py').write_text(f"open({str(started)!r}, 'w').close()\nimport time\n"
                                             "for _ in range(600):\n    time.sleep(0.1)\n")
    proc = start_script(script, tmp_path / 'slow_config.py')
    assert wait_for(started.exists, 60)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode != 0 and 'Traceback' not in stderr and 'KeyboardInterrupt' not in stderr, stderr
    assert stderr.strip().startswith('interrupted'), stderr


# -----------------------------------------------------------------------------
# every setting of train.py and sample.py has a value that is refused: derived from the scripts'
# own settings, so a new setting without a range (or a type) fails here

FREE_TEXT = {'train.py': {'wandb_project', 'wandb_run_name'}, 'sample.py': {'start', 'out_dir'}}  # any string is valid
REFUSED_STRINGS = {'out_dir': '', 'dataset': '', 'init_from': 'gpt3', 'device': 'tpu', 'dtype': 'float64',
                   'optimizer': 'sgd', 'backend': 'mpi2', 'checkpoint_name': 'no_such_ckpt.pt',
                   'lora_targets': 'q_proj', 'compile_mode': 'turbo', 'attention_backend': 'sage',
                   'hellaswag_file': ''}


def refused_value(name, default, ranges):
    if isinstance(default, bool):
        return "'maybe'"  # a bool setting refuses anything else
    if isinstance(default, str):
        return repr(REFUSED_STRINGS[name])
    low = ranges[name].strip('[(').split(',')[0]
    return str(float(low) - 1 if ranges[name].startswith('[') else float(low))  # just outside the interval


def settings_of(script):
    from configurator import read_defaults
    return [(name, value) for name, value in read_defaults(os.path.join(REPO, script)).items()
            if name not in FREE_TEXT[script]]


SAMPLE_RANGES = {'num_samples': '[1, inf)', 'max_new_tokens': '[1, inf)', 'temperature': '[0, inf)',
                 'top_k': '[0, inf)', 'top_p': '(0, 1]', 'seed': '[0, 4294967296)'}


@pytest.mark.parametrize('script,name,default', [('train.py', n, v) for n, v in settings_of('train.py')] +
                         [('sample.py', n, v) for n, v in settings_of('sample.py')])
def test_every_setting_refuses_a_value_outside_its_range(script, name, default, finished_run, char_data, monkeypatch):
    from gpt_settings import TRAIN_RANGES
    ranges = TRAIN_RANGES if script == 'train.py' else SAMPLE_RANGES
    value = refused_value(name, default, ranges)
    monkeypatch.chdir(REPO)
    base = [*TINY, f'--dataset={char_data}', f'--out_dir={finished_run}'] if script == 'train.py' else \
        [f'--out_dir={finished_run}', '--device=cpu']
    code, message = run_inline(script, *base, f'--{name}={value}'.replace("'", '') if value != "''" else f'--{name}=')
    assert code == 1
    assert_one_line_error((code, message), '')
    shown = value.strip("'")
    assert name in message or (shown and shown in message), message  # it names the setting or the value


# -----------------------------------------------------------------------------
# data/prepare_text.py: nonsense refused before anything is written, a dataset replaced only when asked

PREPARE_TEXT = [
    ('val fraction above 1', ['--val-fraction', '1.5'], '--val-fraction must be in (0, 1), got 1.5'),
    ('val fraction negative', ['--val-fraction=-1'], '--val-fraction must be in (0, 1), got -1.0'),
    ('val fraction nan', ['--val-fraction', 'nan'], '--val-fraction must be in (0, 1), got nan'),
    ('a name out of data/', ['--name', '../x'], "--name '../x' must be a folder name under data/"),
    ('an absolute name', ['--name', '/tmp/x'], "--name '/tmp/x' must be a folder name under data/"),
]


@pytest.mark.parametrize('case', PREPARE_TEXT, ids=[c[0] for c in PREPARE_TEXT])
def test_prepare_text_refuses(case, tmp_path):
    _, args, words = case
    (tmp_path / 'a.txt').write_text('some text')
    assert_one_line_error(run_inline('data/prepare_text.py', tmp_path / 'a.txt', '--name', 'unused', *args), words)
    assert not os.path.exists(os.path.join(REPO, 'data', 'unused'))


def test_prepare_text_replaces_a_dataset_only_when_asked_and_then_only_its_own_files(tmp_path):
    import prepare_text
    (tmp_path / 'a.txt').write_text('hello world')
    (tmp_path / 'empty.txt').write_text('')
    out = tmp_path / 'ds'
    with pytest.raises(SystemExit, match='the documents hold no characters'):
        prepare_text.prepare([str(tmp_path / 'empty.txt')], str(out), char_level=True)
    prepare_text.prepare([str(tmp_path / 'a.txt')], str(out), char_level=True)
    (out / 'notes.txt').write_text('mine')
    with pytest.raises(SystemExit, match='already holds a dataset .train.bin, val.bin, meta.pkl.: pass --overwrite'):
        prepare_text.prepare([str(tmp_path / 'a.txt')], str(out))
    prepare_text.prepare([str(tmp_path / 'a.txt')], str(out), overwrite=True)  # BPE now: the char vocabulary goes
    assert sorted(os.listdir(out)) == ['notes.txt', 'train.bin', 'val.bin']
