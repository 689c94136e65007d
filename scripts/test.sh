#!/usr/bin/env bash
# The project's test command (README "Quick start"; .ci/run runs it).
# Formatting and lints first, because they are the cheapest to fail, then
# every test of the workspace: host unit and property tests, and the
# integration tests in tests/ that boot the guest under KVM.
set -euo pipefail
cd "$(dirname "$0")/.."

# Each phase says how long the one before it took (docs/testing.md
# quotes the total from a fresh clone).
start=$SECONDS
last=$SECONDS
phase() {
    echo "== $1 (previous phase: $((SECONDS - last)) s)"
    last=$SECONDS
}

phase "cargo fmt --check"
cargo fmt --all -- --check
(cd guest/kernel && cargo fmt -- --check)

phase "module cycles in vmm/src"
python3 scripts/modcycles.py vmm/src

phase "cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
# The guest kernel is not a workspace member (it needs its own flags);
# clippy checks it for the host target (no linking needed), in the target
# directory of the guest build (vmm/build.rs), whose proc macros (ufmt's)
# it reuses.
(cd guest/kernel && CARGO_TARGET_DIR=../../target/guest-build \
    cargo clippy --release --target x86_64-unknown-linux-gnu -- -D warnings)

phase "cargo test --workspace"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# One closing line over all test binaries (cargo prints one per binary, and
# the last is often an empty doc-test run).
read -r passed failed < <(awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed;?$/) p += $(i-1); if ($i ~ /^failed;?$/) f += $(i-1) } }
     END { printf "%d %d\n", p, f }' "$log")
echo "cargo test: $passed passed, $failed failed"

# The integration tests run the in-guest suites at the default folio size
# (anon=4k); the other sizes change every fault path, so the suites run
# again at each, in every mode (a few seconds each).
phase "in-guest suites at anon=16k, 64k, 2m"
for anon in 16k 64k 2m; do
    if ! out=$(target/debug/vmm test --cmdline "anon=$anon" 2>&1); then
        status=1
        echo "$out"
    fi
    last_line=$(echo "$out" | tail -n 1)
    echo "anon=$anon: $last_line"
    # `vmm test` closes with "N passed, M failed": add it to the total.
    if [[ $last_line =~ ^([0-9]+)\ passed,\ ([0-9]+)\ failed ]]; then
        passed=$((passed + BASH_REMATCH[1]))
        failed=$((failed + BASH_REMATCH[2]))
    else
        failed=$((failed + 1))
    fi
done
echo "test.sh took $((SECONDS - start)) s (tests: $((SECONDS - last)) s)"
# One closing line over everything above (CI reads the last one).
echo "total: $passed passed, $failed failed"
exit "$status"
