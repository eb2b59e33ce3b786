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

// ---- two guests on one bridge (`lab pair`) ----

use common::{images_or_skip, lab, lines_of, out_file};
use vmm_lab::plugins::plugins;

/// Runs `lab pair` with `args`; the JSON report (`{"a": .., "b": .., "host": ..}`) and
/// everything printed, or None when the test must skip.
fn pair(name: &str, args: &[&str]) -> Option<(std::process::Output, serde_json::Value, String)> {
    images_or_skip()?;
    let json = out_file(&format!("{name}.json"));
    let json_arg = json.to_string_lossy().into_owned();
    let mut all = vec![
        "pair",
        "--backend",
        "vmm",
        "--timeout",
        "600",
        "--json",
        &json_arg,
    ];
    all.extend_from_slice(args);
    let out = lab(&all);
    let report = std::fs::read_to_string(&json)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(serde_json::Value::Null);
    let text = output(&out);
    Some((out, report, text))
}

/// A chain file for one card: `body` after the plugin's path, the plugin `path`.
fn net_chain(name: &str, id: &str, path: &std::path::Path, body: &str) -> String {
    let f = out_file(&format!("{name}.toml"));
    std::fs::write(
        &f,
        format!("[[interceptor]]\nid = {id:?}\npath = {path:?}\n{body}\n"),
    )
    .unwrap();
    f.to_string_lossy().into_owned()
}

fn seal_chain(name: &str, enabled: bool) -> String {
    let key = out_file(&format!("{name}.key"));
    std::fs::write(&key, [0x5au8; 32]).unwrap();
    let p = plugins().unwrap();
    net_chain(
        name,
        "seal",
        &p.net_encrypt,
        &format!("enabled = {enabled}\nconfig = {{ key_file = {key:?} }}"),
    )
}

const MARKER: &[u8] = b"vmm-net-plaintext-marker";

/// Both directions of an exchange of `mib` MiB between A (10.0.0.2) and B (10.0.0.3): A
/// sends the marker text to B's port 5000, then B sends random bytes to A's port 5001.
fn exchange(mib: u32) -> (String, String) {
    (
        format!("net.ip=10.0.0.2/24 ping=10.0.0.3 netsend=10.0.0.3:5000,{mib},text netrecv=5001"),
        format!("net.ip=10.0.0.3/24 ping=10.0.0.2 netrecv=5000 netsend=10.0.0.2:5001,{mib}"),
    )
}

fn assert_exchanged(text: &str, mib: u32) {
    let (a, b) = (lines_of(text, "a"), lines_of(text, "b"));
    assert!(a.contains("@@GUEST@@ ping addr=10.0.0.3 ok"), "A pings B");
    assert!(b.contains("@@GUEST@@ ping addr=10.0.0.2 ok"), "B pings A");
    let a_sent = field(&a, "@@GUEST@@ netsend", "sha256=").expect("A's netsend");
    let b_got = field(&b, "@@GUEST@@ netrecv", "sha256=").expect("B's netrecv");
    assert_eq!(a_sent, b_got, "A to B");
    let b_sent = field(&b, "@@GUEST@@ netsend", "sha256=").expect("B's netsend");
    let a_got = field(&a, "@@GUEST@@ netrecv", "sha256=").expect("A's netrecv");
    assert_eq!(b_sent, a_got, "B to A");
    let bytes = (u64::from(mib) << 20).to_string();
    for who in [&a, &b] {
        assert_eq!(
            field(who, "@@GUEST@@ netrecv", "bytes=").as_deref(),
            Some(bytes.as_str())
        );
    }
}

#[test]
fn two_guests_ping_and_move_64_mib_each_way_across_a_bridge() {
    let capture = out_file("pair-plain.pcap");
    let cap = capture.to_string_lossy().into_owned();
    let (a_task, b_task) = exchange(64);
    let Some((out, _, text)) = pair(
        "pair-plain",
        &["--a-task", &a_task, "--b-task", &b_task, "--capture", &cap],
    ) else {
        return;
    };
    assert!(out.status.success(), "the pair failed");
    assert_exchanged(&text, 64);
    // The capture works: without encryption the text crossed the bridge in the clear.
    let pcap = std::fs::read(&capture).expect("the capture");
    assert!(
        common::contains(&pcap, MARKER),
        "the plain text on the bridge"
    );
}

