#!/usr/bin/env bash
# Quick start, command 2: the whole test suite: format and lint checks, unit tests, and the
# integration tests that boot real guests (inside the lab VM on hosts without hardware KVM).
# With CI=true a test that has to skip for a missing prerequisite fails instead.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
bash "$REPO_ROOT/scripts/setup.sh"
bash "$REPO_ROOT/guest-kernel/build.sh"
bash "$REPO_ROOT/tests/lab/build-lab.sh"
cd "$REPO_ROOT"
step "cargo fmt --check"
cargo fmt --all -- --check
step "cargo clippy --all-targets -- -D warnings"
cargo clippy --quiet --workspace --all-targets -- -D warnings
step "cargo build --workspace (the harness runs the vmm binary)"
cargo build --quiet --workspace
# The fuzz crate is a workspace of its own: it must still build, from its committed lock
# file, against today's code (scripts/fuzz.sh builds it the same way on nightly).
step "cargo check --locked of the fuzz targets (fuzz/Cargo.lock current)"
cargo check --quiet --locked --manifest-path fuzz/Cargo.toml --bins
step "cargo nextest run --workspace (guest tests boot the lab VM: a few minutes)"
# A guest that hangs is reported with KVM's last timer and interrupt events (docs/lab.md).
export VMM_LAB_KVM_TRACE="${VMM_LAB_KVM_TRACE:-1}"
cargo nextest run --workspace --no-fail-fast "$@"
