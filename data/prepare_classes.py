"""
One dataset per class, for generative classifiers: a GPT-2 is finetuned on each class's documents,
and classify.py sends a document to the class whose model (times its prior) likes it best.

$ python data/prepare_classes.py imdb                    # a Hugging Face dataset by name
$ python data/prepare_classes.py ag_news
$ python data/prepare_classes.py my.csv --text review --label stars --name reviews   # or .jsonl, .parquet
$ python data/prepare_classes.py saved_folder/           # a dataset saved with save_to_disk

Writes, under data/<name>/ (or --out-dir):
  <label>/train.bin, <label>/val.bin   GPT-2 BPE (uint16), each document followed by <|endoftext|>;
                                       val: the class's last training documents (--val-fraction)
  test.jsonl                           {"text", "label"} per test document
  labels.json                          the class names, their folders, training counts and priors
A folder that holds such a dataset is replaced only with --overwrite: then the class folders of its
labels.json go too (their train.bin and val.bin; nothing else of yours).
The test split is --test FILE's documents, else the dataset's own "test" split, else the last
--test-fraction of a shuffle of the training documents (seeded). Each val split holds at least
--block-size + 1 tokens where the class has them (a note says when it has not). Text and label
columns are detected (text/sentence/content/review, label/labels/class/category/sentiment) or
given. Tokenisation runs on every core.
"""
import argparse
import json
import os
import re

import numpy as np
from prepare_text import check_fraction, claim_folder, dataset_folder, fail, write_whole

TEXT_COLUMNS = ("text", "sentence", "content", "review", "document")
LABEL_COLUMNS = ("label", "labels", "class", "category", "sentiment")


def load_splits(source, test_fraction, seed, test_file=None):
    """{"train": Dataset, "test": Dataset} from a hub name, a save_to_disk folder or a local file; the test
    split is test_file's rows when given, else the dataset's own, else carved out of its training rows."""
    loaded = load(source)
    if test_file is not None:
        if not os.path.isfile(test_file):
            fail(f"--test {test_file} not found: give a .csv, .jsonl or .parquet file of test documents")
        return {"train": loaded["train"], "test": load(test_file)["train"]}
    if "test" in loaded:
        return {"train": loaded["train"], "test": loaded["test"]}
    try:
        split = loaded["train"].train_test_split(test_size=test_fraction, seed=seed)
    except ValueError:  # too few rows to carve out a test split
        fail(f"{source}: {len(loaded['train'])} row(s) cannot give a train and a --test-fraction {test_fraction} test "
             "split: give more rows, another --test-fraction, --test FILE, or a dataset with its own test split")
    return {"train": split["train"], "test": split["test"]}


