#!/usr/bin/env bash
# The GPU checks of the speed work in one run of about 9 minutes (H100/H200): the GPU-marked tests
# (FlexAttention backward), bf16 + torch.compile training throughput against transformers at the
# t5-v1.1-small and -base shapes and at nanoT5's batch of 128 (MFU), and padded vs packed SNI
# fine-tuning (SDPA, and FlexAttention with 1024/128-token rows). Every stage has its own time limit
# and the script goes on past a failed one; after each stage everything so far is packed into
# $OUT/gpu_check.tar.gz (logs, JSON and markdown tables), with one line per stage in $OUT/summary.txt.
#
# The real data must travel with the working tree (../shared is not copied to a device machine):
#   mkdir -p .device_data && cp -r ../shared/data/{t5-spiece,c4-sample,sni} .device_data/
#   echo /.device_data/ >> .git/info/exclude
# then run, carrying .device_data:
#   T5FORGE_DATA=.device_data bash benchmarks/gpu_check.sh
# Without it the throughput batches are random ids and the packing stages are skipped.
# GPU_CHECK_SCALE=0.3 (say) scales every stage's time limit; GPU_CHECK_STAGES="tests packing"
# runs only the stages named; GPU_CHECK_DRY=1 runs them on the CPU at toy sizes.
set -u
OUT=${OUT:-benchmarks/results/gpu_check}
mkdir -p "$OUT"
WORK=$(mktemp -d)
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export T5FORGE_DATA=${T5FORGE_DATA:-../shared/data}
PY=${PYTHON:-python3}
SCALE=${GPU_CHECK_SCALE:-1}
STAGES=${GPU_CHECK_STAGES:-"env tests base128 base128-flex shapes packing packing-flex"}
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"

stage() {  # stage NAME SECONDS COMMAND...: run COMMAND under a time limit, log it, record the outcome
    local name=$1 seconds=$2
    shift 2
    case " $STAGES " in *" $name "*) ;; *) return 0 ;; esac
    local limit start rc
    limit=$(awk -v s="$seconds" -v f="$SCALE" 'BEGIN { printf "%d", s * f }')
    start=$(date +%s)
    echo "== $name (limit ${limit}s): $*" | tee -a "$WORK/$name.log"
    timeout --kill-after=10 "$limit" "$@" >>"$WORK/$name.log" 2>&1
    rc=$?
    echo "$name: exit $rc after $(($(date +%s) - start)) s" | tee -a "$SUMMARY"
    tail -n 25 "$WORK/$name.log"
    tar -czf "$OUT/gpu_check.tar.gz" -C "$WORK" .
}

# GPU_CHECK_DRY=1: the same stages on the CPU at toy sizes, to check the plumbing before a GPU run.
if [ "${GPU_CHECK_DRY:-0}" = 1 ]; then
    DEV=cpu PREC=fp32 COMPILE=none BASE=tiny BIG_BATCH=2 SHAPES=tiny ROUNDS=1 FT_BATCH=4 FT_SHAPE=tiny
else
    DEV=cuda PREC=bf16 COMPILE=model BASE=base BIG_BATCH=128 SHAPES="small base" ROUNDS=5 FT_BATCH=64 FT_SHAPE=base
fi
TT=("$PY" benchmarks/train_throughput.py --device "$DEV" --precision "$PREC" --compile "$COMPILE" --no-memory)
FP=("$PY" benchmarks/finetune_packing.py --device "$DEV" --precision "$PREC" --shape "$FT_SHAPE"
    --batch "$FT_BATCH" --rounds "$ROUNDS")
FLEX=flex
[ "$DEV" = cpu ] && FLEX=sdpa  # FlexAttention does not train on CPU

stage env 30 bash -c "nvidia-smi; $PY -c 'import torch, transformers; print(torch.__version__, torch.version.cuda, transformers.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())'"
stage tests 100 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/model/test_attention_backends.py
# nanoT5's step: T5-base, batch 128 x 512/114, bf16, compiled (its A100 figure: 0.56 s/step).
stage base128 110 "${TT[@]}" --shapes "$BASE" --batch "$BIG_BATCH" --rounds "$ROUNDS" \
    --out "$WORK/train_throughput-$DEV-$PREC-base128"
stage base128-flex 110 "${TT[@]}" --attention "$FLEX" --shapes "$BASE" --batch "$BIG_BATCH" --rounds "$ROUNDS" \
    --out "$WORK/train_throughput-$DEV-$PREC-base128-flex"
# shellcheck disable=SC2086  # SHAPES is a list
stage shapes 90 "${TT[@]}" --shapes $SHAPES --rounds $((ROUNDS * 2)) --out "$WORK/train_throughput-$DEV-$PREC"
if [ -d "$T5FORGE_DATA/sni" ]; then
    stage packing 45 "${FP[@]}" --out "$WORK/finetune_packing-$DEV-$PREC"
    # FlexAttention skips the blocks between examples, so rows wider than the longest example
    # (fewer, fuller rows) should pay off on a GPU, unlike dense attention on CPU.
    stage packing-flex 55 "${FP[@]}" --attention "$FLEX" --pack-source-len 1024 --pack-target-len 128 \
        --out "$WORK/finetune_packing-$DEV-$PREC-flex-wide"
else
    echo "packing: skipped, no SNI data under T5FORGE_DATA=$T5FORGE_DATA" | tee -a "$SUMMARY"
fi
tar -czf "$OUT/gpu_check.tar.gz" -C "$WORK" .
cat "$SUMMARY"
