# Generative classifier for AG News topics (World, Sports, Business, Sci/Tech): GPT-2 small
# finetuned on one class's articles; train it once per class, then classify.py scores each test
# article under every class model.
# Hardware: one 16 GB GPU at batch 8 in bf16/fp16 (dtype='auto' picks it). On a CPU: smoke runs only.
# $ python data/prepare_classes.py ag_news
# one class after another (the folders are World, Sports, Business, Sci_Tech):
# $ for c in World Sports Business Sci_Tech; do \
#     python train.py config/classify_ag_news.py --dataset=ag_news/$c --out_dir=out-ag_news/$c; done
# or in parallel, one GPU per class: CUDA_VISIBLE_DEVICES=<i> python train.py ... & for each, then wait
# $ python classify.py --models=out-ag_news/World,out-ag_news/Sports,out-ag_news/Business,out-ag_news/Sci_Tech \
#     --test=data/ag_news/test.jsonl

init_from = 'gpt2'
dataset = 'ag_news/World'  # the class: ag_news/<folder>
out_dir = 'out-ag_news/World'
wandb_project = 'classify-ag-news'

# 8 x 1024 = 8,192 tokens/iter; a class has 30,000 articles, ~1.5M tokens: ~180 iters an epoch
batch_size = 8
gradient_accumulation_steps = 1
max_iters = 1000
lr_decay_iters = 1000
learning_rate = 3e-5
min_lr = 3e-6
warmup_iters = 50
dropout = 0.1

# early stopping on val; best.pt is the best-val model, the one classify.py reads
eval_interval = 50
eval_iters = 50
patience = 5
always_save_checkpoint = False
