//! Crash recovery for `faultline serve`: a supervisor process and a worker process.
//!
//! A page-fault handler is on the critical path of every VM it serves: if it dies, the guests
//! freeze (Firecracker keeps its own copy of the userfaultfd, so nothing reads zero pages, but
//! nothing serves them either). So `faultline serve` splits in two:
//!
//! - the **supervisor** owns what must survive: the listening socket, and for every live session
//!   the client's socket, a pidfd of the client process, a duplicate of its userfaultfd, its
//!   validated regions and the ranges its balloon removed. It accepts clients, receives and
//!   validates their handshakes, and hands each session to the worker over a `SOCK_SEQPACKET`
//!   socket pair (JSON + the userfaultfd and the pidfd; the socket instead where the kernel
//!   cannot name the client process). The client's socket stays with the supervisor.
//! - the **worker** (`faultline serve-worker`, the same binary, the pair on its stdin) runs the fault
//!   server. It tells the supervisor when a session ends and every REMOVE it applies.
//!
//! When the worker dies (a crash, an OOM kill, SIGKILL), the supervisor starts a new one and hands
//! it every live session again, marked `resume`: the new worker applies the recorded REMOVEs (those
//! pages still read zero), then wakes every thread blocked on each region — faults whose messages
//! the dead worker had read but not resolved fault again and are served; pages already present
//! stay (a resolve of one answers EEXIST and is counted, never overwritten).

use std::collections::HashMap;
use std::io::{IoSlice, IoSliceMut, Read};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context, Result};
use faultline::firecracker::{PeerCred, ValidatedRegion};
use faultline_uffd::Uffd;
use rustix::io::Errno;
use rustix::net::{
    recvmsg, sendmsg, AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketFlags, SocketType,
};
use serde::{Deserialize, Serialize};

use crate::serve::{accept_loop, bind, Accepted, ConnCtx, Core, Hooks, OnExit, ServeArgs};

/// A region as the supervisor keeps it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct Reg {
    start: u64,
    len: u64,
    page_size: u64,
    offset: u64,
}

/// Supervisor → worker.
#[derive(Debug, Serialize, Deserialize)]
struct SessionMsg {
    id: u64,
    pid: i32,
    uid: u32,
    regions: Vec<Reg>,
    /// Taken over from a dead worker: the ranges removed so far.
    resume: Option<Vec<(u64, u64)>>,
    /// The second fd is a pidfd of the client process (else the client's socket, whose
    /// hang-up then ends the session).
    #[serde(default)]
    pidfd: bool,
}

/// Worker → supervisor.
#[derive(Debug, Serialize, Deserialize)]
enum Report {
    Ended { id: u64 },
    Removed { id: u64, start: u64, end: u64 },
}

/// What the supervisor keeps of a live session.
struct Record {
    /// The client's socket: kept open while the session lives.
    socket: Option<OwnedFd>,
    /// The client process.
    pidfd: Option<OwnedFd>,
    uffd: OwnedFd,
    regions: Vec<Reg>,
    peer: PeerCred,
    removed: Vec<(u64, u64)>,
}

