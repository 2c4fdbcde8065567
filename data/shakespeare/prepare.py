"""
Tiny Shakespeare in GPT-2 BPE tokens, for finetuning GPT-2 (config/finetune_shakespeare.py):
$ python data/shakespeare/prepare.py
Reuses the corpus bundled in data/shakespeare_char/input.txt. Writes train.bin and val.bin here.
"""
import os
import sys

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(here))
from prepare_text import prepare  # noqa: E402

prepare([os.path.join(os.path.dirname(here), 'shakespeare_char', 'input.txt')], here)
# prints: train has 304,224 tokens, val has 33,802 tokens
