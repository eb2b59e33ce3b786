//! Writes the hand-made seed inputs of every target into `fuzz/corpus/<target>/seed-*`:
//! well-formed requests on a well-placed queue, a driver's start-up sequence, the configs of
//! `configs/`, the requests of docs/api.md, plugins that answer as a good one does, an
//! encrypted image's header region. Each is encoded for the harness's decoder (see
//! `src/input.rs` and the harness); the fuzzer finds the rest.
//!
//! `cargo run -p fuzz-replay --example make_seeds`

use std::path::{Path, PathBuf};

#[derive(Default)]
struct E(Vec<u8>);

impl E {
    fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(b);
        self
    }
    /// `guest::addr` choosing `(u16 % HIGH_END) & !(align - 1)`.
    fn addr(&mut self, a: u16) -> &mut Self {
        self.u8(3).u16(a)
    }
    /// `Rings::from_input`: size 1 << p, rings at the given addresses.
    fn rings(&mut self, p: u8, desc: u16, avail: u16, used: u16) -> &mut Self {
        self.u8(1).u8(p).addr(desc).addr(avail).addr(used)
    }
    /// `guest::queue`: ready, no odd positions, no event index.
    fn queue(&mut self) -> &mut Self {
        self.u8(1).u8(1).u8(0)
    }
    /// `guest_write` 5: a well-formed request of type index `t` (into the harness's list)
    /// at sector 0 with one buffer of 4096 bytes.
    fn request(&mut self, head: u16, t: u8, hdr: u16, data: u16, status: u16) -> &mut Self {
        self.u8(5)
            .u16(head)
            .u8(t)
            .u8(0)
            .addr(hdr)
            .u8(1)
            .addr(data)
            .u8(3)
            .addr(status)
    }
}

fn write(dir: &Path, name: &str, data: &[u8]) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join(name), data).unwrap();
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn blk(corpus: &Path) {
    // blk_request: capacity 2048 sectors; a queue of 16; a read, a write, a flush, GET_ID.
    let d = corpus.join("blk_request");
    for (i, t) in [0u8, 1, 2, 3].into_iter().enumerate() {
        let mut e = E::default();
        e.u8(2).u8(128).rings(4, 0x1000, 0x2000, 0x3000).queue();
        e.u8(2);
        e.request(0, t, 0x4000, 0x5000, 0x6000);
        e.request(4, 0, 0x4100, 0x7000, 0x6010);
        e.u8(1).u8(0).u8(0);
        write(&d, &format!("seed-{i}"), &e.0);
    }
    // blk_queue: disk 0, a queue of 16, two reads then two more after a drain.
    let d = corpus.join("blk_queue");
    for disk in 0..4u8 {
        let mut e = E::default();
        e.u8(disk).rings(4, 0x1000, 0x2000, 0x3000).queue();
        e.bytes(&[0xff; 8]);
        e.u8(2)
            .request(0, 0, 0x4000, 0x5000, 0x6000)
            .request(4, 1, 0x4100, 0x7000, 0x6010);
        e.u8(1)
            .u8(2)
            .request(8, 4, 0x4200, 0x8000, 0x6020)
            .request(12, 5, 0x4300, 0x9000, 0x6030);
        write(&d, &format!("seed-{disk}"), &e.0);
    }
}

fn mmio(corpus: &Path) {
    let d = corpus.join("mmio");
    for disk in 0..4u8 {
        let mut e = E::default();
        e.u8(disk).rings(4, 0x1000, 0x2000, 0x3000);
        // Read the magic, version, device id; the driver's start-up (features all acked,
        // DRIVER_OK); a request; a kick; read the interrupt status and ack it; a reset;
        // start-up again.
        for reg in [0u8, 1, 2, 23] {
            e.u8(0).u8(2).u8(reg).u8(0);
        }
        e.u8(5).u8(0).u32(u32::MAX).u32(u32::MAX).u8(1);
        e.u8(7).request(0, 0, 0x4000, 0x5000, 0x6000);
        e.u8(6);
        e.u8(0).u8(2).u8(13).u8(0);
        e.u8(2).u8(2).u8(14).u8(1).u32(1).u8(0);
        e.u8(4).u8(0);
        e.u8(5).u8(0).u32(u32::MAX).u32(u32::MAX).u8(1);
        e.u8(7).request(4, 1, 0x4100, 0x7000, 0x6010).u8(6);
        write(&d, &format!("seed-{disk}"), &e.0);
    }
}

