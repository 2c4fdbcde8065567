"""
train.py's checkpoints and out_dir: the folder claimed for one run, checkpoints read back checked,
the GPT they hold, the vocabulary they were trained with.
"""
import glob
import importlib.util
import os
import re

import torch

import files
import gpt_lora
from configurator import UserError
from gpt_data import dataset_vocabulary
from runtime import say
from training import set_rng_state

# -----------------------------------------------------------------------------
# the output folder

def claim_out_dir(folder, our_files, new_run, overwrite, auto_resume=False):
    """train.py's out_dir for this run: locked, our half-written temp files of a killed run
    removed, and another run's files (our_files, a regex) kept unless overwrite. Under auto_resume a
    log.jsonl alone is this run's own start, killed before its first checkpoint: it goes. Returns the lock."""
    lock = files.lock_folder(folder)
    files.remove_stale_temps(folder, our_files)
    previous_run = sorted(name for name in os.listdir(folder) if re.fullmatch(our_files, name))
    if previous_run and new_run:
        if not overwrite and not (auto_resume and previous_run == ['log.jsonl']):
            raise UserError(f"out_dir '{folder}' holds another run ({', '.join(previous_run)}): continue it with "
                            "--init_from=resume (or --auto_resume=True), choose another --out_dir, or pass "
                            "--overwrite=True to replace it")
        for name in previous_run:
            os.remove(os.path.join(folder, name))
    return lock


def check_shared_folder(folder, device):
    """Under DDP: every rank sees the lock file rank 0 has just written in folder, else several
    nodes do not share it (rank 0 writes checkpoints, every rank reads them on resume)."""
    import torch.distributed as dist
    path = os.path.join(folder, ".lock")
    written = [open(path).read() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(written)
    try:
        with open(path) as f:
            sees_it = f.read() == written[0]
    except OSError:
        sees_it = False
    blind = torch.tensor(float(not sees_it), device=device)
    dist.all_reduce(blind)
    if blind.item():
        raise UserError(f"{int(blind.item())} process(es) cannot see out_dir '{folder}' as rank 0 wrote it: "
                        "with several nodes, out_dir must be on a filesystem that every node shares (NFS, Lustre, ...)")


# -----------------------------------------------------------------------------
# reading checkpoints

def load_checkpoint(path, required, hint="", mmap=False):
    """A train.py checkpoint read onto the CPU (with mmap, a tensor is read only when used), checked
    to be a dict holding the keys `required`. hint ends the error lines."""
    try:
        checkpoint = torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)
    except Exception as e:  # a damaged file: whatever torch.load raises, the file is at fault
        raise UserError(f"{path} is truncated or corrupt ({type(e).__name__}){hint}")
    missing = set(required) - set(checkpoint if isinstance(checkpoint, dict) else ())
    if missing:
        raise UserError(f"{path} is not a train.py checkpoint (it lacks {', '.join(sorted(missing))}){hint}")
    return checkpoint


def load_gpt(path, hint, reuse=None):
    """The GPT in a train.py checkpoint, and the checkpoint: read onto the CPU memory-mapped, so its
    optimizer state is never read. One line (ending in hint: what to do) when there is none. A LoRA
    checkpoint on the base of `reuse` adds its adapter to that model (see gpt_lora.load)."""
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path}: {hint}")
    checkpoint = load_checkpoint(path, ('model', 'model_args'), mmap=True)
    if checkpoint.get('lora') is not None and importlib.util.find_spec('peft') is None:
        raise UserError(f"{path} holds LoRA adapters, which need peft: pip install peft")
    try:
        return gpt_lora.load(checkpoint, reuse=reuse), checkpoint
    except ValueError as e:
        raise UserError(f"{path}: {e}")


def checkpoint_vocabulary(checkpoint):
    """The character vocabulary a train.py checkpoint was trained with, or None for GPT-2's BPE. Newer
    checkpoints carry it; an older one is read from its dataset's meta.pkl, where that still is."""
    if "vocabulary" in checkpoint:
        return checkpoint["vocabulary"]
    config = checkpoint.get("config")
    dataset = config.get("dataset") if isinstance(config, dict) else None
    return dataset_vocabulary(os.path.join("data", dataset)) if isinstance(dataset, str) else None


