"""
train.py's settings beyond their defaults (which stay at the top of train.py): each one's valid range,
and the ones that must agree. train.py, bench.py and plan.py check with these.
"""
import importlib.util
import os

import torch

import gpt_lora
from configurator import UserError, check_ranges, read_defaults
from gpt_data import load_meta
from model import GPT, PRETRAINED
from runtime import ATTENTION_BACKENDS, COMPILE_MODES


def train_defaults():
    """train.py's settings as its top block sets them, read without running it (for bench.py and plan.py)."""
    return read_defaults(os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py"))


TRAIN_RANGES = {  # train.py's numeric settings; bench.py and plan.py take the same ones
    'eval_interval': '[1, inf)', 'log_interval': '[1, inf)', 'eval_iters': '[1, inf)', 'keep_last': '[0, inf)',
    'patience': '[0, inf)', 'gradient_accumulation_steps': '[1, inf)', 'batch_size': '[1, inf)',
    'block_size': '[1, inf)', 'n_layer': '[1, inf)', 'n_head': '[1, inf)', 'n_embd': '[1, inf)', 'dropout': '[0, 1)',
    'learning_rate': '[0, inf)', 'max_iters': '[0, inf)', 'weight_decay': '[0, inf)', 'beta1': '[0, 1)',
    'beta2': '[0, 1)', 'grad_clip': '[0, inf)', 'max_nonfinite_steps': '[1, inf)', 'warmup_iters': '[0, inf)',
    'lr_decay_iters': '[0, inf)', 'min_lr': '[0, inf)', 'seed': '[0, 4294967296)',
    'lora_rank': '[0, inf)', 'lora_alpha': '(0, inf)', 'lora_dropout': '[0, 1)',
    'muon_learning_rate': '(0, inf)', 'muon_momentum': '[0, 1)', 'checkpoint_minutes': '[0, inf)',
    'max_hours': '[0, inf)', 'price_per_hour': '[0, inf)',
}


def check_train_settings(config):
    """train.py's settings, alone and together: one line for the first one that cannot work."""
    check_ranges(config, TRAIN_RANGES)
    c = config
    if c['n_embd'] % c['n_head']:
        raise UserError(f"n_embd={c['n_embd']} is not divisible by n_head={c['n_head']}: "
                        "every head gets n_embd/n_head channels")
    if c['decay_lr'] and c['lr_decay_iters'] <= c['warmup_iters']:
        raise UserError(f"lr_decay_iters={c['lr_decay_iters']} must be larger than warmup_iters={c['warmup_iters']} "
             "(the cosine decay runs between them), or set --decay_lr=False")
    if c['decay_lr'] and c['min_lr'] > c['learning_rate']:
        raise UserError(f"min_lr={c['min_lr']} is above learning_rate={c['learning_rate']}: the decay would raise it; "
             "set --min_lr (learning_rate/10 is usual) or --decay_lr=False")
    if c['optimizer'] not in ('adamw', 'adamw8bit', 'muon'):
        raise UserError(f"optimizer='{c['optimizer']}' is unknown: use adamw, adamw8bit or muon")
    if c['optimizer'] == 'muon' and not c['learning_rate']:
        raise UserError("optimizer='muon' scales Muon's rate with the schedule of learning_rate: "
                        "give learning_rate > 0")
    if c['optimizer'] == 'muon' and not hasattr(torch.optim, 'Muon'):
        raise UserError(f"optimizer='muon' needs torch.optim.Muon (PyTorch 2.9 or newer; this is {torch.__version__})")
    if c['compile_mode'] not in COMPILE_MODES:
        raise UserError(f"compile_mode='{c['compile_mode']}' is unknown: use {', '.join(COMPILE_MODES)}")
    if c['attention_backend'] not in ATTENTION_BACKENDS:
        raise UserError(f"attention_backend='{c['attention_backend']}' is unknown: use {', '.join(ATTENTION_BACKENDS)}")
    if c['backend'] not in ('nccl', 'gloo'):
        raise UserError(f"backend='{c['backend']}' is unknown: use nccl (GPUs) or gloo")
    if not c['out_dir'] or not c['dataset'] or not c['hellaswag_file']:
        raise UserError("out_dir, dataset and hellaswag_file must not be empty")
    init_from = c['init_from']
    if not (init_from in ('scratch', 'resume') or init_from in PRETRAINED or os.path.isdir(init_from)):
        raise UserError(f"init_from='{init_from}' is neither scratch, resume, one of {', '.join(PRETRAINED)}, "
             "nor a folder with a Hugging Face GPT-2 checkpoint")
    for name, value, why in (('optimizer', c['optimizer'] != 'adamw', f"optimizer='{c['optimizer']}'"),
                             ('lora_rank', c['lora_rank'], 'LoRA'), ('dtype', c['dtype'] == 'float16', 'float16'),
                             ('eval_hellaswag', c['eval_hellaswag'], 'eval_hellaswag')):
        if c['fsdp'] and value:  # not built yet: each one line, not a hang or a wrong result
            raise UserError(f"fsdp=True does not run with {why} yet: use --fsdp=False (DDP), or drop --{name}")
    if c['fsdp_offload'] and not c['fsdp']:
        raise UserError("fsdp_offload=True offloads FSDP's shards: add --fsdp=True (under torchrun), or drop it")
    unknown = set(c['lora_targets'].split(',')) - set(gpt_lora.TARGETS)
    if unknown:
        raise UserError(f"lora_targets='{c['lora_targets']}' names {', '.join(sorted(unknown))}: use a comma-separated "
             f"list of {', '.join(gpt_lora.TARGETS)}")
    if c['lora_rank'] and init_from == 'scratch':
        raise UserError("lora_rank > 0 adapts a pretrained model: use --init_from=gpt2 (or gpt2-medium, ..., "
                        "or a Hugging Face folder), or --lora_rank=0 to train from scratch")
    if c['lora_rank'] and importlib.util.find_spec('peft') is None:
        raise UserError("lora_rank > 0 needs peft: pip install peft")


def gpt_shape(config, model_args=None):
    """n_layer, n_head, n_embd, vocab_size, block_size, bias as train.py will build them from its
    settings (a pretrained name, a Hugging Face folder, or scratch with the dataset's meta.pkl);
    model_args, when given, are the sizes train.py did build."""
    shape = {k: config[k] for k in ("n_layer", "n_head", "n_embd", "block_size", "bias")}
    shape["vocab_size"] = 50304
    init_from = config["init_from"]
    if init_from in PRETRAINED:
        shape.update(PRETRAINED[init_from], vocab_size=50257, bias=True)
    elif os.path.isdir(init_from):
        try:
            hf = GPT.hf_config_args(init_from)
        except ValueError as e:
            raise UserError(str(e)) from None
        shape.update({k: hf[k] for k in ("n_layer", "n_head", "n_embd", "vocab_size")}, bias=True)
    else:
        meta = os.path.join("data", config["dataset"], "meta.pkl")
        if init_from == "scratch" and os.path.exists(meta):
            shape["vocab_size"] = load_meta(meta)["vocab_size"]
    shape.update({k: model_args[k] for k in shape if model_args and model_args.get(k) is not None})
    return shape
