# Generative classifier for IMDB sentiment: GPT-2 small finetuned on one class's reviews; train it
# once per class, then classify.py scores each test review under every class model.
# Hardware: one 16 GB GPU at batch 8 in bf16/fp16 (dtype='auto' picks it). On a CPU: smoke runs only.
# $ python data/prepare_classes.py imdb
# one class after another:
# $ for c in neg pos; do python train.py config/classify_imdb.py --dataset=imdb/$c --out_dir=out-imdb/$c; done
# or in parallel, one GPU per class:
# $ CUDA_VISIBLE_DEVICES=0 python train.py config/classify_imdb.py --dataset=imdb/neg --out_dir=out-imdb/neg &
# $ CUDA_VISIBLE_DEVICES=1 python train.py config/classify_imdb.py --dataset=imdb/pos --out_dir=out-imdb/pos & wait
# $ python classify.py --models=out-imdb/neg,out-imdb/pos --test=data/imdb/test.jsonl

init_from = 'gpt2'
dataset = 'imdb/neg'  # the class: imdb/neg or imdb/pos
out_dir = 'out-imdb/neg'
wandb_project = 'classify-imdb'

# 8 x 1024 = 8,192 tokens/iter; a class has ~12,500 reviews, ~3.8M tokens: ~460 iters an epoch
batch_size = 8
gradient_accumulation_steps = 1
max_iters = 2000
lr_decay_iters = 2000
learning_rate = 3e-5
min_lr = 3e-6
warmup_iters = 100
dropout = 0.1

# early stopping on val; best.pt is the best-val model, the one classify.py reads
eval_interval = 100
eval_iters = 50
patience = 5
always_save_checkpoint = False
