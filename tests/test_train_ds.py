"""
train_ds.py on the CPU with tiny random Qwen2-VL and LLaVA models (see vlm_fixtures.py), loaded
through the script's normal --model path. Most runs call train_ds.main() in this process (a
fresh Python costs ~10 s of imports); the DeepSpeed runs, the kill and signal tests (Ctrl-C while
starting too) and one error check use real processes.
"""
import errno
import fcntl
import glob
import importlib.util
import json
import math
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import (
    REPO,
    assert_one_line_error,
    command,
    fill_up,
    free_port,
    kill_one_torchrun_worker,
    read_log,
    run_script,
    start_script,
    wait_for,
)
from safetensors.torch import load_file
from vlm_fixtures import write_llava, write_no_template_copy, write_qwen2_vl

import train_ds
import vlm_checkpoint
import vlm_data
import vlm_model
from configurator import UserError

TINY_IMAGES = ["--min-pixels", str(56 * 56), "--max-pixels", str(56 * 56)]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm")
    assert run_script("data/vlm_demo/prepare.py", "--out-dir", root / "demo", "--num-train", 12, "--num-val", 4,
                      "--size", 56).returncode == 0
    paths = {"root": root, "qwen": str(write_qwen2_vl(str(root / "qwen"))),
             "llava": str(write_llava(str(root / "llava"))),
             "train": str(root / "demo" / "train.json"), "val": str(root / "demo" / "val.jsonl")}
    paths["args"] = ["--model", paths["qwen"], "--data", paths["train"], *TINY_IMAGES,
                     "--warmup-steps", "0", "--learning-rate", "1e-2", "--seed", "1"]
    return paths


def steps_of(output_dir):
    """The training steps' records of a run's log.jsonl (its evaluations have records of their own)."""
    return [record for record in read_log(output_dir) if "loss" in record]


def error_of(argv):
    """Run main() expecting a user error; return its one line, as the script prints it."""
    with pytest.raises(UserError) as error:
        train_ds.main(argv)
    message = f"error: {error.value}"
    assert_one_line_error((1, message), "")
    return message


def qwen_processor(work):
    return vlm_data.load_processor(work["qwen"], trust_remote_code=False, min_pixels=56 * 56, max_pixels=56 * 56)


# -----------------------------------------------------------------------------
# labels

