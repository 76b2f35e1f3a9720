"""LoRA: low-rank adapters on the linear layers of a frozen model (Hu et al., 2021, arXiv:2106.09685).

A wrapped layer computes  y = x W^T + (alpha / r) * dropout(x) A^T B^T  with W (out, in) frozen,
A (r, in) initialised like a Linear weight (Kaiming-uniform) and B (out, r) zero, so training starts
from exactly the base model. Only A and B receive gradients. `merge_lora` folds the update into W
(W + alpha / r * B A) and puts plain nn.Linear modules back, so a merged model is an ordinary GPT
that `save_pretrained` / `from_pretrained` handle unchanged.

The frozen weight stays registered as `<name>.weight`, so a LoRA model's state dict holds the base
model's keys plus `<name>.lora_A` / `<name>.lora_B`.

    targets = apply_lora(model, ("q_proj", "v_proj"), r=8, alpha=16, dropout=0.0)
    ...train...
    merge_lora(model)
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable rank-r update."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if r < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {r}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha = r, alpha
        self.scale = alpha / r
        self.weight = base.weight  # (out, in), the same Parameter object: shared storage, frozen
        self.weight.requires_grad_(False)
        self.bias = base.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)
        device, dtype = base.weight.device, base.weight.dtype
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=device, dtype=dtype))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=device, dtype=dtype))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's own init, as in the paper's code
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)  # (..., out)
        return F.linear(x, self.weight, self.bias) + self.scale * update

    def merged(self) -> nn.Linear:
        """An nn.Linear computing the same function (in eval mode: no dropout) with W + scale * B A."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(self.weight + self.scale * (self.lora_B @ self.lora_A))
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, alpha={self.alpha}"


def _set_child(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def apply_lora(model: nn.Module, targets: Sequence[str], r: int, alpha: float, dropout: float = 0.0) -> list[str]:
    """Freeze every parameter of `model` and wrap each nn.Linear whose name ends with one of `targets`
    (e.g. "q_proj", or "layers.0.mlp.up_proj") in a LoRALinear. Returns the wrapped module names.

    A layer whose weight is shared with another module (a tied output head) is refused: merging
    would silently change the embedding too.
    """
    model.requires_grad_(False)
    shared = {}
    for _, module in model.named_modules():
        for p in module.parameters(recurse=False):
            shared[id(p)] = shared.get(id(p), 0) + 1
    chosen = [name for name, m in model.named_modules()
              if isinstance(m, nn.Linear) and any(name == t or name.endswith("." + t) for t in targets)]
    if not chosen:
        raise ValueError(f"no nn.Linear in the model matches LoRA targets {list(targets)}")
    for name in chosen:
        base = model.get_submodule(name)
        if shared[id(base.weight)] > 1:
            raise ValueError(f"LoRA target {name} shares its weight with another module (tied embeddings); leave it out")
        _set_child(model, name, LoRALinear(base, r, alpha, dropout))
    return chosen


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear by the equivalent plain nn.Linear, in place; returns `model`.

    Parameters are left trainable again (requires_grad=True), as in a freshly built model.
    """
    names = [name for name, m in model.named_modules() if isinstance(m, LoRALinear)]
    for name in names:
        _set_child(model, name, model.get_submodule(name).merged())
    model.requires_grad_(True)
    return model


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapter matrices (lora_A, lora_B) of every LoRALinear in `model`."""
    return [p for m in model.modules() if isinstance(m, LoRALinear) for p in (m.lora_A, m.lora_B)]
