#!/usr/bin/env bash
# Run the full EPT-vs-shadow comparison and write the report files to a
# folder: report.txt (the table), report.json, report.svg, and the host
# probe (info.txt, info.json).
#   scripts/bench.sh [OUT_DIR] [extra vmm bench options...]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-bench-report}"
shift || true
mkdir -p "$out"
cargo build --release --quiet
./target/release/vmm info > "$out/info.txt"
./target/release/vmm info --json > "$out/info.json"
./target/release/vmm bench --mmu all --out "$out" "$@" | tee "$out/report.txt"
echo "wrote $out/report.txt, report.json, report.svg, info.txt, info.json"