#[test]
fn with_frame_encryption_on_both_cards_the_bridge_sees_none_of_the_payload() {
    let capture = out_file("pair-sealed.pcap");
    let cap = capture.to_string_lossy().into_owned();
    let (a_chain, b_chain) = (
        seal_chain("pair-sealed-a", true),
        seal_chain("pair-sealed-b", true),
    );
    // 16 MiB: under the lab's emulated CPU every frame's AES (and the guests' own checksums
    // and segments, with no offloads) is slow: 64 MiB each way takes 9 minutes there.
    let (a_task, b_task) = exchange(16);
    // Before the exchange: B serves a file over HTTP, A fetches it by a URL without a port,
    // then pings B with the most the told MTU (1454) takes unfragmented, and one byte more.
    let b_task = b_task.replace("net.ip=10.0.0.3/24 ", "net.ip=10.0.0.3/24 httpd=80 ");
    let a_task = a_task.replace(
        "ping=10.0.0.3 ",
        "ping=10.0.0.3 fetch=http://10.0.0.3/blob pingdf=10.0.0.3,1426 pingdf=10.0.0.3,1427 ",
    );
    let Some((out, _, text)) = pair(
        "pair-sealed",
        &[
            "--a-task",
            &a_task,
            "--b-task",
            &b_task,
            "--capture",
            &cap,
            "--a-net-interceptors",
            &a_chain,
            "--b-net-interceptors",
            &b_chain,
        ],
    ) else {
        return;
    };
    assert!(out.status.success(), "the pair failed");
    assert_exchanged(&text, 16);
    let a = lines_of(&text, "a");
    assert!(
        a.contains("mtu=1454"),
        "the guest's MTU leaves room for the seal"
    );
    // A full-size frame of the told MTU crosses sealed, unfragmented; the guest's own stack
    // refuses one byte more (what the card would refuse too).
    assert!(
        a.contains("@@GUEST@@ pingdf addr=10.0.0.3 size=1426 ok"),
        "the most the MTU takes, unfragmented, through both seals: {a}"
    );
    assert!(
        a.contains(
            "@@GUEST@@ pingdf addr=10.0.0.3 size=1427 refused why=message too long, mtu=1454"
        ),
        "one byte past the MTU: {a}"
    );
    let b = lines_of(&text, "b");
    let served = field(&b, "@@GUEST@@ httpd", "sha256=").expect("B's httpd");
    let fetched = field(&a, "@@GUEST@@ fetch", "sha256=").expect("A's fetch");
    assert_eq!(
        served, fetched,
        "wget by a URL without a port, through both seals"
    );
    let pcap = std::fs::read(&capture).expect("the capture");
    assert!(
        pcap.len() > 32 << 20,
        "the capture holds the transfer ({} bytes)",
        pcap.len()
    );
    assert!(!common::contains(&pcap, MARKER), "plain text on the bridge");
    for who in ["a", "b"] {
        let stats = lines_of(&text, who)
            .lines()
            .find(|l| l.contains("interceptor seal on net0"))
            .map(str::to_string)
            .expect("the seal's exit report");
        assert!(stats.contains("\"forged\":0"), "{stats}");
        assert!(stats.contains("\"replayed\":0"), "{stats}");
        // One handshake each way: each card admitted the other once.
        assert!(stats.contains("\"admitted\":1,"), "{stats}");
    }
}

#[test]
fn with_encryption_on_one_side_traffic_fails_until_the_api_enables_the_other() {
    let (a_chain, b_chain) = (
        seal_chain("pair-half-a", true),
        seal_chain("pair-half-b", false),
    );
    let Some((out, report, text)) = pair(
        "pair-half",
        &[
            "--a-task",
            "net.ip=10.0.0.2/24 noping=10.0.0.3,8 ping=10.0.0.3 netsend=10.0.0.3:5000,8",
            "--b-task",
            "net.ip=10.0.0.3/24 netrecv=5000",
            "--a-net-interceptors",
            &a_chain,
            "--b-net-interceptors",
            &b_chain,
            "--b-control",
            "enable:seal:20",
        ],
    ) else {
        return;
    };
    assert!(out.status.success(), "the pair failed");
    let (a, b) = (lines_of(&text, "a"), lines_of(&text, "b"));
    assert!(
        a.contains("@@GUEST@@ noping addr=10.0.0.3 silent"),
        "no answer while B is plain"
    );
    assert!(
        a.contains("@@GUEST@@ ping addr=10.0.0.3 ok"),
        "answers once B seals too"
    );
    assert_eq!(
        field(&a, "@@GUEST@@ netsend", "sha256="),
        field(&b, "@@GUEST@@ netrecv", "sha256="),
    );
    let control = &report["b"]["control"][0];
    assert!(control["error"].is_null(), "{control}");
    let card = control["result"]
        .as_array()
        .and_then(|d| d.iter().find(|d| d["kind"] == "net"))
        .cloned()
        .expect("GET /devices lists the card");
    assert_eq!(card["chain"][0]["id"], "seal");
    assert_eq!(card["chain"][0]["enabled"], true);
}

