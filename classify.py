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

if __name__ == '__main__':  # Ctrl-C at any time: one line, no traceback
    signal.signal(signal.SIGINT, lambda *_: sys.exit("interrupted"))
import json  # noqa: E402
import math
import os
import re
import time
from collections import Counter

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import files
import gpt_checkpoint
import runtime
from configurator import UserError, check_ranges, settings

# -----------------------------------------------------------------------------
models = ''  # comma-separated out_dirs of train.py, one class model each
test = ''  # the test.jsonl of data/prepare_classes.py
labels = ''  # its labels.json (default: beside test)
checkpoint_name = 'best.pt'  # the best-val model; ckpt.pt (the latest) where a run saved no best.pt
batch_size = 8  # windows scored at once
stride = 0  # tokens a window moves on for long documents (0: block_size // 2)
limit = 0  # score the first N test documents only (0: all)
out = ''  # predictions.jsonl (default: beside the first model's out_dir)
overwrite = False  # replace an existing --out
device = 'auto'
dtype = 'auto'
# -----------------------------------------------------------------------------


def read_labels(path):
    """labels.json of data/prepare_classes.py: class names, their folders and priors, checked."""
    try:
        with open(path, encoding='utf-8') as f:
            classes = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the classes file {path} ({type(e).__name__}: {e}): "
                        "run data/prepare_classes.py first")
    fix = "run data/prepare_classes.py again, or mend it"
    if not isinstance(classes, dict) \
            or not all(isinstance(classes.get(k), list) for k in ('names', 'folders', 'priors')):
        raise UserError(f"{path} is not a labels.json of data/prepare_classes.py (lists of names, folders, priors): "
                        f"{fix}")
    names, folders, priors = classes['names'], classes['folders'], classes['priors']
    if not (len(names) == len(folders) == len(priors) >= 2 and all(isinstance(n, str) for n in names + folders)):
        raise UserError(f"{path}: names and folders must be two or more strings, as many as the priors: {fix}")
    for name, prior in zip(names, priors):
        if isinstance(prior, bool) or not isinstance(prior, (int, float)) or not 0 < prior <= 1:
            raise UserError(f"{path}: class {name!r} has prior {prior!r}; each prior must be in (0, 1]: {fix}")
    return classes


def read_test(path):
    """The test documents: JSON lines of {"text": ..., "label": ...}, each checked."""
    documents = []
    try:
        with open(path, encoding='utf-8') as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path} line {number}"
                try:
                    record = json.loads(line)
                except ValueError as e:
                    raise UserError(f"{where} is not valid JSON ({e}): the test file holds one JSON object per line, "
                               "as data/prepare_classes.py writes it")
                if not (isinstance(record, dict) and isinstance(record.get('text'), str) and 'label' in record):
                    raise UserError(f'{where} is not a {{"text": "...", "label": ...}} object: fix or remove it')
                documents.append(record)
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read the test file {path} ({type(e).__name__}: {e}): "
                        "run data/prepare_classes.py first")
    if not documents:
        raise UserError(f"{path} holds no documents")
    return documents


def checkpoint_of(out_dir):
    """out_dir's checkpoint_name; its ckpt.pt when that is best.pt and the run saved none (train.py writes
    best.pt at an eval that improved on the ones before it, so a run cut short may have only ckpt.pt)."""
    path, latest = os.path.join(out_dir, checkpoint_name), os.path.join(out_dir, 'ckpt.pt')
    return latest if checkpoint_name == 'best.pt' and not os.path.exists(path) and os.path.exists(latest) else path


def class_of(out_dir):
    """What a class model's checkpoint says, read before any model is built: (its class, its
    vocabulary (None: GPT-2's BPE), its block_size)."""
    path = checkpoint_of(out_dir)
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path}: train that class first (see the header of classify.py)")
    checkpoint = gpt_checkpoint.load_checkpoint(path, ('model', 'model_args'), mmap=True)
    dataset = os.path.basename(os.path.normpath(str(checkpoint.get('config', {}).get('dataset', ''))))
    if dataset not in classes['folders']:
        raise UserError(f"{path} was trained on dataset '{dataset}', none of the class folders {classes['folders']}")
    model_args = checkpoint['model_args'] if isinstance(checkpoint['model_args'], dict) else {}
    if stride > model_args.get('block_size', stride):
        raise UserError(f"--stride={stride} is above {path}'s block_size {model_args['block_size']}: "
                        "the tokens between windows would go unscored; "
                        f"use --stride={model_args['block_size']} or less")
    return classes['folders'].index(dataset), gpt_checkpoint.checkpoint_vocabulary(checkpoint)


def check_class_models(model_dirs):
    """One model per class, all with one vocabulary; returns each one's class and that vocabulary."""
    found = [(out_dir, *class_of(out_dir)) for out_dir in model_dirs]
    for i, (out_dir, c, vocabulary) in enumerate(found):
        if c in [other for _, other, _ in found[:i]]:
            raise UserError(f"two models for class {classes['names'][c]}: give one per class")
        if vocabulary != found[0][2]:
            kind = lambda v: 'GPT-2 BPE' if v is None else f'{len(v)} characters'
            raise UserError(f"{out_dir} has another vocabulary than {found[0][0]} ({kind(vocabulary)} against "
                       f"{kind(found[0][2])}): train every class model with one tokenizer")
    missing = [name for c, name in enumerate(classes['names']) if c not in {c for _, c, _ in found}]
    if missing:
        raise UserError(f"no model for class(es) {missing}: give one per class in --models")
    return [c for _, c, _ in found], found[0][2]


