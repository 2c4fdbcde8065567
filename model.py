"""
A GPT-2 language model in one file.
References: OpenAI's GPT-2 TensorFlow code and Hugging Face's GPT2LMHeadModel, whose weights
load here unchanged (tests/test_model.py checks the logits match).
"""
import dataclasses
import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

import hardware

PRETRAINED = {  # the OpenAI checkpoints: n_layer, n_head, n_embd
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64 for faster matmuls
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # bias in Linears and LayerNorms, like GPT-2; False is a bit faster
    gelu: str = "tanh"  # GPT-2's approximation, which its weights need; "exact" (nanoGPT's) is faster on CPUs


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.dropout = config.dropout

    def forward(self, x, cache=None, pos=0):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, n_head, T, head_size)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        mask, is_causal = None, T > 1
        if cache is not None:  # generation: keep this step's keys/values, attend to all so far
            cache[0][:, :, pos:pos + T] = k
            cache[1][:, :, pos:pos + T] = v
            k, v = cache[0][:, :, :pos + T], cache[1][:, :, :pos + T]
            if pos > 0 and T > 1:  # a chunk after a prefix: SDPA's is_causal would misalign
                mask = torch.ones(T, pos + T, dtype=torch.bool, device=x.device).tril(pos)
                is_causal = False
            elif pos > 0:
                is_causal = False  # one new token sees every cached one
        # flash attention on CUDA; other fused kernels elsewhere
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh" if config.gelu == "tanh" else "none")
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, cache=None, pos=0):
        x = x + self.attn(self.ln_1(x), cache, pos)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.vocab_size is not None and config.block_size is not None
        self.config = config
        self.pretrained_from = None  # the GPT-2 name or folder its weights came from
        self.lora = None  # the active LoRA adapter's settings (gpt_lora.py)
        self.activation_checkpointing = False  # recompute blocks in backward: less memory, ~30% slower
        self.fused_loss = False  # the head and the loss a slice of positions at a time: no full (B, T, vocab) logits
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying, as GPT-2
        self.apply(self._init_weights)
        # GPT-2 scales the residual projections by 1/sqrt(2 * n_layer): each block adds two of them
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_num_params(self, non_embedding=True):
        """Parameter count; the position embeddings are left out by default, as in the GPT-2 paper's
        counts (the token embeddings stay in: they are the tied output layer too)."""
        n_params = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n_params -= self.transformer.wpe.weight.numel()
        return n_params

    def hidden_states(self, idx, cache=None, pos=0):
        """Final-LayerNorm outputs (B, T, n_embd) for tokens idx placed at positions pos.. ."""
        T = idx.size(1)
        if pos + T > self.config.block_size:
            raise ValueError(f"sequence of {pos + T} tokens is longer than block_size {self.config.block_size}")
        positions = torch.arange(pos, pos + T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(positions))
        for i, block in enumerate(self.transformer.h):
            if self.activation_checkpointing and self.training:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x, None if cache is None else cache[i], pos)
        return self.transformer.ln_f(x)

    def forward(self, idx, targets=None):
        """Without targets: (logits for every position, None). With targets: (None, the mean
        cross-entropy, -1 = ignore); the B*T*vocab logits are not handed back, so they do not stay
        alive across gradient-accumulation micro-steps."""
        x = self.hidden_states(idx)
        if targets is None:
            return self.lm_head(x), None
        if self.fused_loss:
            return None, fused_cross_entropy(x.flatten(0, 1), self.lm_head.weight, targets.reshape(-1))
        logits = self.lm_head(x)
        return None, F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)

    def fully_shard(self, dtype, offload=False):
        """FSDP2 over the default process group: each block, then the root (embeddings, head), so each
        process keeps 1/N of the weights, gradients and optimizer state and gathers a block to run it.
        Parameters compute in dtype ('float32', 'bfloat16'), gradients are reduced in float32; with
        offload the shards (and so the optimizer's state and step) live in host memory."""
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
        for tensor in self.state_dict().values():  # rank 0's weights everywhere, as DDP starts (inits differ per rank)
            torch.distributed.broadcast(tensor, src=0)
        host = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if offload else OffloadPolicy()
        policies = dict(mp_policy=MixedPrecisionPolicy(param_dtype=getattr(torch, dtype), reduce_dtype=torch.float32),
                        offload_policy=host)
        for block in self.transformer.h:
            fully_shard(block, **policies)
        fully_shard(self, **policies)

    def crop_block_size(self, block_size):
        # model surgery to use a smaller context than the checkpoint was trained with
        assert block_size <= self.config.block_size
        self.config.block_size = block_size
        self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])

    @classmethod
    def from_checkpoint(cls, checkpoint, dropout=0.0):
        """The model in a train.py checkpoint (nanoGPT's too: its compiled runs prefix keys with
        '_orig_mod.'). Raises ValueError when the checkpoint does not hold a GPT."""
        args, state = checkpoint.get("model_args"), checkpoint.get("model")
        fields = {f.name for f in dataclasses.fields(GPTConfig)}
        sizes = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")
        if not isinstance(args, dict) or not isinstance(state, dict) or not set(args) <= fields \
                or not all(isinstance(args.get(k), int) and args[k] > 0 for k in sizes) \
                or args["n_embd"] % args["n_head"] or args.get("gelu", "tanh") not in ("tanh", "exact"):
            raise ValueError("it holds no GPT: 'model_args' or 'model' is missing or malformed")
        if checkpoint.get("lora") is not None:
            raise ValueError("it holds LoRA adapters, not a whole GPT: load it with gpt_lora.from_checkpoint")
        model = cls(GPTConfig(**dict(args, dropout=dropout)))
        try:
            model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in state.items()})
        except RuntimeError as e:
            raise ValueError(f"its weights do not fit its model_args ({str(e).splitlines()[-1].strip()})") from None
        return model

    @classmethod
    def from_pretrained(cls, name_or_path, override_args=None):
        """GPT-2 weights from the Hugging Face hub (gpt2 ... gpt2-xl) or a local HF GPT-2 folder.
        Raises ValueError, naming the problem, when they cannot be loaded."""
        override_args = override_args or {}
        assert set(override_args) <= {"dropout"}, "only dropout can be overridden"
        is_folder = os.path.isdir(name_or_path)
        if not is_folder and name_or_path not in PRETRAINED:
            raise ValueError(f"unknown model '{name_or_path}': use one of {', '.join(PRETRAINED)} "
                             "or a folder holding a Hugging Face GPT-2 checkpoint (config.json + weights)")
        if is_folder:
            config_args = cls.hf_config_args(name_or_path)
        else:
            config_args = dict(PRETRAINED[name_or_path], vocab_size=50257, block_size=1024)
        config_args.update(bias=True, dropout=override_args.get("dropout", 0.0))
        print(f"loading weights from {name_or_path}: " + ", ".join(f"{k}={v}" for k, v in config_args.items()))

        from transformers import GPT2LMHeadModel
        try:
            hf_state = GPT2LMHeadModel.from_pretrained(name_or_path).state_dict()
        except Exception as e:  # files from elsewhere (or a download): whatever breaks, it is their fault
            raise ValueError(f"cannot load its weights ({type(e).__name__}: "
                             f"{str(e).strip().splitlines()[0]})") from None
        model = GPT(GPTConfig(**config_args))
        model.load_hf_state_dict(hf_state)
        model.pretrained_from = os.path.abspath(name_or_path) if is_folder else name_or_path
        return model

    @staticmethod
    def hf_config_args(folder):
        """GPTConfig fields from a Hugging Face GPT-2 folder's config.json."""
        path = os.path.join(folder, "config.json")
        try:
            with open(path, encoding="utf-8") as f:
                hf = json.load(f)
            args = dict(n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"],
                        vocab_size=hf["vocab_size"], block_size=hf["n_positions"])
        except FileNotFoundError:
            raise ValueError(f"{folder} has no config.json: it is not a Hugging Face checkpoint folder") from None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path} is not a GPT-2 config ({type(e).__name__}: {e})") from None
        if not all(isinstance(v, int) and v > 0 for v in args.values()) or args["n_embd"] % args["n_head"]:
            raise ValueError(f"{path} has impossible sizes: {args}")
        return dict(args, gelu="exact" if hf.get("activation_function") == "gelu" else "tanh")

    def load_hf_state_dict(self, hf_state):
        """Copy a GPT2LMHeadModel state dict in. HF keeps Conv1D weights as (in, out): transpose them."""
        transposed = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
        hf_state = {k: v for k, v in hf_state.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
        ours = self.state_dict()
        missing = [k for k in ours if k not in hf_state and k != "lm_head.weight"]
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} GPT-2 weights, e.g. {missing[0]}")
        with torch.no_grad():
            for k, v in hf_state.items():
                if k not in ours:
                    continue
                v = v.t() if k.endswith(transposed) else v
                if v.shape != ours[k].shape:
                    raise ValueError(f"weight {k} has shape {tuple(v.shape)}, expected {tuple(ours[k].shape)}")
                ours[k].copy_(v)

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type, optimizer="adamw",
                             muon_learning_rate=0.02, muon_momentum=0.95):
        """AdamW with decay on matrices only (not biases, norms); fused on CUDA and CPU. optimizer='adamw8bit'
        keeps the two moment buffers in 8 bits (bitsandbytes), cutting their memory by 4x. optimizer='muon':
        torch.optim.Muon on the blocks' 2-D weights (attention and MLP), AdamW on the rest (embeddings,
        the tied head, biases, norms), stepped and saved as one (MuonAdamW)."""
        params = [p for p in self.parameters() if p.requires_grad]
        hidden = [p for p in self.transformer.h.parameters() if p.requires_grad and p.dim() == 2] \
            if optimizer == "muon" else []
        rest = [p for p in params if id(p) not in {id(h) for h in hidden}]
        decay = [p for p in rest if p.dim() >= 2]
        no_decay = [p for p in rest if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        if hidden:
            print(f"Muon: {len(hidden)} matrices, with {sum(p.numel() for p in hidden):,} parameters")
        print(f"num decayed parameter tensors: {len(decay)}, with {sum(p.numel() for p in decay):,} parameters")
        print(f"num non-decayed parameter tensors: {len(no_decay)}, "
              f"with {sum(p.numel() for p in no_decay):,} parameters")
        if optimizer == "adamw8bit":
            import bitsandbytes as bnb
            return bnb.optim.AdamW8bit(groups, lr=learning_rate, betas=betas)
        if optimizer not in ("adamw", "muon"):
            raise ValueError(f"unknown optimizer '{optimizer}': use 'adamw', 'adamw8bit' or 'muon'")
        # fused: one kernel for all tensors, and it can skip a non-finite step on the device (found_inf)
        adamw = torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type in ("cuda", "cpu"))
        if optimizer == "adamw":
            return adamw
        muon = Muon(hidden, torch.bfloat16 if hardware.native_bf16(device_type) else torch.float32,
                    lr=muon_learning_rate, weight_decay=weight_decay, momentum=muon_momentum)
        muon.param_groups[0]["lr_ratio"] = muon_learning_rate / learning_rate  # the schedule scales both alike
        return MuonAdamW(muon, adamw)

    def flops_per_token(self):
        """Training FLOPs per token: 6N for the matmuls plus attention's, as in the PaLM paper (App. B);
        4N under LoRA, whose frozen weights get no weight gradients."""
        cfg = self.config
        head_size = cfg.n_embd // cfg.n_head
        return (6 if self.lora is None else 4) * self.get_num_params() \
            + 12 * cfg.n_layer * cfg.n_head * head_size * cfg.block_size

    def estimate_mfu(self, tokens_per_iter, dt, dtype="float32"):
        """Model FLOPs utilization: achieved FLOP/s over the bf16 peak of the GPU we run on, or over the
        CPU's measured matmul peak in dtype. None when the peak is unknown (a GPU missing from hardware.GPUS)."""
        peak = hardware.peak_flops(self.lm_head.weight.device, dtype)
        if peak is None or dt <= 0:
            return None
        return self.flops_per_token() * tokens_per_iter / dt / peak

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, use_cache=True,
                 vocab_size=None, stop_token=None):
        """Extend idx (B, T) by up to max_new_tokens sampled tokens. temperature 0 is greedy. top_k
        keeps the k likeliest tokens, top_p the smallest set whose probability reaches p. vocab_size:
        sample only ids below it (a vocabulary padded for speed has ids no tokenizer knows).
        stop_token: a row that samples it is done and repeats it; all rows done ends generation."""
        block_size = self.config.block_size
        cache, cached_len = None, 0
        done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        for _ in range(max_new_tokens):
            if use_cache and idx.size(1) <= block_size:
                if cache is None:  # prefill with the whole prompt once
                    cache = self._new_cache(idx)
                x = self.hidden_states(idx[:, cached_len:], cache, cached_len)
                cached_len = idx.size(1)
            else:
                # past block_size the window slides, every absolute position shifts and the cache
                # is stale: recompute the window, exactly as a plain forward would
                x = self.hidden_states(idx[:, -block_size:])
            logits = self.lm_head(x[:, -1, :]).float()
            if vocab_size is not None:
                logits[:, vocab_size:] = -float("inf")
            idx_next = sample_next(logits, temperature, top_k, top_p)
            if stop_token is not None:
                idx_next[done] = stop_token
                done |= idx_next[:, 0] == stop_token
            idx = torch.cat((idx, idx_next), dim=1)
            if stop_token is not None and done.all():
                break
        return idx

    def _new_cache(self, idx):
        cfg = self.config
        shape = (idx.size(0), cfg.n_head, cfg.block_size, cfg.n_embd // cfg.n_head)
        dtype = torch.get_autocast_dtype(idx.device.type) if torch.is_autocast_enabled(idx.device.type) \
            else self.lm_head.weight.dtype
        return [[torch.empty(shape, dtype=dtype, device=idx.device) for _ in range(2)]
                for _ in range(cfg.n_layer)]


def newton_schulz(update, steps, coefficients, eps, dtype):
    """Muon's orthogonalization of a 2-D update, or of a stack of them (batch, rows, columns) in one go:
    torch.optim.Muon's quintic Newton-Schulz iteration, in dtype."""
    a, b, c = coefficients
    x = update.to(dtype)
    tall = x.size(-2) > x.size(-1)
    x = x.mT if tall else x
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # each one's spectral norm at most 1
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a) if x.dim() == 3 else \
            torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


