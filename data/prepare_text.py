"""
Turn your own text into train.bin / val.bin for train.py.

$ python data/prepare_text.py path/to/folder_or_file.txt ... --name mytext          # GPT-2 BPE
$ python data/prepare_text.py notes/ --name mynotes --char                            # characters
$ python train.py --dataset=mytext --init_from=gpt2 ...

Every .txt file (folders are searched recursively) is one document. BPE documents are joined
with GPT-2's <|endoftext|> token; the first 90% of the token stream is train, the rest val.
Character-level data also gets meta.pkl (the vocabulary), which train.py and sample.py read.
Tokens are stored as uint16, so the vocabulary must stay below 65,536 (GPT-2's is 50,257).
"""
import argparse
import os
import pickle

import numpy as np

DATA_DIR = os.path.dirname(os.path.abspath(__file__))


def read_documents(inputs):
    paths = []
    for item in inputs:
        if os.path.isdir(item):
            paths += sorted(os.path.join(root, f) for root, _, files in os.walk(item) for f in files if f.endswith('.txt'))
        elif os.path.isfile(item):
            paths.append(item)
        else:
            raise SystemExit(f"error: {item} is neither a file nor a folder")
    if not paths:
        raise SystemExit(f"error: no .txt files found in {', '.join(inputs)}")
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
    if len(chars) >= 2**16:
        raise SystemExit(f"error: {len(chars)} distinct characters do not fit uint16 tokens: use BPE (drop --char)")
    stoi = {ch: i for i, ch in enumerate(chars)}
    meta = {'vocab_size': len(chars), 'itos': dict(enumerate(chars)), 'stoi': stoi}
    return [stoi[c] for c in text], meta


def write_dataset(tokens, meta, out_dir, val_fraction=0.1):
    """Split the token stream and write train.bin, val.bin (uint16) and meta.pkl if given."""
    os.makedirs(out_dir, exist_ok=True)
    tokens = np.array(tokens, dtype=np.uint16)
    n_val = max(1, int(len(tokens) * val_fraction))
    splits = {'train': tokens[:-n_val], 'val': tokens[-n_val:]}
    for split, ids in splits.items():
        ids.tofile(os.path.join(out_dir, f'{split}.bin'))
        print(f"{split} has {len(ids):,} tokens")
    if meta is not None:
        with open(os.path.join(out_dir, 'meta.pkl'), 'wb') as f:
            pickle.dump(meta, f)
        print(f"vocab size: {meta['vocab_size']}")


def prepare(inputs, out_dir, char_level=False, val_fraction=0.1, num_threads=os.cpu_count()):
    documents = read_documents(inputs)
    print(f"read {len(documents)} document(s), {sum(map(len, documents)):,} characters")
    tokens, meta = encode_chars(documents) if char_level else encode_bpe(documents, num_threads)
    write_dataset(tokens, meta, out_dir, val_fraction)


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('inputs', nargs='+', help='.txt files or folders of them')
    parser.add_argument('--name', required=True, help='dataset name: writes data/<name>/, used as --dataset=<name>')
    parser.add_argument('--char', action='store_true', help='character-level vocabulary instead of GPT-2 BPE')
    parser.add_argument('--val-fraction', type=float, default=0.1)
    args = parser.parse_args()
    prepare(args.inputs, os.path.join(DATA_DIR, args.name), args.char, args.val_fraction)
