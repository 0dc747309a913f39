//! One userfaultfd round trip on a 4 KiB page — a thread touches a missing page, the handler
//! reads the fault message, resolves it with `UFFDIO_COPY` (which wakes the toucher) — served by
//! faultline-uffd and, in the same run, by the `userfaultfd` crate doing exactly the same.
//!
//! Both sides use the same memory (a faultline [`Mapping`]), the same touch (one volatile load),
//! the same source page, one handler thread per measurement and the same thread placement:
//! - `same-cpu`: toucher and handler pinned to one CPU. The round trip is then two context
//!   switches plus the kernel work and the library's own code, so library overhead shows.
//! - `cross-cpu`: toucher and handler on different CPUs; the cross-CPU wake-up (tens of µs on
//!   a virtual machine) dominates.
//!
//! and the same way of waiting for faults:
//! - `blocking`: a blocking fd, the handler sleeps in `read(2)`;
//! - `poll`: a non-blocking fd, the handler sleeps in `poll(2)` then reads.
//!
//! Each iteration touches a fresh page of a large pre-registered region; when the region is used
//! up it is emptied with `MADV_DONTNEED` outside the timed section. Benchmark ids are
//! `round_trip/faultline/<placement>-<wait>` and `round_trip/userfaultfd-crate/<placement>-<wait>`.
//!
//! ```sh
//! cargo bench -p faultline-uffd --bench round_trip -- --warm-up-time 1 --measurement-time 5
//! ```
//! On a shared machine the two measurements of a pair are seconds apart and pick up different
//! load. `ROUND_TRIP_AB=40` first runs a paired comparison (alternating blocks of 2,000 round
//! trips of each binding) and prints the median of the paired ratios, which cancels such drift;
//! `ROUND_TRIP_CRATE_FIRST=1` measures the `userfaultfd` crate first in each pair.
#![allow(unsafe_code)]
// `criterion_group!` generates an undocumented `pub fn`.
#![allow(missing_docs)]

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use faultline_uffd::{CopyMode, EventBuffer, Mapping, RegisterMode, Uffd, PAGE_SIZE};
use rustix::event::{poll, PollFd, PollFlags};
use rustix::thread::{sched_getaffinity, sched_setaffinity, CpuSet};

