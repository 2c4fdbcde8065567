"""memory.py's byte counts against the real tensors after one optimizer step; plan.py's MFU source,
its docs/PLANNING.md tables and the start-up lines of the training scripts."""
import ast
import json
import os
import shutil
import types

import pytest
import torch
import vlm_fixtures
from conftest import REPO

import gpt_lora
import memory
import plan
from configurator import UserError
from gpt_settings import gpt_shape
from model import GPT, GPTConfig


def tensor_bytes(tensors):
    """Bytes of distinct storages (shared tensors such as tied weights or 8-bit maps count once)."""
    seen = {}
    for t in tensors:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def optimizer_tensors(optimizer):
    return [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]


def one_step(model, optimizer, loss):
    loss.backward()
    optimizer.step()


def tiny_gpt_shape(bias=True):
    return dict(n_layer=2, n_head=2, n_embd=64, block_size=16, bias=bias, vocab_size=96)


# -----------------------------------------------------------------------------
# GPT bytes

@pytest.mark.parametrize("optimizer_name,bias", [("adamw", True), ("adamw", False), ("adamw8bit", True)])
def test_gpt_weights_gradients_optimizer_bytes_match_real_tensors(optimizer_name, bias):
    if optimizer_name == "adamw8bit":
        pytest.importorskip("bitsandbytes")
    shape = tiny_gpt_shape(bias)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**shape))
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu", optimizer_name)
    x = torch.randint(0, 96, (2, 16))
    one_step(model, optimizer, model(x, x)[1])

    predicted = memory.gpt_memory(shape, batch_size=2, world_size=1, dtype="float32", optimizer=optimizer_name)
    params = list(model.parameters())
    assert predicted["weights"] == tensor_bytes(params)
    assert predicted["gradients"] == tensor_bytes([p.grad for p in params])
    assert predicted["optimizer"] == tensor_bytes(optimizer_tensors(optimizer))


@pytest.mark.parametrize("targets", [gpt_lora.TARGETS, ("c_attn",)])
def test_gpt_lora_weights_gradients_optimizer_bytes_match_real_tensors(targets):
    shape = tiny_gpt_shape()
    torch.manual_seed(0)
    model = GPT(GPTConfig(**shape))
    model.pretrained_from = "random weights, standing in for pretrained ones"
    gpt_lora.add(model, 4, 8.0, 0.1, targets)
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    x = torch.randint(0, 96, (2, 16))
    one_step(model, optimizer, model(x, x)[1])

    predicted = memory.gpt_memory(shape, batch_size=2, world_size=1, dtype="float32", lora_rank=4, lora_targets=targets)
    params = list(model.parameters())
    assert predicted["weights"] == tensor_bytes(params)
    assert all(p.grad is None for p in params if not p.requires_grad)  # the frozen base has no gradients
    assert predicted["gradients"] == tensor_bytes([p.grad for p in params if p.requires_grad])
    assert predicted["optimizer"] == tensor_bytes(optimizer_tensors(optimizer))


@pytest.mark.parametrize("bias", [True, False])
def test_gpt_parameter_count_matches_the_model(bias):
    shape = tiny_gpt_shape(bias)
    assert sum(n for n, _, _ in memory.gpt_params(shape)) == GPT(GPTConfig(**shape)).get_num_params(non_embedding=False)


def gpt2_medium_peak(batch_size=2, activation_checkpointing=False):
    shape = gpt_shape(plan.gpt_config([os.path.join(REPO, "config/finetune_gpt2_medium.py")]))
    return sum(memory.gpt_memory(shape, batch_size, 1, "bfloat16",
                                 activation_checkpointing=activation_checkpointing).values())


def test_a_bigger_batch_needs_more_memory():
    assert gpt2_medium_peak(batch_size=1) < gpt2_medium_peak(batch_size=2)


def test_activation_checkpointing_needs_less_memory():
    assert gpt2_medium_peak(activation_checkpointing=True) < gpt2_medium_peak()


