//! What KVM holds of a running guest, for diagnosing one that stopped: the VM-wide interrupt
//! controllers and clock (read from any thread without touching the vCPUs), and each vCPU's
//! registers, local APIC, timer MSRs and pending events (read on the vCPU's own thread,
//! which is kicked out of KVM_RUN for the moment it takes). The API serves them as
//! `GET /vm/kvm` and `GET /vm/vcpus` (docs/api.md).
//!
//! Why both, and in that order: a guest halted for good waits for an interrupt. The
//! IOAPIC's pins and the clock say whether a device or the clock owes it one; the vCPU's
//! LAPIC (IRR/ISR, its LVT timer) and TSC-deadline MSR say whether its timer is armed and
//! whether an interrupt is stuck pending or in service. Kicking a vCPU makes KVM look at
//! its pending events again on re-entry, so it can wake a vCPU whose wake-up was lost:
//! the VM-wide state is read first.

use kvm_bindings::{kvm_lapic_state, kvm_msr_entry, Msrs, KVM_IRQCHIP_IOAPIC};
use kvm_ioctls::{VcpuFd, VmFd};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

pub const MSR_IA32_TSC: u32 = 0x10;
pub const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
/// KVM's paravirtual MSRs: which features the guest turned on.
const KVM_MSRS: [(u32, &str); 6] = [
    (0x4b56_4d01, "kvm_system_time"),
    (0x4b56_4d02, "kvm_async_pf_en"),
    (0x4b56_4d03, "kvm_steal_time"),
    (0x4b56_4d04, "kvm_pv_eoi_en"),
    (0x4b56_4d06, "kvm_async_pf_int"),
    (0x4b56_4d07, "kvm_async_pf_ack"),
];

/// How long a vCPU may take to answer before the reader gives up on it.
const VCPU_ANSWER: Duration = Duration::from_secs(2);

/// One vCPU's mailbox: the API asks, the vCPU thread answers between two KVM_RUNs.
#[derive(Default)]
pub struct VcpuProbe {
    requested: AtomicBool,
    answer: Mutex<Option<Value>>,
    answered: Condvar,
    /// The vCPU's thread while it runs: set once it starts, cleared by the thread itself
    /// before it ends, so a kick never reaches a thread that was joined (the lock is held
    /// across each kick).
    thread: Mutex<VcpuThread>,
}

/// Where a vCPU's thread is, for the kicks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum VcpuThread {
    #[default]
    NotStarted,
    Running(libc::pthread_t),
    /// Ended, or about to: never kicked again.
    Retired,
}

impl VcpuProbe {
    /// The vCPU's thread, once spawned (unless it already retired: a guest can reset at
    /// once).
    pub fn set_thread(&self, t: libc::pthread_t) {
        let mut thread = self.thread.lock().unwrap_or_else(|p| p.into_inner());
        if *thread == VcpuThread::NotStarted {
            *thread = VcpuThread::Running(t);
        }
    }

    /// Called by the vCPU thread as it ends: no kick may reach it after this.
    pub fn retire(&self) {
        *self.thread.lock().unwrap_or_else(|p| p.into_inner()) = VcpuThread::Retired;
    }

    /// Kicks the thread out of KVM_RUN; false if it is not running.
    fn kick(&self) -> bool {
        let thread = self.thread.lock().unwrap_or_else(|p| p.into_inner());
        let VcpuThread::Running(t) = *thread else {
            return false;
        };
        // SAFETY: the thread has not retired (it clears this under the same lock before it
        // ends), so it has not been joined and its pthread_t is valid.
        unsafe { libc::pthread_kill(t, crate::vcpu::kick_signal()) };
        true
    }

    /// Called by the vCPU thread before each KVM_RUN: answers a pending request. A plain
    /// load first: this runs on every exit, and a read-modify-write there would cost each
    /// exit a locked instruction for a request that almost never comes.
    pub fn serve(&self, id: u8, fd: &VcpuFd) {
        if self.requested.load(Ordering::Relaxed) && self.requested.swap(false, Ordering::SeqCst) {
            let state = read_vcpu(id, fd);
            *self.answer.lock().unwrap_or_else(|p| p.into_inner()) = Some(state);
            self.answered.notify_all();
        }
    }

