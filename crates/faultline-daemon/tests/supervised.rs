//! A supervised daemon through the library API, embedded the way the crate docs say: this test
//! binary is its own worker program (`main` calls `worker::main_if_worker()` first, and the
//! supervisor starts `WorkerCommand::current_exe()`). It restores a client through the worker
//! (every byte checked), kills the worker and restores a second client through its successor,
//! then shuts down. (`harness = false`: the test needs its own `main`.)

mod common;

use faultline_daemon::{DaemonConfig, Supervisor, WorkerCommand};

fn main() {
    faultline_daemon::worker::main_if_worker();
    a_supervised_daemon_serves_through_its_worker_and_survives_its_death();
    println!("test a_supervised_daemon_serves_through_its_worker_and_survives_its_death ... ok");
}

fn a_supervised_daemon_serves_through_its_worker_and_survives_its_death() {
    if !common::capable("a_supervised_daemon_serves_through_its_worker_and_survives_its_death") {
        return;
    }
    let dir = tempfile::tempdir().expect("a temporary directory");
    let mem = dir.path().join("vm.mem");
    common::write_mem_file(&mem, 128);
    let socket = dir.path().join("faultline.sock");
    let config = DaemonConfig::mem_file(&mem);
    let command = WorkerCommand::current_exe().expect("this test binary");
    let sup = Supervisor::start(&config, &socket, command).expect("starting the supervisor");
    let first_worker = sup.worker_pid().expect("a worker runs");

    let a = common::restore(&socket, &mem);
    assert_eq!(a.pages, 128);
    assert_eq!(sup.sessions(), 1);

    // The worker dies: its successor takes the session over, and serves new clients.
    let pid =
        rustix::process::Pid::from_raw(i32::try_from(first_worker).expect("a pid")).expect("a pid");
    rustix::process::kill_process(pid, rustix::process::Signal::KILL).expect("killing the worker");
    // No waiting for the successor: a client that comes meanwhile is kept by the supervisor and
    // handed to whichever worker serves next.
    let b = common::restore(&socket, &mem);
    let second_worker = sup.worker_pid().expect("a worker runs");
    assert_ne!(second_worker, first_worker, "the dead worker was replaced");
    assert_eq!(b.pages, 128);
    assert_eq!(sup.sessions(), 2, "the first session survived its worker");
    let ids: Vec<u64> = sup.session_stats().iter().map(|&(id, _)| id).collect();
    assert_eq!(ids, [1, 2], "each session keeps the supervisor's id");

    sup.shutdown().expect("a clean stop");
    assert!(!socket.exists(), "the socket is removed at shutdown");
    drop((a, b));
}
