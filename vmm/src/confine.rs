//! What every thread of the vmm runs first: its kind's Landlock rules (which files it may
//! open), then its seccomp filter (which calls it may make; it forbids Landlock's own).

use crate::seccomp::ThreadKind;

/// Confines the calling thread as `kind` with the process's rules and filters
/// ([`crate::landlock::install`], [`crate::seccomp::install`]). A thread that cannot be
/// confined ends the process with status 1 and one line on stderr: the vmm never runs a
/// thread unconfined when confinement is on.
pub fn current_thread(kind: ThreadKind) {
    let confined =
        crate::landlock::apply_current(kind).and_then(|()| crate::seccomp::apply_current(kind));
    if let Err(e) = confined {
        eprintln!("vmm: {e}");
        std::process::exit(1);
    }
}
