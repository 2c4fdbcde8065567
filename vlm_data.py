"""
The data of train_ds.py: conversations with images, read and checked, then encoded into batches
whose labels keep only the assistant's replies.

Two formats, read into one: LLaVA (`image` + `conversations` from human/gpt) and messages
(`images` + `messages` from user/assistant/system), in .json or .jsonl; `<image>` in a text marks
where an image goes. Every record is checked before any training starts, and a bad one stops the
run with one line naming the file and the record. A sample is (messages, image paths, where).
"""
import functools
import hashlib
import inspect
import json
import os

import torch
import transformers
from PIL import Image, UnidentifiedImageError
from transformers import AutoProcessor

from configurator import UserError
from files import atomic_write_text
from runtime import rank, say

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


# -----------------------------------------------------------------------------
# reading: both formats into one, every record checked

def read_records(path):
    if os.path.isdir(path):
        raise UserError(f"data file {path} is a folder: give the .json or .jsonl file in it")
    if not os.path.isfile(path):
        raise UserError(f"data file {path} not found (for the demo set run: python data/vlm_demo/prepare.py)")
    try:
        with open(path, encoding="utf-8") as f:
            if path.endswith(".jsonl"):
                records = [parse_json_line(line, f"{path} line {number}") for number, line in enumerate(f, 1)
                           if line.strip()]
            else:
                records = json.load(f)
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text: save it as UTF-8")
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON: {e}")
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}")
    if not isinstance(records, list):
        raise UserError(f"{path} must hold a list of objects (one per sample), not a JSON {type(records).__name__}")
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise UserError(f"{path} record {index} is a JSON {type(record).__name__}, not an object (one per sample)")
    return records


def parse_json_line(line, where):
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{where} is not valid JSON ({e.msg} at column {e.pos + 1})")


def split_placeholders(content, where):
    """A message's content -> typed items, with {"type": "image"} where `<image>` stood."""
    if isinstance(content, list):  # already typed, as in the processor's own format
        for item in content:
            if not (isinstance(item, dict) and (item.get("type") == "image" or
                                                item.get("type") == "text" and isinstance(item.get("text"), str))):
                raise UserError(f"{where}: a content list holds only {{\"type\": \"text\", \"text\": \"...\"}} and "
                     f"{{\"type\": \"image\"}} items, not {json.dumps(item)[:80]}")
        return content
    if not isinstance(content, str):
        raise UserError(f"{where}: message content must be a string or a list, not {json.dumps(content)[:80]}")
    items = []
    for i, text in enumerate(content.split("<image>")):
        if i > 0:
            items.append({"type": "image"})
        if text.strip():
            items.append({"type": "text", "text": text.strip()})
    return items


def to_messages(record, where, image_folder):
    """LLaVA (`image` + `conversations` from human/gpt) or messages (`images` + `messages`) -> one form."""
    if "conversations" in record:
        turns_key, role_key, content_key, images_key = "conversations", "from", "value", "image"
    elif "messages" in record:
        turns_key, role_key, content_key, images_key = "messages", "role", "content", "images"
    else:
        raise UserError(f"{where}: no 'conversations' (LLaVA format) or 'messages' key")
    turns, images = record[turns_key], record.get(images_key)
    if not isinstance(turns, list) or not all(isinstance(turn, dict) for turn in turns):
        raise UserError(f"{where}: '{turns_key}' must be a list of objects with '{role_key}' and '{content_key}'")
    if not turns:
        raise UserError(f"{where}: empty conversation")
    images = [] if images is None else [images] if isinstance(images, str) else images
    if not isinstance(images, list) or not all(isinstance(name, str) for name in images):
        raise UserError(f"{where}: '{images_key}' must be an image file name or a list of them")
    messages = []
    for turn in turns:
        role = turn.get(role_key)
        if not isinstance(role, str) or role not in ROLES:
            raise UserError(f"{where}: unknown role {role!r} (use human/gpt or user/assistant/system)")
        messages.append({"role": ROLES[role], "content": split_placeholders(turn.get(content_key, ""), where)})
    speakers = [m["role"] for m in messages if m["role"] != "system"]
    if speakers and speakers[0] != "user":  # a reply to nothing: chat templates cannot render it
        raise UserError(f"{where}: the conversation starts with the assistant; it must start with a user (human) turn, "
             "after an optional system one")
    placeholders = sum(item.get("type") == "image" for m in messages for item in m["content"])
    if placeholders != len(images):
        raise UserError(f"{where}: {placeholders} <image> placeholder(s) but {len(images)} image(s); they must match")
    return messages, [os.path.join(image_folder, name) for name in images]


