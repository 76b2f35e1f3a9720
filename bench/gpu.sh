#!/usr/bin/env bash
# Tokens/s and MFU of the `small` recipe's pretraining on one GPU, in under 5 minutes.
#
#   bash bench/gpu.sh            # on a machine with an NVIDIA GPU and `make setup` done
#
# Data: the micro recipe's data stages (a local pydoc crawl, no network) with the small recipe's
# 32k-vocab tokenizer setting (a tiny corpus may stop short of 32k merges: the vocab size used is
# printed). Model and batch: the small recipe's pretrain config (d_model 768, 12 layers, seq 1024,
# 32 x 4 accumulation, bf16 autocast, torch.compile), for STEPS optimizer steps (default 30; the
# first steps include compilation, so the stage's tokens/s over the whole run is a lower bound and
# the last logged train/tokens_per_s the steady state). MFU = flops_per_token * tokens/s / PEAK_TFLOPS
# (pretrain.peak_tflops, default 989, the dense bf16 peak of an H100 SXM; set PEAK_TFLOPS for others,
# e.g. 989 for H200 too). Prints one JSON line.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
STEPS=${STEPS:-30}
PEAK_TFLOPS=${PEAK_TFLOPS:-989}
WORK=${WORK:-$(mktemp -d /tmp/family-gpu-XXXX)}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
timeout 240 "$PY" -m flows.cli run --recipe micro --until tokenizer --home "$WORK/home" --no-track \
  --set tokenizer.vocab_size=32768 >"$WORK/data.log" 2>&1 || { tail -20 "$WORK/data.log"; exit 1; }
"$PY" - "$WORK" "$STEPS" "$PEAK_TFLOPS" <<'PYEOF'
import json, sys
from pathlib import Path
from flows.recipe import load_recipe
from storage.artifacts import ArtifactStore
from storage.home import Home
work, steps, peak = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
store = ArtifactStore(Home(work / "home"))
tok = store.history("tokenizer")[0].artifacts()
cfg = load_recipe("small").stages["pretrain"].config_json
cfg.update(max_steps=steps, warmup_steps=min(10, steps), eval_every=steps, ckpt_every=10 * steps, log_every=5,
           eval_tokens=65536, peak_tflops=peak, max_minutes=4.0)
(work / "c.json").write_text(json.dumps(cfg))
(work / "i.json").write_text(json.dumps({k: a.path for k, a in tok.items()}))
PYEOF
timeout 270 "$PY" -m stages.pretrain --config "$WORK/c.json" --inputs "$WORK/i.json" --run-dir "$WORK/run/out" \
  --device cuda >"$WORK/pretrain.log" 2>&1 || { tail -30 "$WORK/pretrain.log"; exit 1; }
"$PY" - "$WORK" <<'PYEOF'
import json, sys
from pathlib import Path
work = Path(sys.argv[1])
r = json.loads((work / "run" / "result.json").read_text())
m = r["metrics"]
meta = json.loads((work / "run" / "out" / "base" / "meta.json").read_text())
print(json.dumps({"recipe": "small", "steps": int(m["steps"]), "params": int(m["params"]),
                  "vocab_size": meta["derived"]["vocab_size"], "tokens_per_step": meta["derived"]["tokens_per_step"],
                  "tokens_per_s": round(m["tokens_per_s"]), "mfu": round(m.get("mfu", float("nan")), 4),
                  "val_loss": round(m["val_loss"], 4)}))
PYEOF