def tokenizer(vocabulary, texts):
    """(encode, decode) of the class models: GPT-2's BPE with <|endoftext|> around each document, as
    train.bin has them, or their characters (every character of the test documents among them)."""
    if vocabulary is None:
        import tiktoken
        enc = tiktoken.get_encoding('gpt2')
        return (lambda text: [enc.eot_token] + enc.encode_ordinary(text) + [enc.eot_token]), enc.decode
    stoi = {character: i for i, character in vocabulary.items()}
    unseen = sorted(set().union(*texts) - set(stoi))
    if unseen:
        raise UserError(f"the test documents hold characters the char-level class models never saw: {unseen[:10]}; "
                   "train them on data that has every character")
    return (lambda text: [stoi[character] for character in text]), (lambda ids: ''.join(vocabulary[i] for i in ids))


def windows(tokens, block_size, step):
    """(inputs, targets, skip) covering every next-token prediction once: the first window scores all
    its targets, each later one moves on by step tokens and scores only the new ones."""
    done, start, n = 0, 0, len(tokens) - 1
    while done < n:
        end = min(start + block_size, n)
        yield tokens[start:end], tokens[start + 1:end + 1], done - start
        done, start = end, end - block_size + step


@torch.no_grad()
def log_likelihoods(model, docs, encode):
    """Total log-probability of each document under one model, windows batched."""
    step = stride or max(1, model.config.block_size // 2)
    items = [(i, *w) for i, d in enumerate(docs) for w in windows(encode(d), model.config.block_size, step)]
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


def naive_bayes(test_docs, decode):
    """Multinomial naive Bayes on word counts (Laplace smoothing) of each class's training documents,
    read back from its train.bin; returns the predicted class of each test document."""
    folder = os.path.dirname(labels)
    counts = [Counter(words(decode(np.fromfile(os.path.join(folder, f, 'train.bin'), dtype=np.uint16).tolist())))
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


if __name__ == '__main__':  # importing this file (the tests do) runs nothing
    config, _ = settings(globals())  # config files and --key=value; a UserError is one line from here
    check_ranges(config, {'batch_size': '[1, inf)', 'stride': '[0, inf)', 'limit': '[0, inf)'})
    model_dirs = [path for path in models.split(',') if path]
    if len(model_dirs) < 2 or not test:
        raise UserError("give --models=out-a,out-b,... (a class model each, at least two) "
                        "and --test=data/<name>/test.jsonl")
    labels = labels or os.path.join(os.path.dirname(test), 'labels.json')
    out = out or os.path.join(os.path.dirname(os.path.normpath(model_dirs[0])), 'predictions.jsonl')
    files.check_output_file(out, overwrite, '--out', inputs=(test, labels), overwrite_flag='--overwrite=True')
    classes = read_labels(labels)
    documents = read_test(test)[:limit or None]
    unknown = sorted({str(d['label']) for d in documents if d['label'] not in classes['names']})
    if unknown:
        raise UserError(f"{test} has labels that are not classes in {labels}: {unknown[:5]}")
    device, device_type = runtime.resolve_device(device)
    dtype = runtime.resolve_dtype(dtype, device_type)
    ctx = runtime.autocast(device_type, dtype)
    texts, truth = [d['text'] for d in documents], [classes['names'].index(d['label']) for d in documents]
    model_classes, vocabulary = check_class_models(model_dirs)
    encode, decode = tokenizer(vocabulary, texts)
    scores = torch.zeros(len(texts), len(classes['names']), dtype=torch.float64)
    started = time.time()
    model = None
    for out_dir, c in zip(model_dirs, model_classes):
        path = checkpoint_of(out_dir)  # LoRA models on one base share the previous one's
        model = gpt_checkpoint.load_gpt(path, "train that class first (see the header of classify.py)", reuse=model)[0]
        model.eval().to(device)
        print(f"scoring {len(texts):,} documents under {out_dir} (class {classes['names'][c]})")
        scores[:, c] = log_likelihoods(model, texts, encode) + math.log(classes['priors'][c])
        if model.lora is None:
            model = None  # one whole model in memory at a time
    predicted = scores.argmax(dim=1).tolist()
    print(f"{len(texts) / (time.time() - started):.1f} documents/s ({len(texts)} documents x {len(model_dirs)} models)")
    _, matrix = report("generative GPT classifier", truth, predicted)
    report("majority class", truth, [int(np.argmax(classes['priors']))] * len(truth))
    report("naive Bayes (word counts)", truth, naive_bayes(texts, decode))
    print("confusion matrix (rows: true class, columns: predicted):")
    for name, row in zip(classes['names'], matrix):
        print(f"  {name:>16} " + " ".join(f"{n:>6}" for n in row))
    lines = [json.dumps({'label': d['label'], 'predicted': classes['names'][p],
                         'scores': dict(zip(classes['names'], s))}) + '\n'
             for d, p, s in zip(documents, predicted, scores.tolist())]
    files.write_output_file(out, lambda f: f.write(''.join(lines).encode()), f"the predictions {out}")
    print(f"wrote {out}")
