"""
Race our train.py against another nanoGPT-style train.py (nanoGPT itself, fetched outside this
repo) on the same machine: whole processes, alternating which goes first, several pairs. Prints
each run's wall time and, with --target, the wall time until its first eval line with val loss at
or below the target (read from stdout the same way for both), then the medians and their ratio.

$ git clone https://github.com/karpathy/nanoGPT ../nanoGPT && (cd ../nanoGPT/data/shakespeare_char && python prepare.py)
$ python bench_race.py --other=../nanoGPT --pairs=5 -- config/train_shakespeare_char.py --device=cpu --compile=False \
    --eval_iters=20 --log_interval=100 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 \
    --max_iters=500 --lr_decay_iters=2000 --dropout=0.0
$ python bench_race.py --other=../nanoGPT --pairs=5 --target=1.89 --ours="config/speedrun_shakespeare_char.py" -- ...

Both read the other repo's data/shakespeare_char (ours through --dataset=<path>), so they train and
evaluate on the same tokens. Each run gets a fresh out_dir in a temporary folder.
"""
import argparse
import datetime
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from hardware import cpu_name

EVAL_LINE = re.compile(r"step (\d+): train loss [\d.]+, val loss ([\d.]+)")


def run(repo, args, out_dir, target):
    """(wall seconds, seconds to the first val loss <= target or None, last eval line) of one process."""
    command = [sys.executable, "train.py", *args, f"--out_dir={out_dir}"]
    start, to_target, last = time.time(), None, ""
    with subprocess.Popen(command, cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=dict(os.environ, WANDB_MODE="disabled")) as proc:
        for line in proc.stdout:
            match = EVAL_LINE.search(line)
            if match:
                last = line.strip()
                if target is not None and to_target is None and float(match.group(2)) <= target:
                    to_target = time.time() - start
    if proc.returncode != 0:
        sys.exit(f"error: {' '.join(command)} failed in {repo} (exit {proc.returncode})")
    return time.time() - start, to_target, last


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--other", required=True, help="the other repo (its train.py and data/)")
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--target", type=float, help="also time each run to this val loss")
    parser.add_argument("--ours", default="", help="our arguments instead of the shared ones (e.g. another config)")
    parser.add_argument("--dataset", default="shakespeare_char", help="the other repo's data/ folder both train on")
    parser.add_argument("--seeds", action="store_true",
                        help="pair i runs both with --seed=1337+i and their last val losses are compared (nanoGPT "
                             "fixes its seed in train.py: give a copy a seed setting first, see BENCHMARKS.md)")
    parser.add_argument("args", nargs="*", help="train.py arguments for both (after --)")
    a = parser.parse_args()
    if a.pairs < 1 or not os.path.isfile(os.path.join(a.other, "train.py")):
        sys.exit("error: --other must be a repo with train.py, and --pairs at least 1")
    data = os.path.abspath(os.path.join(a.other, "data", a.dataset))
    ours_args = (shlex.split(a.ours) if a.ours else a.args) + [f"--dataset={data}"]
    sides = {"ours": (os.path.dirname(os.path.abspath(__file__)), ours_args), "other": (a.other, a.args)}
    print(f"{datetime.date.today()}, {cpu_name()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"Python {platform.python_version()}")
    print(f"ours:  python train.py {' '.join(ours_args)}\nother: python train.py {' '.join(a.args)} (in {a.other})")
    results, finals = {"ours": [], "other": []}, {"ours": [], "other": []}
    with tempfile.TemporaryDirectory() as tmp:
        for pair in range(a.pairs):
            for side in (("ours", "other") if pair % 2 == 0 else ("other", "ours")):  # alternate who goes first
                repo, args = sides[side]
                args = args + ([f"--seed={1337 + pair}"] if a.seeds else [])
                wall, to_target, last = run(repo, args, os.path.join(tmp, f"{side}-{pair}"), a.target)
                results[side].append((wall, to_target))
                finals[side].append(float(EVAL_LINE.search(last).group(2)) if last else math.nan)
                reached = f", to val <= {a.target}: {to_target:.1f}s" if a.target is not None else ""
                print(f"pair {pair} {side:<5} wall {wall:.1f}s{reached}  | {last}", flush=True)
    ratios = [o[0] / t[0] for o, t in zip(results["ours"], results["other"])]
    print(f"wall: ours median {statistics.median(w for w, _ in results['ours']):.1f}s, other "
          f"{statistics.median(w for w, _ in results['other']):.1f}s; ours/other per pair "
          f"{', '.join(f'{r:.3f}' for r in ratios)}: median {statistics.median(ratios):.3f}")
    if a.seeds:  # the last eval of each run: same recipe, same seeds, the same quality?
        for side, values in finals.items():
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            print(f"last val loss, {side}: {', '.join(f'{v:.4f}' for v in values)}; "
                  f"mean {statistics.mean(values):.4f}, std {spread:.4f}")
    if a.target is not None:
        pairs = [(o[1], t[1]) for o, t in zip(results["ours"], results["other"]) if o[1] and t[1]]
        if pairs:
            ratios = [o / t for o, t in pairs]
            print(f"to val <= {a.target}: ours/other per pair {', '.join(f'{r:.3f}' for r in ratios)}: "
                  f"median {statistics.median(ratios):.3f} ({len(pairs)} of {a.pairs} pairs reached it on both sides)")
        else:
            print(f"to val <= {a.target}: not reached by both sides in any pair")


if __name__ == "__main__":
    main()
