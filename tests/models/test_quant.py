"""models/quant.py: int4 packing, QuantLinear/QuantEmbedding against dequantized weights, save/load."""
from __future__ import annotations

import json

import torch
import torch.nn.functional as F

from models.gpt import GPT, GPTConfig
from models.quant import (
    QuantEmbedding, QuantLinear, dequantize, dequantized_model, load_model, pack_int4, quantized_model, save_quantized,
    unpack_int4, weight_names,
)


def codes_scales(out: int, n_in: int, bits: int, group: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lo, hi = (-8, 8) if bits == 4 else (-127, 128)
    return (torch.randint(lo, hi, (out, n_in), generator=g, dtype=torch.int8),
            (torch.rand(out, n_in // group, generator=g) * 0.01).half())


def test_int4_packing_round_trips_low_nibble_first():
    codes, _ = codes_scales(3, 64, 4, 32)
    packed = pack_int4(codes)
    assert packed.shape == (3, 32) and packed.dtype == torch.uint8
    assert int(packed[0, 0]) == (int(codes[0, 0]) + 8) | ((int(codes[0, 1]) + 8) << 4)
    assert torch.equal(unpack_int4(packed), codes)


def test_quant_modules_compute_with_the_dequantized_weights():
    codes, scales = codes_scales(8, 64, 4, 32)
    lin = QuantLinear(codes, scales, 4)
    x = torch.randn(2, 5, 64)
    torch.testing.assert_close(lin(x), F.linear(x, dequantize(codes, scales)), rtol=0, atol=0)
    emb = QuantEmbedding(codes, scales, 4)
    ids = torch.tensor([[0, 7, 3]])
    torch.testing.assert_close(emb(ids), F.embedding(ids, dequantize(codes, scales)), rtol=0, atol=0)


def quantize_all(model: GPT, bits: int) -> GPT:
    q, b = {}, {}
    for name in weight_names(model.cfg):
        w = model.state_dict()[name]
        group = 32 if bits == 4 else w.shape[1]
        q[name] = codes_scales(*w.shape, bits, group)
        b[name] = bits
    return quantized_model(model, q, b)


def test_save_load_round_trip_and_load_model_dispatch(tmp_path):
    torch.manual_seed(0)
    for bits, tied in ((4, True), (8, False)):
        model = quantize_all(GPT(GPTConfig(vocab_size=64, d_model=64, n_layers=2, n_heads=2, n_kv_heads=1,
                                           max_seq_len=32, tie_embeddings=tied)), bits).eval()
        if tied:
            assert model.lm_head.codes.data_ptr() == model.embed_tokens.codes.data_ptr()
        out = save_quantized(model, tmp_path / f"q{bits}", {"scheme": "test"})
        config = json.loads((out / "config.json").read_text())
        assert set(config["quantization"]["bits_per_weight"].values()) == {bits}
        loaded = load_model(out).eval()
        x = torch.randint(0, 64, (2, 10))
        with torch.no_grad():
            torch.testing.assert_close(loaded(x)[0], model(x)[0], rtol=0, atol=0)
            torch.testing.assert_close(dequantized_model(loaded)(x)[0], model(x)[0], rtol=0, atol=0)
    plain = GPT(GPTConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=1, n_kv_heads=1, max_seq_len=16))
    plain.save_pretrained(tmp_path / "plain")
    assert type(load_model(tmp_path / "plain").lm_head).__name__ == "Linear"
    # int4 codes are stored two to a byte: the file is about an eighth of fp32 for the 4-bit weights
    assert (tmp_path / "q4" / "model.safetensors").stat().st_size < 0.3 * 4 * sum(p.numel() for p in GPT(model.cfg).parameters())
