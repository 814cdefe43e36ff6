#!/usr/bin/env bash
# The paper's Tab. 9 on a CUDA machine: denoiser seconds per clip at batch 1 (25 DPM-Solver++ steps with
# CFG) for T, S, B and L against the Diff-Foley-size U-Net, and peak GPU memory per size, under bf16
# autocast as the paper ran; then a table beside the paper's numbers.
#
#   benchmarks/gpu.sh [OUT_JSON]          (default benchmarks/results/speed-gpu.json)
#
# Needs a python with CUDA torch. The benchmark imports only mdsgen.model (network, diffusion) and diffusers;
# diffusers is installed when missing: from $MDSGEN_WHEELS (a folder of wheels, for offline machines:
# `pip download diffusers==0.42.1 -d wheels`) or else from the package index.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-benchmarks/results/speed-gpu.json}"
PY="${PYTHON:-python}"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device visible to torch')"
if ! "$PY" -c "import diffusers" 2>/dev/null; then
  if [ -n "${MDSGEN_WHEELS:-}" ]; then
    "$PY" -m pip install -q --no-index --find-links "$MDSGEN_WHEELS" diffusers==0.42.1
  else
    "$PY" -m pip install -q diffusers==0.42.1
  fi
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
"$PY" benchmarks/speed.py --device cuda --precision bf16 --sizes T S B L --repeats 10 --unet-steps 25 \
  --only denoiser memory --json "$out"
"$PY" - "$out" <<'PY'
import json, sys

r = json.load(open(sys.argv[1]))
paper = {"T": (0.01, 1406), "S": (0.02, 1508), "B": (0.05, 2132), "unet": (0.36, 5228)}  # Tab. 9, A100
print(f"\n{r['machine']}, {r['precision']}, torch {r['torch']}, commit {r['commit']}, {r['date']}")
print("| model | params | s/clip here | s/clip paper (A100) | x faster than U-Net here | paper | "
      "GPU MB here (torch peak) | GPU MB paper |")
print("|---|---|---|---|---|---|---|---|")
unet = r["denoiser"]["unet"]
for name in ("T", "S", "B", "L", "unet"):
    d = r["denoiser"].get(name)
    if d is None:
        continue
    p_s, p_mb = paper.get(name, (None, None))
    mem = r["memory"].get(name, {}).get("gpu_allocated_mb")
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    print(f"| {name} | {d['params'] / 1e6:.1f}M | {d['s_per_clip']:.4f} | {fmt(p_s, '.2f')} | "
          f"{unet['s_per_clip'] / d['s_per_clip']:.1f} | {fmt(p_s and 0.36 / p_s, '.0f')} | {fmt(mem, '.0f')} | "
          f"{fmt(p_mb, '.0f')} |")
print("The paper's memory is per process as nvidia-smi shows it (CUDA context included); torch's peak "
      "allocation here leaves the context out.")
PY
