"""sample_vlm.py on tiny random Qwen2-VL and LLaVA models trained here: answers, scores, bad input."""
import json
import os
from collections import Counter

import pytest
from conftest import assert_one_line_error, run_script
from vlm_fixtures import write_llava, write_qwen2_vl

import sample_vlm
import train_ds
from configurator import UserError

PIXELS = ["--min-pixels", str(56 * 56), "--max-pixels", str(56 * 56)]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample_vlm")
    assert run_script("data/vlm_demo/prepare.py", "--out-dir", root / "demo", "--num-train", 120, "--num-val", 60,
                      "--size", 56).returncode == 0
    return {"root": root, "train": str(root / "demo" / "train.json"), "val": str(root / "demo" / "val.jsonl"),
            "qwen": str(write_qwen2_vl(str(root / "qwen"))), "llava": str(write_llava(str(root / "llava")))}


@pytest.fixture(scope="module")
def trained(demo):
    """Each tiny model fine-tuned on the demo set: 600 steps of 4, about 20 s each on a CPU."""
    checkpoints = {}
    for kind in ("qwen", "llava"):
        output_dir = str(demo["root"] / f"{kind}-tuned")
        generate = ["--eval-data", demo["val"], "--eval-generate", "60"] if kind == "qwen" else []
        train_ds.main(["--model", demo[kind], "--data", demo["train"], *PIXELS, "--no-deepspeed", "--batch-size", "4",
                       "--max-steps", "600", "--learning-rate", "1e-3", "--warmup-steps", "5", "--save-steps", "600",
                       "--num-workers", "0", "--seed", "1", "--output-dir", output_dir, *generate])
        checkpoints[kind] = os.path.join(output_dir, "checkpoint-600")
    return checkpoints


def scored(checkpoint, data, *flags):
    return sample_vlm.main(["--checkpoint", checkpoint, "--data", data, "--max-new-tokens", "10", *PIXELS, *flags])


def guessing_without_the_image(records):
    """Exact match of answering each question with its most common reference: what a model scores that
    learnt the answers' distribution but never reads the image."""
    answers = {}
    for record in records:
        answers.setdefault(record["prompt"], Counter())[record["reference"]] += 1
    return sum(counts.most_common(1)[0][1] for counts in answers.values()) / len(records)


@pytest.mark.parametrize("kind", ["qwen", "llava"])
def test_a_fine_tuned_vlm_answers_held_out_questions_far_better_than_untrained(demo, trained, kind):
    untrained, records = scored(demo[kind], demo["val"]), scored(trained[kind], demo["val"])
    before, after = (sum(r["correct"] for r in rs) / len(rs) for rs in (untrained, records))
    assert before <= 0.1 and after >= guessing_without_the_image(records) + 0.15, (before, after)


def test_eval_generate_logs_the_scores_sample_vlm_gives_the_checkpoint(demo, trained):
    log = [json.loads(line) for line in open(os.path.join(os.path.dirname(trained["qwen"]), "log.jsonl"))]
    evaluation = [record for record in log if "val_loss" in record]
    assert len(evaluation) == 1 and evaluation[0]["iter"] == 600
    records = scored(trained["qwen"], demo["val"])
    assert evaluation[0]["eval_exact_match"] == sum(r["correct"] for r in records) / 60 >= 0.5
    assert evaluation[0]["eval_token_f1"] == pytest.approx(sum(r["f1"] for r in records) / 60)


@pytest.mark.parametrize("kind", ["qwen", "llava"])
def test_batched_generation_equals_one_at_a_time(demo, trained, kind):
    batched = [r["prediction"] for r in scored(trained[kind], demo["val"], "--batch-size", "8")]
    alone = [r["prediction"] for r in scored(trained[kind], demo["val"], "--batch-size", "1")]
    assert batched == alone and len(set(batched)) > 3


