"""bench/pretrain.py: the FLOPs-per-token formula on hand-computed cases, and the ablation ladder's rungs."""
from __future__ import annotations

import torch
import torch.nn as nn

from bench.nanogpt_ref import NanoGPT, NanoGPTConfig, NanoGPTMLP
from bench.pretrain import LADDER, LearnedPositions, flops_per_token, ladder_model
from models.gpt import GPT, GPTConfig, GPTRMSNorm

V = 97


def test_flops_per_token_hand_computed_for_both_decoders():
    torch.manual_seed(0)
    nano = NanoGPT(NanoGPTConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, max_seq_len=64))
    # per layer c_attn 32*96 + c_proj 32*32 + c_fc 32*128 + mlp c_proj 128*32 = 12 * 32^2; the tied head 97*32 once
    n_matmul = 2 * 12 * 32 * 32 + V * 32
    assert flops_per_token(nano, n_layers=2, attn_width=32, seq_len=64) == 6 * n_matmul + 12 * 2 * 32 * 64 == 215232
    ours = GPT(GPTConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64))
    # q 32*32 + k, v 32*16 each + o 32*32 + SwiGLU 3 * 32*96: GQA and SwiGLU's width cancel at this size
    assert flops_per_token(ours, n_layers=2, attn_width=4 * 8, seq_len=64) == 215232 == ours.flops_per_token(64)


def test_ladder_swaps_one_part_per_rung_and_every_rung_trains():
    x = torch.randint(0, V, (2, 16))
    models = [ladder_model(V, rung) for rung in range(len(LADDER) + 1)]
    assert isinstance(models[0], GPT) and isinstance(models[-1], NanoGPT)
    attn = [m.layers[0].self_attn for m in models[:-1]]
    assert isinstance(attn[0].q_norm, GPTRMSNorm) and isinstance(attn[1].q_norm, nn.Identity)  # QK-norm
    assert isinstance(models[1].norm, GPTRMSNorm) and isinstance(models[2].norm, nn.LayerNorm)  # RMSNorm
    assert not isinstance(models[2].layers[0].mlp, NanoGPTMLP) and isinstance(models[3].layers[0].mlp, NanoGPTMLP)
    assert not isinstance(models[3].embed_tokens, LearnedPositions) and isinstance(models[4].embed_tokens, LearnedPositions)
    assert (attn[4].n_kv_heads, attn[5].n_kv_heads) == (2, 4)  # GQA -> MHA
    for m in models:
        assert m.lm_head.weight is (m.wte.weight if isinstance(m, NanoGPT) else m.embed_tokens.weight)  # all tied
        logits, loss = m(x, x)
        assert logits.shape == (2, 16, V)
        loss.backward()
