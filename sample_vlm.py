"""
Ask a vision-language model about images, or score it on held-out records: sample.py's sibling for
train_ds.py's checkpoints.

$ python sample_vlm.py --checkpoint out-vlm/checkpoint-100 --image data/vlm_demo/images/00003.png \
      --prompt "What colour is the shape?"
$ python sample_vlm.py --checkpoint out-vlm/checkpoint-100 --data data/vlm_demo/val.jsonl --output preds.jsonl

--checkpoint is a train_ds.py checkpoint (an adapter: its base model is the one it was trained from,
read from its run_args.json, or --base), a merged folder (--merge-lora's), or any model (hub id or
folder). --data takes train_ds.py's records (LLaVA or messages format): the last assistant turn is the
reference, the turns before it are the question. It prints exact match (after lower-casing and
dropping white space and trailing punctuation) and token F1, and --output writes one JSON line per
record (id, prompt, prediction, reference, correct, f1). Generation uses the model's chat template,
batched with left padding, greedy unless --temperature > 0, and stops at the end of the turn.
"""
import signal
import sys

if __name__ == "__main__":  # Ctrl-C during the slow imports: one line, not a traceback
    signal.signal(signal.SIGINT, lambda *_: sys.exit("interrupted"))

import argparse  # noqa: E402
import json
import os

import torch

from configurator import UserError, check_ranges, one_line_errors
from files import check_output_file, write_output_file
from runtime import resolve_device, resolve_dtype
from vlm_checkpoint import newest_checkpoint
from vlm_data import load_processor, read_samples
from vlm_eval import score, summary
from vlm_model import from_pretrained

RANGES = {"batch_size": "[1, inf)", "max_new_tokens": "[1, inf)", "temperature": "[0, inf)", "limit": "[0, inf)",
          "min_pixels": "[1, inf)", "max_pixels": "[1, inf)", "seed": "[0, 4294967296)"}


def parse_args(argv):
    p = argparse.ArgumentParser(prog="sample_vlm.py", description=__doc__.strip().splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="a train_ds.py checkpoint, a merged folder, or any model")
    p.add_argument("--base", default=None, help="the base model of an adapter checkpoint (default: its run_args.json)")
    p.add_argument("--image", default=None, help="an image to ask about (with --prompt)")
    p.add_argument("--prompt", default=None, help="the question")
    p.add_argument("--data", default=None, help="records to score (.json or .jsonl, as train_ds.py takes them)")
    p.add_argument("--image-folder", default=None, help="image paths of --data are relative to this")
    p.add_argument("--output", default=None, help="predictions .jsonl to write (with --data)")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    p.add_argument("--limit", type=int, default=0, help="score the first N records only (0: all)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--min-pixels", type=int, default=None, help="(default: the checkpoint's, else train_ds.py's)")
    p.add_argument("--max-pixels", type=int, default=None)
    p.add_argument("--use-4bit", action="store_true", help="nf4 weights (bitsandbytes, CUDA): for small GPUs")
    p.add_argument("--fp32", action="store_true",
                   help="(default: bf16 on GPUs that have it, fp16 on others, fp32 on a CPU)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model folder's own Python code")
    p.add_argument("--seed", type=int, default=1337)

    def error(message):
        raise UserError(f"{message} (see python sample_vlm.py --help)")
    p.error = error
    args = p.parse_args(argv)
    check_ranges(vars(args), RANGES, flag=lambda name: "--" + name.replace("_", "-"))
    if (args.image is None) == (args.data is None):
        raise UserError("give --image PATH --prompt TEXT (one question), or --data FILE (records to score)")
    if args.image is not None and not args.prompt:
        raise UserError("--image needs --prompt: the question to ask about it")
    if args.output and not args.data:
        raise UserError("--output writes the predictions of --data: give --data")
    if args.output:
        check_output_file(args.output, args.overwrite, "--output", inputs=[args.data])
    return args


def run_of(checkpoint):
    """A train_ds.py checkpoint's run_args.json, or {} for another folder or a hub id."""
    path = os.path.join(checkpoint, "run_args.json")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            run = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"--checkpoint: cannot read {path} ({e}): it is not a checkpoint of train_ds.py") from None
    if not isinstance(run, dict):
        raise UserError(f"--checkpoint: {path} is not a checkpoint of train_ds.py's run_args.json")
    return run


