#!/usr/bin/env bash
# Where the lab's CPUs go while one fio job runs in a guest: boots the guest under each
# backend in turn inside one lab session, samples every CPU of the lab with `perf record -a`
# over a window inside the job, and prints, per backend, the CPU by thread and the hottest
# kernel and user symbols (a plugin's named from its file in target/release: vmm runs a
# copy in a memfd, which perf cannot read). Reports are made on the host (the lab's
# /proc/kallsyms is saved for the kernel's symbols); the data stays in build/profile/.
#
# Usage: benches/lab-profile.sh [--runtime S] [--window S] [--report] JOB BACKEND...
#   --report: print the reports of the last run's data again, without the lab
#   BACKEND: vmm, qemu, qemu-io_uring, or vmm:FILE (vmm with FILE's interceptors on the
#   data disk, labelled vmm+STEM)
#   e.g. benches/lab-profile.sh seqwrite-128k-qd8 vmm qemu qemu-io_uring
#        benches/lab-profile.sh randwrite-4k-qd32 vmm vmm:configs/interceptors/encrypt.toml
# vmm runs with `coalesce_us = 2000` on its data disk (as docs/benchmarks.md's sessions);
# VMM_PROFILE_BLOCK_OPTION overrides it (empty: none). Needs target/release/{lab,vmm}
# (`cargo build --release --workspace`) and perf (scripts/setup.sh installs linux-perf).
set -euo pipefail
source "$(dirname "$0")/../scripts/lib.sh"

runtime=40 window=12
while [ $# -gt 0 ]; do
    case "$1" in
        --runtime) runtime="$2"; shift 2 ;;
        --window) window="$2"; shift 2 ;;
        --inside) inside=1; shift ;;
        --report) report_only=1; shift ;;
        *) break ;;
    esac
done
[ $# -ge 2 ] || die "usage: $0 [--runtime S] [--window S] [--report] JOB BACKEND..."
job="$1"; shift
out="$BUILD_DIR/profile"
lab="$REPO_ROOT/target/release/lab"
option="${VMM_PROFILE_BLOCK_OPTION-coalesce_us=2000}"
# vmm:configs/interceptors/encrypt.toml -> vmm+encrypt
label() { case "$1" in vmm:*) f="${1#vmm:}"; f="${f##*/}"; echo "vmm+${f%.toml}" ;; *) echo "$1" ;; esac; }

if [ -z "${inside:-}" ]; then
    command -v perf >/dev/null || die "perf not found (scripts/setup.sh installs linux-perf)"
    [ -x "$lab" ] && [ -x "$REPO_ROOT/target/release/vmm" ] ||
        die "target/release/lab and vmm are not built (cargo build --release --workspace)"
    mkdir -p "$out"
    # Interceptor files become absolute: the lab's command need not start where we are.
    args=()
    for be in "$@"; do
        case "$be" in
            vmm:*) f="${be#vmm:}"; [ -f "$f" ] || die "no such file: $f"; args+=("vmm:$(realpath "$f")") ;;
            vmm|qemu|qemu-io_uring) args+=("$be") ;;
            *) die "unknown backend $be (vmm, qemu, qemu-io_uring, vmm:FILE)" ;;
        esac
    done
    set -- "${args[@]}"
    # The lab VM runs this same script on the host's files; samples start once the guest
    # has booted and fio has ramped (a boot in the lab takes 6-17 s).
    [ "$runtime" -ge $((window + 25)) ] || die "--runtime must be at least --window + 25 s"
    [ -n "${report_only:-}" ] ||
        "$lab" exec -- env VMM_PROFILE_BLOCK_OPTION="$option" \
            bash "$REPO_ROOT/benches/lab-profile.sh" --inside --runtime "$runtime" \
            --window "$window" "$job" "$@"
    for be in "$@"; do
        be="$(label "$be")"
        data="$out/$be-$job.data"
        echo
        echo "== $be, $job: fio $(python3 -c 'import json,sys; r=json.load(open(sys.argv[1]))["fio"]; print(", ".join("%s %.0f IOPS" % (x["dir"], x["iops"]) for x in r))' "$out/$be-$job.json")"
        echo "-- CPU by thread (percent of all the lab's CPUs; swapper: idle)"
        # perf report's comm view drops samples taken while a vCPU ran the guest (perf
        # records them as guest samples): count host samples by thread, the rest is guest.
        total="$(perf report -i "$data" --stats 2>/dev/null | awk '/SAMPLE events:/ {print $3; exit}')"
        perf script -i "$data" --kallsyms="$out/kallsyms" -F comm 2>/dev/null |
            python3 -c '
import collections, sys
total = int(sys.argv[1])
counts = collections.Counter(line.strip() for line in sys.stdin if line.strip())
rows = counts.most_common(7)
rows.append(("(vCPUs in guest mode)", total - sum(counts.values())))
for comm, n in sorted(rows, key=lambda r: -r[1]):
    print("    %6.2f%%  %s" % (100.0 * n / max(total, 1), comm))
' "$total" || true
        echo "-- hottest symbols outside idle"
        perf report -i "$data" --kallsyms="$out/kallsyms" --sort comm,dso,sym --stdio -t '|' 2>/dev/null |
            python3 "$REPO_ROOT/benches/profile/plugin-symbols.py" "$REPO_ROOT/target/release" 15
    done
    exit 0
fi

# Inside the lab: the host's root is mounted and chrooted into, so the paths are the same.
cat /proc/kallsyms > "$out/kallsyms"
for spec in "$@"; do
    be="$(label "$spec")"
    extra=()
    case "$spec" in
        vmm:*) extra=(--interceptors "${spec#vmm:}"); spec=vmm ;;
    esac
    [ "$spec" = vmm ] && [ -n "$option" ] && extra+=(--block-option "$option")
    "$lab" guest --backend "$spec" --task "fio=$job" --fio-runtime "$runtime" "${extra[@]}" \
        --json "$out/$be-$job.json" > "$out/$be-$job.log" 2>&1 &
    guest=$!
    sleep 24
    perf record -a -F 250 -o "$out/$be-$job.data" -- sleep "$window" > "$out/$be-$job.perf.log" 2>&1
    wait "$guest" || { echo "$be: the guest failed (see $out/$be-$job.log)"; exit 1; }
done
