"""
Generative classifiers (#13): data/prepare_classes.py, one tiny class model per class with train.py,
then classify.py against its baselines, on a synthetic 3-class corpus built here.
"""
import csv
import json
import os
import random

import numpy as np
import pytest

from conftest import REPO, TINY, assert_one_line_error, run_inline, run_script

NUMBERS = "zero one two three four five six seven eight nine ten eleven twelve".split()


def three_sources(lines_per_class=300):
    """Shakespeare lines, the same lines with their words reversed, and number sentences."""
    with open(os.path.join(REPO, "data", "shakespeare_char", "input.txt")) as f:
        lines = [line.strip() for line in f if len(line.split()) >= 5][:2 * lines_per_class]
    rng = random.Random(0)
    numbers = [f"{rng.choice(NUMBERS)} plus {rng.choice(NUMBERS)} makes {rng.choice(NUMBERS)} and "
               f"{rng.choice(NUMBERS)} times {rng.choice(NUMBERS)} is {rng.choice(NUMBERS)}." for _ in range(lines_per_class)]
    return {"verse": lines[::2], "esrev": [" ".join(reversed(line.split())) for line in lines[1::2]], "numbers": numbers}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("classes")
    rows = [(text, label) for label, texts in three_sources().items() for text in texts]
    random.Random(1).shuffle(rows)
    with open(folder / "corpus.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["sentence", "category"])
        writer.writerows(rows)
    import prepare_classes
    prepare_classes.prepare(str(folder / "corpus.csv"), str(folder / "data"), val_fraction=0.1, test_fraction=0.1)
    return folder


def test_prepare_classes_writes_a_dataset_per_class_and_the_test_split(corpus):
    data = corpus / "data"
    with open(data / "labels.json") as f:
        labels = json.load(f)
    assert labels["names"] == ["esrev", "numbers", "verse"] and sum(labels["train_counts"]) == 810
    assert abs(sum(labels["priors"]) - 1) < 1e-9
    for folder in labels["folders"]:
        tokens = np.fromfile(data / folder / "train.bin", dtype=np.uint16)
        assert tokens[-1] == 50256 and (data / folder / "val.bin").stat().st_size > 0  # each document ends in EOT
    test = [json.loads(line) for line in open(data / "test.jsonl")]
    assert len(test) == 90 and {d["label"] for d in test} == set(labels["names"])


def test_prepare_classes_reads_a_hugging_face_dataset_saved_to_disk(tmp_path):
    import datasets
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])})
    texts = [f"a {'fine' if i % 2 else 'dull'} film number {i}" for i in range(40)]
    data = datasets.DatasetDict(train=datasets.Dataset.from_dict({"text": texts, "label": [i % 2 for i in range(40)]}, features),
                                test=datasets.Dataset.from_dict({"text": texts[:6], "label": [i % 2 for i in range(6)]}, features))
    data.save_to_disk(str(tmp_path / "saved"))
    assert run_inline("data/prepare_classes.py", tmp_path / "saved", "--out-dir", tmp_path / "out")[0] == 0
    with open(tmp_path / "out" / "labels.json") as f:
        assert json.load(f)["names"] == ["neg", "pos"]  # the ClassLabel's names, in its order
    assert len((tmp_path / "out" / "test.jsonl").read_text().splitlines()) == 6  # its own test split


def test_prepare_classes_bad_input_is_one_line(corpus, tmp_path):
    source = corpus / "corpus.csv"
    cases = {("--text", "body"): "--text body: no such column (the columns are sentence, category)",
             ("--labels", "verse,numbers"): "label 'esrev' is not one of the classes (verse, numbers)",
             ("--labels", "verse,numbers,esrev,prose"): "class 'prose' has 0 training document(s)"}
    for flags, expected in cases.items():
        code, message = run_inline("data/prepare_classes.py", source, "--out-dir", tmp_path / "out", *flags)
        assert_one_line_error((code, message), expected)
    (tmp_path / "notes.txt").write_text("hello")
    assert_one_line_error(run_inline("data/prepare_classes.py", tmp_path / "notes.txt"), "must be .csv, .jsonl")


