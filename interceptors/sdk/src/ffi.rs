//! The C trampolines: each turns raw ABI arguments into safe values, calls the trait, and
//! stops panics at the boundary.

use crate::{abi, CreateContext, Decision, DeviceKind, Interceptor, Lower, Request, Slot, Status};
use std::ffi::{c_char, c_void, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// The ABI table for `T`; used by [`export_interceptor!`](crate::export_interceptor).
pub const fn table<T: Interceptor>() -> abi::InterceptorTable {
    abi::InterceptorTable {
        abi_version: abi::ABI_VERSION,
        flags: T::FLAGS,
        supported_devices: T::DEVICES,
        table_size: std::mem::size_of::<abi::InterceptorTable>() as u32,
        name: T::NAME.as_ptr(),
        create: Some(create::<T>),
        pre: Some(pre::<T>),
        post: Some(post::<T>),
        stats: Some(stats::<T>),
        destroy: Some(destroy::<T>),
        capacity: Some(capacity::<T>),
        check: Some(check::<T>),
        net_headroom: T::NET_HEADROOM,
        reconfigure: Some(reconfigure::<T>),
    }
}

unsafe extern "C" fn reconfigure<T: Interceptor>(
    instance: *mut c_void,
    config_json: *const c_char,
    err: *mut c_char,
    err_len: usize,
) -> u32 {
    let r = catch_unwind(AssertUnwindSafe(|| -> Result<(), String> {
        let me = instance.cast::<T>().as_ref().ok_or("no instance")?;
        let text = str_arg(config_json)?;
        let config = if text.is_empty() {
            serde_json::json!({})
        } else {
            serde_json::from_str(text).map_err(|e| format!("config is not JSON: {e}"))?
        };
        me.reconfigure(config)
    }));
    let msg = match r {
        Ok(Ok(())) => return abi::STATUS_OK,
        Ok(Err(msg)) => msg,
        Err(p) => format!("reconfigure panicked: {}", panic_message(&*p)),
    };
    write_c(&msg, err, err_len);
    abi::STATUS_IOERR
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// Copies `msg` into the caller's buffer, truncated and NUL-terminated.
unsafe fn write_c(msg: &str, buf: *mut c_char, len: usize) -> usize {
    let bytes = msg.as_bytes();
    if !buf.is_null() && len > 0 {
        let n = bytes.len().min(len - 1);
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), buf.cast::<u8>(), n);
        *buf.add(n) = 0;
    }
    bytes.len()
}

unsafe fn str_arg<'a>(p: *const c_char) -> Result<&'a str, String> {
    if p.is_null() {
        return Ok("");
    }
    CStr::from_ptr(p)
        .to_str()
        .map_err(|_| "argument is not UTF-8".to_string())
}

unsafe extern "C" fn create<T: Interceptor>(
    args: *const abi::CreateArgs,
    err: *mut c_char,
    err_len: usize,
) -> *mut c_void {
    let made = catch_unwind(AssertUnwindSafe(|| -> Result<T, String> {
        let a = args.as_ref().ok_or("no create arguments")?;
        let config_text = str_arg(a.config_json)?;
        let config = if config_text.is_empty() {
            serde_json::json!({})
        } else {
            serde_json::from_str(config_text).map_err(|e| format!("config is not JSON: {e}"))?
        };
        let device_kind = match a.device_kind {
            1 => Some(DeviceKind::Block),
            2 => Some(DeviceKind::Net),
            _ => None,
        };
        let ctx = CreateContext {
            instance_id: str_arg(a.instance_id)?,
            config,
            device_kind,
            device_id: str_arg(a.device_id)?,
            lower: Lower::from_raw(a.lower, a.lower_features)?,
        };
        T::create(ctx)
    }));
    let msg = match made {
        Ok(Ok(instance)) => return Box::into_raw(Box::new(instance)).cast(),
        Ok(Err(msg)) => msg,
        Err(p) => format!("create panicked: {}", panic_message(&*p)),
    };
    write_c(&msg, err, err_len);
    std::ptr::null_mut()
}

