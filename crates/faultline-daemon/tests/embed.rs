//! The daemon through its library API, in this process: start it on a socket, restore a client
//! through it (every byte checked), read its sessions and counters, shut it down.

mod common;

use faultline_daemon::{Daemon, DaemonConfig, Error};

#[test]
fn a_daemon_started_through_the_api_serves_a_client_and_shuts_down() {
    if !common::capable("a_daemon_started_through_the_api_serves_a_client_and_shuts_down") {
        return;
    }
    let dir = tempfile::tempdir().expect("a temporary directory");
    let mem = dir.path().join("vm.mem");
    common::write_mem_file(&mem, 256);
    let socket = dir.path().join("faultline.sock");
    let config = DaemonConfig {
        workers: Some(2),
        ..DaemonConfig::mem_file(&mem)
    };
    let daemon = Daemon::start(&config, &socket).expect("starting the daemon");
    assert!(socket.exists(), "the socket is bound");

    let restored = common::restore(&socket, &mem);
    assert_eq!(restored.pages, 256);
    assert_eq!(daemon.started(), 1, "one session started");
    assert_eq!(daemon.refused(), 0);
    let sessions = daemon.sessions();
    assert_eq!(sessions.len(), 1);
    assert_eq!(sessions[0].total_pages(), 256);
    // Every page was served once: copied, or a zero page (every 5th page is zero). The client
    // can finish while a readahead copy it no longer waits for is still being counted: the
    // counters are complete once every page is published present (they are added first).
    assert!(
        sessions[0].wait_all_present(std::time::Duration::from_secs(10)),
        "every page present"
    );
    let st = daemon.stats();
    assert!(st.faults >= 1, "{st:?}");
    assert!(st.pages + st.zero_pages >= 256, "{st:?}");
    assert!(daemon.server().prometheus().contains("faultline"));

    daemon.shutdown();
    assert!(!socket.exists(), "the socket is removed at shutdown");
    assert!(sessions[0].is_closed(), "the session ended with the daemon");
    drop(restored);
}

#[test]
fn a_second_daemon_on_a_live_socket_is_refused() {
    if !common::capable("a_second_daemon_on_a_live_socket_is_refused") {
        return;
    }
    let dir = tempfile::tempdir().expect("a temporary directory");
    let mem = dir.path().join("vm.mem");
    common::write_mem_file(&mem, 16);
    let socket = dir.path().join("faultline.sock");
    let config = DaemonConfig::mem_file(&mem);
    let first = Daemon::start(&config, &socket).expect("starting the daemon");
    let second = Daemon::start(&config, &socket).err();
    // A caller can tell what failed, and with which path; the message names it too.
    assert!(
        matches!(&second, Some(Error::SocketInUse { path }) if *path == socket),
        "{second:?}"
    );
    let text = second.map(|e| e.to_string());
    assert!(
        text.as_deref()
            .is_some_and(|e| e.contains("is a live socket")),
        "{text:?}"
    );
    first.shutdown();
}
