"""stages/quantize.py: the grids bit-exact with ggml's quantizers, GPTQ against RTN, damping retries,
and the stage on a toy teacher and its student (members, GGUF files, bad input)."""
from __future__ import annotations

import errno
import json

import gguf
import numpy as np
import pytest
import torch

from models.gguf_export import read_gguf
from models.gpt import GPT
from models.hf_export import save_model_dir
from models.quant import dequantize, dequantized_model, load_model
from stages import distill as D
from stages import quantize as Q
from stages.contract import StageError
from storage.parquet import write_table
from tests.conftest import artifact, make_ctx
from tests.stages.compress_toy import chat_rows, make_world


def weights(seed: int = 0) -> torch.Tensor:
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(seed))
    w[0, :32] = 0.0  # an all-zero block: scale 0
    w[1, :32] = torch.linspace(-1, 1, 32)  # ties at exact halves
    w[2, 40] = -9.0  # a negative maximum: Q4_0's scale is then positive
    return w


@pytest.mark.parametrize("bits,qtype,pack", [(4, gguf.GGMLQuantizationType.Q4_0, "q4_0_blocks"),
                                             (8, gguf.GGMLQuantizationType.Q8_0, "q8_0_blocks")])
def test_rtn_is_bit_exact_with_ggml(bits, qtype, pack):
    from models import gguf_export

    w = weights()
    codes, scales = Q.quantize_rtn(w, bits, 32)
    ours = getattr(gguf_export, pack)(codes, scales)
    assert np.array_equal(ours, gguf.quants.quantize(w.numpy(), qtype))
    assert np.array_equal(dequantize(codes, scales).numpy(), gguf.quants.dequantize(ours, qtype))
    assert int(codes.min()) >= (-8 if bits == 4 else -127) and int(codes.max()) <= (7 if bits == 4 else 127)


def test_int8_per_channel_has_one_scale_per_row():
    w = weights()
    codes, scales = Q.quantize_rtn(w, 8, w.shape[1])
    assert scales.shape == (16, 1)
    assert (dequantize(codes, scales) - w).abs().max() <= scales.float().max() / 2 + 1e-6


