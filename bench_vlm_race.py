"""
Race train_ds.py against TRL's SFTTrainer (with peft) on this machine's CPU: the same small random
Qwen2-VL (tests/vlm_fixtures.py's qwen2-vl-small, 32M parameters), the same 448-pixel images and
conversations (data/vlm_demo/prepare.py --size 448), the same LoRA, batch, learning rate and schedule,
and the same batches in the same order. Whole processes, alternating which goes first, several pairs.
Prints each run's samples/s after the warm-up steps, its peak RSS and losses, then the medians.

TRL is not our dependency: install it out of tree and point --trl-path at it (it uses the datasets and
accelerate that our [vlm] extra brings):
$ pip install --no-deps --target /tmp/trl trl
$ python bench_vlm_race.py --trl-path /tmp/trl --folder /tmp/vlm-race --pairs 3

Both count the loss on the assistant's tokens only: ours by its label rule, TRL's by assistant_only_loss
with a copy of the chat template that marks each reply and its <|im_end|> ({% generation %}). So the
first step's losses must agree (the same batch, and LoRA's B starts at zero); after it the two LoRA
initialisations differ, and the losses agree within noise only.
"""
import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time

import peft
import torch
import transformers

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "tests"))
from vlm_fixtures import QWEN_TEMPLATE, write_qwen2_vl  # noqa: E402

import vlm_data  # noqa: E402
from hardware import cpu_name  # noqa: E402

REPO = os.path.dirname(os.path.abspath(__file__))
STEP_LINE = re.compile(r"^step (\d+)(?:/\d+)? \| loss ([\d.]+)")
NOTE_LINE = re.compile(r"^(gradient checkpointing \w+)|([\d,]+) trainable|^trainable parameters: ([\d,]+)")
# the fixture's template with each assistant reply and its end-of-turn marked for TRL's assistant mask
REPLY = ("{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for item in message['content'] %}"
         "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
         "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>")
assert REPLY + "\n" in QWEN_TEMPLATE
TRL_TEMPLATE = QWEN_TEMPLATE.replace(REPLY + "\n", "{% if message['role'] == 'assistant' %}{% generation %}" + REPLY +
                                    "{% endgeneration %}{% else %}" + REPLY + "{% endif %}{{ '\\n' }}")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trl-path", help="a folder holding trl (pip install --no-deps --target FOLDER trl)")
    p.add_argument("--folder", required=True, help="model, images and data go here (kept for the next race)")
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5, help="steps left out of samples/s")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--image-size", type=int, default=448)
    p.add_argument("--num-train", type=int, default=200)
    p.add_argument("--num-workers", type=int, default=0, help="data-loading processes, in both")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="in both (default: each side's own: TRL's on, train_ds.py's on only where memory is short)")
    p.add_argument("--learning-rate", type=float, default=1e-4)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=int, default=32)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--worker", choices=["trl"], help=argparse.SUPPRESS)  # the TRL side, in its own process,
    p.add_argument("--model", help=argparse.SUPPRESS)  # on prepare's model
    p.add_argument("--data", help=argparse.SUPPRESS)  # and data
    return p.parse_args()


def prepare(args):
    """The model folder, the demo data at --image-size, and TRL's copy of it: the same conversations as
    train_ds.py reads them, in the order train_ds.py draws them (vlm_data.train_indices), one row a sample."""
    model, data = os.path.join(args.folder, "qwen2-vl-small"), os.path.join(args.folder, f"data-{args.image_size}")
    if not os.path.exists(os.path.join(model, "config.json")):
        write_qwen2_vl(model, size="small")
    if not os.path.exists(os.path.join(data, "train.json")):
        subprocess.run([sys.executable, os.path.join(REPO, "data", "vlm_demo", "prepare.py"), "--out-dir", data,
                        "--num-train", str(args.num_train), "--num-val", "1", "--size", str(args.image_size)],
                       check=True, stdout=subprocess.DEVNULL)
    samples = vlm_data.read_samples(os.path.join(data, "train.json"))
    order = [i for step in range(args.steps)
             for i in vlm_data.train_indices(step, 0, 1, args.batch_size, len(samples), args.seed)]
    with open(os.path.join(data, "trl.jsonl"), "w") as f:
        for i in order:
            messages, images, _ = samples[i]
            f.write(json.dumps({"messages": messages, "images": images}) + "\n")
    return model, data


