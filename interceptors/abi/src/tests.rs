//! The header and these types must agree: compile a probe against the header with the
//! system C compiler, print every size, offset and constant, and compare with Rust's view.

use super::*;
use std::collections::BTreeMap;
use std::mem::{offset_of, size_of};
use std::path::PathBuf;
use std::process::Command;

const PROBE: &str = r#"
#include <stdio.h>
#include "vmm_interceptor.h"
#define S(t) printf("sizeof %s %zu\n", #t, sizeof(struct t));
#define O(t, f) printf("offset %s.%s %zu\n", #t, #f, offsetof(struct t, f));
#define C(c) printf("const %s %llu\n", #c, (unsigned long long)(c));
int main(void) {
    S(vmm_segment) O(vmm_segment, base) O(vmm_segment, len)
    S(vmm_request) O(vmm_request, kind) O(vmm_request, flags) O(vmm_request, offset)
    O(vmm_request, len) O(vmm_request, segments) O(vmm_request, nsegments)
    O(vmm_request, device_kind) O(vmm_request, device_id) O(vmm_request, net)
    O(vmm_request, handle)
    S(vmm_lower_io) O(vmm_lower_io, kind) O(vmm_lower_io, flags) O(vmm_lower_io, offset)
    O(vmm_lower_io, len) O(vmm_lower_io, segments) O(vmm_lower_io, nsegments)
    O(vmm_lower_io, done) O(vmm_lower_io, arg)
    S(vmm_net_header) O(vmm_net_header, flags) O(vmm_net_header, gso_type)
    O(vmm_net_header, hdr_len) O(vmm_net_header, gso_size) O(vmm_net_header, csum_start)
    O(vmm_net_header, csum_offset) O(vmm_net_header, num_buffers)
    S(vmm_net_frame) O(vmm_net_frame, data) O(vmm_net_frame, len) O(vmm_net_frame, capacity)
    O(vmm_net_frame, header) O(vmm_net_frame, inject_ctx) O(vmm_net_frame, inject)
    S(vmm_lower) O(vmm_lower, ctx) O(vmm_lower, read) O(vmm_lower, write) O(vmm_lower, flush)
    O(vmm_lower, log) O(vmm_lower, capacity) O(vmm_lower, discard) O(vmm_lower, submit)
    O(vmm_lower, resume) O(vmm_lower, timer)
    S(vmm_create_args) O(vmm_create_args, instance_id) O(vmm_create_args, config_json)
    O(vmm_create_args, device_kind) O(vmm_create_args, lower_features)
    O(vmm_create_args, device_id) O(vmm_create_args, lower)
    O(vmm_create_args, max_lower_in_flight)
    S(vmm_interceptor_table) O(vmm_interceptor_table, abi_version)
    O(vmm_interceptor_table, flags) O(vmm_interceptor_table, supported_devices)
    O(vmm_interceptor_table, name) O(vmm_interceptor_table, create)
    O(vmm_interceptor_table, pre) O(vmm_interceptor_table, post)
    O(vmm_interceptor_table, stats) O(vmm_interceptor_table, destroy)
    O(vmm_interceptor_table, capacity) O(vmm_interceptor_table, table_size)
    O(vmm_interceptor_table, check) O(vmm_interceptor_table, net_headroom)
    O(vmm_interceptor_table, reconfigure)
    C(VMM_INTERCEPTOR_ABI_VERSION) C(VMM_SECTOR_SIZE) C(VMM_DEVICE_BLOCK) C(VMM_DEVICE_NET)
    C(VMM_REQ_READ) C(VMM_REQ_WRITE) C(VMM_REQ_FLUSH) C(VMM_REQ_DISCARD) C(VMM_REQ_GET_ID)
    C(VMM_REQ_WRITE_ZEROES) C(VMM_REQ_NET_TX) C(VMM_REQ_NET_RX)
    C(VMM_REQ_F_DATA_PRIVATE) C(VMM_REQ_F_DISABLED)
    C(VMM_STATUS_OK) C(VMM_STATUS_IOERR) C(VMM_STATUS_UNSUPP) C(VMM_STATUS_BUSY)
    C(VMM_CONTINUE) C(VMM_COMPLETE) C(VMM_FAIL) C(VMM_PENDING)
    C(VMM_INTERCEPTOR_ABI_VERSION_MIN) C(VMM_LOWER_F_ASYNC)
    C(VMM_INTERCEPTOR_F_MODIFIES_DATA) C(VMM_INTERCEPTOR_F_KEEP_WHEN_DISABLED)
    C(VMM_INTERCEPTOR_F_OWNS_FORMAT) C(VMM_INTERCEPTOR_F_HANDLES_DISCARD)
    C(VMM_INTERCEPTOR_F_NET_PLAIN_FRAMES)
    C(VMM_LOG_ERROR) C(VMM_LOG_WARN) C(VMM_LOG_INFO) C(VMM_LOG_DEBUG)
    C(VMM_LOWER_F_DISCARD)
    printf("entry %s\n", VMM_INTERCEPTOR_ENTRY_SYMBOL);
    return 0;
}
"#;