def test_the_fused_loss_counts_one_chunk_of_logits_not_all_of_them():
    shape = gpt_shape(plan.gpt_config([]))  # GPT-2 small, as train.py's defaults
    plain, fused = (memory.gpt_memory(shape, 8, 1, "float16", fused_loss=f) for f in (False, True))
    GiB = 2 ** 30
    assert plain["logits + loss"] > 5 * GiB and fused["logits + loss"] < 0.6 * GiB  # B*T*V at 8 x 1024, or a chunk
    assert all(plain[k] == fused[k] for k in plain if k not in ("logits + loss", "activations"))
    config = plan.gpt_config(["--batch_size=8", "--gradient_accumulation_steps=8", "--fused_loss=False"])
    assert plan.gpt_setups(config)[:2] == [("", {}), ("--fused_loss=True", {"fused_loss": True})]
    # settings the config has already are not offered again: each way to run it once
    assert plan.gpt_setups(dict(config, fused_loss=True, activation_checkpointing=True)) == \
        [("", {}), ("--optimizer=adamw8bit", {"optimizer": "adamw8bit"})]


def test_plan_takes_the_largest_micro_batch_that_fits_and_says_what_it_costs(capsys):
    plan.plan([os.path.join(REPO, "config/finetune_gpt2_medium.py"), "--gpu=A100_80GB", "--gpus=1"])
    row, line = capsys.readouterr().out.strip().splitlines()[-2:]
    config = plan.gpt_config([os.path.join(REPO, "config/finetune_gpt2_medium.py")])
    assert (config["batch_size"], config["gradient_accumulation_steps"]) == (2, 16)
    # its 32 sequences per step in one micro-step on an 80 GB card
    assert "`--batch_size=32 --gradient_accumulation_steps=1`" in row
    assert line.startswith("micro-batch on A100 80GB x 1: 32 in 1 micro-step(s)") and "the config's 2 in 16" in line


def test_lora_drops_gradients_and_optimizer_state_to_a_fraction():
    shape = gpt_shape(plan.gpt_config([os.path.join(REPO, "config/finetune_gpt2_medium.py")]))
    full = memory.gpt_memory(shape, 2, 1, "bfloat16")
    lora = memory.gpt_memory(shape, 2, 1, "bfloat16", lora_rank=8, lora_dropout=0.05)
    assert lora["weights"] < 1.01 * full["weights"]  # the frozen model, plus adapters of <1% its size
    for part in ("gradients", "optimizer"):
        assert lora[part] < 0.01 * full[part]
    assert sum(lora.values()) < 0.65 * sum(full.values())


# -----------------------------------------------------------------------------
# VLM bytes

def tiny_qwen2_vl_config():
    return vlm_fixtures.tiny_qwen2_vl_config(tie_word_embeddings=False)  # untied: lm_head counted on its own


def is_vision(name):
    return any(part in f".{name}" for part in (".visual.", ".vision_tower.", ".multi_modal_projector."))


def add_lora(model, r):
    # what train_ds.py does: LoRA on every linear layer of the language model, vision frozen
    from peft import LoraConfig, get_peft_model
    targets = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    return get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.05, target_modules=targets))


def quant_state_tensors(state):
    """Every tensor a bitsandbytes QuantState holds, nested states included: which ones exist
    depends on the machine (on CPUs with AVX512-BF16 an inference forward repacks the weight and
    drops the nested statistics), so count what is there."""
    for value in vars(state).values():
        if torch.is_tensor(value):
            yield value
        elif type(value).__name__ == "QuantState":
            yield from quant_state_tensors(value)


def vlm_step_and_compare(model, arch, use_4bit, **flags):
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:  # train_ds.py without DeepSpeed: fp32 trainable weights
        p.data = p.data.float()
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    ids = torch.randint(0, 280, (1, 12))
    image = {}
    if flags:  # the vision side trains: one 56x56 image (4x4 patches, 4 tokens after the 2x2 merge) runs it
        ids[0, 2:6] = model.config.image_token_id
        image = dict(pixel_values=torch.randn(16, 3 * 2 * 14 * 14), image_grid_thw=torch.tensor([[1, 4, 4]]),
                     mm_token_type_ids=(ids == model.config.image_token_id).int())
    model.train()  # as train_ds.py trains (from_pretrained returns a model in eval mode)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids, **image).loss
    one_step(model, optimizer, loss)

    predicted = memory.vlm_memory(arch, world_size=1, zero=None, batch_size=1, max_length=12, max_pixels=200704,
                                  use_lora=True, lora_r=4, lora_dropout=0.05, use_4bit=use_4bit,
                                  gradient_checkpointing=False, weight_bytes=2, **flags)
    # 4-bit weights keep their scales in a quant_state beside them; bitsandbytes sometimes shares the
    # small code tables between tensors (by process history), so those are counted per weight
    quant_states = {id(m.weight): m.weight.quant_state for m in model.modules()
                    if getattr(getattr(m, "weight", None), "quant_state", None) is not None}
    scales = sum(t.untyped_storage().nbytes() for s in quant_states.values() for t in quant_state_tensors(s))
    assert predicted["weights"] == tensor_bytes(model.parameters()) + scales
    assert predicted["gradients"] == tensor_bytes([p.grad for p in trainable])
    assert predicted["optimizer"] == tensor_bytes(optimizer_tensors(optimizer))