fn config(corpus: &Path) {
    let d = corpus.join("config");
    let configs = root().join("configs");
    let mut n = 0;
    let mut add = |text: &str| {
        let mut data = vec![0u8];
        data.extend_from_slice(text.as_bytes());
        write(&d, &format!("seed-{n}"), &data);
        n += 1;
    };
    for f in ["guest.toml", "guest-interceptors.toml"] {
        add(&std::fs::read_to_string(configs.join(f)).unwrap());
    }
    for f in [
        "encrypt.toml",
        "cache-encrypt.toml",
        "cache.toml",
        "count.toml",
        "xor.toml",
    ] {
        let p = configs.join("interceptors").join(f);
        if let Ok(t) = std::fs::read_to_string(p) {
            add(&t);
        }
    }
    // One that validates against the harness's fixtures, and variants of it.
    let good = r#"[machine]
vcpus = 2
memory_mib = 256

[kernel]
path = "bzImage"
cmdline = "console=ttyS0 root=/dev/vda"
initrd = "initrd"

[[block]]
id = "root"
path = "root.img"
read_only = true

[[block]]
id = "data"
path = "data.img"
interceptors = ["count", "enc"]

[[interceptor]]
id = "count"
path = "plugin.so"

[[interceptor]]
id = "enc"
path = "plugin.so"
blake3 = "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
enabled = false
config = { key_file = "demo.key", min_generation = 3, nested = { a = [1, 2.5, "x"], when = 1979-05-27T07:32:00Z } }

[api]
socket = "vmm.sock"
"#;
    add(good);
    add(&good.replace("bzImage", "vmlinux"));
    add(&good.replace("vcpus = 2", "vcpus = 0"));
    add(&good.replace("\"count\", \"enc\"", "\"count\", \"count\""));
    add("[kernel]\npath = \"bzImage\"\n[machine]\nmemory_mib = 18446744073709551615\n");
}

fn api(corpus: &Path) {
    let d = corpus.join("api");
    // Structured: (method index, path index, body kind) per request, well framed.
    // METHODS: GET PUT PATCH DELETE GET PUT POST HEAD OPTIONS
    // PATHS: /vm /devices /interceptors /interceptors/count /interceptors/keep
    //        /interceptors/new-1 /actions /metrics ...
    let one = |e: &mut E, method: u8, path: u8, body: &[u8]| {
        e.u8(1)
            .u8(method)
            .u8(2)
            .u8(path)
            .u8(0)
            .bytes(body)
            .u8(1)
            .u8(3)
            .u8(2);
    };
    let seeds: Vec<Vec<(u8, u8, Vec<u8>)>> = vec![
        vec![(0, 0, vec![0])],
        vec![(0, 1, vec![0]), (0, 2, vec![0]), (0, 7, vec![0])],
        vec![(0, 3, vec![0]), (2, 3, vec![1, 0]), (0, 3, vec![0])],
        vec![(2, 4, vec![1, 1]), (3, 4, vec![0])],
        vec![(3, 3, vec![0]), (0, 1, vec![0])],
        vec![(1, 5, vec![5, 0, 0, 0, 0, 0, 0, 1])],
        vec![(1, 6, vec![3]), (1, 6, vec![3])],
        vec![(6, 0, vec![0]), (7, 0, vec![0])],
        vec![(1, 6, vec![7])],
        vec![(2, 3, vec![2])],
    ];
    for (i, reqs) in seeds.iter().enumerate() {
        let mut e = E::default();
        e.u8(1).u8((reqs.len() - 1) as u8);
        for (m, p, b) in reqs {
            one(&mut e, *m, *p, b);
        }
        write(&d, &format!("seed-{i}"), &e.0);
    }
    // Raw: the docs' curl requests as bytes.
    let raw = [
        "GET /vm HTTP/1.1\r\nHost: localhost\r\n\r\n",
        "PATCH /interceptors/count HTTP/1.1\r\nHost: localhost\r\nContent-Length: 18\r\n\r\n{\"enabled\": false}",
        "PUT /interceptors/count2 HTTP/1.1\r\nHost: localhost\r\nContent-Length: 71\r\n\r\n{\"path\": \"/opt/vmm/libinterceptor_counter.so\", \"device\": \"data\", \"position\": 0}",
        "DELETE /interceptors/count2 HTTP/1.1\r\nHost: localhost\r\n\r\nGET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n",
        "PUT /actions HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n1b\r\n{\"action_type\": \"Shutdown\"}\r\n0\r\n\r\n",
    ];
    for (i, r) in raw.iter().enumerate() {
        let mut data = vec![0u8];
        data.extend_from_slice(r.as_bytes());
        write(&d, &format!("seed-raw-{i}"), &data);
    }
}