fn rust_view() -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    let mut put = |k: &str, v: usize| m.insert(k.to_string(), v.to_string());
    put("sizeof vmm_segment", size_of::<Segment>());
    put("offset vmm_segment.base", offset_of!(Segment, base));
    put("offset vmm_segment.len", offset_of!(Segment, len));
    put("sizeof vmm_request", size_of::<Request>());
    put("offset vmm_request.kind", offset_of!(Request, kind));
    put("offset vmm_request.flags", offset_of!(Request, flags));
    put("offset vmm_request.offset", offset_of!(Request, offset));
    put("offset vmm_request.len", offset_of!(Request, len));
    put("offset vmm_request.segments", offset_of!(Request, segments));
    put(
        "offset vmm_request.nsegments",
        offset_of!(Request, nsegments),
    );
    put(
        "offset vmm_request.device_kind",
        offset_of!(Request, device_kind),
    );
    put(
        "offset vmm_request.device_id",
        offset_of!(Request, device_id),
    );
    put("offset vmm_request.net", offset_of!(Request, net));
    put("offset vmm_request.handle", offset_of!(Request, handle));
    put("sizeof vmm_lower_io", size_of::<LowerIo>());
    for (f, o) in [
        ("kind", offset_of!(LowerIo, kind)),
        ("flags", offset_of!(LowerIo, flags)),
        ("offset", offset_of!(LowerIo, offset)),
        ("len", offset_of!(LowerIo, len)),
        ("segments", offset_of!(LowerIo, segments)),
        ("nsegments", offset_of!(LowerIo, nsegments)),
        ("done", offset_of!(LowerIo, done)),
        ("arg", offset_of!(LowerIo, arg)),
    ] {
        put(&format!("offset vmm_lower_io.{f}"), o);
    }
    put("sizeof vmm_net_header", size_of::<NetHeader>());
    for (f, o) in [
        ("flags", offset_of!(NetHeader, flags)),
        ("gso_type", offset_of!(NetHeader, gso_type)),
        ("hdr_len", offset_of!(NetHeader, hdr_len)),
        ("gso_size", offset_of!(NetHeader, gso_size)),
        ("csum_start", offset_of!(NetHeader, csum_start)),
        ("csum_offset", offset_of!(NetHeader, csum_offset)),
        ("num_buffers", offset_of!(NetHeader, num_buffers)),
    ] {
        put(&format!("offset vmm_net_header.{f}"), o);
    }
    put("sizeof vmm_net_frame", size_of::<NetFrame>());
    for (f, o) in [
        ("data", offset_of!(NetFrame, data)),
        ("len", offset_of!(NetFrame, len)),
        ("capacity", offset_of!(NetFrame, capacity)),
        ("header", offset_of!(NetFrame, header)),
        ("inject_ctx", offset_of!(NetFrame, inject_ctx)),
        ("inject", offset_of!(NetFrame, inject)),
    ] {
        put(&format!("offset vmm_net_frame.{f}"), o);
    }
    put("sizeof vmm_lower", size_of::<Lower>());
    put("offset vmm_lower.ctx", offset_of!(Lower, ctx));
    put("offset vmm_lower.read", offset_of!(Lower, read));
    put("offset vmm_lower.write", offset_of!(Lower, write));
    put("offset vmm_lower.flush", offset_of!(Lower, flush));
    put("offset vmm_lower.log", offset_of!(Lower, log));
    put("offset vmm_lower.capacity", offset_of!(Lower, capacity));
    put("offset vmm_lower.discard", offset_of!(Lower, discard));
    put("offset vmm_lower.submit", offset_of!(Lower, submit));
    put("offset vmm_lower.resume", offset_of!(Lower, resume));
    put("offset vmm_lower.timer", offset_of!(Lower, timer));
    put("sizeof vmm_create_args", size_of::<CreateArgs>());
    put(
        "offset vmm_create_args.instance_id",
        offset_of!(CreateArgs, instance_id),
    );
    put(
        "offset vmm_create_args.config_json",
        offset_of!(CreateArgs, config_json),
    );
    put(
        "offset vmm_create_args.device_kind",
        offset_of!(CreateArgs, device_kind),
    );
    put(
        "offset vmm_create_args.lower_features",
        offset_of!(CreateArgs, lower_features),
    );
    put(
        "offset vmm_create_args.device_id",
        offset_of!(CreateArgs, device_id),
    );
    put(
        "offset vmm_create_args.lower",
        offset_of!(CreateArgs, lower),
    );
    put(
        "offset vmm_create_args.max_lower_in_flight",
        offset_of!(CreateArgs, max_lower_in_flight),
    );
    put(
        "sizeof vmm_interceptor_table",
        size_of::<InterceptorTable>(),
    );
    let t = |f: &str, v: usize| (format!("offset vmm_interceptor_table.{f}"), v);
    for (k, v) in [
        t("abi_version", offset_of!(InterceptorTable, abi_version)),
        t("flags", offset_of!(InterceptorTable, flags)),
        t(
            "supported_devices",
            offset_of!(InterceptorTable, supported_devices),
        ),
        t("name", offset_of!(InterceptorTable, name)),
        t("create", offset_of!(InterceptorTable, create)),
        t("pre", offset_of!(InterceptorTable, pre)),
        t("post", offset_of!(InterceptorTable, post)),
        t("stats", offset_of!(InterceptorTable, stats)),
        t("destroy", offset_of!(InterceptorTable, destroy)),
        t("capacity", offset_of!(InterceptorTable, capacity)),
        t("table_size", offset_of!(InterceptorTable, table_size)),
        t("check", offset_of!(InterceptorTable, check)),
        t("net_headroom", offset_of!(InterceptorTable, net_headroom)),
        t("reconfigure", offset_of!(InterceptorTable, reconfigure)),
    ] {
        put(&k, v);
    }
    let consts: [(&str, u64); 34] = [
        ("VMM_INTERCEPTOR_ABI_VERSION", ABI_VERSION.into()),
        ("VMM_INTERCEPTOR_ABI_VERSION_MIN", ABI_VERSION_MIN.into()),
        ("VMM_STATUS_BUSY", STATUS_BUSY.into()),
        ("VMM_PENDING", PENDING.into()),
        ("VMM_LOWER_F_ASYNC", LOWER_F_ASYNC.into()),
        ("VMM_SECTOR_SIZE", SECTOR_SIZE),
        ("VMM_DEVICE_BLOCK", DeviceKind::Block as u64),
        ("VMM_DEVICE_NET", DeviceKind::Net as u64),
        ("VMM_REQ_READ", REQ_READ.into()),
        ("VMM_REQ_WRITE", REQ_WRITE.into()),
        ("VMM_REQ_FLUSH", REQ_FLUSH.into()),
        ("VMM_REQ_DISCARD", REQ_DISCARD.into()),
        ("VMM_REQ_GET_ID", REQ_GET_ID.into()),
        ("VMM_REQ_WRITE_ZEROES", REQ_WRITE_ZEROES.into()),
        ("VMM_REQ_NET_TX", REQ_NET_TX.into()),
        ("VMM_REQ_NET_RX", REQ_NET_RX.into()),
        ("VMM_REQ_F_DATA_PRIVATE", REQ_F_DATA_PRIVATE.into()),
        ("VMM_REQ_F_DISABLED", REQ_F_DISABLED.into()),
        ("VMM_STATUS_OK", STATUS_OK.into()),
        ("VMM_STATUS_IOERR", STATUS_IOERR.into()),
        ("VMM_STATUS_UNSUPP", STATUS_UNSUPP.into()),
        ("VMM_CONTINUE", CONTINUE.into()),
        ("VMM_COMPLETE", COMPLETE.into()),
        ("VMM_FAIL", FAIL.into()),
        ("VMM_INTERCEPTOR_F_MODIFIES_DATA", F_MODIFIES_DATA.into()),
        (
            "VMM_INTERCEPTOR_F_HANDLES_DISCARD",
            F_HANDLES_DISCARD.into(),
        ),
        (
            "VMM_INTERCEPTOR_F_NET_PLAIN_FRAMES",
            F_NET_PLAIN_FRAMES.into(),
        ),
        (
            "VMM_INTERCEPTOR_F_KEEP_WHEN_DISABLED",
            F_KEEP_WHEN_DISABLED.into(),
        ),
        ("VMM_INTERCEPTOR_F_OWNS_FORMAT", F_OWNS_FORMAT.into()),
        ("VMM_LOWER_F_DISCARD", LOWER_F_DISCARD.into()),
        ("VMM_LOG_ERROR", LOG_ERROR.into()),
        ("VMM_LOG_WARN", LOG_WARN.into()),
        ("VMM_LOG_INFO", LOG_INFO.into()),
        ("VMM_LOG_DEBUG", LOG_DEBUG.into()),
    ];
    for (name, v) in consts {
        m.insert(format!("const {name}"), v.to_string());
    }
    m.insert("entry".into(), ENTRY_SYMBOL.into());
    m
}

