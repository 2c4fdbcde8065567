"""export.py: a train.py checkpoint -> a Hugging Face GPT2LMHeadModel folder that gives our logits."""
import os

import pytest
import torch
from conftest import run_inline, write_checkpoint

from model import GPT, GPTConfig


def random_run(folder, vocab_size, dataset, bias, gelu="tanh", **entries):
    """A checkpoint of a random GPT in folder, as train.py writes one; returns the model."""
    torch.manual_seed(0)
    args = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=vocab_size, bias=bias, dropout=0.0, gelu=gelu)
    model = GPT(GPTConfig(**args))
    with torch.no_grad():  # non-zero biases and norms, so that a wrong layout shows
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn_like(p) * 0.1 + (1 if name.endswith("ln_1.weight") else 0))
    write_checkpoint(folder, {"model": model.state_dict(), "model_args": args, "config": {"dataset": dataset},
                              **entries})
    return model.eval()


@pytest.mark.parametrize("bias,gelu", [(True, "tanh"), (False, "exact")])  # GPT-2's; ours from scratch
def test_exported_bpe_model_gives_our_logits_and_gpt2_tokens_and_loads_back(tmp_path, bias, gelu):
    from transformers import AutoTokenizer, GPT2LMHeadModel
    ours = random_run(tmp_path / "run", 50304, str(tmp_path / "no-such-dataset"), bias, gelu)
    assert run_inline("export.py", f"--out_dir={tmp_path / 'run'}")[0] == 0
    folder = str(tmp_path / "run-hf")
    hf = GPT2LMHeadModel.from_pretrained(folder).eval()
    # the two GELUs differ by < 1e-3, too little to show in these logits: check that each side says which
    assert hf.config.activation_function == {"tanh": "gelu_new", "exact": "gelu"}[gelu]
    assert GPT.from_pretrained(folder).config.gelu == gelu
    idx = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ours(idx)[0][..., :50257]  # the padded rows are cut back to GPT-2's vocabulary
        torch.testing.assert_close(hf(idx).logits, expected, atol=1e-4, rtol=0)
        torch.testing.assert_close(GPT.from_pretrained(folder).eval()(idx)[0], expected, atol=1e-4, rtol=0)
    import tiktoken
    text = "Hello world! Ça va? 1234  spaces\n\tand <tabs> — dashes, naïve cafés."
    assert AutoTokenizer.from_pretrained(folder)(text)["input_ids"] \
        == tiktoken.get_encoding("gpt2").encode_ordinary(text)


def test_a_char_level_model_exports_weights_and_says_it_has_no_tokenizer(tmp_path, char_data):
    random_run(tmp_path / "run", 65, char_data, bias=False)
    code, message = run_inline("export.py", f"--out_dir={tmp_path / 'run'}", f"--export_dir={tmp_path / 'hf'}")
    assert code == 0
    assert sorted(os.listdir(tmp_path / "hf")) == ["config.json", "generation_config.json", "model.safetensors"]
    assert run_inline("export.py", f"--out_dir={tmp_path / 'run'}", f"--export_dir={tmp_path / 'hf'}") == \
        (1, f"error: {tmp_path / 'hf'} already exists: pass another --export_dir")


@pytest.mark.parametrize("entries", [{"vocabulary": {i: chr(97 + i) for i in range(20)}}, {}], ids=["new", "older"])
def test_a_char_level_model_gets_no_gpt2_tokenizer_wherever_its_dataset_is(tmp_path, entries):
    # the checkpoint names a dataset that is not there from here: it says its own characters (new), or its
    # vocabulary is too small for GPT-2's tokens (older checkpoints)
    random_run(tmp_path / "run", 20, "some/other/place", bias=False, **entries)
    assert run_inline("export.py", f"--out_dir={tmp_path / 'run'}")[0] == 0
    assert sorted(os.listdir(tmp_path / "run-hf")) == ["config.json", "generation_config.json", "model.safetensors"]


def test_an_export_removes_what_a_killed_export_to_the_same_folder_left_and_nothing_else(tmp_path):
    random_run(tmp_path / "run", 20, "nowhere", bias=False)
    dead, alive, users = (tmp_path / name
                          for name in (".run-hf.tmp4999999", f".run-hf.tmp{os.getppid()}", ".run-hf.tmp"))
    for folder in (dead, alive, users):  # pid 4999999 is above Linux's largest: never running
        folder.mkdir()
        (folder / "config.json").write_text("half written")
    assert run_inline("export.py", f"--out_dir={tmp_path / 'run'}")[0] == 0
    assert not dead.exists() and alive.exists() and users.exists()