unsafe extern "C" fn pre<T: Interceptor>(
    instance: *mut c_void,
    req: *const abi::Request,
    slot: *mut *mut c_void,
) -> u32 {
    let r = catch_unwind(AssertUnwindSafe(|| {
        let (Some(me), Some(raw)) = (instance.cast::<T>().as_ref(), req.as_ref()) else {
            return abi::FAIL;
        };
        let mut request = Request::from_raw(raw);
        let mut mine: Slot = None;
        let decided = me.pre(&mut request, &mut mine);
        if let (Some(state), false) = (mine, slot.is_null()) {
            *slot = Box::into_raw(Box::new(state)).cast();
        }
        decision(decided)
    }));
    r.unwrap_or(abi::FAIL)
}

unsafe extern "C" fn post<T: Interceptor>(
    instance: *mut c_void,
    req: *const abi::Request,
    slot: *mut c_void,
    status: u32,
) -> u32 {
    let r = catch_unwind(AssertUnwindSafe(|| {
        // Take the slot back first, so it is freed even if the hook panics.
        let state: Slot = if slot.is_null() {
            None
        } else {
            Some(*Box::from_raw(slot.cast::<Box<dyn std::any::Any + Send>>()))
        };
        let (Some(me), Some(raw)) = (instance.cast::<T>().as_ref(), req.as_ref()) else {
            return abi::STATUS_IOERR;
        };
        let mut request = Request::from_raw(raw);
        me.post(&mut request, state, Status::from_raw(status))
            .to_raw()
    }));
    r.unwrap_or(abi::STATUS_IOERR)
}

unsafe extern "C" fn stats<T: Interceptor>(
    instance: *mut c_void,
    buf: *mut c_char,
    len: usize,
) -> usize {
    let text = catch_unwind(AssertUnwindSafe(|| {
        instance
            .cast::<T>()
            .as_ref()
            .map(|me| me.stats().to_string())
            .unwrap_or_else(|| "{}".into())
    }))
    .unwrap_or_else(|p| {
        serde_json::json!({ "error": format!("stats panicked: {}", panic_message(&*p)) })
            .to_string()
    });
    write_c(&text, buf, len)
}

unsafe extern "C" fn check<T: Interceptor>(
    instance: *mut c_void,
    buf: *mut c_char,
    len: usize,
) -> usize {
    let text = catch_unwind(AssertUnwindSafe(|| {
        let report = instance.cast::<T>().as_ref().and_then(|me| me.check());
        match report {
            None => serde_json::json!({ "checked": false }),
            Some(r) => r.to_json(),
        }
        .to_string()
    }))
    .unwrap_or_else(|p| {
        serde_json::json!({
            "checked": true,
            "problems": [format!("check panicked: {}", panic_message(&*p))],
        })
        .to_string()
    });
    write_c(&text, buf, len)
}

unsafe extern "C" fn destroy<T: Interceptor>(instance: *mut c_void) {
    if !instance.is_null() {
        let _ = catch_unwind(AssertUnwindSafe(|| {
            drop(Box::from_raw(instance.cast::<T>()))
        }));
    }
}

unsafe extern "C" fn capacity<T: Interceptor>(instance: *mut c_void) -> u64 {
    // u64::MAX means "the capacity below"; a panic gives 0, which the shim refuses.
    catch_unwind(AssertUnwindSafe(|| {
        instance
            .cast::<T>()
            .as_ref()
            .map_or(0, |me| me.capacity().unwrap_or(u64::MAX))
    }))
    .unwrap_or(0)
}

/// A decision as the ABI says it.
pub(crate) fn decision(d: Decision) -> u32 {
    match d {
        Decision::Continue => abi::CONTINUE,
        Decision::Complete => abi::COMPLETE,
        Decision::Fail => abi::FAIL,
        Decision::Pending => abi::PENDING,
    }
}
