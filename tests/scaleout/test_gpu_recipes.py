"""The GPU recipes validate and take a few pretraining steps on CPU, at their real model sizes.

`small` keeps its whole architecture (d_model 768, 12 layers); `base` keeps its block (d_model 1280,
20 query / 4 KV heads) but 2 of its 24 layers: the other 22 repeat the same block, and at full depth
its 450M parameters cost ~2 minutes of CI to initialise and export. The batch (1 x 64 tokens) and
the step budget shrink so that two optimizer steps fit a CPU test.
compile (and bf16 autocast) are CUDA-only: on CPU they are switched off and the stage logs why.
"""
from __future__ import annotations

import logging
import math

import pytest

from flows.recipe import load_recipe
from stages import pretrain
from tests.conftest import artifact, make_ctx
from tests.stages.test_pretrain import stdlib_docstrings, write_corpus

pytestmark = [pytest.mark.scaleout, pytest.mark.slow]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    tok_dir, tokens_dir = write_corpus(tmp_path_factory.mktemp("corpus"), stdlib_docstrings(60_000))
    return {"tokenizer": artifact("tokenizer", tok_dir), "tokens": artifact("tokens", tokens_dir)}


@pytest.mark.parametrize("name", ["small", "base"])
def test_gpu_recipe_takes_a_few_cpu_steps_at_its_model_size(name, corpus, tmp_path, caplog):
    recipe = load_recipe(name)  # the whole recipe validates
    values = {**recipe.stages["pretrain"].config_json, "batch_size": 1, "grad_accum": 1, "seq_len": 64, "max_steps": 2,
              "warmup_steps": 1, "eval_every": 2, "eval_tokens": 64, "sample_tokens": 1, "sample_prompts": ["The"]}
    values.pop("max_tokens", None)
    if name == "base":
        values["n_layers"] = 2
    cfg = pretrain.Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
    ctx = make_ctx(tmp_path, "pretrain")
    with caplog.at_level(logging.INFO, logger="family"):
        result = pretrain.run(cfg, corpus, ctx)
    assert result.metrics["steps"] == 2 and math.isfinite(result.metrics["val_loss"])
    expected = {"small": (768, 12), "base": (1280, 2)}[name]
    assert (cfg.d_model, cfg.n_layers) == expected and result.metrics["params"] > 30e6
    if recipe.stages["pretrain"].config.compile:
        assert "compile is CUDA-only" in caplog.text
    assert "bf16 autocast is CUDA-only" in caplog.text
