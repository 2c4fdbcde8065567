# Evaluate OpenAI's gpt2-large on OpenWebText (no training): prints its train and val loss.
# $ python data/openwebtext/prepare.py
# $ python train.py config/eval_gpt2_large.py
batch_size = 8
eval_iters = 500  # use more iterations to get a good estimate
eval_only = True
wandb_log = False
init_from = 'gpt2-large'
