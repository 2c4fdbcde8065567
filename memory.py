"""
Bytes and FLOPs of a training step, from explicit numbers: what plan.py tabulates and what train.py
and train_ds.py print in one line at start-up. Plain functions; only vlm_arch reads a file (a
model's config) to find the sizes; nothing reads BENCHMARKS.md, the README or another script's source.
(The GPT's sizes from train.py's settings: gpt_settings.gpt_shape.)

Bytes are those of the tensors alive at the peak of a step (what torch.cuda.max_memory_allocated
reports), by component; needed_bytes adds the workspace a GPU must also hold. Eager-mode
accounting: torch.compile usually saves somewhat less.
"""
import json
import math
import os

import torch

import hardware
from model import LOSS_CHUNK_ROWS

GiB = 1024 ** 3
# memory a run needs beyond its tensors: CUDA context + cuBLAS workspace, NCCL buffers with >1 GPU,
# and the caching allocator's fragmentation (a fraction of the tensor peak). An allowance, not measured.
CONTEXT_BYTES, NCCL_BYTES, FRAGMENTATION = 0.6 * GiB, 0.4 * GiB, 0.05


def needed_bytes(memory, world_size):
    """What a GPU must hold: the tensors plus the workspace allowance."""
    peak = sum(memory.values())
    return peak * (1 + FRAGMENTATION) + CONTEXT_BYTES + (NCCL_BYTES if world_size > 1 else 0)


def adamw_bytes(numels):
    # exp_avg + exp_avg_sq in fp32, and a float32 `step` tensor per parameter
    return sum(8 * n + 4 for n in numels)


def adamw8bit_bytes(numels):
    # bitsandbytes: uint8 moments + one fp32 absmax per 256-value block; tensors under 4096 values keep
    # fp32 moments; the two 256-entry quantization maps are shared by all tensors
    total = 2 * 256 * 4
    for n in numels:
        total += 2 * n + 2 * 4 * math.ceil(n / 256) if n >= 4096 else 8 * n
    return total


def nf4_bytes(numel):
    # bitsandbytes nf4 with double quantization: 4-bit values, a uint8 absmax per 64 values, an fp32
    # absmax per 256 of those, and per tensor a 16-entry code, a 256-entry code and an offset (fp32)
    blocks = math.ceil(numel / 64)
    return math.ceil(numel / 2) + blocks + 4 * math.ceil(blocks / 256) + 4 * (16 + 256 + 1)


# -----------------------------------------------------------------------------
# GPT (model.GPT as train.py builds it)

def gpt_params(shape):
    """Parameter tensors of model.GPT as (numel, is_matmul_weight, rows: the first dimension, which FSDP
    splits); wte is tied to lm_head."""
    width, bias = shape["n_embd"], shape["bias"]
    norm = [(width, False, width)] + ([(width, False, width)] if bias else [])

    def linear(n_in, n_out):
        return [(n_in * n_out, True, n_out)] + ([(n_out, False, n_out)] if bias else [])
    block = norm + linear(width, 3 * width) + linear(width, width) + norm + linear(width, 4 * width) \
        + linear(4 * width, width)
    vocab, positions = shape["vocab_size"], shape["block_size"]
    return [(vocab * width, True, vocab), (positions * width, False, positions)] + block * shape["n_layer"] + norm