# -----------------------------------------------------------------------------
# resuming: the checkpoint's shape wins, and what cannot continue is refused before training

def start_or_resume(out_dir, init_from):
    """auto_resume: 'resume' when out_dir holds this run's checkpoint, else init_from (check_resume refuses
    a checkpoint that another run, started from elsewhere, left there)."""
    return 'resume' if os.path.exists(os.path.join(out_dir, 'ckpt.pt')) else init_from


def load_for_resume(out_dir):
    """out_dir's ckpt.pt, read onto the CPU (the RNG states must stay there; the weights move with the
    model). Returns (checkpoint, its path, a hint naming the older checkpoints for the error lines)."""
    path = os.path.join(out_dir, 'ckpt.pt')
    older = sorted(glob.glob(os.path.join(out_dir, 'ckpt-*.pt')))
    hint = f" (older ones: {', '.join(older)}; copy one to ckpt.pt to use it)" if older else ""
    if not os.path.exists(path):
        raise UserError(f"no checkpoint at {path} to resume from{hint}: train with --init_from=scratch first")
    return load_checkpoint(path, ('model', 'model_args', 'optimizer', 'iter_num', 'best_val_loss'), hint), path, hint


SHAPE = ('n_layer', 'n_head', 'n_embd', 'block_size', 'bias', 'vocab_size')


def adopt_shape(checkpoint, path, config, explicit_keys, model_args):
    """The model's shape and LoRA settings come from the checkpoint (into model_args, or config for
    LoRA); one given on the command line that differs is refused."""
    saved = dict(checkpoint['model_args'], **gpt_lora.settings(checkpoint))
    for k in (*SHAPE, *gpt_lora.SETTINGS):
        if k in explicit_keys and k in saved and config[k] != saved[k]:
            raise UserError(f"the checkpoint has {k}={saved[k]} but {k}={config[k]} was given: "
                            f"drop that setting to resume, or train a new model in another out_dir")
        if k in saved:
            (model_args if k in model_args else config)[k] = saved[k]


def check_resume(checkpoint, path, config, vocabulary):
    """What the checkpoint was trained with, against this run: refuse what cannot continue (another
    vocabulary or optimizer, an iteration past max_iters), note what changes the batches."""
    trained = checkpoint.get('config', {})
    if config['auto_resume'] and trained.get('init_from', config['init_from']) != config['init_from']:
        raise UserError(f"{path} belongs to a run started from init_from={trained.get('init_from')!r}, not "
                        f"{config['init_from']!r}: give that run's command, or another out_dir")
    if checkpoint_vocabulary(checkpoint) != vocabulary:
        raise UserError(f"data/{config['dataset']} has another vocabulary than {path} was trained on (other "
                        f"characters, or characters against GPT-2's BPE): resume on its dataset "
                        f"({trained.get('dataset')}), or train a new model elsewhere")
    was = trained.get('optimizer', 'adamw')
    if was != config['optimizer']:
        raise UserError(f"{path} was trained with optimizer='{was}', whose state cannot become "
                        f"'{config['optimizer']}'s: resume with --optimizer={was}")
    if checkpoint['iter_num'] > config['max_iters'] and not config['eval_only']:
        raise UserError(f"{path} is at iter {checkpoint['iter_num']}, past max_iters={config['max_iters']}: raise "
                        "--max_iters to train on, or pass --eval_only=True to evaluate it")
    for k in ('dataset', 'batch_size', 'gradient_accumulation_steps', 'seed'):
        if k in trained and trained[k] != config[k]:
            say(f"note: {k}={config[k]!r} where the checkpoint had {trained[k]!r}: the batches from here on are "
                "not those of an unbroken run")


