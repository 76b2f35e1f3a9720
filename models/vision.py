"""The vision-language model: a SigLIP-shaped ViT, a two-layer MLP projector and the family's decoder.

The vision tower has the shape of SigLIP's (Zhai et al. 2023; `modeling_siglip.py` in HF transformers):
a convolutional patch embedding (here a stem of stride-2 3x3 convolutions, `VisionConvStem`, where
SigLIP has one kernel = stride = patch size convolution), learned position embeddings, pre-norm
blocks (LayerNorm, multi-head self-attention, LayerNorm, GELU-tanh MLP), a final `post_layernorm`,
no CLS token. The projector first merges each 2x2 group of neighbouring patches into one token
(pixel unshuffle, the "pixel shuffle" of SmolVLM / nanoVLM, Marafioti et al. 2025), which divides the
image tokens by four, then maps them with LLaVA-1.5's `mlp2x_gelu` (Linear, GELU, Linear) into the
decoder's width.

The decoder is `models.gpt.GPT` unchanged: `VLModel` swaps its `embed_tokens` for an
`ImageTokenEmbedding`, which embeds the ids as before and writes the projected image features into
the rows of the `<|image_pad|>` tokens (Qwen2-VL's layout: `<|vision_start|>` + N x `<|image_pad|>` +
`<|vision_end|>` in the user turn; the chat data holds one pad and `expand_image_tokens` makes it N).
The embedding's weight is the same Parameter as before, so a tied output head stays tied.

Partial LoRA (InternLM-XComposer2, Dong et al. 2024): `PartialLoRALinear` adds the low-rank update
of models/lora.py only at image-token positions, y = x W^T + m * (alpha / r) * x A^T B^T with m = 1
on `<|image_pad|>` rows and 0 elsewhere; the mask comes from the ImageTokenEmbedding of the same
forward pass. A text-only prompt therefore computes exactly what the chat model computes. Scope
"conversation" widens m to every token of a row that holds an image (the prompt's and the answer's,
through the decode steps): the adapters can then shape the answer, and a text-only input still
computes exactly the chat model, as a frozen language model does in Flamingo (Alayrac et al. 2022).

    model = VLModel.from_pretrained(dir)
    pixels = image_tensor(Image.open("cat.png"), model.vcfg.image_size)[0]      # (3, H, W)
    logits = model(ids[None], pixels[None])
"""
from __future__ import annotations

import io
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from models.gpt import GPT, GPTConfig
from models.lora import LoRALinear, _set_child


