#!/usr/bin/env bash
# One device call per group of runs on an H200 (see the device tool's README): checks first, then
# timings, every table printed and every JSON/log written under $OUT.
#   bash benchmarks/h200.sh smoke      # every GPU path once (run first; 7-9 minutes)
#   bash benchmarks/h200.sh gemv       # decode's weight matmuls per kernel and matrix (which kernel to use)
#   bash benchmarks/h200.sh gemv-batch # the same at 16, 32 and 64 rows, int4's kernels against bf16
#   bash benchmarks/h200.sh quant      # int8/int4, ours (torch's kernels, then Triton's) and gpt-fast, the limit
#   bash benchmarks/h200.sh kernels    # decode attention kernels, then int8 alone (METHODS=int8)
#   bash benchmarks/h200.sh speed      # GPU correctness checks, then `mistral7b bench` with gpt-fast
#   bash benchmarks/h200.sh serving    # prefix cache; HTTP load with the engine as a thread
#   bash benchmarks/h200.sh serving-process  # HTTP load with the engine in its own process (a call of its own)
#   bash benchmarks/h200.sh structured # structured outputs through the engine; a 131k-token prompt's memory
#   bash benchmarks/h200.sh invariant  # the batch-invariant mode: PASS/FAIL checks, then its decode cost
#   bash benchmarks/h200.sh peer       # bf16 decode at b1/b8 with gpt-fast at b1 (no checks, no HF)
#   bash benchmarks/h200.sh profile    # one b1 decode step, ours and gpt-fast's, kernels by kind side by side
#   bash benchmarks/h200.sh profile-tuned  # ours without the one-row step's tuning, then with it (the default)
#   bash benchmarks/h200.sh tuned      # decode tok/s at b1/b8 without the one-row step's tuning, then with it
#   bash benchmarks/h200.sh spec       # speculative decoding: a verify's cost at the 7B shape, b1 and b8
#   bash benchmarks/h200.sh spec-b32   # the same at b32 (a call of its own beside spec: 170 s)
#   bash benchmarks/h200.sh spec-self  # self-int4's whole loop at the 7B shape (random weights: acceptance is not real)
#   bash benchmarks/h200.sh spec-backoff  # the same at b1 as served: failing rows back off to plain decoding
#   bash benchmarks/h200.sh spec-real  # n-gram acceptance and speed-up with the real default model (see below;
#                                       SPEC_METHODS=ngram for n-gram alone)
#   bash benchmarks/h200.sh spec-real-invariant  # the same, n-gram, in the batch-invariant mode (same carry)
#   bash benchmarks/h200.sh stage-model  # the first part of the default model, for spec-real's call (see below)
#   bash benchmarks/h200.sh lora       # LoRA: 4 rank-16 adapters against the base model, compiled (triton, fused)
#   bash benchmarks/h200.sh lora-reduce # the same at batch 8 with the reduce delta
#   bash benchmarks/h200.sh lora-64    # the same compiled at batch 64 (a call of its own: its compiles are long)
#   bash benchmarks/h200.sh lora-eager # the same eager at batch 1, 8 and 64
#   bash benchmarks/h200.sh tiles      # the invariant matmul's tile sweep against cuBLAS (batch_invariant.TILES)
# Several groups run in turn: `bash benchmarks/h200.sh smoke spec peer`.
# Needs .whl (wheels the image lacks) and .peer (gpt-fast's files, tokenizer.model.v1) carried.
# spec-real needs the default model, 98 MB, over a call's 64 MiB (the working tree counts too, 4.5 MB
# now): split it here, then carry a part a call (the machine keeps /tmp while it stays warm: chain them):
#   split -b 40M ~/.cache/mistral7b/SmolLM2-135M-Instruct.Q4_1.gguf .peer/smollm2.part-
#   (cd ~/.cache/mistral7b && sha256sum SmolLM2-135M-Instruct.Q4_1.gguf | cut -d' ' -f1) > .peer/smollm2.sha256
#   calls 1 and 2, carry .peer/smollm2.part-aa, then -ab:  bash benchmarks/h200.sh stage-model
#   call 3, carry the usual and .peer/smollm2.part-ac .peer/smollm2.sha256:  bash benchmarks/h200.sh spec-real
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
PARTS=/tmp/model-parts
if [ "${1:-}" = stage-model ]; then  # no wheels needed: only the part is copied
    mkdir -p $PARTS && cp .peer/smollm2.part-* $PARTS/ && ls -l $PARTS && exit 0
    exit 1