def test_the_adapter_and_the_merged_model_give_the_same_answers(demo, tmp_path):
    output_dir = str(tmp_path / "lora")
    train_ds.main(["--model", demo["qwen"], "--data", demo["train"], *PIXELS, "--no-deepspeed", "--use-lora",
                   "--batch-size", "4", "--max-steps", "60", "--learning-rate", "1e-2", "--warmup-steps", "5",
                   "--save-steps", "60", "--num-workers", "0", "--output-dir", output_dir])
    adapter = os.path.join(output_dir, "checkpoint-60")
    train_ds.main(["--merge-lora", adapter])
    answers = [[r["prediction"] for r in scored(checkpoint, demo["val"], "--limit", "12")]
               for checkpoint in (adapter, adapter + "-merged", demo["qwen"])]
    assert answers[0] == answers[1] != answers[2]  # the adapter changed the answers, and merging kept them


def test_one_image_and_a_prompt_print_the_answer_and_data_writes_predictions(demo, trained, tmp_path, capsys):
    image = os.path.join(os.path.dirname(demo["val"]), "images", "00120.png")
    question = "What colour is the shape?"
    sample_vlm.main(["--checkpoint", trained["qwen"], "--image", image, "--prompt", question, *PIXELS])
    answer = capsys.readouterr().out.strip().splitlines()[-1]
    record = {"id": "q", "images": [image], "messages": [{"role": "user", "content": f"<image>{question}"},
                                                         {"role": "assistant", "content": "red"}]}
    (tmp_path / "one.jsonl").write_text(json.dumps(record) + "\n")
    scored(trained["qwen"], str(tmp_path / "one.jsonl"), "--output", str(tmp_path / "preds.jsonl"))
    predictions = [json.loads(line) for line in open(tmp_path / "preds.jsonl")]
    assert [p["prediction"] for p in predictions] == [answer] and answer  # the same question, the same answer
    assert set(predictions[0]) == {"id", "prompt", "prediction", "reference", "correct", "f1"}
    assert predictions[0]["prompt"] == question and predictions[0]["reference"] == "red"
    assert "1 records: exact match" in capsys.readouterr().out


def test_bad_input_is_one_line(demo, trained, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "no-reply.json").write_text(json.dumps([{"messages": [{"role": "user", "content": "hello?"}]}]))
    (tmp_path / "taken.jsonl").write_text("an earlier run's predictions\n")
    image = os.path.join(os.path.dirname(demo["val"]), "images", "00120.png")
    lora = os.path.join(str(demo["root"]), "lora-for-bad-input")
    train_ds.main(["--model", demo["qwen"], "--data", demo["train"], *PIXELS, "--no-deepspeed", "--use-lora",
                   "--max-steps", "1", "--num-workers", "0", "--output-dir", lora])
    cases = [
        (["--checkpoint", trained["qwen"]], "give --image PATH --prompt TEXT (one question), or --data FILE"),
        (["--checkpoint", trained["qwen"], "--image", image], "--image needs --prompt"),
        (["--checkpoint", trained["qwen"], "--image", str(tmp_path / "nope.png"), "--prompt", "hi"],
         "nope.png not found"),
        (["--checkpoint", trained["qwen"], "--data", str(tmp_path / "no-reply.json")], "no assistant turn to compare"),
        (["--checkpoint", str(tmp_path / "empty"), "--data", demo["val"]], "holds neither an adapter nor a model"),
        (["--checkpoint", os.path.join(lora, "checkpoint-1"), "--base", demo["llava"], "--data", demo["val"]],
         "was trained on a qwen2_vl model, but"),
        (["--checkpoint", trained["qwen"], "--data", demo["val"], "--output", str(tmp_path / "taken.jsonl")],
         "exists: pass another --output, or --overwrite"),
        (["--checkpoint", trained["qwen"], "--data", demo["val"], "--use-4bit"], "--use-4bit needs a CUDA GPU"),
        (["--checkpoint", trained["qwen"], "--data", demo["val"], "--batch-size", "0"], "--batch-size must be in"),
    ]
    for argv, expected in cases:
        with pytest.raises(UserError) as error:
            sample_vlm.main([*argv, *PIXELS])
        assert_one_line_error((1, f"error: {error.value}"), expected)
    assert (tmp_path / "taken.jsonl").read_text() == "an earlier run's predictions\n"
