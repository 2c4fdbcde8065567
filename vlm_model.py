"""
The model of train_ds.py: a vision-language model from its Auto class, optionally in 4 bits, with
what trains chosen by the flags. A VLM has three parts, named the same way in Qwen2-VL, Qwen2.5-VL
and LLaVA-1.5: the vision tower (`visual`, `vision_tower`), the projector into the language model
(Qwen's `merger`, inside its vision tower; LLaVA's `multi_modal_projector`), and the language model.
By default only the language model trains (fully, or through LoRA); --train-projector,
--train-vision and --vision-lora add the others, each part with its own learning rate.
"""
import os

import torch
from transformers import AutoConfig, AutoModelForImageTextToText

from configurator import UserError
from files import disk_write
from runtime import barrier, rank, say
from vlm_data import first_line

VISION_TOWERS = ("visual", "vision_tower")
PROJECTORS = ("merger", "multi_modal_projector")


def part_of(name):
    """'projector', 'vision' or 'language': the part a parameter or module name belongs to."""
    parts = name.split(".")
    return "projector" if any(p in PROJECTORS for p in parts) else "vision" if any(p in VISION_TOWERS for p in parts) \
        else "language"


def from_pretrained(path, **kwargs):
    try:
        return AutoModelForImageTextToText.from_pretrained(path, **kwargs)
    except Exception as e:  # a missing file or package, a model type this transformers lacks, no memory: one line
        raise UserError(f"cannot load the model from {path}: {type(e).__name__}: {first_line(e)}")


def random_init_folder(args):
    """--random-init: random weights from the config, saved once and loaded the normal way (4-bit needs that)."""
    folder = os.path.join(args.output_dir, "random-init")
    if rank() == 0 and not os.path.exists(folder):
        config = AutoConfig.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
        random_model = AutoModelForImageTextToText.from_config(config, trust_remote_code=args.trust_remote_code)
        with disk_write("the random-init weights", args.output_dir, "free disk space and run again", partial=folder):
            random_model.save_pretrained(folder)
    barrier()
    return folder


def load_model(args, dtype, device, zero3):
    from transformers import BitsAndBytesConfig
    kwargs = dict(dtype=dtype, trust_remote_code=args.trust_remote_code, attn_implementation=args.attn_implementation)
    if args.use_4bit:  # the vision tower, the projector and lm_head stay 16-bit
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype,
            bnb_4bit_quant_storage=dtype if zero3 else torch.uint8,  # ZeRO-3 partitions only float storage
            llm_int8_skip_modules=[f"model.{name}" for name in VISION_TOWERS + PROJECTORS[1:]] + ["lm_head"])
        if not zero3:
            kwargs["device_map"] = {"": device}
    model = from_pretrained(random_init_folder(args) if args.random_init else args.model, **kwargs)
    trains = {"language": True, "vision": args.train_vision, "projector": args.train_projector}
    for name, param in model.named_parameters():  # under LoRA peft picks what trains
        param.requires_grad_(trains[part_of(name)] and not args.use_lora)
    checkpointing = {"gradient_checkpointing_kwargs": {"use_reentrant": False}}
    if args.use_4bit:
        from peft import prepare_model_for_kbit_training
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.gradient_checkpointing,
                                                **checkpointing)
        for name, param in model.named_parameters():
            if part_of(name) != "language":  # it upcast everything to fp32; the vision side need not be
                param.data = param.data.to(dtype)
    elif args.gradient_checkpointing:
        model.gradient_checkpointing_enable(**checkpointing)
        if args.use_lora:
            model.enable_input_require_grads()  # else checkpointed blocks see no input needing grad
    if args.use_lora:
        model = add_lora(model, args)
    parameter_count = lambda params: sum(getattr(p, "ds_numel", p.numel()) for p in params)  # ZeRO-3: numel() is 0
    say(f"{parameter_count(p for p in model.parameters() if p.requires_grad):,} trainable of "
        f"{parameter_count(model.parameters()):,} parameters")
    return model


def lora_targets(model, args):
    """Full names of the linear layers that get LoRA: the language model's (--lora-target-modules picks
    them by name), and with --vision-lora the vision tower's; never the projector or lm_head. The
    vision towers use the language model's names (q_proj, gate_proj, ...), hence full names."""
    parts = ("language", "vision") if args.vision_lora else ("language",)
    linear = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)  # bnb's 4-bit too
              and part_of(name) in parts and name.split(".")[-1] != "lm_head"]
    if not args.lora_target_modules:
        return linear
    wanted = args.lora_target_modules.split(",")
    for leaf in set(wanted) - {name.split(".")[-1] for name in linear}:
        raise UserError(f"--lora-target-modules {leaf}: no linear layer of that name in the "
                        f"{' or the '.join(parts)} model; name linear layers, e.g. q_proj,v_proj")
    return [name for name in linear if name.split(".")[-1] in wanted]


def fully_trained_modules(model, args):
    """What LoRA runs train whole (peft's modules_to_save: copies saved in the adapter): --modules-to-save,
    and the projector or vision tower roots. Qwen's merger sits inside its vision tower: --train-vision trains it
    too."""
    names = args.modules_to_save.split(",") if args.modules_to_save else []
    modules = [name for name, _ in model.named_modules()]
    for wanted in names:  # peft ignores a name that matches nothing: the user would train less than asked
        if not any(name == wanted or name.endswith("." + wanted) for name in modules):
            raise UserError(f"--modules-to-save {wanted}: {args.model} has no module of that name")
    roots = (VISION_TOWERS if args.train_vision else ()) + (PROJECTORS if args.train_projector else ())
    found = [name for name in modules if name.split(".")[-1] in roots]
    found = [name for name in found if not any(name.startswith(other + ".") for other in found)]  # outermost only
    return names + found or None


def add_lora(model, args):
    from peft import LoraConfig, get_peft_model
    targets = lora_targets(model, args)
    modules = dict(model.named_modules())
    narrowest = min(min(modules[name].in_features, modules[name].out_features) for name in targets)
    if args.lora_r > narrowest:
        raise UserError(f"--lora-r {args.lora_r} is above the narrowest adapted layer's width ({narrowest}): "
                        "no layer has a rank that high; use a smaller --lora-r (8 to 64 is usual)")
    config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                        target_modules=targets, modules_to_save=fully_trained_modules(model, args))
    try:
        return get_peft_model(model, config)
    except ValueError as e:  # a module peft cannot wrap
        raise UserError(f"peft cannot apply these LoRA settings: {first_line(e)}")


def param_groups(model, args):
    """The optimizer's groups: one per part that trains, each with its own peak learning rate (the
    schedule scales them all). Vision LoRA weights are the vision part's."""
    peak = {"language": args.learning_rate, "vision": args.vision_lr, "projector": args.projector_lr}
    groups = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups.setdefault(part_of(name), []).append(param)
    return [{"params": params, "peak_lr": args.learning_rate if peak[part] is None else peak[part]}
            for part, params in groups.items()]
