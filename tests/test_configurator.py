import glob
import math
import os

import pytest
import torch
from conftest import REPO

from configurator import UserError, configure, read_defaults
from model import GPT, PRETRAINED, GPTConfig

DEFAULTS = dict(batch_size=12, learning_rate=6e-4, compile=True, init_from='scratch', wandb_run_name='gpt2', top_p=None)


def test_overrides_are_typed_and_reported():
    config = dict(DEFAULTS)
    changed = configure(['--batch_size=32', '--learning_rate=1', '--compile=False', '--init_from=gpt2-xl',
                         '--wandb_run_name=2024', '--top_p=0.9'], config)
    assert config == dict(batch_size=32, learning_rate=1, compile=False, init_from='gpt2-xl',
                          wandb_run_name='2024', top_p=0.9)
    assert changed == set(DEFAULTS)


def test_unknown_key_suggests_the_closest():
    with pytest.raises(UserError, match='unknown setting --batch_sise; did you mean batch_size'):
        configure(['--batch_sise=3'], dict(DEFAULTS))


def test_wrong_type_names_the_expected_type():
    with pytest.raises(UserError, match="batch_size must be int like the default 12, got str 'big'"):
        configure(['--batch_size=big'], dict(DEFAULTS))
    with pytest.raises(UserError, match='batch_size must be int'):
        configure(['--batch_size=2.5'], dict(DEFAULTS))
    with pytest.raises(UserError, match='compile must be bool'):
        configure(['--compile=1'], dict(DEFAULTS))


def test_missing_value_and_missing_file():
    with pytest.raises(UserError, match='has no value'):
        configure(['--compile'], dict(DEFAULTS))
    with pytest.raises(UserError, match="config file 'nope.py' not found"):
        configure(['nope.py'], dict(DEFAULTS))


def test_values_are_never_evaluated_as_code(tmp_path):
    marker = tmp_path / 'pwned'
    config = dict(DEFAULTS)
    configure([f"--init_from=__import__('os').system('touch {marker}')"], config)
    assert not marker.exists() and config['init_from'].startswith('__import__')
    with pytest.raises(UserError):
        configure([f"--batch_size=__import__('os').system('touch {marker}')"], dict(DEFAULTS))
    assert not marker.exists()


def test_config_file_is_checked_like_overrides(tmp_path):
    good = tmp_path / 'good.py'
    good.write_text("import math\n_helper = 3\nbatch_size = 4 * _helper\nlearning_rate = 1e-3\n")
    config = dict(DEFAULTS)
    assert configure([str(good), '--batch_size=1'], config) == {'batch_size', 'learning_rate'}
    assert config['batch_size'] == 1 and config['learning_rate'] == 1e-3
    typo = tmp_path / 'typo.py'
    typo.write_text("learning_rat = 1e-3\n")
    with pytest.raises(UserError, match='unknown setting learning_rat in .*typo.py; did you mean learning_rate'):
        configure([str(typo)], dict(DEFAULTS))
    broken = tmp_path / 'broken.py'
    broken.write_text("batch_size = (\n")
    with pytest.raises(UserError, match='broken.py.* failed: SyntaxError'):
        configure([str(broken)], dict(DEFAULTS))


@pytest.mark.parametrize('path', sorted(glob.glob(os.path.join(REPO, 'config', '*.py'))), ids=os.path.basename)
def test_every_shipped_config_parses_and_builds_a_shrunk_model(path):
    config = read_defaults(os.path.join(REPO, 'train.py'))
    configure([path], config)
    if config['init_from'] in PRETRAINED:
        config.update(PRETRAINED[config['init_from']])
    assert config['n_embd'] % config['n_head'] == 0
    assert config['gradient_accumulation_steps'] > 0 and config['batch_size'] > 0
    # same shape of model, far fewer layers and channels: n_head heads of 4 channels
    model = GPT(GPTConfig(n_layer=1, n_head=config['n_head'], n_embd=4 * config['n_head'],
                          block_size=min(config['block_size'], 64), vocab_size=65, bias=config['bias'],
                          dropout=config['dropout']))
    idx = torch.randint(0, 65, (2, model.config.block_size))
    _, loss = model(idx, idx)
    assert torch.isfinite(loss) and abs(loss.item() - math.log(65)) < 1.0  # an untrained model: about uniform