def fsdp_shard(numel, rows, world_size):
    """A parameter's numel on each of FSDP2's ranks: dim 0 cut in world_size chunks, each padded to the first."""
    return math.ceil(rows / world_size) * (numel // rows)


def gpt_flops_per_token(shape, lora=False):
    """Training FLOPs per token, as model.GPT.flops_per_token: 6N (non-embedding N) + attention; 4N
    under LoRA (no weight gradients for the frozen weights)."""
    n = sum(numel for numel, _, _ in gpt_params(shape)) - shape["block_size"] * shape["n_embd"]
    return (4 if lora else 6) * n + 12 * shape["n_layer"] * shape["n_embd"] * shape["block_size"]


# the Linears LoRA can adapt (gpt_lora.TARGETS), as (in, out) features in units of n_embd
GPT_LINEARS = {"c_attn": [(1, 3)], "c_proj": [(1, 1), (4, 1)], "c_fc": [(1, 4)]}


def gpt_lora_params(shape, rank, targets):
    """LoRA's tensors (numels): A (rank x in) and B (out x rank) for each adapted Linear of each block."""
    width = shape["n_embd"]
    return [rank * width * n for t in targets for a, b in GPT_LINEARS[t] for n in (a, b)] * shape["n_layer"]


def gpt_lora_settings(config):
    """gpt_memory's LoRA arguments from train.py's settings."""
    return config["lora_rank"], config["lora_targets"].split(","), config["lora_dropout"]


def gpt_memory(shape, batch_size, world_size, dtype, optimizer="adamw", activation_checkpointing=False, dropout=0.0,
               lora_rank=0, lora_targets=tuple(GPT_LINEARS), lora_dropout=0.0, fused_loss=False, fsdp=False,
               fsdp_offload=False):
    """Per-GPU bytes at the peak of a train.py step (DDP or, with fsdp, FSDP2 over world_size GPUs), by
    component. With lora_rank > 0 the GPT's weights are frozen: only the adapters get gradients and
    optimizer state. fused_loss: the loss a chunk of positions at a time (model.ChunkedCrossEntropy)."""
    params = gpt_params(shape)
    numels = [n for n, _, _ in params]
    n_params = sum(numels)
    lora = gpt_lora_params(shape, lora_rank, lora_targets) if lora_rank else []
    trained = lora or numels
    width, layers = shape["n_embd"], shape["n_layer"]
    tokens = batch_size * shape["block_size"]
    act = 4 if dtype == "float32" else 2  # autocast's matmul outputs; LayerNorm inputs stay fp32 (the residual)
    dropout_masks = 2 * width if dropout > 0 else 0  # bool masks after attention and MLP
    # per token per block: ln_1 and ln_2 inputs (fp32) + their mean/rstd, the 16-bit inputs of
    # c_attn and c_fc, q/k/v, attention output + logsumexp, the MLP's 4C hidden before and after GELU
    per_block = (2 * 4 * width + 16 + act * (width + 3 * width + width + width + 4 * width + 4 * width)
                 + 4 * shape["n_head"] + dropout_masks)
    if lora:  # a frozen Linear keeps no input for its weight gradient; an adapter keeps it for A's, and
        # A's rank-wide output for B's, and with dropout the bool mask of its input
        inputs = {t: [width * a for a, _ in GPT_LINEARS[t]] for t in GPT_LINEARS}
        adapted = [n for t in lora_targets for n in inputs[t]]
        per_block -= act * sum(n for t in GPT_LINEARS if t not in lora_targets for n in inputs[t])
        per_block += len(adapted) * act * lora_rank + (sum(adapted) if lora_dropout > 0 else 0)
    if activation_checkpointing:
        activations = tokens * (layers * 4 * width + per_block)  # block inputs, and one block recomputed in backward
    else:
        activations = tokens * layers * per_block
    activations += tokens * (4 * width + 8 + (0 if fused_loss else act * width))  # ln_f input, lm_head's 16-bit input
    vocab = shape["vocab_size"]
    if fused_loss:  # one chunk's logits (16-bit, float32, the gradient in place, a 16-bit copy of it for the
        # matmuls), and the float32 gradients forward worked out for the head's input and weight
        loss = min(tokens, LOSS_CHUNK_ROWS) * vocab * (2 * act + 4) + 4 * tokens * width + 4 * vocab * width
    else:  # logits in the autocast dtype, and in backward three float32 (B,T,V) buffers: log_softmax's
        # output, its incoming gradient and the gradient it returns
        loss = tokens * vocab * (act + 12)
    memory = {
        "weights": 4 * (n_params + sum(lora)),
        "gradients": 4 * sum(trained),  # under DDP they are views into its all-reduce buckets: no copy
        "optimizer": adamw8bit_bytes(trained) if optimizer == "adamw8bit" else adamw_bytes(trained),
        # autocast's copies of the matmul weights, kept for backward (frozen ones too: for input gradients)
        "16-bit weight copies": 0 if act == 4 else 2 * (sum(n for n, matmul, _ in params if matmul) + sum(lora)),
        "activations": activations,
        "logits + loss": loss,
        "inputs": tokens * 32,  # X, Y and the prefetched next X, Y as int64
    }
    if fsdp and world_size > 1:
        memory.update(gpt_fsdp_state(shape, world_size, act, fsdp_offload))
    return memory


def gpt_checkpoint_bytes(shape):
    """Host bytes of a full-weight checkpoint's tensors (float32 weights, AdamW's state): what rank 0 of an
    FSDP run gathers onto its CPU at every save, on top of what the process holds already."""
    numels = [numel for numel, _, _ in gpt_params(shape)]
    return 4 * sum(numels) + adamw_bytes(numels)


def gpt_fsdp_state(shape, world_size, act, offload):
    """Per-GPU bytes of FSDP2's model state (model.GPT.fully_shard): float32 weights, gradients and AdamW
    state cut in world_size shards (held by the host under offload), and what is whole for a while in the
    compute dtype (act bytes): the root's weights (embeddings, head) and gradient for the whole step, the
    weights of the block running and the one prefetched, and one block's gradient (with a float32 copy to
    reduce-scatter when computing in 16 bits). The compute-dtype weights make autocast's copies unneeded."""
    params = gpt_params(shape)
    shards = [fsdp_shard(numel, rows, world_size) for numel, _, rows in params]
    ln_f = 2 if shape["bias"] else 1
    root = sum(numel for numel, _, _ in params[:2] + params[-ln_f:])
    block = (sum(numel for numel, _, _ in params) - root) // shape["n_layer"]
    host = 0 if offload else 1
    return {
        "weights": host * 4 * sum(shards),
        "gradients": host * 4 * sum(shards),
        "optimizer": host * adamw_bytes(shards),
        "16-bit weight copies": 0,
        "gathered weights": act * (root + min(2, shape["n_layer"]) * block),
        "gathered gradients": act * (root + block) + (4 * block if act != 4 else 0),
    }


# -----------------------------------------------------------------------------
# Qwen2-VL-style and LLaVA models (train_ds.py): LoRA, QLoRA or full finetuning, with or without ZeRO

# Qwen2-VL-2B-Instruct's architecture: the default --model, planned offline without its config.json
QWEN2_VL_2B = dict(
    kind="qwen2_vl",
    text=dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
              num_key_value_heads=2, vocab_size=151936),
    vision=dict(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4, patch_size=14, spatial_merge_size=2,
                temporal_patch_size=2, in_chans=3),
    tie_word_embeddings=True)