fi
wheels=$(ls .whl/*.whl | grep -v torchao)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $wheels || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"

step() {  # step NAME SECONDS CMD...: run with a time limit, log to $OUT/NAME.log
    local name=$1 limit=$2; shift 2
    echo "=== $name ($(date +%T))"
    timeout "$limit" "$@" 2>&1 | grep -v -E "^linear: |UserWarning|warnings.warn" | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "=== $name rc=$rc" | tee -a "$OUT/$name.log"
}

default_model() {  # /tmp/smollm2.gguf from the carried parts (stage-model's and this call's), checked by sha256
    mkdir -p $PARTS && cp .peer/smollm2.part-* $PARTS/ 2>/dev/null
    cat $PARTS/smollm2.part-* > /tmp/smollm2.gguf
    if [ "$(sha256sum /tmp/smollm2.gguf | cut -d' ' -f1)" != "$(cat .peer/smollm2.sha256 2>/dev/null)" ]; then
        echo "=== default model rc=1: its parts are missing or incomplete (run stage-model first)"
        return 1
    fi
}

[ $# -gt 0 ] || set -- usage
status=0
for group in "$@"; do  # several groups run in turn in one device call
case "$group" in
smoke)
    # Issue 21: every GPU path once, before anything is timed; fails loudly (the last line counts).
    # The small-model paths run beside the 7B-shape engine steps (one GPU, both fit): the whole group
    # then fits one call. Timings printed by these steps are contended; they are checks, not figures.
    # The paths run as two processes side by side: one took 548 s on an H100 (2026-12-06c), most of it
    # compiling on the host, and was cut before its last section; as two, the group took 427 s (2026-12-06d).
    # gemlite's path has a process of its own: on a fresh H100 (2026-12-07) its compiles took 136 s at b1 and
    # 172 s at b8, and beside bf16, int8 and int8-triton it ran past 480 s. On another fresh H100 (2026-12-07g)
    # its b8 compile ran past 480 s, and int4, int4-triton, LoRA and speculation in one process did too
    # (self-draft b4 not reached): speculation has a process of its own, and gemlite's (an extra int4 kernel
    # beside the default ones) the most time the call allows.
    step smoke-paths 480 python3 benchmarks/gpu_smoke.py --only kernels methods --methods bf16 int8 int8-triton \
        > "$OUT/smoke-paths.out" &
    paths=$!
    step smoke-paths-gemlite 540 python3 benchmarks/gpu_smoke.py --only methods --methods int4-gemlite \
        > "$OUT/smoke-paths-gemlite.out" &
    gemlite=$!
    step smoke-paths-more 480 python3 benchmarks/gpu_smoke.py --only methods lora --methods int4 int4-triton \
        > "$OUT/smoke-paths-more.out" &
    more=$!
    step smoke-paths-spec 480 python3 benchmarks/gpu_smoke.py --only speculative > "$OUT/smoke-paths-spec.out" &
    spec=$!
    step smoke-structured 150 python3 benchmarks/structured_bench.py --device cuda --tokenizer .peer/tokenizer.model.v1 \
        --tiny --engine --skip-cpu --runs 1
    step smoke-prefix 120 python3 benchmarks/prefix_bench.py --preset mistral-7b-v0.1 --engine --n-prompts 8 \
        --prefix-len 1024 --max-tokens 8 --runs 1
    step smoke-engine-process 120 python3 benchmarks/serve_load.py --preset mistral-7b-v0.1 --engine-process \
        --concurrency 8 --prompt-len 256 --max-tokens 32 --client-processes 2
    wait $paths $gemlite $more $spec; cat "$OUT"/smoke-paths*.out
    rm -f "$OUT"/smoke-paths*.out
    if [ "$(python3 -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
        step smoke-tp 150 python3 benchmarks/tp_bench.py --tp 2 --batches 1 --new-tokens 32 --runs 1 --no-compile
    fi
    # A failure is reported and the call's status is 1, but later groups still run: leases are short.
    if grep -h -E "^=== .* rc=[1-9]|FAIL" "$OUT"/smoke-*.log; then echo "SMOKE FAILED"; status=1; else echo "SMOKE PASSED"; fi
    ;;
gemv)
    step gemv 420 python3 benchmarks/gemv_bench.py --json "$OUT/gemv.json"
    ;;
gemv-batch)  # int4 against bf16 where a server batches: tinygemm ran 2-3x gemlite's time at M 16-32 (H100)
    step gemv-batch 420 python3 benchmarks/gemv_bench.py --rows 16,32,64 --kernels bf16,int4 --json "$OUT/gemv-batch.json"
    ;;
quant)
    # Ours (quant/triton_mm.py for few rows) and gpt-fast on the same quantized weights, with the limit
    # column (bench --quantize); then ours on torch's kernels (KERNEL=torch).
    # 360 s a method: on a fresh H200 (2026-12-06) 240 s ended before gpt-fast's turn; warm, int4 took 116 s.
    for m in ${METHODS:-int4 int8}; do
        step bench-$m 360 env MISTRAL7B_CUDA_ROWS_KERNEL=${KERNEL:-triton} python3 -m mistral7b.cli bench --no-hf \
            --quantize $m --peer gpt-fast .peer/gpt-fast --sections decode --prefill "" --runs 2 --json "$OUT/bench-$m.json"
    done
    ;;
kernels)
    step decode-attention 150 python3 benchmarks/decode_attention.py --json "$OUT/decode-attention.json"
    step quant-7b 420 python3 benchmarks/quant_bench.py --gpu --methods ${METHODS:-int8} --json "$OUT/quant-7b.json"
    ;;
speed)
    step gpu-check 150 python3 benchmarks/gpu_check.py
    # The peer first, in its own short step: on 2026-12-02 one combined step ran out of time in HF's
    # sections before gpt-fast's turn came.
    step bench-peer 240 python3 -m mistral7b.cli bench --no-hf --peer gpt-fast .peer/gpt-fast --sections decode \
        --prefill "" --runs 2 --json "$OUT/bench-peer.json"
    step bench 280 python3 -m mistral7b.cli bench --prefill 4096,32768 --hf-sections decode \
        --sections decode,context,prefill --long-context 0 --runs 2 --json "$OUT/bench.json"
    ;;
serving)
    step prefix 200 python3 benchmarks/prefix_bench.py --preset mistral-7b-v0.1 --engine --n-prompts 64 \
        --max-tokens 128 --json "$OUT/prefix-engine.json"
    # Issue 14: 64 streams of 512 + 256 over HTTP, the engine as a thread (here) and in its own process
    # (serving-process, a call of its own). Engine.warmup now compiles every power-of-two width up to 64
    # before serving (8 compiles: width 1 twice, then 2 to 64); that start-up has not been timed yet.
    step serve-thread 390 python3 benchmarks/serve_load.py --preset mistral-7b-v0.1 --compile --offline \
        --json "$OUT/serve-thread.json"
    ;;
serving-process)
    step serve-process 540 python3 benchmarks/serve_load.py --preset mistral-7b-v0.1 --compile --engine-process \
        --json "$OUT/serve-process.json"
    ;;
invariant)  # issue 26: bit-identical alone and in batches of 8 and 32 (bf16, int8, int4); decode cost at b1/b8
    step invariant 420 python3 benchmarks/invariant_bench.py --json "$OUT/invariant.json"
    # Issue 22 in the same mode: n-gram speculation gives plain greedy's tokens exactly (a PASS/FAIL line).
    step invariant-spec 150 python3 benchmarks/gpu_smoke.py --only invariant-speculative ;;
profile)  # issue 21: where ours spends the 0.47 ms a b1 step that gpt-fast does not (H100, 2026-12-05d).
    # Alone in a call: 300 s ended in gpt-fast's compile, after ours (H100, 2026-12-05e).
    step profile 540 python3 benchmarks/profile_decode.py --tokens 64 --peer gpt-fast .peer/gpt-fast ;;
tuned)  # decode b1/b8 tok/s without the one-row step's coordinate-descent tuning, then with it (the default)
    # H100, 2026-12-05g (all graphs tuned then): b1 168.2 -> 181.4 tok/s, b8 1,319 -> 1,308.
    step tuned-plain 240 python3 -m mistral7b.cli bench --no-hf --sections decode --prefill "" --runs 2 \
        --no-single-row-tuning --json "$OUT/tuned-plain.json"
    step tuned-cd 330 python3 -m mistral7b.cli bench --no-hf --sections decode --prefill "" --runs 2 \
        --json "$OUT/tuned-cd.json" ;;
profile-tuned)  # ours alone, without then with the one-row step's tuning (gpt-fast's Inductor setting)
    step profile-plain 240 python3 benchmarks/profile_decode.py --tokens 64 --no-single-row-tuning
    step profile-tuned 300 python3 benchmarks/profile_decode.py --tokens 64 ;;
peer)  # bf16 decode, ours at b1/b8 and gpt-fast at b1 (speed's middle step alone; 240 s ended before gpt-fast's)
    step bench-peer 330 python3 -m mistral7b.cli bench --no-hf --peer gpt-fast .peer/gpt-fast --sections decode \
        --prefill "" --runs 2 --json "$OUT/bench-peer.json" ;;
spec)
    # 2026-12-05 on the H200: 85 s to start 32 requests, then about 100 s of compiles a batch size.
    # 300 s ended in b8's verify compile on a fresh H100 (2026-12-07): b1 took 172 s with its compiles.
    step verify-cost 420 python3 benchmarks/verify_cost.py --batch 1 8 --json "$OUT/verify-cost.json" ;;
spec-b32)  # batch 32 alone: where a verify stops paying (SpeculativeConfig.max_batch is measured, not guessed)
    step verify-cost-b32 240 python3 benchmarks/verify_cost.py --batch 32 --json "$OUT/verify-cost-b32.json" ;;
spec-self)  # the whole self-int4 loop at the 7B shape: int4 draft steps, then the bf16 verify, b1 and b8.
    # 360 s ended in b8 (H100, 2026-12-05e, eager drafts at 5.1 tok/s); the drafts now compile too.
    # Backoff off: random weights' int4 copy is never accepted, and this times the loop, not the backoff.
    step spec-self 540 python3 -m mistral7b.cli bench --no-hf --sections decode --prefill "" \
        --speculative self-int4 --no-speculative-backoff --runs 2 --json "$OUT/spec-self.json" ;;
spec-backoff)  # the same at b1 with backoff on (as served): rows whose drafts fail decode plainly; target ~1.0x
    step spec-backoff 400 python3 -m mistral7b.cli bench --no-hf --sections decode --prefill "" --batch 1 \
        --speculative self-int4 --runs 2 --json "$OUT/spec-backoff.json" ;;
spec-real)  # the default model from its parts (stage-model); spec_bench checks speculative output equals plain
    default_model || { status=1; continue; }
    # Compiled (CUDA graphs), as served: the plain engine, n-gram and self-int4 (its int4 draft's steps too).
    # As served (backoff on) and every step speculating (method/raw); 231 s for one of each (H100, 2026-12-05f).
    # TORCH_LOGS: a graph compiled inside a timed prompt (4.31 s against 0.2, 2026-12-05g) names its function
    # ("start tracing F", or a recompile with its reason) just above that prompt's line in the log.
    step spec-real 540 env TORCH_LOGS=recompiles,dynamo python3 benchmarks/spec_bench.py --model /tmp/smollm2.gguf \
        --device cuda --methods "${SPEC_METHODS:-ngram,self-int4}" --backoff both --json "$OUT/spec.json" ;;
spec-real-invariant)  # n-gram in the batch-invariant mode (parts staged as for spec-real): identical 38/38 expected
    default_model || { status=1; continue; }
    step spec-real-invariant 400 python3 benchmarks/spec_bench.py --model /tmp/smollm2.gguf --device cuda \
        --methods ngram --batch-invariant --json "$OUT/spec-invariant.json" ;;
lora)  # compiled: lora_triton's two kernels (default) and its fused kernel side by side, each checked against
    # the eager delta (H100, 2026-12-06d: b8 triton x1.169, fused x1.328; b1 x1.096, x1.210), b8 first;
    # b64 is a group of its own (lora-64), the one-row graphs compile with tuning (longer): a call of its own
    step lora-compiled 560 python3 benchmarks/lora_bench.py --batch 8 1 --compile --delta triton fused \
        --json "$OUT/lora-compiled.json" ;;
lora-reduce)  # the reduce delta, compiled (H100, 2026-12-06b: b8 x1.324, matmul x1.257, triton x1.166)
    step lora-reduce 400 python3 benchmarks/lora_bench.py --batch 8 --compile --delta reduce --json "$OUT/lora-reduce.json" ;;
lora-eager)  # H100, 2026-12-05g: b1 x1.37, b8 x2.17, b64 x2.36 (matmul: rows grouped by slot, a host sync)
    step lora-eager 150 python3 benchmarks/lora_bench.py --batch 1 8 64 --delta matmul triton fused --json "$OUT/lora-eager.json" ;;
lora-64)  # the default delta (triton: at most 64 rows) at b64; its compiles are long
    step lora-64 540 python3 benchmarks/lora_bench.py --batch 64 --compile --delta triton --json "$OUT/lora-64.json" ;;
tiles)
    step tiles 300 python3 benchmarks/invariant_tiles.py --json "$OUT/tiles.json" ;;
structured)
    step structured 200 python3 benchmarks/structured_bench.py --device cuda --tokenizer .peer/tokenizer.model.v1 \
        --engine --skip-cpu --json "$OUT/structured.json"
    step long 150 python3 -m mistral7b.cli bench --no-hf --sections long --prefill "" --json "$OUT/long.json"
    ;;
*)
    echo "usage: $0 GROUP... (smoke gemv quant kernels speed peer profile profile-tuned serving serving-process structured invariant spec spec-self spec-real lora lora-reduce lora-64 lora-eager tiles; stage-model alone)" >&2
    exit 2 ;;
esac
done
exit $status
