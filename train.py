"""
Train a GPT: from scratch, from OpenAI's GPT-2 weights, or resuming a checkpoint.

One process (runs on whatever device is there):
$ python train.py config/train_shakespeare_char.py

DDP on 8 GPUs of one node (several nodes: see the README; out_dir must be on a filesystem all nodes share),
or FSDP2 (--fsdp=True) for models whose weights, gradients and AdamW state do not fit one GPU:
$ torchrun --standalone --nproc_per_node=8 train.py config/gpt2_124m_multi_gpu.py

Checkpoints are atomic, with every RNG state: `--init_from=resume` continues exactly; SIGTERM and Ctrl-C
save one and exit. A run locks its out_dir and never trains over another run's files. Unlike nanoGPT,
model(X, Y) returns (None, loss) (the fused loss never builds the logits) and the optimizer is `optim`.
"""
import signal
import sys

signal.signal(signal.SIGINT, lambda *_: sys.exit("interrupted while starting: nothing was trained"))  # no traceback
import os  # noqa: E402
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import gpt_checkpoint
import gpt_data
import gpt_eval
import gpt_lora
import hardware
import memory
import runtime
import training
from configurator import UserError, settings
from gpt_settings import check_train_settings
from model import GPT, PRETRAINED, GPTConfig

# -----------------------------------------------------------------------------
# default config values, designed to train a GPT-2 (124M) on OpenWebText (as nanoGPT)
# I/O
out_dir = 'out'
eval_interval = 2000
log_interval = 1
eval_iters = 200
eval_only = False  # if True, script exits right after the first eval
always_save_checkpoint = True  # if True, save a checkpoint after each eval, else only on improvement
init_from = 'scratch'  # 'scratch' | 'resume' | 'gpt2*' | a local Hugging Face GPT-2 folder
auto_resume = False  # resume out_dir's ckpt.pt if it has one, else start as init_from says: one command, any restart
checkpoint_minutes = 0.0  # also save at least this often (0: at evals only), so a reclaimed spot GPU loses less
max_hours = 0.0  # save and exit cleanly before this many hours (a scheduler's or rental's limit; 0: none)
price_per_hour = 0.0  # the whole job's USD per hour: the log line shows the cost so far and at the end
overwrite = False  # a new run into an out_dir holding another run's checkpoints replaces them only if True
keep_last = 1  # older checkpoints kept beside ckpt.pt, as ckpt-<iter>.pt
patience = 0  # stop after this many evals without a better val loss (0 = never)
eval_hellaswag = False  # also score HellaSwag at each eval (GPT-2 BPE models; python data/hellaswag/prepare.py)
hellaswag_file = 'data/hellaswag/val.jsonl'
# wandb logging
wandb_log = False
wandb_project = 'owt'
wandb_run_name = 'gpt2'
# data
dataset = 'openwebtext'  # a folder under data/ (or a path) with train.bin, val.bin, maybe meta.pkl
gradient_accumulation_steps = 5 * 8  # the global count: divided among DDP processes
batch_size = 12  # micro-batch size per process
block_size = 1024
# model
n_layer = 12
n_head = 12
n_embd = 768
dropout = 0.0  # for pretraining 0 is good, for finetuning try 0.1+
bias = False  # biases in LayerNorms and Linears (GPT-2's weights have them, and bring them along)
activation_checkpointing = False  # recompute activations in backward: much less memory, ~30% slower
fused_loss = True  # the head and the loss a chunk of positions at a time: no (B, T, vocab) logits, no slower
# LoRA (peft): train low-rank adapters on the frozen weights of init_from=gpt2*; checkpoints hold only them
lora_rank = 0  # 0 = off
lora_alpha = 16.0  # the adapters' output is scaled by lora_alpha / lora_rank
lora_dropout = 0.05
lora_targets = 'c_attn,c_proj,c_fc'  # the attention and MLP projections
# optimizer
optimizer = 'adamw'  # 'adamw' | 'adamw8bit' (bitsandbytes; state in 8 bits) | 'muon'; the object is `optim`
muon_learning_rate = 0.02  # optimizer='muon': Muon's rate for the blocks' matrices (AdamW's is learning_rate)
muon_momentum = 0.95
learning_rate = 6e-4  # max learning rate
max_iters = 600000  # total number of training iterations
weight_decay = 1e-1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0  # clip gradients at this value, or disable if == 0.0
max_nonfinite_steps = 10  # stop after this many non-finite losses in a row (each one is skipped)
# learning rate decay settings
decay_lr = True  # whether to decay the learning rate
warmup_iters = 2000  # how many steps to warm up for
lr_decay_iters = 600000  # should be ~= max_iters per Chinchilla
min_lr = 6e-5  # minimum learning rate, should be ~= learning_rate/10 per Chinchilla
# system
backend = 'nccl'  # DDP backend on GPUs; CPUs always use 'gloo'
fsdp = False  # under torchrun, shard weights, gradients and optimizer state across processes (FSDP2) instead of DDP
fsdp_offload = False  # with fsdp, keep the shards and AdamW's state in host memory (slower; for what won't fit)
device = 'auto'  # 'auto' picks cuda, then mps, then cpu; or 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = 'auto'  # 'auto' = bfloat16 where supported, else float16 on CUDA; float32 elsewhere
compile = True  # torch.compile the model: faster iterations after a compile of about a minute
compile_mode = 'default'  # or 'max-autotune' (with CUDA graphs), 'max-autotune-no-cudagraphs': longer compiles
attention_backend = 'auto'  # SDPA's kernel: 'auto' (cuDNN first on Hopper), 'flash', 'cudnn', 'efficient', 'math'
seed = 1337
# -----------------------------------------------------------------------------
config, explicit_keys = settings(globals())  # config files and --key=value; a UserError is one line from here
check_train_settings(config)  # every setting's range, and the ones that must agree (gpt_settings.py)
init_from = gpt_checkpoint.start_or_resume(out_dir, init_from) if auto_resume else init_from
# -----------------------------------------------------------------------------
# various inits, derived attributes, I/O setup
ddp = int(os.environ.get('RANK', -1)) != -1  # is this a ddp run?
device, device_type = runtime.resolve_device(device)
dtype = runtime.resolve_dtype(dtype, device_type)
ddp_rank, ddp_local_rank, ddp_world_size, device, gradient_accumulation_steps = \
    runtime.start_ddp(device, device_type, backend, gradient_accumulation_steps)  # per process from here on
