"""
Turn your own text into train.bin / val.bin for train.py.

$ python data/prepare_text.py path/to/folder_or_file.txt ... --name mytext          # GPT-2 BPE
$ python data/prepare_text.py notes/ --name mynotes --char                            # characters
$ python train.py --dataset=mytext --init_from=gpt2 ...

Every .txt file (folders are searched recursively) is one document. BPE documents are joined
with GPT-2's <|endoftext|> token; the first 90% of the token stream is train, the rest val.
Character-level data also gets meta.pkl (the vocabulary), which train.py and sample.py read.
Tokens are stored as uint16, so the vocabulary must stay below 65,536 (GPT-2's is 50,257).
A dataset that exists is replaced only with --overwrite (and then only the files written here).
"""
import argparse
import math
import os
import pickle
import re
import sys

import numpy as np

DATA_DIR = os.path.dirname(os.path.abspath(__file__))
OUR_FILES = ('train.bin', 'val.bin', 'meta.pkl')


def fail(message):
    sys.exit(f"error: {message}")


def dataset_folder(name, elsewhere=""):
    """data/<name>: a name of plain folder names, never one that leads out of data/."""
    if not all(re.fullmatch(r'[A-Za-z0-9_][A-Za-z0-9_.-]*', part) for part in name.split('/')):
        fail(f"--name {name!r} must be a folder name under data/ (letters, digits, _ . -, no '..'){elsewhere}")
    return os.path.join(DATA_DIR, *name.split('/'))


def check_fraction(flag, value):
    if not (isinstance(value, float) and math.isfinite(value) and 0 < value < 1):
        fail(f"{flag} must be in (0, 1), got {value}")


def claim_folder(folder, ours, overwrite):
    """The folder to write a dataset into: one that holds a dataset (any of our file names) is
    replaced only with --overwrite, and then only our files go."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        fail(f"{folder} is a file, not a folder: choose another name")
    existing = [name for name in ours if os.path.exists(os.path.join(folder, name))]
    if existing and not overwrite:
        fail(f"{folder} already holds a dataset ({', '.join(existing)}): "
             "pass --overwrite to replace it, or another name")
    return existing


def read_documents(inputs):
    paths = []
    for item in inputs:
        if os.path.isdir(item):
            paths += sorted(os.path.join(root, f) for root, _, files in os.walk(item) for f in files
                            if f.endswith('.txt'))
        elif os.path.isfile(item):
            paths.append(item)
        else:
            fail(f"{item} is neither a file nor a folder")
    if not paths:
        fail(f"no .txt files found in {', '.join(inputs)}")
    documents = []
    for path in paths:
        with open(path, encoding='utf-8', errors='replace') as f:
            documents.append(f.read())
    return documents


def encode_bpe(documents, num_threads):
    import tiktoken
    enc = tiktoken.get_encoding("gpt2")
    tokens = []
    for doc in enc.encode_ordinary_batch(documents, num_threads=num_threads):
        tokens += doc + [enc.eot_token]
    return tokens, None


def encode_chars(documents):
    text = "\n".join(documents)
    chars = sorted(set(text))
    if not chars:
        fail("the documents hold no characters: give .txt files with text in them")
    if len(chars) >= 2**16:
        fail(f"{len(chars)} distinct characters do not fit uint16 tokens: use BPE (drop --char)")
    stoi = {ch: i for i, ch in enumerate(chars)}
    meta = {'vocab_size': len(chars), 'itos': dict(enumerate(chars)), 'stoi': stoi}
    return [stoi[c] for c in text], meta


def write_dataset(tokens, meta, out_dir, val_fraction=0.1):
    """Split the token stream and write train.bin, val.bin (uint16) and meta.pkl if given (an older
    meta.pkl goes: without one the tokens are GPT-2's). Each file is written whole, then renamed."""
    os.makedirs(out_dir, exist_ok=True)
    tokens = np.array(tokens, dtype=np.uint16)
    if len(tokens) < 2:
        fail(f"{len(tokens)} token(s) cannot make a train and a val split: give more text")
    n_val = min(len(tokens) - 1, max(1, int(len(tokens) * val_fraction)))
    files = {'train.bin': tokens[:-n_val].tobytes(), 'val.bin': tokens[-n_val:].tobytes(),
             'meta.pkl': None if meta is None else pickle.dumps(meta)}
    for name, data in files.items():
        path = os.path.join(out_dir, name)
        if data is None:
            if os.path.exists(path):
                os.remove(path)
            continue
        write_whole(path, data)
    print(f"train has {len(tokens) - n_val:,} tokens\nval has {n_val:,} tokens")
    if meta is not None:
        print(f"vocab size: {meta['vocab_size']}")


def write_whole(path, data):
    """data into path through a temp file and a rename: a crash or a full disk never leaves half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, 'wb') as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as e:
        fail(f"could not write {path} ({e.strerror or e}): free disk space, or write elsewhere")
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def prepare(inputs, out_dir, char_level=False, val_fraction=0.1, num_threads=os.cpu_count(), overwrite=False):
    check_fraction('--val-fraction', val_fraction)
    claim_folder(out_dir, OUR_FILES, overwrite)
    documents = read_documents(inputs)
    print(f"read {len(documents)} document(s), {sum(map(len, documents)):,} characters")
    tokens, meta = encode_chars(documents) if char_level else encode_bpe(documents, num_threads)
    write_dataset(tokens, meta, out_dir, val_fraction)


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('inputs', nargs='+', help='.txt files or folders of them')
    parser.add_argument('--name', required=True, help='dataset name: writes data/<name>/, used as --dataset=<name>')
    parser.add_argument('--char', action='store_true', help='character-level vocabulary instead of GPT-2 BPE')
    parser.add_argument('--val-fraction', type=float, default=0.1, help='the share of the tokens for val, in (0, 1)')
    parser.add_argument('--overwrite', action='store_true', help='replace the dataset data/<name> if it exists')
    args = parser.parse_args()
    prepare(args.inputs, dataset_folder(args.name), args.char, args.val_fraction, overwrite=args.overwrite)