def load_image(path, where, decode=True):
    """The image in RGB; with decode=False only its (height, width), read from the header (fast)."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB") if decode else (image.height, image.width)
    except FileNotFoundError:
        raise UserError(f"{where}: image {path} not found (check --image-folder)")
    except Image.DecompressionBombError as e:  # not an OSError
        raise UserError(f"{where}: image {path} is too large to decode safely ({e}): shrink it")
    except (UnidentifiedImageError, OSError) as e:
        raise UserError(f"{where}: image {path} is unreadable ({e})")


def read_samples(path, image_folder=None):
    """Read a data file and check every record's form; returns (messages, image paths, where) per
    record. Needs no processor, so it runs before anything slow."""
    image_folder = image_folder or os.path.dirname(os.path.abspath(path))
    samples = []
    for index, record in enumerate(read_records(path)):
        where = f"{path} record {index}" + (f" (id {record['id']})" if "id" in record else "")
        samples.append((*to_messages(record, where, image_folder), where))
    if not samples:
        raise UserError(f"{path} holds no records: give at least one conversation (see the README for the formats)")
    return samples


def measure_samples(path, samples, processor, max_length, skip_long, cache_file=None):
    """Check that every sample fits max_length and has a reply to learn from. Returns the samples kept
    (skip_long drops the long ones and says how many), each one's label-token count, and
    every sample's [length, label tokens] for save_measures. Read from cache_file when it exists."""
    measures = read_measures(cache_file, len(samples)) or measure_on_all_ranks(samples, processor)
    kept, label_tokens, too_long = [], [], 0
    for sample, (length, labels) in zip(samples, measures):
        if length > max_length:  # never truncate: a cut could land inside an image's tokens
            if not skip_long:
                raise UserError(f"{sample[2]}: {length} tokens (image tokens included) is longer than --max-length "
                     f"{max_length}; raise it, lower --max-pixels, or pass --skip-long")
            too_long += 1
        elif labels == 0:  # its loss would be 0/0
            raise UserError(f"{sample[2]}: no assistant reply to learn from (every token is masked): "
                            "add a gpt/assistant turn or remove the record")
        else:
            kept.append(sample)
            label_tokens.append(labels)
    if too_long:
        say(f"skipped {too_long} sample(s) of {path} longer than --max-length {max_length}")
    if not kept:
        raise UserError(f"{path}: no samples left to train on")
    return kept, label_tokens, measures


def measure_on_all_ranks(samples, processor):
    """Each rank measures every world_size-th sample; every rank gets all of them. A rank that meets a
    bad record says so on all: rank 0 measures that rank's share again, fails with its line, the rest exit."""
    me = rank()
    world_size = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    try:
        mine = measure(samples[me::world_size], processor)
    except UserError:  # worded on rank 0 only
        mine = None
    shares = [mine]
    if world_size > 1:
        shares = [None] * world_size
        torch.distributed.all_gather_object(shares, mine)
    for failed, share in enumerate(shares):
        if share is None:
            if me == 0:
                measure(samples[failed::world_size], processor)  # raises that share's UserError
            raise UserError(f"rank {failed} met a bad record")  # said on rank 0 only: its line is above
    measures = [None] * len(samples)
    for r, share in enumerate(shares):
        measures[r::world_size] = share
    return measures