def load(args, device):
    """(model, processor): an adapter on its base, or a whole model; in eval mode on device. An --output-dir
    of train_ds.py stands for its newest checkpoint."""
    if not any(os.path.isfile(os.path.join(args.checkpoint, name)) for name in ("adapter_config.json", "config.json")):
        args.checkpoint = newest_checkpoint(args.checkpoint) or args.checkpoint
    adapter = os.path.isfile(os.path.join(args.checkpoint, "adapter_config.json"))
    run = run_of(args.checkpoint)
    base = args.base or run.get("model")
    if adapter and not isinstance(base, str):
        raise UserError(f"--checkpoint {args.checkpoint} is an adapter whose base model is unknown (no run_args.json): "
                        "pass --base")
    whole_model = os.path.isfile(os.path.join(args.checkpoint, "config.json"))
    if not adapter and os.path.isdir(args.checkpoint) and not whole_model:
        raise UserError(f"--checkpoint {args.checkpoint} holds neither an adapter nor a model (no adapter_config.json, "
                        "no config.json): give a checkpoint-N folder of train_ds.py, a merged folder or a model")
    cuda = device.type == "cuda"
    dtype = torch.float32 if args.fp32 or not cuda else getattr(torch, resolve_dtype("auto", "cuda"))
    kwargs = dict(dtype=dtype, trust_remote_code=args.trust_remote_code)
    if args.use_4bit:
        if not cuda:
            raise UserError("--use-4bit needs a CUDA GPU (bitsandbytes' 4-bit kernels): drop it on a CPU")
        from transformers import BitsAndBytesConfig
        kwargs.update(device_map={"": device}, quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype))
    model = from_pretrained(base if adapter else args.checkpoint, **kwargs)
    trained_on = run.get("model_type")  # what the adapter was trained on (run_args.json of newer checkpoints)
    if adapter and trained_on and model.config.model_type != trained_on:
        raise UserError(f"the adapter in {args.checkpoint} was trained on a {trained_on} model, but {base} is a "
                        f"{model.config.model_type}: pass the --base it was trained on")
    if adapter:
        from peft import PeftModel
        try:
            model = PeftModel.from_pretrained(model, args.checkpoint)
        except Exception as e:  # a base of another architecture or size: peft's error is long
            raise UserError(f"the adapter in {args.checkpoint} does not fit the base model {base} "
                            f"({type(e).__name__}): pass the --base it was trained on") from None
    if not args.use_4bit:
        model.to(device)
    min_pixels = args.min_pixels or run.get("min_pixels") or 256 * 28 * 28
    max_pixels = args.max_pixels or run.get("max_pixels") or 1280 * 28 * 28
    processor = load_processor(args.checkpoint if os.path.isdir(args.checkpoint) else base or args.checkpoint,
                               args.trust_remote_code, min_pixels, max_pixels)
    return model.eval(), processor


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    if args.data:
        samples = read_samples(args.data, args.image_folder)[:args.limit or None]
    else:
        question = [{"type": "image"}, {"type": "text", "text": args.prompt}]
        samples = [([{"role": "user", "content": question}, {"role": "assistant", "content": ""}], [args.image],
                    f"--image {args.image}")]
    device = torch.device(resolve_device(args.device)[0])
    model, processor = load(args, device)
    if args.image:
        print(score(model, processor, samples, device, 1, args.max_new_tokens, args.temperature)[0]["prediction"])
        return
    from tqdm import tqdm
    records = score(model, processor, samples, device, args.batch_size, args.max_new_tokens, args.temperature,
                    progress=lambda batches: tqdm(batches, desc="batches", unit="batch", leave=False))
    exact, f1 = summary(records)
    print(f"{len(records)} records: exact match {exact:.4f}, token F1 {f1:.4f}")
    if args.output:
        lines = "".join(json.dumps(record) + "\n" for record in records)
        write_output_file(args.output, lambda f: f.write(lines.encode()), f"the predictions {args.output}")
        print(f"wrote {args.output}")
    return records


if __name__ == "__main__":
    one_line_errors()
    main()