/// The registered region: 16,384 pages touched one by one, then emptied and touched again.
const REGION: usize = 64 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Placement {
    SameCpu,
    CrossCpu,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wait {
    Blocking,
    Poll,
}

fn pin(cpu: usize) {
    let mut set = CpuSet::new();
    set.set(cpu);
    sched_setaffinity(None, &set).expect("sched_setaffinity");
}

fn cpus(placement: Placement) -> (usize, usize) {
    match placement {
        Placement::SameCpu => (0, 0),
        Placement::CrossCpu => (0, 1),
    }
}

/// A userfaultfd binding under test: register the region and serve `n` faults on a thread.
trait Server {
    fn register(&self, region: &Mapping);
    fn spawn(&self, n: u64, cpu: usize, wait: Wait, page: Arc<Vec<u8>>) -> JoinHandle<()>;
}

struct Faultline(Arc<Uffd>);

impl Server for Faultline {
    fn register(&self, region: &Mapping) {
        self.0
            .register(region, RegisterMode::MISSING)
            .expect("register");
    }

    fn spawn(&self, n: u64, cpu: usize, wait: Wait, page: Arc<Vec<u8>>) -> JoinHandle<()> {
        let uffd = Arc::clone(&self.0);
        std::thread::spawn(move || {
            pin(cpu);
            let mut buf = EventBuffer::new(16);
            let mut served = 0;
            while served < n {
                if wait == Wait::Poll {
                    uffd.poll_readable(None).expect("poll");
                }
                uffd.read_events(&mut buf).expect("read");
                for ev in buf.events() {
                    let addr = ev.fault_address().expect("page fault") & !(PAGE_SIZE as u64 - 1);
                    let done = uffd.copy(addr, &page, CopyMode::empty()).expect("copy");
                    debug_assert_eq!(done.bytes(), PAGE_SIZE as u64);
                    served += 1;
                }
            }
        })
    }
}

struct Crate(Arc<userfaultfd::Uffd>);

impl Server for Crate {
    fn register(&self, region: &Mapping) {
        self.0
            .register(region.as_ptr().cast(), region.len())
            .expect("register");
    }

    fn spawn(&self, n: u64, cpu: usize, wait: Wait, page: Arc<Vec<u8>>) -> JoinHandle<()> {
        let uffd = Arc::clone(&self.0);
        std::thread::spawn(move || {
            pin(cpu);
            let mut buf = userfaultfd::EventBuffer::new(16);
            let mut served = 0;
            while served < n {
                if wait == Wait::Poll {
                    let mut fds = [PollFd::new(&*uffd, PollFlags::IN)];
                    poll(&mut fds, None).expect("poll");
                }
                for ev in uffd.read_events(&mut buf).expect("read") {
                    let userfaultfd::Event::Pagefault { addr, .. } = ev.expect("event") else {
                        panic!("unexpected event");
                    };
                    let addr = (addr as usize & !(PAGE_SIZE - 1)) as *mut libc::c_void;
                    // SAFETY: `addr` is a missing page of the registered `Mapping`, which holds
                    // no Rust references; the source is a live 4 KiB buffer.
                    let done = unsafe { uffd.copy(page.as_ptr().cast(), addr, PAGE_SIZE, true) }
                        .expect("copy");
                    debug_assert_eq!(done, PAGE_SIZE);
                    served += 1;
                }
            }
        })
    }
}

/// The toucher's side: a registered region and the next fresh page.
struct Bench<S> {
    server: S,
    region: Mapping,
    next: usize,
    page: Arc<Vec<u8>>,
}

impl<S: Server> Bench<S> {
    fn new(server: S) -> Self {
        let region = Mapping::anonymous(REGION).expect("mmap");
        server.register(&region);
        Bench {
            server,
            region,
            next: 0,
            page: Arc::new(vec![0x5a; PAGE_SIZE]),
        }
    }

    /// Touch `iters` fresh pages, each served by the handler; returns the time spent in touches.
    fn run(&mut self, iters: u64, placement: Placement, wait: Wait) -> Duration {
        let (toucher_cpu, handler_cpu) = cpus(placement);
        // Pin the measuring thread for this run only; criterion's analysis runs unpinned.
        let saved = sched_getaffinity(None).expect("sched_getaffinity");
        pin(toucher_cpu);
        let handler = self
            .server
            .spawn(iters, handler_cpu, wait, Arc::clone(&self.page));
        let pages = self.region.len() / PAGE_SIZE;
        let mut total = Duration::ZERO;
        for _ in 0..iters {
            if self.next == pages {
                self.region.discard(0, self.region.len()).expect("discard");
                self.next = 0;
            }
            let offset = self.next * PAGE_SIZE;
            self.next += 1;
            let start = Instant::now();
            let v = self.region.read_u8(offset).expect("in bounds");
            total += start.elapsed();
            assert_eq!(v, 0x5a, "the touch saw the served page");
        }
        handler.join().expect("handler");
        sched_setaffinity(None, &saved).expect("restore affinity");
        total
    }
}

fn faultline(wait: Wait) -> Faultline {
    let uffd = Uffd::builder()
        .non_blocking(wait == Wait::Poll)
        .create()
        .expect("faultline uffd");
    Faultline(Arc::new(uffd))
}

fn crate_uffd(wait: Wait) -> Crate {
    let uffd = userfaultfd::UffdBuilder::new()
        .close_on_exec(true)
        .non_blocking(wait == Wait::Poll)
        .user_mode_only(false)
        .create()
        .expect("userfaultfd crate uffd");
    Crate(Arc::new(uffd))
}

const CONFIGS: [(Placement, Wait); 3] = [
    (Placement::SameCpu, Wait::Blocking),
    (Placement::SameCpu, Wait::Poll),
    (Placement::CrossCpu, Wait::Blocking),
];

fn config_id(placement: Placement, wait: Wait) -> String {
    format!(
        "{}-{}",
        match placement {
            Placement::SameCpu => "same-cpu",
            Placement::CrossCpu => "cross-cpu",
        },
        match wait {
            Wait::Blocking => "blocking",
            Wait::Poll => "poll",
        }
    )
}

fn two_cpus() -> bool {
    std::thread::available_parallelism().map_or(1, |n| n.get()) >= 2
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// `ROUND_TRIP_AB=<blocks>`: before the criterion groups, measure both bindings in alternating
/// blocks of 2,000 round trips and print per-binding min / median and the median of the paired
/// ratios. On a shared machine whose load drifts, pairing neighbouring blocks cancels the drift
/// that separate criterion measurements (seconds apart) pick up.
fn paired_comparison(blocks: usize) {
    const PER_BLOCK: u64 = 2000;
    for (placement, wait) in CONFIGS {
        if placement == Placement::CrossCpu && !two_cpus() {
            continue;
        }
        let mut ours = Bench::new(faultline(wait));
        let mut theirs = Bench::new(crate_uffd(wait));
        // Warm up both (page tables, thread stacks, caches).
        ours.run(PER_BLOCK, placement, wait);
        theirs.run(PER_BLOCK, placement, wait);
        let (mut a, mut b, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..blocks {
            let per = |d: Duration| d.as_secs_f64() * 1e6 / PER_BLOCK as f64;
            let (x, y) = if i % 2 == 0 {
                let x = per(ours.run(PER_BLOCK, placement, wait));
                (x, per(theirs.run(PER_BLOCK, placement, wait)))
            } else {
                let y = per(theirs.run(PER_BLOCK, placement, wait));
                (per(ours.run(PER_BLOCK, placement, wait)), y)
            };
            a.push(x);
            b.push(y);
            ratio.push(x / y);
        }
        let min = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
        println!(
            "paired {:18} faultline min {:6.2} µs median {:6.2} µs | userfaultfd-crate min {:6.2} µs \
             median {:6.2} µs | median ratio faultline/crate {:.3} ({blocks} block pairs)",
            config_id(placement, wait),
            min(&a),
            median(&mut a),
            min(&b),
            median(&mut b),
            median(&mut ratio),
        );
    }
}

fn round_trip(c: &mut Criterion) {
    if let Some(blocks) = std::env::var("ROUND_TRIP_AB")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n > 0)
    {
        paired_comparison(blocks);
    }
    let mut group = c.benchmark_group("round_trip");
    let crate_first = std::env::var_os("ROUND_TRIP_CRATE_FIRST").is_some_and(|v| v == "1");
    for (placement, wait) in CONFIGS {
        if placement == Placement::CrossCpu && !two_cpus() {
            eprintln!("skipped: cross-cpu round trips need two CPUs");
            continue;
        }
        let id = config_id(placement, wait);
        // Measure the two bindings back to back per configuration so that drift affects both
        // alike; ROUND_TRIP_CRATE_FIRST=1 swaps the order, to check that it does not matter.
        let mut ours = Bench::new(faultline(wait));
        let mut theirs = Bench::new(crate_uffd(wait));
        let mut bench_ours = |group: &mut criterion::BenchmarkGroup<'_, _>| {
            group.bench_function(BenchmarkId::new("faultline", &id), |b| {
                b.iter_custom(|iters| ours.run(iters, placement, wait))
            });
        };
        let mut bench_theirs = |group: &mut criterion::BenchmarkGroup<'_, _>| {
            group.bench_function(BenchmarkId::new("userfaultfd-crate", &id), |b| {
                b.iter_custom(|iters| theirs.run(iters, placement, wait))
            });
        };
        if crate_first {
            bench_theirs(&mut group);
            bench_ours(&mut group);
        } else {
            bench_ours(&mut group);
            bench_theirs(&mut group);
        }
    }
    group.finish();
}

criterion_group!(benches, round_trip);
criterion_main!(benches);
