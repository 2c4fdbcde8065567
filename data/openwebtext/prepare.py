"""
OpenWebText (~8M documents, ~9B GPT-2 tokens) for pretraining GPT-2:
$ python data/openwebtext/prepare.py            # all cores; --num-proc=N to use fewer
Downloads ~54 GB into the Hugging Face cache and writes train.bin (~17 GB) and val.bin (~8.5 MB)
here. Tokenises with tiktoken's GPT-2 encoding in parallel, with a progress bar.
"""
import argparse
import os

import numpy as np
import tiktoken
from datasets import load_dataset  # huggingface datasets
from tqdm import tqdm

here = os.path.dirname(os.path.abspath(__file__))
enc = tiktoken.get_encoding("gpt2")


def tokenize(example):
    ids = enc.encode_ordinary(example['text'])  # encode_ordinary ignores any special tokens
    ids.append(enc.eot_token)  # <|endoftext|> separates documents
    return {'ids': ids, 'len': len(ids)}


def write_split(dset, path, total_batches=1024):
    # concatenate every document's ids into one uint16 memmap, one shard of the dataset at a time
    arr_len = int(np.sum(dset['len'], dtype=np.uint64))
    arr = np.memmap(path, dtype=np.uint16, mode='w+', shape=(arr_len,))
    total_batches = min(total_batches, len(dset))
    idx = 0
    for batch_idx in tqdm(range(total_batches), desc=f'writing {path}'):
        batch = dset.shard(num_shards=total_batches, index=batch_idx, contiguous=True).with_format('numpy')
        arr_batch = np.concatenate(batch['ids'])
        arr[idx: idx + len(arr_batch)] = arr_batch
        idx += len(arr_batch)
    arr.flush()


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--num-proc', type=int, default=os.cpu_count())
    parser.add_argument('--dataset', default='Skylion007/openwebtext', help='any hub dataset with a "text" column')
    args = parser.parse_args()

    dataset = load_dataset(args.dataset, num_proc=args.num_proc)
    # owt has only a train split: hold out 0.05% of the documents for val
    split_dataset = dataset['train'].train_test_split(test_size=0.0005, seed=2357, shuffle=True)
    split_dataset['val'] = split_dataset.pop('test')
    tokenized = split_dataset.map(tokenize, remove_columns=['text'], desc='tokenizing', num_proc=args.num_proc)
    for split, dset in tokenized.items():
        write_split(dset, os.path.join(here, f'{split}.bin'))
    # train.bin ~9.0B tokens, val.bin ~4.4M tokens; read back with
    # np.memmap('train.bin', dtype=np.uint16, mode='r')
