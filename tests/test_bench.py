"""bench.py on a tiny config: one table row and one JSON line with the fields BENCHMARKS.md records."""
import json

from conftest import assert_one_line_error, run_script


def run_bench(*args):
    return run_script("bench.py", *args, timeout=120)


def test_bench_prints_a_table_row_and_a_json_line_on_cpu():
    out = run_bench("--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=16", "--batch_size=2", "--compile=False",
                    "--device=cpu", "--bench_warmup=1", "--bench_iters=3", "--dataset=shakespeare_char")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert result["bench"] == "gpt" and result["mfu"] == "n/a" and result["timed_iters"] == 3
    assert result["tokens_per_s"] > 0 and result["ms_per_iter"] > 0 and result["peak_memory_gib"] > 0
    assert {"date", "device", "torch", "load_average_1m"} <= set(result)
    assert lines[-2].startswith("| ") and "n/a" in lines[-2]


def test_bench_rejects_an_unknown_setting_in_one_line():
    assert_one_line_error(run_bench("--batch_sise=2"), "error: unknown setting --batch_sise")
