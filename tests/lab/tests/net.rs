//! virtio-net end to end: a real guest under vmm on real KVM, its card on a tap in the lab
//! VM. The guest pings the tap's side, sends it 64 MiB over TCP, then receives 64 MiB
//! from it; each side's sha256 of what it got must be the other's of what it sent.

mod common;

use common::{guest_run, output};

/// Values of `key=` words on the console lines that carry `marker`.
fn field(text: &str, marker: &str, key: &str) -> Option<String> {
    text.lines().filter(|l| l.contains(marker)).find_map(|l| {
        l.split_whitespace()
            .find_map(|w| w.strip_prefix(key).map(str::to_string))
    })
}

#[test]
fn a_guest_pings_and_moves_64_mib_each_way_over_a_tap() {
    let host = "busybox nc -l -p 5000 -e sh -c 'cat > /tmp/netrx'; \
        echo rx sha256=$(sha256sum < /tmp/netrx | cut -d' ' -f1) bytes=$(stat -c %s /tmp/netrx); \
        head -c 67108864 /dev/urandom > /tmp/nettx; \
        echo tx sha256=$(sha256sum < /tmp/nettx | cut -d' ' -f1) bytes=$(stat -c %s /tmp/nettx); \
        n=0; until busybox nc 10.0.0.2 5001 < /tmp/nettx; do n=$((n+1)); [ $n -lt 60 ] || break; sleep 0.5; done; \
        rm -f /tmp/netrx /tmp/nettx";
    let Some((out, report)) = guest_run(
        "net-transfer",
        &[
            "--backend",
            "vmm",
            "--net-tap",
            "vmtap0",
            "--net-host-ip",
            "10.0.0.1/24",
            "--net-host-cmd",
            host,
            "--task",
            "net.ip=10.0.0.2/24 ping=10.0.0.1 netsend=10.0.0.1:5000,64 netrecv=5001",
            "--timeout",
            "600",
        ],
    ) else {
        return;
    };
    let text = output(&out);
    assert!(out.status.success(), "the guest run failed");
    assert!(
        text.contains("@@GUEST@@ ping addr=10.0.0.1 ok replies=5"),
        "ping"
    );
    let net_host = report["net_host"].as_str().unwrap_or_default().to_string();
    // Guest to host.
    let sent = field(&text, "@@GUEST@@ netsend", "sha256=").expect("the guest's netsend line");
    let got = field(&net_host, "rx ", "sha256=").expect("the host's rx line");
    assert_eq!(sent, got, "what the host received is what the guest sent");
    assert_eq!(
        field(&net_host, "rx ", "bytes=").as_deref(),
        Some("67108864")
    );
    // Host to guest.
    let sent = field(&net_host, "tx ", "sha256=").expect("the host's tx line");
    let got = field(&text, "@@GUEST@@ netrecv", "sha256=").expect("the guest's netrecv line");
    assert_eq!(sent, got, "what the guest received is what the host sent");
    assert_eq!(
        field(&text, "@@GUEST@@ netrecv", "bytes=").as_deref(),
        Some("67108864")
    );
    // The device counted the frames, and none was refused.
    let counters = text
        .lines()
        .find(|l| l.contains("vmm: net net0 (tap vmtap0):"))
        .expect("the card's exit report");
    for bad in ["rx_bad_buffers=0", "tx_bad_chains=0"] {
        assert!(counters.contains(bad), "{counters}");
    }
}