#[test]
fn a_filter_closes_one_port_and_lets_the_rest_through() {
    let p = plugins().unwrap();
    let b_chain = net_chain(
        "pair-filter-b",
        "filter",
        &p.net_filter,
        "[interceptor.config]\nrules = [{ name = \"no-5001\", ip_protocol = 6, port = 5001 }]\n\
         anti_spoof = { mac = \"52:54:00:00:00:0b\", ipv4 = \"10.0.0.3\" }",
    );
    let Some((out, _, text)) = pair(
        "pair-filter",
        &[
            "--a-task",
            "net.ip=10.0.0.2/24 ping=10.0.0.3 noconnect=10.0.0.3:5001 netsend=10.0.0.3:5000,8",
            "--b-task",
            "net.ip=10.0.0.3/24 listen=5001 netrecv=5000",
            "--b-net-interceptors",
            &b_chain,
        ],
    ) else {
        return;
    };
    assert!(out.status.success(), "the pair failed");
    let (a, b) = (lines_of(&text, "a"), lines_of(&text, "b"));
    assert!(
        a.contains("@@GUEST@@ noconnect addr=10.0.0.3:5001 blocked"),
        "port 5001 closed"
    );
    assert_eq!(
        field(&a, "@@GUEST@@ netsend", "sha256="),
        field(&b, "@@GUEST@@ netrecv", "sha256="),
        "port 5000 open"
    );
    let stats = b
        .lines()
        .find(|l| l.contains("interceptor filter on net0"))
        .expect("the filter's exit report");
    assert!(
        !stats.contains("\"matched\":0"),
        "the rule matched: {stats}"
    );
    // The guest's kernel sends IPv6 from its link-local address, which a filter with no
    // `ipv6` address drops as spoofed; that is counted, not an error.
    assert!(stats.contains("\"spoofed\":"), "{stats}");
}

#[test]
fn a_guest_flooding_frames_stalls_neither_vmm() {
    // A floods B with UDP as fast as it can for 20 s while the bridge's side sends B 32 MiB
    // over TCP: B's card, short of buffers again and again, must keep receiving. B waits
    // for A's word on port 5002 before it ends (its iperf3 server must outlive the flood).
    let host = "sleep 5; head -c 33554432 /dev/urandom > /tmp/flood-tx; \
        echo tx sha256=$(sha256sum < /tmp/flood-tx | cut -d' ' -f1); \
        n=0; until busybox nc 10.0.0.3 5000 < /tmp/flood-tx; do n=$((n+1)); [ $n -lt 60 ] || break; sleep 0.5; done; \
        rm -f /tmp/flood-tx";
    let Some((out, _, text)) = pair(
        "pair-flood",
        &[
            "--a-task",
            "net.ip=10.0.0.2/24 ping=10.0.0.3 iperf=10.0.0.3,20,-u+-b+0+-l+1400 \
             netsend=10.0.0.3:5002,1",
            "--b-task",
            "net.ip=10.0.0.3/24 iperfd netrecv=5000 netrecv=5002",
            "--host-cmd",
            host,
        ],
    ) else {
        return;
    };
    assert!(out.status.success(), "the pair failed");
    let (a, b) = (lines_of(&text, "a"), lines_of(&text, "b"));
    let bps: f64 = field(&a, "@@GUEST@@ iperf addr=10.0.0.3", "bps=")
        .and_then(|v| v.parse().ok())
        .expect("A's flood result");
    assert!(bps > 0.0, "A's flood reached B");
    let host_lines = lines_of(&text, "host");
    assert_eq!(
        field(&host_lines, "tx ", "sha256="),
        field(&b, "@@GUEST@@ netrecv", "sha256="),
        "B received the host's 32 MiB whole under the flood"
    );
    for who in [&a, &b] {
        assert!(who.contains("@@GUEST@@ exit rc=0"), "{who}");
    }
    // B's card took the flood and the transfer, and refused nothing.
    let counters = b
        .lines()
        .find(|l| l.contains("vmm: net net0 (tap vmtapb):"))
        .expect("B's card's exit report");
    assert!(counters.contains("rx_bad_buffers=0"), "{counters}");
}
