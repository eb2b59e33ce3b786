#!/usr/bin/env python3
"""Names the hottest symbols of a `perf report --sort comm,dso,sym --stdio -t '|'` on stdin, the
plugins' included: vmm loads a plugin from a sealed memfd copy, which perf shows as
`memfd:vmm-plugin:NAME (deleted)` with bare file offsets. Those offsets are looked up in
NAME under the directory given (target/release), through its program headers, with addr2line.
Prints the first N rows outside the idle task, plugin rows with their function names."""
import re
import subprocess
import sys
from pathlib import Path

SYM = re.compile(r"^\[(.)\]\s+(.*)$")
MEMFD = re.compile(r"^memfd:vmm-plugin:(\S+?)(?: \(deleted\))?$")


def segments(lib):
    """(file offset, size, vaddr) of each executable PT_LOAD of `lib`."""
    out = subprocess.run(["readelf", "-lW", str(lib)], capture_output=True, text=True).stdout
    segs = []
    for line in out.splitlines():
        f = line.split()
        if f and f[0] == "LOAD" and "E" in f[6:-1]:
            segs.append((int(f[1], 16), int(f[4], 16), int(f[2], 16)))
    return segs


def names(lib, offsets):
    """Function names for file offsets in `lib` (hex of the offset where none is found)."""
    segs = segments(lib)
    vaddrs = []
    for off in offsets:
        v = next((va + off - fo for fo, size, va in segs if fo <= off < fo + size), None)
        vaddrs.append(v)
    asked = [hex(v) for v in vaddrs if v is not None]
    out = subprocess.run(
        ["addr2line", "-f", "-C", "-e", str(lib), *asked], capture_output=True, text=True
    ).stdout.splitlines()[0::2]
    found = iter(out)
    return [next(found, hex(o)) if v is not None else hex(o) for o, v in zip(offsets, vaddrs)]


def main():
    libdir, limit = Path(sys.argv[1]), int(sys.argv[2])
    rows = []
    for line in sys.stdin:
        # `pct%|comm|dso|[k] sym`: a comm may hold spaces (QEMU's `CPU 0/KVM`).
        f = [x.strip() for x in line.rstrip("\n").split("|")]
        if line.startswith("#") or len(f) != 4 or not f[0].endswith("%"):
            continue
        m = SYM.match(f[3])
        if m and f[1] != "swapper":
            rows.append([f[0].rstrip("%"), f[1], f[2], m.group(1), m.group(2)])
    wanted = {}
    for r in rows:
        m = MEMFD.match(r[2])
        if m and r[4].startswith("0x"):
            wanted.setdefault(m.group(1), set()).add(int(r[4], 16))
    resolved = {}
    for lib, offs in wanted.items():
        path = libdir / lib
        if not path.exists():
            continue
        offs = sorted(offs)
        resolved.update({(lib, o): n for o, n in zip(offs, names(path, offs))})
    merged = {}
    for pct, comm, dso, kind, sym in rows:
        m = MEMFD.match(dso)
        if m:
            dso = m.group(1)
            if sym.startswith("0x"):
                sym = resolved.get((dso, int(sym, 16)), sym)
        key = (comm, dso, kind, sym)
        merged[key] = merged.get(key, 0.0) + float(pct)
    for (comm, dso, kind, sym), pct in sorted(merged.items(), key=lambda kv: -kv[1])[:limit]:
        print(f"    {pct:6.2f}%  {comm:<16} [{kind}] {sym[:90]}  ({dso})")


if __name__ == "__main__":
    main()
