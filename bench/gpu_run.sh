#!/usr/bin/env bash
# The GPU figures of the README's Performance section, in one device call:
#   bash bench/gpu_run.sh [STAGE ...]   # stages: trainer compiled big bigro bigtune group groupc sweep sweepc sweepall e2enan e2easha e2eahead slots scopes ahead kernels start storeorder join client occupancy warmsplit program
# Env: PROFILE=1 adds a torch.profiler table to compiled/big/bigtune (and, for groupc, to
# the group of size GROUP_PROFILE); GROUP_K, GROUP_SYNC: groupc's sizes and read-back windows;
# GROUP_DROPOUT: groupc's LoRA dropout (default 0; the sweep's trials have the config's 0.05);
# SWEEP_ARMS, SWEEP_STEPS, SWEEP_TIMEOUT, SWEEP_TRIALS: sweepall's arms (bench/gpu_sweep.py
# --k), steps per trial, time limit and trials (default 8); SWEEP_LR_GROWTH: its grid's LR
# ratio; SWEEP_PROFILE=N[:WARM]: its shared group profiles N warm group steps;
# BIG_SDPA=flash: bigro also runs with flash attention as the only SDPA backend.
# COMPILE_SCOPE=model|layers: model.compile_scope of the compiled stages (compiled groupc
# sweepall e2enan e2easha; their JSON names get -$COMPILE_SCOPE); unset: the config's.
# COMPILE_AHEAD=1: model.compile_ahead=true for sweepall e2enan e2easha (a helper process
# compiles while the members train eagerly; JSON names get -ahead).
# OCCUPIED_SLOTS=1: model.run_empty_slots=false for sweepall e2enan e2easha (a group step runs
# only as many slots as its members need, the count a dynamic dimension of its graph; the
# default runs every slot; JSON names get -occupied).
# COMPILE_PROGRAM=1: model.compile_program=true for sweepall e2enan e2easha warmsplit (the
# group's traced program kept with its compile cache: a warm start skips Dynamo's trace;
# JSON names get -program).
# COMPILE_MODE=cudagraphs (or an Inductor mode): model.compile of the compiled arms of
# sweepall e2enan e2easha instead of reduce-overhead (JSON names get -$COMPILE_MODE).
# SCOPE_ARMS: the scopes stage's arms (bench/compile_scope.py --arms, e.g.
# model,model:cudagraphs; default model,layers).
# NAN_ARMS: e2enan's arms (default g8c:400,g8c:400: cold, then warm; g8c:400 runs it once).
# E2E_STORAGE=DIR: e2enan and e2easha keep their sweeps' storage in DIR (bench/gpu_sweep.py
# --storage), so e2easha starts warm from the compile cache (and program) e2enan left there.
# OCC_SET=KEY=VALUE: one more override of the occupancy stage (e.g.
# demo.llm.num_hidden_layers=8 for a shorter compile); OCC_TIMEOUT: its time limit;
# OCC_RUNNING, OCC_ARMS: its --running and --arms; OCC_PROFILE=n[,m]: profile steps of n
# members; OCC_TRACE=1: those profiles also record Python calls (traces under $OUT/traces).
# SCOPE_K: the scopes and ahead stages' group size (default 8); SCOPE_WARM=1: scopes also runs
# each scope again, warm from its first run's caches; AHEAD_STEPS: ahead's steps.
# Installs the wheel bundle (`bash ../shared/tools/gpu-bundle.sh .whl soundfile soxr optuna`; carry .whl/) when the host lacks
# pydantic/Ray/MLflow, builds the reference-scale demo assets once (runs/_assets), and
# writes every result as JSON (and a log) under $OUT (default: runs/gpu-results).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu-results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0 MLFLOW_DISABLE_TELEMETRY=true
if ! python3 -c "import pydantic, ray, mlflow, soundfile, soxr, optuna" 2>/dev/null && [ -d .whl ]; then
  if ! PYTHONPATH=/tmp/site python3 -c "import pydantic, ray, mlflow, soundfile, soxr, optuna" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    tar xJf .whl/ray-slim.tar.xz -C /tmp/site
  fi  # else installed by an earlier call on this machine
  export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, peft; print(torch.__version__, transformers.__version__, peft.__version__)" | tee -a "$OUT/gpu.txt"