class Muon(torch.optim.Muon):
    """torch.optim.Muon (same settings, state and step), orthogonalizing in ns_dtype: torch always uses
    bfloat16, which a device without native bf16 emulates many times slower; float32 there."""

    def __init__(self, params, ns_dtype, **settings):
        super().__init__(params, **settings)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            by_shape = {}  # matrices of one shape are orthogonalized together: a few batched matmuls, not many small
            for p in (p for p in group["params"] if p.grad is not None):
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buf = state["momentum_buffer"].lerp_(p.grad, 1 - group["momentum"])
                by_shape.setdefault(p.shape, []).append((p, p.grad.lerp(buf, group["momentum"]) if group["nesterov"]
                                                         else buf))
            for shape, pairs in by_shape.items():
                updates = newton_schulz(torch.stack([u for _, u in pairs]), group["ns_steps"],
                                        group["ns_coefficients"], group["eps"], self.ns_dtype)
                for (p, _), update in zip(pairs, updates):
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                    p.add_(update, alpha=-group["lr"] * math.sqrt(max(1, shape[0] / shape[1])))  # torch's default


class MuonAdamW:
    """Muon and AdamW, each on its own parameters, as one optimizer for train.py and GradScaler:
    param_groups, step, zero_grad and (load_)state_dict cover both."""

    def __init__(self, muon, adamw):
        self.muon, self.adamw = muon, adamw

    @property
    def param_groups(self):
        return self.muon.param_groups + self.adamw.param_groups

    def step(self):
        self.muon.step()
        self.adamw.step()

    def zero_grad(self, set_to_none=True):
        self.muon.zero_grad(set_to_none)
        self.adamw.zero_grad(set_to_none)

    def state_dict(self):
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state):
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])


