#!/usr/bin/env bash
# The distillation grid (bench/distill_grid.py) on a lent GPU machine that can be sent ~60 MiB a call.
# The encoders travel as fp16 pieces (bench/device_cargo.py pack --out .cargo: p1-p4 mpnet-base, p5
# MiniLM-L6), the corpora as .gpu-data/{meld,emorynlp}. The grid starts with the first call and runs in
# its own session between calls; the teachers start once the last mpnet piece has arrived. Before the first call:
#   python bench/device_cargo.py pack --out .cargo && mkdir -p .gpu-data && cp -r "$ERC_DISTILL_DATA"/{meld,emorynlp} .gpu-data/
#
#   bash bench/gpu_distill.sh start         # carry .cargo/p5 .gpu-data: MiniLM, start the grid (baselines)
#   bash bench/gpu_distill.sh piece p1      # carry .cargo/p1 (then p2, p3)
#   bash bench/gpu_distill.sh finish p4 480 # carry .cargo/p4: mpnet complete, teachers start; after 480 s
#                                           # STOP, summary, results into $OUT
# Each call must come within the machine's 30 s warm window of the last. Anything a later call needs lives
# outside the checkout ($ROOT): a carried path is deleted there by the next call that does not carry it.
# Measured on an H200 (2026-12-04), 18 jobs sharing it: MiniLM students ~24 steps/s at batch 32 (an epoch of
# MELD in 13 s), mpnet teachers 5-8 steps/s at batch 16 (4 epochs ~7-8 min): the teachers are the critical path.
set -uo pipefail
ROOT=/root/erc-gpu
export PYTHONPATH="$PWD/src" HF_HOME=$ROOT/hf HF_HUB_CACHE=$ROOT/hf/hub HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 \
       TOKENIZERS_PARALLELISM=false
mkdir -p $ROOT/pieces
t0=$(date +%s)

case "$1" in
start)
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
    python3 -c "import torch, transformers, lightning; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__, 'lightning', lightning.__version__)"
    cp -r .cargo/p5 $ROOT/pieces/ && python3 bench/device_cargo.py unpack --pieces $ROOT/pieces/p5 --hf-home $ROOT/hf || exit 1
    # outside the checkout: a carried path is removed there again by the next call that does not carry it
    rm -rf $ROOT/data && cp -r .gpu-data $ROOT/data || exit 1
    setsid nohup python3 bench/distill_grid.py --out $ROOT/grid --cache-dir $ROOT/cache --data-dir $ROOT/data \
        --accelerator gpu --jobs 18 --models-ready $ROOT/hf/READY --eval-batch-size 128 \
        >$ROOT/grid.log 2>&1 </dev/null &
    sleep 40
    cat $ROOT/grid.log
    for f in $ROOT/grid/logs/*.log; do echo "== $f"; tail -c 600 "$f"; echo; done
    nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
    ;;
piece)
    cp -r ".cargo/$2" $ROOT/pieces/ && ls $ROOT/pieces && tail -3 $ROOT/grid.log
    ;;
finish)
    cp -r ".cargo/$2" $ROOT/pieces/
    python3 bench/device_cargo.py unpack --pieces $ROOT/pieces/p1 $ROOT/pieces/p2 $ROOT/pieces/p3 $ROOT/pieces/p4 \
        --hf-home $ROOT/hf && touch $ROOT/hf/READY
    limit=$3
    while pgrep -f distill_grid.py >/dev/null && [ $(( $(date +%s) - t0 )) -lt "$limit" ]; do
        sleep 20
        echo "[$(( $(date +%s) - t0 )) s] $(grep -c ' done ' $ROOT/grid.log) done, $(grep -c FAILED $ROOT/grid.log) failed;" \
             "$(nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader)"
    done
    touch $ROOT/grid/STOP
    for _ in $(seq 60); do pgrep -f distill_grid.py >/dev/null || break; sleep 1; done
    tail -n 120 $ROOT/grid.log
    cd $ROOT/grid
    tar czf "$OUT/results.tgz" grid.json grid.md jobs.json teachers logs \
        $(find runs -maxdepth 2 \( -name metrics.json -o -name manifest.json -o -name config.yaml \))
    tar czf "$OUT/predictions.tgz" $(find runs -maxdepth 2 -name 'predictions_*.csv')
    # the first finished 4-layer student, fp16, for export / INT8 / latency on the robot's CPU
    model=$(ls -d runs/ensemble-emorynlp-4L-s*/student/model 2>/dev/null | head -1)
    if [ -n "$model" ]; then
        python3 - "$model" "$OUT" <<'EOF'
import sys, tarfile, io
from pathlib import Path
from safetensors.torch import load_file, save_file
model, out = Path(sys.argv[1]), Path(sys.argv[2])
staging = Path("/tmp/student4l"); staging.mkdir(exist_ok=True)
for f in model.rglob("*"):
    if f.is_file():
        dst = staging / f.relative_to(model); dst.parent.mkdir(parents=True, exist_ok=True)
        if f.suffix == ".safetensors":
            save_file({k: v.half() if v.is_floating_point() else v for k, v in load_file(f).items()}, dst)
        else:
            dst.write_bytes(f.read_bytes())
buf = io.BytesIO()
with tarfile.open(fileobj=buf, mode="w") as tar:
    tar.add(staging, arcname=str(model.parent.parent.name))
data = buf.getvalue()
for i in range(0, len(data), 15 << 20):
    (out / f"student4l.part{i // (15 << 20)}").write_bytes(data[i : i + (15 << 20)])
print("4-layer student", model, len(data) >> 20, "MiB")
EOF
    fi
    ls -la "$OUT"
    ;;
esac
