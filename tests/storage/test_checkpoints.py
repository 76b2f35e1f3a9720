"""storage/checkpoints.py: self-describing checkpoints, atomic writes, keep-last-N, no pickle."""
from __future__ import annotations

import json

import pytest
import torch

from storage import checkpoints


def state() -> dict[str, torch.Tensor]:
    emb = torch.randn(4, 3)
    return {"embed.weight": emb, "head.weight": emb, "norm.weight": torch.ones(3)}  # tied: shared storage


def test_save_load_round_trip_with_tied_weights(tmp_path):
    model_state = state()
    opt = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(4, 3)}},
           "param_groups": [{"lr": 0.1, "betas": (0.9, 0.95), "weight_decay": 0.0, "params": [0], "foreach": None}]}
    path = checkpoints.save(tmp_path, 7, model_state, opt, {"loader": {"epoch": 1, "position": 2}})
    assert path.name == "step-00000007" and {p.name for p in path.iterdir()} == {"model.safetensors", "state.pt", "meta.json"}
    weights, st, meta = checkpoints.load(path)
    assert all(torch.equal(weights[k], model_state[k]) for k in model_state)
    assert meta == {"step": 7, "loader": {"epoch": 1, "position": 2}}
    assert torch.equal(st["optimizer"]["state"][0]["exp_avg"], opt["state"][0]["exp_avg"])
    assert st["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.95)


def test_keep_last_n_and_latest(tmp_path):
    for step in (1, 2, 3, 4):
        checkpoints.save(tmp_path, step, state(), keep=2)
    assert [p.name for p in checkpoints.all_checkpoints(tmp_path)] == ["step-00000003", "step-00000004"]
    assert checkpoints.latest(tmp_path).name == "step-00000004"
    assert checkpoints.latest(tmp_path / "missing") is None


def test_a_half_written_checkpoint_is_invisible(tmp_path):
    checkpoints.save(tmp_path, 1, state())
    half = tmp_path / ".tmp-step-00000002-999"  # what a SIGKILL during save leaves
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"partial")
    no_meta = tmp_path / "step-00000003"
    no_meta.mkdir()
    assert checkpoints.latest(tmp_path).name == "step-00000001"


def test_state_loads_without_pickled_code(tmp_path):
    """weights_only loading: a state.pt that would run code on load is refused."""
    path = checkpoints.save(tmp_path, 1, state(), {"state": {}, "param_groups": []})

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"optimizer": Evil()}, path / "state.pt")
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        checkpoints.load(path)


def test_rng_state_is_restored(tmp_path):
    torch.manual_seed(5)
    path = checkpoints.save(tmp_path, 1, state())
    expected = torch.rand(3)
    torch.rand(10)
    _, st, _ = checkpoints.load(path)
    checkpoints.restore_rng(st)
    assert torch.equal(torch.rand(3), expected)
    assert json.loads((path / "meta.json").read_text())["step"] == 1
