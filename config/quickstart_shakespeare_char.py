# The quick start: the baby GPT on tiny Shakespeare characters, sized to the machine it runs on.
# On a CUDA GPU it is config/train_shakespeare_char.py as is (~10.7M parameters, 5000 iters, a few
# minutes); elsewhere (a laptop or CI CPU) the CPU speedrun's 0.6M-parameter model with its earlier
# AdamW schedule (config/speedrun_shakespeare_char.py now uses Muon), which reaches a val loss under
# 1.89 in about a minute and a half and already writes Shakespeare-shaped text.
# $ python data/shakespeare_char/prepare.py
# $ python train.py config/quickstart_shakespeare_char.py
# $ python sample.py --out_dir=out-shakespeare-char
import torch

_on_gpu = torch.cuda.is_available()

out_dir = 'out-shakespeare-char'
dataset = 'shakespeare_char'
always_save_checkpoint = False  # small data: we overfit, so keep the best val checkpoint
log_interval = 10
eval_interval = 250 if _on_gpu else 350
eval_iters = 200 if _on_gpu else 20
gradient_accumulation_steps = 1
batch_size = 64 if _on_gpu else 12
block_size = 256 if _on_gpu else 64
n_layer = 6 if _on_gpu else 3
n_head = 6 if _on_gpu else 4
n_embd = 384 if _on_gpu else 128
dropout = 0.2 if _on_gpu else 0.0
learning_rate = 1e-3 if _on_gpu else 3e-3
max_iters = 5000 if _on_gpu else 1400
lr_decay_iters = max_iters
min_lr = 1e-4
beta2 = 0.99
warmup_iters = 100 if _on_gpu else 50
compile = _on_gpu  # on a CPU compiling costs about a minute, more than this short run gains