fn plugin(corpus: &Path) {
    let d = corpus.join("plugin_boundary");
    // disk 64 KiB; one instance of table `t`, enabled, config "{}"; a handle; then a write
    // and a read of 8 sectors at 0, a flush and GET_ID, the plugin keeping a slot, answering
    // CONTINUE and passing the status up; then its stats.
    for (i, t) in [0u8, 1, 3, 7, 16, 23, 31].into_iter().enumerate() {
        let mut e = E::default();
        e.u8(0).u8(0).u8(1).u8(t).u8(1).u8(1);
        e.u8(0).u8(1); // create: no own I/O, not refused
        e.u8(4);
        for k in [1u8, 0, 4, 5] {
            e.u8(1).u8(k); // no toggle; the kind
            let segments = k < 2 || k == 5;
            if k < 2 {
                e.u8(0).u8(8).u8(0);
            }
            if segments {
                e.u8(1);
            }
            e.u8(1).u8(0).u8(3); // pre: a slot, no own I/O, continue
            if segments {
                e.u8(1);
            }
            e.u8(0).u8(7); // post: no own I/O, pass the status
        }
        e.u8(0).u8(6); // stats: a JSON object, its length
        write(&d, &format!("seed-{i}"), &e.0);
    }
    // Two instances, the lower one refusing with a message.
    let mut e = E::default();
    e.u8(0).u8(1).bytes(&[1, 1, 1, 1]).bytes(&[1, 1, 1, 1]);
    e.u8(0).u8(0).u8(12).bytes(b"bad config!!").u8(1);
    write(&d, "seed-refused", &e.0);
}