master_process = ddp_rank == 0  # this process will do logging, checkpointing etc.
say = runtime.say  # only rank 0 talks
say(f"Using device: {device} ({dtype}), {ddp_world_size} process(es)"
    + (", fsdp=True without torchrun: nothing to shard, a plain run" if fsdp and not ddp else "")
    + (f"; MFU is of this CPU's measured matmul peak, {hardware.peak_flops('cpu', dtype) / 1e9:.1f} GFLOP/s in "
       f"{dtype}" if device_type == 'cpu' else ""))
torch.manual_seed(seed + ddp_rank)  # dropout differs per process; batches are seeded below
torch.backends.cuda.matmul.allow_tf32 = True  # allow tf32 on matmul
torch.backends.cudnn.allow_tf32 = True  # allow tf32 on cudnn
ctx = runtime.autocast(device_type, dtype)
kernels = runtime.attention_kernels(attention_backend, device_type, dropout)
kernels.__enter__()  # for the whole run (a global setting, like tf32 above)

# -----------------------------------------------------------------------------
# data: token files checked whole-token and within the vocabulary before anything is built
data_dir = os.path.join('data', dataset)  # dataset may also be a path to a folder
# vocabulary: id -> character of a char-level dataset's meta.pkl (saved in checkpoints), None for GPT-2's BPE
largest_token, meta_vocab_size, vocabulary = gpt_data.check_dataset(data_dir, block_size)
if meta_vocab_size is not None:
    say(f"found vocab_size = {meta_vocab_size} (inside {os.path.join(data_dir, 'meta.pkl')})")
hellaswag = gpt_eval.read_items(hellaswag_file, data_dir, vocabulary) if eval_hellaswag else []  # scored each eval


def get_batch(split, iter_index, batch_index):
    # poor man's data loader (gpt_data.read_batch): random windows of the token file, each batch placed by its
    # position in the run, so a resumed or re-sharded run sees exactly the batches an uninterrupted one would
    start, batch = time.time(), gpt_data.read_batch(data_dir, split, seed, iter_index, batch_index, batch_size,
                                                    block_size, device)
    clock['data'] += time.time() - start  # the loop's wait for its batches (on a GPU: up to the async copy)
    return batch


