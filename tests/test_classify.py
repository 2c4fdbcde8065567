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
from conftest import REPO, TINY, assert_one_line_error, run_inline, run_script, write_checkpoint

NUMBERS = "zero one two three four five six seven eight nine ten eleven twelve".split()


def three_sources(lines_per_class=300):
    """Shakespeare lines, the same lines with their words reversed, and number sentences."""
    with open(os.path.join(REPO, "data", "shakespeare_char", "input.txt")) as f:
        lines = [line.strip() for line in f if len(line.split()) >= 5][:2 * lines_per_class]
    rng = random.Random(0)
    numbers = [f"{rng.choice(NUMBERS)} plus {rng.choice(NUMBERS)} makes {rng.choice(NUMBERS)} and "
               f"{rng.choice(NUMBERS)} times {rng.choice(NUMBERS)} is {rng.choice(NUMBERS)}."
               for _ in range(lines_per_class)]
    return {"verse": lines[::2], "esrev": [" ".join(reversed(line.split())) for line in lines[1::2]],
            "numbers": numbers}


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
    data = datasets.DatasetDict(train=datasets.Dataset.from_dict({"text": texts, "label": [i % 2 for i in range(40)]},
                                                                  features),
                                test=datasets.Dataset.from_dict({"text": texts[:6], "label": [i % 2 for i in range(6)]},
                                                                features))
    data.save_to_disk(str(tmp_path / "saved"))
    assert run_inline("data/prepare_classes.py", tmp_path / "saved", "--out-dir", tmp_path / "out")[0] == 0
    with open(tmp_path / "out" / "labels.json") as f:
        assert json.load(f)["names"] == ["neg", "pos"]  # the ClassLabel's names, in its order
    assert len((tmp_path / "out" / "test.jsonl").read_text().splitlines()) == 6  # its own test split


def test_prepare_classes_bad_input_is_one_line(corpus, tmp_path):
    source = corpus / "corpus.csv"
    cases = {("--text", "body"): "--text body: no such column (the columns are sentence, category)",
             ("--labels", "verse,numbers"): "label 'esrev' is not one of the classes (verse, numbers)",
             ("--labels", "verse,numbers,esrev,prose"): "class 'prose' has 0 training document(s)",
             ("--test", str(tmp_path / "nowhere.csv")): "--test " + str(tmp_path / "nowhere.csv") + " not found",
             ("--block-size", "0"): "--block-size must be at least 1, got 0"}
    for flags, expected in cases.items():
        code, message = run_inline("data/prepare_classes.py", source, "--out-dir", tmp_path / "out", *flags)
        assert_one_line_error((code, message), expected)
    (tmp_path / "notes.txt").write_text("hello")
    assert_one_line_error(run_inline("data/prepare_classes.py", tmp_path / "notes.txt"), "must be .csv, .jsonl")
    assert_one_line_error(run_inline("data/prepare_classes.py", source, "--name", "../x"),
                          "must be a folder name under data/")
    assert_one_line_error(run_inline("data/prepare_classes.py", source, "--out-dir", tmp_path / "out",
                                     "--test-fraction", "nan"), "--test-fraction must be in (0, 1), got nan")
    (tmp_path / "one.csv").write_text("text,label\nhello,a\n")
    assert_one_line_error(run_inline("data/prepare_classes.py", tmp_path / "one.csv", "--out-dir", tmp_path / "out"),
                          "1 row(s) cannot give a train and a --test-fraction 0.1 test split")
    assert not (tmp_path / "out").exists()


def test_prepare_classes_replaces_a_dataset_only_when_asked_and_then_drops_the_old_classes(corpus, tmp_path):
    import prepare_classes
    out = tmp_path / "out"
    prepare_classes.prepare(str(corpus / "corpus.csv"), str(out))
    (out / "verse" / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="already holds a dataset .labels.json, test.jsonl.: pass --overwrite"):
        prepare_classes.prepare(str(corpus / "corpus.csv"), str(out), labels="esrev,numbers,verse")
    two = tmp_path / "two.csv"
    two.write_text("sentence,category\n" + "".join(f"line {i},{'ab'[i % 2]}\n" for i in range(40)))
    prepare_classes.prepare(str(two), str(out), overwrite=True)
    assert sorted(os.listdir(out)) == ["a", "b", "labels.json", "test.jsonl", "verse"]  # verse: the user's file only
    assert os.listdir(out / "verse") == ["notes.txt"]


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
    result = run_script("classify.py", f"--models={','.join(models)}", f"--test={corpus / 'data' / 'test.jsonl'}",
                        "--device=cpu")
    assert result.returncode == 0, result.stderr[-2000:]
    return {line.split("  accuracy")[0].strip(): float(line.split("accuracy ")[1].split()[0])
            for line in result.stdout.splitlines() if "  accuracy " in line}, result.stdout


def assert_beats_the_baselines(accuracy, output):
    gpt, majority, bayes = (accuracy[k] for k in ("generative GPT classifier", "majority class",
                                                  "naive Bayes (word counts)"))
    assert gpt >= 0.75 and gpt > majority + 0.3, output  # chance is 1/3
    assert gpt > bayes or gpt == 1.0, output  # word counts cannot tell verse from reversed verse; word order can


