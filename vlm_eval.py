"""
Answers from a vision-language model, and how right they are: sample_vlm.py's and train_ds.py
--eval-generate's one implementation. Generation renders each conversation with the model's chat
template and its generation prompt, runs batched with left padding (greedy unless a temperature is
given) and stops at the end of the turn. Scores: exact match after normalisation (case, white space,
trailing punctuation) and token F1, as VQA-style evaluations report them.
"""
import re
from collections import Counter

import torch

from configurator import UserError
from vlm_data import load_image


def text_of(content):
    """A message's text: a string, or the text items of a content list."""
    if isinstance(content, str):
        return content
    return " ".join(item["text"] for item in content if item.get("type") == "text")


def split_reference(sample):
    """(messages before the last assistant turn, that turn's text, the sample's image paths, where)."""
    messages, paths, where = sample
    replies = [i for i, message in enumerate(messages) if message["role"] == "assistant"]
    if not replies:
        raise UserError(f"{where}: no assistant turn to compare an answer with: add the expected answer as the last "
                        "gpt/assistant turn")
    last = replies[-1]
    shown = sum(item.get("type") == "image" for message in messages[:last] for item in message["content"])
    return messages[:last], text_of(messages[last]["content"]), paths[:shown], where


def normalize(text):
    text = re.sub(r"\s+", " ", text.lower()).strip()
    return text.rstrip(".,!?;: ")


def exact_match(prediction, reference):
    return normalize(prediction) == normalize(reference)


def token_f1(prediction, reference):
    """F1 of the two answers' words (after normalize), as SQuAD counts it."""
    predicted, expected = normalize(prediction).split(), normalize(reference).split()
    common = sum((Counter(predicted) & Counter(expected)).values())
    if not predicted or not expected:
        return float(predicted == expected)
    if not common:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def end_of_turn_ids(processor, model):
    """The tokens that end a reply: the model's EOS (LLaVA's, which train_ds.py appends to each reply)
    and the template's end-of-turn marker where it has one (Qwen's <|im_end|>)."""
    tokenizer, ids = processor.tokenizer, set()
    for token_id in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        ids |= set(token_id) if isinstance(token_id, list) else {token_id} if token_id is not None else set()
    marker = tokenizer.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tokenizer.get_vocab() else None
    return sorted(ids | ({marker} if marker is not None else set()))


@torch.no_grad()
def answer(model, processor, conversations, image_paths, wheres, device, max_new_tokens=64, temperature=0.0):
    """The model's reply to each conversation (each ends with a user turn), generated as one batch."""
    texts = [processor.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
    images = [load_image(path, where) for paths, where in zip(image_paths, wheres) for path in paths]
    batch = processor(text=texts, images=images or None, padding=True, padding_side="left", return_tensors="pt")
    batch = {key: value.to(device) for key, value in batch.items()}
    pad = processor.tokenizer.pad_token_id
    ends = end_of_turn_ids(processor, model)
    sampling = dict(do_sample=True, temperature=temperature, top_k=None, top_p=None) if temperature > 0 \
        else dict(do_sample=False, temperature=None, top_k=None, top_p=None)
    output = model.generate(**batch, max_new_tokens=max_new_tokens, eos_token_id=ends,
                            pad_token_id=pad if pad is not None else ends[0], **sampling)
    new = output[:, batch["input_ids"].shape[1]:]
    return [processor.tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]


def score(model, processor, samples, device, batch_size, max_new_tokens=64, temperature=0.0, progress=None):
    """Each sample's record (prompt, prediction, reference, correct, f1), the last assistant turn being the
    reference. progress: a tqdm-like wrapper for the batches, or None."""
    split = [split_reference(sample) for sample in samples]
    batches = range(0, len(split), batch_size)
    records = []
    for first in progress(batches) if progress else batches:
        chunk = split[first:first + batch_size]
        replies = answer(model, processor, [c for c, _, _, _ in chunk], [p for _, _, p, _ in chunk],
                         [w for _, _, _, w in chunk], device, max_new_tokens, temperature)
        for (context, reference, _, where), prediction in zip(chunk, replies):
            records.append({"id": where, "prompt": text_of(context[-1]["content"]), "prediction": prediction,
                            "reference": reference, "correct": exact_match(prediction, reference),
                            "f1": token_f1(prediction, reference)})
    return records


def summary(records):
    """(exact match, mean token F1) over the records."""
    return (sum(r["correct"] for r in records) / len(records), sum(r["f1"] for r in records) / len(records))
