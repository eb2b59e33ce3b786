#!/usr/bin/env bash
# Fuzzing (docs/security.md, "Fuzzing"): runs the cargo-fuzz targets of fuzz/ on nightly
# Rust with AddressSanitizer, debug assertions and overflow checks, and folds what a run
# found into the committed corpora that `cargo test -p fuzz-replay` replays on stable.
#
#   scripts/fuzz.sh list                       the targets
#   scripts/fuzz.sh build                      build every target
#   scripts/fuzz.sh run TARGET [SECONDS] [-- LIBFUZZER_ARGS...]
#                                              fuzz TARGET for SECONDS (default 120); new
#                                              inputs go to fuzz/work/TARGET, crashes to
#                                              fuzz/artifacts/TARGET
#   scripts/fuzz.sh all [SECONDS]              every target in turn, SECONDS each
#   scripts/fuzz.sh merge TARGET               minimize fuzz/corpus/TARGET and fuzz/work/TARGET
#                                              into fuzz/corpus/TARGET (libFuzzer -merge=1)
#   scripts/fuzz.sh replay                     the replay test (stable): every corpus input
#   scripts/fuzz.sh lock                       rewrite fuzz/Cargo.lock from the workspace's
#                                              (same versions), with the fuzz crates' own
#
# FUZZ_SANITIZER=none|address (default address), FUZZ_JOBS=N (parallel fuzzing jobs for
# `run`, default 1). cargo-fuzz is installed if missing.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$REPO_ROOT"

TOOLCHAIN="${FUZZ_TOOLCHAIN:-nightly}"
SANITIZER="${FUZZ_SANITIZER:-address}"
JOBS="${FUZZ_JOBS:-1}"
TARGETS=(blk_request blk_queue mmio config api plugin_boundary encrypt_open store_open net_tx net_worker)

need_cargo_fuzz() {
    rustup toolchain list | grep -q "^$TOOLCHAIN" || die "no $TOOLCHAIN toolchain: rustup toolchain install $TOOLCHAIN"
    if ! cargo "+$TOOLCHAIN" fuzz --version >/dev/null 2>&1; then
        step "installing cargo-fuzz"
        cargo install --locked cargo-fuzz
    fi
}

known() {
    local t
    for t in "${TARGETS[@]}"; do [[ "$t" == "$1" ]] && return 0; done
    die "no fuzz target '$1' (scripts/fuzz.sh list)"
}

# The fuzz crate builds from its committed lock file: a stale one (the workspace's
# dependencies changed) is refused here rather than rewritten under the fuzzer.
need_current_lock() {
    cargo metadata --locked --format-version 1 --manifest-path fuzz/Cargo.toml >/dev/null 2>&1 ||
        die "fuzz/Cargo.lock is stale: scripts/fuzz.sh lock, then commit it"
}

# Release mode (-O) with debug assertions and overflow checks (-a), ASan unless told.
fuzz() {
    need_current_lock
    local cmd="$1"; shift
    cargo "+$TOOLCHAIN" fuzz "$cmd" -O -a -s "$SANITIZER" "$@"
}

case "${1:-}" in
list)
    printf '%s\n' "${TARGETS[@]}"
    ;;
build)
    need_cargo_fuzz
    step "cargo fuzz build (sanitizer: $SANITIZER)"
    fuzz build
    ;;
run)
    target="${2:?usage: scripts/fuzz.sh run TARGET [SECONDS] [-- ARGS]}"
    known "$target"
    seconds="${3:-120}"
    shift $(( $# >= 3 ? 3 : $# ))
    [[ "${1:-}" == "--" ]] && shift
    need_cargo_fuzz
    mkdir -p "fuzz/work/$target" "fuzz/corpus/$target"
    step "fuzzing $target for $seconds s (sanitizer: $SANITIZER, jobs: $JOBS)"
    # The first corpus directory receives new inputs: the working one, not the committed one.
    jobs_args=()
    if (( JOBS > 1 )); then jobs_args=(-jobs="$JOBS" -workers="$JOBS"); fi
    fuzz run "$target" "fuzz/work/$target" "fuzz/corpus/$target" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=4096 -print_final_stats=1 \
        "${jobs_args[@]}" "$@"
    ;;
all)
    seconds="${2:-120}"
    for t in "${TARGETS[@]}"; do
        "$0" run "$t" "$seconds"
    done
    ;;
merge)
    target="${2:?usage: scripts/fuzz.sh merge TARGET}"
    known "$target"
    need_cargo_fuzz
    mkdir -p "fuzz/work/$target" "fuzz/corpus/$target"
    merged="$(mktemp -d "${TMPDIR:-/tmp}/fuzz-merge.XXXXXX")"
    step "minimizing fuzz/corpus/$target + fuzz/work/$target"
    fuzz run "$target" "$merged" "fuzz/corpus/$target" "fuzz/work/$target" -- -set_cover_merge=1 -use_counters=0 -timeout=10
    # Inputs of fixed bugs (found-*) stay, by name, whatever they cover.
    for f in "fuzz/corpus/$target"/found-*; do
        [[ -e "$f" ]] || continue
        rm -f "$merged/$(sha1sum "$f" | cut -d' ' -f1)"
        cp "$f" "$merged/"
    done
    rm -rf "fuzz/corpus/$target"
    mkdir -p "fuzz/corpus/$target"
    cp "$merged"/* "fuzz/corpus/$target/"
    rm -rf "$merged"
    step "fuzz/corpus/$target: $(find "fuzz/corpus/$target" -type f | wc -l) inputs, $(du -sh "fuzz/corpus/$target" | cut -f1)"
    ;;
replay)
    cargo test -p fuzz-replay
    ;;
lock)
    cp Cargo.lock fuzz/Cargo.lock
    cargo metadata --format-version 1 --manifest-path fuzz/Cargo.toml >/dev/null
    need_current_lock
    step "fuzz/Cargo.lock: the workspace's versions, and the fuzz crates'"
    ;;
*)
    sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac
