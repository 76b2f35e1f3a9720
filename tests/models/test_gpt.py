"""models/gpt.py: shapes and loss, save/load, tied weights, doc_ids and padding masks, the KV cache."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from models.gpt import GPT, GPTConfig, RMSNormCPU, doc_positions

V = 97


def tiny(**kw) -> GPT:
    torch.manual_seed(0)
    cfg = dict(vocab_size=V, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)
    return GPT(GPTConfig(**(cfg | kw))).eval()


def test_config_derives_head_dim_and_swiglu_width_and_round_trips():
    cfg = GPTConfig(vocab_size=4096, d_model=128)
    assert cfg.head_dim == 32
    assert cfg.d_ff == 352  # 8/3 * 128 = 341.3 -> nearest multiple of 32
    assert GPTConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="n_kv_heads"):
        GPTConfig(vocab_size=10, n_heads=4, n_kv_heads=3)


def test_parameter_names_are_hf_qwen3_names():
    names = set(tiny().state_dict())
    for suffix in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                   "self_attn.q_norm", "self_attn.k_norm", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
                   "input_layernorm", "post_attention_layernorm"):
        assert f"layers.1.{suffix}.weight" in names
    assert {"embed_tokens.weight", "norm.weight", "lm_head.weight"} <= names
    assert not [n for n in names if n.endswith("bias")]


def test_shapes_and_loss_at_init_is_near_uniform():
    model = tiny()
    x, y = torch.randint(0, V, (3, 16)), torch.randint(0, V, (3, 16))
    logits, loss = model(x, y)
    assert logits.shape == (3, 16, V) and logits.dtype == torch.float32
    assert abs(loss.item() - math.log(V)) < 0.1  # N(0, 0.02) init: nearly uniform predictions
    assert model(x)[1] is None
    assert model.hidden(x).shape == (3, 16, 32)


def test_loss_ignores_minus_100_targets():
    model = tiny()
    x = torch.randint(0, V, (2, 12))
    targets = x.clone()
    targets[:, :5] = -100
    logits, loss = model(x, targets)
    expected = F.cross_entropy(logits[:, 5:].reshape(-1, V), x[:, 5:].reshape(-1))
    torch.testing.assert_close(loss, expected)


def test_head_at_masked_positions_gives_the_same_logits_loss_and_gradients():
    model = tiny().train()
    x = torch.randint(0, V, (3, 12))
    targets = x.roll(-1, 1)
    targets[:, :7] = -100
    targets[1] = -100  # a row without targets
    full_logits, full_loss = model(x, targets)
    full_loss.backward()
    full_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    at = targets != -100
    logits, loss = model(x, targets, at=at)
    loss.backward()
    assert logits.shape == (int(at.sum()), V)
    torch.testing.assert_close(logits, full_logits[at])
    torch.testing.assert_close(loss, full_loss)
    for g, p in zip(full_grads, model.parameters()):
        torch.testing.assert_close(p.grad, g)


def test_backward_reaches_every_parameter():
    model = tiny(tie_embeddings=False).train()
    x = torch.randint(0, V, (2, 10))
    model(x, x)[1].backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_num_params_and_flops():
    tied, untied = tiny(), tiny(tie_embeddings=False)
    assert untied.num_params() - tied.num_params() == V * 32  # the untied head
    assert tied.num_params(non_embedding=True) == untied.num_params(non_embedding=True)
    assert tied.num_params(non_embedding=True) == tied.num_params() - V * 32
    # matmul weights of one layer: q 32*32, k and v 32*16 each, o 32*32, gate/up/down 3 * 32*96 (d_ff 96)
    per_layer = 1024 + 512 + 512 + 1024 + 3 * 32 * 96
    n_matmul = 2 * per_layer + V * 32  # 2 layers + the head, tied or not (not the lookup, not the norm gains)
    assert n_matmul == 27680
    assert tied.flops_per_token(64) == untied.flops_per_token(64) == 6 * 27680 + 12 * 2 * (4 * 8) * 64 == 215232


def test_rms_norm_cpu_forward_is_f_rms_norm_bitwise_and_backward_matches_autograd():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 4, 8, requires_grad=True)  # a QK-norm shaped input: (B, T, heads, hd)
    w = (1 + 0.1 * torch.randn(8)).requires_grad_()
    dy = torch.randn(3, 5, 4, 8)
    y_ref = F.rms_norm(x, (8,), w, 1e-6)
    dx_ref, dw_ref = torch.autograd.grad(y_ref, (x, w), dy)
    y = RMSNormCPU.apply(x, w, 1e-6)
    assert torch.equal(y, y_ref)
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dw, dw_ref, rtol=1e-5, atol=1e-5)
    xd, wd = x.detach().double()[:1, :2].requires_grad_(), w.detach().double().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: RMSNormCPU.apply(a, b, 1e-6), (xd, wd))
    frozen = RMSNormCPU.apply(x, w.detach(), 1e-6)  # a frozen gain (LoRA): only dx is computed
    torch.testing.assert_close(torch.autograd.grad(frozen, x, dy)[0], dx_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tied", [True, False])
def test_save_load_round_trip(tmp_path, tied):
    model = tiny(tie_embeddings=tied)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["family_gpt"]["tie_embeddings"] is tied
    assert ("lm_head.weight" in load_file(str(tmp_path / "model.safetensors"))) is not tied  # tied head stored once
    loaded = GPT.from_pretrained(tmp_path)
    assert (loaded.lm_head.weight is loaded.embed_tokens.weight) is tied
    x = torch.randint(0, V, (2, 9))
    torch.testing.assert_close(loaded(x)[0], model(x)[0], rtol=0, atol=0)


def test_doc_positions_restart_at_each_document():
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 2], [5, 5, 5, 5, 5, 5]])
    assert doc_positions(doc_ids).tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]]


def test_doc_ids_isolate_documents_in_a_packed_sequence():
    model = tiny()
    doc1, doc2 = torch.randint(0, V, (1, 7)), torch.randint(0, V, (1, 9))
    doc_ids = torch.tensor([[0] * 7 + [1] * 9])
    packed = model(torch.cat((doc1, doc2), 1), doc_ids=doc_ids)[0]
    other = model(torch.cat((torch.randint(0, V, (1, 7)), doc2), 1), doc_ids=doc_ids)[0]
    alone = model(doc2)[0]
    # doc 2 neither sees doc 1's tokens nor its length (positions restart), so it equals doc 2 run alone
    torch.testing.assert_close(packed[:, 7:], other[:, 7:], rtol=0, atol=1e-6)
    torch.testing.assert_close(packed[:, 7:], alone, rtol=0, atol=1e-5)
    torch.testing.assert_close(packed[:, :7], model(doc1)[0], rtol=0, atol=1e-5)
    # without doc_ids the second document does see the first
    assert (model(torch.cat((doc1, doc2), 1))[0][:, 7:] - alone).abs().max() > 1e-3


def test_attention_mask_left_and_right_padding_match_unpadded_rows():
    model = tiny()
    short, full = torch.randint(0, V, (1, 5)), torch.randint(0, V, (1, 8))
    pad = torch.zeros(1, 3, dtype=torch.long)
    left = torch.cat((torch.cat((pad, short), 1), full))
    left_mask = torch.tensor([[False] * 3 + [True] * 5, [True] * 8])
    h = model.hidden(left, attention_mask=left_mask)
    assert torch.isfinite(h).all()
    torch.testing.assert_close(h[:1, 3:], model.hidden(short), rtol=0, atol=1e-5)
    torch.testing.assert_close(h[1:], model.hidden(full), rtol=0, atol=1e-5)
    right = torch.cat((short, pad), 1)
    h = model.hidden(right, attention_mask=torch.tensor([[True] * 5 + [False] * 3]))
    torch.testing.assert_close(h[:, :5], model.hidden(short), rtol=0, atol=1e-5)


def test_kv_cache_steps_match_the_full_forward():
    model = tiny()
    x = torch.randint(0, V, (2, 20))
    full = model(x)[0]
    cache = model.new_cache(2, 20)
    parts = [model(x[:, :8], cache=cache)[0], model(x[:, 8:12], cache=cache)[0]]  # prefill, then a 4-token chunk
    parts += [model(x[:, t:t + 1], cache=cache)[0] for t in range(12, 20)]  # one token at a time
    assert cache.pos == 20 and cache.k[0].shape == (2, 2, 20, 8)
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="holds 20 positions"):
        model(x[:, :1], cache=cache)


def test_kv_cache_with_left_padding_matches_unpadded_decoding():
    model = tiny()
    seq = torch.randint(0, V, (1, 10))
    ids = torch.cat((torch.zeros(1, 4, dtype=torch.long), seq[:, :6]), 1)
    cache = model.new_cache(1, 14)
    padded = [model(ids, attention_mask=torch.tensor([[False] * 4 + [True] * 6]), cache=cache)[0][:, 4:]]
    padded += [model(seq[:, t:t + 1], cache=cache)[0] for t in range(6, 10)]
    torch.testing.assert_close(torch.cat(padded, 1), model(seq)[0], rtol=0, atol=1e-5)


def test_positions_past_max_seq_len_extend_the_rope_table():
    model = tiny(max_seq_len=8)
    x = torch.randint(0, V, (1, 20))
    logits = model(x)[0]
    assert model.rope_cos.shape[0] >= 20 and torch.isfinite(logits).all()
    torch.testing.assert_close(logits, tiny(max_seq_len=32)(x)[0], rtol=0, atol=1e-6)


def test_rope_table_grown_under_inference_mode_still_trains():
    """Generation past max_seq_len grows the table inside inference_mode; the next training forward
    (GRPO's, right after sampling) must still be able to backpropagate through it."""
    model = tiny(max_seq_len=8)
    with torch.inference_mode():
        model(torch.randint(0, V, (1, 20)))
    loss = model(torch.randint(0, V, (2, 20)), targets=torch.randint(0, V, (2, 20)))[1]
    loss.backward()
    assert model.lm_head.weight.grad is not None or model.embed_tokens.weight.grad is not None