# the output folder: locked while we run, another run's files kept unless asked, only our own
# half-written temp files cleaned up; eval_only writes nothing
OUR_FILES = r'ckpt\.pt|best\.pt|ckpt-\d{7}\.pt|log\.jsonl'
log_path = os.path.join(out_dir, 'log.jsonl')
if master_process and not eval_only:
    out_dir_lock = gpt_checkpoint.claim_out_dir(out_dir, OUR_FILES, init_from != 'resume', overwrite, auto_resume)
if ddp and not eval_only:
    gpt_checkpoint.check_shared_folder(out_dir, device)

# -----------------------------------------------------------------------------
# model init
iter_num, best_val_loss, evals_without_improvement, elapsed_before = 0, float('inf'), 0, 0.0
clock, hinted = dict(saved=time.time(), longest_save=0.0, data=0.0), {}  # rank 0's decides timed saves and stops
last_eval_iter = None  # a checkpoint saved right after an eval must not repeat it on resume
checkpoint = None
model_args = dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size, bias=bias,
                  vocab_size=None, dropout=dropout, gelu='exact')  # exact GELU from scratch: faster on CPUs
if init_from == 'scratch':
    say("Initializing a new model from scratch")
    model_args['vocab_size'] = meta_vocab_size if meta_vocab_size is not None else 50304
    model = GPT(GPTConfig(**model_args))
elif init_from == 'resume':
    checkpoint, ckpt_path, hint = gpt_checkpoint.load_for_resume(out_dir)  # onto the CPU
    say(f"Resuming training from {ckpt_path} at iter {checkpoint['iter_num']}")
    try:
        model = gpt_lora.load(checkpoint, dropout=dropout)
    except ValueError as e:
        raise UserError(f"{ckpt_path}: {e}{hint}") from None
    gpt_checkpoint.adopt_shape(checkpoint, ckpt_path, config, explicit_keys, model_args)  # and its LoRA settings
    block_size = model_args['block_size']  # the checkpoint's, unless given
else:
    say(f"Initializing from {'OpenAI GPT-2 weights' if init_from in PRETRAINED else 'a local folder'}: {init_from}")
    try:
        model = GPT.from_pretrained(init_from, dict(dropout=dropout))
    except ValueError as e:
        raise UserError(f"could not load '{init_from}': {str(e).splitlines()[0]}")
    if block_size > model.config.block_size:
        raise UserError(f"block_size={block_size} is larger than {init_from}'s {model.config.block_size}: "
             f"use --block_size={model.config.block_size} or less")
    model_args.update({k: getattr(model.config, k) for k in ('n_layer', 'n_head', 'n_embd', 'bias', 'vocab_size')})
model_args['gelu'] = model.config.gelu  # GPT-2's weights (and our older checkpoints) need its tanh GELU
if block_size < model.config.block_size:  # crop down the model block size if desired
    model.crop_block_size(block_size)
    model_args['block_size'] = block_size
if lora_rank and init_from != 'resume':
    gpt_lora.add(model, lora_rank, lora_alpha, lora_dropout, lora_targets.split(','))
gpt_data.check_vocabulary_fits(data_dir, largest_token, meta_vocab_size, model.config.vocab_size)
if hellaswag and model.config.vocab_size < 50257:
    raise UserError(f"eval_hellaswag scores GPT-2 BPE tokens, but the model's vocabulary has {model.config.vocab_size}")
if init_from == 'resume':
    gpt_checkpoint.check_resume(checkpoint, ckpt_path, config, vocabulary)  # refuse what cannot continue, note the rest
    iter_num, best_val_loss = checkpoint['iter_num'], checkpoint['best_val_loss']
    last_eval_iter, elapsed_before = checkpoint.get('last_eval_iter'), checkpoint.get('elapsed_s', 0.0)
    evals_without_improvement = checkpoint.get('evals_without_improvement', 0)
model.activation_checkpointing, model.fused_loss = activation_checkpointing, fused_loss
model.to(device)
if fsdp and ddp:  # each block and the root sharded: the optimizer below holds this process's shards only
    model.fully_shard(dtype, fsdp_offload)
