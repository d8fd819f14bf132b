#!/usr/bin/env bash
# Runs every cargo-fuzz target of fuzz/ for SECONDS_PER_TARGET seconds each, one at a time.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]     (default: 60 s, all targets)
#
# Corpora live in fuzz/corpus/<target> (git-ignored) and start from the small seeds in
# fuzz/seeds/<target>. Crashes land in fuzz/artifacts/<target>; the script exits non-zero if
# any target found one. Extra libFuzzer flags can be passed in FUZZ_FLAGS (e.g. "-jobs=2").
set -euo pipefail

secs="${1:-60}"
shift || true
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
fuzz_dir="$root/fuzz"

if ! [[ "$secs" =~ ^[0-9]+$ ]]; then
    echo "usage: $0 [SECONDS_PER_TARGET] [TARGET...]" >&2
    exit 2
fi

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "cargo-fuzz not found: installing it" >&2
    cargo install cargo-fuzz --locked
fi

# cargo-fuzz needs nightly (sanitizer flags). Prefer a nightly toolchain; without one, let the
# stable compiler accept the nightly flags.
if cargo +nightly --version >/dev/null 2>&1; then
    fuzz=(cargo +nightly fuzz)
else
    echo "no nightly toolchain: using RUSTC_BOOTSTRAP=1 with the default one" >&2
    export RUSTC_BOOTSTRAP=1
    fuzz=(cargo fuzz)
fi

cd "$fuzz_dir"
if [ "$#" -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <("${fuzz[@]}" list)
fi

failed=()
for t in "${targets[@]}"; do
    corpus="corpus/$t"
    mkdir -p "$corpus"
    if [ -d "seeds/$t" ]; then
        cp -n seeds/"$t"/* "$corpus"/ 2>/dev/null || true
    fi
    echo "=== $t: ${secs}s ==="
    # shellcheck disable=SC2086
    if ! "${fuzz[@]}" run "$t" "$corpus" -- -max_total_time="$secs" -print_final_stats=1 ${FUZZ_FLAGS:-}; then
        failed+=("$t")
    fi
done

if [ "${#failed[@]}" -gt 0 ]; then
    echo "crashes in: ${failed[*]} (see fuzz/artifacts/)" >&2
    exit 1
fi
echo "all targets ran ${secs}s without a crash"