def test_vlm_parameter_groups_match_qwen2_vl():
    from transformers import Qwen2VLForConditionalGeneration
    config = tiny_qwen2_vl_config()
    model = Qwen2VLForConditionalGeneration(config)
    counts = memory.vlm_params(memory.vlm_arch("tiny", config.to_dict()))
    vision = sum(p.numel() for n, p in model.named_parameters() if is_vision(n))
    assert counts["vision"] == vision == sum(counts["merger"]) + sum(counts["tower"])
    assert sorted(counts["merger"]) == sorted(p.numel() for n, p in model.named_parameters() if ".merger." in n)
    assert counts["lm_linear"] + counts["lm_other"] + counts["lm_head"] \
        == sum(p.numel() for p in model.parameters()) - vision


def test_vlm_lora_bytes_match_real_tensors():
    from transformers import Qwen2VLForConditionalGeneration
    config = tiny_qwen2_vl_config()
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(config).to(torch.bfloat16)
    model.requires_grad_(False)
    model = add_lora(model, r=4)
    vlm_step_and_compare(model, memory.vlm_arch("tiny", config.to_dict()), use_4bit=False)


def test_vlm_bytes_match_real_tensors_when_the_projector_and_vision_lora_train():
    from transformers import Qwen2VLForConditionalGeneration

    import train_ds
    import vlm_model
    config = tiny_qwen2_vl_config()
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(config).to(torch.bfloat16)
    model.requires_grad_(False)
    args = train_ds.parse_args(["--use-lora", "--lora-r", "4", "--train-projector", "--vision-lora"])
    model = vlm_model.add_lora(model, args)  # train_ds.py's own: peft's copy of the merger trains, LoRA in the tower
    vlm_step_and_compare(model, memory.vlm_arch("tiny", config.to_dict()), use_4bit=False, train_projector=True,
                         vision_lora=True)


def test_vlm_qlora_bytes_match_real_tensors(tmp_path):
    pytest.importorskip("bitsandbytes")
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig, Qwen2VLForConditionalGeneration
    config = tiny_qwen2_vl_config()
    torch.manual_seed(0)
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.bfloat16,
                                      llm_int8_skip_modules=["model.visual", "lm_head"])  # vision stays 16-bit
    Qwen2VLForConditionalGeneration(config).save_pretrained(tmp_path)
    model = Qwen2VLForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.bfloat16,
                                                            quantization_config=quantization, device_map={"": "cpu"})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    for name, param in model.named_parameters():
        if is_vision(name):  # as train_ds.py: the frozen vision tower back to 16 bits
            param.data = param.data.to(torch.bfloat16)
    model = add_lora(model, r=4)
    vlm_step_and_compare(model, memory.vlm_arch("tiny", config.to_dict()), use_4bit=True)


def test_vlm_parameter_groups_match_llava(tmp_path):
    from transformers import LlavaForConditionalGeneration
    folder = vlm_fixtures.write_llava(str(tmp_path / "llava"))
    model = LlavaForConditionalGeneration.from_pretrained(folder)
    counts = memory.vlm_params(memory.vlm_arch(folder))
    vision = sum(p.numel() for n, p in model.named_parameters() if is_vision(n))
    assert counts["vision"] == vision == sum(counts["merger"]) + sum(counts["tower"])
    assert sorted(counts["merger"]) == sorted(p.numel() for n, p in model.named_parameters()
                                              if ".multi_modal_projector." in n)
    assert counts["lm_linear"] + counts["lm_other"] + counts["lm_head"] \
        == sum(p.numel() for p in model.parameters()) - vision


@pytest.mark.parametrize("use_4bit", [False, True])
def test_vlm_llava_lora_and_qlora_bytes_match_real_tensors(tmp_path, use_4bit):
    from transformers import BitsAndBytesConfig, LlavaForConditionalGeneration
    folder = vlm_fixtures.write_llava(str(tmp_path / "llava"))
    torch.manual_seed(0)
    if not use_4bit:
        model = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.bfloat16)
        model.requires_grad_(False)
    else:
        pytest.importorskip("bitsandbytes")
        from peft import prepare_model_for_kbit_training
        quantization = BitsAndBytesConfig(  # as train_ds.py: the vision tower, projector and lm_head stay 16-bit
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
            llm_int8_skip_modules=["model.vision_tower", "model.multi_modal_projector", "lm_head"])
        model = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.bfloat16,
                                                              quantization_config=quantization, device_map={"": "cpu"})
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        for name, param in model.named_parameters():
            if is_vision(name):
                param.data = param.data.to(torch.bfloat16)
    model = add_lora(model, r=4)
    vlm_step_and_compare(model, memory.vlm_arch(folder), use_4bit=use_4bit)