# LLaVA-1.5 as llava-hf's folders hold it: CLIP ViT-L/14 at 336 pixels (576 image tokens, whatever the
# image), a 2-layer MLP projector and a LLaMA-2 (Vicuna) language model with a 32,064-token vocabulary
CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, image_size=336, patch_size=14)
LLAVA_15 = {size: dict(kind="llava", vision=CLIP_L_336, tie_word_embeddings=False,
                       text=dict(hidden_size=h, intermediate_size=i, num_hidden_layers=n, num_attention_heads=a,
                                 num_key_value_heads=a, vocab_size=32064))
            for size, (h, i, n, a) in {"7b": (4096, 11008, 32, 32), "13b": (5120, 13824, 40, 40)}.items()}
BUILTIN_MODELS = {"Qwen/Qwen2-VL-2B-Instruct": QWEN2_VL_2B, "Qwen/Qwen2-VL-2B": QWEN2_VL_2B,
                  "llava-hf/llava-1.5-7b-hf": LLAVA_15["7b"], "llava-hf/llava-1.5-13b-hf": LLAVA_15["13b"]}


def vlm_arch(model, model_config=None):
    """The text and vision sizes of `model` (a hub id or folder): from model_config (its config as a
    dict), else the folder's config.json, else the built-in table. ValueError when none gives them."""
    config = model_config
    if config is None and os.path.isfile(os.path.join(model, "config.json")):
        try:
            with open(os.path.join(model, "config.json"), encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, ValueError) as e:
            raise ValueError(f"{model}/config.json cannot be read ({type(e).__name__}: {e})") from None
        if not isinstance(config, dict):
            raise ValueError(f"{model}/config.json is not a model config")
    if config is None:
        if model not in BUILTIN_MODELS:
            raise ValueError(f"no architecture for --model {model}: pass a local model folder (with config.json) "
                             f"or one of {', '.join(BUILTIN_MODELS)}")
        return BUILTIN_MODELS[model]
    if config.get("model_type") == "llava":
        return llava_arch(model, config)
    text = config.get("text_config") or config  # transformers 5 nests the text sizes; older files do not
    vision = config.get("vision_config") or {}
    keys = QWEN2_VL_2B["text"]
    if "depth" not in vision or not all(isinstance(text.get(k), int) for k in keys):
        raise ValueError(f"{model}: only Qwen2-VL-style and LLaVA models are planned")
    tied = config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
    return dict(kind="qwen2_vl", text={k: text[k] for k in keys},
                vision={k: vision.get(k, QWEN2_VL_2B["vision"][k]) for k in QWEN2_VL_2B["vision"]},
                tie_word_embeddings=tied)


