# Evaluate OpenAI's gpt2 on OpenWebText (no training): prints its train and val loss.
# Hardware: one GPU that holds the model at batch_size 8 (see `python plan.py config/eval_gpt2.py`);
# lower --batch_size if it runs out of memory.
# $ python data/openwebtext/prepare.py
# $ python train.py config/eval_gpt2.py
batch_size = 8
eval_iters = 500  # use more iterations to get a good estimate
eval_only = True
wandb_log = False
init_from = 'gpt2'
