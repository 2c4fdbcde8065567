"""
Small helpers that train.py and train_ds.py both need: crash-safe saving, RNG state for exact
resume, and a wandb start that falls back to offline instead of crashing.
"""
import os
import random

import numpy as np
import torch


def atomic_torch_save(obj, path):
    """torch.save that never leaves a half-written file at `path`: write a temp file in the same
    folder, fsync it, then rename over the target (rename is atomic on POSIX and Windows)."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp_path = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp_path, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)  # a failed write (full disk, ...) leaves the old file untouched
    fsync_dir(folder)


def fsync_dir(folder):
    # make the rename itself durable; not every OS lets us open a directory
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def get_rng_state():
    """Every RNG the next step may draw from, as tensors and plain values (weights_only-safe)."""
    py_version, py_internal, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": [py_version, list(py_internal), py_gauss],
        "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss, np_gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    py_version, py_internal, py_gauss = state["python"]
    random.setstate((py_version, tuple(py_internal), py_gauss))
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_name, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def init_wandb(project, run_name, config):
    """Start wandb; with no API key or no network, run offline and say so instead of crashing."""
    import netrc
    import wandb
    mode = os.environ.get("WANDB_MODE") or None
    if mode is None and not os.environ.get("WANDB_API_KEY"):
        try:  # where `wandb login` keeps the key
            has_key = netrc.netrc().authenticators("api.wandb.ai") is not None
        except (OSError, netrc.NetrcParseError):
            has_key = False
        if not has_key:
            print("wandb: no API key found, logging offline (run `wandb sync` later to upload)")
            mode = "offline"
    try:
        return wandb.init(project=project, name=run_name, config=config, mode=mode)
    except Exception as e:
        print(f"wandb: could not start online ({type(e).__name__}), logging offline instead")
        return wandb.init(project=project, name=run_name, config=config, mode="offline")
