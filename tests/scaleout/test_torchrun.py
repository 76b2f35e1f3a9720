"""Pretraining under torchrun on 2 CPU processes (gloo) against one process at the same global batch.

One process trains with batch_size 16; two processes with batch_size 8 each, so every optimizer step
sees the same 16 windows (PackedLoader gives rank r the r-th block of each global batch). DDP averages
the two halves' gradients, which equals the full batch's mean gradient up to float summation order:
the curves agree to a stated tolerance, not bit for bit. A kill -9 of the torchrun group and a rerun
resume exactly (DDP is deterministic given the same world size), and a checkpoint written by one
world size resumes under the other (the loader state counts windows of the global batch).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from stages import pretrain, sft
from tests.conftest import REPO, artifact, make_ctx
from tests.stages.test_pretrain import TINY, stdlib_docstrings, write_corpus
from tests.stages.test_sft import inputs_for, task_data, tiny_model_dir, tiny_tokenizer

pytestmark = [pytest.mark.scaleout, pytest.mark.slow]

STEPS = 30
COMMON = {**TINY, "max_steps": STEPS, "log_every": 2, "eval_every": 2, "ckpt_every": 10, "keep_checkpoints": 3}
CURVE_TOL = 1e-3  # nats: max |train/val loss difference| at the same step, 1 vs 2 processes
FINAL_REL_TOL = 0.01  # final val loss, relative


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    tok_dir, tokens_dir = write_corpus(tmp_path_factory.mktemp("corpus"), stdlib_docstrings(300_000))
    return {"tokenizer": artifact("tokenizer", tok_dir), "tokens": artifact("tokens", tokens_dir)}


def launch(root: Path, module: str, config: dict, inputs: dict, nproc: int = 2, wait: bool = True) -> subprocess.Popen | dict:
    """`python -m torch.distributed.run ... -m <module>` in its own process group; its result.json."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "c.json").write_text(json.dumps(config))
    (root / "i.json").write_text(json.dumps({k: a.path for k, a in inputs.items()}))
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", module,
           "--config", str(root / "c.json"), "--inputs", str(root / "i.json"), "--run-dir", str(root / "out"),
           "--checkpoint-dir", str(root / "ckpt")]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    if not wait:
        return proc
    try:
        out, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"{module} under torchrun ran past 240 s: {proc.communicate()[0][-3000:]}") from None
    assert proc.returncode == 0, out[-3000:]
    return {**json.loads((root / "result.json").read_text()), "log": out}


def kill_after_first_checkpoint(proc: subprocess.Popen, root: Path, steps: int) -> None:
    """kill -9 the torchrun group once its step-10 checkpoint exists, before the run ends."""
    deadline = time.monotonic() + 180
    while not (root / "ckpt" / "step-00000010").exists():
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (root / "result.json").exists() and not (root / "ckpt" / f"step-{steps:08d}").exists(), "killed too late"


