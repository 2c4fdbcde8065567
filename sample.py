"""
Sample from a trained model, or from OpenAI's GPT-2.
$ python sample.py --out_dir=out-shakespeare-char
$ python sample.py --init_from=gpt2-xl --start="What is the answer to life?" --num_samples=3
$ python sample.py --init_from=path/to/hf_gpt2_folder --start=FILE:prompt.txt
"""
import signal
import sys

signal.signal(signal.SIGINT, lambda *_: sys.exit("interrupted"))  # Ctrl-C at any time: one line, no traceback
import os  # noqa: E402

import torch

import gpt_checkpoint
import runtime
from configurator import UserError, check_ranges, settings
from model import GPT, PRETRAINED

# -----------------------------------------------------------------------------
init_from = 'resume'  # 'resume' (from out_dir) | 'gpt2*' | a local Hugging Face GPT-2 folder
out_dir = 'out'  # ignored if init_from is not 'resume'
checkpoint_name = 'ckpt.pt'  # or best.pt, the best-val model when always_save_checkpoint is on
start = "\n"  # or "<|endoftext|>" or etc. Can also specify a file, use as: "FILE:prompt.txt"
num_samples = 10  # number of samples to draw
max_new_tokens = 500  # number of tokens generated in each sample
temperature = 0.8  # 1.0 = no change, < 1.0 = less random, > 1.0 = more random, 0 = greedy
top_k = 200  # retain only the top_k most likely tokens, clamp others to have 0 probability (0 = off)
top_p = 1.0  # nucleus sampling: keep the smallest set of tokens whose probability reaches top_p
stop_at_eot = True  # GPT-2 BPE models: end a sample at <|endoftext|>
seed = 1337
device = 'auto'  # 'auto' picks cuda, then mps, then cpu; or 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = 'auto'  # 'auto' = bfloat16 where supported, else float16 on CUDA; float32 elsewhere
compile = False  # torch.compile the forward pass: faster tokens after a compile
# -----------------------------------------------------------------------------
config, _ = settings(globals())  # config files and --key=value; a UserError is one line from here
# -----------------------------------------------------------------------------
# every setting's range, checked before anything is loaded
check_ranges(config, {'num_samples': '[1, inf)', 'max_new_tokens': '[1, inf)', 'temperature': '[0, inf)',
                            'top_k': '[0, inf)', 'top_p': '(0, 1]', 'seed': '[0, 4294967296)'})
if not (init_from == 'resume' or init_from in PRETRAINED or os.path.isdir(init_from)):
    raise UserError(f"init_from='{init_from}' is neither resume, one of {', '.join(PRETRAINED)}, "
               "nor a folder with a Hugging Face GPT-2 checkpoint")
device, device_type = runtime.resolve_device(device)
dtype = runtime.resolve_dtype(dtype, device_type)
if start.startswith('FILE:'):
    try:
        with open(start[5:], encoding='utf-8') as f:
            start = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read the prompt file {start[5:]} ({type(e).__name__}: {e}): give a UTF-8 text file")

torch.manual_seed(seed)
torch.cuda.manual_seed(seed)
torch.backends.cuda.matmul.allow_tf32 = True  # allow tf32 on matmul
torch.backends.cudnn.allow_tf32 = True  # allow tf32 on cudnn
ctx = runtime.autocast(device_type, dtype)

# model, and its vocabulary: a char-level model's characters, else (None) GPT-2's BPE
vocabulary = None
if init_from == 'resume':
    model, checkpoint = gpt_checkpoint.load_gpt(os.path.join(out_dir, checkpoint_name),
                                                "train one first, or set --out_dir / --init_from=gpt2")
    vocabulary = gpt_checkpoint.checkpoint_vocabulary(checkpoint)  # plain values only: a meta.pkl can carry code
    del checkpoint  # the weights are in the model now
else:
    try:
        model = GPT.from_pretrained(init_from, dict(dropout=0.0))
    except ValueError as e:
        raise UserError(f"could not load '{init_from}': {str(e).splitlines()[0]}")
model.eval()
model.to(device)
if compile and not runtime.compile_blocker(device_type):
    # generation runs hidden_states once per token; dynamic shapes avoid a recompile per length
    model.hidden_states = torch.compile(model.hidden_states, dynamic=True)

if vocabulary is not None:
    print(f"a character-level model: {len(vocabulary)} characters")
    itos, stoi = vocabulary, {c: i for i, c in vocabulary.items()}

    def encode(s):
        unknown = sorted(set(s) - set(stoi))
        if unknown:
            raise UserError(f"the prompt has characters outside the model's vocabulary: {unknown!r}")
        return [stoi[c] for c in s]

    def decode(ids):
        return ''.join(itos[i] for i in ids)
    vocab_limit, stop_token = len(itos), None  # a model finetuned from GPT-2 has more ids than characters
else:
    print("GPT-2 BPE encodings")
    import tiktoken
    enc = tiktoken.get_encoding("gpt2")

    def encode(s):
        return enc.encode(s, allowed_special={"<|endoftext|>"})

    def decode(ids):
        return enc.decode(ids)
    # a vocabulary padded to 50304 for speed has ids tiktoken cannot decode: never sample them
    vocab_limit, stop_token = enc.n_vocab, enc.eot_token if stop_at_eot else None

# encode the beginning of the prompt
start_ids = encode(start)
if not start_ids:
    raise UserError("the prompt is empty: give --start=TEXT (a newline works for char models)")
if max(start_ids) >= model.config.vocab_size:
    raise UserError(f"the prompt has token {max(start_ids)} but the model's vocabulary has {model.config.vocab_size}: "
               "this model was not trained with GPT-2's tokenizer")
x = torch.tensor(start_ids, dtype=torch.long, device=device)[None, ...].repeat(num_samples, 1)

# run generation: all samples in one batch
with torch.no_grad():
    with ctx:
        y = model.generate(x, max_new_tokens, temperature=temperature, top_k=top_k or None, top_p=top_p,
                           vocab_size=vocab_limit, stop_token=stop_token)
for row in y.tolist():
    new = row[len(start_ids):]
    if stop_token in new:
        new = new[:new.index(stop_token)]
    print(decode(start_ids + new))
    print('---------------')
