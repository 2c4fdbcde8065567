"""
Time train_ds.py's start-up check of a data file, in samples/s on this machine: before (a full
encode of every sample: image decode, the processor, labels; the old way and still the fallback)
and after (image sizes from the file headers, the tokenizer, the processor's token arithmetic),
then with the cache a resume reads. One JSON line.

$ python bench_vlm_data.py --samples 10000 --folder /tmp/vlm-bench

The processor is Qwen2-VL-2B's (written by tests/vlm_fixtures.py: its pixel budget, no download);
the samples are synthetic_samples' noise images with a question and an answer. The full encode
runs on the first --full-samples only: it is the slow one.
"""
import argparse
import datetime
import json
import os
import sys
import time

import torch
import transformers

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "tests"))
from vlm_fixtures import write_qwen2_vl  # noqa: E402

import vlm_data  # noqa: E402
from hardware import cpu_name  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--samples", type=int, default=10000)
parser.add_argument("--full-samples", type=int, default=1000, help="how many the full encode times")
parser.add_argument("--image-size", type=int, default=448)
parser.add_argument("--folder", required=True, help="images, model and cache go here (kept for a second run)")
args = parser.parse_args()

model = os.path.join(args.folder, "qwen2-vl-2b")
if not os.path.exists(os.path.join(model, "config.json")):
    write_qwen2_vl(model, size="2b", weights=False)
samples = vlm_data.synthetic_samples(os.path.join(args.folder, "images"), args.samples, args.image_size, 20, seed=0)
processor = vlm_data.load_processor(model, False, 256 * 28 * 28, 1280 * 28 * 28)
cache_file = os.path.join(args.folder, "measures.json")
if os.path.exists(cache_file):
    os.remove(cache_file)


def timed(work, count):
    start = time.perf_counter()
    result = work()
    return result, count / (time.perf_counter() - start)


full, full_rate = timed(lambda: [vlm_data.encode([sample], processor) for sample in samples[:args.full_samples]],
                        args.full_samples)
check = lambda: vlm_data.measure_samples("bench", samples, processor, 10 ** 9, False, cache_file)
(_, _, measures), headers_rate = timed(check, args.samples)
vlm_data.save_measures(cache_file, measures)
_, cached_rate = timed(check, args.samples)
assert measures[:args.full_samples] == [[b["input_ids"].shape[1], int((b["labels"] != -100).sum())] for b in full]
print(json.dumps({"bench": "vlm_data_check", "samples": args.samples, "full_encode_samples": args.full_samples,
                  "image_size": args.image_size, "full_encode_samples_per_s": round(full_rate, 1),
                  "headers_samples_per_s": round(headers_rate, 1),
                  "cached_samples_per_s": round(cached_rate, 1), "speedup": round(headers_rate / full_rate, 1),
                  "cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__,
                  "transformers": transformers.__version__, "date": datetime.date.today().isoformat()}))
