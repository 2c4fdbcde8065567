"""
Generative classification: one GPT-2 finetuned per class; a document goes to the class whose model
gives it the highest log-likelihood plus the log prior (Bayes' rule).

$ python data/prepare_classes.py imdb
$ for c in neg pos; do python train.py config/classify_imdb.py --dataset=imdb/$c --out_dir=out-imdb/$c; done
$ python classify.py --models=out-imdb/neg,out-imdb/pos --test=data/imdb/test.jsonl

Each document is scored whole: <|endoftext|> + its tokens + <|endoftext|> (as train.bin joins
them), in block_size windows that overlap by block_size - stride tokens, so every token is
predicted once and, after the first window, with that much context. Prints accuracy, macro-F1
and the confusion matrix, beside two baselines on the same test split: the majority class and a
multinomial naive Bayes on word counts of the same training documents; writes predictions.jsonl.
LoRA class models (train.py --lora_rank=8 ...) on one base share it: the base is loaded once, and
each class adds only its adapter.
"""
import signal
import sys
signal.signal(signal.SIGINT, lambda *_: sys.exit("interrupted"))  # Ctrl-C at any time: one line, no traceback
import json  # noqa: E402
import math
import os
import re
import time
from collections import Counter
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import utils
from configurator import ConfigError, configure

# -----------------------------------------------------------------------------
models = ''  # comma-separated out_dirs of train.py, one class model each
test = ''  # the test.jsonl of data/prepare_classes.py
labels = ''  # its labels.json (default: beside test)
checkpoint_name = 'ckpt.pt'  # or best.pt
batch_size = 8  # windows scored at once
stride = 0  # tokens a window moves on for long documents (0: block_size // 2)
limit = 0  # score the first N test documents only (0: all)
out = ''  # predictions.jsonl (default: beside the first model's out_dir)
device = 'auto'
dtype = 'auto'
# -----------------------------------------------------------------------------
config = {k: v for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))}
try:
    configure(sys.argv[1:], config)
except ConfigError as e:
    utils.fail(str(e))
globals().update(config)
utils.check_ranges(config, {'batch_size': '[1, inf)', 'stride': '[0, inf)', 'limit': '[0, inf)'})
model_dirs = [path for path in models.split(',') if path]
if len(model_dirs) < 2 or not test:
    utils.fail("give --models=out-a,out-b,... (a class model each, at least two) and --test=data/<name>/test.jsonl")
labels = labels or os.path.join(os.path.dirname(test), 'labels.json')
out = out or os.path.join(os.path.dirname(os.path.normpath(model_dirs[0])), 'predictions.jsonl')


def read_json(path, what):
    try:
        with open(path, encoding='utf-8') as f:
            return [json.loads(line) for line in f if line.strip()] if path.endswith('.jsonl') else json.load(f)
    except (OSError, ValueError) as e:
        utils.fail(f"cannot read {what} {path} ({type(e).__name__}: {e}): run data/prepare_classes.py first")


classes = read_json(labels, 'the classes file')
documents = read_json(test, 'the test file')[:limit or None]
if not isinstance(classes, dict) or not {'names', 'folders', 'priors'} <= set(classes):
    utils.fail(f"{labels} is not a labels.json of data/prepare_classes.py (names, folders, priors)")
unknown = sorted({d.get('label') for d in documents} - set(classes['names']), key=str)
if unknown:
    utils.fail(f"{test} has labels that are not classes in {labels}: {unknown[:5]}")
device, device_type = utils.resolve_device(device)
dtype = utils.resolve_dtype(dtype, device_type)
ctx = nullcontext() if dtype == 'float32' else torch.autocast(device_type=device_type, dtype=getattr(torch, dtype))


def load_class_model(out_dir, previous):
    """The model of one class and the class it was trained on (its dataset's last folder). LoRA class
    models on the same base share the previous one's base: only their adapters are added."""
    path = os.path.join(out_dir, checkpoint_name)
    model, checkpoint = utils.load_gpt(path, "train that class first (see the header of classify.py)", reuse=previous)
    dataset = os.path.basename(os.path.normpath(str(checkpoint.get('config', {}).get('dataset', ''))))
    if dataset not in classes['folders']:
        utils.fail(f"{path} was trained on dataset '{dataset}', none of the class folders {classes['folders']}")
    return model.eval().to(device), classes['folders'].index(dataset)


def windows(tokens, block_size, step):
    """(inputs, targets, skip) covering every next-token prediction once: the first window scores all
    its targets, each later one moves on by step tokens and scores only the new ones."""
    done, start, n = 0, 0, len(tokens) - 1
    while done < n:
        end = min(start + block_size, n)
        yield tokens[start:end], tokens[start + 1:end + 1], done - start
        done, start = end, end - block_size + step


