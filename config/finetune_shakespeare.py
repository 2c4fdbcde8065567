# Finetune the largest GPT-2 (1.5B) on tiny Shakespeare (BPE), as nanoGPT's finetune example.
# Hardware: one 80 GB GPU as is; a 24 GB card with --optimizer=adamw8bit --activation_checkpointing=True.
# For a smaller card use --init_from=gpt2-medium (or see finetune_gpt2_medium.py).
# $ python data/shakespeare/prepare.py
# $ python train.py config/finetune_shakespeare.py

out_dir = 'out-shakespeare'
eval_interval = 5
eval_iters = 40
wandb_log = False
wandb_project = 'shakespeare'
wandb_run_name = 'ft-gpt2-xl'

dataset = 'shakespeare'
init_from = 'gpt2-xl'  # this is the largest GPT-2 model

# only save checkpoints if the validation loss improves
always_save_checkpoint = False

# 1 batch size * 32 grad accum * 1024 tokens = 32,768 tokens/iter
batch_size = 1
gradient_accumulation_steps = 32
max_iters = 20

# finetune at constant LR
learning_rate = 3e-5
decay_lr = False
