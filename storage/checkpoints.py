"""Self-describing training checkpoints: weights + optimizer state + JSON meta, keep the last N.

    <checkpoint_dir>/step-00000400/
        model.safetensors     weights (safetensors)
        state.pt              optimizer state and torch RNG states
        meta.json             step, data-loader position, config, anything to continue exactly

Each checkpoint is written into a temporary directory and renamed into place, so `latest()` never
returns a half-written one, even after SIGKILL mid-save.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

PREFIX = "step-"


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared storage (tied embeddings): save each tensor once, contiguous
    out: dict[str, torch.Tensor] = {}
    seen: dict[int, str] = {}
    for k, v in state.items():
        ptr = v.data_ptr()
        out[k] = v.detach().clone().contiguous() if ptr in seen else v.detach().contiguous()
        seen.setdefault(ptr, k)
    return out


def save(
    checkpoint_dir: str | Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any] | None = None,
    meta: dict[str, Any] | None = None,
    keep: int = 2,
) -> Path:
    root = Path(checkpoint_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".tmp-{PREFIX}{step:08d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file(_contiguous(model_state), str(tmp / "model.safetensors"))
    state = {"optimizer": optimizer_state, "torch_rng": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    torch.save(state, tmp / "state.pt")
    (tmp / "meta.json").write_text(json.dumps({"step": step, **(meta or {})}, indent=2, default=str))
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    for old in all_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def all_checkpoints(checkpoint_dir: str | Path) -> list[Path]:
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / "meta.json").exists())


def latest(checkpoint_dir: str | Path) -> Path | None:
    found = all_checkpoints(checkpoint_dir)
    return found[-1] if found else None


def load(path: str | Path, map_location: str = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """Returns (model_state, state {optimizer, torch_rng, ...}, meta)."""
    p = Path(path)
    weights = load_file(str(p / "model.safetensors"), device=map_location)
    # weights_only: optimizer and RNG states are tensors and plain containers, so no pickle of code is ever loaded
    state = torch.load(p / "state.pt", map_location=map_location, weights_only=True)
    meta = json.loads((p / "meta.json").read_text())
    return weights, state, meta


def resume(checkpoint_dir: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
           map_location: str = "cpu") -> tuple[Path, dict[str, Any]] | None:
    """Load the latest checkpoint into model and optimizer and restore the RNG state; returns
    (its path, its meta) for the caller's own loop state, or None when there is none."""
    found = latest(checkpoint_dir)
    if found is None:
        return None
    weights, state, meta = load(found, map_location=map_location)
    model.load_state_dict(weights)
    optimizer.load_state_dict(state["optimizer"])
    restore_rng(state)
    return found, meta


def restore_rng(state: dict[str, Any]) -> None:
    if "torch_rng" in state:
        torch.set_rng_state(state["torch_rng"])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
