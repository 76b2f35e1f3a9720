"""LoRA adapters: only the adapters train, the start is the base model, and merging changes nothing."""
from __future__ import annotations

import pytest
import torch

from models.gpt import GPT, GPTConfig
from models.lora import LoRALinear, apply_lora, lora_parameters, merge_lora

TARGETS = ("q_proj", "v_proj", "up_proj")


def tiny(tied: bool = True) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64,
                         tie_embeddings=tied))


def ids(B: int = 2, T: int = 12) -> torch.Tensor:
    return torch.randint(0, 97, (B, T), generator=torch.Generator().manual_seed(1))


def test_apply_lora_wraps_targets_and_leaves_only_adapters_trainable():
    model = tiny()
    wrapped = apply_lora(model, TARGETS, r=4, alpha=8)
    assert sorted(wrapped) == sorted(f"layers.{i}.{p}" for i in range(2)
                                     for p in ("self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{w}.{ab}" for w in wrapped for ab in ("lora_A", "lora_B")}
    assert len(lora_parameters(model)) == 2 * len(wrapped)
    # the frozen weights keep their HF names in the state dict
    assert "layers.0.self_attn.q_proj.weight" in model.state_dict()


def test_training_step_changes_only_the_adapters():
    model = tiny()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    apply_lora(model, TARGETS, r=4, alpha=8)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = ids()
    for _ in range(2):  # B starts at zero, so A only moves from the second step
        _, loss = model(x, x)
        loss.backward()
        opt.step()
        opt.zero_grad()
    for n, p in model.named_parameters():
        if "lora_" in n:
            continue
        assert torch.equal(p, before[n]), f"frozen parameter {n} changed"
    assert all(not torch.equal(m.lora_B, torch.zeros_like(m.lora_B)) for m in model.modules() if isinstance(m, LoRALinear))


def test_lora_starts_as_the_base_model():
    model = tiny()
    x = ids()
    ref, _ = model(x)
    apply_lora(model, TARGETS, r=4, alpha=8, dropout=0.1)
    model.eval()
    out, _ = model(x)
    assert torch.equal(out, ref)  # B = 0: the update is exactly zero


@pytest.mark.parametrize("tied", [True, False])
def test_merge_gives_the_same_outputs_and_saves_as_a_plain_gpt(tmp_path, tied):
    model = tiny(tied)
    apply_lora(model, TARGETS, r=4, alpha=8)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(std=0.1)  # a trained adapter
    model.eval()
    x = ids()
    unmerged, _ = model(x)
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    merged, _ = model(x)
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
    model.save_pretrained(tmp_path)
    loaded = GPT.from_pretrained(tmp_path).eval()
    assert torch.equal(loaded(x)[0], merged)


def test_tied_output_head_and_unknown_targets_are_refused():
    with pytest.raises(ValueError, match="tied"):
        apply_lora(tiny(tied=True), ("lm_head",), r=4, alpha=8)
    with pytest.raises(ValueError, match="no nn.Linear"):
        apply_lora(tiny(), ("qproj",), r=4, alpha=8)