/// Send one message with fds on a SEQPACKET socket.
fn send_msg(
    fd: BorrowedFd<'_>,
    msg: &impl Serialize,
    fds: &[BorrowedFd<'_>],
) -> std::io::Result<()> {
    let bytes = serde_json::to_vec(msg)?;
    let rights = SendAncillaryMessage::ScmRights(fds);
    let mut space = vec![MaybeUninit::<u8>::uninit(); rights.size()];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(rights) {
        return Err(std::io::Error::other("SCM_RIGHTS does not fit"));
    }
    loop {
        match sendmsg(
            fd,
            &[IoSlice::new(&bytes)],
            &mut control,
            SendFlags::NOSIGNAL,
        ) {
            Ok(_) => return Ok(()),
            Err(Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Receive one message with its fds; `None` when the peer is gone.
fn recv_msg(fd: BorrowedFd<'_>) -> std::io::Result<Option<(Vec<u8>, Vec<OwnedFd>)>> {
    let mut buf = vec![0u8; 1 << 20];
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(4))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let n = loop {
        match recvmsg(
            fd,
            &mut [IoSliceMut::new(&mut buf)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        ) {
            Ok(r) => break r.bytes,
            Err(Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    };
    let mut fds = Vec::new();
    for m in control.drain() {
        if let RecvAncillaryMessage::ScmRights(rights) = m {
            fds.extend(rights);
        }
    }
    if n == 0 && fds.is_empty() {
        return Ok(None);
    }
    buf.truncate(n);
    Ok(Some((buf, fds)))
}

struct Worker {
    child: Child,
    control: OwnedFd,
}

fn spawn_worker(args: &ServeArgs) -> Result<Worker> {
    let (ours, theirs) = rustix::net::socketpair(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )?;
    let exe = std::env::current_exe().context("finding the faultline binary")?;
    let mut cmd = Command::new(exe);
    cmd.arg("serve-worker")
        .args(worker_flags(args))
        .stdin(Stdio::from(theirs));
    let child = cmd.spawn().context("starting the serve worker")?;
    tracing::info!(worker = child.id(), "worker started");
    Ok(Worker {
        child,
        control: ours,
    })
}

/// The worker's command line: the serving flags of `args` (not the socket: the supervisor has it).
fn worker_flags(a: &ServeArgs) -> Vec<String> {
    let mut v = vec![
        "--socket".into(),
        a.socket.display().to_string(),
        "--readahead".into(),
        format!("{:?}", a.readahead).to_lowercase(),
        "--readahead-pages".into(),
        a.readahead_pages.to_string(),
        "--log-format".into(),
        format!("{:?}", a.log_format).to_lowercase(),
        "--on-exit".into(),
        format!("{:?}", a.on_exit).to_lowercase(),
        "--handshake-timeout".into(),
        a.handshake_timeout.to_string(),
    ];
    if let Some(p) = &a.mem_file {
        v.extend(["--mem-file".into(), p.display().to_string()]);
    }
    if let Some(p) = &a.image {
        v.extend(["--image".into(), p.display().to_string()]);
    }
    if let Some(id) = &a.image_id {
        v.extend(["--image-id".into(), faultline::image::hex(id)]);
    }
    if let Some(r) = &a.remote {
        v.extend(["--remote".into(), r.clone()]);
        v.extend(a.remote_flags.to_args());
    }
    v.extend(a.object.to_args());
    if let Some(w) = a.workers {
        v.extend(["--workers".into(), w.to_string()]);
    }
    if a.pin_workers {
        v.push("--pin-workers".into());
    }
    if let Some(p) = &a.record_ws {
        v.extend(["--record-ws".into(), p.display().to_string()]);
    }
    if let Some(p) = &a.prefetch_ws {
        v.extend(["--prefetch-ws".into(), p.display().to_string()]);
    }
    if a.background_fill {
        v.push("--background-fill".into());
    }
    if let Some(m) = &a.metrics {
        v.extend(["--metrics".into(), m.clone()]);
    }
    if a.no_zero_scan {
        v.push("--no-zero-scan".into());
    }
    v
}

/// Hand a session to the worker.
fn hand_over(control: BorrowedFd<'_>, id: u64, r: &Record, resume: bool) -> std::io::Result<()> {
    let msg = SessionMsg {
        id,
        pid: r.peer.pid,
        uid: r.peer.uid,
        regions: r.regions.clone(),
        resume: resume.then(|| r.removed.clone()),
        pidfd: r.pidfd.is_some(),
    };
    let mut fds = vec![r.uffd.as_fd()];
    fds.extend(r.pidfd.as_ref().or(r.socket.as_ref()).map(AsFd::as_fd));
    send_msg(control, &msg, &fds)
}

/// `faultline serve` (supervised): run until SIGTERM or SIGINT.
pub fn run(args: ServeArgs) -> Result<()> {
    let term = Arc::new(AtomicBool::new(false));
    let (sig_rx, sig_tx) = UnixStream::pair()?;
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, Arc::clone(&term))?;
        signal_hook::low_level::pipe::register(sig, sig_tx.try_clone()?)?;
    }
    // Validate the memory file (and working set) here too, so a bad flag fails at once.
    let mem_len = crate::serve::snapshot_len(&args)?;
    if let Some(p) = &args.prefetch_ws {
        faultline::WorkingSet::load(p)
            .with_context(|| format!("reading the working set {}", p.display()))?;
    }
    let listener = bind(&args.socket)?;
    let records: Arc<Mutex<HashMap<u64, Record>>> = Arc::new(Mutex::new(HashMap::new()));
    let worker = Arc::new(Mutex::new(spawn_worker(&args)?));
    let next_id = Arc::new(std::sync::atomic::AtomicU64::new(1));

    // Accept on a thread; each handshake on its own thread; accepted sessions go to the worker.
    let limits = faultline::firecracker::Limits {
        timeout: Duration::from_secs(args.handshake_timeout.max(1)),
        mem_len: Some(mem_len),
        ..Default::default()
    };
    let (records2, worker2, next2) = (
        Arc::clone(&records),
        Arc::clone(&worker),
        Arc::clone(&next_id),
    );
    let dispatch = Box::new(move |c: Accepted| {
        let id = next2.fetch_add(1, Ordering::AcqRel);
        let regions = c
            .regions
            .iter()
            .map(|r| Reg {
                start: r.start,
                len: r.len,
                page_size: r.page_size,
                offset: r.offset,
            })
            .collect();
        let record = Record {
            socket: c.socket,
            pidfd: c.pidfd,
            uffd: c.uffd.into_fd(),
            regions,
            peer: c.peer,
            removed: Vec::new(),
        };
        // Hold the records lock while handing over, so a worker restart cannot miss it. A
        // poisoned lock still guards consistent records (each insert or remove is one call).
        let mut recs = records2.lock().unwrap_or_else(PoisonError::into_inner);
        let w = worker2.lock().unwrap_or_else(PoisonError::into_inner);
        if let Err(e) = hand_over(w.control.as_fd(), id, &record, false) {
            tracing::warn!(error = %e, "worker unavailable; the session will be handed to its successor");
        }
        recs.insert(id, record);
    });
    let ctx = Arc::new(ConnCtx::new(
        &args,
        limits,
        Arc::new(AtomicU64::new(0)),
        dispatch,
    ));
    let stop = Arc::new(AtomicBool::new(false));
    let (wake_rx, wake_tx) = UnixStream::pair()?;
    let accept = {
        let (stop, ctx) = (Arc::clone(&stop), Arc::clone(&ctx));
        std::thread::Builder::new()
            .name("faultline-accept".into())
            .spawn(move || accept_loop(listener, wake_rx, stop, ctx))?
    };
    tracing::info!(socket = %args.socket.display(), snapshot = %crate::serve::snapshot_name(&args), "serving (supervised)");

    // Main loop: reports from the worker, the worker's death, signals.
    use rustix::event::{poll, PollFd, PollFlags};
    let mut b = [0u8; 64];
    loop {
        if term.load(Ordering::Acquire) {
            break;
        }
        let control = {
            let w = worker
                .lock()
                .map_err(|_| anyhow::anyhow!("worker lock poisoned"))?;
            w.control.try_clone()?
        };
        let mut fds = [
            PollFd::new(&control, PollFlags::IN),
            PollFd::new(&sig_rx, PollFlags::IN),
        ];
        match poll(&mut fds, None) {
            Ok(_) | Err(Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
        if !fds[1].revents().is_empty() {
            let _ = (&sig_rx).read(&mut b);
            continue;
        }
        if fds[0].revents().is_empty() {
            continue;
        }
        match recv_msg(control.as_fd()) {
            Ok(Some((bytes, _))) => match serde_json::from_slice::<Report>(&bytes) {
                Ok(Report::Ended { id }) => {
                    if let Ok(mut r) = records.lock() {
                        r.remove(&id);
                    }
                }
                Ok(Report::Removed { id, start, end }) => {
                    if let Ok(mut r) = records.lock() {
                        if let Some(rec) = r.get_mut(&id) {
                            rec.removed.push((start, end));
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "malformed report from the worker"),
            },
            Ok(None) | Err(_) => {
                // The worker is gone: reap it, start another, hand it every live session.
                let mut recs = records
                    .lock()
                    .map_err(|_| anyhow::anyhow!("records lock poisoned"))?;
                let mut w = worker
                    .lock()
                    .map_err(|_| anyhow::anyhow!("worker lock poisoned"))?;
                let status = w.child.wait()?;
                if term.load(Ordering::Acquire) {
                    break;
                }
                tracing::error!(worker = w.child.id(), %status, sessions = recs.len(), "worker died; restarting it and resuming every session");
                *w = spawn_worker(&args)?;
                recs.retain(|id, r| match hand_over(w.control.as_fd(), *id, r, true) {
                    Ok(()) => true,
                    Err(e) => {
                        tracing::error!(session = id, error = %e, "cannot hand a session to the new worker");
                        false
                    }
                });
            }
        }
    }
    tracing::info!("supervisor stopping");
    stop.store(true, Ordering::Release);
    let _ = std::io::Write::write_all(&mut &wake_tx, b"x");
    let _ = accept.join();
    {
        let mut w = worker
            .lock()
            .map_err(|_| anyhow::anyhow!("worker lock poisoned"))?;
        stop_worker(&mut w.child);
    }
    let _ = std::fs::remove_file(&args.socket);
    Ok(())
}

/// Ask the worker to stop (SIGTERM) and wait for it to exit. The signal is sent again every
/// second while it lives: one that lands while the worker is still starting can go unseen (a CI
/// run here once saw a freshly started worker outlive a single SIGTERM), and the worker's handler
/// only sets a flag, so a repeat is harmless — a draining worker keeps draining.
fn stop_worker(child: &mut Child) {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    let pid = rustix::process::Pid::from_child(child);
    // Readable when the process exits; without it (very old kernels), one signal and a wait.
    if let Ok(pidfd) = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()) {
        let second = Timespec {
            tv_sec: 1,
            tv_nsec: 0,
        };
        for waited_s in 0u64.. {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            let mut fds = [PollFd::new(&pidfd, PollFlags::IN)];
            if matches!(poll(&mut fds, Some(&second)), Ok(n) if n > 0) {
                break;
            }
            if waited_s > 0 && waited_s % 5 == 0 {
                tracing::warn!(
                    worker = child.id(),
                    waited_s,
                    "the worker has not exited yet"
                );
            }
        }
    } else {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    }
    let _ = child.wait();
}

/// `faultline serve-worker`: the serving half; its stdin is the control socket.
pub fn run_worker(args: ServeArgs) -> Result<()> {
    crate::serve::init_logging(args.log_format);
    crate::serve::raise_fd_limit();
    let term = Arc::new(AtomicBool::new(false));
    let (sig_rx, sig_tx) = UnixStream::pair()?;
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, Arc::clone(&term))?;
        signal_hook::low_level::pipe::register(sig, sig_tx.try_clone()?)?;
    }
    let core = Arc::new(Core::build(&args)?);
    let stdin = std::io::stdin();
    let control: OwnedFd = stdin.as_fd().try_clone_to_owned()?;
    let control = Arc::new(control);
    // Sessions arrive on a thread; the main thread waits for the signal.
    {
        let (core, control) = (Arc::clone(&core), Arc::clone(&control));
        std::thread::Builder::new()
            .name("faultline-control".into())
            .spawn(move || loop {
                let (bytes, fds) = match recv_msg(control.as_fd()) {
                    Ok(Some(m)) => m,
                    Ok(None) | Err(_) => {
                        tracing::error!("the supervisor is gone; exiting");
                        std::process::exit(1);
                    }
                };
                let msg: SessionMsg = match serde_json::from_slice(&bytes) {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::error!(error = %e, "malformed session from the supervisor");
                        continue;
                    }
                };
                let mut fds = fds.into_iter();
                let (Some(uffd), second) = (fds.next(), fds.next()) else {
                    tracing::error!(session = msg.id, "session without its userfaultfd");
                    continue;
                };
                let (pidfd, socket) = if msg.pidfd {
                    (second, None)
                } else {
                    (None, second)
                };
                let uffd = match Uffd::from_received_fd(uffd) {
                    Ok(u) => u,
                    Err(e) => {
                        tracing::error!(session = msg.id, error = %e, "not a userfaultfd");
                        continue;
                    }
                };
                let id = msg.id;
                let (c1, c2) = (Arc::clone(&control), Arc::clone(&control));
                let hooks = Hooks {
                    ended: Some(Box::new(move || {
                        let _ = send_msg(c1.as_fd(), &Report::Ended { id }, &[]);
                    })),
                    removed: Some(faultline::RemoveHook(Box::new(move |start, end| {
                        let _ = send_msg(c2.as_fd(), &Report::Removed { id, start, end }, &[]);
                    }))),
                };
                let accepted = crate::serve::Accepted {
                    uffd,
                    regions: msg
                        .regions
                        .iter()
                        .map(|r| ValidatedRegion {
                            start: r.start,
                            len: r.len,
                            page_size: r.page_size,
                            offset: r.offset,
                        })
                        .collect(),
                    peer: PeerCred {
                        pid: msg.pid,
                        uid: msg.uid,
                        gid: 0,
                    },
                    pidfd,
                    socket,
                };
                if msg.resume.is_some() {
                    tracing::info!(
                        session = id,
                        pid = msg.pid,
                        "resuming a session of a dead worker"
                    );
                }
                if core.start_session(accepted, msg.resume, hooks).is_err() {
                    let _ = send_msg(control.as_fd(), &Report::Ended { id }, &[]);
                }
            })?;
    }
    let mut b = [0u8; 16];
    while !term.load(Ordering::Acquire) {
        let _ = (&sig_rx).read(&mut b);
    }
    tracing::info!(
        sessions = core.server.sessions().len(),
        started = core.started.load(Ordering::Relaxed),
        refused = core.refused.load(Ordering::Relaxed),
        "stopping"
    );
    if args.on_exit == OnExit::Drain {
        core.drain();
    }
    for s in core.server.sessions() {
        let _ = core.server.remove_session(s.id());
    }
    core.flush();
    Ok(())
}
