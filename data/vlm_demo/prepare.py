"""
A small image question-answering set drawn on the fly, so train_ds.py runs end to end with no
downloads: shapes in colours, written words and counts, with matching questions and answers.

    python data/vlm_demo/prepare.py                  # images/, train.json (LLaVA), val.jsonl (messages)
    python data/vlm_demo/prepare.py --num-train 2000 --size 448

train.json uses the LLaVA format and val.jsonl the messages format, so both readers get used.
Deterministic: the same flags always give the same files.
"""
import argparse
import json
import os
import random

from PIL import Image, ImageDraw, ImageFont

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 210, 30),
           "purple": (140, 60, 180), "orange": (250, 140, 20), "black": (20, 20, 20)}
SHAPES = ["circle", "square", "triangle"]
WORDS = ["hello", "stage", "guitar", "drum", "song"]
NUMBERS = ["one", "two", "three", "four"]


def draw_shape(draw, shape, box, colour):
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=colour)


def make_sample(rng, index, size, image_dir):
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    kind = index % 3
    if kind == 0:  # one shape: ask its colour, then its shape (a two-turn conversation)
        shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
        margin = size // 6 + rng.randrange(size // 8 + 1)
        draw_shape(draw, shape, (margin, margin, size - margin, size - margin), COLOURS[colour])
        turns = [("What colour is the shape?", colour), ("What shape is it?", shape)]
    elif kind == 1:  # a written word
        word = rng.choice(WORDS)
        font = ImageFont.load_default(size=max(10, size // 5))
        draw.text((size // 10, size // 3), word, fill=COLOURS["black"], font=font)
        turns = [("What does the word say?", word)]
    else:  # several small shapes: count them
        count = rng.randrange(1, len(NUMBERS) + 1)
        cell = size // 2
        for slot in rng.sample(range(4), count):
            x, y = (slot % 2) * cell, (slot // 2) * cell
            pad = cell // 5
            draw_shape(draw, rng.choice(SHAPES), (x + pad, y + pad, x + cell - pad, y + cell - pad),
                       COLOURS[rng.choice(list(COLOURS))])
        turns = [("How many shapes are there?", NUMBERS[count - 1])]
    name = f"{index:05d}.png"
    image.save(os.path.join(image_dir, name))
    return f"images/{name}", turns  # relative to the data file's folder, train_ds.py's default --image-folder


def llava_record(index, name, turns):
    conversations = []
    for turn, (question, answer) in enumerate(turns):
        prefix = "<image>\n" if turn == 0 else ""
        conversations += [{"from": "human", "value": prefix + question}, {"from": "gpt", "value": answer}]
    return {"id": f"demo-{index}", "image": name, "conversations": conversations}


def messages_record(index, name, turns):
    messages = []
    for turn, (question, answer) in enumerate(turns):
        prefix = "<image>" if turn == 0 else ""
        messages += [{"role": "user", "content": prefix + question}, {"role": "assistant", "content": answer}]
    return {"id": f"demo-{index}", "images": [name], "messages": messages}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default=os.path.dirname(os.path.abspath(__file__)))
    parser.add_argument("--num-train", type=int, default=600)
    parser.add_argument("--num-val", type=int, default=60)
    parser.add_argument("--size", type=int, default=224, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    image_dir = os.path.join(args.out_dir, "images")
    os.makedirs(image_dir, exist_ok=True)
    rng = random.Random(args.seed)
    train, val = [], []
    for index in range(args.num_train + args.num_val):
        name, turns = make_sample(rng, index, args.size, image_dir)
        if index < args.num_train:
            train.append(llava_record(index, name, turns))
        else:
            val.append(messages_record(index, name, turns))
    with open(os.path.join(args.out_dir, "train.json"), "w") as f:
        json.dump(train, f, indent=1)
    with open(os.path.join(args.out_dir, "val.jsonl"), "w") as f:
        f.writelines(json.dumps(record) + "\n" for record in val)
    print(f"wrote {len(train)} training and {len(val)} validation samples ({args.size}px images) to {args.out_dir}")


if __name__ == "__main__":
    main()
