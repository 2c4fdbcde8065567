"""
File mechanics every script shares: a folder's lock (one run at a time), crash-safe writes (a temp
file, fsync, an atomic rename), one-line errors for a full or read-only disk, removal of our own
half-written temp files only (never a user's), and the append-only log.jsonl.
"""
import errno
import json
import os
import re
import shutil
import socket
import time
from contextlib import contextmanager

import torch

from configurator import UserError

# -----------------------------------------------------------------------------
# the output folder: one run at a time, and only our own files are ever removed

def lock_folder(folder, what="--out_dir"):
    """Create folder and hold its lock file for this process's lifetime (keep the returned file
    open). A second run on the same folder is refused; the kernel frees the lock when a run dies,
    even by kill -9, so it never stays stuck."""
    try:
        os.makedirs(folder, exist_ok=True)
        lock = open(os.path.join(folder, ".lock"), "a+")
    except OSError as e:
        raise UserError(f"{what} '{folder}' is not writable "
                        f"({write_failure(e, os.path.dirname(os.path.abspath(folder)))}): choose another {what}")
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; runs are trusted not to collide
        return lock
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.seek(0)
        owner = (lock.read().split() or ["?"])[0]
        raise UserError(f"another run (pid {owner}) is using {what} '{folder}': "
                        f"wait for it to end, or choose another {what}")
    try:
        lock.seek(0)
        lock.truncate()
        lock.write(f"{os.getpid()} {socket.gethostname()} {time.time()}\n")  # unique: other nodes check they see it
        lock.flush()
    except OSError as e:  # a full disk takes even these few bytes
        raise UserError(f"cannot write in {what} '{folder}' ({write_failure(e, folder)}): "
                        f"{what_to_do(e, 'free disk space')}")
    return lock


def temp_path(path):
    # the one shape of our temp files: .<final name>.tmp<pid>, beside the final file
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}.tmp{os.getpid()}")


def remove_stale_temps(folder, final_names):
    """Delete what a killed run left half-written: temp files of ours only, i.e. .<name>.tmp<pid>
    where <name> matches the regex final_names (the files a script writes). Nothing else."""
    pattern = re.compile(rf"\.({final_names})\.tmp\d+")
    for name in os.listdir(folder):
        if pattern.fullmatch(name) and os.path.isfile(os.path.join(folder, name)):
            os.remove(os.path.join(folder, name))


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_dead_temps(path):
    """What a killed run of ours left beside path: temp_path(path)'s files or folders whose process is
    gone (a live one may be another run writing the same path). Nothing else."""
    folder, name = os.path.split(os.path.abspath(path))
    pattern = re.compile(rf"\.{re.escape(name)}\.tmp(\d+)")
    for entry in os.listdir(folder) if os.path.isdir(folder) else []:
        match = pattern.fullmatch(entry)
        if match and not pid_alive(int(match.group(1))):
            target = os.path.join(folder, entry)
            if os.path.isdir(target) and not os.path.islink(target):
                shutil.rmtree(target, ignore_errors=True)
            else:
                os.remove(target)


# -----------------------------------------------------------------------------
# crash-safe writes: a temp file, fsync, then an atomic rename over the target

def atomic_write(path, write):
    """Call write(f) on a temp file beside path, then rename it over path: a crash or a full disk
    leaves path as it was and no temp file. Write failures come out as OSError (torch's zip writer
    reports a full disk as RuntimeError)."""
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except RuntimeError as e:
        raise OSError(errno.EIO, f"write failed ({str(e).splitlines()[0][-120:]})") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def atomic_torch_save(obj, path):
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path, text):
    atomic_write(path, lambda f: f.write(text.encode()))


def check_output_file(path, overwrite, flag, inputs=(), overwrite_flag="--overwrite"):
    """A file the user names for a script to write: never one of its inputs, never replaced unless
    overwrite, in a folder that exists. Checked before any slow work."""
    if os.path.exists(path) and any(os.path.exists(p) and os.path.samefile(path, p) for p in inputs):
        raise UserError(f"{flag} {path} is one of this run's inputs: choose another {flag}")
    if os.path.isdir(path):
        raise UserError(f"{flag} {path} is a folder: give a file name")
    if os.path.exists(path) and not overwrite:
        raise UserError(f"{flag} {path} exists: pass another {flag}, or {overwrite_flag} to replace it")
    if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        raise UserError(f"{flag} {path}: its folder does not exist")


def write_output_file(path, write, what):
    """write(f) into path atomically (see atomic_write): a full disk is one line and an older file
    of that name stays whole."""
    with disk_write(what, os.path.dirname(os.path.abspath(path)), then=f"{path} is as it was: free disk space"):
        atomic_write(path, write)


def link_or_copy(src, dst):
    # a hard link costs no disk; the atomic rename keeps dst whole either way
    tmp = temp_path(dst)
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def is_write_failure(error):
    """A full disk, as each library reports it: OSError (Python, transformers), SafetensorError, a
    RuntimeError from torch's zip writer, a bare Exception '... (os error 28)' from tokenizers."""
    from safetensors import SafetensorError
    return (isinstance(error, (OSError, SafetensorError)) or "(os error" in str(error)
            or isinstance(error, RuntimeError) and "inline_container" in str(error))


@contextmanager
def disk_write(what, folder, then="the previous checkpoint is intact: free disk space and resume", partial=None):
    """A write that a full disk can stop ends in one line: what, why, the space left and what to do.
    partial: a half-written folder to remove, giving its space back."""
    try:
        yield
    except Exception as e:
        if not is_write_failure(e):
            raise  # a bug, not the disk: shown in full
        if partial:
            shutil.rmtree(partial, ignore_errors=True)
        error = e if isinstance(e, OSError) else OSError(0, (str(e).strip().splitlines() or [type(e).__name__])[0])
        raise UserError(f"could not save {what} ({write_failure(error, folder)}); {what_to_do(error, then)}")


NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)


TAKEN = (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR)


def write_failure(error, folder):
    """What to tell the user when a save failed: the reason, and the disk space left where the
    disk may be the cause."""
    reason = error.strerror or str(error)
    if error.errno in NOT_WRITABLE + TAKEN:
        return reason
    try:
        free = f", {shutil.disk_usage(folder).free / 2**20:.1f} MiB free"
    except OSError:
        free = ""
    return f"{reason}{free}"


def what_to_do(error, then):
    """The fix for a failed write: `then` (free disk space, the usual cause) unless the error says otherwise."""
    if error.errno in NOT_WRITABLE:
        return "the folder is read-only or not yours: fix its permissions, or write somewhere else"
    if error.errno in TAKEN:
        return "something else was written there meanwhile (another run?): write somewhere else"
    return then


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


# -----------------------------------------------------------------------------
# a run's log.jsonl: one record a line

def append_jsonl(path, record):
    """One line of a run's log.jsonl; a full disk is one line, not a traceback."""
    try:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as e:
        raise UserError(f"could not write {path} ({write_failure(e, os.path.dirname(os.path.abspath(path)))}): "
             "free disk space and resume")


def trim_jsonl(path, keep):
    """Keep the records of a log for which keep(record) holds (a resumed run writes the later ones
    again); a line a kill cut short goes too. Rewritten atomically: a kill meanwhile loses nothing."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                record = json.loads(line) if line.endswith("\n") else None
            except ValueError:
                record = None
            if isinstance(record, dict) and keep(record):
                kept.append(line)
    try:
        atomic_write_text(path, "".join(kept))
    except OSError as e:
        raise UserError(f"could not rewrite {path} ({write_failure(e, os.path.dirname(os.path.abspath(path)))}): "
             "free disk space and resume")