    /// Asks the vCPU for its state: kicks it out of KVM_RUN (again every 10 ms, as a kick
    /// can land just before it enters) until it answers or `VCPU_ANSWER` passes.
    fn ask(&self, id: u8) -> Value {
        let mut answer = self.answer.lock().unwrap_or_else(|p| p.into_inner());
        *answer = None;
        self.requested.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + VCPU_ANSWER;
        loop {
            if !self.kick() {
                self.requested.store(false, Ordering::SeqCst);
                return json!({"id": id, "error": "the vCPU is not running"});
            }
            let (a, _) = self
                .answered
                .wait_timeout(answer, Duration::from_millis(10))
                .unwrap_or_else(|p| p.into_inner());
            answer = a;
            if let Some(v) = answer.take() {
                return v;
            }
            if Instant::now() >= deadline {
                self.requested.store(false, Ordering::SeqCst);
                return json!({"id": id, "error": "the vCPU did not answer in 2 s"});
            }
        }
    }
}

/// The VM as the probe reads it; set once the VM and its vCPUs exist.
pub struct KvmView {
    pub vm: Arc<VmFd>,
    pub vcpus: Vec<Arc<VcpuProbe>>,
}

/// Shared between the API (which starts first) and the VM (which fills it in).
pub type KvmSlot = Arc<OnceLock<KvmView>>;

impl KvmView {
    /// `GET /vm/kvm`: the IOAPIC, the PICs and the clock; no vCPU is disturbed.
    pub fn vm_state(&self) -> Value {
        json!({
            "clock": clock(&self.vm),
            "ioapic": ioapic(&self.vm),
            "pic": [pic(&self.vm, 0), pic(&self.vm, 1)],
        })
    }

    /// `GET /vm/vcpus`: each vCPU's state, read on its thread.
    pub fn vcpu_states(&self) -> Value {
        Value::Array(
            self.vcpus
                .iter()
                .enumerate()
                .map(|(i, p)| p.ask(i as u8))
                .collect(),
        )
    }
}

fn clock(vm: &VmFd) -> Value {
    match vm.get_clock() {
        Ok(c) => json!({"ns": c.clock, "flags": c.flags}),
        Err(e) => json!({"error": format!("KVM_GET_CLOCK: {e}")}),
    }
}

/// One IOAPIC redirection entry, as its fields.
pub fn redirection(pin: usize, bits: u64) -> Value {
    json!({
        "pin": pin,
        "vector": bits & 0xff,
        "delivery_mode": (bits >> 8) & 7,
        "dest_logical": (bits >> 11) & 1 == 1,
        "delivery_pending": (bits >> 12) & 1 == 1,
        "active_low": (bits >> 13) & 1 == 1,
        "remote_irr": (bits >> 14) & 1 == 1,
        "level": (bits >> 15) & 1 == 1,
        "masked": (bits >> 16) & 1 == 1,
        "dest": bits >> 56,
    })
}

fn ioapic(vm: &VmFd) -> Value {
    let mut chip = kvm_bindings::kvm_irqchip {
        chip_id: KVM_IRQCHIP_IOAPIC,
        ..Default::default()
    };
    if let Err(e) = vm.get_irqchip(&mut chip) {
        return json!({"error": format!("KVM_GET_IRQCHIP: {e}")});
    }
    // SAFETY: KVM filled the union's IOAPIC member (chip_id says which); every bit
    // pattern of these plain integers is valid.
    let state = unsafe { chip.chip.ioapic };
    // Pins the guest set up (unmasked), and any with something pending, whatever the mask.
    let pins: Vec<Value> = state
        .redirtbl
        .iter()
        .enumerate()
        // SAFETY: as above: `bits` views the whole 64-bit entry.
        .map(|(pin, e)| (pin, unsafe { e.bits }))
        .filter(|&(pin, bits)| bits & (1 << 16) == 0 || state.irr & (1 << pin) != 0)
        .map(|(pin, bits)| redirection(pin, bits))
        .collect();
    json!({"irr": state.irr, "pins": pins})
}

fn pic(vm: &VmFd, chip_id: u32) -> Value {
    let mut chip = kvm_bindings::kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    if let Err(e) = vm.get_irqchip(&mut chip) {
        return json!({"error": format!("KVM_GET_IRQCHIP: {e}")});
    }
    // SAFETY: KVM filled the union's PIC member for chip 0 (master) or 1 (slave).
    let s = unsafe { chip.chip.pic };
    json!({"irr": s.irr, "imr": s.imr, "isr": s.isr, "last_irr": s.last_irr})
}