def llava_arch(model, config):
    """A LLaVA config's sizes; the defaults a partial config.json leaves to transformers filled in."""
    from transformers import LlavaConfig
    try:
        full = LlavaConfig(**{k: v for k, v in config.items() if k != "model_type"}).to_dict()
    except Exception as e:  # a config transformers cannot read
        raise ValueError(f"{model}: not a LLaVA config transformers can read ({type(e).__name__})") from None
    text, vision = full["text_config"], full["vision_config"]
    sizes = dict({k: text.get(k) for k in QWEN2_VL_2B["text"]})
    sizes["num_key_value_heads"] = sizes["num_key_value_heads"] or sizes["num_attention_heads"]
    if text.get("model_type") != "llama" or vision.get("model_type") != "clip_vision_model":
        raise ValueError(f"{model}: only LLaVA with a Llama language model and a CLIP vision tower is planned")
    return dict(kind="llava", text=sizes, vision={k: vision[k] for k in CLIP_L_336},
                tie_word_embeddings=full.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))


def kv_width(text):
    """Width of the k and v projections (grouped-query attention: fewer heads than q)."""
    return text["num_key_value_heads"] * text["hidden_size"] // text["num_attention_heads"]


def vlm_params(arch):
    """Parameter counts by group: LM linear weights (quantized by 4-bit, LoRA's targets), other LM
    tensors (embeddings, norms, biases), lm_head, the vision tower and projector; and the LM linear shapes."""
    text = arch["text"]
    hidden, intermediate, layers = text["hidden_size"], text["intermediate_size"], text["num_hidden_layers"]
    kv = kv_width(text)
    # per layer: q k v o, then the MLP's gate up down
    linears = [(hidden, hidden), (hidden, kv), (hidden, kv), (hidden, hidden),
               (hidden, intermediate), (hidden, intermediate), (intermediate, hidden)] * layers
    tower, projector, vision_linears = (llava_vision if arch["kind"] == "llava" else qwen_vision)(arch)
    qkv_biases = layers * (hidden + 2 * kv) if arch["kind"] == "qwen2_vl" else 0  # Qwen2's q, k, v have biases
    vocab_by_hidden = text["vocab_size"] * hidden
    norms = layers * 2 * hidden + hidden  # two RMSNorms a layer, and the final one
    return dict(linears=linears, lm_linear=sum(a * b for a, b in linears), lm_bias=qkv_biases,
                lm_other=vocab_by_hidden + qkv_biases + norms,  # embeddings, biases, norms
                lm_head=0 if arch["tie_word_embeddings"] else vocab_by_hidden,
                vision=sum(tower) + sum(projector),
                # tensor by tensor, for a part that trains (AdamW keeps a step count per tensor)
                merger=projector, tower=tower, vision_linears=vision_linears)


