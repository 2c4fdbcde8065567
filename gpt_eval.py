"""
Judging a GPT beyond its val loss: HellaSwag (Zellers et al., 2019), in the completion style GPT-2
results are quoted in. Each item is a context and 4 endings; every ending is scored by the mean loss
of its own tokens given the context, and the prediction is the lowest (acc_norm: the mean, not the
sum, so long endings are not penalised). data/hellaswag/prepare.py writes the tokenized items.
"""
import json

import torch
import torch.nn.functional as F

import runtime
from configurator import UserError


def read_items(path, data_dir, vocabulary):
    """The tokenized items of data/hellaswag/prepare.py: {"context": ids, "endings": [ids] * 4, "label": i},
    for a model of GPT-2's BPE (vocabulary: the dataset's characters, None for BPE)."""
    if vocabulary is not None:
        raise UserError(f"eval_hellaswag scores GPT-2 BPE tokens, but {data_dir} is character-level: use a BPE dataset")
    try:
        with open(path, encoding='utf-8') as f:
            items = [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        raise UserError(f"{path} not found: run python data/hellaswag/prepare.py first") from None
    except (OSError, ValueError) as e:
        raise UserError(f"{path} cannot be read ({type(e).__name__}: {e}): "
                        "run data/hellaswag/prepare.py again") from None
    for number, item in enumerate(items, 1):
        endings = item.get('endings') if isinstance(item, dict) else None
        if not (isinstance(endings, list) and len(endings) == 4 and all(endings) and item.get('context')
                and item.get('label') in range(4)):
            raise UserError(f"{path} line {number} is not a tokenized HellaSwag item: "
                            "run data/hellaswag/prepare.py again")
    if not items:
        raise UserError(f"{path} holds no items: run data/hellaswag/prepare.py again")
    return items


def rows_of(item, block_size):
    """(tokens, targets) of an item's 4 rows: context + ending, right-padded; the targets are the next
    tokens inside the ending, -1 elsewhere. A row longer than block_size loses the start of its context."""
    rows = [(item['context'] + ending)[-block_size - 1:] for ending in item['endings']]
    width = max(len(row) for row in rows) - 1
    tokens = torch.zeros(4, width, dtype=torch.long)
    targets = torch.full((4, width), -1, dtype=torch.long)
    for i, (row, ending) in enumerate(zip(rows, item['endings'])):
        tokens[i, :len(row) - 1] = torch.tensor(row[:-1])
        scored = min(len(ending), len(row) - 1)  # the ending's tokens, each predicted from what precedes it
        targets[i, len(row) - 1 - scored:len(row) - 1] = torch.tensor(row[-scored:])
    return tokens, targets


@torch.no_grad()
def ending_losses(model, tokens, targets):
    """The mean loss of each row's ending tokens."""
    logits, _ = model(tokens)
    losses = F.cross_entropy(logits.float().transpose(1, 2), targets, ignore_index=-1, reduction='none')
    return losses.sum(dim=1) / (targets >= 0).sum(dim=1)


def correct_answers(model, items, device, autocast):
    """How many of items the model answers right (acc_norm's numerator), as a device tensor."""
    was_training = model.training
    model.eval()
    correct = torch.zeros((), device=device)
    for item in items:
        tokens, targets = rows_of(item, model.config.block_size)
        with autocast:
            losses = ending_losses(model, tokens.to(device), targets.to(device))
        correct += losses.argmin() == item['label']
    model.train(was_training)
    return correct


def acc_norm(model, items, device, autocast):
    """HellaSwag's acc_norm over items, each process scoring its share (under DDP every rank calls it)."""
    correct = correct_answers(model, items[runtime.rank()::runtime.world_size()], device, autocast)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(correct)
    return correct.item() / len(items)