def measure(samples, processor):
    """[length in tokens, label tokens] of each sample, without decoding an image: its token count
    comes from the header's size through the processor's own arithmetic (min/max pixels included)."""
    sizes = [[load_image(path, where, decode=False) for path in paths] for _, paths, where in samples]
    try:
        flat = [size for sample_sizes in sizes for size in sample_sizes]
        image_tokens = iter(processor._get_num_multimodal_tokens(image_sizes=flat).num_image_tokens if flat else [])
    except (AttributeError, NotImplementedError, TypeError):  # a processor without that arithmetic: encode
        return [[len(batch["input_ids"][0]), int((batch["labels"] != -100).sum())]
                for batch in (encode([sample], processor) for sample in samples)]
    except ValueError:  # an image the processor refuses (Qwen: an aspect ratio over 200): find which
        for (_, paths, where), sample_sizes in zip(samples, sizes):
            for path, size in zip(paths, sample_sizes):
                try:
                    processor._get_num_multimodal_tokens(image_sizes=[size])
                except ValueError as e:
                    raise UserError(f"{where}: image {path} ({size[1]}x{size[0]}) cannot be used ({first_line(e)}): "
                                    "crop or pad it")
        raise
    rendered = [assistant_spans(messages, processor) for messages, _, _ in samples]
    encoded = processor.tokenizer([text for text, _ in rendered], return_offsets_mapping=True)
    image_id, measures = image_token_id_of(processor), []
    for (_, spans), ids, offsets, sample_sizes in zip(rendered, encoded["input_ids"], encoded["offset_mapping"], sizes):
        labels = sum(is_label(token, start, spans, image_id) for token, (start, _) in zip(ids, offsets))
        expanded = sum(next(image_tokens) for _ in sample_sizes) - ids.count(image_id)  # placeholder -> its tokens
        measures.append([len(ids) + expanded, labels])
    return measures


def measures_cache(output_dir, data_path, **settings):
    """Where the measures of data_path live: named by everything they depend on, the data file's size and
    modification time included, so a changed file (or model, or pixel budget) is measured again."""
    info = os.stat(data_path)
    key = dict(settings, data=os.path.abspath(data_path), size=info.st_size, mtime_ns=info.st_mtime_ns,
               transformers=transformers.__version__,
               label_rule=label_rule_version())  # the counts weight the loss: an edited rule must not reuse them
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return os.path.join(output_dir, "data-cache", f"{os.path.basename(data_path)}-{digest}.json")


def label_rule_version():
    """A short hash of the source of the code that picks and counts the label tokens (looked up at each call)."""
    rule = (is_label, assistant_spans, with_end_tokens, assistant_labels, measure, encode)
    return hashlib.sha256("".join(inspect.getsource(function) for function in rule).encode()).hexdigest()[:12]


def read_measures(cache_file, count):
    try:
        with open(cache_file, encoding="utf-8") as f:
            measures = json.load(f)
        return measures if isinstance(measures, list) and len(measures) == count else None
    except (TypeError, OSError, ValueError):  # none given, none yet, or unreadable: measure again
        return None


def save_measures(cache_file, measures):
    os.makedirs(os.path.dirname(cache_file), exist_ok=True)
    atomic_write_text(cache_file, json.dumps(measures))


