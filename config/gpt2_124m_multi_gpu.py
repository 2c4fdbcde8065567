# GPT-2 (124M) pretraining on OpenWebText with 8 GPUs of one node (nanoGPT's recipe: ~4 days on
# 8x A100 40GB to loss ~2.85). 12 x 1024 x 40 = 491,520 tokens per iteration, 300B tokens in all.
# $ python data/openwebtext/prepare.py
# $ torchrun --standalone --nproc_per_node=8 train.py config/gpt2_124m_multi_gpu.py
# With 4 GPUs, keep the global batch: same gradient_accumulation_steps (it is divided by the
# number of processes: 10 micro-steps each), and run --nproc_per_node=4.

wandb_log = True
wandb_project = 'owt'
wandb_run_name = 'gpt2-124M'

dataset = 'openwebtext'
batch_size = 12
block_size = 1024
gradient_accumulation_steps = 5 * 8  # global: 5 per GPU on 8 GPUs

max_iters = 600000
lr_decay_iters = 600000

eval_interval = 1000
eval_iters = 200
log_interval = 10

weight_decay = 1e-1
