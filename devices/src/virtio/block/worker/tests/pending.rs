//! ABI version 2 through a real queue: a plugin that leaves each write pending and writes
//! it itself with a lower request that does not wait, resuming it COMPLETE from the
//! completion, one timer later; the guest's write lands and is answered once.

use super::*;
use interceptor_sdk::{CreateContext, Decision, Interceptor, Lower, Request, Slot};

/// Holds each write 1 ms (a timer), then writes its data below itself (a lower request)
/// and completes it from that completion.
struct SelfWriter {
    lower: Arc<Lower>,
}

impl Interceptor for SelfWriter {
    const NAME: &'static std::ffi::CStr = c"self-writer";
    fn create(ctx: CreateContext<'_>) -> Result<Self, String> {
        Ok(SelfWriter {
            lower: Arc::new(ctx.lower),
        })
    }
    fn pre(&self, req: &mut Request<'_>, _: &mut Slot) -> Decision {
        let Some(h) = req.handle() else {
            return Decision::Continue;
        };
        if req.kind() != interceptor_sdk::RequestKind::Write {
            return Decision::Continue;
        }
        let mut data = vec![0u8; req.len() as usize];
        if req.read_data(0, &mut data).is_err() {
            return Decision::Fail;
        }
        let (lower, offset) = (self.lower.clone(), req.offset());
        let armed = self
            .lower
            .after(std::time::Duration::from_millis(1), move |_| {
                let l = lower.clone();
                let sent = lower.submit_write(h, offset, data, move |r, _| {
                    let d = if r.is_ok() {
                        Decision::Complete
                    } else {
                        Decision::Fail
                    };
                    let _ = l.resume(h, d);
                });
                if sent.is_err() {
                    let _ = lower.resume(h, Decision::Fail);
                }
            });
        match armed {
            Ok(()) => Decision::Pending,
            Err(_) => Decision::Fail,
        }
    }
}

#[test]
fn a_write_left_pending_is_written_by_its_plugin_and_answered_once() {
    let table = interceptor_sdk::static_table!(SelfWriter);
    let r = rig_with("pending", "self-writer", table, "{}".into());
    let mq = MockSplitQueue::new(&r.mem, 16);
    post_write(&r, &mq, 0, 5, 0xcd);
    let timer = super::super::super::coalesce::timers(1).unwrap().pop();
    let mut w = r.worker(mq.create_queue().unwrap()).with_exec_timer(timer);
    {
        let _on = w.entered();
        w.process_queue();
    }
    assert_eq!(
        mq.used().idx().load(),
        0,
        "still pending: the timer has not fired"
    );
    assert_eq!(w.in_flight(), 1);
    std::thread::sleep(std::time::Duration::from_millis(5));
    {
        let _on = w.entered();
        w.exec_timer_fired();
    }
    assert_eq!(
        mq.used().idx().load(),
        1,
        "answered once the plugin resumed it"
    );
    assert_eq!(w.in_flight(), 0);
    let disk = std::fs::read(&r.file).unwrap();
    assert!(
        disk[5 * 512..6 * 512].iter().all(|&b| b == 0xcd),
        "written by the plugin"
    );
    assert!(w.exec().idle());
}

#[test]
fn a_drain_fires_timers_cancelled_and_the_request_still_ends() {
    let table = interceptor_sdk::static_table!(SelfWriter);
    let r = rig_with("pending-drain", "self-writer", table, "{}".into());
    let mq = MockSplitQueue::new(&r.mem, 16);
    post_write(&r, &mq, 0, 6, 0xee);
    let mut w = r.worker(mq.create_queue().unwrap());
    {
        let _on = w.entered();
        w.process_queue();
    }
    assert_eq!(w.in_flight(), 1);
    // A reset or chain edit drains the queue: it does not wait out the timer.
    let t = std::time::Instant::now();
    let _on = w.entered();
    while !w.step() {}
    assert!(t.elapsed() < std::time::Duration::from_secs(1));
    assert_eq!(mq.used().idx().load(), 1);
    let disk = std::fs::read(&r.file).unwrap();
    assert!(disk[6 * 512..7 * 512].iter().all(|&b| b == 0xee));
}