/// A LAPIC register (32 bits at `off` of KVM_GET_LAPIC's page).
pub fn lapic_reg(l: &kvm_lapic_state, off: usize) -> u32 {
    let b = |i: usize| l.regs.get(off + i).map_or(0, |&c| c as u8);
    u32::from_le_bytes([b(0), b(1), b(2), b(3)])
}

/// The vectors set in a 256-bit LAPIC bitmap (ISR at 0x100, TMR at 0x180, IRR at 0x200).
pub fn lapic_vectors(l: &kvm_lapic_state, base: usize) -> Vec<String> {
    let mut out = Vec::new();
    for word in 0..8 {
        let v = lapic_reg(l, base + 0x10 * word);
        for bit in 0..32 {
            if v & (1 << bit) != 0 {
                out.push(format!("{:#04x}", word * 32 + bit));
            }
        }
    }
    out
}

/// The local APIC as fields: what is pending (IRR), in service (ISR), the task priority,
/// and the timer's LVT entry and counts.
pub fn lapic(l: &kvm_lapic_state) -> Value {
    let lvt_timer = lapic_reg(l, 0x320);
    let mode = match (lvt_timer >> 17) & 3 {
        0 => "one-shot",
        1 => "periodic",
        2 => "tsc-deadline",
        _ => "reserved",
    };
    json!({
        "id": lapic_reg(l, 0x20) >> 24,
        "enabled": lapic_reg(l, 0xf0) & 0x100 != 0,
        "tpr": lapic_reg(l, 0x80),
        "ppr": lapic_reg(l, 0xa0),
        "irr": lapic_vectors(l, 0x200),
        "isr": lapic_vectors(l, 0x100),
        "tmr": lapic_vectors(l, 0x180),
        "lvt_timer": {
            "raw": format!("{lvt_timer:#x}"),
            "vector": format!("{:#04x}", lvt_timer & 0xff),
            "masked": lvt_timer & (1 << 16) != 0,
            "mode": mode,
        },
        "timer_initial_count": lapic_reg(l, 0x380),
        "timer_current_count": lapic_reg(l, 0x390),
        "lvt_lint0": format!("{:#x}", lapic_reg(l, 0x350)),
        "lvt_lint1": format!("{:#x}", lapic_reg(l, 0x360)),
    })
}

fn msrs(fd: &VcpuFd) -> Value {
    let mut names = vec![
        (MSR_IA32_TSC, "tsc"),
        (MSR_IA32_TSC_DEADLINE, "tsc_deadline"),
    ];
    names.extend(KVM_MSRS);
    let entries: Vec<kvm_msr_entry> = names
        .iter()
        .map(|&(index, _)| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    let Ok(mut list) = Msrs::from_entries(&entries) else {
        return json!({"error": "MSR list"});
    };
    // KVM stops at the first MSR it does not know; the rest stay unread.
    let n = match fd.get_msrs(&mut list) {
        Ok(n) => n,
        Err(e) => return json!({"error": format!("KVM_GET_MSRS: {e}")}),
    };
    let mut out = serde_json::Map::new();
    for (e, (_, name)) in list.as_slice().iter().zip(&names).take(n) {
        out.insert(name.to_string(), json!(format!("{:#x}", e.data)));
    }
    let read = |i: usize| list.as_slice().get(i).filter(|_| i < n).map(|e| e.data);
    if let (Some(tsc), Some(deadline)) = (read(0), read(1)) {
        // Positive: armed, that many TSC ticks from now; negative: overdue.
        let left = if deadline == 0 {
            json!("disarmed")
        } else {
            json!(deadline as i128 - tsc as i128)
        };
        out.insert("tsc_deadline_minus_tsc".into(), left);
    }
    Value::Object(out)
}

fn mp_state_name(s: u32) -> &'static str {
    match s {
        kvm_bindings::KVM_MP_STATE_RUNNABLE => "runnable",
        kvm_bindings::KVM_MP_STATE_UNINITIALIZED => "uninitialized",
        kvm_bindings::KVM_MP_STATE_INIT_RECEIVED => "init_received",
        kvm_bindings::KVM_MP_STATE_HALTED => "halted",
        kvm_bindings::KVM_MP_STATE_SIPI_RECEIVED => "sipi_received",
        _ => "other",
    }
}