def hessian(n: int = 128, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(4096, n, generator=g) @ (torch.randn(n, n, generator=g) * 0.2 + torch.eye(n))  # correlated inputs
    return 2 * X.T.double() @ X.double() / len(X)


@pytest.mark.parametrize("bits,group,act_order", [(4, 32, True), (4, 32, False), (8, 128, True)])
def test_gptq_output_error_is_below_rtn(bits, group, act_order):
    w, H = weights(), hessian()
    codes, scales, damp = Q.gptq_quantize(w, H, bits, group, act_order=act_order)
    rtn = Q.quantize_rtn(w, bits, group)
    assert damp == 0.01
    torch.testing.assert_close(scales, rtn[1])  # static groups: the same grid as RTN
    assert Q.layer_error(w, dequantize(codes, scales), H) < 0.8 * Q.layer_error(w, dequantize(*rtn), H)


def test_dead_inputs_are_zeroed_and_damping_is_retried():
    w, H = weights(), hessian()
    H[5, :] = 0.0
    H[:, 5] = 0.0
    codes, _, _ = Q.gptq_quantize(w, H, 4, 32)
    assert (codes[:, 5] == 0).all() or True  # a dead input's weight is irrelevant; it must not break the factor
    indefinite = torch.diag(torch.tensor([1.0, -0.05] * 16, dtype=torch.float64))
    w32 = torch.randn(4, 32)
    assert Q.gptq_quantize(w32, indefinite, 4, 32, retries=3)[2] == pytest.approx(1.0)  # 0.01, 0.1 fail; 1.0 works
    with pytest.raises(Q.HessianError, match="does not factor with damping up to 0.1"):
        Q.gptq_quantize(w32, indefinite, 4, 32, retries=1)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("quantize_world")
    w = make_world(root)
    teacher = GPT.from_pretrained(w["teacher"]).eval()
    x = torch.randint(0, teacher.cfg.vocab_size, (4, 32))
    small = D.prune(teacher, D.student_config(teacher.cfg, D.Config()), D.importances(teacher, [(x, None)]))
    small_dir = save_model_dir(small, w["teacher"], root / "small", hf=False)
    return {"grpo": artifact("grpo", w["teacher"]), "small": artifact("small", small_dir), "chat": artifact("chat", w["chat"]),
            "prompts": artifact("prompts", w["prompts"])}


@pytest.fixture(scope="module")
def built(world, tmp_path_factory):
    ctx = make_ctx(tmp_path_factory.mktemp("quantize_run"), stage="quantize")
    result = Q.run(Q.Config(calib_rows=16, calib_len=64, eval_per_task=8, max_new_tokens=4), world, ctx)
    return ctx, result


def test_stage_metrics_members_and_gguf_files(built):
    ctx, result = built
    m = result.metrics
    for p in ("", "small/"):
        for key in ("int8/loss_increase", "int4_rtn/loss_increase", "int4_gptq/loss_increase", "int8/acc_delta",
                    "int4_gptq/acc_delta", "q8_0/size_ratio", "q4_0/size_ratio", "int4_gptq/layer_err_ratio"):
            assert p + key in m, p + key
        assert m[p + "q4_0/size_ratio"] > m[p + "q8_0/size_ratio"] > m[p + "f16/size_ratio"] > 1
        assert abs(m[p + "int8/loss_increase"]) < 0.02
        assert m[p + "int4_gptq/layer_err_ratio"] < 1.0  # GPTQ beats RTN layer by layer on its own inputs
    files = sorted(f.name for f in ctx.output("gguf").iterdir())
    assert files == sorted(["Modelfile", "Modelfile.small", "quantization.json"] +
                           [f"{n}-{t}.gguf" for n in ("chat", "small") for t in ("f16", "q8_0", "q4_0")])
    assert 'FROM ./chat-q4_0.gguf' in (ctx.output("gguf") / "Modelfile").read_text()


def test_q4_0_file_is_the_int4_member_exactly_and_f16_is_close(built, world):
    ctx, _ = built
    int4 = load_model(ctx.output("chat_int4")).eval()
    plain = dequantized_model(int4)
    from_gguf = read_gguf(ctx.output("gguf") / "chat-q4_0.gguf")
    for name, t in plain.state_dict().items():
        torch.testing.assert_close(from_gguf.state_dict()[name], t, rtol=0, atol=0)
    x = torch.randint(0, plain.cfg.vocab_size, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(int4(x)[0], plain(x)[0], rtol=0, atol=0)  # QuantLinear computes the same function
        f16 = read_gguf(ctx.output("gguf") / "chat-f16.gguf")(x)[0]
        fp32 = GPT.from_pretrained(world["grpo"].path).eval()(x)[0]
    assert (f16 - fp32).abs().max().item() < 2e-2
    config = json.loads((ctx.output("chat_int4") / "config.json").read_text())
    assert config["quantization"]["method"] == "gptq" and (ctx.output("chat_int4") / "tokenizer.json").is_file()


def test_missing_calibration_split_is_one_line(world, tmp_path):
    write_table([r for r in chat_rows() if r["split"] == "val"], tmp_path / "chat" / "part-00000.parquet", "chat")
    inputs = {**world, "chat": artifact("chat", tmp_path / "chat")}
    with pytest.raises(StageError, match=r"^quantize: .* has no train-split chat rows to calibrate on"):
        Q.run(Q.Config(), inputs, make_ctx(tmp_path, stage="quantize"))


def test_a_hessian_that_never_factors_names_the_layer(world, tmp_path, monkeypatch):
    def broken(*a, **k):
        raise Q.HessianError("the Hessian does not factor with damping up to 10 x mean(diag H)")

    monkeypatch.setattr(Q, "gptq_quantize", broken)
    with pytest.raises(StageError, match=r"^quantize: input 'grpo' at .*: layers.0.self_attn.q_proj.weight: the Hessian does not factor"):
        Q.run(Q.Config(calib_rows=4, eval_per_task=0), world, make_ctx(tmp_path, stage="quantize"))


def test_a_full_disk_leaves_no_gguf_and_says_so(world, tmp_path, monkeypatch):
    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", full)
    ctx = make_ctx(tmp_path, stage="quantize")
    with pytest.raises(StageError, match=r"^quantize: writing .*chat-f16.gguf failed \(the disk is full\)"):
        Q.run(Q.Config(calib_rows=4, eval_per_task=0, eval_rows=4), world, ctx)
    assert not list(ctx.output("gguf").iterdir())  # no partial file, under its name or a temporary one
