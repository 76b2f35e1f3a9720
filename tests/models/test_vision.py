"""models/vision.py: shapes, pixel unshuffle by hand, image tokens in the decoder, partial LoRA leaves
text alone, save/load, and the image readers' one-line errors."""
from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from models.gpt import GPT, GPTConfig
from models.vision import (
    AttributeHead,
    VisionConfig,
    VLModel,
    attribute_loss,
    expand_image_tokens,
    image_tensor,
    pixel_unshuffle,
    read_image,
)

PAD = 7


def tiny(seed: int = 0) -> VLModel:
    torch.manual_seed(seed)
    vcfg = VisionConfig(image_size=32, patch_size=8, d_model=32, n_layers=1, n_heads=2, d_ff=64)
    return VLModel(vcfg, GPT(GPTConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, max_seq_len=64)), PAD)


def test_tower_and_projector_shapes():
    m = tiny()
    x = torch.randn(3, 3, 32, 32)
    assert m.vision(x).shape == (3, 16, 32)  # 4x4 patches, no CLS token
    assert m.vcfg.image_tokens == 4 and m.image_features(x).shape == (3, 4, 32)


def test_pixel_unshuffle_concatenates_neighbouring_patches():
    x = torch.arange(16).float().view(1, 16, 1)  # a 4x4 grid of patches, feature = index
    out = pixel_unshuffle(x, 4, 2)
    assert out[0].tolist() == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]


def test_image_features_land_on_the_pad_tokens():
    m = tiny()
    pixels = torch.randn(1, 3, 32, 32)
    ids = torch.tensor([[1, 2] + [PAD] * 4 + [3]])
    feats = m.image_features(pixels)
    m.set_images(feats)
    emb = m.decoder.embed_tokens(ids)
    torch.testing.assert_close(emb[0, 2:6], feats[0])
    torch.testing.assert_close(emb[0, :2], m.decoder.embed_tokens.weight[[1, 2]])
    with pytest.raises(ValueError, match="4 <\\|image_pad\\|> tokens but 0"):
        m.set_images(None)
        m.decoder.embed_tokens(ids)


def test_the_image_changes_the_answer_and_the_head_stays_tied():
    m = tiny()
    ids = torch.tensor([[1] + [PAD] * 4 + [3]])
    a, _ = m(ids, torch.randn(1, 3, 32, 32))
    b, _ = m(ids, torch.randn(1, 3, 32, 32))
    assert not torch.allclose(a[0, -1], b[0, -1])
    assert m.decoder.lm_head.weight is m.decoder.embed_tokens.weight


def test_partial_lora_changes_image_positions_only():
    m = tiny()
    text = torch.tensor([[1, 2, 3, 4]])
    before, _ = m.decoder(text)
    m.add_partial_lora(("q_proj", "v_proj", "up_proj"), r=4, alpha=8)
    for p in m.decoder.parameters():
        if p.requires_grad:  # the adapters: move B off zero so the update is not zero
            torch.nn.init.normal_(p, std=0.5)
    after, _ = m.decoder(text)
    torch.testing.assert_close(before, after, rtol=0, atol=0)  # text-only input: exactly the chat model
    ids = torch.tensor([[1] + [PAD] * 4 + [3]])
    pix = torch.randn(1, 3, 32, 32)
    with_lora, _ = m(ids, pix)
    m.decoder.requires_grad_(False)
    for mod in m.decoder.modules():
        if hasattr(mod, "lora_B"):
            mod.lora_B.data.zero_()
    without, _ = m(ids, pix)
    assert not torch.allclose(with_lora[0, -1], without[0, -1])


def test_conversation_lora_changes_every_token_of_image_rows_only():
    m = tiny()
    text = torch.tensor([[1, 2, 3, 4, 5, 6]])
    before, _ = m.decoder(text)
    m.add_partial_lora(("q_proj", "v_proj", "up_proj"), r=4, alpha=8, scope="conversation")
    for p in m.decoder.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.5)
    after, _ = m.decoder(text)
    torch.testing.assert_close(before, after, rtol=0, atol=0)  # text-only input: exactly the chat model
    ids = torch.tensor([[1, 2, 3, 4, 5, 6], [1] + [PAD] * 4 + [3]])  # a text row beside an image row
    feats = m.image_features(torch.randn(1, 3, 32, 32))
    m.set_images(feats)
    mixed, _ = m.decoder(ids)
    # the text row is untouched: exactly what the adapter-free model gives it in the same batch (a batch
    # of another shape may take another BLAS kernel, whose sums differ in the last bit on some CPUs)
    same_batch = tiny()
    same_batch.set_images(feats)
    torch.testing.assert_close(mixed[0], same_batch.decoder(ids)[0][0], rtol=0, atol=0)
    torch.testing.assert_close(mixed[0], before[0], rtol=0, atol=1e-5)  # and the text-only run's, up to that
    assert m.embedding.row_mask.tolist() == [False, True]
    m.decoder(torch.tensor([[9], [9]]))  # a decode step: no pads, the rows from the prefill still hold
    assert m.embedding.row_mask.tolist() == [False, True]
    m.set_images(None)
    assert m.embedding.row_mask is None
    plain = tiny()  # the same weights without adapters: the image row's first token (before the image) differs
    plain.set_images(plain.image_features(torch.randn(1, 3, 32, 32)))
    m.set_images(feats)
    assert not torch.allclose(m.decoder(ids[1:])[0][0, 0], plain.decoder(ids[1:])[0][0, 0])
    m.set_images(None)