def qwen_vision(arch):
    """Qwen2-VL's vision tower tensor by tensor, its merger (the projector) and the tower's linear shapes."""
    vision, hidden = arch["vision"], arch["text"]["hidden_size"]
    embed, mlp = vision["embed_dim"], int(vision["embed_dim"] * vision["mlp_ratio"])
    merged = vision["spatial_merge_size"] ** 2 * vision["embed_dim"]  # a 2x2 patch group, concatenated
    patch_embed = vision["in_chans"] * vision["temporal_patch_size"] * vision["patch_size"] ** 2 * embed  # no bias
    # a block: two LayerNorms (weight, bias), qkv and proj, fc1 and fc2
    block = [embed, embed, embed, embed, 3 * embed * embed, 3 * embed, embed * embed, embed, embed * mlp, mlp,
             mlp * embed, embed]
    merger = [embed, embed, merged * merged, merged, merged * hidden, hidden]  # LayerNorm, two linears into the LM
    return ([patch_embed] + block * vision["depth"], merger,
            [(embed, 3 * embed), (embed, embed), (embed, mlp), (mlp, embed)] * vision["depth"])


def llava_vision(arch):
    """LLaVA's CLIP tower tensor by tensor, its 2-layer MLP projector and the tower's linear shapes."""
    vision, hidden = arch["vision"], arch["text"]["hidden_size"]
    embed, mlp, patches = vision["hidden_size"], vision["intermediate_size"], llava_patches(arch)
    # class embedding, patch conv (no bias), positions (the class token's too), pre-LayerNorm; post-LayerNorm last
    embeddings = [embed, 3 * vision["patch_size"] ** 2 * embed, patches * embed, embed, embed]
    block = [embed, embed] + [embed * embed, embed] * 4 + [embed, embed, embed * mlp, mlp, mlp * embed, embed]
    projector = [embed * hidden, hidden, hidden * hidden, hidden]
    depth = vision["num_hidden_layers"]
    return (embeddings + block * depth + [embed, embed], projector,
            ([(embed, embed)] * 4 + [(embed, mlp), (mlp, embed)]) * depth)