def test_llava_1_5_13b_is_planned_from_its_built_in_sizes(capsys):
    plan.plan(["--vlm", "--model", "llava-hf/llava-1.5-13b-hf", "--use-lora", "--use-4bit", "--gpu=A6000", "--gpus=1"])
    out = capsys.readouterr().out
    assert "| A6000 |" in out
    params = memory.vlm_params(memory.LLAVA_15["13b"])
    total = params["lm_linear"] + params["lm_other"] + params["lm_head"] + params["vision"]
    assert 13.2e9 < total < 13.5e9  # LLaVA-1.5-13B: about 13.35 billion parameters


def test_vlm_flags_give_vlm_memory_its_arguments():
    args = plan.vlm_parser().parse_args(["--use-lora", "--lora-r", "4", "--fp32", "--max-length", "100"])
    step = memory.vlm_step(args)
    assert step == memory.vlm_step(vars(args))
    assert step["lora_r"] == 4 and step["weight_bytes"] == 4 and step["max_length"] == 100 and step["use_lora"]


# -----------------------------------------------------------------------------
# the MFU source: one benchmark record format for GPT and VLM

def write_benchmarks(path, *records):
    lines = ["# Benchmarks", "", "```"] + [json.dumps(r) for r in records] + ["```", ""]
    path.write_text("\n".join(lines))
    return str(path)


def test_a_measured_vlm_mfu_from_a_gpu_is_used_for_vlm_planning(tmp_path):
    path = write_benchmarks(tmp_path / "BENCHMARKS.md",
                            {"bench": "vlm", "device": "NVIDIA H100 80GB HBM3", "mfu": 0.31},
                            {"bench": "gpt", "device": "NVIDIA H100 80GB HBM3", "mfu": 0.45})
    assert plan.mfu_assumption("vlm", benchmarks=path) == (0.31, "median of the GPU measurements in BENCHMARKS.md")
    assert plan.measured_mfu("gpt", path) == 0.45


def test_cpu_records_and_unknown_peaks_leave_the_default_mfu(tmp_path):
    path = write_benchmarks(tmp_path / "BENCHMARKS.md",
                            {"bench": "vlm", "device": "cpu (x86_64, 2 cores)", "mfu": 0.9},
                            {"bench": "vlm", "device": "NVIDIA A10G", "mfu": "n/a"},
                            {"benchmark": "train_ds", "device": "NVIDIA H100 80GB HBM3", "mfu": 0.5})
    assert plan.measured_mfu("vlm", path) is None
    assert plan.mfu_assumption("vlm", benchmarks=path)[0] == plan.DEFAULT_MFU["vlm"]


# -----------------------------------------------------------------------------
# docs/PLANNING.md: generated tables, checked

def test_docs_tables_match_the_committed_planning_page(tmp_path):
    committed = os.path.join(REPO, "docs", "PLANNING.md")
    copy = tmp_path / "PLANNING.md"
    shutil.copy(committed, copy)
    plan.update_docs(str(copy))
    with open(committed, encoding="utf-8") as f:
        assert copy.read_text(encoding="utf-8") == f.read(), \
            "docs/PLANNING.md is stale: run python plan.py --update-docs"


def test_docs_tables_are_deterministic_and_only_the_marked_regions_change(tmp_path):
    before = ("# Title\n\nHand-written text stays.\n\n<!-- plan:gpt-table -->\nold table\n<!-- /plan:gpt-table -->\n"
              "\nMiddle text.\n<!-- plan:vlm-table -->\n<!-- /plan:vlm-table -->\nEnd.\n")
    path = tmp_path / "PLANNING.md"
    path.write_text(before)
    plan.update_docs(str(path))
    first = path.read_text()
    plan.update_docs(str(path))
    assert path.read_text() == first
    assert "old table" not in first and "| RTX 4090 |" in first and "Qwen2-VL-2B QLoRA" in first
    # outside the markers every byte is as before
    outside = [first.split("<!-- plan:gpt-table -->")[0],
               first.split("<!-- /plan:gpt-table -->")[1].split("<!-- plan:vlm-table -->")[0],
               first.split("<!-- /plan:vlm-table -->")[1]]
    assert outside == ["# Title\n\nHand-written text stays.\n\n", "\n\nMiddle text.\n", "\nEnd.\n"]