@dataclass
class VisionConfig:
    image_size: int = 48
    patch_size: int = 8
    channels: int = 3
    d_model: int = 96
    n_layers: int = 3
    n_heads: int = 4
    d_ff: int = 384
    ln_eps: float = 1e-6
    merge: int = 2  # pixel unshuffle: merge x merge neighbouring patches into one image token
    pool_queries: int = 0  # learned-query attention-pool tokens after the patch tokens (0: none)
    patch_tokens: bool = True  # the merged patches as image tokens (False: the pool tokens alone)

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size}")
        if self.grid % self.merge:
            raise ValueError(f"the {self.grid}x{self.grid} patch grid does not split into {self.merge}x{self.merge} groups")
        if self.patch_size < 2 or self.patch_size & (self.patch_size - 1):
            raise ValueError(f"patch_size={self.patch_size} is not a power of two (the conv stem halves the image per layer)")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not a multiple of n_heads={self.n_heads}")
        if self.pool_queries < 0 or (not self.patch_tokens and not self.pool_queries):
            raise ValueError("an image needs tokens: patch_tokens or pool_queries > 0")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def image_tokens(self) -> int:
        """Decoder tokens per image: the merged patches (if patch_tokens), then the pool queries."""
        return (self.grid // self.merge) ** 2 * self.patch_tokens + self.pool_queries


# -- the vision tower (SigLIP's shape) -----------------------------------------------------------------


class VisionConvStem(nn.Module):
    """log2(patch_size) 3x3 stride-2 convolutions with GELU between them (Xiao et al. 2021, "Early
    Convolutions Help Transformers See Better"): (B, 3, H, W) -> (B, d, H / patch, W / patch).

    Differs from SigLIP's single patch-size convolution: trained from scratch on a few thousand
    images, the linear patch embedding had learnt colour and position but only half of the shapes and
    almost no words after 300 steps (stages/vl.py's docstring has the numbers); the stem gives the
    tower local edges from the start, at the same patch grid."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        n = int(math.log2(cfg.patch_size))
        widths = [cfg.channels] + [cfg.d_model // 2] + [cfg.d_model] * (n - 1)
        self.convs = nn.ModuleList(nn.Conv2d(widths[i], widths[i + 1], 3, stride=2, padding=1) for i in range(n))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels
        for i, conv in enumerate(self.convs):
            x = conv(x) if i == 0 else conv(F.gelu(x))
        return x


class SiglipVisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch_embedding = VisionConvStem(cfg)
        self.position_embedding = nn.Embedding(cfg.grid ** 2, cfg.d_model)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixels).flatten(2).transpose(1, 2)  # (B, P, d), patches in row-major order
        return x + self.position_embedding.weight


class SiglipAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.d_model // cfg.n_heads
        self.q_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.k_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.v_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.out_proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, P, d = x.shape
        q, k, v = (p(x).view(B, P, self.n_heads, self.head_dim).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v)  # (B, H, P, hd), every patch sees every patch
        return self.out_proj(y.transpose(1, 2).reshape(B, P, d))


class SiglipMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.d_model, cfg.d_ff)
        self.fc2 = nn.Linear(cfg.d_ff, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SiglipEncoderLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.d_model, eps=cfg.ln_eps)
        self.self_attn = SiglipAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.d_model, eps=cfg.ln_eps)
        self.mlp = SiglipMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class SiglipVisionTower(nn.Module):
    """(B, 3, H, W) pixels in [-1, 1] -> (B, P, d) patch features (P = (H / patch)^2, row-major)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = SiglipVisionEmbeddings(cfg)
        self.layers = nn.ModuleList(SiglipEncoderLayer(cfg) for _ in range(cfg.n_layers))
        self.post_layernorm = nn.LayerNorm(cfg.d_model, eps=cfg.ln_eps)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(pixels)
        for layer in self.layers:
            x = layer(x)
        return self.post_layernorm(x)


# -- the projector ---------------------------------------------------------------------------------------


def pixel_unshuffle(x: torch.Tensor, grid: int, merge: int) -> torch.Tensor:
    """(B, grid^2, d) row-major patches -> (B, (grid/merge)^2, merge^2 * d): each token concatenates
    the features of a merge x merge square of neighbouring patches (tokens in row-major order)."""
    B, P, d = x.shape
    g = grid // merge
    x = x.view(B, g, merge, g, merge, d).permute(0, 1, 3, 2, 4, 5)  # (B, g, g, merge, merge, d)
    return x.reshape(B, g * g, merge * merge * d)


class AttentionPool(nn.Module):
    """Learned queries, each one softmax attention over the patch features (SigLIP's MAP head without
    its MLP; the learned queries of BLIP-2's Q-Former and Qwen-VL's resampler, one layer deep):
    (B, P, d) -> (B, Q, d)."""

    def __init__(self, d: int, n_queries: int):
        super().__init__()
        self.query = nn.Parameter(torch.randn(n_queries, d) * 0.02)
        self.norm = nn.LayerNorm(d)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        att = torch.softmax(self.query @ patches.transpose(1, 2) / math.sqrt(patches.shape[-1]), dim=-1)  # (B, Q, P)
        return self.norm(att @ patches)


class VisionProjector(nn.Module):
    """LLaVA-1.5's mlp2x_gelu after a pixel unshuffle: (B, P, d_vision) -> (B, P / merge^2, d_decoder);
    with pool_queries, an AttentionPool's tokens through their own mlp2x_gelu follow (or, without
    patch_tokens, stand alone)."""

    def __init__(self, cfg: VisionConfig, d_out: int):
        super().__init__()
        self.grid, self.merge, self.patch_tokens = cfg.grid, cfg.merge, cfg.patch_tokens
        if cfg.patch_tokens:
            self.linear_1 = nn.Linear(cfg.merge ** 2 * cfg.d_model, d_out)
            self.linear_2 = nn.Linear(d_out, d_out)
        self.pool = AttentionPool(cfg.d_model, cfg.pool_queries) if cfg.pool_queries else None
        if self.pool is not None:
            self.pool_1 = nn.Linear(cfg.d_model, d_out)
            self.pool_2 = nn.Linear(d_out, d_out)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        out = []
        if self.patch_tokens:
            out.append(self.linear_2(F.gelu(self.linear_1(pixel_unshuffle(patches, self.grid, self.merge)))))
        if self.pool is not None:
            out.append(self.pool_2(F.gelu(self.pool_1(self.pool(patches)))))
        return out[0] if len(out) == 1 else torch.cat(out, dim=1)


# -- the decoder side: image tokens in, partial LoRA ---------------------------------------------------------


class ImageTokenEmbedding(nn.Module):
    """The decoder's token embedding, with the rows of `<|image_pad|>` tokens replaced by `features`.

    `features` (N, d) is set by VLModel right before the decoder runs: the image tokens of the batch
    in row-major order (row 0's images first). `image_mask` (B, T) is the last input's pad positions,
    read by PartialLoRALinear in the same forward pass.
    """

    def __init__(self, embed: nn.Embedding, image_pad_id: int):
        super().__init__()
        self.weight = embed.weight  # the same Parameter: a tied lm_head stays tied
        self.image_pad_id = image_pad_id
        self.features: torch.Tensor | None = None
        self.image_mask: torch.Tensor | None = None
        self.row_mask: torch.Tensor | None = None  # (B,) rows whose conversation holds an image

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = F.embedding(input_ids, self.weight)  # (B, T, d)
        self.image_mask = input_ids == self.image_pad_id  # (B, T)
        n = int(self.image_mask.sum())
        if n == 0:
            if self.features is None:  # a text-only input; else a decode step after an image prefill keeps its rows
                self.row_mask = None
            return x
        self.row_mask = self.image_mask.any(1)
        if self.features is None or self.features.shape[0] != n:
            have = 0 if self.features is None else self.features.shape[0]
            raise ValueError(f"the input holds {n} <|image_pad|> tokens but {have} image token features were given")
        return x.masked_scatter(self.image_mask[..., None], self.features.to(x.dtype))


class PartialLoRALinear(LoRALinear):
    """A LoRALinear whose update applies only where the embedding says: scope "image", the image
    tokens (`image_mask`, (B, T)); scope "conversation", every token of a row whose conversation holds
    an image (`row_mask`, (B,), kept through the decode steps after the prefill), so a text-only
    input computes exactly the decoder without adapters."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, embedding: ImageTokenEmbedding, scope: str = "image"):
        super().__init__(base, r, alpha)
        if scope not in ("image", "conversation"):
            raise ValueError(f"partial LoRA scope {scope!r} is not 'image' or 'conversation'")
        self._embedding = [embedding]  # a list: not a submodule, so its weight is not registered twice
        self.scope = scope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        emb = self._embedding[0]
        if self.scope == "conversation":
            if emb.row_mask is None or not bool(emb.row_mask.any()):
                return F.linear(x, self.weight, self.bias)
            mask = emb.row_mask[:, None].expand(x.shape[0], x.shape[1])  # (B, T)
        else:
            mask = emb.image_mask  # (B, T) of this forward pass
        update = F.linear(F.linear(x, self.lora_A), self.lora_B)  # (B, T, out)
        return F.linear(x, self.weight, self.bias) + self.scale * update * mask[..., None].to(x.dtype)


@dataclass
class VLConfig:
    vision: dict
    decoder: dict
    image_pad_id: int
    lora_r: int = 0  # partial LoRA on image tokens (0: none; a full LoRA is merged into the decoder weights)
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ()
    lora_scope: str = "image"  # partial LoRA: "image" tokens or every token of a "conversation" with an image

    def to_dict(self) -> dict:
        d = asdict(self)
        d["lora_targets"] = list(self.lora_targets)
        return d


class VLModel(nn.Module):
    """vision tower -> projector -> the decoder with image tokens; `forward(ids, pixels)` -> logits."""

    def __init__(self, vcfg: VisionConfig, decoder: GPT, image_pad_id: int):
        super().__init__()
        self.vcfg = vcfg
        self.vision = SiglipVisionTower(vcfg)
        self.projector = VisionProjector(vcfg, decoder.cfg.d_model)
        self.decoder = decoder
        self.decoder.embed_tokens = ImageTokenEmbedding(decoder.embed_tokens, image_pad_id)
        self.image_pad_id = image_pad_id
        self.lora = {"r": 0, "alpha": 16.0, "targets": []}

    @property
    def embedding(self) -> ImageTokenEmbedding:
        return self.decoder.embed_tokens

    def add_partial_lora(self, targets: tuple[str, ...], r: int, alpha: float, scope: str = "image") -> list[str]:
        """Freeze the decoder and wrap its Linear layers named by `targets` in PartialLoRALinear."""
        self.decoder.requires_grad_(False)
        chosen = [name for name, m in self.decoder.named_modules()
                  if isinstance(m, nn.Linear) and name != "lm_head" and any(name == t or name.endswith("." + t) for t in targets)]
        if not chosen:
            raise ValueError(f"no decoder Linear matches LoRA targets {list(targets)}")
        for name in chosen:
            _set_child(self.decoder, name, PartialLoRALinear(self.decoder.get_submodule(name), r, alpha, self.embedding, scope))
        self.lora = {"r": r, "alpha": alpha, "targets": list(targets), "scope": scope}
        return chosen

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, image_tokens, d_decoder)."""
        return self.projector(self.vision(pixels))

    def set_images(self, features: torch.Tensor | None) -> None:
        """The projected features (B_img, N, d) of the images of the next decoder call, or None."""
        self.embedding.features = None if features is None else features.reshape(-1, features.shape[-1])
        if features is None:
            self.embedding.row_mask = None

    def forward(self, input_ids: torch.Tensor, pixels: torch.Tensor | None = None, targets: torch.Tensor | None = None,
                **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
        """input_ids (B, T) with image_tokens pads per image; pixels (B_img, 3, H, W), one image per row
        that has pads, in row order. Returns the decoder's (logits, loss)."""
        self.set_images(self.image_features(pixels) if pixels is not None else None)
        try:
            return self.decoder(input_ids, targets, **kwargs)
        finally:
            self.set_images(None)

    def save_pretrained(self, out_dir: str | Path) -> None:
        """config.json ({"family_vl": ...}) + model.safetensors (vision.*, projector.*, decoder.*)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        if self.decoder.cfg.tie_embeddings:
            del state["decoder.lm_head.weight"]
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
        cfg = VLConfig(asdict(self.vcfg), self.decoder.cfg.to_dict(), self.image_pad_id, self.lora["r"],
                       self.lora["alpha"], tuple(self.lora["targets"]), self.lora.get("scope", "image"))
        (out / "config.json").write_text(json.dumps({"family_vl": cfg.to_dict()}, indent=2))

    @classmethod
    def from_pretrained(cls, in_dir: str | Path, device: str | torch.device = "cpu") -> VLModel:
        d = Path(in_dir)
        raw = json.loads((d / "config.json").read_text())
        if "family_vl" not in raw:
            raise ValueError(f"{d / 'config.json'} is not a vision-language model's config (no 'family_vl')")
        c = raw["family_vl"]
        model = cls(VisionConfig(**c["vision"]), GPT(GPTConfig.from_dict(c["decoder"])), c["image_pad_id"])
        if c.get("lora_r"):
            model.add_partial_lora(tuple(c["lora_targets"]), c["lora_r"], c["lora_alpha"], c.get("lora_scope", "image"))
        state = load_file(str(d / "model.safetensors"))
        if model.decoder.cfg.tie_embeddings:
            state["decoder.lm_head.weight"] = state["decoder.embed_tokens.weight"]
        model.load_state_dict(state)
        return model.to(device).eval()


IMAGE_TOKEN_TEXT = "<|vision_start|><|image_pad|><|vision_end|>"  # one image in a chat turn, before expansion


def expand_image_tokens(text: str, image_tokens: int, pad: str = "<|image_pad|>") -> str:
    """The chat data's single `<|image_pad|>` per image, repeated to the model's image_tokens."""
    return text.replace(pad, pad * image_tokens)


# -- images in ----------------------------------------------------------------------------------------------


def image_tensor(img, size: int) -> tuple[torch.Tensor, str]:
    """A PIL image -> ((3, size, size) float pixels in [-1, 1], a note on what was converted).

    Any mode is converted to RGB (palette, greyscale and 16-bit through RGB; alpha composited on
    white, the background the model saw); another size is resized with bicubic filtering.
    """
    from PIL import Image

    notes = []
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
        notes.append("alpha composited on white")
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        img = img.point(lambda v: v / 256).convert("L")  # 16-bit -> 8-bit
        notes.append("16-bit scaled to 8-bit")
    if img.mode != "RGB":
        notes.append(f"mode {img.mode} converted to RGB")
        img = img.convert("RGB")
    if img.size != (size, size):
        notes.append(f"resized from {img.size[0]}x{img.size[1]} to {size}x{size}")
        img = img.resize((size, size), Image.BICUBIC)
    x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(size, size, 3).permute(2, 0, 1)
    return x.float() / 127.5 - 1.0, "; ".join(notes)


def decode_png(data: bytes, size: int) -> torch.Tensor:
    """PNG bytes (the `images` dataset) -> (3, size, size) pixels in [-1, 1]."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return image_tensor(img, size)[0]


def read_image(path: str | Path, size: int) -> tuple[torch.Tensor, str]:
    """An image file (PNG, JPEG, anything Pillow reads) -> (pixels, note). ValueError naming the
    file when it is missing, not a file, or not an image Pillow can decode."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.exists():
        raise ValueError(f"{p}: no such image file")
    if not p.is_file():
        raise ValueError(f"{p}: not a file")
    try:
        with Image.open(p) as img:
            img.load()
            if img.width < 1 or img.height < 1 or max(img.size) > 8192:
                raise ValueError(f"{p}: image of {img.width}x{img.height} pixels; give one between 1 and 8192 on a side")
            return image_tensor(img, size)
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"{p}: not an image Pillow can read ({type(e).__name__}: {str(e)[:120]})") from None


def attribute_loss(logits: list[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    """Multi-head attribute classification, averaged over the (image, attribute) pairs that have a label:

        L = (1 / |S|) * sum_{(i, a) in S} -log softmax(logits[a][i])[targets[i, a]]

    with S the pairs whose target is not -100 (a count scene has no word). logits: one (B, C_a) per
    attribute a; targets (B, A)."""
    total = sum(F.cross_entropy(lg, targets[:, a], ignore_index=-100, reduction="sum") for a, lg in enumerate(logits))
    return total / (targets != -100).sum().clamp(min=1)


class AttributeHead(nn.Module):
    """The ViT pretraining head: one learned query per attribute attends over the patch features
    (`AttentionPool`, one softmax attention, as SigLIP's MAP head), then a Linear per attribute to its
    classes. The VL stage can keep the pool as the projector's query tokens (VisionConfig.pool_queries)."""

    def __init__(self, d: int, classes: list[int]):
        super().__init__()
        self.pool = AttentionPool(d, len(classes))
        self.out = nn.ModuleList(nn.Linear(d, c) for c in classes)

    def forward(self, patches: torch.Tensor) -> list[torch.Tensor]:
        z = self.pool(patches)  # (B, A, d)
        return [out(z[:, a]) for a, out in enumerate(self.out)]