ref=(configs/reference.yaml --set demo.num_examples=64 --set phase2.warmup_steps=5)
scope=${COMPILE_SCOPE:+--set model.compile_scope=$COMPILE_SCOPE}  # unquoted below: 0 or 2 words
sfx=${COMPILE_SCOPE:+-$COMPILE_SCOPE}
ahead=${COMPILE_AHEAD:+--set model.compile_ahead=true}  # unquoted below: 0 or 2 words
sfx=$sfx${COMPILE_AHEAD:+-ahead}
empty=${OCCUPIED_SLOTS:+--set model.run_empty_slots=false}  # unquoted below: 0 or 2 words
sfx=$sfx${OCCUPIED_SLOTS:+-occupied}
program=${COMPILE_PROGRAM:+--set model.compile_program=true}  # unquoted below: 0 or 2 words
storage=${E2E_STORAGE:+--storage $E2E_STORAGE}  # unquoted below: 0 or 2 words
sfx=$sfx${COMPILE_PROGRAM:+-program}
mode=${COMPILE_MODE:+--set model.compile=$COMPILE_MODE}  # unquoted below: 0 or 2 words
sfx=$sfx${COMPILE_MODE:+-$COMPILE_MODE}
stages=("${@:-trainer compiled big bigro group groupc sweep sweepc}")
for stage in ${stages[@]}; do
  echo "=== $stage $(date +%T)"
  case "$stage" in
    trainer)   # naive loop vs the trainer, eager, seed batch
      timeout 300 python3 bench/gpu_trainer.py "${ref[@]}" --batch 2 --text-len 128 \
        --arms naive,trainer --json "$OUT/trainer.json" ;;
    compiled)  # naive loop vs the trainer with CUDA graphs, seed batch
      timeout 400 python3 bench/gpu_trainer.py "${ref[@]}" --batch 2 --text-len 128 \
        --arms naive,trainer --steps ${COMPILED_STEPS:-50} --set model.compile=reduce-overhead $scope --guard-compare --adamw-compare ${PROFILE:+--profile} \
        --json "$OUT/compiled$sfx.json" ;;
    big)       # 16 x 512 text tokens, compiled
      timeout 400 python3 bench/gpu_trainer.py "${ref[@]}" --batch 16 --text-len 512 \
        --arms trainer --set model.compile=default ${PROFILE:+--profile} --json "$OUT/big.json" ;;
    bigro)     # the same with CUDA graphs (reduce-overhead), then with flash attention only
      for sdpa in auto ${BIG_SDPA:-}; do
        timeout 300 python3 bench/gpu_trainer.py "${ref[@]}" --batch 16 --text-len 512 \
          --arms trainer --set model.compile=reduce-overhead --sdpa $sdpa ${PROFILE:+--profile} \
          --json "$OUT/bigro-$sdpa.json"
      done ;;
    bigtune)   # the same with Inductor's matmul autotuning (and CUDA graphs)
      timeout 500 python3 bench/gpu_trainer.py "${ref[@]}" --batch 16 --text-len 512 \
        --arms trainer --set model.compile=max-autotune ${PROFILE:+--profile} \
        --json "$OUT/bigtune.json" ;;
    group)     # shared-weight groups, eager
      timeout 300 python3 bench/gpu_group.py "${ref[@]}" --k 1,8,32 --json "$OUT/group.json" ;;
    groupc)    # shared-weight groups, the shared forward compiled with CUDA graphs
      TORCH_LOGS=recompiles timeout 500 python3 bench/gpu_group.py "${ref[@]}" --k ${GROUP_K:-1,8,32} --steps 30 \
        --sync ${GROUP_SYNC:-10} ${GROUP_PROFILE:+--profile $GROUP_PROFILE} \
        --set model.compile=reduce-overhead $scope ${GROUP_DROPOUT:+--set model.lora.dropout=$GROUP_DROPOUT} \
        --json "$OUT/groupc$sfx.json" ;;
    occupancy) # a compiled group of 8 stepping 8, 4, 2 and 1 of its members: running only
               # the members' slots against every slot (model.run_empty_slots), one process
      PROFILE_TRACE=${OCC_TRACE:+$OUT/traces} TORCH_LOGS=cudagraphs timeout ${OCC_TIMEOUT:-400} python3 bench/gpu_group.py "${ref[@]}" --k 8 --running ${OCC_RUNNING:-8,4,2,1} \
        --arms ${OCC_ARMS:-all,occupied} ${OCC_PROFILE:+--profile-running $OCC_PROFILE} --steps 30 --sync 10 --set model.compile=reduce-overhead \
        ${OCC_SET:+--set $OCC_SET} --json "$OUT/occupancy.json" ;;
    warmsplit) # issue 21 (a): where a compiled group's first step goes at reference scale,
               # cold, then warm from the first's compile cache (Dynamo's per-phase times)
      rm -rf /tmp/ws && for arm in cold warm; do
        TORCHINDUCTOR_CACHE_DIR=/tmp/ws-ind-$arm TRITON_CACHE_DIR=/tmp/ws-tri-$arm timeout 300 \
          python3 bench/slot_compile.py configs/reference.yaml --device cuda --work /tmp/ws \
          --label $arm --compile-times --set demo.num_examples=64 --set phase2.batch_size=2 \
          --set phase2.warmup_steps=5 $program ${OCC_SET:+--set $OCC_SET}
      done ;;
    program)   # model.compile_program on this GPU's torch (tiny demo, CUDA graphs): a cold
               # then a warm process with the traced program kept, then both without
      for arm in program usual; do
        for label in cold warm; do
          TORCHINDUCTOR_CACHE_DIR=/tmp/prog-$arm-ind timeout 240 python3 bench/slot_compile.py \
            configs/phase2.yaml --device cuda --work /tmp/prog-$arm --label $arm-$label \
            $([ $arm = program ] && echo --set model.compile_program=true)
        done
      done ;;
    sweep)     # 8 trials through tuning.sweep: one at a time vs one shared group
      timeout 500 python3 bench/gpu_sweep.py configs/reference.yaml --trials 8 --steps 40 \
        --k 1,g8 --json "$OUT/sweep.json" ;;
    sweepc)    # the same 8 trials as one shared group whose forward is compiled
      timeout 550 python3 bench/gpu_sweep.py configs/reference.yaml --trials 8 --steps 200 \
        --k g8 --set model.compile=reduce-overhead --json "$OUT/sweepc.json" ;;
    sweepall)  # one at a time and 8 processes (eager) vs one compiled group, one run
      timeout ${SWEEP_TIMEOUT:-560} python3 bench/gpu_sweep.py configs/reference.yaml --trials ${SWEEP_TRIALS:-8} --steps ${SWEEP_STEPS:-100} ${SWEEP_LR_GROWTH:+--lr-growth $SWEEP_LR_GROWTH} \
        --k ${SWEEP_ARMS:-1,8,g8c} $scope $ahead $empty $program $mode --json "$OUT/sweepall$sfx.json" --keep-metrics "$OUT/sweepall$sfx-metrics" \
        ${SWEEP_PROFILE:+--profile-group $SWEEP_PROFILE} ;;
    e2enan)    # issue 21 (a), end to end: 8 trials, LR 1e-4..1e-1 x clip none/1.0 (some hit
               # NaN), one compiled group of 8 slots; run twice: cold, then warm from the
               # compile cache the first left in the storage
      timeout 590 python3 bench/gpu_sweep.py configs/reference.yaml --k ${NAN_ARMS:-g8c:400,g8c:400} \
        --space '{"learning_rate": {"grid": [1e-4, 1e-3, 1e-2, 1e-1]},
                  "gradient_clip_val": {"grid": [null, 1.0]}}' $scope $ahead $empty $program $mode $storage \
        --json "$OUT/e2enan$sfx.json" --keep-metrics "$OUT/e2enan$sfx-metrics" ;;
    e2easha)   # issue 21 (b): 16 trials under ASHA (grace 100, reduction 3, max 1,000
               # steps) through one compiled group of 8 slots
      timeout 590 python3 bench/gpu_sweep.py configs/reference.yaml --k g8c:1000 \
        --num-samples 16 --search random --asha 100,3 \
        --space '{"learning_rate": {"loguniform": [1e-5, 1e-3]}}' $scope $ahead $empty $program $mode $storage \
        --json "$OUT/e2easha$sfx.json" --keep-metrics "$OUT/e2easha$sfx-metrics" ;;
    e2eahead)  # issue 21 (a) cold, both ways on one machine: the members training eagerly
               # while a helper compiles (model.compile_ahead), then compiling in the group's
               # own process; each sweep with empty Inductor and Triton caches of its own
      for arm in ahead inline; do
        TORCHINDUCTOR_CACHE_DIR=/tmp/e2eahead-$arm/inductor TRITON_CACHE_DIR=/tmp/e2eahead-$arm/triton \
          timeout 290 python3 bench/gpu_sweep.py configs/reference.yaml --k g8c:400 \
          --space '{"learning_rate": {"grid": [1e-4, 1e-3, 1e-2, 1e-1]},
                    "gradient_clip_val": {"grid": [null, 1.0]}}' $scope \
          $([ $arm = ahead ] && echo --set model.compile_ahead=true) \
          --json "$OUT/e2eahead-$arm$sfx.json" --keep-metrics "$OUT/e2eahead-$arm$sfx-metrics"
      done ;;
    slots)     # a compiled group (tiny demo, CUDA graphs): members leave and join without
               # a compile; a second process starts warm from the first's compile cache
      rm -rf /tmp/slots && TORCHINDUCTOR_CACHE_DIR=/tmp/slots-ind1 timeout 280 python3 \
        bench/slot_compile.py configs/phase2.yaml --device cuda --work /tmp/slots --label cold &&
        TORCHINDUCTOR_CACHE_DIR=/tmp/slots-ind2 timeout 280 python3 \
        bench/slot_compile.py configs/phase2.yaml --device cuda --work /tmp/slots --label warm ;;
    scopes)    # issue 21: a compiled group's cold start (compile + first step) and steady
               # step, whole forward compiled against each decoder block, a process each
      timeout 590 python3 bench/compile_scope.py "${ref[@]}" --k ${SCOPE_K:-8} \
        ${SCOPE_ARMS:+--arms $SCOPE_ARMS} ${SCOPE_WARM:+--warm} --json "$OUT/scopes.json" ;;
    ahead)     # issue 21: a compiled group's cold start, compiling in its own process against
               # a helper process compiling while the members train eagerly
      timeout 590 python3 bench/compile_ahead.py "${ref[@]}" --k ${SCOPE_K:-8} \
        --steps ${AHEAD_STEPS:-1500} --device cuda --json "$OUT/ahead.json" ;;
    start)     # a sweep's start: its inputs prepared, then Ray, against both side by side
      timeout 300 python3 bench/sweep_start.py "${ref[@]}" --reps 3 ;;
    storeorder)  # a sweep's start: its MLflow store opened beside the preparation or after it
      timeout 280 python3 bench/store_order.py --reps ${STORE_REPS:-3} | tee "$OUT/store_order.txt" ;;
    join)      # a shared group's make-up changes: each join reading the splits again
               # against the group's shared splits, and what a leave costs
      timeout 300 python3 bench/group_join.py "${ref[@]}" --device cuda --json "$OUT/join.json" ;;
    client)    # a shared group's trial process: its imports without torch, against with
      timeout 120 python3 bench/client_start.py --reps 5 ;;
    kernels)   # the group's LoRA/attention kernel forms and one member's AdamW host time
      timeout 200 python3 bench/lora_kernels.py --json "$OUT/lora_kernels.json" &&
        timeout 60 python3 bench/adamw_step.py --json "$OUT/adamw_step.json" ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac 2>&1 | grep --line-buffered -v "Loading weights" | tee -a "$OUT/log.txt"
done