def test_labels_keep_exactly_the_assistant_replies(work, tmp_path):
    from PIL import Image
    Image.new("RGB", (56, 56), "red").save(tmp_path / "red.png")
    processor = qwen_processor(work)
    messages = [{"role": "user",
                 "content": [{"type": "image"}, {"type": "text", "text": "what colour is the circle?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
                {"role": "user", "content": [{"type": "text", "text": "what shape?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "circle"}]}]
    batch = vlm_data.encode([(messages, [str(tmp_path / "red.png")], "known sample")], processor)
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    tokenizer = processor.tokenizer
    # expected, derived independently: the tokens after each "<|im_start|>assistant\n" through its <|im_end|>
    header = tokenizer("<|im_start|>assistant\n")["input_ids"]
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    expected = []
    for start in range(len(ids)):
        if ids[start:start + len(header)] == header:
            end = ids.index(im_end, start + len(header))
            expected += list(range(start + len(header), end + 1))
    kept = [i for i, label in enumerate(labels) if label != -100]
    assert kept == expected and len(kept) > 0
    assert all(labels[i] == ids[i] for i in kept)
    assert tokenizer.decode([ids[i] for i in kept]) == "red<|im_end|>circle<|im_end|>"
    image_positions = [i for i, t in enumerate(ids) if t == processor.image_token_id]
    assert len(image_positions) == 4 and all(labels[i] == -100 for i in image_positions)  # 56x56 -> 2x2 merged patches


def test_the_stock_qwen_processor_loads_without_torchvision(work, tmp_path):
    from transformers import AutoProcessor
    if importlib.util.find_spec("torchvision") is None:  # as on a fresh .[vlm] install: the stock class cannot build
        with pytest.raises(ImportError, match="(?i)torchvision"):
            AutoProcessor.from_pretrained(work["qwen"])
    processor = qwen_processor(work)
    assert type(processor).__name__ == "Qwen2VLProcessor" and processor.chat_template
    processor.save_pretrained(tmp_path)  # as every checkpoint does: it loads again, by the stock class's name
    with open(tmp_path / "processor_config.json") as f:
        assert json.load(f)["processor_class"] == "Qwen2VLProcessor"
    assert vlm_data.load_processor(str(tmp_path), False, 56 * 56, 56 * 56).image_processor.size["shortest_edge"] \
        == 56 * 56


def llava_processor(work):
    args = train_ds.parse_args(["--model", work["llava"]])
    return vlm_data.load_processor(args.model, args.trust_remote_code, args.min_pixels, args.max_pixels)


def test_llava_labels_keep_the_reply_and_its_end_token(work, tmp_path):
    from PIL import Image
    Image.new("RGB", (28, 28), "blue").save(tmp_path / "blue.png")
    processor = llava_processor(work)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "blue"}]}]
    batch = vlm_data.encode([(messages, [str(tmp_path / "blue.png")], "known sample")], processor)
    kept = batch["input_ids"][0][batch["labels"][0] != -100]
    # llava-1.5's template puts no end token after a reply: we append </s>, so the model learns to stop
    assert processor.tokenizer.decode(kept).strip() == "blue</s>"


def test_llava_replies_get_an_eos_token_appended_and_labelled(work):
    processor = llava_processor(work)
    messages = [{"role": "user", "content": [{"type": "text", "text": "what colour?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "blue"}]},
                {"role": "user", "content": [{"type": "text", "text": "what shape?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "star"}]}]
    assert processor.tokenizer.eos_token not in processor.apply_chat_template(messages, tokenize=False)  # as the hub's
    batch = vlm_data.encode([(messages, [], "two replies")], processor)
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    eos_positions = [i for i, token in enumerate(ids) if token == processor.tokenizer.eos_token_id]
    assert len(eos_positions) == 2 and all(labels[i] == ids[i] for i in eos_positions)  # one per reply, learnt
    # before the next turn
    assert processor.tokenizer.decode(ids[eos_positions[0] + 1:]).startswith(" USER: what shape?")
    assert processor.tokenizer.decode([t for t in labels if t != -100]).replace(" ", "") == "blue</s>star</s>"


def test_training_batches_pad_on_the_right_and_the_tokenizer_keeps_its_side(work):
    processor = qwen_processor(work)
    assert processor.tokenizer.padding_side == "left"  # the fixtures' side, as a model set up for batched generation
    samples = [([{"role": "user", "content": [{"type": "text", "text": text}]},
                 {"role": "assistant", "content": [{"type": "text", "text": "red"}]}], [], text)
               for text in ("what colour is the shape", "hi")]
    batch = vlm_data.encode(samples, processor)
    short = batch["attention_mask"][1].tolist()
    assert short[0] == 1 and short[-1] == 0 and short == sorted(short, reverse=True)  # real tokens, then padding
    assert (batch["labels"][1][batch["attention_mask"][1] == 0] == -100).all()
    assert processor.tokenizer.padding_side == "left"


@pytest.mark.parametrize("arch", ["qwen", "llava"])
def test_a_text_only_batch_gets_a_tiny_masked_image_that_changes_no_loss(work, arch):
    from transformers import AutoModelForImageTextToText
    processor = qwen_processor(work) if arch == "qwen" else llava_processor(work)
    model = AutoModelForImageTextToText.from_pretrained(work[arch], dtype=torch.float32).eval()
    question = {"role": "user", "content": [{"type": "text", "text": "what colour is the sky"}]}
    text_only = [([question, {"role": "assistant", "content": [{"type": "text", "text": answer}]}], [], answer)
                 for answer in ("blue", "red green blue yellow")]
    plain, dummy = vlm_data.encode(text_only, processor), vlm_data.encode(text_only, processor, dummy_image=True)
    added = dummy["input_ids"].shape[1] - plain["input_ids"].shape[1]
    # Qwen: one merged patch, not min-pixels; LLaVA: fixed
    assert "pixel_values" in dummy and added == (1 if arch == "qwen" else 4)
    assert dummy["attention_mask"][:, -added:].sum() == 0 and (dummy["labels"][:, -added:] == -100).all()
    with torch.no_grad():
        losses = [model(**batch, use_cache=False).loss for batch in (plain, dummy)]
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)


def test_long_samples_can_be_skipped_and_are_counted(work, capsys):
    processor = qwen_processor(work)
    records = [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "one two three " * 20}]},
               {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "red"}]}]
    path = write_data(work["root"] / "demo", records, "long.json")
    args = train_ds.parse_args([*work["args"], "--max-length", "60", "--skip-long"])
    samples = vlm_data.measure_samples(path, vlm_data.read_samples(path), processor, args.max_length, args.skip_long)[0]
    assert [where for _, _, where in samples] == [f"{path} record 1"]
    assert f"skipped 1 sample(s) of {path}" in capsys.readouterr().out


@pytest.mark.parametrize("arch", ["qwen", "llava"])
def test_measuring_from_image_headers_gives_the_full_encodings_lengths_and_labels(work, tmp_path, arch):
    from PIL import Image
    for name, size in {"wide.png": (150, 40), "tall.jpg": (30, 200), "big.png": (400, 300)}.items():
        Image.new("RGB", size, "red").save(tmp_path / name)
    turn = lambda role, text: {"from": role, "value": text}
    records = [{"conversations": [turn("human", "hi"), turn("gpt", "red circle")]},  # no image
               {"image": "wide.png", "conversations": [turn("human", "<image>\nwhat is it"), turn("gpt", "a star")]},
               {"image": ["tall.jpg", "big.png"],
                "conversations": [turn("human", "<image> and <image>"), turn("gpt", "two"),
                                  turn("human", "colour?"), turn("gpt", "red and red")]},
               {"images": ["big.png"], "messages": [{"role": "system", "content": "be brief"},
                                                    {"role": "user", "content": "<image>say"},
                                                    {"role": "assistant", "content": "hello"}]}]
    samples = vlm_data.read_samples(write_data(tmp_path, records, "mixed.json"))
    processor = qwen_processor(work) if arch == "qwen" else llava_processor(work)
    full = [vlm_data.encode([sample], processor) for sample in samples]
    assert vlm_data.measure(samples, processor) == [[batch["input_ids"].shape[1], int((batch["labels"] != -100).sum())]
                                                    for batch in full]


def test_a_bad_record_found_by_another_rank_stops_every_rank_with_one_line(work, tmp_path):
    records = json.load(open(work["train"]))[:4]
    records[3]["image"] = "images/nope.png"  # rank 1 of 2 measures records 1 and 3
    data = write_data(work["root"] / "demo", records, "rank1-bad.json")
    result = run_script("train_ds.py", *work["args"], "--data", data, "--use-lora", "--output-dir", tmp_path / "out",
                        torchrun=2, env={"OMP_NUM_THREADS": "1"}, timeout=180)
    assert result.returncode != 0 and 'train_ds.py", line' not in result.stderr, result.stderr[-2000:]  # torchrun's own
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {data} record 3") and "nope.png not found" in errors[0], \
        result.stderr[-3000:]
    assert not (tmp_path / "out").exists()


def test_measures_are_cached_until_the_data_file_changes(work, tmp_path, monkeypatch):
    args = [*work["args"], "--no-deepspeed", "--use-lora", "--max-steps", "1", "--output-dir", str(tmp_path / "out")]
    train_ds.main(args)
    assert len(os.listdir(tmp_path / "out" / "data-cache")) == 1

    def no_measuring(*_):
        raise AssertionError("measured again")
    monkeypatch.setattr(vlm_data, "measure_on_all_ranks", no_measuring)  # not measure: that is in the cache's key
    train_ds.main([*args, "--resume", "--max-steps", "2"])  # the cache: nothing measured
    os.utime(work["train"], ns=(time.time_ns(), time.time_ns()))  # the file changed (its mtime): measured again
    with pytest.raises(AssertionError, match="measured again"):
        train_ds.main([*args, "--resume", "--max-steps", "3"])


@pytest.mark.parametrize("name", ["is_label", "assistant_spans", "with_end_tokens", "assistant_labels", "measure",
                                  "encode"])  # encode: measure's fallback counts labels through it
def test_a_changed_label_rule_invalidates_the_measures_cache(tmp_path, monkeypatch, name):
    data = tmp_path / "train.json"
    data.write_text("[]")
    cache_file = vlm_data.measures_cache(str(tmp_path), str(data), model="m")
    assert vlm_data.measures_cache(str(tmp_path), str(data), model="m") == cache_file  # same rule: same cache
    original = getattr(vlm_data, name)
    monkeypatch.setattr(vlm_data, name, lambda *args: original(*args))  # an edit: other source, as after a code change
    assert vlm_data.measures_cache(str(tmp_path), str(data), model="m") != cache_file


# -----------------------------------------------------------------------------
# bad input: one line naming the problem, non-zero exit, nothing overwritten

def write_data(tmp_path, records, name="bad.json"):
    path = tmp_path / name
    path.write_text(json.dumps(records))
    return str(path)


GOOD_IMAGE = "images/00000.png"
QA = [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]
BAD_DATA = {  # name: (records after two good ones, what the error line must say)
    "missing image": ([{"image": "images/nope.png", "conversations": [
        {"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]}], "nope.png not found"),
    "unreadable image": ([{"image": "broken.png", "conversations": [
        {"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]}], "broken.png is unreadable"),
    "placeholder count": ([{"image": [GOOD_IMAGE, GOOD_IMAGE], "conversations": [
        {"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]}],
        "1 <image> placeholder(s) but 2 image(s)"),
    "empty conversation": ([{"image": GOOD_IMAGE, "conversations": []}], "empty conversation"),
    "too long": ([{"images": [GOOD_IMAGE], "messages": [
        {"role": "user", "content": "<image>q"}, {"role": "assistant", "content": "one two three " * 60}]}],
        "longer than --max-length 150"),
    "no assistant reply": ([{"image": GOOD_IMAGE, "conversations": QA[:1]}], "no assistant reply to learn from"),
    "conversations is a string": ([{"image": GOOD_IMAGE, "conversations": "<image>\nq"}],
                                  "'conversations' must be a list"),
    "conversations is a number": ([{"conversations": 5}], "'conversations' must be a list"),
    "turn is not an object": ([{"conversations": ["q", "a"]}], "'conversations' must be a list of objects"),
    "value is a number": ([{"conversations": [QA[0], {"from": "gpt", "value": 5}]}],
                          "must be a string or a list, not 5"),
    "role is a list": ([{"conversations": [{"from": ["human"], "value": "q"}]}], "unknown role ['human']"),
    "image is a number": ([{"image": 5, "conversations": QA}], "'image' must be an image file name"),
    "images are numbers": ([{"images": [1], "messages": [{"role": "user", "content": "<image>q"}]}],
                           "'images' must be"),
    "messages is an object": ([{"messages": {"role": "user", "content": "q"}}], "'messages' must be a list"),
    "content list of strings": ([{"messages": [{"role": "user", "content": ["q"]}]}], "a content list holds only"),
    "decompression bomb": ([{"image": "big.png", "conversations": QA}], "too large to decode safely"),
    "starts with the assistant": ([{"image": GOOD_IMAGE, "conversations": [QA[1], *QA]}], "starts with the assistant"),
    "extreme aspect ratio": ([{"image": "wide.png", "conversations": QA}], "wide.png (1000x4) cannot be used"),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_stops_with_one_line_naming_file_and_record(work, tmp_path, monkeypatch, case):
    from PIL import Image
    records, expected = BAD_DATA[case]
    data_dir = tmp_path / "data"
    shutil.copytree(work["root"] / "demo" / "images", data_dir / "images")
    (data_dir / "broken.png").write_bytes(b"not a png at all")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 56 * 56)  # PIL refuses over twice that: big.png stands in for a bomb
    Image.new("RGB", (100, 100)).save(data_dir / "big.png")
    Image.new("RGB", (1000, 4)).save(data_dir / "wide.png")  # Qwen's processor takes ratios up to 200
    good = json.load(open(work["train"]))[:2]
    path = write_data(data_dir, good + records)  # the bad record is record 2
    output_dir = tmp_path / "out"
    message = error_of([*work["args"], "--data", path, "--max-length", "150",
                        "--no-deepspeed", "--use-lora", "--output-dir", str(output_dir)])
    assert f"{path} record 2" in message and expected in message
    assert not output_dir.exists()  # failed before writing anything


BAD_SETUP = {  # (extra arguments, the error line); {no_template}, {missing}, {zero3} are filled in
    "model without a chat template": (["--model", "{no_template}", "--no-deepspeed"], "no chat template"),
    "data file missing": (["--data", "{missing}", "--no-deepspeed"], "missing.json not found"),
    "4-bit without LoRA": (["--use-4bit", "--no-deepspeed"], "--use-4bit needs --use-lora: 4-bit weights cannot be "
                                                             "trained directly, only adapters on top of them"),
    "4-bit under ZeRO-3 without a 16-bit storage": (["--use-4bit", "--use-lora", "--deepspeed", "{zero3}"],
                                                    "--use-4bit with ZeRO-3 works only when"),
    "model folder without a tokenizer": (["--model", "{broken}", "--no-deepspeed"], "cannot load a processor from"),
    "model folder with a broken config": (["--model", "{bad_config}", "--no-deepspeed"], "cannot load the model from"),
}


@pytest.mark.parametrize("case", list(BAD_SETUP))
def test_bad_setup_is_one_line(work, tmp_path, case):
    extra, expected = BAD_SETUP[case]
    paths = {"missing": str(tmp_path / "missing.json"), "zero3": os.path.join(REPO, "ds_config_zero3.json"),
             "no_template": str(tmp_path / "no-template"), "broken": str(tmp_path / "broken"),
             "bad_config": str(tmp_path / "bad-config")}
    if "{no_template}" in extra:
        write_no_template_copy(work["qwen"], paths["no_template"])
    if "{broken}" in extra:
        shutil.copytree(work["qwen"], paths["broken"])
        os.remove(os.path.join(paths["broken"], "tokenizer.json"))
    if "{bad_config}" in extra:  # the processor loads; the model's config names a width its weights do not have
        shutil.copytree(work["qwen"], paths["bad_config"])
        config_path = os.path.join(paths["bad_config"], "config.json")
        with open(config_path) as f:
            config = json.load(f)
        config["text_config"]["hidden_size"] *= 2
        with open(config_path, "w") as f:
            json.dump(config, f)
    assert expected in error_of([*work["args"], "--output-dir", str(tmp_path / "out"),
                                 *[a.format(**paths) for a in extra]])


def test_4bit_without_bitsandbytes_says_how_to_install_it(work, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed
    message = error_of([*work["args"], "--output-dir", str(tmp_path / "out"), "--use-4bit", "--use-lora",
                        "--no-deepspeed"])
    assert message == "error: --use-4bit needs bitsandbytes: pip install bitsandbytes"


def test_an_output_dir_with_checkpoints_is_never_trained_over(work, tmp_path):
    base = [*work["args"], "--output-dir", str(tmp_path / "out"), "--no-deepspeed", "--use-lora"]
    (tmp_path / "out" / "checkpoint-3").mkdir(parents=True)
    assert "already holds checkpoints; pass --resume" in error_of(base)
    assert "is not a checkpoint of train_ds.py" in error_of([*base, "--resume"])  # an empty checkpoint folder
    assert os.listdir(tmp_path / "out") == ["checkpoint-3"]  # refused before anything was written


def test_a_new_run_into_a_full_disk_is_one_line(work, small_disk):
    fill_up(small_disk)
    message = error_of([*work["args"], "--no-deepspeed", "--use-lora", "--output-dir", str(small_disk / "out")])
    assert f"cannot write in --output-dir '{small_disk / 'out'}' (No space left on device" in message


def test_no_deepspeed_under_a_launcher_of_several_processes_is_refused(work, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun --nproc_per_node=2 puts in the environment
    output_dir = tmp_path / "out"
    message = error_of([*work["args"], "--no-deepspeed", "--use-lora", "--output-dir", str(output_dir)])
    assert "--no-deepspeed runs one process, but the launcher started 2" in message
    assert not output_dir.exists()


def test_cli_error_exits_nonzero_without_traceback(work, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    result = run_script("train_ds.py", "--no-deepspeed", "--data", bad, "--output-dir", tmp_path / "out", cwd=tmp_path)
    assert_one_line_error(result, f"error: {bad} is not valid JSON")
    assert len(result.stderr.strip().splitlines()) == 1


BAD_FLAGS = [  # (flags added to a good command line, exit code, what the one error line must say)
    (["--max-length", "0"], 1, "--max-length must be in [1, inf)"),
    (["--min-pixels", "0"], 1, "--min-pixels must be in"),
    (["--min-pixels", "3136", "--max-pixels", "784"], 1, "--max-pixels 784 is below --min-pixels 3136"),
    (["--use-lora", "--lora-r", "0"], 1, "--lora-r must be in"),
    (["--use-lora", "--lora-alpha", "0"], 1, "--lora-alpha must be in"),
    (["--use-lora", "--lora-dropout", "1"], 1, "--lora-dropout must be in"),
    (["--batch-size", "0"], 1, "--batch-size must be in"),
    (["--gradient-accumulation-steps", "0"], 1, "--gradient-accumulation-steps must be in"),
    (["--learning-rate=-1e-4"], 1, "--learning-rate must be in [0, inf), got -0.0001"),
    (["--learning-rate", "nan"], 1, "--learning-rate must be in [0, inf), got nan"),
    (["--weight-decay", "-0.1"], 1, "--weight-decay must be in"),
    (["--warmup-steps", "-1"], 1, "--warmup-steps must be in"),
    (["--grad-clip", "-1"], 1, "--grad-clip must be in [0, inf)"),  # would be gradient ascent
    (["--epochs", "0"], 1, "--epochs must be in"),
    (["--max-steps", "0"], 1, "--max-steps must be in"),  # used to train a whole epoch
    (["--max-nonfinite-steps", "0"], 1, "--max-nonfinite-steps must be in"),
    (["--save-steps", "0"], 1, "--save-steps must be in"),
    (["--log-steps", "0"], 1, "--log-steps must be in"),  # used to divide by zero
    (["--keep-last", "0"], 1, "--keep-last must be in"),  # 0 and -1 used to delete every checkpoint
    (["--keep-last", "-1"], 1, "--keep-last must be in"),
    (["--seed", "-1"], 1, "--seed must be in"),
    (["--seed", "4294967296"], 1, "--seed must be in"),
    (["--benchmark", "--benchmark-image-size", "27"], 1, "--benchmark-image-size must be in [28, 8192]"),
    (["--benchmark", "--benchmark-image-size", "8193"], 1, "--benchmark-image-size must be in [28, 8192]"),
    (["--benchmark", "--benchmark-text-words", "0"], 1, "--benchmark-text-words must be in"),
    (["--lora-r", "two"], 1, "argument --lora-r: invalid int value: 'two'"),
    (["--lora-target-modules", "q_proj"], 1, "--lora-target-modules needs --use-lora"),
    (["--modules-to-save", "lm_head"], 1, "--modules-to-save needs --use-lora"),
    (["--vision-lora"], 1, "--vision-lora needs --use-lora"),
    (["--projector-lr", "1e-5"], 1, "--projector-lr needs --train-projector"),
    (["--vision-lr", "1e-5", "--use-lora"], 1, "--vision-lr needs --train-vision or --vision-lora"),
    (["--train-vision", "--vision-lora", "--use-lora"], 1, "choose one"),
    (["--projector-lr", "-1", "--train-projector"], 1, "--projector-lr must be in [0, inf)"),
    (["--attn-implementation", "flash_attention_2"], 1, "flash_attention_2 needs a GPU, a 16-bit dtype"),
    (["--attn-implementation", "magic"], 1, "invalid choice"),
    (["--output-dir", "{tmp}/a-file"], 1, "is a file, not a folder"),
    (["--data", "{tmp}/folder.json"], 1, "is a folder"),
    (["--data", "{tmp}/latin1.jsonl"], 1, "latin1.jsonl is not UTF-8 text"),
    (["--eval-data", "{tmp}/latin1.jsonl"], 1, "latin1.jsonl is not UTF-8 text"),
    (["--data", "{tmp}/bad-line.jsonl"], 1, "bad-line.jsonl line 2 is not valid JSON"),
    (["--data", "{tmp}/numbers.json"], 1, "numbers.json record 0 is a JSON int, not an object"),
    (["--deepspeed", "{tmp}/list.json"], 1, "a DeepSpeed config is a JSON object"),
    (["--data", "{tmp}/empty.json"], 1, "empty.json holds no records"),
    (["--eval-data", "{tmp}/empty.jsonl"], 1, "empty.jsonl holds no records"),
]


def write_bad_files(folder):
    (folder / "a-file").write_text("not a folder")
    (folder / "folder.json").mkdir()
    (folder / "latin1.jsonl").write_bytes('{"messages": "caf\xe9"}\n'.encode("latin-1"))
    (folder / "bad-line.jsonl").write_text('{"messages": []}\n{"messages": [\n')
    (folder / "numbers.json").write_text("[1, 2]")
    (folder / "list.json").write_text("[]")
    (folder / "empty.json").write_text("[]")
    (folder / "empty.jsonl").write_text("\n")


@pytest.mark.parametrize("extra, code, expected", BAD_FLAGS, ids=[" ".join(extra) for extra, _, _ in BAD_FLAGS])
def test_bad_flags_stop_with_one_line_before_anything_is_written(work, tmp_path, extra, code, expected):
    write_bad_files(tmp_path)
    output_dir = tmp_path / "out"
    # each fails before the processor and model load: milliseconds
    message = error_of([*work["args"], "--output-dir", str(output_dir), *(a.format(tmp=tmp_path) for a in extra)])
    assert code == 1 and expected in message, message
    assert not output_dir.exists()


@pytest.mark.parametrize("extra, expected", [
    (["--lora-target-modules", "no_such_layer"], "--lora-target-modules no_such_layer: no linear layer of that name"),
    (["--lora-target-modules", "visual"], "--lora-target-modules visual: no linear layer of that name"),  # a tower
    (["--lora-target-modules", "qkv"], "no linear layer of that name in the language model"),  # a vision layer's name
    (["--modules-to-save", "no_such_module"], "--modules-to-save no_such_module: "),  # peft would ignore it
    (["--lora-r", "100"], "--lora-r 100 is above the narrowest adapted layer's width (32)"),
])
def test_lora_settings_peft_cannot_apply_are_one_line(work, tmp_path, extra, expected):
    output_dir = tmp_path / "out"
    message = error_of([*work["args"], "--no-deepspeed", "--use-lora", *extra, "--output-dir", str(output_dir)])
    assert expected in message
    assert os.listdir(output_dir) == [".lock"]  # only the model knows its modules, but nothing was written yet


def test_a_second_run_on_the_same_output_dir_is_refused(work, tmp_path):
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    # as the first run holds it; flock locks belong to an open file, so one held here conflicts in-process too
    with open(output_dir / ".lock", "a+") as first_run:
        fcntl.flock(first_run, fcntl.LOCK_EX | fcntl.LOCK_NB)
        first_run.write("4242\n")
        first_run.flush()
        message = error_of([*work["args"], "--no-deepspeed", "--use-lora", "--output-dir", str(output_dir)])
    assert "another run (pid 4242) is using --output-dir" in message
    assert os.listdir(output_dir) == [".lock"]


def test_ctrl_c_while_starting_is_one_line_without_traceback(tmp_path):
    process = start_script("train_ds.py", "--no-deepspeed", "--output-dir", tmp_path / "out")
    # torch's libraries mapped: the script is inside `import torch`, past its first lines, ~0.3 s after the start
    assert wait_for(lambda: process.poll() is not None
                    or "libtorch" in Path(f"/proc/{process.pid}/maps").read_text(), 60)
    process.send_signal(signal.SIGINT)
    stderr = process.communicate(timeout=60)[1]
    assert process.returncode != 0 and "Traceback" not in stderr, stderr
    assert stderr.strip().splitlines()[-1] == "interrupted while starting: nothing was trained"
    assert not (tmp_path / "out").exists()


# -----------------------------------------------------------------------------
# training, resume, merge

@pytest.fixture(scope="module")
def lora_run(work):
    output_dir = str(work["root"] / "lora")
    args = [*work["args"], "--no-deepspeed", "--use-lora", "--batch-size", "2", "--max-steps", "8", "--save-steps", "4",
            "--eval-data", work["val"]]
    train_ds.main([*args, "--output-dir", output_dir])
    return args, output_dir


def test_gradient_checkpointing_changes_no_loss_and_by_default_is_off_here(lora_run, tmp_path, capsys):
    args, _ = lora_run
    for name, flags in (("default", []), ("on", ["--gradient-checkpointing"])):
        train_ds.main([*args, "--max-steps", "3", *flags, "--output-dir", str(tmp_path / name)])
        said = capsys.readouterr().out
        assert ("gradient checkpointing off: without it this run needs" in said) == (name == "default")  # tiny
    losses = {name: [r["loss"] for r in steps_of(tmp_path / name)] for name in ("default", "on")}
    assert len(losses["on"]) == 3 and losses["on"] == pytest.approx(losses["default"], rel=1e-5)


def test_plot_draws_a_train_ds_run_with_its_losses_and_eval_losses(lora_run, tmp_path):
    import plot
    _, output_dir = lora_run
    records = plot.read_log(output_dir)
    iters, losses = plot.series(records, "loss", "iter")
    assert iters == list(range(1, 9)) and all(math.isfinite(loss) for loss in losses)
    assert plot.series(records, "val_loss", "iter")[0] == [4, 8]  # an eval at each save
    assert len(plot.series(records, "val_loss", "elapsed_s")[0]) == 2
    plot.main([output_dir, "--out", str(tmp_path / "vlm.png")])
    assert (tmp_path / "vlm.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_label_token_weighs_the_same_across_micro_batches_and_in_eval(work, tmp_path, capsys):
    # #12 bug 6: replies of 1 and 12 words; a step of two micro-batches of 1 must equal one batch of 2
    # (its loss is the mean over the batch's label tokens), and so must the eval loss at batch sizes 1 and 2
    records = [{"image": GOOD_IMAGE, "conversations": [{"from": "human", "value": "<image>\nwhat is it"},
                                                      {"from": "gpt", "value": "red circle on the stage " * words}]}
               for words in (1, 12, 3, 7)]
    data = write_data(work["root"] / "demo", records, "uneven.json")
    base = [*work["args"], "--data", data, "--eval-data", data, "--no-deepspeed", "--use-lora", "--lora-dropout", "0",
            "--max-steps", "1", "--num-workers", "0"]
    runs = {}
    for name, flags in {"micro": ["--batch-size", "1", "--gradient-accumulation-steps", "2"],
                        "batch": ["--batch-size", "2"]}.items():
        train_ds.main([*base, *flags, "--output-dir", str(tmp_path / name)])
        eval_loss = float(capsys.readouterr().out.split("eval loss ")[1].split()[0])
        adapter = load_file(str(tmp_path / name / "checkpoint-1" / "adapter_model.safetensors"))
        runs[name] = (steps_of(str(tmp_path / name))[0]["loss"], eval_loss, adapter)
    assert runs["micro"][0] == pytest.approx(runs["batch"][0], rel=1e-5)
    assert runs["micro"][1] == pytest.approx(runs["batch"][1], abs=1e-4)  # printed with 4 decimals
    for name, weight in runs["batch"][2].items():
        torch.testing.assert_close(runs["micro"][2][name], weight, rtol=1e-4, atol=1e-6)


def test_loader_workers_give_the_same_losses_as_none(lora_run, tmp_path):
    args, output_dir = lora_run  # trained with the default --num-workers 2
    train_ds.main([*args, "--num-workers", "0", "--output-dir", str(tmp_path / "no-workers")])
    assert [e["loss"] for e in steps_of(str(tmp_path / "no-workers"))] == [e["loss"] for e in steps_of(output_dir)]


def test_a_data_error_met_in_a_loader_worker_stops_with_its_one_line(work, tmp_path):
    samples = vlm_data.read_samples(work["train"])
    samples[0] = (samples[0][0], [str(tmp_path / "gone.png")], "record 0")  # deleted after validation
    data = SimpleNamespace(processor=qwen_processor(work), dummy_image=False, lock=None)
    batches = train_ds.loader(samples, lambda i: [i], [1, 0], data, SimpleNamespace(num_workers=1, seed=0),
                              torch.device("cpu"))
    assert next(batches)["input_ids"].shape[0] == 1
    with pytest.raises(UserError) as error:
        next(batches)
    assert_one_line_error((1, f"error: {error.value}"), "error: record 0: image")
    assert "gone.png not found" in str(error.value)


def test_an_image_that_fails_to_decode_in_training_is_one_line(work, tmp_path):
    # a truncated PNG: its header (all the data check reads) is whole, its pixels are not
    png = (work["root"] / "demo" / "images" / "00000.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(png[:len(png) // 2])
    data = write_data(tmp_path, [{"image": "cut.png", "conversations": QA}])
    message = error_of([*work["args"], "--data", data, "--no-deepspeed", "--use-lora", "--num-workers", "0",
                        "--output-dir", str(tmp_path / "out")])
    assert "record 0: image" in message and "cut.png is unreadable" in message
    assert not glob.glob(str(tmp_path / "out" / "checkpoint-*"))


def test_a_resume_refuses_another_model_or_adapter_and_notes_another_data_order(work, lora_run, tmp_path, capsys):
    args, output_dir = lora_run
    resume = ["--resume", os.path.join(output_dir, "checkpoint-8"), "--output-dir", str(tmp_path / "new")]
    llava = [a if a != work["qwen"] else work["llava"] for a in args]
    assert f"was trained from --model {work['qwen']}, not {work['llava']}" in error_of([*llava, *resume])
    assert "was trained with --lora-r 16, this run has 8" in error_of([*args, *resume, "--lora-r", "8"])
    message = error_of([*args, *resume, "--batch-size", "1", "--max-steps", "4"])  # noted, then refused: past the end
    assert "is at step 8, past this run's 4 steps: raise --max-steps" in message
    assert "note: batch size 1 where" in capsys.readouterr().out
    assert os.listdir(tmp_path / "new") == [".lock"]  # nothing written


def test_merging_never_trusts_remote_code_because_a_checkpoint_says_so(work, lora_run, tmp_path, monkeypatch):
    checkpoint = shutil.copytree(os.path.join(lora_run[1], "checkpoint-8"), tmp_path / "checkpoint")
    run_args = json.loads((checkpoint / "run_args.json").read_text())
    (checkpoint / "run_args.json").write_text(json.dumps(dict(run_args, trust_remote_code=True)))
    asked = []
    monkeypatch.setattr(vlm_checkpoint, "from_pretrained",
                        lambda path, **kwargs: asked.append(kwargs) or sys.exit("stop"))
    with pytest.raises(SystemExit):
        train_ds.main(["--merge-lora", str(checkpoint)])
    assert asked[0]["trust_remote_code"] is False


def test_checkpoints_keep_the_base_models_padding_side(work, lora_run):
    _, output_dir = lora_run
    base = json.load(open(os.path.join(work["qwen"], "tokenizer_config.json")))["padding_side"]
    saved = json.load(open(os.path.join(output_dir, "checkpoint-8", "tokenizer_config.json")))["padding_side"]
    assert base == saved == "left"  # training pads right per call: generation from the checkpoint pads as the base


def test_lora_run_loss_falls_and_checkpoints_hold_everything(lora_run):
    _, output_dir = lora_run
    losses = [entry["loss"] for entry in steps_of(output_dir)]
    assert len(losses) == 8 and sum(losses[-2:]) / 2 < losses[0] - 0.2, losses
    entry = steps_of(output_dir)[-1]
    assert entry["samples_per_s"] > 0 and entry["tokens_per_s"] > 0 and entry["peak_memory_gib"] > 0
    assert sorted(n for n in os.listdir(output_dir) if "checkpoint" in n) == ["checkpoint-4", "checkpoint-8"]
    files = set(os.listdir(os.path.join(output_dir, "checkpoint-8")))
    assert {"adapter_model.safetensors", "adapter_config.json", "run_args.json", "tokenizer.json",
            "processor_config.json", "trainer_state.pt", "rng_state_0.pt"} <= files
    adapter = load_file(os.path.join(output_dir, "checkpoint-8", "adapter_model.safetensors"))
    assert adapter and all(t.numel() > 0 for t in adapter.values())
    assert not any("visual" in name for name in adapter)  # the vision tower stays frozen


def test_resume_continues_at_the_same_step_with_identical_losses(lora_run, tmp_path):
    args, output_dir = lora_run
    resumed_dir = str(tmp_path / "resumed")
    shutil.copytree(output_dir, resumed_dir)
    shutil.rmtree(os.path.join(resumed_dir, "checkpoint-8"))  # as if killed between the two saves
    for name in (".tmp-checkpoint-7", ".tmp-checkpoint-3-old", ".tmp-checkpoint-notes"):  # two of ours, one a user's
        os.makedirs(os.path.join(resumed_dir, name))
    open(os.path.join(resumed_dir, f".log.jsonl.tmp{os.getpid() + 1}"), "w").close()  # a rewrite cut short by a kill
    train_ds.main([*args, "--output-dir", resumed_dir, "--resume", "--keep-last", "1"])
    original, resumed = steps_of(output_dir), steps_of(resumed_dir)
    assert [e["iter"] for e in resumed if "loss" in e] == list(range(1, 9))
    assert [e["loss"] for e in resumed[4:]] == [e["loss"] for e in original[4:]]  # bit-identical
    assert sorted(n for n in os.listdir(resumed_dir) if "checkpoint" in n) == [".tmp-checkpoint-notes", "checkpoint-8"]
    assert sorted(n for n in os.listdir(resumed_dir) if "log" in n) == ["log.jsonl"]


def no_space_left(error):
    def write(*args, **kwargs):
        raise error
    return write


FULL_DISK = {  # which write fails, and how its library reports a full disk
    "processor (tokenizers: a bare Exception)": ("transformers.ProcessorMixin.save_pretrained",
                                                 Exception("No space left on device (os error 28)")),
    "trainer state (torch, via utils: OSError)": ("train_ds.atomic_torch_save",
                                                  OSError(errno.ENOSPC, "No space left on device")),
}


@pytest.mark.parametrize("case", list(FULL_DISK))
def test_a_full_disk_while_saving_is_one_line_and_keeps_the_last_checkpoint(lora_run, tmp_path, monkeypatch, case):
    args, output_dir = lora_run
    full = str(tmp_path / "full")
    shutil.copytree(output_dir, full)
    checkpoint = os.path.join(full, "checkpoint-8")
    before = {name: open(os.path.join(checkpoint, name), "rb").read() for name in os.listdir(checkpoint)}
    target, error = FULL_DISK[case]
    monkeypatch.setattr(target, no_space_left(error))
    message = error_of([*args, "--output-dir", full, "--resume", "--max-steps", "9"])
    assert message.startswith("error: could not save checkpoint-9 (No space left on device")
    assert message.endswith(" MiB free); the previous checkpoint is intact: free disk space and resume")
    assert vlm_checkpoint.checkpoint_steps(full) == [4, 8] \
        and not os.path.exists(os.path.join(full, ".tmp-checkpoint-9"))
    assert {name: open(os.path.join(checkpoint, name), "rb").read() for name in os.listdir(checkpoint)} == before


def test_grad_clip_0_means_no_clipping_and_trains(work, tmp_path):
    output_dir = str(tmp_path / "no-clip")
    train_ds.main([*work["args"], "--no-deepspeed", "--use-lora", "--grad-clip", "0", "--max-steps", "2",
                   "--output-dir", output_dir])
    assert all(math.isfinite(entry["loss"]) for entry in steps_of(output_dir))
    adapter = load_file(os.path.join(output_dir, "checkpoint-2", "adapter_model.safetensors"))
    lora_b = [t for name, t in adapter.items() if "lora_B" in name]
    # they start at zero: a clip to norm 0 would keep them there
    assert lora_b and all(t.abs().sum() > 0 for t in lora_b)


def test_resume_auto_starts_a_new_run_and_continues_an_interrupted_one(lora_run, tmp_path):
    args, output_dir = lora_run
    interrupted = str(tmp_path / "interrupted")
    shutil.copytree(output_dir, interrupted)
    shutil.rmtree(os.path.join(interrupted, "checkpoint-8"))  # killed between its two saves
    train_ds.main([*args, "--output-dir", interrupted, "--resume", "auto"])
    assert [e["loss"] for e in steps_of(interrupted)] == [e["loss"] for e in steps_of(output_dir)]
    fresh = str(tmp_path / "fresh")  # the same flag on an empty folder: a new run
    train_ds.main([*args, "--output-dir", fresh, "--resume", "auto", "--max-steps", "2", "--save-steps", "2"])
    assert sorted(os.listdir(fresh)) == [".lock", "checkpoint-2", "data-cache", "log.jsonl"]


# -----------------------------------------------------------------------------
# long runs (train.py's: tests/test_long_runs.py): a save on a clock, a time budget, data wait, GPU telemetry

def test_save_minutes_saves_between_save_steps(work, tmp_path):
    output_dir = str(tmp_path / "clock")
    train_ds.main([*work["args"], "--no-deepspeed", "--use-lora", "--max-steps", "4", "--save-steps", "1000",
                   "--save-minutes", "0.00001", "--keep-last", "10", "--output-dir", output_dir])
    saved = vlm_checkpoint.checkpoint_steps(output_dir)
    assert len(saved) >= 3 and saved[-1] == 4  # without the clock: only 4, the last step


def test_max_hours_saves_exits_cleanly_and_resumes_exactly(lora_run, tmp_path, capsys):
    args, output_dir = lora_run
    limited = str(tmp_path / "limited")
    command = [*args, "--output-dir", limited, "--resume", "auto"]
    train_ds.main([*command, "--max-hours", "0.00003", "--price-per-hour", "3.6"])  # returns: exit status 0
    assert "is near: saved after step" in capsys.readouterr().out
    assert vlm_checkpoint.checkpoint_steps(limited)[-1] < 8
    costs = steps_of(limited)  # 3.6 $/h: a thousandth of a dollar a second
    assert all(abs(r["cost_usd"] - r["elapsed_s"] / 1000) < 0.002 for r in costs)
    train_ds.main(command)
    assert [e["loss"] for e in steps_of(limited)] == [e["loss"] for e in steps_of(output_dir)]


def stand_in_nvml(folder):
    from test_long_runs import STAND_IN_NVML
    path = folder / "pynvml.py"
    path.write_text(STAND_IN_NVML)
    spec = importlib.util.spec_from_file_location("pynvml", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_slow_loader_and_busy_gpus_reach_the_log_with_one_hint(work, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("STAND_IN_UTIL", "95")
    monkeypatch.setitem(sys.modules, "pynvml", stand_in_nvml(tmp_path))
    encode = vlm_data.Batches.__getitem__

    def slow(self, i):
        time.sleep(0.5)
        return encode(self, i)
    monkeypatch.setattr(vlm_data.Batches, "__getitem__", slow)
    output_dir = str(tmp_path / "slow")
    train_ds.main([*work["args"], "--no-deepspeed", "--use-lora", "--max-steps", "4", "--num-workers", "0",
                   "--output-dir", output_dir])
    records = steps_of(output_dir)
    assert min(r["data_wait"] for r in records) > 0.5 and records[-1]["gpu_util"] == [95, 95]
    output = capsys.readouterr().out
    assert output.count("of the time goes to waiting for the next batch: raise --num-workers") == 1
    assert "gpu 95% 3.0GiB 60C 250W" in output and "under 80% busy" not in output


def test_the_data_wait_of_a_normal_run_is_small(lora_run):
    # a slowed loader waits > 0.5 (above). This tiny model's steps are short, so beside another test process
    # the loader's share of them varies: a normal run's median was 0.118 in one CI run
    assert statistics.median(r["data_wait"] for r in steps_of(lora_run[1])) < 0.25


def test_merging_an_output_dir_merges_its_newest_checkpoint(lora_run, tmp_path, capsys):
    _, output_dir = lora_run
    train_ds.main(["--merge-lora", output_dir, "--output-dir", str(tmp_path / "merged")])
    assert f"merged {os.path.join(output_dir, 'checkpoint-8')} into" in capsys.readouterr().out


def test_merged_model_loads_and_matches_adapter_logits(work, lora_run):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText
    _, output_dir = lora_run
    checkpoint = os.path.join(output_dir, "checkpoint-8")
    os.makedirs(checkpoint + "-merged.tmp")  # a user's folder, named as the merge's temp folder used to be
    open(os.path.join(checkpoint + "-merged.tmp", "notes.txt"), "w").close()
    train_ds.main(["--merge-lora", checkpoint])
    assert os.listdir(checkpoint + "-merged.tmp") == ["notes.txt"]
    assert not [name for name in os.listdir(output_dir) if ".tmp" in name and name != "checkpoint-8-merged.tmp"]
    processor = qwen_processor(work)
    batch = vlm_data.encode(vlm_data.read_samples(work["train"])[:2], processor)
    adapter = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(work["qwen"]), checkpoint).eval()
    merged = AutoModelForImageTextToText.from_pretrained(checkpoint + "-merged").eval()
    base = AutoModelForImageTextToText.from_pretrained(work["qwen"]).eval()
    with torch.no_grad():
        adapter_logits, merged_logits, base_logits = (m(**batch).logits for m in (adapter, merged, base))
    torch.testing.assert_close(merged_logits, adapter_logits, rtol=1e-4, atol=1e-4)
    assert (base_logits - adapter_logits).abs().max() > 1e-2  # the adapter did change something
    merged_config = json.load(open(os.path.join(checkpoint + "-merged", "config.json")))
    assert merged_config.get("use_cache") == json.load(open(os.path.join(work["qwen"], "config.json"))).get("use_cache")
    assert json.load(open(os.path.join(checkpoint + "-merged", "tokenizer_config.json")))["padding_side"] == "left"


def test_merge_keeps_the_base_models_dtype(work, lora_run, tmp_path):
    from transformers import AutoModelForImageTextToText
    _, output_dir = lora_run
    base = str(tmp_path / "bf16-base")  # a base saved in bfloat16, as most hub models are
    shutil.copytree(work["qwen"], base)
    AutoModelForImageTextToText.from_pretrained(work["qwen"], dtype=torch.bfloat16).save_pretrained(base)
    checkpoint = str(tmp_path / "checkpoint-8")
    shutil.copytree(os.path.join(output_dir, "checkpoint-8"), checkpoint)
    run_args = json.load(open(os.path.join(checkpoint, "run_args.json")))
    json.dump(dict(run_args, model=base), open(os.path.join(checkpoint, "run_args.json"), "w"))
    train_ds.main(["--merge-lora", checkpoint])  # on a CPU, where the training default is fp32
    merged = load_file(os.path.join(checkpoint + "-merged", "model.safetensors"))
    assert {t.dtype for t in merged.values()} == {torch.bfloat16}


def test_full_finetune_checkpoint_keeps_the_base_config_and_its_vision_side(work, tmp_path, monkeypatch):
    output_dir, gathers = str(tmp_path / "full"), []
    gather = vlm_checkpoint.gathered_state_dict
    monkeypatch.setattr(vlm_checkpoint, "gathered_state_dict", lambda *a, **k: gathers.append(1) or gather(*a, **k))
    train_ds.main([*work["args"], "--no-deepspeed", "--max-steps", "1", "--output-dir", output_dir])
    assert len(gathers) == 1  # the weights are gathered once per save (ZeRO-3 gathers cost a full model each)
    base, model = (load_file(os.path.join(folder, "model.safetensors"))
                   for folder in (work["qwen"], output_dir + "/checkpoint-1"))
    assert changed(base, model, "language") and not changed(base, model, "vision") \
        and not changed(base, model, "projector")
    base = json.load(open(os.path.join(work["qwen"], "config.json")))
    saved = json.load(open(os.path.join(output_dir, "checkpoint-1", "config.json")))
    assert saved.get("use_cache") == base.get("use_cache")  # the KV cache is off in training only
    assert saved["text_config"].get("use_cache") == base["text_config"].get("use_cache")


def test_4bit_lora_quantizes_language_model_only_and_trains(work, tmp_path):
    import bitsandbytes as bnb
    args = train_ds.parse_args([*work["args"], "--use-4bit", "--use-lora", "--no-deepspeed"])
    model = train_ds.load_model(args, torch.float32, torch.device("cpu"), zero3=False)
    quantized = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantized and all("language_model" in n for n in quantized)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for n, m in model.named_modules()
                   if "visual" in n or "lm_head" in n)
    output_dir = str(tmp_path / "qlora")
    train_ds.main([*work["args"], "--use-4bit", "--use-lora", "--no-deepspeed", "--max-steps", "2",
                   "--output-dir", output_dir])
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in steps_of(output_dir))
    assert load_file(os.path.join(output_dir, "checkpoint-2", "adapter_model.safetensors"))


def changed(before, after, part):
    """Did any weight of this part (vlm_model.part_of) change? Names compared after peft's prefixes."""
    def saved_as_base(name):  # an adapter's name -> the base checkpoint's (which keeps visual.* at the top)
        name = name.replace("base_model.model.", "").replace("modules_to_save.default.", "")
        return name.removeprefix("model.") if name.startswith("model.visual.") else name
    after = {saved_as_base(name): tensor for name, tensor in after.items() if "lora_" not in name}
    common = [name for name in after if name in before and vlm_model.part_of(name) == part]
    assert common, part
    return any(not torch.equal(before[name], after[name]) for name in common)


def test_the_projector_and_vision_tower_train_only_when_asked_each_at_its_own_rate(work, tmp_path):
    base = load_file(os.path.join(work["qwen"], "model.safetensors"))
    common = [*work["args"], "--no-deepspeed", "--max-steps", "2", "--attn-implementation", "eager"]
    lora_dir, full_dir = str(tmp_path / "lora"), str(tmp_path / "full")
    train_ds.main([*common, "--use-lora", "--train-projector", "--vision-lora", "--output-dir", lora_dir])
    adapter = load_file(os.path.join(lora_dir, "checkpoint-2", "adapter_model.safetensors"))
    assert changed(base, adapter, "projector")  # a full copy of the merger trained and saved in the adapter
    assert any("visual.blocks" in name and "lora_A" in name for name in adapter)  # vision LoRA, asked for
    assert not any("merger" in name and "lora_" in name for name in adapter)
    with open(os.path.join(lora_dir, "checkpoint-2", "run_args.json")) as f:
        assert json.load(f)["attn_implementation"] == "eager"
    train_ds.main([*common, "--train-projector", "--projector-lr", "0", "--train-vision", "--output-dir", full_dir])
    model = load_file(os.path.join(full_dir, "checkpoint-2", "model.safetensors"))
    assert changed(base, model, "vision") and changed(base, model, "language")
    assert not changed(base, model, "projector")  # trainable, at a peak learning rate of 0


def test_llava_trains_on_messages_format_with_projector_saved(work, tmp_path):
    output_dir = str(tmp_path / "llava")
    train_ds.main(["--model", work["llava"], "--data", work["val"], "--no-deepspeed", "--use-lora",
                   "--modules-to-save", "multi_modal_projector", "--max-steps", "2", "--output-dir", output_dir])
    adapter = load_file(os.path.join(output_dir, "checkpoint-2", "adapter_model.safetensors"))
    assert any("multi_modal_projector" in name for name in adapter) and any("lora_A" in name for name in adapter)


def test_custom_lora_targets_stay_out_of_the_vision_tower(work, tmp_path):
    output_dir = str(tmp_path / "llava-qv")
    # CLIP's attention has q_proj and v_proj too: LoRA must land only on the language model's
    train_ds.main(["--model", work["llava"], "--data", work["val"], "--no-deepspeed", "--use-lora",
                   "--lora-target-modules", "q_proj,v_proj", "--max-steps", "1", "--output-dir", output_dir])
    lora = [name for name in load_file(os.path.join(output_dir, "checkpoint-1", "adapter_model.safetensors"))
            if "lora_" in name]
    assert not [name for name in lora if "vision_tower" in name]
    assert lora and all("language_model" in name and name.split(".")[-3] in ("q_proj", "v_proj") for name in lora)


def test_qwen2_5_vl_trains_with_lora(work, tmp_path):
    folder = write_qwen2_vl(str(tmp_path / "qwen2.5"), version="2.5")
    output_dir = str(tmp_path / "out")
    train_ds.main([*work["args"], "--model", folder, "--no-deepspeed", "--use-lora", "--max-steps", "6",
                   "--save-steps", "6", "--output-dir", output_dir])
    losses = [entry["loss"] for entry in steps_of(output_dir)]
    assert len(losses) == 6 and losses[-1] < losses[0]
    adapter = load_file(os.path.join(output_dir, "checkpoint-6", "adapter_model.safetensors"))
    lora = [name for name in adapter if "lora_" in name]
    assert lora and all("language_model" in name and "visual" not in name for name in lora)  # vision tower frozen


def test_benchmark_measures_a_random_init_model_from_its_config(work, tmp_path, capsys):
    folder = write_qwen2_vl(str(tmp_path / "config-only"), weights=False)
    assert not any(name.endswith(".safetensors") for name in os.listdir(folder))
    train_ds.main(["--model", folder, "--random-init", "--benchmark", "--no-deepspeed",
                   "--use-lora", "--max-steps", "3", "--benchmark-image-size", "56", "--benchmark-text-words", "20",
                   *TINY_IMAGES, "--output-dir", str(tmp_path / "bench")])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["bench"] == "vlm" and result["mfu"] > 0 and result["mfu_of"] == "this CPU's measured matmul peak"
    assert result["samples_per_s"] > 0 and result["tokens_per_s"] > 0 and result["peak_memory_gib"] > 0


def test_benchmark_mfu_is_the_achieved_flops_over_the_gpu_peak(work, monkeypatch, capsys):
    import memory
    monkeypatch.setattr(train_ds.hardware, "peak_flops", lambda device, dtype: 1e9)  # a peak of 1 GFLOP/s
    timings = [(9.0, 10), (9.0, 10), (0.5, 300), (0.25, 300), (0.5, 300)]  # (seconds, tokens): two warm-up steps

    def reported_mfu(model):
        args = train_ds.parse_args(["--model", model, "--benchmark", "--use-lora", "--benchmark-image-size", "56",
                                    "--gradient-checkpointing", *TINY_IMAGES])
        train_ds.report_benchmark(args, timings, torch.float32, torch.device("cpu"))
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])["mfu"]
    # one sample per step of 300 tokens and a 56x56 image, 2 steps per second (the median of 0.5, 0.25, 0.5 s)
    for kind in ("qwen", "llava"):  # memory.py counts the FLOPs of both
        flops_per_sample = memory.vlm_flops_per_sample(memory.vlm_arch(work[kind]), max_length=300,
                                                       max_pixels=56 * 56, use_lora=True, gradient_checkpointing=True)
        assert reported_mfu(work[kind]) == pytest.approx(flops_per_sample * 2 / 1e9, rel=1e-3)


# -----------------------------------------------------------------------------
# DeepSpeed: two CPU processes over gloo

def deepspeed_run(work, output_dir, extra):
    env = dict(os.environ, OMP_NUM_THREADS="1")  # two ranks on a small CPU: oversubscribed threads crawl
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/torch_extensions"))  # op built once
    launcher = shutil.which("deepspeed",
                            path=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])  # this env's
    args = [launcher, "--num_gpus=2", "--master_port", str(free_port()), *command("train_ds.py")[1:],
            *work["args"], "--use-lora", "--batch-size", "1", "--output-dir", output_dir, *extra]
    result = subprocess.run(args, capture_output=True, text=True, env=env, timeout=420, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return steps_of(output_dir)


def test_fp16_picked_for_qwen_on_a_gpu_without_bfloat16_warns(work, monkeypatch, capsys):
    # a T4 or V100: bfloat16 only emulated, so the default is fp16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert train_ds.choose_dtype(train_ds.parse_args(work["args"])) == torch.float16
    warning = capsys.readouterr().out.strip()
    assert warning.startswith("warning: ") and "Qwen2" in warning and "\n" not in warning
    assert train_ds.choose_dtype(train_ds.parse_args(["--model", work["llava"]])) == torch.float16
    # asked for: no warning
    assert train_ds.choose_dtype(train_ds.parse_args([*work["args"], "--fp16"])) == torch.float16
    assert capsys.readouterr().out == ""


def test_deepspeed_config_keeps_the_users_precision_settings_and_warns_of_overlap_comm(tmp_path, capsys):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2, "overlap_comm": True},
                                "bf16": {"enabled": False, "immediate_grad_update": True},
                                "fp16": {"enabled": True, "loss_scale_window": 500, "hysteresis": 4}}))
    args = train_ds.parse_args(["--deepspeed", str(path)])
    config = train_ds.deepspeed_config(args, torch.bfloat16, 1)
    assert config["bf16"] == {"enabled": True, "immediate_grad_update": True}  # the flags decide "enabled" only
    assert config["fp16"] == {"enabled": False, "loss_scale_window": 500, "hysteresis": 4, "loss_scale": 0,
                              "initial_scale_power": 16}
    warning = capsys.readouterr().out.strip()
    assert warning.startswith("warning: ") and "overlap_comm" in warning and "NaN" in warning and "\n" not in warning
    args = train_ds.parse_args(["--deepspeed", os.path.join(REPO, "ds_config.json")])
    train_ds.deepspeed_config(args, torch.float32, 1)
    assert "overlap_comm" not in capsys.readouterr().out  # the shipped configs turn it off


def test_deepspeed_zero2_two_processes_match_one_process(work, tmp_path):
    # the same samples per step (2 ranks x 1, or 2 micro-batches x 1): the same losses, token-weighted
    extra = ["--max-steps", "6", "--save-steps", "6", "--lora-dropout", "0"]
    output_dir = str(tmp_path / "zero2")
    log = deepspeed_run(work, output_dir, extra)
    train_ds.main([*work["args"], "--no-deepspeed", "--use-lora", "--batch-size", "1",
                   "--gradient-accumulation-steps", "2", *extra, "--output-dir", str(tmp_path / "one")])
    for key in ("loss", "grad_norm"):  # Adam hides a gradient scale; the norm does not
        assert [e[key] for e in log] == pytest.approx([e[key] for e in steps_of(str(tmp_path / "one"))], rel=1e-4), key
    losses = [entry["loss"] for entry in log]
    assert len(losses) == 6 and sum(losses[-2:]) / 2 < losses[0] - 0.1, losses
    files = os.listdir(os.path.join(output_dir, "checkpoint-6"))
    assert {"rng_state_0.pt", "rng_state_1.pt", "deepspeed", "adapter_model.safetensors"} <= set(files)


def test_deepspeed_zero3_text_only_samples_run_and_adapter_is_not_empty(work, tmp_path):
    records = json.load(open(work["train"]))
    for i in range(0, len(records), 2):  # half the samples carry no image
        records[i] = {"conversations": [{"from": "human", "value": "what colour is the sky"},
                                        {"from": "gpt", "value": "blue"}]}
    data = write_data(work["root"] / "demo", records, "mixed.json")
    output_dir = str(tmp_path / "zero3")
    deepspeed_run(work, output_dir, ["--data", data, "--max-steps", "4", "--save-steps", "4",
                                     "--deepspeed", os.path.join(REPO, "ds_config_zero3.json")])
    adapter = load_file(os.path.join(output_dir, "checkpoint-4", "adapter_model.safetensors"))
    lora_a = [t for name, t in adapter.items() if "lora_A" in name]
    assert lora_a and all(t.shape[0] == 16 and t.shape[1] > 0 and t.abs().sum() > 0 for t in lora_a)


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(work, tmp_path):
    output_dir = tmp_path / "stopped"
    process = start_script("train_ds.py", *work["args"], "--no-deepspeed", "--use-lora", "--max-steps", "1000",
                           "--save-steps", "1000", "--output-dir", output_dir, stdout=subprocess.PIPE,
                           stderr=subprocess.DEVNULL)
    for line in process.stdout:
        if line.startswith("step 2/"):
            process.send_signal(signal.SIGTERM)
            break
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 0 and "stopped by a signal" in output
    steps = vlm_checkpoint.checkpoint_steps(str(output_dir))
    assert len(steps) == 1 and 2 <= steps[0] < 1000
    assert [e["iter"] for e in steps_of(str(output_dir)) if "loss" in e] == list(range(1, steps[0] + 1))


# -----------------------------------------------------------------------------
# interruptions: a diverging loss, kill -9 at any moment, a dying rank

def test_non_finite_loss_is_skipped_then_stops_and_keeps_the_checkpoint(lora_run, tmp_path, capsys):
    args, output_dir = lora_run
    diverging = str(tmp_path / "diverging")
    shutil.copytree(output_dir, diverging)
    checkpoint = os.path.join(diverging, "checkpoint-8")
    before = {name: open(os.path.join(checkpoint, name), "rb").read() for name in os.listdir(checkpoint)}
    # step 9 applies a 1e30 update; from step 10 the loss is NaN; step 12 would be a save
    message = error_of([*args, "--output-dir", diverging, "--resume", "--learning-rate", "1e30", "--max-steps", "50",
                        "--max-nonfinite-steps", "4"])
    assert "step 10: loss not finite, step skipped (1 in a row)" in capsys.readouterr().out
    assert message.startswith("error: loss was not finite for 4 steps in a row (last at step 13)")
    assert "lower --learning-rate" in message and "--bf16" in message and "(checkpoint-8) is untouched" in message
    assert vlm_checkpoint.checkpoint_steps(diverging) == [4, 8]
    assert {name: open(os.path.join(checkpoint, name), "rb").read() for name in os.listdir(checkpoint)} == before


@pytest.mark.slow
def test_kill_9_or_sigterm_at_random_moments_then_the_same_command_logs_the_same_losses(work, tmp_path):
    args = [*work["args"], "--no-deepspeed", "--use-lora", "--max-steps", "48", "--save-steps", "4"]
    reference = str(tmp_path / "reference")
    train_ds.main([*args, "--output-dir", reference])  # in this process: no second import of transformers
    output_dir = str(tmp_path / "killed")
    output = tmp_path / "output.txt"

    def temp_folders():  # saves under way, or cut short by a kill: (path, time written)
        found = set()
        for path in glob.glob(os.path.join(output_dir, ".tmp-checkpoint-*")):
            try:
                found.add((path, os.stat(path).st_mtime_ns))
            except FileNotFoundError:  # renamed into place meanwhile
                pass
        return found

    rng = random.Random(0)
    kills = kills_in_save = 0
    while kills < 5:  # each start costs ~10 s of imports: few kills, each one after the resume has loaded
        saved = vlm_checkpoint.checkpoint_steps(output_dir)
        stale = temp_folders()
        with open(output, "w") as f:  # one unchanged command for the first start and every restart
            process = start_script("train_ds.py", *args, "--output-dir", output_dir, "--resume", "auto",
                                   stdout=f, stderr=subprocess.STDOUT)
        # kill a random number of steps after the checkpoint (at a random moment within a step), or inside a save
        target = (saved[-1] if saved else 0) + (1 if kills % 2 else rng.randint(1, 8))
        assert wait_for(lambda: f"step {target}/" in output.read_text() or process.poll() is not None, 180)
        if kills % 2:
            kills_in_save += wait_for(lambda: temp_folders() - stale or process.poll() is not None, 60) \
                and process.poll() is None
        else:
            time.sleep(rng.uniform(0, 0.05))
        if process.poll() is not None:
            break  # finished (or failed) before we could kill it
        if kills == 2:  # one of them a spot reclaim with notice: it saves and exits 0
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=120) == 0
        process.kill()
        process.wait()
        assert "error:" not in output.read_text() and "Traceback" not in output.read_text(), output.read_text()
        kills += 1
    assert kills == 5 and kills_in_save >= 2, (kills, kills_in_save, output.read_text())
    # what a crash can also leave: a log line cut short (power loss, full disk) and a save no later step redoes
    with open(os.path.join(output_dir, "log.jsonl"), "a") as f:
        f.write('{"iter": 9')
    os.makedirs(os.path.join(output_dir, ".tmp-checkpoint-999"))
    train_ds.main([*args, "--output-dir", output_dir, "--resume", "auto"])
    assert vlm_checkpoint.checkpoint_steps(output_dir)[-1] == 48
    assert not glob.glob(os.path.join(output_dir, ".tmp*"))
    # the same steps and losses, bit for bit, as the run that was never interrupted
    assert [(e["iter"], e.get("loss")) for e in read_log(output_dir)] \
        == [(e["iter"], e.get("loss")) for e in read_log(reference)]


def test_a_dying_rank_ends_the_whole_deepspeed_job(work, tmp_path):
    output_dir = tmp_path / "out"
    process = start_script("train_ds.py", *work["args"], "--use-lora", "--max-steps", "100000",
                           "--save-steps", "100000", "--output-dir", output_dir, torchrun=2,
                           stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        log_path = output_dir / "log.jsonl"
        assert wait_for(lambda: log_path.exists() and log_path.read_text().count("\n") >= 2, 180)
        assert kill_one_torchrun_worker(process) != 0
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)  # torchrun and its workers


def test_processes_of_a_launcher_that_sets_no_thread_count_share_the_cores():
    # the deepspeed launcher leaves OMP_NUM_THREADS unset: each CPU process gets its share before torch starts
    env = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}
    code = "import os, train_ds; print(os.environ['OMP_NUM_THREADS'])"
    for world_size, expected in (("2", str(max(1, os.cpu_count() // 2))), ("1", None)):
        result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=dict(env, WORLD_SIZE=world_size),
                                capture_output=True, text=True, timeout=120)
        printed = result.stdout.strip().splitlines()[-1] if result.returncode == 0 else None
        assert printed == expected, result.stderr[-2000:]
