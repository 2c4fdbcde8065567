# Finetune GPT-2 medium (350M) on tiny Shakespeare (BPE).
# When: adapting a pretrained GPT-2 to your text. Hardware: one GPU with ~16 GB at batch_size 2
# (use --batch_size=1 on 12 GB); ~a minute on an A100.
# $ python data/shakespeare/prepare.py
# $ python train.py config/finetune_gpt2_medium.py
# $ python sample.py --out_dir=out-finetune-gpt2-medium

out_dir = 'out-finetune-gpt2-medium'
eval_interval = 5
eval_iters = 40
wandb_log = False
wandb_project = 'shakespeare'
wandb_run_name = 'ft-gpt2-medium'

dataset = 'shakespeare'
init_from = 'gpt2-medium'

# only save checkpoints if the validation loss improves
always_save_checkpoint = False

# 2 batch size * 16 grad accum * 1024 tokens = 32,768 tokens/iter; shakespeare has 304K tokens,
# so one epoch ~= 9.3 iters
batch_size = 2
gradient_accumulation_steps = 16
max_iters = 20

# finetune at constant LR
learning_rate = 3e-5
decay_lr = False
