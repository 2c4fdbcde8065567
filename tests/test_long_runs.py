"""Long runs on rented and spot GPUs, in train.py and train_ds.py: saves on a clock, a time budget that
saves and exits 0, the cost, the share of time spent waiting for data, GPU telemetry (a stand-in NVML
here; tests/test_cuda.py reads the real one) and the hints they lead to."""
import statistics

import pytest
import torch
from conftest import TINY, read_log, run_inline, run_script

import gpt_data

# nvidia-ml-py's pynvml as far as hardware.py reads it: two GPUs, STAND_IN_UTIL % busy
STAND_IN_NVML = '''
import os
NVML_TEMPERATURE_GPU = 0
class NVMLError(Exception):
    pass
def nvmlInit():
    pass
def nvmlDeviceGetCount():
    return 2
def nvmlDeviceGetHandleByIndex(i):
    return i
class Utilization:
    gpu, memory = int(os.environ.get("STAND_IN_UTIL", "50")), 0
def nvmlDeviceGetUtilizationRates(handle):
    return Utilization()
class Memory:
    used, total = 3 * 2**30, 80 * 2**30
def nvmlDeviceGetMemoryInfo(handle):
    return Memory()
def nvmlDeviceGetTemperature(handle, sensor):
    return 60 + handle
def nvmlDeviceGetPowerUsage(handle):
    return 250_000 + 1000 * handle  # milliwatts
'''


@pytest.fixture
def stand_in_nvml(tmp_path):
    folder = tmp_path / 'nvml'
    folder.mkdir()
    (folder / 'pynvml.py').write_text(STAND_IN_NVML)
    return folder


def tiny(char_data, out, *extra):
    return [*TINY, f'--dataset={char_data}', f'--out_dir={out}', *extra]


# -----------------------------------------------------------------------------
# train.py

def test_checkpoint_minutes_saves_between_evals(char_data, tmp_path, capsys):
    args = ['--max_iters=60', '--eval_interval=100000', '--keep_last=100']
    assert run_inline('train.py', *tiny(char_data, tmp_path / 'clock', *args, '--checkpoint_minutes=0.001'))[0] == 0
    timed = capsys.readouterr().out.count('saving checkpoint')
    assert run_inline('train.py', *tiny(char_data, tmp_path / 'plain', *args))[0] == 0
    assert timed >= 3 and capsys.readouterr().out.count('saving checkpoint') == 1  # only the final save
    assert len(list((tmp_path / 'clock').glob('ckpt-*.pt'))) == timed - 1


def test_max_hours_saves_exits_0_and_the_same_command_resumes_exactly(char_data, tmp_path):
    args = ['--max_iters=300', '--eval_interval=100', '--dropout=0.1', '--auto_resume=True']
    assert run_script('train.py', *tiny(char_data, tmp_path / 'reference', *args)).returncode == 0
    out = tmp_path / 'limited'
    limited = run_script('train.py', *tiny(char_data, out, *args, '--max_hours=0.0002', '--price_per_hour=3.6'))
    assert limited.returncode == 0 and 'max_hours=0.0002 is near: saving a checkpoint and exiting' in limited.stdout
    stopped_at = torch.load(out / 'ckpt.pt', weights_only=True)['iter_num']
    assert 0 < stopped_at < 300
    costs = [r for r in read_log(out) if 'cost_usd' in r]  # 3.6 $/h: a thousandth of a dollar a second
    assert costs and all(abs(r['cost_usd'] - r['elapsed_s'] / 1000) < 0.002 for r in costs)
    assert all(r['projected_cost_usd'] >= r['cost_usd'] for r in costs if 'projected_cost_usd' in r)
    assert '$' in limited.stdout and 'at the end' in limited.stdout
    assert run_script('train.py', *tiny(char_data, out, *args)).returncode == 0  # the same run, no limit now
    assert [(r['iter'], r.get('loss'), r.get('val_loss')) for r in read_log(out) if 'compile_s' not in r] == \
           [(r['iter'], r.get('loss'), r.get('val_loss')) for r in read_log(tmp_path / 'reference')]


def test_stand_in_gpu_telemetry_reaches_the_log_line_and_log_and_low_use_gets_a_hint(char_data, tmp_path,
                                                                                      stand_in_nvml):
    r = run_script('train.py', *tiny(char_data, tmp_path, '--max_iters=6', '--eval_interval=100000'),
                   env={'PYTHONPATH': str(stand_in_nvml), 'STAND_IN_UTIL': '50'})
    assert r.returncode == 0, r.stderr
    assert 'gpu 50% 3.0GiB 60C 250W, 50% 3.0GiB 61C 251W' in r.stdout and 'GPU telemetry off' not in r.stdout
    logged = [e for e in read_log(tmp_path) if 'loss' in e]
    assert logged[-1]['gpu_util'] == [50, 50] and logged[-1]['gpu_power_w'] == [250, 251]
    assert logged[-1]['gpu_temp_c'] == [60, 61] and logged[-1]['gpu_memory_gib'] == [3.0, 3.0]
    hints = [line for line in r.stdout.splitlines() if 'under 80% busy' in line]
    assert len(hints) == 1 and 'a batch too small' in hints[0] and 'raise batch_size' in hints[0]


def test_the_normal_path_waits_little_for_data_has_a_cpu_mfu_and_notes_no_nvml_once(char_data, tmp_path, capsys):
    assert run_inline('train.py', *tiny(char_data, tmp_path, '--max_iters=40', '--eval_interval=100000'))[0] == 0
    output, records = capsys.readouterr().out, read_log(tmp_path)
    assert statistics.median(r['data_wait'] for r in records if 'data_wait' in r) < 0.10
    assert "MFU is of this CPU's measured matmul peak" in output and "of this CPU's measured matmul peak |" in output
    assert all(0 < r['mfu'] and r['peak_flops'] > 1e9 for r in records if 'loss' in r)
    assert 'waiting for the next batch' not in output
    assert output.count('GPU telemetry off') == 1 and 'pip install nvidia-ml-py' in output
    assert not any(key.startswith('gpu_') for record in records for key in record)


def test_a_slow_loader_shows_its_wait_and_a_hint(char_data, tmp_path, monkeypatch, capsys):
    import time
    read_batch = gpt_data.read_batch

    def slow(*args):
        time.sleep(0.03)
        return read_batch(*args)
    monkeypatch.setattr(gpt_data, 'read_batch', slow)
    assert run_inline('train.py', *tiny(char_data, tmp_path, '--max_iters=8', '--eval_interval=100000'))[0] == 0
    assert min(r['data_wait'] for r in read_log(tmp_path) if 'data_wait' in r) > 0.5
    assert capsys.readouterr().out.count('of the time goes to waiting for the next batch') == 1