fn c_view() -> BTreeMap<String, String> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let include = dir.join("../include");
    let out = std::env::temp_dir().join(format!("abi-probe-{}", std::process::id()));
    std::fs::create_dir_all(&out).unwrap();
    let src = out.join("probe.c");
    std::fs::write(&src, PROBE).unwrap();
    let exe = out.join("probe");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let status = Command::new(&cc)
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-I"])
        .arg(&include)
        .arg(&src)
        .arg("-o")
        .arg(&exe)
        .status()
        .unwrap_or_else(|e| panic!("cannot run the C compiler {cc}: {e}"));
    assert!(status.success(), "the header does not compile cleanly");
    let stdout = Command::new(&exe).output().unwrap().stdout;
    let _ = std::fs::remove_dir_all(&out);
    String::from_utf8(stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let (k, v) = l.rsplit_once(' ').unwrap();
            (k.to_string(), v.to_string())
        })
        .collect()
}

#[test]
fn c_header_and_rust_types_agree() {
    let c = c_view();
    let rust = rust_view();
    assert_eq!(c.len(), rust.len(), "probe and Rust list different items");
    for (k, v) in &rust {
        assert_eq!(
            c.get(k),
            Some(v),
            "{k}: C says {:?}, Rust says {v}",
            c.get(k)
        );
    }
}

#[test]
fn device_kinds_have_stable_values() {
    // These values cross the C boundary: changing them breaks every plugin.
    assert_eq!(DeviceKind::Block as u32, 1);
    assert_eq!(DeviceKind::Net as u32, 2);
    assert_eq!(DeviceKind::Block.mask(), 2);
    assert_eq!(ABI_VERSION, 2);
    assert_eq!(ABI_VERSION_MIN, 1);
}