def test_attention_pool_tokens_follow_or_replace_the_patches():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    for patch_tokens, n in ((True, 4 + 3), (False, 3)):
        vcfg = VisionConfig(image_size=32, patch_size=8, d_model=32, n_layers=1, n_heads=2, d_ff=64, pool_queries=3,
                            patch_tokens=patch_tokens)
        m = VLModel(vcfg, GPT(GPTConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, max_seq_len=64)), PAD)
        assert vcfg.image_tokens == n and m.image_features(x).shape == (2, n, 32)
    with pytest.raises(ValueError, match="needs tokens"):
        VisionConfig(image_size=32, patch_size=8, d_model=32, n_heads=2, patch_tokens=False)


def test_save_and_load_give_the_same_logits(tmp_path):
    m = tiny()
    m.add_partial_lora(("q_proj",), r=2, alpha=4, scope="conversation")
    m.eval()
    ids = torch.tensor([[1] + [PAD] * 4 + [3]])
    pix = torch.randn(1, 3, 32, 32)
    m.save_pretrained(tmp_path)
    back = VLModel.from_pretrained(tmp_path)
    torch.testing.assert_close(m(ids, pix)[0], back(ids, pix)[0])
    assert back.lora["scope"] == "conversation"


def test_attribute_loss_by_hand_skips_missing_labels():
    logits = [torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 3.0]])]
    targets = torch.tensor([[0, -100], [1, 2]])  # row 0 has no second attribute
    expected = (-torch.log_softmax(torch.tensor([2.0, 0.0]), -1)[0] - torch.log_softmax(torch.tensor([0.0, 1.0]), -1)[1]
                - torch.log_softmax(torch.tensor([0.0, 0.0, 3.0]), -1)[2]) / 3
    torch.testing.assert_close(attribute_loss(logits, targets), expected)
    head = AttributeHead(8, [2, 3])
    out = head(torch.randn(4, 5, 8))
    assert [o.shape for o in out] == [(4, 2), (4, 3)]


def test_conv_stem_keeps_the_patch_grid_and_rejects_odd_patches():
    m = tiny()
    assert len(m.vision.embeddings.patch_embedding.convs) == 3  # patch 8: three stride-2 convolutions
    with pytest.raises(ValueError, match="power of two"):
        VisionConfig(image_size=36, patch_size=6, d_model=32, n_heads=2)


def test_expand_image_tokens():
    assert expand_image_tokens("<|vision_start|><|image_pad|><|vision_end|>hi", 3) == \
        "<|vision_start|>" + "<|image_pad|>" * 3 + "<|vision_end|>hi"


@pytest.mark.parametrize("mode", ["P", "RGBA", "LA", "L", "I;16", "CMYK"])
def test_odd_modes_become_rgb_pixels(mode):
    img = Image.new("RGB", (20, 30), (255, 0, 0)).convert(mode) if mode != "I;16" else Image.new("I;16", (20, 30), 40000)
    x, note = image_tensor(img, 32)
    assert x.shape == (3, 32, 32) and -1.0 <= x.min() and x.max() <= 1.0
    assert "resized from 20x30" in note


def test_read_image_errors_name_the_file(tmp_path):
    with pytest.raises(ValueError, match="no such image file"):
        read_image(tmp_path / "missing.png", 32)
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    with pytest.raises(ValueError, match="notes.png: not an image Pillow can read"):
        read_image(bad, 32)
    truncated = tmp_path / "cut.png"
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (0, 0, 255)).save(buf, format="PNG")
    truncated.write_bytes(buf.getvalue()[:60])
    with pytest.raises(ValueError, match="cut.png"):
        read_image(truncated, 32)
    with pytest.raises(ValueError, match="not a file"):
        read_image(tmp_path, 32)
