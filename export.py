"""
Export a train.py checkpoint as a Hugging Face GPT2LMHeadModel folder: config.json,
model.safetensors and, for GPT-2 BPE models, GPT-2's tokenizer files. A LoRA run's adapter is
merged into its base model's weights.

$ python export.py --out_dir=out-imdb/pos                  # -> out-imdb/pos-hf
$ python export.py --out_dir=out-imdb/pos --export_dir=my-model
$ python train.py --init_from=out-imdb/pos-hf ...           # and back

The tokenizer is Hugging Face's GPT-2 one when it is in the local cache; otherwise it is built from
tiktoken's gpt2 ranks (vocab.json and merges.txt), which needs no network when TIKTOKEN_CACHE_DIR
holds them. A char-level model (its dataset has meta.pkl) exports weights and config only: no
Hugging Face tokenizer has its vocabulary. A killed export's temp folder is removed by the next
export to the same folder. Models without biases get zero biases (GPT-2 has them);
a BPE model's padded vocabulary (50304) is cut back to GPT-2's 50257 tokens.
"""
import signal
import sys

signal.signal(signal.SIGINT, lambda *_: sys.exit("interrupted"))  # Ctrl-C at any time: one line, no traceback
import json  # noqa: E402
import os

import torch

import files
import gpt_checkpoint
import gpt_lora
from configurator import UserError, settings

# -----------------------------------------------------------------------------
out_dir = 'out'  # the train.py run to export
checkpoint_name = 'ckpt.pt'  # or best.pt
export_dir = ''  # default: <out_dir>-hf
# -----------------------------------------------------------------------------
config, _ = settings(globals())  # config files and --key=value; a UserError is one line from here
GPT2_VOCAB = 50257
TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")  # HF's Conv1D


def hf_state_dict(model, vocab_size):
    """Our weights in GPT2LMHeadModel's names and layouts (zero biases where ours have none)."""
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.LayerNorm)) and name != "lm_head":
            weight = module.weight.detach().float()
            state[f"{name}.weight"] = weight.t().contiguous() if f"{name}.weight".endswith(TRANSPOSED) else weight
            bias = module.bias if module.bias is not None else torch.zeros(module.weight.shape[0])
            state[f"{name}.bias"] = bias.detach().float()
    state["transformer.wte.weight"] = model.transformer.wte.weight.detach().float()[:vocab_size]
    state["transformer.wpe.weight"] = model.transformer.wpe.weight.detach().float()
    return state


def bytes_to_unicode():
    """GPT-2's map from bytes to printable characters, so that every token is a plain string."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(extra)}}


def merge_of(ranks, token):
    """The pair of tokens whose merge made `token`: rerun BPE on its bytes with the earlier merges only."""
    parts, rank = [bytes([b]) for b in token], ranks[token]
    while len(parts) > 2:
        pairs = [(ranks.get(parts[i] + parts[i + 1], rank), i) for i in range(len(parts) - 1)]
        best, i = min(pairs)
        if best >= rank:
            break
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


def write_tokenizer(folder):
    from transformers import GPT2TokenizerFast
    try:  # Hugging Face's own files, where they are cached (without them transformers 5 may give an empty one)
        cached = GPT2TokenizerFast.from_pretrained("gpt2", local_files_only=True)
        if len(cached) == GPT2_VOCAB:
            cached.save_pretrained(folder)
            return "Hugging Face's gpt2 tokenizer (from the local cache)"
    except OSError:
        pass
    import tiktoken
    ranks = tiktoken.get_encoding("gpt2")._mergeable_ranks
    text = bytes_to_unicode()
    as_text = lambda token: "".join(text[b] for b in token)
    vocab = {as_text(token): rank for token, rank in ranks.items()}
    vocab["<|endoftext|>"] = GPT2_VOCAB - 1
    merges = [" ".join(as_text(part) for part in merge_of(ranks, token))
              for token, _ in sorted(ranks.items(), key=lambda item: item[1]) if len(token) > 1]
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    bpe = Tokenizer(models.BPE.from_file(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    GPT2TokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                      unk_token="<|endoftext|>").save_pretrained(folder)  # adds tokenizer.json and the configs
    return "built from tiktoken's gpt2 ranks"


if __name__ == '__main__':
    from transformers import GPT2Config, GPT2LMHeadModel
    folder = export_dir or os.path.normpath(out_dir) + '-hf'
    if os.path.exists(folder) and not (os.path.isdir(folder) and not os.listdir(folder)):
        raise UserError(f"{folder} already exists: pass another --export_dir")
    files.remove_dead_temps(folder)  # what a killed export to the same folder left behind
    model, checkpoint = gpt_checkpoint.load_gpt(os.path.join(out_dir, checkpoint_name),
                                                "train one first, or set --out_dir / --checkpoint_name")
    if model.lora is not None:
        gpt_lora.merge(model)  # the adapter folded into the weights it adapts
    args = model.config
    # no GPT-2 tokenizer fits a char-level model, nor a vocabulary smaller than GPT-2's
    char_level = gpt_checkpoint.checkpoint_vocabulary(checkpoint) is not None or args.vocab_size < GPT2_VOCAB
    vocab_size = args.vocab_size if char_level else min(args.vocab_size, GPT2_VOCAB)
    hf_config = GPT2Config(vocab_size=vocab_size, n_positions=args.block_size, n_embd=args.n_embd, n_layer=args.n_layer,
                           n_head=args.n_head, activation_function="gelu_new" if args.gelu == "tanh" else "gelu",
                           tie_word_embeddings=True, bos_token_id=GPT2_VOCAB - 1, eos_token_id=GPT2_VOCAB - 1)
    hf_model = GPT2LMHeadModel(hf_config)
    hf_model.load_state_dict(hf_state_dict(model, vocab_size), strict=False)  # lm_head is tied to wte
    tmp = files.temp_path(folder)
    with files.disk_write(f"the export {folder}", os.path.dirname(os.path.abspath(folder)), then="free disk space",
                          partial=tmp):
        hf_model.save_pretrained(tmp)
        tokenizer = "none: a char-level model (its characters are in the checkpoint and data/<dataset>/meta.pkl)" \
            if char_level else write_tokenizer(tmp)
        if os.path.isdir(folder):
            os.rmdir(folder)  # empty, checked above
        os.replace(tmp, folder)
    print(f"wrote {folder}: GPT2LMHeadModel, {model.get_num_params() / 1e6:.2f}M parameters; tokenizer: {tokenizer}")