/// The first 1024 bytes (both header copies) of a blank image of `blocks` blocks formatted
/// with the harness's key.
fn encrypted_header(blocks: usize) -> Vec<u8> {
    use compat::{BlockStack, InstanceSpec, Plugin};
    use interceptor_encrypt::Encrypt;
    let key: Vec<u8> = (0..32u8)
        .map(|i| i.wrapping_mul(37).wrapping_add(11))
        .collect();
    let dir = std::env::temp_dir().join(format!("make-seeds-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let key_file = dir.join("key");
    std::fs::write(&key_file, &key).unwrap();
    let image = dir.join("image");
    std::fs::write(&image, vec![0u8; blocks * 4096]).unwrap();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&image)
        .unwrap();
    let disk = devices::virtio::block::RawFile::new(file, false, "seed").unwrap();
    let spec = InstanceSpec {
        id: "enc".into(),
        plugin: Plugin::from_static("encrypt", interceptor_sdk::static_table!(Encrypt)).unwrap(),
        config_json: serde_json::json!({ "key_file": key_file }).to_string(),
        enabled: true,
    };
    drop(BlockStack::build("seed", std::sync::Arc::new(disk), &[spec]).unwrap());
    let bytes = std::fs::read(&image).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    bytes[..1024].to_vec()
}

fn encrypt(corpus: &Path) {
    let d = corpus.join("encrypt_open");
    // An op of a session: kind, first sector (u16), sector count - 1.
    let op = |e: &mut E, kind: u8, first: u16, count: u8| {
        e.u8(kind).u16(first).u8(count);
    };
    // History: an image of 8, 16, 64 or 300 blocks; a session of writes, a read, a crash
    // image, a flush, stats; a flipped header bit; a session reading it back.
    for (i, size) in [3u8, 7, 11, 13].into_iter().enumerate() {
        let mut e = E::default();
        e.u8(size).u8(1).u8(1);
        e.u8(6);
        op(&mut e, 0, 0, 3);
        op(&mut e, 1, 8, 7);
        op(&mut e, 3, 0, 15);
        op(&mut e, 6, 0, 0);
        op(&mut e, 5, 0, 0);
        op(&mut e, 7, 0, 0);
        e.u8(1).u8(2).u8(1).u16(100).u8(3); // tamper: flip a bit of byte 100
        e.u8(4).u8(2).u8(0).u8(1); // config: the good key, min_generation 0, 16 MiB
        e.u8(2);
        op(&mut e, 3, 0, 7);
        op(&mut e, 0, 2, 1);
        write(&d, &format!("seed-{i}"), &e.0);
    }
    // A clean second session (no tampering) that reads back what the first wrote.
    let mut e = E::default();
    e.u8(7).u8(1).u8(1).u8(2);
    op(&mut e, 0, 0, 23);
    op(&mut e, 5, 0, 0);
    e.u8(0).u8(1);
    op(&mut e, 3, 0, 23);
    write(&d, "seed-clean", &e.0);
    // Raw: the header region of an image formatted with the harness's key, over a disk of
    // the same size (16 blocks), so the fuzzer starts from a layout that opens.
    let header = encrypted_header(16);
    let mut e = E::default();
    e.u8(7).u8(1).u8(0); // 16 blocks, raw
    e.u8(5); // five patches
    let mut at = 0usize;
    for _ in 0..5 {
        let n = 255.min(1024 - at) as u8;
        e.u8(0)
            .u16(at as u16)
            .u8(n)
            .bytes(&header[at..at + n as usize]);
        at += n as usize;
    }
    e.u8(4).u8(1).u8(2).u8(1).u8(1); // good key, no format, min_generation 0, 16 MiB
    e.u8(3);
    op(&mut e, 3, 0, 7);
    op(&mut e, 0, 0, 7);
    op(&mut e, 3, 0, 7);
    write(&d, "seed-formatted", &e.0);
}

/// `net_worker`: RX rings of 16 at 0x0, 0x100, 0x200 and TX rings of 16 at 0x400, 0x500,
/// 0x600; RX buffers from 0x1000, TX frames from 0x8000; every feature offered.
fn net_worker(corpus: &Path) {
    let d = corpus.join("net_worker");
    // `net_buffers` on RX: one writable buffer of 1526 bytes (or `small`: 100) at `at`.
    let rx_buffer = |e: &mut E, head: u16, at: u16, small: bool| {
        e.u8(0).u8(0).u16(head).u8(0).addr(at);
        if small {
            e.u8(2).u16(100);
        } else {
            e.u8(1);
        }
    };
    // `net_buffers` on TX: a zero header of 12 bytes, then a frame of 60 + `extra` bytes.
    let tx_frame = |e: &mut E, head: u16, at: u16, extra: u8| {
        e.u8(0).u8(1).u16(head).u8(1);
        e.addr(at).u8(0).u8(1);
        e.addr(at + 0x20).u8(3).u8(extra);
    };
    // A wire frame: zero header, `len` choice (3: 60 bytes, 4: 1514), fill, last byte.
    let send = |e: &mut E, len: u8, fill: u8, last: u8| {
        e.u8(2).u8(1).u8(len).u8(fill).u8(last);
    };
    let start = |e: &mut E, mangle: bool| {
        if mangle {
            e.u8(1).u8(1);
        } else {
            e.u8(0);
        }
        e.u8(0); // MTU 1500
        e.rings(4, 0x0, 0x100, 0x200).rings(4, 0x400, 0x500, 0x600);
        e.queue().queue().bytes(&[0xff; 8]);
    };
    for (name, mangle, small) in [
        ("seed-plain", false, false),
        ("seed-mangle", true, false),
        ("seed-mergeable", false, true),
    ] {
        let mut e = E::default();
        start(&mut e, mangle);
        // Before DRIVER_OK: four RX buffers and two TX frames.
        e.u8(6);
        for i in 0..4u16 {
            rx_buffer(&mut e, i, 0x1000 + 0x800 * i, small);
        }
        tx_frame(&mut e, 0, 0x8000, 0);
        tx_frame(&mut e, 2, 0x8100, 3);
        // Round 1: no interrupt ack, two more TX frames; the wire sends three frames whose
        // last bytes make the plugin pass, take and answer.
        e.u8(1).u8(2);
        tx_frame(&mut e, 4, 0x8200, 1);
        tx_frame(&mut e, 6, 0x8300, 2);
        e.u8(3);
        send(&mut e, 3, 0x11, 0);
        send(&mut e, 4, 0x22, 1);
        send(&mut e, 3, 0x33, 3);
        write(&d, name, &e.0);
    }
    // The wire hangs up after one frame; the guest posts more buffers after it.
    let mut e = E::default();
    start(&mut e, false);
    e.u8(2);
    rx_buffer(&mut e, 0, 0x1000, false);
    tx_frame(&mut e, 0, 0x8000, 0);
    e.u8(1).u8(0).u8(2);
    send(&mut e, 3, 0x44, 0);
    e.u8(0);
    e.u8(1).u8(2);
    rx_buffer(&mut e, 1, 0x1800, false);
    tx_frame(&mut e, 2, 0x8100, 0);
    e.u8(1);
    send(&mut e, 3, 0x55, 0);
    write(&d, "seed-hangup", &e.0);
    // The wire stops reading; the guest sends eight frames.
    let mut e = E::default();
    start(&mut e, false);
    e.u8(0).u8(1).u8(8);
    for i in 0..8u16 {
        tx_frame(&mut e, 2 * i, 0x8000 + 0x100 * i, 0);
    }
    e.u8(1).u8(1);
    write(&d, "seed-deaf", &e.0);
}

fn main() {
    let corpus = root().join("fuzz/corpus");
    net_worker(&corpus);
    blk(&corpus);
    mmio(&corpus);
    config(&corpus);
    api(&corpus);
    plugin(&corpus);
    encrypt(&corpus);
    println!("seeds written under {}", corpus.display());
}
