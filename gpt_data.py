"""
train.py's data: token files (uint16, as data/*/prepare.py write them) checked before anything is built,
a dataset's meta.pkl read without running code, and where each batch starts: a pure function of its
position in the run.
"""
import os
import pickle

import numpy as np
import torch

from configurator import UserError

# -----------------------------------------------------------------------------
# batches: where each one starts is a pure function of its position in the run

MASK64 = 2**64 - 1


def splitmix64(x):
    """One step of SplitMix64 (Steele, Lea and Flood, 2014): a 64-bit counter-based hash whose
    outputs are fixed by its definition, on every Python, NumPy and torch version."""
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def batch_offsets(seed, split, iter_index, batch_index, count, high):
    """count window starts in [0, high) for the batch at (seed, split, iteration, micro-batch):
    a resumed or re-sharded run sees exactly the batches an uninterrupted one would."""
    key = 0
    for part in (seed, split, iter_index, batch_index):
        key = splitmix64(key ^ (part & MASK64))  # & MASK64: iteration -1 (evals) hashes like any other
    return [splitmix64(key ^ i) % high for i in range(count)]


def read_batch(data_dir, split, seed, iter_index, batch_index, batch_size, block_size, device):
    """(inputs, targets) of one batch: batch_size random windows of split's token file, on device."""
    # a new memmap per batch avoids a memory leak (https://stackoverflow.com/questions/45132940)
    data = np.memmap(os.path.join(data_dir, f'{split}.bin'), dtype=np.uint16, mode='r')
    ix = batch_offsets(seed, split == 'val', iter_index, batch_index, batch_size, len(data) - block_size)
    x = torch.from_numpy(np.stack([data[i:i + block_size] for i in ix]).astype(np.int64))
    y = torch.from_numpy(np.stack([data[i + 1:i + 1 + block_size] for i in ix]).astype(np.int64))
    if torch.device(device).type == 'cuda':  # pinned, so the copy to the GPU runs asynchronously
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


# -----------------------------------------------------------------------------
# token files and dataset metadata

def token_file_stats(path, scan_tokens=2**28):
    """(token count, largest token id) of a uint16 token file; the id is read from the first
    scan_tokens only, so that a 9B-token file costs a second, not minutes."""
    size = os.path.getsize(path)
    if size % 2:
        raise UserError(f"{path} has {size} bytes, an odd count, but holds uint16 tokens: "
                        "it is truncated or not a token file")
    if size == 0:
        return 0, -1
    tokens = np.memmap(path, dtype=np.uint16, mode="r")
    top = max(int(tokens[i:i + 2**24].max()) for i in range(0, min(len(tokens), scan_tokens), 2**24))
    return size // 2, top


class PlainUnpickler(pickle.Unpickler):
    # plain dicts, lists, strings and numbers need no class lookups; anything else could run code
    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"it refers to {module}.{name}; only plain values are allowed")


def load_meta(path):
    """A dataset's meta.pkl (vocab_size, and stoi/itos for characters), read without running any
    code it may carry, and checked."""
    try:
        with open(path, "rb") as f:
            meta = PlainUnpickler(f).load()
    except Exception as e:  # a file from elsewhere: any unpickling failure is that file's fault
        raise UserError(f"{path} cannot be read ({type(e).__name__}: {e}): prepare the dataset again")
    if not isinstance(meta, dict) or not isinstance(meta.get("vocab_size"), int) \
            or not 1 <= meta["vocab_size"] <= 2**16:
        raise UserError(f"{path} needs a 'vocab_size' between 1 and 65536: prepare the dataset again")
    if "stoi" in meta or "itos" in meta:
        stoi, itos = meta.get("stoi"), meta.get("itos")
        if not (isinstance(stoi, dict) and isinstance(itos, dict)
                and all(isinstance(k, str) and isinstance(v, int) for k, v in stoi.items())
                and all(isinstance(k, int) and isinstance(v, str) for k, v in itos.items())
                and max(itos, default=-1) < meta["vocab_size"]):
            raise UserError(f"{path}: 'stoi' and 'itos' must map characters to ids below vocab_size and back: "
                            "prepare the dataset again")
    return meta


def dataset_vocabulary(data_dir):
    """A dataset's character vocabulary (id -> character) from its meta.pkl, or None (GPT-2 BPE)."""
    meta_path = os.path.join(data_dir, "meta.pkl")
    if not os.path.exists(meta_path):
        return None
    meta = load_meta(meta_path)
    if "itos" not in meta:
        raise UserError(f"{meta_path} has no character vocabulary (stoi/itos): prepare the dataset again")
    return meta["itos"]


def check_dataset(data_dir, block_size):
    """A dataset folder's train.bin and val.bin checked (whole tokens, longer than a block, within its
    meta.pkl's vocabulary if it has one) before anything is built. Returns (the largest token id, the
    meta.pkl's vocab_size and id -> character map, or None and None for GPT-2's BPE)."""
    largest_token = -1
    for split in ('train', 'val'):
        path = os.path.join(data_dir, f'{split}.bin')
        if not os.path.isfile(path):
            raise UserError(f"{path} not found: prepare the data first, e.g. python {data_dir}/prepare.py")
        n_tokens, top = token_file_stats(path)
        largest_token = max(largest_token, top)
        if n_tokens < block_size + 1:
            raise UserError(f"{path} has {n_tokens} tokens, fewer than block_size+1={block_size + 1}: "
                            "use more data or a smaller --block_size")
    meta_path = os.path.join(data_dir, 'meta.pkl')
    if not os.path.exists(meta_path):
        return largest_token, None, None
    meta = load_meta(meta_path)  # plain values only: a pickle can carry code
    if largest_token >= meta['vocab_size']:
        raise UserError(f"{data_dir} holds token id {largest_token} but {meta_path} has vocab_size "
                        f"{meta['vocab_size']}: the two do not belong together; prepare the dataset again")
    return largest_token, meta['vocab_size'], meta.get('itos')


def check_vocabulary_fits(data_dir, largest_token, meta_vocab_size, vocab_size):
    """The dataset's tokens, and its meta.pkl's vocabulary, within the model's vocab_size."""
    if meta_vocab_size is not None and meta_vocab_size > vocab_size:
        raise UserError(f"{data_dir}/meta.pkl has {meta_vocab_size} tokens but the model's vocabulary has "
                        f"{vocab_size}: train this dataset from scratch, or prepare it with the model's tokenizer")
    if largest_token >= vocab_size:
        raise UserError(f"{data_dir} holds token id {largest_token} but the model's vocabulary has {vocab_size}: "
                        "prepare the data with the model's tokenizer")
