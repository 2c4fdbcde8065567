"""
Train and val loss of train.py or train_ds.py runs, against iterations and against wall time, in one PNG.

$ python plot.py out-shakespeare-char out-speedrun --out=runs.png

Reads each run's out_dir/log.jsonl (no wandb needed). Left: loss against iterations. Right: against
elapsed_s, train.py's wall seconds without compilation (logs written before it existed have no
time panel line). Thin lines are the logged training loss of single iterations; lines with dots are
the evaluations' val loss. Needs matplotlib (pip install matplotlib).
"""
import argparse
import json
import os
import sys

from configurator import UserError, one_line_errors
from files import check_output_file, write_output_file


def read_log(out_dir):
    """The run's log records in order; one line if there is none."""
    path = os.path.join(out_dir, "log.jsonl")
    records = []
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                record = json.loads(line) if line.strip() else {}
                if not isinstance(record, dict):
                    raise UserError(f"{path} line {number} is a JSON {type(record).__name__}, not a record: "
                         "give the out_dir of a train.py or train_ds.py run")
                records.append(record)
    except FileNotFoundError:
        raise UserError(f"{path} not found: give the out_dir of a train.py or train_ds.py run")
    except (OSError, ValueError) as e:
        raise UserError(f"{path} cannot be read ({type(e).__name__}: {e})")
    if not any("loss" in r or "val_loss" in r for r in records):
        raise UserError(f"{path} has no losses yet: plot it after the first logged iteration")
    return records


def series(records, key, x):
    """(xs, ys) of the records that have both x and key."""
    number = lambda value: isinstance(value, (int, float)) and not isinstance(value, bool)
    points = [(r[x], r[key]) for r in records if number(r.get(key)) and number(r.get(x))]
    return [p[0] for p in points], [p[1] for p in points]


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("runs", nargs="+", help="train.py out_dirs")
    parser.add_argument("--out", default="loss.png", help="the PNG to write")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = parser.parse_args(argv)
    if not args.out.endswith(".png"):
        raise UserError(f"--out {args.out} must end in .png")
    check_output_file(args.out, args.overwrite, "--out")
    logs = {run: read_log(run) for run in args.runs}
    try:
        import matplotlib
    except ImportError:
        raise UserError("plot.py needs matplotlib: pip install matplotlib")
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), sharey=True)
    for run, records in logs.items():
        name = os.path.basename(os.path.normpath(run))
        for ax, x in zip(axes, ("iter", "elapsed_s")):
            line, = ax.plot(*series(records, "loss", x), linewidth=0.7, alpha=0.45,
                            label=f"{name} train (one iteration)")
            ax.plot(*series(records, "val_loss", x), marker="o", markersize=3, color=line.get_color(),
                    label=f"{name} val")
    for ax, label in zip(axes, ("iteration", "elapsed seconds (compilation left out)")):
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("loss")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    write_output_file(args.out, lambda f: fig.savefig(f, format="png", dpi=120), f"the plot {args.out}")
    print(f"wrote {args.out}: {len(logs)} run(s)")


if __name__ == "__main__":
    one_line_errors()
    main(sys.argv[1:])
