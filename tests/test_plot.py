"""plot.py: loss against iterations and seconds from train.py's log.jsonl, in one PNG."""
import json
import struct

from conftest import assert_one_line_error, run_inline


def fake_run(folder, evals, seconds_per_iter, with_time=True):
    """A log.jsonl as train.py writes it: iteration records and evaluations, elapsed_s in each."""
    folder.mkdir()
    with open(folder / "log.jsonl", "w") as f:
        for it in range(0, 40):
            record = {"iter": it, "loss": 4 - it / 20, "lr": 1e-3, "dt_ms": 10.0, "tokens_per_s": 1.0, "mfu": None}
            if with_time:
                record["elapsed_s"] = it * seconds_per_iter
            f.write(json.dumps(record) + "\n")
            if it in evals:
                f.write(json.dumps({"iter": it, "lr": 1e-3, "train_loss": 3.0, "val_loss": 3.5 - it / 40,
                                    **({"elapsed_s": it * seconds_per_iter} if with_time else {})}) + "\n")
    return folder


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_plot_writes_one_png_of_several_runs(tmp_path):
    import plot
    a = fake_run(tmp_path / "baseline", {0, 20, 39}, 0.5)
    b = fake_run(tmp_path / "old", {0, 39}, 0.2, with_time=False)  # a log from before elapsed_s
    assert run_inline("plot.py", a, b, "--out", tmp_path / "runs.png")[0] == 0
    assert png_size(tmp_path / "runs.png") == (1560, 576)  # 13 x 4.8 inches at 120 dpi
    assert plot.series(plot.read_log(a), "val_loss", "elapsed_s") == ([0, 10, 19.5], [3.5, 3.0, 3.5 - 39 / 40])
    assert plot.series(plot.read_log(b), "val_loss", "elapsed_s") == ([], [])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["baseline", "old", "runs.png"]  # no temporary left


def test_plot_bad_input_is_one_line(tmp_path):
    run = fake_run(tmp_path / "run", {0}, 1.0)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "log.jsonl").write_text("")
    (tmp_path / "mine.png").write_text("the user's own file")
    (tmp_path / "numbers").mkdir()
    (tmp_path / "numbers" / "log.jsonl").write_text('{"iter": 0, "loss": 1.0}\n42\n')
    cases = {(tmp_path / "nowhere",): "log.jsonl not found: give the out_dir of a train.py or train_ds.py run",
             (tmp_path / "empty",): "has no losses yet",
             (run, "--out", tmp_path / "mine.png"): "mine.png exists: pass another --out, or --overwrite",
             (run, "--out", tmp_path / "plot.jpg"): "must end in .png",
             (run, "--out", tmp_path / "no" / "plot.png"): "its folder does not exist",
             (tmp_path / "numbers",): "log.jsonl line 2 is a JSON int, not a record"}
    for args, expected in cases.items():
        assert_one_line_error(run_inline("plot.py", *args), expected)
    assert (tmp_path / "mine.png").read_text() == "the user's own file"
