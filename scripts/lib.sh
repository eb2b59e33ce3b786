# Shared helpers for the project's shell scripts. Source it; do not run it.
# shellcheck shell=bash

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# build/ holds stable names (symlinks) for the current outputs; the outputs themselves live in
# a cache keyed by the hash of their inputs, outside the checkout, so fresh clones (CI) reuse them.
BUILD_DIR="${VMM_BUILD_DIR:-$REPO_ROOT/build}"
CACHE_DIR="${VMM_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/vmm-lab}"
export REPO_ROOT BUILD_DIR CACHE_DIR

# One progress line per long step, on stderr, with the time since the top script started.
STEP_T0="${STEP_T0:-$(date +%s)}"
export STEP_T0
step() { printf '==> [%4ss] %s\n' "$(( $(date +%s) - STEP_T0 ))" "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# Hash of a recipe string plus the given files' contents: the cache key of a build output.
# Bump the RECIPE string of a script when a change to it changes what it produces.
inputs_hash() {
    local extra="$1"; shift
    { printf '%s\n' "$extra"; cat "$@"; } | sha256sum | cut -c1-16
}

# Version of an installed Debian package, or empty.
pkg_version() { dpkg-query -W -f='${Version}' "$1" 2>/dev/null || true; }

# Serializes builds of one cache entry kind across concurrent callers (parallel tests).
lock_cache() {
    mkdir -p "$CACHE_DIR"
    exec 9>"$CACHE_DIR/.lock-$1"
    flock 9
}

# run_step NAME CMD ARGS..: runs a step of a script that goes on past a failed step; a
# failure is remembered (STEPS_FAILED) and said at once, and steps_summary ends the script.
STEPS_FAILED=()
run_step() {
    local name=$1 rc=0
    shift
    "$@" || rc=$?
    if [ "$rc" != 0 ]; then
        STEPS_FAILED+=("$name (exit $rc)")
        printf '%s: step failed: %s (exit %s); going on with the next one\n' \
            "$(basename "$0")" "$name" "$rc" >&2
    fi
    return 0
}

# steps_summary WHAT HINT: one line per failed step and exit 1, or a line that all passed.
steps_summary() {
    local what=$1 hint=$2 f
    if [ "${#STEPS_FAILED[@]}" -gt 0 ]; then
        step "$what finished with ${#STEPS_FAILED[@]} failed step(s)"
        for f in "${STEPS_FAILED[@]}"; do
            printf '%s: FAILED: %s\n' "$what" "$f" >&2
        done
        printf '%s: %s\n' "$what" "$hint" >&2
        exit 1
    fi
    step "$what finished: every step passed"
}
