"""
Tiny random vision-language models for the tests (and the benchmark), written to a folder so
train_ds.py loads them through its normal `--model <folder>` path, with no downloads:
a byte-level BPE tokenizer trained on a few words, a chat template, the model's own processor
and a random-weight model built from a config.

    python tests/vlm_fixtures.py qwen2-vl-tiny /tmp/tiny-qwen2vl
    python tests/vlm_fixtures.py qwen2-vl-small /tmp/small-qwen2vl   # 32M parameters, for bench_vlm_race.py
    python tests/vlm_fixtures.py qwen2-vl-2b /tmp/qwen2vl-2b --no-weights   # for --random-init

Qwen-VL folders are written in the hub's layout, so AutoProcessor builds the stock processor;
it also builds a video processor, which needs torchvision (train_ds.py copes without it).
"""
import argparse
import json
import os

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

WORDS = ("what colour is the shape what does the word say how many shapes are there red green blue "
         "yellow purple orange black white circle square triangle star it says hello stage guitar "
         "drum song one two three four describe the image a an on of and with")

QWEN_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

LLAVA_TEMPLATE = (  # the shape of llava-1.5-hf's template: a space after every turn, no EOS after a reply
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}"
    "{% elif item['type'] == 'image' %}<image>\n{% endif %}{% endfor %} {% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}")

# the tiny Qwen2-VL every test uses; embed_dim 64 (merged width 256) makes the vision linears big
# enough for every code path (bitsandbytes' blocks, LoRA)
TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2,
                 rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]})
TINY_VISION = dict(depth=2, embed_dim=64, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14,
                   spatial_merge_size=2, temporal_patch_size=2)


def tiny_qwen2_vl_config(vocab_size=300, image_token_id=290, video_token_id=291, vision_start_token_id=292,
                         vision_end_token_id=293, tie_word_embeddings=True):
    from transformers import Qwen2VLConfig
    return Qwen2VLConfig(text_config=dict(TINY_TEXT, vocab_size=vocab_size), vision_config=TINY_VISION,
                         image_token_id=image_token_id, video_token_id=video_token_id,
                         vision_start_token_id=vision_start_token_id, vision_end_token_id=vision_end_token_id,
                         tie_word_embeddings=tie_word_embeddings)


def train_tokenizer(special_tokens, eos_token, pad_token, vocab_size=400):
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator([WORDS] * 20, trainer)
    # padding on the left, as llava-1.5-hf's tokenizer (for batched generation): training pads right on its own
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=eos_token, pad_token=pad_token,
                                   padding_side="left")


def write_qwen2_vl(folder, size="tiny", weights=True, version="2"):
    """Qwen2-VL (version "2") or Qwen2.5-VL (version "2.5"): same tokens, template and image processor."""
    import transformers
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    prefix = "Qwen2VL" if version == "2" else "Qwen2_5_VL"
    config_class, model_class = getattr(transformers, prefix + "Config"), \
        getattr(transformers, prefix + "ForConditionalGeneration")
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]
    tokenizer = train_tokenizer(specials, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in specials}
    if size == "tiny":
        text, vision = dict(TINY_TEXT, vocab_size=len(tokenizer)), TINY_VISION
        if version == "2.5":  # windowed attention, a gated MLP and its own output width
            vision = dict(depth=2, hidden_size=32, intermediate_size=64, out_hidden_size=64, num_heads=2,
                          window_size=56, fullatt_block_indexes=[1], patch_size=14, spatial_merge_size=2,
                          temporal_patch_size=2)
        pixels = dict(min_pixels=56 * 56, max_pixels=56 * 56)
    elif size == "small":  # 32M parameters at 448-pixel images: big enough that compute, not overhead, leads
        text = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=8,
                    num_key_value_heads=2, vocab_size=len(tokenizer),
                    rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [8, 12, 12]})
        vision = dict(depth=6, embed_dim=384, hidden_size=512, num_heads=6, mlp_ratio=4, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2)
        pixels = dict(min_pixels=56 * 56, max_pixels=448 * 448)
    else:  # Qwen2-VL-2B's architecture (random weights; the tokenizer only covers the first few ids)
        text = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                    num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768,
                    rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]})
        vision = dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2)
        pixels = dict(min_pixels=256 * 28 * 28, max_pixels=1280 * 28 * 28)
    config = config_class(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                           video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                           vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=True)  # as in Qwen2-VL-2B
    config.text_config.pad_token_id = ids["<|endoftext|>"]
    config.text_config.eos_token_id = ids["<|im_end|>"]
    config.text_config.bos_token_id = None
    # the hub's layout: preprocessor_config.json naming the processor class, the tokenizer and
    # chat_template.json. AutoProcessor then builds the stock processor, video processor and all
    Qwen2VLImageProcessorPil(**pixels).save_pretrained(folder)
    add_json(os.path.join(folder, "preprocessor_config.json"), processor_class=prefix + "Processor",
             image_processor_type="Qwen2VLImageProcessor")
    tokenizer.save_pretrained(folder)
    add_json(os.path.join(folder, "chat_template.json"), chat_template=QWEN_TEMPLATE)
    save_config_or_model(folder, config, model_class, weights)
    return folder


def write_llava(folder, weights=True):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    tokenizer = train_tokenizer(["<unk>", "<s>", "</s>", "<pad>", "<image>"], eos_token="</s>", pad_token="<pad>")
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=28, patch_size=14, projection_dim=32)
    text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                       eos_token_id=tokenizer.eos_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_layer=-1, vision_feature_select_strategy="default")
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=LLAVA_TEMPLATE)
    processor.save_pretrained(folder)
    save_config_or_model(folder, config, LlavaForConditionalGeneration, weights)
    return folder


def add_json(path, **entries):
    data = {}
    if os.path.exists(path):
        with open(path) as f:
            data = json.load(f)
    with open(path, "w") as f:
        json.dump({**data, **entries}, f, indent=2)


def save_config_or_model(folder, config, model_class, weights):
    if not weights:  # train_ds.py --random-init builds the model from this config alone
        config.save_pretrained(folder)
        return
    torch.manual_seed(0)
    model_class(config).save_pretrained(folder)


def write_no_template_copy(source, folder):
    """A copy of a model folder whose processor and tokenizer have no chat template."""
    import shutil
    shutil.copytree(source, folder)
    for name in ("chat_template.jinja", "chat_template.json"):
        if os.path.exists(os.path.join(folder, name)):
            os.remove(os.path.join(folder, name))
    return folder


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="write a random-weight VLM folder for tests or benchmarks")
    parser.add_argument("arch", choices=["qwen2-vl-tiny", "qwen2-vl-small", "qwen2-vl-2b", "qwen2.5-vl-tiny",
                                         "llava-tiny"])
    parser.add_argument("folder")
    parser.add_argument("--no-weights", action="store_true", help="config + processor only (for --random-init)")
    args = parser.parse_args()
    if args.arch == "llava-tiny":
        write_llava(args.folder, weights=not args.no_weights)
    else:
        write_qwen2_vl(args.folder, size=args.arch.split("-")[-1], weights=not args.no_weights,
                       version="2.5" if args.arch.startswith("qwen2.5") else "2")
    print(f"wrote {args.arch} to {args.folder}")
