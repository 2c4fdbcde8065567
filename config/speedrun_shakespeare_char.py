# Speedrun: tiny Shakespeare characters to val loss <= 1.89 in the least wall time, on a CPU.
# nanoGPT's CPU recipe (config/train_shakespeare_char.py shrunk to 4 layers of width 128, lr 1e-3)
# gets there at its 2,000th iteration. This one trains a 3-layer model with Muon on the blocks'
# matrices (AdamW at lr 3e-3 on the rest) for 600 iterations: val 1.8744 at iteration 600 on the
# 2-core Xeon of BENCHMARKS.md, where the time to the target is (bench_race.py, side by side).
# Tried on the way (same data, val loss), Muon at its default rate 0.02 unless said: a 1,000-iteration
# schedule: 1.9113 at 600, 1.8541 at 700, 1.7428 at 1,000; muon_learning_rate 0.05 over 1,000: 1.8959
# at 700; a 500-iteration schedule: 1.9329. With AdamW (the previous speedrun, 1,400 iterations at lr
# 3e-3): 1.8571. A Muon step costs more (bench.py: 32-35 ms against 24 ms here, Newton-Schulz in
# bfloat16 on AMX; float32 on CPUs without native bfloat16) but needs far fewer of them.
# $ python data/shakespeare_char/prepare.py
# $ python train.py config/speedrun_shakespeare_char.py

out_dir = 'out-speedrun-shakespeare-char'
dataset = 'shakespeare_char'
device = 'cpu'
compile = False  # on a CPU compiling takes tens of seconds: a large part of a run this short
always_save_checkpoint = False  # keep the best val checkpoint
log_interval = 100
eval_interval = 200  # evals at 0, 200, 400 and 600
eval_iters = 20
gradient_accumulation_steps = 1
batch_size = 12
block_size = 64
n_layer = 3
n_head = 4
n_embd = 128
dropout = 0.0
learning_rate = 3e-3
max_iters = 600
lr_decay_iters = 600
min_lr = 1e-4
beta2 = 0.99
warmup_iters = 50
optimizer = 'muon'  # muon_learning_rate 0.02, muon_momentum 0.95: train.py's defaults
