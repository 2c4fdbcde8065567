"""HellaSwag for a GPT: the scoring rule against a direct computation, DDP against one process, bad input."""
import json
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, TINY, assert_one_line_error, read_log, run_inline, run_script, torchrun

import gpt_eval
from model import GPT, GPTConfig

sys.path.insert(0, os.path.join(REPO, 'data', 'hellaswag'))
import prepare as hellaswag_prepare  # noqa: E402

ITEMS = [  # our own, in the official format
    {"ind": 0, "ctx": "The cat sat on the", "label": 2, "endings": ["moon and sang.", "piano keys loudly.", "mat.",
                                                                     "idea of a cat, which was odd."]},
    {"ind": 1, "ctx": "She opened the door and", "label": 0, "endings": ["walked in.", "the door.", "flew.",
                                                                         "said nothing at all to anyone."]},
    {"ind": 2, "ctx": "To bake bread, first you", "label": 1, "endings": ["swim.", "mix flour and water.",
                                                                          "sing", "a the of."]},
]


@pytest.fixture(scope='module')
def items_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp('hellaswag')
    # each question 4 times, its answer a different ending each time: any model answers exactly 1 in 4
    items = ITEMS + [dict(item, label=label) for item in ITEMS for label in range(4) if label != item['label']]
    (folder / 'official.jsonl').write_text(''.join(json.dumps(item) + '\n' for item in items))
    hellaswag_prepare.main(['--file', str(folder / 'official.jsonl'), '--out', str(folder / 'val.jsonl')])
    return str(folder / 'val.jsonl')


def direct_mean_losses(model, item):
    """Each ending's mean loss, one full sequence at a time, written out plainly."""
    losses = []
    for ending in item['endings']:
        tokens = torch.tensor(item['context'] + ending)[-model.config.block_size - 1:]
        with torch.no_grad():
            logits, _ = model(tokens[None, :-1])
        n = min(len(ending), len(tokens) - 1)
        losses.append(F.cross_entropy(logits[0, -n:], tokens[-n:]).item())
    return losses


@pytest.mark.parametrize('block_size', [64, 8])  # 8: the contexts lose their start
def test_hellaswag_scoring_equals_a_direct_computation(items_file, block_size):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=block_size, vocab_size=50304, dropout=0.0)).eval()
    items = gpt_eval.read_items(items_file, 'data/x', None)
    assert [item['label'] for item in items][:4] == [2, 0, 1, 0]
    expected = 0
    for item in items:
        direct = direct_mean_losses(model, item)
        tokens, targets = gpt_eval.rows_of(item, block_size)
        torch.testing.assert_close(gpt_eval.ending_losses(model, tokens, targets), torch.tensor(direct))
        expected += min(range(4), key=direct.__getitem__) == item['label']
    assert gpt_eval.correct_answers(model, items, 'cpu', torch.autocast('cpu', enabled=False)).item() == expected


@pytest.fixture(scope='module')
def bpe_data(tmp_path_factory):
    from prepare_text import encode_bpe, write_dataset
    with open(os.path.join(REPO, 'data', 'shakespeare_char', 'input.txt')) as f:
        text = f.read()[:20_000]
    folder = tmp_path_factory.mktemp('bpe')
    tokens, meta = encode_bpe([text], 1)
    write_dataset(tokens, meta, str(folder))
    return str(folder)


def test_hellaswag_under_ddp_equals_one_process_and_goes_to_the_log(items_file, bpe_data, tmp_path):
    args = [*TINY, f'--dataset={bpe_data}', '--max_iters=2', '--eval_interval=2', '--eval_hellaswag=True',
            f'--hellaswag_file={items_file}']
    single = run_script('train.py', *args, f'--out_dir={tmp_path / "single"}')
    ddp = torchrun(*args, f'--out_dir={tmp_path / "ddp"}')
    assert single.returncode == 0 and ddp.returncode == 0, ddp.stderr
    scores = [[r['hellaswag_acc_norm'] for r in read_log(tmp_path / run) if 'val_loss' in r]
              for run in ('single', 'ddp')]
    assert len(scores[0]) == 2 and scores[0] == scores[1]  # iters 0 and 2
    assert scores[0] == [0.25, 0.25]  # each question answered once in its 4 copies, on one rank or two
    assert 'hellaswag acc_norm' in single.stdout


def test_hellaswag_bad_input_is_one_line(items_file, char_data, bpe_data, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    args = [*TINY, '--max_iters=1', f'--out_dir={tmp_path / "out"}', '--eval_hellaswag=True']
    assert_one_line_error(run_inline('train.py', *args, f'--dataset={bpe_data}', f'--hellaswag_file={tmp_path / "no"}'),
                          'not found: run python data/hellaswag/prepare.py first')
    assert_one_line_error(run_inline('train.py', *args, f'--dataset={char_data}', f'--hellaswag_file={items_file}'),
                          'eval_hellaswag scores GPT-2 BPE tokens')
    (tmp_path / 'broken.jsonl').write_text('{"context": [1], "endings": [[1], [2]], "label": 0}\n')
    broken = f'--hellaswag_file={tmp_path / "broken.jsonl"}'
    assert_one_line_error(run_inline('train.py', *args, f'--dataset={bpe_data}', broken),
                          'line 1 is not a tokenized HellaSwag item')
    (tmp_path / 'three.jsonl').write_text(json.dumps(dict(ITEMS[0], endings=ITEMS[0]['endings'][:3])) + '\n')
    cases = (('not json\n', 'line 1 is not JSON'), ((tmp_path / 'three.jsonl').read_text(), 'ctx, 4 endings'))
    for lines, expected in cases:
        (tmp_path / 'bad.jsonl').write_text(lines)
        with pytest.raises(SystemExit) as exit_info:
            hellaswag_prepare.main(['--file', str(tmp_path / 'bad.jsonl'), '--out', str(tmp_path / 'x.jsonl')])
        assert_one_line_error((1, exit_info.value.code), expected)
    assert not (tmp_path / 'x.jsonl').exists() and not (tmp_path / 'out').exists()
