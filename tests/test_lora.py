"""LoRA for the GPT (gpt_lora.py, train.py --lora_rank): adapter-only checkpoints that name their base,
exact resume, merging, export, and class models that share one base."""
import os

import pytest
import torch
from conftest import TINY, read_log, run_inline, run_script, tiny_hf_gpt2, torchrun

import gpt_lora
from gpt_checkpoint import load_gpt
from model import GPT

LORA = ['--lora_rank=4', '--lora_alpha=8.0', '--lora_dropout=0.1', '--learning_rate=3e-3', '--eval_interval=4']


@pytest.fixture(scope='module')
def base(tmp_path_factory):
    """A 'pretrained' GPT-2 folder of TINY's sizes (its 100 ids cover the char data's 61)."""
    folder = tmp_path_factory.mktemp('base') / 'hf'
    tiny_hf_gpt2(folder, n_layer=2, n_embd=32, n_positions=64)
    return str(folder)


def train_lora(char_data, base, out, iters, *extra):
    r = run_script('train.py', *TINY, *LORA, f'--dataset={char_data}', f'--init_from={base}', f'--out_dir={out}',
                   f'--max_iters={iters}', *extra)
    assert r.returncode == 0, r.stderr[-2000:]
    return out


@pytest.fixture(scope='module')
def lora_runs(char_data, base, tmp_path_factory):
    """Two LoRA runs of 4 iterations on the same base (two 'classes': other seeds, other batches),
    without dropout (its noise differs between processes, and the DDP test compares with the first)."""
    root = tmp_path_factory.mktemp('lora_runs')
    return [train_lora(char_data, base, root / name, 4, f'--seed={seed}', '--lora_dropout=0.0')
            for name, seed in (('a', 1), ('b', 2))]


def checkpoint(out_dir):
    return torch.load(os.path.join(out_dir, 'ckpt.pt'), weights_only=True)


def batch():
    return torch.randint(0, 61, (2, 32), generator=torch.Generator().manual_seed(0))


def test_a_lora_checkpoint_holds_only_the_adapters_and_names_its_base(lora_runs, base):
    ckpt = checkpoint(lora_runs[0])
    assert ckpt['lora']['base'] == base and ckpt['lora']['rank'] == 4 \
        and ckpt['lora']['targets'] == list(gpt_lora.TARGETS)
    assert all('.lora_A.' in name or '.lora_B.' in name for name in ckpt['model'])
    # per layer, rank x (in + out) for c_attn, attention's c_proj, c_fc and the MLP's c_proj
    assert sum(v.numel() for v in ckpt['model'].values()) == 2 * 4 * ((32 + 96) + (32 + 32) + (32 + 128) + (128 + 32))
    assert len(ckpt['optimizer']['state']) == len(ckpt['model'])  # AdamW holds state for the adapters alone
    assert any(v.abs().sum() > 0 for name, v in ckpt['model'].items() if 'lora_B' in name)  # B starts at 0: it trained
    trained = gpt_lora.load(ckpt).eval()
    with torch.no_grad():  # same base weights, and the adapters change the logits
        assert not torch.allclose(trained(batch())[0], GPT.from_pretrained(base).eval()(batch())[0], atol=1e-4)
    assert run_inline('sample.py', f'--out_dir={lora_runs[0]}', '--device=cpu', '--num_samples=1',
                      '--max_new_tokens=5', '--start=A')[0] == 0


def losses(out_dir):
    return [(r['iter'], r.get('loss'), r.get('val_loss')) for r in read_log(out_dir)]


def test_a_lora_run_resumes_bit_identically(char_data, base, tmp_path):
    # LoRA dropout on, so the RNG state must be restored too
    straight = train_lora(char_data, base, tmp_path / 'straight', 8)
    resumed = train_lora(char_data, base, tmp_path / 'resumed', 4)
    train_lora(char_data, base, resumed, 8, '--init_from=resume')
    assert len(losses(straight)) == 8 + 3 and losses(straight) == losses(resumed)  # 8 steps, evals at 0, 4, 8
    a, b = checkpoint(straight)['model'], checkpoint(resumed)['model']
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_two_ddp_processes_train_lora_like_one(char_data, base, lora_runs, tmp_path):
    r = torchrun(*TINY, *LORA, f'--dataset={char_data}', f'--init_from={base}', f'--out_dir={tmp_path / "two"}',
                 '--max_iters=4', '--seed=1', '--lora_dropout=0.0')
    assert r.returncode == 0, r.stderr[-3000:]
    for a, b in zip(losses(lora_runs[0]), losses(tmp_path / 'two'), strict=True):
        assert a[0] == b[0] and all(x is None and y is None or abs(x - y) < 1e-5 for x, y in zip(a[1:], b[1:]))


def test_merging_the_adapter_keeps_the_logits(base):
    torch.manual_seed(0)
    model = GPT.from_pretrained(base)
    gpt_lora.add(model, 4, 8.0, 0.0, gpt_lora.TARGETS)
    with torch.no_grad():  # B starts at zero: make the adapter matter
        for name, p in model.named_parameters():
            if 'lora_B' in name:
                p.normal_(0, 0.1)
        unmerged = model.eval()(batch())[0]
        assert not torch.allclose(unmerged, GPT.from_pretrained(base).eval()(batch())[0], atol=1e-3)
        gpt_lora.merge(model)
        assert model.lora is None and type(model.transformer.h[0].attn.c_attn) is torch.nn.Linear
        torch.testing.assert_close(model(batch())[0], unmerged, atol=1e-5, rtol=0)


def test_export_merges_the_adapter_and_transformers_gives_its_logits(lora_runs, tmp_path):
    from transformers import GPT2LMHeadModel
    assert run_inline('export.py', f'--out_dir={lora_runs[0]}', f'--export_dir={tmp_path / "hf"}')[0] == 0
    ours = gpt_lora.load(checkpoint(lora_runs[0])).eval()
    with torch.no_grad():
        torch.testing.assert_close(GPT2LMHeadModel.from_pretrained(tmp_path / 'hf').eval()(batch()).logits,
                                   ours(batch())[0], atol=1e-4, rtol=0)


def test_lora_class_models_share_one_base_and_switch_adapters(lora_runs):
    paths = [os.path.join(run, 'ckpt.pt') for run in lora_runs]
    with torch.no_grad():
        first, _ = load_gpt(paths[0], '')
        logits_a = first.eval()(batch())[0]
        shared, _ = load_gpt(paths[1], '', reuse=first)
        assert shared is first  # the second adapter joined the first model's base
        alone = load_gpt(paths[1], '')[0].eval()(batch())[0]
        torch.testing.assert_close(shared.eval()(batch())[0], alone, atol=1e-6, rtol=0)
        assert not torch.allclose(alone, logits_a, atol=1e-4)
        gpt_lora.activate(shared, 'default')  # back to the first class's adapter
        torch.testing.assert_close(shared(batch())[0], logits_a, atol=1e-6, rtol=0)
