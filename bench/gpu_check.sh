#!/usr/bin/env bash
# Every GPU check in one command (one H100/H200): the CUDA tests, the speed table for the
# configs the records are compared against, and a real compiled run of the trainer.
#   OUT=/tmp/gpu bash bench/gpu_check.sh [STEPS]
# Results (key:value logs + JSON) land in $OUT; copy the figures into bench/RESULTS.md.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/pgolf_gpu}; STEPS=${1:-20}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then  # zstandard/brotli wheels carried to a machine without them
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
status=0
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; date -u; } > "$OUT/device.txt" 2>&1

# 1. correctness: compiled == eager (bf16) per seed config, FA3 == SDPA, backend switch obeyed;
#    the Triton kernels (fused_ce, fused_mlp) vs eager at the record's shapes and compiled in the pr1855 model
python3 -m pytest -q tests/test_gpu.py 2>&1 | tee "$OUT/test_gpu.log" || status=1
python3 -m pytest -q tests/test_kernels.py 2>&1 | tee "$OUT/test_kernels.log" || status=1

# 2. speed at the records' shape on one GPU (pr473/pr1812: 786,432 tokens/step as 8 x 98,304; baseline 524,288)
for c in baseline pr473 pr1812; do  # virtual_world_size defaults to 8: grad_accum 8 on one GPU
  python3 bench/bench.py --config "configs/$c.toml" --steps "$STEPS" --out "$OUT/bench_$c.json" 2>&1 | tee "$OUT/bench_$c.log" || status=1
done
# pr1855 at a tiny width (model_dim 256) and one rank's batch (786,432 / 8 tokens): eager vs the fused Triton kernels
for k in 0 1; do
  python3 bench/bench.py --config configs/pr1855.toml --steps "$STEPS" --model_dim=256 --virtual_world_size=1 --batch-tokens 98304 \
    --fused_ce=$k --fused_mlp=$k --out "$OUT/bench_pr1855_fused$k.json" 2>&1 | tee "$OUT/bench_pr1855_fused$k.log" || status=1
done

# 3. the real trainer on the sample data: compile, bf16, prefetching loader, GPTQ, artifact roundtrip, TTT eval
python3 data/prepare.py sample > "$OUT/smoke.log" 2>&1 || status=1
id="gpu_smoke_$(date +%s)"
python3 train_gpt.py --config configs/smoke.toml --device=cuda --autocast_dtype=bf16 --run_id="$id" >> "$OUT/smoke.log" 2>&1 || status=1
python3 ttt_eval.py --artifact "runs/$id/final_model.mixed.ptz" --device=cuda >> "$OUT/smoke.log" 2>&1 || status=1
cp "logs/$id.txt" "$OUT/smoke_full_log.txt" 2>/dev/null
grep -E "compile:|attention_backend|step_avg|roundtrip_exact|quant_gap|peak memory|_exact|eval_wallclock" "$OUT/smoke.log" | tail -16
echo "gpu_check status:$status (results in $OUT)"
exit $status
