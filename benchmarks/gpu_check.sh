#!/usr/bin/env bash
# GPU check: the CUDA tests plus a small offloaded generation on the demo model.
# Run on a machine with a CUDA GPU from the repository root; finishes in a few minutes.
set -uo pipefail
status=0  # every section runs; the script fails at the end if any did
cd "$(dirname "$0")/.."

PY="${PYTHON:-python3}"
if ! "$PY" -c "import klotski_tier" 2>/dev/null; then
  # Online: the usual editable install. Offline (an image that already holds torch and the test
  # packages): build from the checkout with the setuptools that is there.
  "$PY" -m pip install -q -e ".[test]" \
    || "$PY" -m pip install -q --no-deps --no-index --no-build-isolation -e .
fi
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('GPU:', torch.cuda.get_device_name(), '| torch', torch.__version__)"
"$PY" - <<'CPU'
import re
flags = open("/proc/cpuinfo").read()
model = re.search(r"model name\s*:\s*(.*)", flags)
isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if re.search(rf"\b{f}\b", flags)]
print("CPU:", model.group(1) if model else "unknown", "|", " ".join(isa))
CPU

echo "== CUDA tests"
"$PY" -m pytest -m cuda -q -rf -p no:cacheprovider tests || status=1

# bf16 kernels round differently per CPU ISA (AVX2, AVX-512 BF16, AMX): the numerics rule must hold here too.
echo "== bf16/fp32 exactness on this machine's CPU"
"$PY" -m pytest -q -rf -p no:cacheprovider tests/test_numerics.py tests/core/runtime/test_exactness.py || status=1

echo "== offloaded generation on the demo model (device budget 128MiB)"
export KLOTSKI_TIER_CACHE="${KLOTSKI_TIER_CACHE:-$(mktemp -d)}"
klotski-tier run --device cuda --device-memory 128MiB --batches 4 --batch-size 8 \
  --max-new-tokens 16 --json > /tmp/klotski_gpu_check.json || exit 1
"$PY" - <<'PY'
import json
out = json.load(open("/tmp/klotski_gpu_check.json"))
m = out["metrics"]
budgets = (out.get("plan") or {}).get("budgets") or {}
print("budgets:", {k: v for k, v in budgets.items() if not isinstance(v, dict)})
print(f"prefill {m['prefill_tokens_per_s']:.1f} tokens/s, decode {m['decode_tokens_per_s']:.2f} tokens/s")
print(f"compute waited for I/O {m['io_wait_s']:.2f} s of {m['wall_s']:.2f} s wall "
      f"({m['io_wait_s'] / m['wall_s']:.0%}); expert hit rate {m['expert_hit_rate']:.0%}")
PY
exit $status
