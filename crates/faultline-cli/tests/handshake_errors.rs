//! A malformed, lying, silent or half-sent Firecracker handshake is refused with a log line that
//! names the problem, its connection is closed, and the daemon keeps serving: every case below is
//! followed by a good `faultline client` that restores all of its memory, byte for byte.
//!
//! The bad handshakes are sent raw from this process with `firecracker::send_with_fds`, with a
//! real userfaultfd attached where the case needs one.

mod common;

use std::io::{ErrorKind, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{fields, is_message, is_refusal, summary, workdir, Daemon, DEADLINE, MEM_LEN};
use faultline::firecracker::{encode_mappings, send_with_fds, GuestRegionUffdMapping, JsonShape};
use faultline_uffd::{Features, Mapping, MemoryKind, RegisterMode, Uffd};

/// A plausible guest address (nothing is registered there: these handshakes are refused).
const BASE: u64 = 0x7f00_0000_0000;

/// One region in the v1.12+ shape.
fn region(base: u64, size: u64, offset: u64, page_size: u64) -> String {
    format!(
        r#"{{"base_host_virt_addr": {base}, "size": {size}, "offset": {offset}, "page_size": {page_size}, "page_size_kib": {page_size}}}"#
    )
}

/// A JSON array of `regions`.
fn array(regions: &[String]) -> Vec<u8> {
    format!("[{}]", regions.join(", ")).into_bytes()
}

/// A valid description of the whole memory file as one region.
fn whole_file() -> Vec<u8> {
    array(&[region(BASE, MEM_LEN, 0, 4096)])
}

fn uffd() -> Uffd {
    Uffd::new(Features::EVENT_REMOVE).expect("creating a userfaultfd")
}

fn memfd(len: u64) -> OwnedFd {
    let fd = rustix::fs::memfd_create("guest-memory", rustix::fs::MemfdFlags::CLOEXEC)
        .expect("memfd_create");
    rustix::fs::ftruncate(&fd, len).expect("ftruncate");
    fd
}

fn pipe() -> (OwnedFd, OwnedFd) {
    rustix::pipe::pipe().expect("pipe")
}

/// Sends `bytes` with `fds` on a new connection to the daemon; returns the connection.
fn send(daemon: &Daemon, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> UnixStream {
    let stream = UnixStream::connect(daemon.socket()).expect("connecting to the daemon");
    send_with_fds(&stream, bytes, fds, usize::MAX).expect("sending the handshake");
    stream
}

/// Asserts the daemon closed `stream` (end of file, or a reset if it closed with bytes unread).
fn assert_closed_by_daemon(mut stream: UnixStream) {
    stream
        .set_read_timeout(Some(DEADLINE))
        .expect("read timeout");
    let mut byte = [0u8; 1];
    match stream.read(&mut byte) {
        Ok(0) => {}
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        other => panic!("the daemon did not close the refused connection: {other:?}"),
    }
}

/// Waits for the refusal naming `needle`, checks the connection was closed and the daemon is
/// alive, and that a good client is then served in full. Returns the logged error.
fn refused_then_served(
    daemon: &mut Daemon,
    mem: &Path,
    stream: UnixStream,
    needle: &str,
) -> String {
    let error = daemon.wait_refusal(needle);
    assert_closed_by_daemon(stream);
    daemon.assert_alive();
    let report = daemon.client(mem, &[]);
    assert_eq!(report["pages"], MEM_LEN / 4096);
    daemon.assert_alive();
    // The good client's session was the only one: every refused handshake started none. (Its
    // log line may reach us after the client's report: wait for it, then count.)
    daemon.log().wait_for("the good client's session", |l| {
        is_message(l, "session started")
    });
    let started = daemon.log().count(|l| is_message(l, "session started"));
    assert_eq!(started, 1, "{}", daemon.log().text());
    error
}

/// Sends `bytes` with a real userfaultfd and expects a refusal naming `needle`.
fn case(bytes: &[u8], needle: &str) -> String {
    let (dir, mem) = workdir();
    let mut daemon = Daemon::start(dir.path(), &mem, &["--on-refused", "close"]);
    let uffd = uffd();
    let stream = send(&daemon, bytes, &[uffd.as_fd()]);
    refused_then_served(&mut daemon, &mem, stream, needle)
}

#[test]
fn invalid_json_is_refused() {
    let e = case(br#"[{"base_host_virt_addr": 1,}]"#, "not valid JSON");
    assert!(e.contains("line 1, column"), "{e}");
}

#[test]
fn json_that_is_not_an_array_is_refused() {
    case(
        br#"{"regions": []}"#,
        "must be a JSON array of regions, found an object",
    );
}

#[test]
fn empty_array_is_refused() {
    case(b"[]", "handshake lists no regions");
}

#[test]
fn whitespace_then_close_is_refused() {
    // An "empty" message: only a newline (the least a stream can carry fds with), then EOF.
    let (dir, mem) = workdir();
    let mut daemon = Daemon::start(dir.path(), &mem, &["--on-refused", "close"]);
    let uffd = uffd();
    let stream = send(&daemon, b"\n", &[uffd.as_fd()]);
    stream
        .shutdown(std::net::Shutdown::Write)
        .expect("shutdown");
    refused_then_served(
        &mut daemon,
        &mem,
        stream,
        "client closed the connection after 1 bytes",
    );
}

#[test]
fn message_without_fd_is_refused() {
    let (dir, mem) = workdir();
    let mut daemon = Daemon::start(dir.path(), &mem, &["--on-refused", "close"]);
    let stream = send(&daemon, &whole_file(), &[]);
    refused_then_served(&mut daemon, &mem, stream, "carried no file descriptor");
}

#[test]
fn three_fds_are_refused() {
    let (dir, mem) = workdir();
    let mut daemon = Daemon::start(dir.path(), &mem, &["--on-refused", "close"]);
    let (uffd, a, b) = (uffd(), memfd(MEM_LEN), memfd(MEM_LEN));
    let stream = send(
        &daemon,
        &whole_file(),
        &[uffd.as_fd(), a.as_fd(), b.as_fd()],
    );
    refused_then_served(&mut daemon, &mem, stream, "carried 3 file descriptors");
}

#[test]
fn a_pipe_instead_of_the_userfaultfd_is_refused() {
    let (dir, mem) = workdir();
    let mut daemon = Daemon::start(dir.path(), &mem, &["--on-refused", "close"]);
    let (r, _w) = pipe();
    let stream = send(&daemon, &whole_file(), &[r.as_fd()]);
    let e = refused_then_served(&mut daemon, &mem, stream, "is not a userfaultfd");
    assert!(e.contains("pipe:["), "{e}");
    // Two fds, neither a userfaultfd: the first is named.
    let m = memfd(MEM_LEN);
    let stream = send(&daemon, &whole_file(), &[r.as_fd(), m.as_fd()]);
    let e = daemon.wait_refusal("is not a userfaultfd");
    assert!(e.contains("pipe:["), "{e}");
    assert_closed_by_daemon(stream);
    daemon.client(&mem, &[]);
    daemon.assert_alive();
}

#[test]
fn a_pipe_then_the_userfaultfd_is_refused() {
    // [pipe, uffd]: the handler recognises the userfaultfd in second position (forks that send
    // [memfd, uffd]); the pipe then stands where the guest-memory file goes, and is named.
    let (dir, mem) = workdir();
    let mut daemon = Daemon::start(dir.path(), &mem, &["--on-refused", "close"]);
    let (r, _w) = pipe();
    let uffd = uffd();
    let stream = send(&daemon, &whole_file(), &[r.as_fd(), uffd.as_fd()]);
    let e = refused_then_served(&mut daemon, &mem, stream, "not a guest-memory file");
    assert!(e.contains("pipe:["), "{e}");
}

#[test]
fn a_pipe_as_the_memory_fd_is_named() {
    let (dir, mem) = workdir();
    let mut daemon = Daemon::start(dir.path(), &mem, &["--on-refused", "close"]);
    let (r, _w) = pipe();
    let uffd = uffd();
    let stream = send(&daemon, &whole_file(), &[uffd.as_fd(), r.as_fd()]);
    refused_then_served(&mut daemon, &mem, stream, "pipe:[");
}

#[test]
fn a_userfaultfd_without_api_handshake_is_refused() {
    let (dir, mem) = workdir();
    let mut daemon = Daemon::start(dir.path(), &mem, &["--on-refused", "close"]);
    let raw = Uffd::builder().create_uninit().expect("userfaultfd");
    let stream = send(&daemon, &whole_file(), &[raw.as_fd()]);
    refused_then_served(&mut daemon, &mem, stream, "before its UFFDIO_API handshake");
}

#[test]
fn region_beyond_the_file_is_refused() {
    let e = case(
        &array(&[region(BASE, 2 * 4096, MEM_LEN - 4096, 4096)]),
        "ends past the memory file",
    );
    assert!(e.starts_with("region 0:"), "{e}");
    assert!(e.contains(&format!("{MEM_LEN:#x} bytes")), "{e}");
}

#[test]
fn offset_u64_max_is_refused() {
    case(
        &array(&[region(BASE, 4096, u64::MAX, 4096)]),
        "offset 0xffffffffffffffff is not a multiple of the page size 4096",
    );
}

#[test]
fn overflowing_offset_is_refused() {
    let e = case(
        &array(&[region(BASE, 2 * 4096, u64::MAX - 4095, 4096)]),
        "overflows 64 bits",
    );
    assert!(e.contains("offset 0xfffffffffffff000"), "{e}");
}

#[test]
fn overflowing_base_address_is_refused() {
    let e = case(
        &array(&[region(u64::MAX - 4095, 2 * 4096, 0, 4096)]),
        "overflows 64 bits",
    );
    assert!(e.contains("base_host_virt_addr"), "{e}");
}

#[test]
fn overlapping_regions_are_refused() {
    let e = case(
        &array(&[
            region(BASE + 4096, 4 * 4096, 0, 4096),
            region(BASE, 2 * 4096, 4 * 4096, 4096),
        ]),
        "overlap",
    );
    assert!(e.starts_with("regions 1 "), "{e}");
}

#[test]
fn unaligned_base_is_refused() {
    case(
        &array(&[region(BASE + 512, 4096, 0, 4096)]),
        "base_host_virt_addr 0x7f0000000200 is not a multiple of the page size 4096",
    );
}

#[test]
fn unaligned_size_is_refused() {
    case(
        &array(&[region(BASE, 4097, 0, 4096)]),
        "size 0x1001 is not a multiple of the page size 4096",
    );
}

#[test]
fn base_not_aligned_to_2m_pages_is_refused() {
    case(
        &array(&[region(BASE + 4096, 2 << 20, 0, 2 << 20)]),
        "is not a multiple of the page size 2097152",
    );
}

#[test]
fn odd_page_size_is_refused() {
    case(
        &array(&[region(BASE, 8192, 0, 8192)]),
        "page size 8192 is not supported",
    );
}

#[test]
fn disagreeing_page_size_fields_are_refused() {
    let msg = format!(
        r#"[{{"base_host_virt_addr": {BASE}, "size": 4096, "offset": 0, "page_size": 4096, "page_size_kib": 2097152}}]"#
    );
    case(
        msg.as_bytes(),
        "page_size 4096 and page_size_kib 2097152 disagree",
    );
}

#[test]
fn zero_size_is_refused() {
    case(&array(&[region(BASE, 0, 0, 4096)]), "region 0: size is 0");
}

#[test]
fn wrong_field_type_is_refused() {
    let msg = format!(r#"[{{"base_host_virt_addr": {BASE}, "size": "big", "offset": 0}}]"#);
    case(
        msg.as_bytes(),
        r#"field `size` must be an unsigned 64-bit integer, found "big""#,
    );
}

#[test]
fn negative_and_missing_fields_are_refused() {
    let msg = format!(r#"[{{"base_host_virt_addr": {BASE}, "size": -4096, "offset": 0}}]"#);
    case(msg.as_bytes(), "found -4096");
    let msg = format!(r#"[{{"base_host_virt_addr": {BASE}, "size": 4096}}]"#);
    case(msg.as_bytes(), "missing field `offset`");
}

#[test]
fn too_many_regions_are_refused() {
    // 1025 one-page regions (reading the same file page, which is allowed): one over the limit.
    let regions: Vec<GuestRegionUffdMapping> = (0..1025)
        .map(|i| GuestRegionUffdMapping::new(BASE + i * 2 * 4096, 4096, 0, 4096))
        .collect();
    case(
        &encode_mappings(&regions, JsonShape::Both),
        "lists 1025 regions, more than the limit of 1024",
    );
}

#[test]
fn message_over_1_mib_is_refused() {
    let (dir, mem) = workdir();
    let mut daemon = Daemon::start(dir.path(), &mem, &["--on-refused", "close"]);
    // About 1.2 MiB of well-formed regions: the handler stops reading at 1 MiB.
    let regions: Vec<GuestRegionUffdMapping> = (0..12_000)
        .map(|i| GuestRegionUffdMapping::new(BASE + i * 2 * 4096, 4096, 0, 4096))
        .collect();
    let json = encode_mappings(&regions, JsonShape::Both);
    assert!(json.len() > (1 << 20) + 64 * 1024, "{}", json.len());
    let uffd = uffd();
    let stream = UnixStream::connect(daemon.socket()).expect("connect");
    // The daemon may close before everything is written: then the send fails, without a signal.
    match send_with_fds(&stream, &json, &[uffd.as_fd()], usize::MAX) {
        Ok(()) => {}
        Err(e) if matches!(e.kind(), ErrorKind::BrokenPipe | ErrorKind::ConnectionReset) => {}
        Err(e) => panic!("unexpected send error {e}"),
    }
    refused_then_served(
        &mut daemon,
        &mem,
        stream,
        "exceeds 1048576 bytes without completing",
    );
}

#[test]
fn client_closing_mid_json_is_refused() {
    let (dir, mem) = workdir();
    let mut daemon = Daemon::start(dir.path(), &mem, &["--on-refused", "close"]);
    let json = whole_file();
    let half = json.len() / 2;
    let uffd = uffd();
    let stream = send(&daemon, &json[..half], &[uffd.as_fd()]);
    stream
        .shutdown(std::net::Shutdown::Write)
        .expect("shutdown");
    refused_then_served(
        &mut daemon,
        &mem,
        stream,
        &format!("client closed the connection after {half} bytes"),
    );
}

#[test]
fn silent_client_times_out_while_others_are_served() {
    let (dir, mem) = workdir();
    let mut daemon = Daemon::start(
        dir.path(),
        &mem,
        &["--handshake-timeout", "1", "--on-refused", "close"],
    );
    let silent = UnixStream::connect(daemon.socket()).expect("connect");
    let connected = Instant::now();
    // A good client is served while the silent one holds its connection open.
    let report = daemon.client(&mem, &[]);
    assert_eq!(report["verified"], true);
    daemon.wait_session_ended(1);
    let timed_out = |l: &str| {
        fields(l)["error"]
            .as_str()
            .is_some_and(|e| e.contains("no complete handshake message within 1s"))
    };
    assert_eq!(
        daemon.log().count(timed_out),
        0,
        "the silent client was dropped before the good one was served ({:?}); the test needs \
         the good client to finish within the 1 s handshake timeout",
        connected.elapsed()
    );
    let mut probe = [rustix::event::PollFd::new(
        &silent,
        rustix::event::PollFlags::IN,
    )];
    let ready =
        rustix::event::poll(&mut probe, Some(&rustix::event::Timespec::default())).expect("poll");
    assert_eq!(ready, 0, "the silent connection is still open and quiet");
    // Then the daemon gives up on it: after the full second, with 0 bytes received.
    daemon.wait_refusal("no complete handshake message within 1s (0 bytes received)");
    assert!(connected.elapsed() >= Duration::from_secs(1));
    assert_closed_by_daemon(silent);
    daemon.assert_alive();
    daemon.client(&mem, &[]);
}

/// The 2-fd handshake of forks (the userfaultfd and a memfd of guest memory) is valid: a child
/// of this process plays Firecracker, registers its own memory, sends both fds (in either order),
/// reads every page through the daemon and exits (which ends its session: a session follows the
/// client process, not its socket).
#[test]
fn userfaultfd_and_memfd_handshake_is_served() {
    let (dir, mem) = workdir();
    let daemon = Daemon::start(dir.path(), &mem, &["--on-refused", "close"]);
    let want = std::fs::read(&mem).expect("reading the memory file");
    for (round, uffd_first) in [true, false].into_iter().enumerate() {
        let socket = daemon.socket().to_owned();
        let want = want.clone();
        // The child returns 0 when every page read back as the memory file, 1 otherwise (a page
        // never served would hang it: the wait below is bounded).
        let child = faultline_testing::ChildProcess::spawn(move || {
            let uffd = uffd();
            let guest = Mapping::new(
                MemoryKind::PrivateAnonymous,
                usize::try_from(MEM_LEN).expect("fits usize"),
            )
            .expect("mmap");
            uffd.register(&guest, RegisterMode::MISSING)
                .expect("register");
            let memory = memfd(MEM_LEN);
            let json = array(&[region(guest.addr(), MEM_LEN, 0, 4096)]);
            let fds = if uffd_first {
                [uffd.as_fd(), memory.as_fd()]
            } else {
                [memory.as_fd(), uffd.as_fd()]
            };
            let stream = UnixStream::connect(&socket).expect("connecting to the daemon");
            send_with_fds(&stream, &json, &fds, usize::MAX).expect("sending the handshake");
            let mut got = vec![0u8; usize::try_from(MEM_LEN).expect("fits usize")];
            guest.read(0, &mut got).expect("read guest memory");
            i32::from(got != want)
        });
        let pid = u32::try_from(child.pid()).expect("a pid");
        let status = common::wait_child(child, &daemon);
        assert_eq!(
            status,
            faultline_testing::ChildExit::Code(0),
            "the guest's memory differs from the memory file; log:\n{}",
            daemon.log().text()
        );
        let ended = daemon.wait_session_ended_for(pid);
        assert!(
            fields(&ended)["reason"]
                .as_str()
                .is_some_and(|r| r.contains("client gone")),
            "{ended}"
        );
        // Every page resolved once, counted before the summary was logged.
        let s = summary(&ended);
        assert_eq!(s["pages"], MEM_LEN / 4096, "{ended}");
        assert_eq!(s["bytes"], MEM_LEN, "{ended}");
        assert_eq!(
            daemon.log().count(|l| is_message(l, "session started")),
            round + 1
        );
    }
    // Nothing was refused but the readiness probe.
    assert_eq!(daemon.log().count(is_refusal), 1, "{}", daemon.log().text());
}

/// A client refused after it handed over its userfaultfd (here: regions beyond the daemon's
/// memory file, since its own file is twice as long) has registered memory nobody will serve:
/// by default the daemon ends it (SIGKILL through its pidfd) and says so, instead of leaving it
/// asleep on its first fault for ever; the daemon serves the next client. With
/// `--on-refused close` the same client is only disconnected and still waits when killed here.
#[test]
fn a_client_refused_after_handing_over_its_memory_is_ended() {
    let (dir, mem) = workdir();
    let bigger = dir.path().join("bigger");
    common::write_mem_file(&bigger, 2 * MEM_LEN, 4096);
    let daemon = Daemon::start(dir.path(), &mem, &[]);
    let out = common::output_within(
        common::client_command(daemon.socket(), &bigger, &[])
            .spawn()
            .expect("spawning a client"),
        Duration::from_secs(60),
    );
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&out.status),
        Some(9),
        "the refused client is killed: {out:?}"
    );
    let ended = daemon.log().wait_for("the refused client's end", |l| {
        fields(l)["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("client ended (SIGKILL)"))
    });
    assert!(
        fields(&ended)["why"]
            .as_str()
            .is_some_and(|w| w.contains("past the memory file")),
        "{ended}"
    );
    // Everyone else is still served.
    let out = common::output_within(
        common::client_command(daemon.socket(), &mem, &[])
            .spawn()
            .expect("spawning a client"),
        Duration::from_secs(60),
    );
    daemon.verified(&out);

    // `--on-refused close`: the refused client is not ended (it waits on its first fault).
    let (dir2, mem2) = workdir();
    let keep = Daemon::start(dir2.path(), &mem2, &["--on-refused", "close"]);
    let mut child = common::client_command(keep.socket(), &bigger, &[])
        .spawn()
        .expect("spawning a client");
    keep.log().wait_for("the refusal", |l| {
        fields(l)["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("handshake refused"))
    });
    // A measurement window, not a synchronisation: it must still be alive after it.
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        child.try_wait().expect("try_wait").is_none(),
        "the client was ended"
    );
    child.kill().expect("killing the waiting client");
    let _ = child.wait();
}