tokens_per_iter = gradient_accumulation_steps * ddp_world_size * batch_size * block_size
say(f"tokens per iteration will be: {tokens_per_iter:,}")
say(memory.gpt_start_line(config, ddp_world_size, device, model_args, dtype))  # warns if it will not fit the GPU
raw_model = model  # unwrapped, uncompiled: what we save and measure

# -----------------------------------------------------------------------------
# optimizer: fused AdamW (or 8-bit), restored exactly on resume; the scaler only for float16
scaler = torch.amp.GradScaler(device_type, enabled=(dtype == 'float16'))
try:
    optim = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type, optimizer,
                                       muon_learning_rate, muon_momentum)
except ImportError:
    raise UserError("optimizer='adamw8bit' needs bitsandbytes: pip install bitsandbytes")
if checkpoint is not None:  # the optimizer, the scaler and this process's RNG states, as they were
    gpt_checkpoint.restore_state(checkpoint, ckpt_path, model, optim, scaler, ddp_rank, ddp_world_size)
checkpoint = None  # free up memory
# compile (or say why not and run eager), then DDP: this way round the all-reduce overlaps the backward pass
blocker = compile and runtime.compile_blocker(device_type)
if compile and master_process:
    print(f"torch.compile cannot run here ({blocker}): running eager; pass --compile=False to skip this check"
          if blocker else "compiling the model... (the first iteration takes a ~minute)")
if compile and not blocker and fsdp and ddp:  # each sharded block in place: its gathers stay outside the graphs
    [block.compile(mode=None if compile_mode == 'default' else compile_mode) for block in model.transformer.h]
elif compile and not blocker:
    model = torch.compile(model, mode=None if compile_mode == 'default' else compile_mode)
if ddp and not fsdp:  # gradients as views into the all-reduce buckets: no second copy of them
    model = DDP(model, device_ids=[ddp_local_rank] if device_type == 'cuda' else None, gradient_as_bucket_view=True)

# -----------------------------------------------------------------------------
# helpers, then the training loop


@torch.no_grad()
def estimate_loss():
    # mean loss over the same eval_iters batches every time, split among processes; it draws on
    # no training RNG, so evals never change the training run they measure
    out = {}
    model.eval()
    for split in ('train', 'val'):
        total = torch.zeros(2, device=device)  # (sum of losses, count)
        for k in range(ddp_rank, eval_iters, ddp_world_size):
            X, Y = get_batch(split, -1, k)
            with ctx:
                _, loss = model(X, Y)
            total += torch.stack([loss.float(), torch.ones((), device=device)])
        if ddp:
            dist.all_reduce(total)
        out[f'{split}_loss'] = (total[0] / total[1]).item()
    model.train()
    if hellaswag:  # the uncompiled model: the items' lengths vary
        out['hellaswag_acc_norm'] = gpt_eval.acc_norm(raw_model, hellaswag, device, ctx)
    return out


def log(record):
    # log.jsonl and wandb, in the names both trainers share (training.METRICS); elapsed_s: wall time of
    # the run (its earlier parts too, on resume), less the compilation
    record['elapsed_s'] = round(elapsed_before + (0.0 if compiling else time.time() - run_start - compile_s), 3)
    if master_process:
        training.log_metrics(None if eval_only else log_path, wandb_run, record)


def save_checkpoint(is_best, previous_iter):
    """ckpt.pt, every process's RNG included, written atomically (see gpt_checkpoint.save). Returns iter_num."""
    start, rng_states = time.time(), training.all_rng_states()
    # under LoRA the adapters and the base's name; under FSDP every rank's shards, gathered
    weights, lora, optim_state = gpt_checkpoint.full_state(raw_model, optim)
    if not master_process:
        return iter_num
    ckpt = {'model': weights, 'lora': lora, 'optimizer': optim_state, 'scaler': scaler.state_dict(),
            'model_args': model_args, 'vocabulary': vocabulary, 'iter_num': iter_num, 'best_val_loss': best_val_loss,
            'evals_without_improvement': evals_without_improvement, 'last_eval_iter': last_eval_iter,
            'config': config, 'rng': rng_states, 'elapsed_s': elapsed_before + time.time() - run_start - compile_s}
    print(f"saving checkpoint to {out_dir} (iter {iter_num})")
    gpt_checkpoint.save(ckpt, out_dir, is_best, previous_iter, keep_last)
    clock.update(saved=time.time(), longest_save=max(clock['longest_save'], time.time() - start))
    return iter_num


