"""
HellaSwag's validation set (10,042 items), tokenized with GPT-2's BPE for train.py --eval_hellaswag=True:
$ python data/hellaswag/prepare.py                      # downloads the official JSONL (~11 MB)
$ python data/hellaswag/prepare.py --file hellaswag_val.jsonl    # or a copy you have
Writes val.jsonl here: one item a line, {"context": ids, "endings": [ids] * 4, "label": i}. As GPT-2
results are scored, each ending is tokenized with a leading space after the context (ctx).
"""
import argparse
import json
import os
import sys
import urllib.request

import tiktoken

HERE = os.path.dirname(os.path.abspath(__file__))
URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"


def fail(message):
    sys.exit(f"error: {message}")


def read_official(path):
    """The official JSONL's items, checked: ctx, 4 endings, a label 0-3."""
    items = []
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    item = json.loads(line)
                except ValueError as e:
                    fail(f"{path} line {number} is not JSON ({e}): give HellaSwag's official .jsonl")
                endings = item.get("endings") if isinstance(item, dict) else None
                if not (isinstance(item.get("ctx") if isinstance(item, dict) else None, str)
                        and isinstance(endings, list) and len(endings) == 4
                        and all(isinstance(e, str) and e for e in endings) and item.get("label") in (0, 1, 2, 3)):
                    fail(f"{path} line {number} is not a HellaSwag item (ctx, 4 endings, label 0-3)")
                items.append(item)
    except (OSError, UnicodeDecodeError) as e:
        fail(f"cannot read {path} ({type(e).__name__}: {e})")
    if not items:
        fail(f"{path} holds no items")
    return items


def tokenize(items):
    enc = tiktoken.get_encoding("gpt2")
    return [{"context": enc.encode(item["ctx"]), "endings": [enc.encode(" " + ending) for ending in item["endings"]],
             "label": item["label"]} for item in items]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--file", help="a local copy of hellaswag_val.jsonl (default: download it)")
    parser.add_argument("--out", default=os.path.join(HERE, "val.jsonl"), help="the tokenized items to write")
    args = parser.parse_args(argv)
    source = args.file
    if source is None:
        source = os.path.join(HERE, "hellaswag_val.jsonl")
        if not os.path.exists(source):
            print(f"downloading {URL}")
            try:
                urllib.request.urlretrieve(URL, source + ".part")
            except OSError as e:
                fail(f"cannot download {URL} ({e}): download it yourself and pass --file")
            os.replace(source + ".part", source)
    items = tokenize(read_official(source))
    tmp = args.out + f".tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(item) + "\n" for item in items)
    os.replace(tmp, args.out)  # whole or not at all
    print(f"wrote {len(items):,} items to {args.out}")


if __name__ == "__main__":
    main()
