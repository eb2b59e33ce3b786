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