@torch.no_grad()
def log_likelihoods(model, docs, enc):
    """Total log-probability of each document under one model, windows batched."""
    step = stride or max(1, model.config.block_size // 2)
    items = [(i, *w) for i, d in enumerate(docs)
             for w in windows([enc.eot_token] + enc.encode_ordinary(d) + [enc.eot_token], model.config.block_size, step)]
    totals = torch.zeros(len(docs), dtype=torch.float64)
    for first in tqdm(range(0, len(items), batch_size), desc="windows", unit="batch", leave=False):
        batch = items[first:first + batch_size]
        width = max(len(x) for _, x, _, _ in batch)
        x = torch.zeros(len(batch), width, dtype=torch.long)
        y = torch.full((len(batch), width), -1, dtype=torch.long)
        for row, (_, inputs, targets, skip) in enumerate(batch):
            x[row, :len(inputs)] = torch.tensor(inputs)
            y[row, skip:len(targets)] = torch.tensor(targets[skip:])
        with ctx:
            logits, _ = model(x.to(device))
        logp = F.log_softmax(logits.float(), dim=-1).gather(-1, y.clamp(min=0).to(device).unsqueeze(-1)).squeeze(-1)
        per_row = (logp * (y >= 0).to(device)).sum(dim=1).double().cpu()
        totals.index_add_(0, torch.tensor([i for i, _, _, _ in batch]), per_row)
    return totals


def words(text):
    return re.findall(r"\w+", text.lower())


def naive_bayes(test_docs, enc):
    """Multinomial naive Bayes on word counts (Laplace smoothing) of each class's training documents,
    read back from its train.bin; returns the predicted class of each test document."""
    folder = os.path.dirname(labels)
    counts = [Counter(words(enc.decode(np.fromfile(os.path.join(folder, f, 'train.bin'), dtype=np.uint16).tolist())))
              for f in classes['folders']]
    vocab = {w: i for i, w in enumerate(sorted(set().union(*counts)))}
    table = np.ones((len(counts), len(vocab)))  # + 1: Laplace
    for c, counter in enumerate(counts):
        for w, n in counter.items():
            table[c, vocab[w]] += n
    log_word = np.log(table / table.sum(axis=1, keepdims=True))
    log_prior = np.log(np.array(classes['priors']))
    predicted = []
    for doc in test_docs:
        ids = [vocab[w] for w in words(doc) if w in vocab]
        predicted.append(int(np.argmax(log_prior + log_word[:, ids].sum(axis=1))))
    return predicted


def report(name, truth, predicted):
    k = len(classes['names'])
    matrix = np.zeros((k, k), dtype=int)
    for t, p in zip(truth, predicted):
        matrix[t, p] += 1
    accuracy = np.trace(matrix) / max(1, matrix.sum())
    f1 = [2 * matrix[c, c] / max(1, matrix[c].sum() + matrix[:, c].sum()) for c in range(k)]
    print(f"{name:<28} accuracy {accuracy:.4f}  macro-F1 {np.mean(f1):.4f}")
    return accuracy, matrix


if __name__ == '__main__':
    import tiktoken
    enc = tiktoken.get_encoding('gpt2')
    texts, truth = [d['text'] for d in documents], [classes['names'].index(d['label']) for d in documents]
    scores = torch.zeros(len(texts), len(classes['names']), dtype=torch.float64)
    seen = set()
    started = time.time()
    model = None
    for out_dir in model_dirs:
        model, c = load_class_model(out_dir, model)  # model: the previous LoRA one, else None
        if c in seen:
            utils.fail(f"two models for class {classes['names'][c]}: give one per class")
        seen.add(c)
        print(f"scoring {len(texts):,} documents under {out_dir} (class {classes['names'][c]})")
        scores[:, c] = log_likelihoods(model, texts, enc) + math.log(classes['priors'][c])
        if model.lora is None:
            model = None  # one whole model in memory at a time
    if len(seen) < len(classes['names']):
        missing = [classes['names'][c] for c in range(len(classes['names'])) if c not in seen]
        utils.fail(f"no model for class(es) {missing}: give one per class in --models")
    predicted = scores.argmax(dim=1).tolist()
    print(f"{len(texts) / (time.time() - started):.1f} documents/s ({len(texts)} documents x {len(model_dirs)} models)")
    _, matrix = report("generative GPT classifier", truth, predicted)
    report("majority class", truth, [int(np.argmax(classes['priors']))] * len(truth))
    report("naive Bayes (word counts)", truth, naive_bayes(texts, enc))
    print("confusion matrix (rows: true class, columns: predicted):")
    for name, row in zip(classes['names'], matrix):
        print(f"  {name:>16} " + " ".join(f"{n:>6}" for n in row))
    with open(out, 'w', encoding='utf-8') as f:
        for d, p, s in zip(documents, predicted, scores.tolist()):
            f.write(json.dumps({'label': d['label'], 'predicted': classes['names'][p],
                                'scores': dict(zip(classes['names'], s))}) + '\n')
    print(f"wrote {out}")