def train_class_models(corpus, out, *extra, classes=None):
    """Tiny BPE models, one per class (or per name in classes), a few seconds each; their out_dirs."""
    with open(corpus / "data" / "labels.json") as f:
        folders = classes or json.load(f)["folders"]
    for folder in folders:
        result = run_script("train.py", *TINY, f"--dataset={corpus / 'data' / folder}", f"--out_dir={out / folder}",
                            "--max_iters=100", "--eval_interval=100", "--learning_rate=3e-3", "--lr_decay_iters=100",
                            "--gradient_accumulation_steps=1", *extra)
        assert result.returncode == 0, result.stderr[-2000:]
    return [str(out / folder) for folder in folders]


def classify(corpus, models):
    """classify.py's accuracies by line name, and its output."""
    result = run_script("classify.py", f"--models={','.join(models)}", f"--test={corpus / 'data' / 'test.jsonl'}", "--device=cpu")
    assert result.returncode == 0, result.stderr[-2000:]
    return {line.split("  accuracy")[0].strip(): float(line.split("accuracy ")[1].split()[0])
            for line in result.stdout.splitlines() if "  accuracy " in line}, result.stdout


def assert_beats_the_baselines(accuracy, output):
    gpt, majority, bayes = (accuracy[k] for k in ("generative GPT classifier", "majority class", "naive Bayes (word counts)"))
    assert gpt >= 0.75 and gpt > majority + 0.3, output  # chance is 1/3
    assert gpt > bayes or gpt == 1.0, output  # word counts cannot tell verse from reversed verse; word order can


def test_class_models_beat_the_baselines(corpus, tmp_path):
    assert_beats_the_baselines(*classify(corpus, train_class_models(corpus, tmp_path)))
    predictions = [json.loads(line) for line in open(tmp_path / "predictions.jsonl")]
    assert len(predictions) == 90 and set(predictions[0]["scores"]) == {"esrev", "numbers", "verse"}


def test_lora_class_models_sharing_one_base_score_as_each_alone(corpus, tmp_path):
    # classify.py keeps one base and switches adapters: each class's scores must be its model's own
    import tiktoken
    import torch
    import torch.nn.functional as F
    import utils
    from conftest import tiny_hf_gpt2
    tiny_hf_gpt2(tmp_path / "base", vocab_size=50257, n_layer=2, n_embd=32, n_positions=32)
    adapters = train_class_models(corpus, tmp_path / "lora", f"--init_from={tmp_path / 'base'}", "--lora_rank=4",
                                  "--max_iters=10", "--eval_iters=1")
    result = run_script("classify.py", f"--models={','.join(adapters)}", f"--test={corpus / 'data' / 'test.jsonl'}",
                        "--device=cpu", "--limit=8")
    assert result.returncode == 0, result.stderr[-2000:]
    predictions = [json.loads(line) for line in open(tmp_path / "lora" / "predictions.jsonl")]
    documents = [json.loads(line)["text"] for line in open(corpus / "data" / "test.jsonl")][:8]
    with open(corpus / "data" / "labels.json") as f:
        labels = json.load(f)
    enc = tiktoken.get_encoding("gpt2")
    for name, folder, prior in zip(labels["names"], labels["folders"], labels["priors"]):
        model = utils.load_gpt(str(tmp_path / "lora" / folder / "ckpt.pt"), "")[0].eval()  # alone, on its own base
        for document, prediction in zip(documents, predictions):
            tokens = torch.tensor([[enc.eot_token] + enc.encode_ordinary(document) + [enc.eot_token]])
            assert tokens.size(1) <= 32  # one window: the whole document
            with torch.no_grad():
                logp = F.log_softmax(model(tokens[:, :-1])[0], dim=-1).gather(-1, tokens[:, 1:, None]).sum().item()
            assert abs(prediction["scores"][name] - (logp + np.log(prior))) < 1e-3


def test_long_documents_are_scored_in_windows_that_predict_every_token_once():
    # classify.py reads its settings when imported: take the function alone from its source
    source = open(os.path.join(REPO, "classify.py")).read()
    namespace = {}
    exec(source[source.index("def windows("):source.index("@torch.no_grad()")], namespace)
    tokens = list(range(100))
    for block_size, step in ((16, 8), (16, 16), (32, 5), (200, 100)):
        scored = []
        for inputs, targets, skip in namespace["windows"](tokens, block_size, step):
            assert len(inputs) == len(targets) <= block_size and targets == [t + 1 for t in inputs]
            assert skip == 0 or skip >= block_size - step  # after the first window: at least that much context
            scored += targets[skip:]
        assert scored == tokens[1:]  # every next-token prediction once, in order