/// One vCPU's state, read on its own thread (between two KVM_RUNs).
pub fn read_vcpu(id: u8, fd: &VcpuFd) -> Value {
    let mut out = json!({"id": id});
    out["mp_state"] = match fd.get_mp_state() {
        Ok(s) => json!(mp_state_name(s.mp_state)),
        Err(e) => json!(format!("KVM_GET_MP_STATE: {e}")),
    };
    match fd.get_regs() {
        Ok(r) => {
            out["rip"] = json!(format!("{:#x}", r.rip));
            out["rflags"] = json!(format!("{:#x}", r.rflags));
            out["interrupts_enabled"] = json!(r.rflags & 0x200 != 0);
        }
        Err(e) => out["regs"] = json!(format!("KVM_GET_REGS: {e}")),
    }
    out["lapic"] = match fd.get_lapic() {
        Ok(l) => lapic(&l),
        Err(e) => json!(format!("KVM_GET_LAPIC: {e}")),
    };
    out["msrs"] = msrs(fd);
    out["events"] = match fd.get_vcpu_events() {
        Ok(e) => json!({
            "interrupt_injected": e.interrupt.injected,
            "interrupt_nr": e.interrupt.nr,
            "interrupt_shadow": e.interrupt.shadow,
            "nmi_pending": e.nmi.pending,
            "nmi_injected": e.nmi.injected,
            "nmi_masked": e.nmi.masked,
            "exception_injected": e.exception.injected,
            "exception_nr": e.exception.nr,
        }),
        Err(e) => json!(format!("KVM_GET_VCPU_EVENTS: {e}")),
    };
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lapic_with(regs: &[(usize, u32)]) -> kvm_lapic_state {
        let mut l = kvm_lapic_state::default();
        for &(off, v) in regs {
            for (i, b) in v.to_le_bytes().iter().enumerate() {
                l.regs[off + i] = *b as _;
            }
        }
        l
    }

    #[test]
    fn the_lapic_says_what_is_pending_in_service_and_how_its_timer_is_set() {
        // Timer vector 0xec in TSC-deadline mode; 0xec pending, 0x22 and 0xf3 in service.
        let l = lapic_with(&[
            (0x320, (2 << 17) | 0xec),
            (0x200 + 0x10 * 7, 1 << (0xec - 224)),
            (0x100 + 0x10, 1 << 2),
            (0x100 + 0x10 * 7, 1 << (0xf3 - 224)),
            (0xf0, 0x1ff),
        ]);
        let v = lapic(&l);
        assert_eq!(v["lvt_timer"]["mode"], "tsc-deadline");
        assert_eq!(v["lvt_timer"]["vector"], "0xec");
        assert_eq!(v["lvt_timer"]["masked"], false);
        assert_eq!(v["irr"], json!(["0xec"]));
        assert_eq!(v["isr"], json!(["0x22", "0xf3"]));
        assert_eq!(v["enabled"], true);
        let masked = lapic(&lapic_with(&[(0x320, (1 << 16) | 0xec)]));
        assert_eq!(masked["lvt_timer"]["masked"], true);
        assert_eq!(masked["lvt_timer"]["mode"], "one-shot");
    }

    #[test]
    fn a_vcpu_that_ended_or_never_started_is_not_kicked() {
        let never = VcpuProbe::default();
        assert_eq!(never.ask(0)["error"], "the vCPU is not running");
        // A guest that resets at once: its thread retires before the main thread records
        // it, which must not bring the (soon joined) thread back.
        let quick = VcpuProbe::default();
        quick.retire();
        // SAFETY: only compared and stored, never used: the probe is retired.
        quick.set_thread(unsafe { libc::pthread_self() });
        assert_eq!(*quick.thread.lock().unwrap(), VcpuThread::Retired);
        assert_eq!(quick.ask(1)["error"], "the vCPU is not running");
        assert!(!quick.requested.load(Ordering::SeqCst));
    }

    #[test]
    fn a_redirection_entry_reads_as_its_fields() {
        // Pin 5: vector 0x25, level-triggered, remote IRR set, unmasked, to APIC 0.
        let v = redirection(5, 0x25 | (1 << 15) | (1 << 14));
        assert_eq!(v["vector"], 0x25);
        assert_eq!(v["level"], true);
        assert_eq!(v["remote_irr"], true);
        assert_eq!(v["masked"], false);
        let masked = redirection(4, 1 << 16);
        assert_eq!(masked["masked"], true);
        assert_eq!(masked["level"], false);
    }
}
