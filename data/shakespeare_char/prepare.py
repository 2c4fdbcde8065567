"""
Tiny Shakespeare at the character level (65 symbols) for the baby GPT:
$ python data/shakespeare_char/prepare.py
The corpus (public domain, 1,115,394 characters) ships as input.txt beside this file, so this
works offline. Writes train.bin, val.bin and meta.pkl (the vocabulary) here.
"""
import os
import sys

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(here))
from prepare_text import prepare  # noqa: E402

prepare([os.path.join(here, 'input.txt')], here, char_level=True)
# prints: train has 1,003,855 tokens, val has 111,539 tokens, vocab size: 65