def fused_cross_entropy(x, weight, targets):
    """Mean cross-entropy of the logits x @ weight.T (rows, vocab) against targets (-1 = ignore),
    without the full logits: Liger's fused kernel on CUDA when liger-kernel is installed, else
    ChunkedCrossEntropy."""
    if not torch.is_grad_enabled():  # evaluation: no gradients to work out in forward
        x, weight = x.detach(), weight.detach()
    if x.is_cuda:
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        except ImportError:
            pass
        else:  # its Triton kernels run in their inputs' dtype: give them autocast's, as lm_head's matmul gets
            if torch.is_autocast_enabled("cuda"):
                x, weight = (t.to(torch.get_autocast_dtype("cuda")) for t in (x, weight))
            return LigerFusedLinearCrossEntropyLoss(ignore_index=-1)(weight, x, targets)
    return ChunkedCrossEntropy.apply(x, weight, targets)


LOSS_CHUNK_ROWS = 1024  # positions per chunk: 1024 x 50304 float32 logits = 196 MiB (memory.py counts it)


class ChunkedCrossEntropy(torch.autograd.Function):
    """The head and the loss, LOSS_CHUNK_ROWS positions at a time. Forward also works out the gradients
    (softmax minus one-hot, through the head), so the (rows, vocab) logits of one chunk are all
    that ever exist, and backward only scales the stored gradients: nothing is recomputed."""
    @staticmethod
    def forward(ctx, x, weight, targets):
        rows = LOSS_CHUNK_ROWS
        grad_x = torch.zeros_like(x) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        w = weight
        if torch.is_autocast_enabled(x.device.type):  # cast once, not once per chunk and matmul
            w = weight.to(torch.get_autocast_dtype(x.device.type))
        for i in range(0, x.size(0), rows):
            xs, ts = x[i:i + rows], targets[i:i + rows]
            logits = (xs @ w.t()).float()  # under autocast in its dtype, as lm_head's matmul would be
            keep = (ts != -1).unsqueeze(1)
            picked = ts.clamp(min=0).unsqueeze(1)
            lse = logits.logsumexp(dim=1, keepdim=True)
            total += ((lse - logits.gather(1, picked)) * keep).sum()
            if grad_x is None and grad_w is None:
                continue
            # d(loss sum)/d(logits): softmax minus the one-hot target, zero for ignored rows
            g = logits.sub_(lse).exp_().scatter_add_(1, picked, -keep.float()).mul_(keep).to(xs.dtype)
            if grad_x is not None:
                grad_x[i:i + rows] = g @ w
            if grad_w is not None:
                grad_w += g.t() @ xs
        n = (targets != -1).sum()
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(*(None if g is None else g.div_(n) for g in (grad_x, grad_w)))
        return total / n

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w = ctx.saved_tensors
        return (None if grad_x is None else grad_x * grad_loss,
                None if grad_w is None else (grad_w * grad_loss).to(ctx.weight_dtype), None)


def sample_next(logits, temperature=1.0, top_k=None, top_p=None):
    """One token per row from logits (B, vocab)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits[logits < v[:, [-1]]] = -float("inf")
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop = cum - torch.softmax(sorted_logits, dim=-1) >= top_p  # mass before this token already >= p
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, -float("inf")))
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1)
