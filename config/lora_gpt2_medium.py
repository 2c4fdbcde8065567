# LoRA on GPT-2 medium (350M): an overlay, given after another config. Only the adapters train (3.1M
# parameters), so gradients and optimizer state shrink to <1% of a full finetune's, and a checkpoint
# holds the adapters, their optimizer state and the base's name: ~40 MB instead of ~4 GB.
# E.g. class models for classify.py on a 16 GB GPU, where plan.py fits batch 4 x 2 micro-steps
# (the same 8 sequences an iteration):
# $ for c in neg pos; do python train.py config/classify_imdb.py config/lora_gpt2_medium.py --dataset=imdb/$c \
#     --out_dir=out-imdb-lora/$c --batch_size=4 --gradient_accumulation_steps=2; done
# $ python classify.py --models=out-imdb-lora/neg,out-imdb-lora/pos --test=data/imdb/test.jsonl
# (classify.py loads GPT-2 medium once and switches the adapters.) plan.py shows the memory.

init_from = 'gpt2-medium'
lora_rank = 8
lora_alpha = 16.0
lora_dropout = 0.05
# adapters start at zero and learn faster than whole weights: a higher rate, as in the LoRA paper
learning_rate = 2e-4
min_lr = 2e-5
weight_decay = 0.01
