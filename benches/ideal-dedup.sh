#!/usr/bin/env bash
# The best any 4 KiB-block deduplication can do on the given files, taken together: blocks,
# distinct non-zero blocks, all-zero blocks, and the ratio of blocks to what must be stored.
# Each file is cut into 4 KiB blocks from its start (as dedup sees data written at a 4 KiB-
# aligned offset); a last partial block is padded with zeroes, as a disk's block is.
# Usage: benches/ideal-dedup.sh FILE...
set -euo pipefail
[ $# -gt 0 ] || { echo "usage: $0 FILE..." >&2; exit 2; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
zero=$(head -c 4096 /dev/zero | sha256sum | cut -d' ' -f1)
n=0
for f in "$@"; do
    n=$((n + 1))
    mkdir "$tmp/$n"
    split -b 4096 -a 8 "$f" "$tmp/$n/b"
    last=$(ls "$tmp/$n" | tail -n 1)
    [ -z "$last" ] || truncate -s 4096 "$tmp/$n/$last"
done
find "$tmp" -type f -print0 | xargs -0 -r sha256sum | cut -d' ' -f1 | sort | uniq -c |
    awk -v zero="$zero" '
    { blocks += $1; if ($2 == zero) zeros += $1; else distinct++ }
    END {
        stored = distinct > 0 ? distinct : 1
        printf "blocks %d, distinct non-zero %d, zero %d, ideal dedup ratio x%.2f\n",
            blocks, distinct, zeros, blocks / stored
    }'