@pytest.mark.slow
def test_class_models_beat_the_baselines(corpus, tmp_path):
    assert_beats_the_baselines(*classify(corpus, train_class_models(corpus, tmp_path)))
    predictions = [json.loads(line) for line in open(tmp_path / "predictions.jsonl")]
    assert len(predictions) == 90 and set(predictions[0]["scores"]) == {"esrev", "numbers", "verse"}


@pytest.mark.slow
def test_lora_class_models_sharing_one_base_score_as_each_alone(corpus, tmp_path):
    # classify.py keeps one base and switches adapters: each class's scores must be its model's own
    import tiktoken
    import torch
    import torch.nn.functional as F
    from conftest import tiny_hf_gpt2

    from gpt_checkpoint import load_gpt
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
        model = load_gpt(str(tmp_path / "lora" / folder / "ckpt.pt"), "")[0].eval()  # alone, on its own base
        for document, prediction in zip(documents, predictions):
            tokens = torch.tensor([[enc.eot_token] + enc.encode_ordinary(document) + [enc.eot_token]])
            assert tokens.size(1) <= 32  # one window: the whole document
            with torch.no_grad():
                logp = F.log_softmax(model(tokens[:, :-1])[0], dim=-1).gather(-1, tokens[:, 1:, None]).sum().item()
            assert abs(prediction["scores"][name] - (logp + np.log(prior))) < 1e-3


def test_long_documents_are_scored_in_windows_that_predict_every_token_once():
    from classify import windows
    tokens = list(range(100))
    for block_size, step in ((16, 8), (16, 16), (32, 5), (200, 100)):
        scored = []
        for inputs, targets, skip in windows(tokens, block_size, step):
            assert len(inputs) == len(targets) <= block_size and targets == [t + 1 for t in inputs]
            assert skip == 0 or skip >= block_size - step  # after the first window: at least that much context
            scored += targets[skip:]
        assert scored == tokens[1:]  # every next-token prediction once, in order


def tiny_class_model(out_dir, dataset, vocabulary=None, vocab_size=50304, block_size=16):
    """A random class model's checkpoint as train.py writes one: for what classify.py checks and computes,
    not for accuracy."""
    import torch

    from model import GPT, GPTConfig
    torch.manual_seed(0)
    args = dict(n_layer=1, n_head=2, n_embd=16, block_size=block_size, vocab_size=vocab_size, bias=False, dropout=0.0,
                gelu="exact")
    checkpoint = {"model": GPT(GPTConfig(**args)).state_dict(), "model_args": args, "config": {"dataset": str(dataset)},
                  "vocabulary": vocabulary}
    return write_checkpoint(out_dir, checkpoint)


def test_classify_bad_input_is_one_line_and_leaves_every_file_as_it_was(corpus, tmp_path):
    data = corpus / "data"
    labels = json.loads((data / "labels.json").read_text())
    models = ",".join(tiny_class_model(tmp_path / f, data / f) for f in labels["folders"])
    with_a_char_model = ",".join([tiny_class_model(tmp_path / "char", data / labels["folders"][0], {0: "a"}, 1),
                                  *models.split(",")[1:]])
    files = {"no_text.jsonl": '{"text": "fine", "label": "verse"}\n{"label": "verse"}\n', "a_list.jsonl": '["verse"]\n',
             "a_dict.json": '{\n  "text": "x", "label": "verse"\n}\n', "mine.jsonl": "my own results",
             "zero_prior.json": json.dumps(dict(labels, priors=[0.0, 0.5, 0.5]))}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    test = f"--test={data / 'test.jsonl'}"
    cases = {
        (test, f"--out={tmp_path / 'mine.jsonl'}"): "mine.jsonl exists: pass another --out, or --overwrite=True",
        (test, f"--out={data / 'test.jsonl'}", "--overwrite=True"): "test.jsonl is one of this run's inputs",
        (test, f"--out={tmp_path / 'no' / 'p.jsonl'}"): "p.jsonl: its folder does not exist",
        (f"--test={tmp_path / 'no_text.jsonl'}", f"--labels={data / 'labels.json'}"):
            'no_text.jsonl line 2 is not a {"text": "...", "label": ...} object',
        (f"--test={tmp_path / 'a_list.jsonl'}", f"--labels={data / 'labels.json'}"):
            "a_list.jsonl line 1 is not a {",
        (f"--test={tmp_path / 'a_dict.json'}", f"--labels={data / 'labels.json'}"):
            "a_dict.json line 1 is not valid JSON",
        (test, f"--labels={tmp_path / 'zero_prior.json'}"): "class 'esrev' has prior 0.0; each prior must be in (0, 1]",
        (test, "--stride=17"): "--stride=17 is above",
        (test, f"--models={with_a_char_model}", "--overwrite=True"): "has another vocabulary than",
    }
    before = {path: path.read_bytes() for path in [*tmp_path.iterdir(), *data.iterdir()] if path.is_file()}
    for args, expected in cases.items():
        assert_one_line_error(run_inline("classify.py", f"--models={models}", "--device=cpu", *args), expected)
    assert {path: path.read_bytes() for path in before} == before and not (tmp_path / "predictions.jsonl").exists()


