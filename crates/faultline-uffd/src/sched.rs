//! A thread's scheduling class, for a handler's work that should only take CPU nobody else wants.
//!
//! A fault handler fills pages nobody has asked for yet (a background fill) on the same CPUs as
//! the threads it serves — on a small host, a restored guest's vCPUs. In the kernel's
//! `SCHED_IDLE` class a thread runs when a CPU has nothing else to run; it is never starved for
//! ever (its weight is 3 against a normal thread's 1024), but a thread that waits for it may
//! wait long: whoever lowers a thread must be ready to raise it again ([`set_class`] on its id).
//!
//! Leaving `SCHED_IDLE` needs the right to run at the thread's nice value (`CAP_SYS_NICE`, or an
//! `RLIMIT_NICE` that allows it); [`can_leave_idle`] tries both ways on a short-lived thread of
//! its own. rustix 1.1 has no wrapper for these calls; the raw ones are in the crate's `sys`.

use rustix::io::Errno;
use rustix::thread::Pid;

use crate::sys;

/// A normal scheduling class.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SchedClass {
    /// `SCHED_OTHER`: the default time-sharing class.
    Normal,
    /// `SCHED_IDLE`: runs only on CPU time no normal thread wants.
    Idle,
    /// Any other policy (`SCHED_BATCH`, a real-time or deadline class): its number.
    Other(i32),
}

fn raw(thread: Option<Pid>) -> libc::pid_t {
    thread.map_or(0, |t| t.as_raw_nonzero().get())
}

/// Put `thread` (`None`: the calling thread) in `class` (`Normal` or `Idle`; others are refused
/// with `EINVAL`). Raising another thread needs the same rights as raising oneself.
pub fn set_class(thread: Option<Pid>, class: SchedClass) -> Result<(), Errno> {
    let policy = match class {
        SchedClass::Normal => libc::SCHED_OTHER,
        SchedClass::Idle => libc::SCHED_IDLE,
        SchedClass::Other(_) => return Err(Errno::INVAL),
    };
    sys::sched_setscheduler(raw(thread), policy)
}

/// The class of `thread` (`None`: the calling thread).
pub fn class_of(thread: Option<Pid>) -> Result<SchedClass, Errno> {
    Ok(match sys::sched_getscheduler(raw(thread))? {
        libc::SCHED_OTHER => SchedClass::Normal,
        libc::SCHED_IDLE => SchedClass::Idle,
        other => SchedClass::Other(other),
    })
}

/// Whether a thread of this process, now in the normal class, may go into `SCHED_IDLE` and come
/// back: tried on a thread of its own, which ends either way. `Err` names the step refused.
pub fn can_leave_idle() -> Result<(), String> {
    let probe = std::thread::Builder::new()
        .name("faultline-schedprobe".into())
        .spawn(|| {
            match class_of(None) {
                Ok(SchedClass::Normal) => {}
                Ok(c) => {
                    return Err(format!(
                        "this process does not run in the normal class ({c:?})"
                    ))
                }
                Err(e) => return Err(format!("sched_getscheduler: {e}")),
            }
            set_class(None, SchedClass::Idle).map_err(|e| format!("entering SCHED_IDLE: {e}"))?;
            set_class(None, SchedClass::Normal)
                .map_err(|e| format!("leaving SCHED_IDLE (needs CAP_SYS_NICE or RLIMIT_NICE): {e}"))
        })
        .map_err(|e| format!("starting a probe thread: {e}"))?;
    probe
        .join()
        .unwrap_or_else(|_| Err("the probe thread panicked".into()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // unwrap is how a test fails
mod tests {
    use super::*;

    #[test]
    fn a_thread_goes_idle_and_back_and_is_seen_so_from_another() {
        if let Err(why) = can_leave_idle() {
            // Unprivileged with RLIMIT_NICE 0 a thread cannot leave SCHED_IDLE; CI runs as root.
            assert!(std::env::var("CI").as_deref() != Ok("true"), "{why}");
            return faultline_testing::skip("sched: go idle and back", &why);
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let (go, wait) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || {
            assert_eq!(class_of(None).unwrap(), SchedClass::Normal);
            set_class(None, SchedClass::Idle).unwrap();
            tx.send(rustix::thread::gettid()).unwrap();
            wait.recv().unwrap();
            class_of(None).unwrap()
        });
        let tid = rx.recv().unwrap();
        assert_eq!(class_of(Some(tid)).unwrap(), SchedClass::Idle);
        // Raised from outside, as a handler raises a worker that a fault waits for.
        set_class(Some(tid), SchedClass::Normal).unwrap();
        assert_eq!(class_of(Some(tid)).unwrap(), SchedClass::Normal);
        go.send(()).unwrap();
        assert_eq!(t.join().unwrap(), SchedClass::Normal);
        assert_eq!(class_of(None).unwrap(), SchedClass::Normal);
    }

    #[test]
    fn only_the_normal_classes_can_be_set() {
        assert_eq!(
            set_class(None, SchedClass::Other(libc::SCHED_FIFO)),
            Err(Errno::INVAL)
        );
        assert_eq!(class_of(None).unwrap(), SchedClass::Normal);
    }
}
