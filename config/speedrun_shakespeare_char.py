# Speedrun: tiny Shakespeare characters to val loss <= 1.89 in the least wall time, on a CPU.
# nanoGPT's CPU recipe (config/train_shakespeare_char.py shrunk to 4 layers of width 128, lr 1e-3)
# gets there at its 2,000th iteration. This one trains a 3-layer model at 3x its learning rate for
# 1,400 iterations: the time to the target is in BENCHMARKS.md (bench_race.py, side by side).
# What was tried on the way (same data, val loss): 4 layers at lr 2e-3 for 1,500 iterations: 1.8907;
# 4 layers at lr 3e-3: 1.8903 at iteration 1,250 of 1,500; 3 layers at lr 4e-3 for 1,000: 1.9298;
# 3 layers at lr 3e-3 for 1,250: 1.8882. A bigger batch buys nothing here: the CPU is already busy
# (tokens/s at batch 12, 24, 32: 12.8k, 11.9k, 12.5k). Muon (optimizer='muon') learns faster per
# step but costs 18x per step on a CPU without native bfloat16, so AdamW it is.
# $ python data/shakespeare_char/prepare.py
# $ python train.py config/speedrun_shakespeare_char.py

out_dir = 'out-speedrun-shakespeare-char'
dataset = 'shakespeare_char'
device = 'cpu'
compile = False  # on a CPU compiling takes tens of seconds: a large part of a run this short
always_save_checkpoint = False  # keep the best val checkpoint
log_interval = 100
eval_interval = 350  # evals at 0, 350, 700, 1050 and 1400
eval_iters = 20
gradient_accumulation_steps = 1
batch_size = 12
block_size = 64
n_layer = 3
n_head = 4
n_embd = 128
dropout = 0.0
learning_rate = 3e-3
max_iters = 1400
lr_decay_iters = 1400
min_lr = 1e-4
beta2 = 0.99
warmup_iters = 50