def llava_patches(arch):
    """Positions CLIP runs on per image: its fixed grid and the class token (576 + 1 at 336 pixels)."""
    return (arch["vision"]["image_size"] // arch["vision"]["patch_size"]) ** 2 + 1


def vision_shape(arch, max_pixels):
    """(blocks, width, MLP width, positions per image) of the vision tower: Qwen2-VL's follow the pixel
    budget, LLaVA's CLIP runs on a fixed grid."""
    vision = arch["vision"]
    if arch["kind"] == "llava":
        return vision["num_hidden_layers"], vision["hidden_size"], vision["intermediate_size"], llava_patches(arch)
    return (vision["depth"], vision["embed_dim"], int(vision["embed_dim"] * vision["mlp_ratio"]),
            max_pixels // vision["patch_size"] ** 2)


def zero_settings(ds_config):
    """What moves memory in a DeepSpeed config dict: ZeRO stage, offloads, reduce bucket size."""
    zero = ds_config.get("zero_optimization", {})
    bucket = zero.get("reduce_bucket_size", 5e8)
    return {"stage": zero.get("stage", 0),
            "offload_optimizer": zero.get("offload_optimizer", {}).get("device", "none") != "none",
            "offload_param": zero.get("offload_param", {}).get("device", "none") != "none",
            "bucket": bucket if isinstance(bucket, (int, float)) else 5e8}


def vlm_memory(arch, world_size, zero, batch_size, max_length, max_pixels, use_lora, lora_r, lora_dropout,
               use_4bit, gradient_checkpointing, weight_bytes, train_projector=False, train_vision=False,
               vision_lora=False):
    """Per-GPU bytes at the peak of a train_ds.py step, by component. zero: zero_settings's dict, or
    None without DeepSpeed; weight_bytes: 2 for bf16/fp16 (the default on GPUs), 4 for --fp32. The
    activations are the language model's: a vision tower that trains adds its own, not counted."""
    params = vlm_params(arch)
    text = arch["text"]
    hidden, intermediate, layers = text["hidden_size"], text["intermediate_size"], text["num_hidden_layers"]
    wide = weight_bytes
    # trainable tensors: LoRA's A and B per linear, or (full finetune) every LM tensor; the vision side
    # as the flags say (under LoRA a fully trained part is peft's copy: the frozen original stays)
    whole = (params["merger"] if train_projector else []) + (params["tower"] if train_vision else [])
    if use_lora:
        lora_linears = params["linears"] + (params["vision_linears"] if vision_lora else [])
        trainable = [lora_r * n for a, b in lora_linears for n in (a, b)] + whole
    else:
        trainable = [n for n in (params["lm_linear"], params["lm_other"], params["lm_head"]) if n] + whole
    n_trainable = sum(trainable)
    frozen_vision = params["vision"] - (0 if use_lora else sum(whole))
    if use_4bit:  # nf4 LM linears; prepare_model_for_kbit_training upcasts the rest of the LM to fp32,
        # but bitsandbytes casts the 4-bit layers' biases back to the compute dtype in their first forward
        frozen = sum(nf4_bytes(a * b) for a, b in params["linears"]) + wide * (frozen_vision + params["lm_bias"])
        frozen += (wide if zero is not None else 4) * (params["lm_other"] - params["lm_bias"] + params["lm_head"])
    elif use_lora:
        frozen = wide * (params["lm_linear"] + params["lm_other"] + params["lm_head"] + frozen_vision)
    else:
        frozen = wide * frozen_vision
    if zero is None:  # train_ds.py keeps trainable weights in fp32, the optimizer runs on the GPU
        weights, grads, optimizer, buffers = frozen + 4 * n_trainable, 4 * n_trainable, adamw_bytes(trainable), 0
    else:  # DeepSpeed: 16-bit weights and gradients, fp32 master weights + moments in the optimizer
        shards = world_size if zero["stage"] >= 1 else 1
        weights = frozen + wide * n_trainable
        grads = wide * n_trainable / (shards if zero["stage"] >= 2 else 1) + 4 * n_trainable / shards
        optimizer = 0 if zero["offload_optimizer"] else 12 * n_trainable / shards
        buffers = wide * min(zero["bucket"], max(n_trainable, 1)) if zero["stage"] >= 2 else 0
        if zero["stage"] == 3:  # weights partitioned; ZeRO-Offload keeps only the gathered layer on the GPU
            layer = (frozen + wide * n_trainable) / max(layers, 1)
            weights = 2 * layer if zero["offload_param"] else weights / world_size + 2 * layer
    # activations per token: the language model over max_length tokens. 16-bit, or fp32 under 4-bit
    # (the upcast norms make the residual stream fp32)
    act = 4 if use_4bit else wide
    kv = kv_width(text)
    norm_inputs = 2 * 4 * hidden  # the two RMSNorms' fp32 inputs
    # q, k, v, the attention output and o_proj's input; SDPA's fp32 logsumexp per head
    attention = act * (hidden + 2 * kv + hidden + hidden) + 4 * text["num_attention_heads"]
    mlp = act * 3 * intermediate  # gate, up and SiLU outputs
    lora_inputs = 0
    if use_lora and lora_dropout > 0:  # each adapter's dropped-out input + its bool mask, and its r-wide A output
        lora_inputs = (3 * hidden + hidden + 2 * hidden + intermediate) * (act + 1) + 7 * act * lora_r
    per_layer = norm_inputs + attention + mlp + lora_inputs
    if not use_lora:
        # full finetuning also saves the linears' inputs for weight gradients
        per_layer += act * (2 * hidden + intermediate)
    tokens = batch_size * max_length
    if gradient_checkpointing:  # each layer's input kept, one layer recomputed in backward
        activations = tokens * (layers * act * hidden + per_layer)
    else:
        activations = tokens * layers * per_layer
    # the frozen vision tower runs without autograd: only one block's working set at a time
    _, embed, vision_mlp, positions = vision_shape(arch, max_pixels)
    vision_work = batch_size * positions * wide * (4 * embed + 2 * vision_mlp)
    logits = tokens * text["vocab_size"] * (wide + 12)  # 16-bit logits, then three fp32 (B,T,V) buffers in the loss
    return {"weights": weights, "gradients": grads, "optimizer": optimizer, "DeepSpeed buffers": buffers,
            "activations": activations, "vision forward": vision_work, "logits + loss": logits}


def vlm_flops_per_sample(arch, max_length, max_pixels, use_lora, gradient_checkpointing):
    """FLOPs one sample executes: LM forward + backward (input gradients only with LoRA), one more
    forward when checkpointing, and the frozen vision tower's forward (no backward)."""
    params, text = vlm_params(arch), arch["text"]
    tokens, hidden, layers = max_length, text["hidden_size"], text["num_hidden_layers"]
    matmul = params["lm_linear"] + text["vocab_size"] * hidden  # lm_head is a matmul even when tied
    # attention counted non-causal, as nanoGPT's 12*L*C*T
    forward = tokens * (2 * matmul + 4 * layers * hidden * tokens)
    # backward: input gradients (as much as the forward) plus weight gradients, which LoRA skips
    backward = 2 * forward if not use_lora else tokens * (2 * matmul + 8 * layers * hidden * tokens)
    recompute = forward if gradient_checkpointing else 0
    depth, embed, _, patches = vision_shape(arch, max_pixels)
    vision_forward = 2 * params["vision"] * patches + 4 * depth * embed * patches * patches
    return forward + backward + recompute + vision_forward


def device_bytes(device, world_size):
    """The memory a process may plan on: its CUDA GPU's, or on a CPU its share of the RAM available now; None
    where unknown (mps)."""
    if str(device).startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_properties(device).total_memory
    if str(device) == "cpu" and hasattr(os, "sysconf"):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // world_size
    return None


def vlm_checkpointing(args, world_size, device, ds_config=None, memory_bytes=None):
    """--gradient-checkpointing's default: off where the run's planned need without it is at most half of the
    device's memory (memory_bytes, or device_bytes'), since recomputing every layer costs time each step (2.2x
    per step on a 32M Qwen2-VL on a CPU: BENCHMARKS.md); on otherwise, and where the model or the memory is
    unknown. Returns (on, a line saying which and why)."""
    flags = dict(args if isinstance(args, dict) else vars(args), gradient_checkpointing=False)
    memory_bytes = memory_bytes or device_bytes(device, world_size)
    try:
        memory = vlm_memory(vlm_arch(flags["model"]), world_size,
                            zero_settings(ds_config) if ds_config is not None else None, **vlm_step(flags))
    except ValueError:  # a model we cannot size
        return True, "gradient checkpointing on (this model's memory cannot be planned)"
    if not memory_bytes:
        return True, "gradient checkpointing on (this device's memory is unknown)"
    need = needed_bytes(memory, world_size)
    if need <= memory_bytes / 2:
        return False, (f"gradient checkpointing off: without it this run needs ~{need / GiB:.1f} GiB, under half "
                       f"the {memory_bytes / GiB:.1f} GiB here (--gradient-checkpointing saves memory, slower)")
    return True, (f"gradient checkpointing on: without it this run would need ~{need / GiB:.1f} GiB, over half the "
                  f"{memory_bytes / GiB:.1f} GiB here (--no-gradient-checkpointing is faster, if it fits)")


def vlm_step(args):
    """vlm_memory's keyword arguments from train_ds.py's flags (its argparse namespace, or a dict)."""
    flags = args if isinstance(args, dict) else vars(args)
    step = {k: flags[k] for k in ("batch_size", "max_length", "max_pixels", "use_lora", "lora_r", "lora_dropout",
                                  "use_4bit", "gradient_checkpointing")}
    step.update({k: flags.get(k, False) for k in ("train_projector", "train_vision", "vision_lora")})
    return dict(step, weight_bytes=4 if flags["fp32"] else 2)


# -----------------------------------------------------------------------------
# the training scripts' start-up line

def start_line(memory, world_size, device, per_step, hint):
    """'plan: peak ~X GiB of tensors per process, <per_step>', plus a warning line when the run will
    not fit the CUDA GPU it is on (hint: what to try instead)."""
    line = f"plan: peak ~{sum(memory.values()) / GiB:.2f} GiB of tensors per process, {per_step}"
    if not str(device).startswith("cuda") or not torch.cuda.is_available():
        return line
    need, gpu_memory = needed_bytes(memory, world_size), torch.cuda.get_device_properties(device).total_memory
    if need <= gpu_memory:
        return line
    name = torch.cuda.get_device_name(device)
    return (f"{line}\nwarning: this run needs ~{need / GiB:.1f} GiB per GPU but {device} "
            f"({hardware.match_gpu(name) or name}) has {gpu_memory / GiB:.1f} GiB: it will likely run out of memory; "
            f"{hint} (python plan.py ... shows what fits)")


def gpt_start_line(config, world_size, device, shape, dtype):
    """train.py's start-up line. config: its settings (global gradient_accumulation_steps); shape: the
    sizes it built (n_layer, n_head, n_embd, vocab_size, block_size, bias); dtype: the one it runs in."""
    memory = gpt_memory(shape, config["batch_size"], world_size, dtype, config["optimizer"],
                        config["activation_checkpointing"], config["dropout"], *gpt_lora_settings(config),
                        config["fused_loss"], config["fsdp"], config["fsdp_offload"])
    tokens_per_iter = config["batch_size"] * config["gradient_accumulation_steps"] * shape["block_size"]
    hint = "try --fused_loss=True, --activation_checkpointing=True, --optimizer=adamw8bit or a smaller --batch_size"
    return start_line(memory, world_size, device, f"{tokens_per_iter:,} tokens/iter", hint)


def vlm_start_line(args, world_size, device, ds_config=None, model_config=None):
    """train_ds.py's start-up line. args: its flags (namespace or dict); ds_config: the DeepSpeed
    dict it uses (None without DeepSpeed); model_config: the model's config as a dict, if loaded."""
    flags = args if isinstance(args, dict) else vars(args)
    try:
        arch = vlm_arch(flags["model"], model_config)
    except ValueError as e:  # a model we cannot size (neither Qwen2-VL-like nor LLaVA) must not stop training
        return f"plan: no estimate ({e})"
    zero = zero_settings(ds_config) if ds_config is not None else None
    memory = vlm_memory(arch, world_size, zero, **vlm_step(flags))
    tokens = flags["batch_size"] * flags["gradient_accumulation_steps"] * world_size * flags["max_length"]
    hint = "try --use-4bit, a smaller --batch-size or --max-length, or ZeRO-3 (--deepspeed ds_config_zero3.json)"
    return start_line(memory, world_size, device, f"up to {tokens:,} tokens/step", hint)