def load(source):
    """A DatasetDict with a 'train' split, from a hub name, a save_to_disk folder or a local file."""
    import datasets
    files = {".csv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
    extension = os.path.splitext(source)[1].lower()
    try:
        if os.path.isdir(source):
            loaded = datasets.load_from_disk(source)
        elif os.path.isfile(source):
            if extension not in files:
                fail(f"{source}: a local file must be .csv, .jsonl, .json or .parquet")
            loaded = datasets.load_dataset(files[extension], data_files=source)
        else:
            loaded = datasets.load_dataset(source)
    except SystemExit:
        raise
    except Exception as e:  # no such dataset, no network, an unreadable file: one line
        fail(f"cannot load {source} ({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''})")
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict(train=loaded)
    if "train" not in loaded:
        fail(f"{source} has no 'train' split (it has {', '.join(loaded)})")
    return loaded


def pick_column(dataset, given, candidates, what, flag):
    if given is not None:
        if given not in dataset.column_names:
            fail(f"{flag} {given}: no such column (the columns are {', '.join(dataset.column_names)})")
        return given
    for name in candidates:
        if name in dataset.column_names:
            return name
    fail(f"no {what} column found among {', '.join(dataset.column_names)}: name it with {flag}")


def label_names(dataset, column, given):
    """The classes in order: --labels, else the dataset's ClassLabel names, else the sorted values."""
    feature = dataset.features[column]
    if given:
        return given.split(",")
    if hasattr(feature, "names"):
        return list(feature.names)
    return sorted({str(value) for value in dataset[column]})


def to_names(values, feature, names, where):
    """Label values (ClassLabel ints or strings) -> class names, each checked against the list."""
    result = []
    for row, value in enumerate(values):
        name = feature.names[value] if hasattr(feature, "names") and isinstance(value, int) else str(value)
        if name not in names:
            fail(f"{where} row {row}: label {name!r} is not one of the classes ({', '.join(names)}): "
                 "fix the row or pass --labels")
        result.append(name)
    return result


def folder_name(label):
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("._") or "class"


def encode(documents, threads):
    """GPT-2 BPE tokens of each document, followed by <|endoftext|>, in chunks with a progress bar."""
    import tiktoken
    from tqdm import tqdm
    enc = tiktoken.get_encoding("gpt2")
    encoded = []
    chunk = 1000
    for start in tqdm(range(0, len(documents), chunk), desc="tokenising", unit="k docs", leave=False):
        encoded += [ids + [enc.eot_token] for ids in enc.encode_ordinary_batch(documents[start:start + chunk],
                                                                               num_threads=threads)]
    return encoded


def write_class(folder, name, documents, val_fraction, block_size, threads):
    """train.bin and val.bin of one class: val is its last documents, whole (never a cut document), at
    least val_fraction of them and at least block_size + 1 tokens (train.py needs one block of each)."""
    os.makedirs(folder, exist_ok=True)
    encoded = encode(documents, threads)
    n_val = max(1, int(len(encoded) * val_fraction))
    while n_val < len(encoded) - 1 and sum(map(len, encoded[-n_val:])) < block_size + 1:
        n_val += 1
    splits = {"train": encoded[:-n_val], "val": encoded[-n_val:]}
    for split, docs in splits.items():
        tokens = np.array([token for ids in docs for token in ids], dtype=np.uint16)
        if len(tokens) < block_size + 1:  # said now, not when train.py refuses it
            print(f"note: class {name!r} has {len(tokens)} {split} tokens, fewer than --block-size {block_size} + 1: "
                  f"train it with --block_size={max(1, len(tokens) - 1)} or less, or give it more documents")
        write_whole(os.path.join(folder, f"{split}.bin"), tokens.tobytes())


def remove_previous(out_dir):
    """With --overwrite: the dataset an earlier run wrote here, by its labels.json (our files only)."""
    try:
        with open(os.path.join(out_dir, "labels.json"), encoding="utf-8") as f:
            folders = json.load(f).get("folders", [])
    except (OSError, ValueError, AttributeError):
        folders = []
    for folder in [os.path.join(out_dir, name) for name in folders if isinstance(name, str) and "/" not in name
                   and name not in ("", ".", "..")]:
        for name in ("train.bin", "val.bin"):
            if os.path.isfile(os.path.join(folder, name)):
                os.remove(os.path.join(folder, name))
        if os.path.isdir(folder) and not os.listdir(folder):
            os.rmdir(folder)


def prepare(source, out_dir, text=None, label=None, labels=None, val_fraction=0.05, test_fraction=0.1, seed=1337,
            threads=os.cpu_count(), overwrite=False, test_file=None, block_size=1024):
    check_fraction("--val-fraction", val_fraction)
    check_fraction("--test-fraction", test_fraction)
    claim_folder(out_dir, ("labels.json", "test.jsonl"), overwrite)
    splits = load_splits(source, test_fraction, seed, test_file)
    train = splits["train"]
    text = pick_column(train, text, TEXT_COLUMNS, "text", "--text")
    label = pick_column(train, label, LABEL_COLUMNS, "label", "--label")
    names = label_names(train, label, labels)
    feature = train.features[label]
    by_class = {name: [] for name in names}
    for document, name in zip(train[text], to_names(train[label], feature, names, f"{source} train")):
        by_class[name].append(str(document))
    for name, documents in by_class.items():
        if len(documents) < 2:  # one for train, one for val at least
            fail(f"class {name!r} has {len(documents)} training document(s): it needs at least 2 (check --labels)")
    folders = [folder_name(name) for name in names]
    if len(set(folders)) < len(folders):
        fail(f"the class names {names} give clashing folder names {folders}: rename the labels")
    remove_previous(out_dir)  # its classes may not be these
    for name, folder in zip(names, folders):
        print(f"{name}: {len(by_class[name]):,} training documents -> {os.path.join(out_dir, folder)}")
        write_class(os.path.join(out_dir, folder), name, by_class[name], val_fraction, block_size, threads)
    test = splits["test"]
    test_names = to_names(test[label], test.features[label], names, f"{source} test")
    write_whole(os.path.join(out_dir, "test.jsonl"), "".join(
        json.dumps({"text": str(document), "label": name}) + "\n"
        for document, name in zip(test[text], test_names)).encode())
    counts = [len(by_class[name]) for name in names]
    write_whole(os.path.join(out_dir, "labels.json"), json.dumps(
        {"names": names, "folders": folders, "train_counts": counts,
         "priors": [count / sum(counts) for count in counts]},
        indent=2).encode())
    print(f"{len(test_names):,} test documents -> {os.path.join(out_dir, 'test.jsonl')}; classes in labels.json")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source",
                        help="a Hugging Face dataset name, a save_to_disk folder, or a .csv/.jsonl/.parquet file")
    parser.add_argument("--name", help="writes data/<name>/ (default: the source's name)")
    parser.add_argument("--out-dir", help="write here instead of data/<name>/")
    parser.add_argument("--text", help="the text column (default: detected)")
    parser.add_argument("--label", help="the label column (default: detected)")
    parser.add_argument("--labels", help="comma-separated class names, in order (default: the dataset's)")
    parser.add_argument("--val-fraction", type=float, default=0.05)
    parser.add_argument("--test-fraction", type=float, default=0.1,
                        help="when the dataset has no test split and no --test is given")
    parser.add_argument("--test", help="a .csv/.jsonl/.parquet file of test documents (default: the dataset's)")
    parser.add_argument("--block-size", type=int, default=1024,
                        help="the class models' block_size: each val split holds at least block_size + 1 tokens")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the dataset in the output folder if there is one")
    args = parser.parse_args()
    name = args.name or os.path.splitext(os.path.basename(os.path.normpath(args.source)))[0].replace("/", "_")
    out_dir = args.out_dir or dataset_folder(name, elsewhere=": or give --out-dir")
    if args.block_size < 1:
        fail(f"--block-size must be at least 1, got {args.block_size}")
    prepare(args.source, out_dir, args.text, args.label, args.labels, args.val_fraction, args.test_fraction, args.seed,
            overwrite=args.overwrite, test_file=args.test, block_size=args.block_size)
