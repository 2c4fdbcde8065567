# GPT-2 (124M) pretraining on OpenWebText with one GPU.
# When: you have one 24 GB+ GPU (RTX 3090/4090, A10, L4, A100, H100) and patience.
# 4 x 1024 x 12 = 49,152 tokens per iteration; 600K iterations ~ 29B tokens.
# $ python data/openwebtext/prepare.py
# $ python train.py config/gpt2_124m_single_gpu.py

wandb_log = True
wandb_project = 'owt'
wandb_run_name = 'gpt2-124M-1gpu'

dataset = 'openwebtext'
batch_size = 4
block_size = 1024
gradient_accumulation_steps = 12

max_iters = 600000
lr_decay_iters = 600000
learning_rate = 6e-4
min_lr = 6e-5
warmup_iters = 2000

eval_interval = 1000
eval_iters = 200
log_interval = 10

weight_decay = 1e-1