def test_docs_without_markers_is_a_one_line_error(tmp_path):
    path = tmp_path / "PLANNING.md"
    path.write_text("# no markers\n")
    with pytest.raises(UserError, match="no '<!-- plan:gpt-table -->'"):
        plan.update_docs(str(path))


# -----------------------------------------------------------------------------
# the training scripts' start-up line, and the direction of the imports

def test_gpt_start_line_on_cpu_gives_memory_and_tokens_without_warning():
    config = plan.gpt_config([os.path.join(REPO, "config/train_shakespeare_char.py")])
    line = memory.gpt_start_line(config, world_size=1, device="cpu", shape=gpt_shape(config), dtype="float32")
    assert line.startswith("plan: peak ~") and "16,384 tokens/iter" in line and "warning" not in line


def test_vlm_start_line_on_cpu_gives_memory_and_tokens_without_warning():
    args = plan.vlm_parser().parse_args(["--use-lora", "--use-4bit", "--max-length", "512"])
    line = memory.vlm_start_line(args, world_size=1, device="cpu")
    assert line.startswith("plan: peak ~") and "up to 512 tokens/step" in line and "warning" not in line


def test_vlm_start_line_for_a_model_it_cannot_size_says_so_and_goes_on():
    args = vars(plan.vlm_parser().parse_args(["--use-lora", "--model", "someone/unknown-vlm"]))
    assert memory.vlm_start_line(args, world_size=1, device="cpu").startswith("plan: no estimate (no architecture for")


def test_start_line_warns_when_the_run_will_not_fit_the_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: types.SimpleNamespace(total_memory=8 * memory.GiB))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA GeForce RTX 4070")
    line = memory.start_line({"weights": 10 * memory.GiB}, 1, "cuda:0", "1 token/iter", "try less")
    first, warning = line.split("\n")
    assert first == "plan: peak ~10.00 GiB of tensors per process, 1 token/iter"
    assert warning.startswith("warning: this run needs ~11.1 GiB per GPU but cuda:0 (RTX 4070) has 8.0 GiB") \
        and "try less" in warning


@pytest.mark.parametrize("script", ["memory.py", "bench.py", "train.py", "train_ds.py", "vlm_data.py",
                                    "vlm_checkpoint.py"])
def test_shared_code_and_training_do_not_import_the_planner(script):
    with open(os.path.join(REPO, script)) as f:
        tree = ast.parse(f.read())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not imported & {"plan", "train", "train_ds"}


def test_gpu_names_take_underscores_for_spaces_in_both_modes(capsys):
    plan.plan([os.path.join(REPO, "config/finetune_gpt2_medium.py"), "--gpu=A100_40GB", "--gpus=1"])
    gpt = capsys.readouterr().out
    plan.plan(["--vlm", "--use-lora", "--gpu=A100_40GB", "--gpus=1"])
    vlm = capsys.readouterr().out
    assert "| A100 40GB |" in gpt and "| A100 40GB |" in vlm


def test_gradient_checkpointing_defaults_off_only_where_half_the_memory_holds_the_run():
    args = vars(plan.vlm_parser().parse_args(["--use-lora"]))  # Qwen2-VL-2B's built-in sizes
    assert args["gradient_checkpointing"] is None
    step = memory.vlm_step(dict(args, gradient_checkpointing=False))
    need = memory.needed_bytes(memory.vlm_memory(memory.vlm_arch(args["model"]), 1, None, **step), 1)
    on, why = memory.vlm_checkpointing(args, 1, "cuda", memory_bytes=2 * need)
    assert not on and why.startswith("gradient checkpointing off")
    on, why = memory.vlm_checkpointing(args, 1, "cuda", memory_bytes=2 * need - 1)
    assert on and "--no-gradient-checkpointing is faster" in why
    assert memory.vlm_checkpointing(dict(args, model="someone/unknown-vlm"), 1, "cpu")[0]
    assert memory.vlm_checkpointing(args, 1, "mps")[0]  # memory unknown
    parsed = plan.vlm_parser().parse_args(["--use-lora"])
    plan.vlm_run(parsed)
    assert parsed.gradient_checkpointing is True  # plan.py plans it on unless told
