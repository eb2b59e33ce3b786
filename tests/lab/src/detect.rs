//! Which kind of KVM this host has: hardware virtualization, or something that needs the lab.

use std::fmt;
use std::path::Path;

/// Where guests run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvmMode {
    /// `/dev/kvm` is backed by VT-x or AMD-V: run guests directly.
    Hardware,
    /// No usable hardware KVM: run guests inside the nested lab VM.
    Lab,
}

impl fmt::Display for KvmMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KvmMode::Hardware => "hardware",
            KvmMode::Lab => "lab",
        })
    }
}

/// The decision and the facts it was made from, for the "which mode ran" line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Detection {
    pub mode: KvmMode,
    pub reason: String,
}

/// The facts detection looks at, read from the host (or given by a test).
#[derive(Clone, Debug, Default)]
pub struct HostFacts<'a> {
    /// Contents of `/proc/cpuinfo`.
    pub cpuinfo: &'a str,
    /// Whether `/sys/module/kvm_pvm` exists (KVM without hardware virtualization).
    pub kvm_pvm_loaded: bool,
    /// Whether `/dev/kvm` exists.
    pub dev_kvm: bool,
}

/// True when some CPU's `flags` line lists `vmx` (Intel VT-x) or `svm` (AMD-V).
pub fn cpu_has_virt_extensions(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter_map(|line| line.split_once(':'))
        .filter(|(key, _)| key.trim() == "flags")
        .any(|(_, flags)| flags.split_whitespace().any(|f| f == "vmx" || f == "svm"))
}

/// Hardware KVM is usable when the CPU has VT-x/AMD-V, `/dev/kvm` exists and the KVM
/// module is not `kvm_pvm` (which emulates 64-bit guest code and cannot boot Linux).
pub fn detect_from(facts: &HostFacts<'_>) -> Detection {
    let virt = cpu_has_virt_extensions(facts.cpuinfo);
    let (mode, reason) = if facts.kvm_pvm_loaded {
        (
            KvmMode::Lab,
            "/dev/kvm is kvm_pvm (software KVM that cannot boot Linux)",
        )
    } else if !virt {
        (KvmMode::Lab, "the CPU has no vmx/svm flag")
    } else if !facts.dev_kvm {
        (KvmMode::Lab, "/dev/kvm does not exist")
    } else {
        (
            KvmMode::Hardware,
            "vmx/svm present and /dev/kvm is real KVM",
        )
    };
    Detection {
        mode,
        reason: reason.to_string(),
    }
}

/// Detects this host's mode. `VMM_KVM_MODE=lab|hardware` overrides the decision.
pub fn detect() -> Detection {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let facts = HostFacts {
        cpuinfo: &cpuinfo,
        kvm_pvm_loaded: Path::new("/sys/module/kvm_pvm").exists(),
        dev_kvm: Path::new("/dev/kvm").exists(),
    };
    let detected = detect_from(&facts);
    match std::env::var("VMM_KVM_MODE").as_deref() {
        Ok("lab") => Detection {
            mode: KvmMode::Lab,
            reason: format!("forced by VMM_KVM_MODE=lab ({})", detected.reason),
        },
        Ok("hardware") => Detection {
            mode: KvmMode::Hardware,
            reason: format!("forced by VMM_KVM_MODE=hardware ({})", detected.reason),
        },
        _ => detected,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Abridged /proc/cpuinfo of this project's CI machine (kvm_pvm host, no vmx/svm).
    const PVM_HOST: &str = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC\n\
        flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge cmov pat sse sse2 ht \
        syscall nx lm constant_tsc rep_good nopl cpuid pni ssse3 cx16 sse4_1 sse4_2 popcnt \
        hypervisor lahf_lm cmp_legacy\nbugs\t\t: sysret_ss_attrs\n\n";
    // Abridged /proc/cpuinfo inside the lab VM (QEMU TCG, -cpu max).
    const LAB_VM: &str = "processor\t: 0\nvendor_id\t: AuthenticAMD\n\
        model name\t: QEMU TCG CPU version 2.5+\nflags\t\t: fpu de pse tsc msr pae mce cx8 \
        apic sep pge cmov lm svm extapic cr8_legacy abm sse4a npt nrip_save\n\n";
    // An Intel workstation.
    const INTEL: &str = "processor\t: 0\nvendor_id\t: GenuineIntel\n\
        flags\t\t: fpu vme de pse tsc msr vmx smx est tm2 ssse3\n\n";

    fn facts(cpuinfo: &str, pvm: bool, dev: bool) -> KvmMode {
        detect_from(&HostFacts {
            cpuinfo,
            kvm_pvm_loaded: pvm,
            dev_kvm: dev,
        })
        .mode
    }

    #[test]
    fn this_machine_kind_needs_the_lab() {
        assert_eq!(facts(PVM_HOST, true, true), KvmMode::Lab);
        let d = detect_from(&HostFacts {
            cpuinfo: PVM_HOST,
            kvm_pvm_loaded: true,
            dev_kvm: true,
        });
        assert!(d.reason.contains("kvm_pvm"), "{}", d.reason);
    }

    #[test]
    fn inside_the_lab_kvm_is_hardware() {
        assert_eq!(facts(LAB_VM, false, true), KvmMode::Hardware);
    }

    #[test]
    fn intel_host_with_kvm_is_hardware() {
        assert_eq!(facts(INTEL, false, true), KvmMode::Hardware);
    }

    #[test]
    fn virt_flag_without_dev_kvm_needs_the_lab() {
        assert_eq!(facts(INTEL, false, false), KvmMode::Lab);
    }

    #[test]
    fn kvm_pvm_wins_even_with_virt_flags() {
        assert_eq!(facts(LAB_VM, true, true), KvmMode::Lab);
    }

    #[test]
    fn flag_match_is_whole_word_on_flags_lines_only() {
        // "svm" inside another word, or outside a flags line, is not AMD-V.
        assert!(!cpu_has_virt_extensions("flags\t: fpu svmx nosvm\n"));
        assert!(!cpu_has_virt_extensions("model name\t: svm vmx\n"));
        assert!(cpu_has_virt_extensions("flags\t: fpu svm\n"));
        assert!(!cpu_has_virt_extensions(""));
    }
}