def restore_state(checkpoint, path, model, optim, scaler, rank, world_size):
    """The optimizer and scaler state (into an FSDP run's shards too), and this process's RNG states when
    the checkpoint has one per process of this run (else dropout's noise differs, and the note says so)."""
    try:
        if is_sharded(model):
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
            set_optimizer_state_dict(model, optim, keyed_by_name(checkpoint['optimizer'], param_names(model, optim)),
                                     options=StateDictOptions(full_state_dict=True))
        else:
            optim.load_state_dict(checkpoint['optimizer'])
        if 'scaler' in checkpoint:
            scaler.load_state_dict(checkpoint['scaler'])
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: its optimizer state does not fit this model or optimizer ({type(e).__name__}: "
                        f"{e}); resume with the optimizer it was saved with") from None
    rng_states = checkpoint.get('rng')
    if rng_states is not None and len(rng_states) == world_size:
        set_rng_state(rng_states[rank])
    else:
        say("note: the checkpoint's RNG states do not match this run's processes; dropout noise will differ")


# -----------------------------------------------------------------------------
# one checkpoint format for every layout: an FSDP run's shards are gathered into what one process saves

def is_sharded(model):
    return any(hasattr(p, 'full_tensor') for p in model.parameters())  # FSDP's DTensors


def full_state(model, optim):
    """(weights, LoRA entry, optimizer state) as a one-process run saves them. Under FSDP a collective
    (every rank calls it) that gathers the whole onto rank 0's CPU: its host memory is the limit."""
    if not is_sharded(model):
        return (*gpt_lora.checkpoint_weights(model), optim.state_dict())
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    if 'lm_head.weight' in weights:  # tied to wte, but gathered as a copy: save one tensor, as one process does
        weights['lm_head.weight'] = weights['transformer.wte.weight']
    by_name = get_optimizer_state_dict(model, optim, options=options)
    if not by_name:  # cpu_offload gathers onto rank 0 only
        return weights, None, None
    index = {name: i for i, name in enumerate(param_names(model, optim))}  # optim.state_dict()'s numbering
    return weights, None, {'state': {index[name]: value for name, value in by_name['state'].items()},
                           'param_groups': [dict(group, params=[index[name] for name in group['params']])
                                            for group in by_name['param_groups']]}


def param_names(model, optim):
    """The names of the optimizer's parameters, in the order optimizer.state_dict() numbers them."""
    names = {param: name for name, param in model.named_parameters()}
    return [names[param] for group in optim.param_groups for param in group['params']]


def keyed_by_name(state, names):
    """An optimizer state dict numbered as optimizer.state_dict() does, keyed by parameter name instead."""
    return {'state': {names[i]: value for i, value in state['state'].items()},
            'param_groups': [dict(group, params=[names[i] for i in group['params']])
                             for group in state['param_groups']]}


def trim_log(path, iter_num, last_eval_iter):
    """Drop the log.jsonl lines a killed run wrote past the checkpoint it resumes from (iter_num)."""
    files.trim_jsonl(path, lambda r: r.get('iter', iter_num) < iter_num or (
        r.get('iter') == iter_num and 'val_loss' in r and last_eval_iter == iter_num))


# -----------------------------------------------------------------------------
# saving

def save(checkpoint, out_dir, is_best, previous_iter, keep_last):
    """Atomically write ckpt.pt; keep the one saved at previous_iter as ckpt-<iter>.pt (keep_last of
    them) and the best-val one as best.pt. A failed write leaves the previous checkpoint whole."""
    path = os.path.join(out_dir, 'ckpt.pt')
    try:
        if keep_last > 0 and previous_iter is not None and os.path.exists(path):
            files.link_or_copy(path, os.path.join(out_dir, f'ckpt-{previous_iter:07d}.pt'))
        files.atomic_torch_save(checkpoint, path)
        if is_best:
            files.link_or_copy(path, os.path.join(out_dir, 'best.pt'))
    except OSError as e:
        raise UserError(f"could not save a checkpoint in {out_dir} ({files.write_failure(e, out_dir)}); the "
                        f"previous one is intact: {files.what_to_do(e, 'free disk space and resume')}") from None
    for old in sorted(glob.glob(os.path.join(out_dir, 'ckpt-*.pt')))[:-keep_last or None]:
        os.remove(old)