def ours(args, model, data, out_dir):
    return [sys.executable, os.path.join(REPO, "train_ds.py"), "--model", model, "--data",
            os.path.join(data, "train.json"), "--no-deepspeed", "--fp32", "--use-lora", "--lora-r", str(args.lora_r),
            "--lora-alpha", str(args.lora_alpha), "--batch-size", str(args.batch_size), "--max-steps",
            str(args.steps), "--save-steps", str(args.steps), "--warmup-steps", "0", "--learning-rate",
            str(args.learning_rate), "--min-pixels", str(args.image_size ** 2), "--max-pixels",
            str(args.image_size ** 2), "--num-workers", str(args.num_workers), "--seed", str(args.seed),
            "--output-dir", out_dir, *checkpointing_flag(args)]


def theirs(args, model, data, out_dir):
    shared = ("steps", "batch_size", "image_size", "num_workers", "learning_rate", "lora_r", "lora_alpha", "seed")
    return [sys.executable, os.path.abspath(__file__), "--worker=trl", f"--model={model}", f"--data={data}",
            f"--folder={out_dir}", *(f"--{name.replace('_', '-')}={getattr(args, name)}" for name in shared),
            *checkpointing_flag(args)]


def checkpointing_flag(args):
    return [] if args.gradient_checkpointing is None else \
        ["--gradient-checkpointing" if args.gradient_checkpointing else "--no-gradient-checkpointing"]


def run(command, env, warmup, batch_size):
    """samples/s from the end of step `warmup` to the last step's line, peak RSS (GiB) of the process, its
    losses by step, and what it said of its trainable parameters and checkpointing. Both sides print a line
    at each step's end, read here as it comes."""
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)
    ends, losses, tail, notes = {}, {}, [], []
    for line in proc.stdout:
        tail = (tail + [line])[-20:]
        note, match = NOTE_LINE.search(line), STEP_LINE.match(line)
        if note:
            notes.append(note.group(1) or f"{note.group(2) or note.group(3)} trainable")
        if match:
            step = int(match.group(1))
            ends[step], losses[step] = time.time(), float(match.group(2))
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0 or warmup not in ends:
        sys.exit(f"error: {' '.join(command[:2])} failed (exit {proc.returncode}):\n{''.join(tail)}")
    last = max(ends)
    speed = (last - warmup) * batch_size / (ends[last] - ends[warmup])
    return speed, usage.ru_maxrss / 2 ** 20, losses, ", ".join(notes)