def get_train_batch(iter_index, micro_step):
    # the global micro-step index: the same set of batches whatever the number of processes
    return get_batch('train', iter_index, micro_step * ddp_world_size + ddp_rank)


last_saved_iter = iter_num if init_from == 'resume' else None
if init_from == 'resume' and iter_num == max_iters and not eval_only:
    say(f"the checkpoint is at max_iters={max_iters} already: nothing to train (raise --max_iters to go on)")
if master_process and init_from == 'resume' and not eval_only:  # lines a killed run wrote past its checkpoint
    gpt_checkpoint.trim_log(log_path, iter_num, last_eval_iter)
wandb_run = training.init_wandb(wandb_project, wandb_run_name, config) if master_process and wandb_log else None
stop_signals, _ = training.catch_stop_signals()  # SIGTERM and Ctrl-C: finish the step, save, exit cleanly
gpus = hardware.open_gpu_telemetry() if master_process else []  # NVML, read at log lines
X, Y = get_train_batch(iter_num, 0)  # fetch the very first batch
check_every = 10  # no host-device sync in a plain iteration: loss, counts and stops are read at these and log iters
t0, t0_iter = time.time(), iter_num
run_start, compile_s, compiling, t_start = t0, 0.0, compile and not blocker, iter_num  # compiling: 1st iter and eval
nonfinite_in_a_row, nonfinite_total = torch.zeros((), device=device), torch.zeros((), device=device)
stop_requested = False  # agreed by all processes, so they save and stop at the same iteration
params = [p for p in raw_model.parameters() if p.requires_grad]
skip_on_device = all(group.get('fused') for group in optim.param_groups)  # fused AdamW takes found_inf
while True:
    lr = (training.cosine_lr(iter_num, learning_rate, min_lr, warmup_iters, lr_decay_iters) if decay_lr
          else learning_rate)
    training.set_learning_rate(optim, lr)  # this iteration's learning rate, in every parameter group

    # evaluate the loss on train/val sets and write checkpoints
    if iter_num % eval_interval == 0 and iter_num != last_eval_iter or eval_only:
        losses = estimate_loss()
        last_eval_iter = iter_num
        improved = losses['val_loss'] < best_val_loss
        best_val_loss = min(best_val_loss, losses['val_loss'])
        evals_without_improvement = 0 if improved else evals_without_improvement + 1
        say(f"step {iter_num}: train loss {losses['train_loss']:.4f}, val loss {losses['val_loss']:.4f} (best "
            f"{best_val_loss:.4f})" + (f", hellaswag acc_norm {losses['hellaswag_acc_norm']:.4f}" if hellaswag else ""))
        log({'iter': iter_num, 'lr': lr, **losses})  # train_loss, val_loss (and hellaswag_acc_norm)
        if iter_num > 0 and (improved or always_save_checkpoint) and not eval_only:
            last_saved_iter = save_checkpoint(improved, last_saved_iter)
        if patience and evals_without_improvement >= patience:
            say(f"early stopping: val loss has not improved for {patience} evals (best {best_val_loss:.4f})")
            break
    if eval_only or iter_num >= max_iters:
        break

    # forward backward update, with optional gradient accumulation to simulate larger batch size
    loss_sum = torch.zeros((), device=device)
    for micro_step in range(gradient_accumulation_steps):
        if ddp:  # sync gradients only on the last micro step (DDP's all-reduce, FSDP's reduce-scatter)
            last = micro_step == gradient_accumulation_steps - 1
            model.set_requires_gradient_sync(last) if fsdp else setattr(model, 'require_backward_grad_sync', last)
        with ctx:
            _, loss = model(X, Y)
            loss = loss / gradient_accumulation_steps  # scale the loss to account for gradient accumulation
        loss_sum += loss.detach().float()
        # immediately async prefetch next batch while model is doing the forward pass on the GPU
        if micro_step + 1 < gradient_accumulation_steps:
            X, Y = get_train_batch(iter_num, micro_step + 1)
        else:
            X, Y = get_train_batch(iter_num + 1, 0)
        # backward pass, with gradient scaling if training in fp16
        scaler.scale(loss).backward()
    # clip, then step unless the gradients are not finite (decided on the device where it can be)
    skipped = training.optimizer_step(optim, scaler, params, grad_clip, skip_on_device)
    nonfinite_in_a_row = (nonfinite_in_a_row + 1) * skipped
    nonfinite_total += skipped
    it, iter_num = iter_num, iter_num + 1
    if compiling:  # its own line, and no ETA from its log line
        compiling, compile_s = False, time.time() - run_start
        say(f"compilation, with the first iteration and eval: {compile_s:.1f}s (left out of elapsed_s)")
        log({'iter': it, 'compile_s': compile_s})

    # the points where we wait for the device: logging, non-finite counts, stop signals under DDP
    log_now = it % log_interval == 0
    if not (log_now or it % check_every == 0 or iter_num == max_iters or (stop_signals and not ddp)):
        continue
    late = master_process and training.out_of_time(  # the steps to the next check point, then the longest save
        run_start, max_hours, check_every * (time.time() - run_start) / (iter_num - t_start) + clock['longest_save'])
    flags = [bool(stop_signals) or late, master_process and training.save_due(clock['saved'], checkpoint_minutes)]
    stats = torch.cat([torch.stack([loss_sum, nonfinite_in_a_row]), torch.tensor(flags, device=device).float()])
    if ddp:
        dist.all_reduce(stats)  # the loss is averaged, a stop on any rank stops all; the count is the same on all
    loss_value, in_a_row, stops, save_now = (value / ddp_world_size for value in stats.tolist())  # one sync
    stop_requested, in_a_row = stops > 0, round(in_a_row)
    if in_a_row and master_process:
        print(f"iter {it}: non-finite loss/gradients, step skipped ({in_a_row} in a row)")
    training.stop_if_diverged(in_a_row, max_nonfinite_steps, f"iterations in a row (last at iter {it})",
                           "lower learning_rate, or use dtype=bfloat16 if on float16",
                           f"iter {last_saved_iter}" if last_saved_iter is not None else None)
    if log_now and master_process:
        t1 = time.time()
        eta_s = (max_iters - iter_num) * (t1 - t0) / (iter_num - t0_iter) if t0 >= run_start + compile_s else None
        extra, more = training.long_run_fields(t1 - t0, clock['data'], t1 - run_start, eta_s, price_per_hour, gpus)
        dt, t0, t0_iter, clock['data'] = (t1 - t0) / (iter_num - t0_iter), t1, iter_num, 0.0  # mean since the last log
        mfu = raw_model.estimate_mfu(tokens_per_iter // ddp_world_size, dt, dtype)
        print(f"iter {it}/{max_iters}: loss {loss_value:.4f}, lr {lr:.2e}, time {dt * 1000:.2f}ms, tok/s "
              f"{tokens_per_iter / dt:,.0f}, mfu {hardware.mfu_text(mfu, device_type)} | {more}")
        log({'iter': it, 'loss': loss_value, 'lr': lr, 'dt_ms': dt * 1000, 'tokens_per_s': tokens_per_iter / dt,
             'mfu': mfu, 'peak_flops': hardware.peak_flops(device, dtype),  # on a CPU: its measured matmul peak
             'peak_memory_gib': runtime.peak_memory_gib(device), **extra})
        [print(hint) for hint in training.slow_hints(extra, hinted, "put the dataset on a local SSD (the batches "
                                                     "are memmap reads)", "raise batch_size (plan.py: what fits)")]
    if stop_requested:
        why = f"max_hours={max_hours} is near" if late else f"received {(stop_signals or ['a stop request'])[0]}"
        say(f"{why}: saving a checkpoint and exiting")
        break
    if save_now and last_saved_iter != iter_num:  # checkpoint_minutes passed since the last save
        last_saved_iter = save_checkpoint(False, last_saved_iter)

# the state to resume from: at the end of a run, and on SIGTERM/SIGINT whatever the settings
if not eval_only and iter_num > 0 and last_saved_iter != iter_num and (always_save_checkpoint or stop_requested):
    last_saved_iter = save_checkpoint(False, last_saved_iter)
if nonfinite_total.item() and master_process:
    print(f"{int(nonfinite_total.item())} steps were skipped for non-finite loss")
runtime.exit_processes(wandb_run)  # under torchrun: leave the group, and skip the interpreter's shutdown
