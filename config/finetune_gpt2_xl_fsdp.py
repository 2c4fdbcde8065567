# Finetune all of GPT-2 XL (1.5B) on tiny Shakespeare (BPE) on two 24 GB GPUs (RTX 4090, RTX 3090, L4, A10),
# with FSDP2: each GPU holds half the weights, gradients and AdamW state. DDP would need all 16 bytes per
# parameter (23 GiB) on every card. plan.py predicts per GPU: 18.2 GiB of tensors, 20.1 GiB with the
# CUDA workspace (python plan.py config/finetune_gpt2_xl_fsdp.py --gpus=2 --gpu=RTX_4090).
# Checkpoints are the usual ckpt.pt (gathered on rank 0's host: 17.4 GiB of RAM at a save, docs/PLANNING.md).
# $ python data/shakespeare/prepare.py
# $ torchrun --standalone --nproc_per_node=2 train.py config/finetune_gpt2_xl_fsdp.py
# $ python sample.py --out_dir=out-finetune-gpt2-xl-fsdp

out_dir = 'out-finetune-gpt2-xl-fsdp'
eval_interval = 5
eval_iters = 40
wandb_log = False
wandb_project = 'shakespeare'
wandb_run_name = 'ft-gpt2-xl-fsdp'

dataset = 'shakespeare'
init_from = 'gpt2-xl'
fsdp = True

# only save checkpoints if the validation loss improves
always_save_checkpoint = False

# 2 batch size * 16 grad accum (8 on each of the 2 GPUs) * 1024 tokens = 32,768 tokens/iter
batch_size = 2
gradient_accumulation_steps = 16
max_iters = 20

# finetune at constant LR
learning_rate = 3e-5
decay_lr = False
