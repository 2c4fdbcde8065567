"""plan.py's byte counts against the real tensors after one optimizer step, and its README tables."""
import os
import sys
import tempfile

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import plan  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402


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


@pytest.mark.parametrize("optimizer_name,bias", [("adamw", True), ("adamw", False), ("adamw8bit", True)])
def test_gpt_weights_gradients_optimizer_bytes_match_real_tensors(optimizer_name, bias):
    if optimizer_name == "adamw8bit":
        pytest.importorskip("bitsandbytes")
    config = plan.gpt_config(["--n_layer=2", "--n_head=2", "--n_embd=64", "--block_size=16", "--batch_size=2",
                              f"--bias={bias}", f"--optimizer={optimizer_name}", "--dtype=float32"])
    shape = dict(plan.gpt_shape(config), vocab_size=96)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{k: shape[k] for k in ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size")}))
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu", optimizer_name)
    x = torch.randint(0, 96, (2, 16))
    one_step(model, optimizer, model(x, x)[1])

    predicted = plan.gpt_memory(config, shape, batch_size=2, world_size=1, dtype="float32")
    params = list(model.parameters())
    assert predicted["weights"] == tensor_bytes(params)
    assert predicted["gradients"] == tensor_bytes([p.grad for p in params])
    assert predicted["optimizer"] == tensor_bytes(optimizer_tensors(optimizer))
    assert sum(n for n, _ in plan.gpt_params(shape)) == model.get_num_params(non_embedding=False)


def tiny_qwen2_vl_config():
    from transformers import Qwen2VLConfig
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=300,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]})
    # embed_dim 64 and merged width 256 make the vision linears big enough for every code path
    vision = dict(depth=2, embed_dim=64, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2)
    return Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=290, video_token_id=291,
                         vision_start_token_id=292, vision_end_token_id=293, tie_word_embeddings=False)


def is_vision(name):
    return ".visual." in f".{name}"


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


def vlm_step_and_compare(model, args, arch):
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:  # train_ds.py without DeepSpeed: fp32 trainable weights
        p.data = p.data.float()
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    ids = torch.randint(0, 280, (1, 12))
    model.train()  # as train_ds.py trains (from_pretrained returns a model in eval mode)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    one_step(model, optimizer, loss)

    predicted = plan.vlm_memory(arch, args, world_size=1, ds=plan.read_ds_config(None))
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
    counts = plan.vlm_params(plan.vlm_arch("tiny", config.to_dict()))
    vision = sum(p.numel() for n, p in model.named_parameters() if is_vision(n))
    assert counts["vision"] == vision
    assert counts["lm_linear"] + counts["lm_other"] + counts["lm_head"] == sum(p.numel() for p in model.parameters()) - vision


def test_vlm_lora_bytes_match_real_tensors():
    from transformers import Qwen2VLForConditionalGeneration
    config = tiny_qwen2_vl_config()
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(config).to(torch.bfloat16)
    model.requires_grad_(False)
    model = add_lora(model, r=4)
    args = plan.vlm_parser().parse_args(["--use-lora", "--lora-r", "4", "--no-deepspeed", "--bf16"])
    vlm_step_and_compare(model, args, plan.vlm_arch("tiny", config.to_dict()))


def test_vlm_qlora_bytes_match_real_tensors():
    pytest.importorskip("bitsandbytes")
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig, Qwen2VLForConditionalGeneration
    config = tiny_qwen2_vl_config()
    torch.manual_seed(0)
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.bfloat16,
                                      llm_int8_skip_modules=["model.visual", "lm_head"])  # vision stays 16-bit
    with tempfile.TemporaryDirectory() as folder:
        Qwen2VLForConditionalGeneration(config).save_pretrained(folder)
        model = Qwen2VLForConditionalGeneration.from_pretrained(folder, dtype=torch.bfloat16, quantization_config=quantization,
                                                                device_map={"": "cpu"})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    for name, param in model.named_parameters():
        if is_vision(name):  # as train_ds.py: the frozen vision tower back to 16 bits
            param.data = param.data.to(torch.bfloat16)
    model = add_lora(model, r=4)
    args = plan.vlm_parser().parse_args(["--use-4bit", "--use-lora", "--lora-r", "4", "--no-deepspeed", "--bf16"])
    vlm_step_and_compare(model, args, plan.vlm_arch("tiny", config.to_dict()))


def test_readme_tables_are_deterministic_and_only_the_marked_regions_change():
    before = ("# Title\n\nHand-written text stays.\n\n<!-- plan:gpt-table -->\nold table\n<!-- /plan:gpt-table -->\n"
              "\nMiddle text.\n<!-- plan:vlm-table -->\n<!-- /plan:vlm-table -->\nEnd.\n")
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "README.md")
        with open(path, "w") as f:
            f.write(before)
        plan.update_readme(path)
        with open(path) as f:
            first = f.read()
        plan.update_readme(path)
        with open(path) as f:
            second = f.read()
    assert first == second
    assert "old table" not in first and "| RTX 4090 |" in first and "Qwen2-VL-2B QLoRA" in first
    # outside the markers every byte is as before
    outside = [first.split("<!-- plan:gpt-table -->")[0], first.split("<!-- /plan:gpt-table -->")[1].split("<!-- plan:vlm-table -->")[0],
               first.split("<!-- /plan:vlm-table -->")[1]]
    assert outside == ["# Title\n\nHand-written text stays.\n\n", "\n\nMiddle text.\n", "\nEnd.\n"]


def test_readme_without_markers_is_a_one_line_error():
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "README.md")
        with open(path, "w") as f:
            f.write("# no markers\n")
        with pytest.raises(SystemExit, match="no '<!-- plan:gpt-table -->'"):
            plan.update_readme(path)


def test_startup_line_on_cpu_gives_memory_and_tokens_without_warning():
    config = plan.gpt_config([os.path.join(ROOT, "config/train_shakespeare_char.py")])
    line = plan.startup_line(config, world_size=1, device="cpu")
    assert line.startswith("plan: peak ~") and "16,384 tokens/iter" in line and "warning" not in line
    args = plan.vlm_parser().parse_args(["--use-lora", "--use-4bit"])
    assert plan.vlm_startup_line(args, 1, "cpu", max_steps=10).startswith("plan: peak ~")


def test_bigger_batch_and_checkpointing_move_memory_the_right_way():
    config = plan.gpt_config([os.path.join(ROOT, "config/finetune_gpt2_medium.py")])
    shape = plan.gpt_shape(config)
    one, two = (sum(plan.gpt_memory(config, shape, b, 1, "bfloat16").values()) for b in (1, 2))
    checkpointed = sum(plan.gpt_memory(dict(config, activation_checkpointing=True), shape, 2, 1, "bfloat16").values())
    assert one < two and checkpointed < two
