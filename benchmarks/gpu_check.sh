#!/usr/bin/env bash
# GPU check: the CUDA tests plus a small offloaded generation on the demo model.
# Run on a machine with a CUDA GPU from the repository root; finishes in a few minutes.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! python -c "import klotski_tier" 2>/dev/null; then
  python -m pip install -q -e ".[test]"
fi
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('GPU:', torch.cuda.get_device_name())"

echo "== CUDA tests"
python -m pytest -m cuda -q tests

echo "== offloaded generation on the demo model (device budget 128MiB)"
export KLOTSKI_TIER_CACHE="${KLOTSKI_TIER_CACHE:-$(mktemp -d)}"
klotski-tier run --device cuda --device-memory 128MiB --batches 4 --batch-size 8 \
  --max-new-tokens 16 --json > /tmp/klotski_gpu_check.json
python - <<'PY'
import json
m = json.load(open("/tmp/klotski_gpu_check.json"))["metrics"]
print(f"prefill {m['prefill_tokens_per_s']:.1f} tokens/s, decode {m['decode_tokens_per_s']:.2f} tokens/s")
print(f"compute waited for I/O {m['io_wait_s']:.2f} s of {m['wall_s']:.2f} s wall "
      f"({m['io_wait_s'] / m['wall_s']:.0%}); expert hit rate {m['expert_hit_rate']:.0%}")
PY
