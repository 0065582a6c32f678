#!/usr/bin/env bash
# Runs every fuzz target for a short while (MIYU_FUZZ_SECONDS, 15 by default): CI's check that
# no decoder crashes on what a brief fuzzing run finds. Longer runs: see README.md here.
# Needs a nightly toolchain and cargo-fuzz, and installs them if they are missing.
set -euo pipefail
cd "$(dirname "$0")"
seconds="${MIYU_FUZZ_SECONDS:-15}"
rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
cargo +nightly fuzz build
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
for target in $(cargo +nightly fuzz list); do
  # A crash makes libFuzzer exit non-zero and leaves the input in artifacts/TARGET/.
  if ! cargo +nightly fuzz run "$target" -- -max_total_time="$seconds" >"$log" 2>&1; then
    tail -n 60 "$log"
    echo "fuzz target $target failed; the input is in fuzz/artifacts/$target/" >&2
    exit 1
  fi
  echo "$target: $(grep -E '^Done' "$log" || echo 'ran')"
done