def test_char_level_class_models_score_each_document_in_their_characters(tmp_path):
    import torch

    from model import GPT
    texts = {"ab": ["abab ab", "ba ab"], "cd": ["cdcd dc", "dc cd"]}
    vocabulary = dict(enumerate(" \nabcd"))
    stoi = {c: i for i, c in vocabulary.items()}
    for name, docs in texts.items():
        (tmp_path / "data" / name).mkdir(parents=True)
        np.array([stoi[c] for c in "\n".join(docs)], dtype=np.uint16).tofile(tmp_path / "data" / name / "train.bin")
        tiny_class_model(tmp_path / "out" / name, tmp_path / "data" / name, vocabulary, len(vocabulary))
    (tmp_path / "data" / "labels.json").write_text(json.dumps({"names": ["ab", "cd"], "folders": ["ab", "cd"],
                                                                "priors": [0.5, 0.5]}))
    (tmp_path / "data" / "test.jsonl").write_text("".join(json.dumps({"text": d, "label": n}) + "\n"
                                                          for n, docs in texts.items() for d in docs))
    args = [f"--models={tmp_path / 'out' / 'ab'},{tmp_path / 'out' / 'cd'}",
            f"--test={tmp_path / 'data' / 'test.jsonl'}", "--device=cpu"]
    assert run_inline("classify.py", *args) == (0, "")
    predictions = [json.loads(line) for line in open(tmp_path / "out" / "predictions.jsonl")]
    model = GPT.from_checkpoint(torch.load(tmp_path / "out" / "ab" / "ckpt.pt", weights_only=True)).eval()
    ids = torch.tensor([[stoi[c] for c in texts["ab"][0]]])  # no <|endoftext|> around char-level documents
    with torch.no_grad():
        expected = -model(ids[:, :-1], ids[:, 1:])[1].item() * (ids.shape[1] - 1) + np.log(0.5)  # the mean loss, summed
    assert len(predictions) == 4 and abs(predictions[0]["scores"]["ab"] - expected) < 1e-4
    assert run_inline("classify.py", *args)[1].endswith("--overwrite=True to replace it")
    assert run_inline("classify.py", *args, "--overwrite=True") == (0, "")


def test_classify_reads_each_runs_best_val_checkpoint_not_its_latest(corpus, tmp_path):
    # an interrupted run: ckpt.pt is the latest model, best.pt the best one; here the latest claims the wrong class
    data = corpus / "data"
    folders = json.loads((data / "labels.json").read_text())["folders"]
    for folder in folders:
        tiny_class_model(tmp_path / folder, data / folders[0])  # ckpt.pt: every latest one claims the first class
        os.replace(tmp_path / folder / "ckpt.pt", tmp_path / folder / "latest.pt")
        tiny_class_model(tmp_path / folder, data / folder)
        os.replace(tmp_path / folder / "ckpt.pt", tmp_path / folder / "best.pt")
        os.replace(tmp_path / folder / "latest.pt", tmp_path / folder / "ckpt.pt")
    args = [f"--models={','.join(str(tmp_path / f) for f in folders)}", f"--test={data / 'test.jsonl'}", "--device=cpu",
            "--limit=3"]
    assert run_inline("classify.py", *args) == (0, "")
    assert_one_line_error(run_inline("classify.py", *args, "--checkpoint_name=ckpt.pt", "--overwrite=True"),
                          "two models for class")  # the latest ones would have been wrong
    for folder in folders:  # a run that saved no best.pt: its ckpt.pt
        os.remove(tmp_path / folder / "best.pt")
    assert_one_line_error(run_inline("classify.py", *args, "--overwrite=True"), "two models for class")


def test_prepare_classes_takes_a_test_file_and_gives_every_val_split_a_block(corpus, tmp_path, capsys):
    import prepare_classes
    rows = [{"text": f"document {i} of class {label} " * 3, "label": label} for i in range(40) for label in "ab"]
    source, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    test.write_text("".join(json.dumps({"text": f"held out {label}", "label": label}) + "\n" for label in "abba"))
    prepare_classes.prepare(str(source), str(tmp_path / "out"), test_file=str(test), block_size=64)
    labels = json.loads((tmp_path / "out" / "labels.json").read_text())
    assert labels["train_counts"] == [40, 40]  # every row trains: the test documents are --test's
    assert [json.loads(line)["text"] for line in open(tmp_path / "out" / "test.jsonl")] == \
        ["held out a", "held out b", "held out b", "held out a"]
    for folder in labels["folders"]:  # 5% of 40 documents is 2, about 40 tokens: grown to a block + 1
        assert np.fromfile(tmp_path / "out" / folder / "val.bin", dtype=np.uint16).size >= 65
    prepare_classes.prepare(str(source), str(tmp_path / "big"), test_file=str(test), block_size=4096)
    assert "fewer than --block-size 4096 + 1: train it with --block_size=" in capsys.readouterr().out