def trl_worker(args):
    """TRL's SFTTrainer as its documentation sets it up for a VLM, with our run's settings, the batches in
    prepare's order (a sequential sampler) and a line per step in train_ds.py's form."""
    import datasets
    from peft import LoraConfig
    from transformers import Qwen2VLForConditionalGeneration, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    model_path, data = args.model, args.data
    pixels = args.image_size ** 2
    processor = vlm_data.load_processor(model_path, False, pixels, pixels)  # the stock class; no video needed
    rows = [json.loads(line) for line in open(os.path.join(data, "trl.jsonl"))]
    first = rows[0]["messages"]
    assert (processor.apply_chat_template(first, tokenize=False) ==
            processor.apply_chat_template(first, tokenize=False, chat_template=TRL_TEMPLATE))
    processor.chat_template = TRL_TEMPLATE
    dataset = datasets.Dataset.from_list(rows).cast_column("images", datasets.Sequence(datasets.Image()))
    model = Qwen2VLForConditionalGeneration.from_pretrained(model_path, dtype=torch.float32,
                                                            attn_implementation="sdpa")
    lora = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.05,  # train_ds.py's layers
                      target_modules=r".*language_model.*\.(q|k|v|o|gate|up|down)_proj")
    config = SFTConfig(output_dir=args.folder, per_device_train_batch_size=args.batch_size, max_steps=args.steps,
                       learning_rate=args.learning_rate, lr_scheduler_type="cosine_with_min_lr",
                       lr_scheduler_kwargs={"min_lr_rate": 0.1}, warmup_steps=0, weight_decay=0.0,
                       max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
                       bf16=False, fp16=False, dataloader_num_workers=args.num_workers, seed=args.seed,
                       assistant_only_loss=True, max_length=None, disable_tqdm=True,
                       **({} if args.gradient_checkpointing is None else
                          {"gradient_checkpointing": args.gradient_checkpointing}))

    class InOrder(SFTTrainer):
        def _get_train_sampler(self, *_, **__):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    class StepLines(TrainerCallback):
        def on_log(self, _args, state, _control, logs=None, **_):
            if logs and "loss" in logs:
                print(f"step {state.global_step} | loss {logs['loss']:.4f}", flush=True)

    trainer = InOrder(model=model, args=config, train_dataset=dataset, processing_class=processor,
                      peft_config=lora, callbacks=[StepLines()])
    print(f"trainable parameters: {sum(p.numel() for p in trainer.model.parameters() if p.requires_grad):,}")
    trainer.train()


def main():
    args = parse_args()
    if args.worker:
        return trl_worker(args)
    if not args.trl_path or not os.path.isdir(os.path.join(args.trl_path, "trl")):
        sys.exit("error: --trl-path must name a folder holding trl: pip install --no-deps --target FOLDER trl")
    model, data = prepare(args)
    env = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_MODE="disabled")
    sides = {"train_ds.py": (ours, env),
             "TRL SFTTrainer": (theirs, dict(env, PYTHONPATH=os.pathsep.join([args.trl_path, REPO])))}
    results = {name: [] for name in sides}
    trl = next((name[4:-10] for name in os.listdir(args.trl_path) if re.fullmatch(r"trl-.*\.dist-info", name)), "?")
    print(f"{cpu_name()}, {os.cpu_count()} cores | torch {torch.__version__}, transformers {transformers.__version__}, "
          f"peft {peft.__version__}, trl {trl} | {datetime.date.today()} | "
          f"{args.steps} steps of {args.batch_size} samples at {args.image_size}px, samples/s after step "
          f"{args.warmup}, num_workers {args.num_workers}, gradient checkpointing "
          + ("each side's default" if args.gradient_checkpointing is None else str(args.gradient_checkpointing)))
    for pair in range(args.pairs):
        for name in (list(sides) if pair % 2 == 0 else list(sides)[::-1]):  # alternate who goes first
            build, side_env = sides[name]
            with tempfile.TemporaryDirectory() as out_dir:
                speed, rss, losses, notes = run(build(args, model, data, out_dir), side_env, args.warmup,
                                                args.batch_size)
            results[name].append((speed, rss, losses))
            print(f"pair {pair + 1} {name:>15}: {speed:.3f} samples/s, peak RSS {rss:.2f} GiB, loss step 1 "
                  f"{losses[1]:.4f}, last 5 steps {statistics.mean(list(losses.values())[-5:]):.4f} ({notes})",
                  flush=True)
    medians = {name: [statistics.median(r[i] for r in runs) for i in (0, 1)] for name, runs in results.items()}
    (ours_speed, ours_rss), (trl_speed, trl_rss) = medians.values()
    print(f"median: train_ds.py {ours_speed:.3f} samples/s, {ours_rss:.2f} GiB | TRL {trl_speed:.3f} samples/s, "
          f"{trl_rss:.2f} GiB | speed ratio {ours_speed / trl_speed:.2f}x, memory ratio {ours_rss / trl_rss:.2f}x "
          f"({platform.python_version()}, {args.pairs} pairs)")


if __name__ == "__main__":
    main()