def torchrun(root: Path, corpus: dict, nproc: int = 2, wait: bool = True, **overrides) -> subprocess.Popen | dict:
    """stages.pretrain under torchrun at the global batch of 16."""
    return launch(root, "stages.pretrain", {**COMMON, "batch_size": 16 // nproc, **overrides}, corpus, nproc, wait)


def single(root: Path, corpus: dict, **overrides) -> dict:
    """One process, in this process, with the global batch of 16; the result as torchrun's result.json."""
    ctx = make_ctx(root, "pretrain")
    result = pretrain.run(pretrain.Config(**{**COMMON, "batch_size": 16, **overrides}), corpus, ctx)
    first_logged = ctx.tracker.metrics["train/loss"][0][0]
    return {**json.loads(json.dumps(result.to_json())), "log": f"first logged step {first_logged}"}


def curve_diff(a: dict, b: dict) -> float:
    ca, cb = a["tables"]["eval_curve"], b["tables"]["eval_curve"]
    assert [p["step"] for p in ca] == [p["step"] for p in cb]
    return max(abs(p[k] - q[k]) for p, q in zip(ca, cb) for k in ("train_loss", "val_loss") if p[k] is not None)


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("runs")
    return {"one": single(root / "one", corpus), "two": torchrun(root / "two", corpus), "root": root}


def test_ddp_curve_matches_one_process_at_the_same_global_batch(runs):
    one, two = runs["one"], runs["two"]
    assert one["metrics"]["train_tokens_seen"] == two["metrics"]["train_tokens_seen"] == STEPS * 16 * 64
    diff = curve_diff(one, two)
    rel = abs(two["metrics"]["val_loss"] - one["metrics"]["val_loss"]) / one["metrics"]["val_loss"]
    print(f"\nDDP vs 1 process: max curve difference {diff:.2e} nats, final val loss rel. difference {rel:.2e}")
    assert diff < CURVE_TOL, f"curves differ by {diff} nats"
    assert rel < FINAL_REL_TOL
    # it learned: the tolerance is not met by two flat curves
    assert two["metrics"]["val_loss"] < two["tables"]["eval_curve"][0]["val_loss"] - 0.5


def test_kill_9_of_the_group_and_rerun_resumes_exactly_under_ddp(runs, corpus):
    root = runs["root"] / "killed"
    kill_after_first_checkpoint(torchrun(root, corpus, wait=False), root, STEPS)
    resumed = torchrun(root, corpus)
    assert resumed["metrics"]["val_loss"] == runs["two"]["metrics"]["val_loss"]
    a = load_file(str(runs["root"] / "two" / "out" / "base" / "model.safetensors"))
    b = load_file(str(root / "out" / "base" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_checkpoint_resumes_under_the_other_world_size(runs, corpus):
    # 2 processes -> 1: step 10 of the DDP run, continued in one process to the end
    root = runs["root"] / "two-to-one"
    shutil.copytree(runs["root"] / "two" / "ckpt" / "step-00000010", root / "ckpt" / "step-00000010")
    to_one = single(root, corpus)
    # 1 process -> 2: step 10 of the single-process run, continued under torchrun
    back = runs["root"] / "one-to-two"
    shutil.copytree(runs["root"] / "one" / "ckpt" / "step-00000010", back / "ckpt" / "step-00000010")
    to_two = torchrun(back, corpus)
    for resumed, whole in ((to_one, runs["two"]), (to_two, runs["one"])):
        # each continued from step 10, the curve up to there carried in the checkpoint
        assert "resumed from" in resumed["log"] or "first logged step 12" in resumed["log"], resumed["log"][-2000:]
        assert len(resumed["tables"]["eval_curve"]) == STEPS // 2 + 1
        assert resumed["metrics"]["train_tokens_seen"] == STEPS * 16 * 64
        assert curve_diff(resumed, whole) < CURVE_TOL
        assert abs(resumed["metrics"]["val_loss"] - whole["metrics"]["val_loss"]) / whole["metrics"]["val_loss"] < FINAL_REL_TOL
        assert math.isfinite(resumed["metrics"]["val_bpb"])



# -- FSDP2 -------------------------------------------------------------------------------------------
# fully_shard per decoder block and the root, on the same 2 x 8 windows per step as DDP above: the
# reduce-scattered gradients equal the full batch's up to float summation order. Its checkpoints are
# gathered full state dicts: the one of step 10 resumes in one process, and one process's resumes under FSDP.


def test_fsdp_curve_matches_one_process_and_checkpoints_cross_to_one_process(runs, corpus):
    root = runs["root"]
    fsdp = torchrun(root / "fsdp", corpus, fsdp=True)
    assert "FSDP2 over 2 processes" in fsdp["log"]
    diff = curve_diff(runs["one"], fsdp)
    rel = abs(fsdp["metrics"]["val_loss"] - runs["one"]["metrics"]["val_loss"]) / runs["one"]["metrics"]["val_loss"]
    print(f"\nFSDP vs 1 process: max curve difference {diff:.2e} nats, final val loss rel. difference {rel:.2e}")
    assert diff < CURVE_TOL and rel < FINAL_REL_TOL
    assert load_file(str(root / "fsdp" / "out" / "base" / "model.safetensors")).keys() == \
        load_file(str(root / "one" / "out" / "base" / "model.safetensors")).keys()
    # FSDP -> 1 process, and 1 process -> FSDP, from step 10
    shutil.copytree(root / "fsdp" / "ckpt" / "step-00000010", root / "fsdp-to-one" / "ckpt" / "step-00000010")
    to_one = single(root / "fsdp-to-one", corpus, fsdp=True)  # fsdp is ignored by one process
    shutil.copytree(root / "one" / "ckpt" / "step-00000010", root / "one-to-fsdp" / "ckpt" / "step-00000010")
    to_fsdp = torchrun(root / "one-to-fsdp", corpus, fsdp=True)
    assert to_one["log"] == "first logged step 12" and "resumed from" in to_fsdp["log"]
    for resumed, whole in ((to_one, fsdp), (to_fsdp, runs["one"])):
        assert len(resumed["tables"]["eval_curve"]) == STEPS // 2 + 1
        assert curve_diff(resumed, whole) < CURVE_TOL
        assert abs(resumed["metrics"]["val_loss"] - whole["metrics"]["val_loss"]) / whole["metrics"]["val_loss"] < FINAL_REL_TOL


# -- SFT ---------------------------------------------------------------------------------------------
# batch_size is SFT's global batch. The lookup task's 8 conversations, one per row (pack=false), in
# global batches of 7: an epoch is a batch of 7 rows (ranks take 4 and 3, with different numbers of
# assistant tokens) and a batch of 1 (rank 1 gets none and steps with zero gradients), the uneven
# cases the token weighting of the DDP loss must get right.

SFT_STEPS = 20
SFT = {"seq_len": 128, "pack": False, "batch_size": 7, "lr": 3e-3, "max_steps": SFT_STEPS, "warmup_steps": 4,
       "log_every": 2, "eval_every": 2, "ckpt_every": 10, "keep_checkpoints": 3, "base_shots": 1,
       "max_new_tokens": 4, "eval_batch_size": 8}


@pytest.fixture(scope="module")
def sft_runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("sft")
    tok = tiny_tokenizer()
    inputs = inputs_for(tiny_model_dir(root / "base", tok), *task_data(root))
    ctx = make_ctx(root / "one", "sft")
    one = json.loads(json.dumps(sft.run(sft.Config(**SFT), inputs, ctx).to_json()))
    two = launch(root / "two", "stages.sft", SFT, inputs)
    return {"one": one, "two": two, "root": root, "inputs": inputs, "one_ckpt": ctx.checkpoint_dir}


def test_sft_ddp_curve_matches_one_process_at_the_same_global_batch(sft_runs):
    one, two = sft_runs["one"], sft_runs["two"]
    diff = curve_diff(one, two)
    rel = abs(two["metrics"]["val_loss"] - one["metrics"]["val_loss"]) / one["metrics"]["val_loss"]
    print(f"\nSFT DDP vs 1 process: max curve difference {diff:.2e} nats, final val loss rel. difference {rel:.2e}")
    assert diff < CURVE_TOL, f"curves differ by {diff} nats"
    assert rel < FINAL_REL_TOL
    assert two["metrics"]["val_loss"] < two["tables"]["eval_curve"][0]["val_loss"] - 0.5  # it learned
    # rank 0 alone decodes: the base model's and the SFT model's task accuracy are the 1-process run's
    for k in ("base_acc/opposite", "acc/opposite"):
        assert two["metrics"][k] == one["metrics"][k], k
    assert (sft_runs["root"] / "two" / "out" / "sft" / "model.safetensors").is_file()


def test_sft_checkpoint_resumes_under_the_other_world_size(sft_runs):
    root, inputs = sft_runs["root"], sft_runs["inputs"]
    # 2 processes -> 1: the DDP run's step-10 checkpoint continued in one process
    ctx = make_ctx(root / "two-to-one", "sft")
    shutil.copytree(root / "two" / "ckpt" / "step-00000010", ctx.checkpoint_dir / "step-00000010")
    to_one = json.loads(json.dumps(sft.run(sft.Config(**SFT), inputs, ctx).to_json()))
    # 1 process -> 2: the single-process run's step-10 checkpoint continued under torchrun
    back = root / "one-to-two"
    shutil.copytree(sft_runs["one_ckpt"] / "step-00000010", back / "ckpt" / "step-00000010")
    to_two = launch(back, "stages.sft", SFT, inputs)
    assert "resumed from" in to_two["log"]
    for resumed, whole in ((to_one, sft_runs["two"]), (to_two, sft_runs["one"])):
        assert len(resumed["tables"]["eval_curve"]) == SFT_STEPS // 2 + 1  # the curve to step 10 came with it
        assert resumed["metrics"]["base_acc/opposite"] == whole["metrics"]["base_acc/opposite"]
        assert curve_diff(resumed, whole) < CURVE_TOL
        assert abs(resumed["metrics"]["val_loss"] - whole["metrics"]["val_loss"]) / whole["metrics"]["val_loss"] < FINAL_REL_TOL


def test_sft_kill_9_of_the_group_and_rerun_resumes_exactly_under_ddp(sft_runs):
    root, inputs = sft_runs["root"] / "killed", sft_runs["inputs"]
    kill_after_first_checkpoint(launch(root, "stages.sft", SFT, inputs, wait=False), root, SFT_STEPS)
    resumed = launch(root, "stages.sft", SFT, inputs)
    assert "resumed from" in resumed["log"]
    assert resumed["metrics"]["val_loss"] == sft_runs["two"]["metrics"]["val_loss"]
    assert resumed["tables"]["eval_curve"] == sft_runs["two"]["tables"]["eval_curve"]
    a = load_file(str(sft_runs["root"] / "two" / "out" / "sft" / "model.safetensors"))
    b = load_file(str(root / "out" / "sft" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
