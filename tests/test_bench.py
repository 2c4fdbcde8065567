"""bench.py on a tiny config: one table row and one JSON line with the fields BENCHMARKS.md records."""
import json

from conftest import assert_one_line_error, run_inline, run_script

TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=16", "--batch_size=2", "--compile=False",
        "--device=cpu", "--bench_warmup=1", "--bench_iters=3", "--dataset=shakespeare_char"]


def result_of(out):
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert lines[-2].startswith("| ") and "of this CPU's measured matmul peak" in lines[-2]
    return json.loads(lines[-1])


def test_bench_prints_a_table_row_and_a_json_line_on_cpu():
    result = result_of(run_script("bench.py", *TINY, "--gradient_accumulation_steps=1", timeout=120))
    assert result["bench"] == "gpt" and result["timed_iters"] == 3
    assert 0 < result["mfu"] and result["mfu_of"] == "this CPU's measured matmul peak" and result["peak_flops"] > 1e9
    assert result["tokens_per_s"] > 0 and result["peak_memory_gib"] > 0 and result["trace"] is None
    assert result["ms_per_iter_min"] <= result["ms_per_iter_median"] <= result["ms_per_iter_max"]
    assert {"date", "device", "torch", "load_average_1m"} <= set(result)


def test_bench_times_whole_iterations_under_torchrun_and_writes_a_trace(tmp_path):
    out = run_script("bench.py", *TINY, "--gradient_accumulation_steps=4", "--profile=True", "--fused_loss=True",
                     "--attention_backend=math", torchrun=2, cwd=tmp_path, timeout=180)
    result = result_of(out)
    assert out.stdout.count('"bench": "gpt"') == 1  # rank 0 reports for all
    assert result["processes"] == 2 and result["gradient_accumulation_steps"] == 4
    # an iteration is 4 micro-batches of 2 x 16 tokens over both processes
    assert abs(result["tokens_per_s"] * result["ms_per_iter"] / 1000 - 4 * 2 * 16) < 1
    traces = {p.name.rsplit("_", 1)[1]: p for p in tmp_path.glob("bench_trace_*.json")}
    assert sorted(traces) == ["rank0.json", "rank1.json"] and result["trace"] == traces["rank0.json"].name
    assert json.loads(traces["rank0.json"].read_text())["traceEvents"]


def test_bench_refuses_a_cuda_only_attention_kernel_on_the_cpu():
    assert_one_line_error(run_inline("bench.py", "--attention_backend=cudnn", "--device=cpu"),
                          "attention_backend='cudnn' runs on CUDA GPUs only")


def test_the_vlm_race_marks_for_trl_exactly_the_tokens_train_ds_labels(tmp_path):
    # bench_vlm_race.py gives TRL's assistant_only_loss a template with {% generation %} marks: its mask must
    # pick the very tokens vlm_data labels, or the two losses would not be the same loss
    import subprocess
    import sys

    import vlm_fixtures
    from conftest import REPO

    import bench_vlm_race
    import vlm_data
    subprocess.run([sys.executable, f"{REPO}/data/vlm_demo/prepare.py", "--out-dir", str(tmp_path), "--num-train",
                    "6", "--num-val", "1", "--size", "56"], check=True, capture_output=True)
    processor = vlm_data.load_processor(vlm_fixtures.write_qwen2_vl(str(tmp_path / "qwen")), False, 3136, 3136)
    samples = vlm_data.read_samples(str(tmp_path / "train.json"))
    assert any(sum(m["role"] == "assistant" for m in messages) > 1 for messages, _, _ in samples)  # multi-turn too
    ours = vlm_data.encode(samples, processor)
    for messages, paths, _ in samples:  # TRL puts each image into its placeholder
        images = iter(paths)
        for item in (item for m in messages for item in m["content"] if item["type"] == "image"):
            item["image"] = next(images)
    theirs = processor.apply_chat_template([m for m, _, _ in samples], chat_template=bench_vlm_race.TRL_TEMPLATE,
                                           tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
                                           return_tensors="pt", processor_kwargs=dict(padding=True,
                                                                                      padding_side="right"))
    assert theirs["input_ids"].tolist() == ours["input_ids"].tolist()
    labels = theirs["input_ids"].masked_fill(theirs["assistant_masks"] == 0, -100)
    assert (labels != -100).any() and labels.tolist() == ours["labels"].tolist()
