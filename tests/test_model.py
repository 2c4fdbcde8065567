import pytest
import torch
from conftest import tiny_hf_gpt2

from model import GPT, GPTConfig, sample_next


def tiny_gpt(**overrides):
    torch.manual_seed(0)
    config = dict(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=32, dropout=0.0, bias=True)
    config.update(overrides)
    return GPT(GPTConfig(**config)).eval()


def test_logits_match_huggingface_gpt2(tmp_path):
    hf = tiny_hf_gpt2(tmp_path, n_layer=2, n_head=4, n_embd=64)
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


def test_our_newton_schulz_is_torchs_in_bfloat16_and_within_its_tolerance_in_float32():
    from torch.optim._muon import _zeropower_via_newtonschulz as torchs

    from model import newton_schulz
    torch.manual_seed(0)
    settings = (5, (3.4445, -4.775, 2.0315), 1e-7)
    for shape in ((64, 32), (32, 96)):  # tall and wide
        update = torch.randn(shape)
        reference = torchs(update, settings[1], settings[0], settings[2])
        assert torch.equal(newton_schulz(update, *settings, torch.bfloat16), reference)
        in_float32 = newton_schulz(update, *settings, torch.float32)
        assert in_float32.dtype == torch.float32 and (in_float32 - reference.float()).abs().max() < 0.02


@pytest.mark.parametrize('ns_dtype', [torch.bfloat16, torch.float32])
def test_our_muon_steps_as_torchs(ns_dtype):
    from model import Muon
    models = [tiny_gpt() for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    matrices = [[p for p in m.transformer.h.parameters() if p.dim() == 2] for m in models]
    ours, torchs = Muon(matrices[0], ns_dtype, lr=0.02), torch.optim.Muon(matrices[1], lr=0.02)
    x = torch.randint(0, 50, (2, 16))
    for _ in range(3):
        for model, optimizer in zip(models, (ours, torchs)):
            optimizer.zero_grad()
            model.train()(x, x)[1].backward()
            optimizer.step()
    largest = max((a - b).abs().max().item() for a, b in zip(*matrices))
    assert largest == 0 if ns_dtype == torch.bfloat16 else 0 < largest < 0.005  # bf16's rounding: 1/4 of a step
    torchs.load_state_dict(ours.state_dict())  # one state format: checkpoints resume either way


def test_muon_orthogonalizes_in_float32_where_the_cpu_has_no_native_bfloat16(monkeypatch):
    import hardware
    for native, dtype in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(hardware, 'native_bf16', lambda device_type, native=native: native)
        opt = tiny_gpt().configure_optimizers(0.1, 1e-3, (0.9, 0.95), 'cpu', 'muon')
        assert opt.muon.ns_dtype == dtype


def test_muon_takes_the_blocks_matrices_and_adamw_everything_else():
    model = tiny_gpt()
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 'cpu', 'muon', muon_learning_rate=0.05)
    muon_params = [p for g in opt.muon.param_groups for p in g['params']]
    adamw_params = [p for g in opt.adamw.param_groups for p in g['params']]
    blocks = {name for name, p in model.named_parameters() if name.startswith('transformer.h.') and p.dim() == 2}
    assert {name for name, p in model.named_parameters() if any(p is q for q in muon_params)} == blocks
    assert len(muon_params) + len(adamw_params) == len(list(model.parameters()))  # each once; wte/lm_head tied
    assert any(p is model.lm_head.weight for p in adamw_params) and opt.muon.param_groups[0]['lr_ratio'] == 50
    x = torch.randint(0, 50, (2, 16))
    model.train()(x, x)[1].backward()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    opt.step()
    assert all(not torch.equal(before[name], p) for name, p in model.named_parameters())  # both optimizers stepped


def test_activation_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model = tiny_gpt().train()
        model.activation_checkpointing = checkpointing
        idx = torch.randint(0, 50, (2, 16))
        model(idx, idx)[1].backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


