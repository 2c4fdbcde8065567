import pytest
import torch

import hardware
from model import GPT, GPTConfig, sample_next


def tiny_gpt(**overrides):
    torch.manual_seed(0)
    config = dict(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=32, dropout=0.0, bias=True)
    config.update(overrides)
    return GPT(GPTConfig(**config)).eval()


def test_logits_match_huggingface_gpt2(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=4, n_embd=64, vocab_size=100, n_positions=32,
                                    bos_token_id=0, eos_token_id=0)).eval()
    hf.save_pretrained(tmp_path)
    ours = GPT.from_pretrained(str(tmp_path)).eval()
    idx = torch.randint(0, 100, (2, 32))
    with torch.no_grad():
        logits, _ = ours(idx)
        assert torch.allclose(logits, hf(idx).logits, atol=1e-4, rtol=0)
        # the loss matches too (HF shifts targets inside; we take them shifted)
        _, loss = ours(idx[:, :-1], idx[:, 1:])
        assert torch.allclose(loss, hf(idx, labels=idx).loss, atol=1e-5)


def test_from_pretrained_refuses_unknown_names():
    with pytest.raises(ValueError, match="unknown model 'gpt3'"):
        GPT.from_pretrained('gpt3')


@pytest.mark.parametrize('sampling', [dict(temperature=0), dict(temperature=1.0, top_k=10),
                                      dict(temperature=0.8, top_p=0.9)])
def test_kv_cache_generation_matches_uncached(sampling):
    model = tiny_gpt()
    prompt = torch.randint(0, 50, (3, 5))
    # 30 new tokens run past block_size=16, so the sliding-window path is covered too
    torch.manual_seed(1)
    cached = model.generate(prompt, 30, use_cache=True, **sampling)
    torch.manual_seed(1)
    uncached = model.generate(prompt, 30, use_cache=False, **sampling)
    assert cached.shape == (3, 35)
    assert torch.equal(cached, uncached)


def test_kv_cache_logits_equal_full_forward():
    model = tiny_gpt()
    idx = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        full, _ = model(idx)
        cache = model._new_cache(idx)
        first = model.lm_head(model.hidden_states(idx[:, :7], cache, 0))
        rest = model.lm_head(model.hidden_states(idx[:, 7:], cache, 7))  # a multi-token chunk after a prefix
    assert torch.allclose(torch.cat([first, rest], 1), full, atol=1e-5)


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    torch.manual_seed(0)
    draws = {sample_next(logits.clone(), top_p=0.8).item() for _ in range(200)}
    assert draws == {0, 1}  # 0.5 + 0.3 reaches 0.8; tokens 2 and 3 are cut


def test_top_k_one_is_greedy():
    logits = torch.randn(4, 50)
    assert torch.equal(sample_next(logits.clone(), top_k=1), logits.argmax(-1, keepdim=True))


def test_weights_are_tied_and_residual_projections_scaled():
    model = GPT(GPTConfig(n_layer=8, n_head=2, n_embd=64, block_size=16, vocab_size=50))
    assert model.lm_head.weight is model.transformer.wte.weight
    std = model.transformer.h[0].attn.c_proj.weight.std().item()
    assert abs(std - 0.02 / (2 * 8) ** 0.5) < 0.002


def test_no_weight_decay_on_biases_and_norms():
    model = tiny_gpt()
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 'cpu')
    decayed, plain = opt.param_groups
    assert decayed['weight_decay'] == 0.1 and plain['weight_decay'] == 0.0
    assert all(p.dim() >= 2 for p in decayed['params']) and all(p.dim() < 2 for p in plain['params'])
    assert len(decayed['params']) + len(plain['params']) == len(list(model.parameters()))


def test_activation_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model = tiny_gpt().train()
        model.activation_checkpointing = checkpointing
        idx = torch.randint(0, 50, (2, 16))
        model(idx, idx)[1].backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_crop_block_size():
    model = tiny_gpt()
    model.crop_block_size(8)
    assert model.transformer.wpe.weight.shape[0] == 8
    with pytest.raises(ValueError, match='longer than block_size'):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_mfu_is_unknown_on_cpu_and_gpus_are_matched_by_name():
    assert tiny_gpt().estimate_mfu(1024, 0.1) is None
    assert hardware.match_gpu('NVIDIA H100 80GB HBM3') == 'H100'
    assert hardware.match_gpu('NVIDIA H100 PCIe') == 'H100 PCIe'
    assert hardware.match_gpu('NVIDIA GeForce RTX 4060 Ti') == 'RTX 4060 Ti'
    assert hardware.match_gpu('NVIDIA L40S') == 'L40S'
    assert hardware.match_gpu('NVIDIA L4') == 'L4'
    assert hardware.match_gpu('NVIDIA A100-SXM4-40GB') == 'A100 40GB'
    assert hardware.match_gpu('Tesla T4') is None
