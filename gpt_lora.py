"""
LoRA for model.GPT, through peft: low-rank adapters on the frozen weights of a pretrained GPT-2.

peft wraps the chosen Linears in place (inject_adapter_in_model), so the model stays our GPT, with
its generate() and KV cache. A checkpoint then holds the adapter weights, the LoRA settings and the
base model's name (a GPT-2 name or a folder), never the base weights, and a checksum of those to
notice a base that has changed since. load() rebuilds either kind of checkpoint.
"""
import math
import warnings

import torch

from configurator import UserError
from model import GPT

TARGETS = ("c_attn", "c_proj", "c_fc")  # the Linears that can be adapted (c_proj: attention's and the MLP's)
SETTINGS = ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets")  # train.py's


def add(model, rank, alpha, dropout, targets, name="default"):
    """Wrap the Linears named in targets in a LoRA adapter, freeze every other weight, and make
    this adapter the active one. Several adapters can sit on one base (classify.py)."""
    from peft import LoraConfig, inject_adapter_in_model
    if model.pretrained_from is None:
        raise ValueError("LoRA adapts pretrained weights: load them with GPT.from_pretrained first")
    if rank > model.config.n_embd:
        raise UserError(f"lora_rank={rank} is above the model's width n_embd={model.config.n_embd}: no layer has a "
                        "rank that high; use a smaller --lora_rank (4 to 64 is usual)")
    if getattr(model, "checksum_of_base", None) is None:
        model.checksum_of_base = base_checksum(model)
    with warnings.catch_warnings():  # peft warns whenever an adapter joins another one
        warnings.simplefilter("ignore")
        config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets))
        inject_adapter_in_model(config, model, adapter_name=name)
    model.lora = dict(rank=rank, alpha=alpha, dropout=dropout, targets=list(targets), name=name)
    activate(model, name)


def activate(model, name):
    from peft.tuners.tuners_utils import BaseTunerLayer
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.set_adapter(name)


def base_checksum(model):
    """A float64 sum of every base weight (the adapters left out)."""
    return sum(p.sum(dtype=torch.float64).item() for name, p in model.named_parameters() if "lora_" not in name)


def checkpoint_weights(model):
    """(weights, lora) for a checkpoint: all the weights and None, or under LoRA only the active
    adapter's weights and what rebuilds the model around them."""
    if model.lora is None:
        return model.state_dict(), None
    from peft import get_peft_model_state_dict
    lora = dict(model.lora, base=model.pretrained_from, base_checksum=model.checksum_of_base)
    return get_peft_model_state_dict(model, adapter_name=model.lora["name"]), lora


def settings(checkpoint):
    """The train.py LoRA settings a checkpoint was trained with ({'lora_rank': 0} without LoRA)."""
    lora = checkpoint.get("lora")
    if lora is None:
        return {"lora_rank": 0}
    return dict(lora_rank=lora["rank"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                lora_targets=",".join(lora["targets"]))


def load(checkpoint, dropout=0.0, reuse=None):
    """The GPT of a train.py checkpoint, with or without LoRA. A LoRA checkpoint's base is loaded by
    name, or is `reuse` (a model from another LoRA checkpoint on the same base), which then gets this
    adapter too, as the active one. Raises ValueError, naming the problem."""
    lora = checkpoint.get("lora")
    if lora is None:
        return GPT.from_checkpoint(checkpoint, dropout)
    block_size = checkpoint.get("model_args", {}).get("block_size")
    if not isinstance(lora, dict) or not {"rank", "alpha", "dropout", "targets", "base", "base_checksum"} <= set(lora) \
            or not isinstance(checkpoint.get("model"), dict) or not isinstance(block_size, int):
        raise ValueError("its LoRA entries ('lora', 'model', 'model_args') are missing or malformed")
    shared = reuse is not None and reuse.lora is not None and \
        (reuse.pretrained_from, reuse.checksum_of_base, reuse.config.block_size) \
        == (lora["base"], lora["base_checksum"], block_size)
    if shared:
        model, name = reuse, f"adapter{len(reuse.peft_config)}"
    else:
        model, name = load_base(lora, block_size, dropout), "default"
    add(model, lora["rank"], lora["alpha"], lora["dropout"], lora["targets"], name)
    load_adapter(model, checkpoint["model"], name)
    return model


def load_base(lora, block_size, dropout):
    """The pretrained model a LoRA checkpoint names, checked against the checksum it recorded."""
    try:
        model = GPT.from_pretrained(lora["base"], dict(dropout=dropout))
    except ValueError as e:
        raise ValueError(f"its base model {lora['base']}: {e}") from None
    if block_size < model.config.block_size:
        model.crop_block_size(block_size)
    model.checksum_of_base = base_checksum(model)
    if not math.isclose(model.checksum_of_base, lora["base_checksum"], rel_tol=1e-9, abs_tol=1e-6):
        raise ValueError(f"its base model {lora['base']} now has other weights than those its adapter was trained on")
    return model


def load_adapter(model, weights, name):
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    expected = set(get_peft_model_state_dict(model, adapter_name=name))
    if set(weights) != expected:
        raise ValueError("its adapter weights do not fit its LoRA settings "
                         f"(e.g. {sorted(set(weights) ^ expected)[0]})")
    try:
        set_peft_model_state_dict(model, weights, adapter_name=name)
    except RuntimeError as e:
        raise ValueError("its adapter weights do not fit its LoRA settings "
                         f"({str(e).splitlines()[-1].strip()})") from None


def merge(model):
    """Fold the active adapter into the base weights and drop peft's wrappers: a plain GPT again,
    as export.py writes it."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.get_base_layer())
    model.lora = None
    model.__dict__.pop("peft_config", None)
    return model