@pytest.mark.parametrize('autocast', [False, True])
def test_fused_loss_gives_the_plain_loss_and_gradients(monkeypatch, autocast):
    monkeypatch.setattr('model.LOSS_CHUNK_ROWS', 5)  # 32 positions: six full chunks and a short one
    idx = torch.randint(0, 50, (2, 16))
    targets = idx.roll(-1, 1)
    targets[:, -3:] = -1  # ignored positions count nowhere
    results = []
    for fused in (False, True):
        model = tiny_gpt().train()
        model.fused_loss = fused
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
            loss = model(idx, targets)[1]
        (2 * loss).backward()  # backward scales the stored gradients, as gradient accumulation's 1/steps does
        results.append((loss, torch.cat([p.grad.flatten() for p in model.parameters()])))
    tolerance = 2e-2 if autocast else 1e-5
    assert torch.allclose(results[0][0], results[1][0], rtol=tolerance)
    assert torch.allclose(results[0][1], results[1][1], atol=tolerance * results[0][1].abs().max())
    with torch.no_grad():
        assert torch.allclose(model(idx, targets)[1], results[1][0], rtol=tolerance)


def test_crop_block_size():
    model = tiny_gpt()
    model.crop_block_size(8)
    assert model.transformer.wpe.weight.shape[0] == 8
    with pytest.raises(ValueError, match='longer than block_size'):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_mfu_on_a_cpu_is_of_its_measured_matmul_peak():
    import hardware
    model = tiny_gpt()
    assert model.estimate_mfu(1024, 0.1) == model.flops_per_token() * 1024 / 0.1 / hardware.cpu_matmul_peak('float32')


def test_forward_with_targets_returns_the_loss_but_not_the_logits():
    model = tiny_gpt()
    idx = torch.randint(0, 50, (2, 16))
    logits, loss = model(idx, idx)
    assert logits is None and loss.ndim == 0
    logits, loss = model(idx)
    assert logits.shape == (2, 16, 50) and loss is None


def test_generate_never_samples_ids_beyond_the_tokenizer():
    model = tiny_gpt(vocab_size=64)  # as GPT-2's 50257 padded to 50304: ids 50.. are unknown to the tokenizer
    with torch.no_grad():
        model.lm_head.weight[50:] = 10 * model.lm_head.weight[50:].sign()  # make the padded ids the likeliest
    prompt = torch.randint(0, 50, (4, 3))
    torch.manual_seed(0)
    assert model.generate(prompt, 20, temperature=1.0)[:, 3:].max() >= 50  # unmasked, they are drawn
    torch.manual_seed(0)
    assert model.generate(prompt, 20, temperature=1.0, vocab_size=50)[:, 3:].max() < 50


def test_generate_stops_each_row_at_the_stop_token():
    model = tiny_gpt()
    prompt = torch.randint(0, 50, (3, 4))
    greedy = model.generate(prompt, 10, temperature=0)
    stop = greedy[0, 6].item()  # row 0 reaches it at its third new token
    out = model.generate(prompt, 10, temperature=0, stop_token=stop)
    assert out[0, 6] == stop and (out[0, 6:] == stop).all()  # a finished row only repeats the stop token
    for row in range(3):  # before their stop, rows are what plain generation gives
        new = greedy[row, 4:].tolist()
        end = new.index(stop) + 1 if stop in new else len(new)
        assert out[row, 4:4 + end].tolist() == new[:end]
    if all(stop in greedy[row, 4:].tolist() for row in range(3)):
        assert out.shape[1] < 14  # everyone stopped: generation ended early


def test_fused_adamw_skips_a_flagged_step_exactly():
    # train.py skips a non-finite step on the device this way, with no host sync
    model = tiny_gpt()
    optimizer = model.configure_optimizers(0.1, 1e-2, (0.9, 0.95), 'cpu')
    assert all(group['fused'] for group in optimizer.param_groups)
    idx = torch.randint(0, 50, (2, 16))
    model(idx, idx)[1].backward()
    optimizer.step()
    before = ([p.detach().clone() for p in model.parameters()],
              [{k: v.clone() for k, v in s.items()} for s in optimizer.state.values()])
    for p in model.parameters():
        p.grad.fill_(float('nan'))
    optimizer.found_inf = torch.tensor(1.0)
    optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(before[0], model.parameters()))
    assert all(torch.equal(s[k], v) for s, old in zip(optimizer.state.values(), before[1]) for k, v in old.items())