def synthetic_samples(folder, count, size, words, seed, write_images=True):
    """Benchmark data: noise images with a question and a long answer of repeated words. Only one
    process should write the images (write_images); the others wait for it, then read them."""
    generator = torch.Generator().manual_seed(seed)
    os.makedirs(folder, exist_ok=True)
    samples = []
    for i in range(count):
        path = os.path.join(folder, f"{i}.png")
        if write_images and not os.path.exists(path):
            pixels = torch.randint(0, 256, (size, size, 3), dtype=torch.uint8, generator=generator)
            Image.fromarray(pixels.numpy()).save(path)
        answer = " ".join(["the red circle on the stage"] * (words // 6 + 1))
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe the image"}]},
                    {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
        samples.append((messages, [path], f"synthetic sample {i}"))
    return samples


# -----------------------------------------------------------------------------
# encoding: the processor builds the inputs; we build the labels

def load_processor(model, trust_remote_code, min_pixels, max_pixels):
    """The model's own processor (tokenizer, image processor, chat template), as the model ships it:
    it is saved into every checkpoint, so its padding side stays the base model's (encode pads right per call).
    A Qwen-VL image processor gets the pixel budget (LLaVA's resizes to a fixed size)."""
    try:
        try:
            processor = AutoProcessor.from_pretrained(model, trust_remote_code=trust_remote_code)
        except (ImportError, OSError) as e:  # a stock Qwen-VL processor also builds a video processor: that
            # needs torchvision, and a processor saved without one has no video config
            if not any(cause in str(e).lower() for cause in ("torchvision", "video processor")):
                raise
            processor = without_video(processor_class_of(model, trust_remote_code)).from_pretrained(
                model, trust_remote_code=trust_remote_code)
    except Exception as e:  # a missing file, a bad config, a missing package: one line, whatever transformers raised
        raise UserError(f"cannot load a processor from {model}: {type(e).__name__}: {first_line(e)}")
    if not getattr(processor, "chat_template", None) and not getattr(processor.tokenizer, "chat_template", None):
        raise UserError(f"{model} has no chat template; use an instruction-tuned model or add one to its processor")
    if getattr(processor.image_processor, "merge_size", None) and min_pixels and max_pixels:
        size = processor.image_processor.size  # the form transformers 5 asks for (min/max_pixels are deprecated)
        processor.image_processor.size = type(size)(shortest_edge=min_pixels, longest_edge=max_pixels)
    return processor


def first_line(error):
    return next((line.strip() for line in str(error).splitlines() if line.strip()), "")


def processor_class_of(model, trust_remote_code):
    """The processor class AutoProcessor picks: named in the processor's or image processor's config,
    else the one registered for the model's config."""
    from transformers import AutoConfig, ImageProcessingMixin, ProcessorMixin
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING, processor_class_from_name
    for read in (ProcessorMixin.get_processor_dict, ImageProcessingMixin.get_image_processor_dict):
        name = read(model)[0].get("processor_class")
        if name:
            return processor_class_from_name(name)
    return PROCESSOR_MAPPING[type(AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code))]


def without_video(processor_class):
    """The processor class with its image processor and tokenizer only: this script trains no video,
    and a machine without torchvision cannot build the video processor. Same name, so a checkpoint's
    saved processor loads as the stock one."""
    attributes = [name for name in processor_class.get_attributes() if "video" not in name]
    return type(processor_class.__name__, (processor_class,), {"get_attributes": classmethod(lambda cls: attributes)})


def assistant_spans(messages, processor):
    """Character spans of the assistant's replies (with their end-of-turn marker) in the chat text."""
    def render(msgs, generation_prompt):
        return processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)
    text, spans = render(messages, False), []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, through = render(messages[:i], True), render(messages[: i + 1], False)
        if not (text.startswith(through) and through.startswith(before)):
            raise UserError("the chat template does not render a conversation turn by turn, so the assistant's "
                 "replies cannot be located; use a model whose template does (e.g. Qwen2-VL, LLaVA-1.5)")
        spans.append((len(before), len(through.rstrip())))
    return with_end_tokens(text, spans, processor.tokenizer)


def with_end_tokens(text, spans, tokenizer):
    """Append the EOS token to every reply that does not end with an end-of-turn token already:
    LLaVA-1.5's template ends a reply with none, and a model never shown one never learns to stop.
    Qwen's <|im_end|> is left as it is. Returns the new text and spans."""
    ends = tuple(token for token in (tokenizer.eos_token, *tokenizer.all_special_tokens) if token)
    pieces, new_spans, shift, last = [], [], 0, 0
    for start, end in spans:
        added = "" if not tokenizer.eos_token or text[start:end].endswith(ends) else tokenizer.eos_token
        pieces += [text[last:end], added]
        new_spans.append((start + shift, end + shift + len(added)))
        shift, last = shift + len(added), end
    return "".join(pieces) + text[last:], new_spans


def is_label(token, start, spans, image_token_id):
    """The rule of which tokens carry the loss: a text token that starts (character `start`) inside an
    assistant span, never an image token. encode's labels and measure's counts both follow it."""
    return token != image_token_id and any(a <= start < b for a, b in spans)


def assistant_labels(text, spans, input_ids, processor):
    """input_ids of one sample (image placeholders expanded) -> labels: the token where it starts
    inside an assistant span, -100 elsewhere (system, user, image tokens)."""
    tokenizer, image_token_id = processor.tokenizer, image_token_id_of(processor)
    plain = tokenizer(text, return_offsets_mapping=True)  # placeholders not yet expanded
    labels, j = [], 0
    for token, (start, _) in zip(plain["input_ids"], plain["offset_mapping"]):
        if token == image_token_id:  # the processor repeated this placeholder once per image patch
            while j < len(input_ids) and input_ids[j] == image_token_id:
                labels.append(-100)
                j += 1
            continue
        assert input_ids[j] == token, "processor and tokenizer disagree on the text tokens"
        labels.append(token if is_label(token, start, spans, image_token_id) else -100)
        j += 1
    assert j == len(input_ids)
    return labels


def image_token_id_of(processor):
    token_id = getattr(processor, "image_token_id", None)
    return token_id if token_id is not None else processor.tokenizer.convert_tokens_to_ids(processor.image_token)


def encode(samples, processor, dummy_image=False):
    """A list of samples -> one padded batch with labels (a dict of CPU tensors). `dummy_image` gives a
    batch without images a tiny masked one (see with_dummy_image)."""
    rendered = [assistant_spans(messages, processor) for messages, _, _ in samples]
    images = [load_image(path, where) for _, paths, where in samples for path in paths]
    # right padding for training, per call: the tokenizer keeps the base model's side (left for batched generation)
    batch = processor(text=[text for text, _ in rendered], images=images or None, padding=True, padding_side="right",
                      return_tensors="pt")
    labels = torch.full_like(batch["input_ids"], -100)
    for row, (text, spans) in enumerate(rendered):
        real = batch["attention_mask"][row].bool()
        labels[row, real] = torch.tensor(assistant_labels(text, spans, batch["input_ids"][row, real].tolist(),
                                                          processor))
    batch = dict(batch, labels=labels)
    return with_dummy_image(batch, processor) if dummy_image and not images else batch


def with_dummy_image(batch, processor):
    """Append one tiny black image's tokens to the last row, masked (attention 0, no labels), so that a
    batch without images still runs the vision tower: under ZeRO-3 every rank must gather the same
    parameters or the job hangs. The masked tokens change no loss; they cost a few positions."""
    kwargs, image_processor = {}, processor.image_processor
    if getattr(image_processor, "merge_size", None):  # Qwen-VL: a pixel budget; the smallest is one merged patch
        side = image_processor.patch_size * image_processor.merge_size
        kwargs["size"] = {"shortest_edge": side * side, "longest_edge": side * side}
    dummy = processor(text=[processor.image_token], images=[Image.new("RGB", (28, 28))], return_tensors="pt", **kwargs)
    rows, width = batch["input_ids"].shape[0], dummy["input_ids"].shape[1]
    fill = {"input_ids": processor.tokenizer.pad_token_id or 0, "attention_mask": 0, "labels": -100}
    for key in ("input_ids", "attention_mask", "labels", "mm_token_type_ids"):
        if key not in batch:
            continue
        block = torch.full((rows, width), fill.get(key, 0), dtype=batch[key].dtype)
        if key in ("input_ids", "mm_token_type_ids"):
            block[-1] = dummy[key][0]
        batch[key] = torch.cat([batch[key], block], dim=1)
    batch.update({key: value for key, value in dummy.items() if key not in batch})  # pixel_values, image_grid_thw
    return batch


# -----------------------------------------------------------------------------
# batches: the samples of every micro-step are a pure function of it, so a resumed run sees what an
# unbroken one would; encoding runs in DataLoader workers, ahead of the GPU

@functools.lru_cache(maxsize=4)
def epoch_order(sample_count, seed, epoch):
    return torch.randperm(sample_count, generator=torch.Generator().manual_seed(seed + epoch)).tolist()


def train_indices(micro_step, rank, world_size, batch_size, sample_count, seed):
    """The samples rank `rank` takes at global micro-step `micro_step`: each rank its own slice of
    the step's samples, in an order shuffled once per epoch."""
    first = (micro_step * world_size + rank) * batch_size
    return [epoch_order(sample_count, seed, position // sample_count)[position % sample_count]
            for position in range(first, first + batch_size)]


def eval_indices(batch, batch_size, sample_count):
    return range(batch * batch_size, min((batch + 1) * batch_size, sample_count))


class Batches(torch.utils.data.Dataset):
    """Item i: the batch of samples indices(i), encoded. A data error inside a worker comes back as
    {"error": line} for the training process to stop on (a worker's exit would be a traceback)."""

    def __init__(self, samples, processor, indices, dummy_image):
        self.samples, self.processor, self.indices, self.dummy_image = samples, processor, indices, dummy_image

    def __getitem__(self, i):
        try:
            return encode([self.samples[j] for j in self.indices(i)], self.processor, self.dummy_image)
        except UserError as e:  # one line, already worded for the user
            return {"error": str(e)}
