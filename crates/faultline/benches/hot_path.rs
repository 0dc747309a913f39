#![allow(missing_docs)] // criterion_group! generates undocumented items
//! Micro-benchmarks of the fault server's hot path: claiming a page in the state bitmap,
//! finding the region of a fault address, and the window decision of adaptive readahead.

use std::sync::Arc;

use criterion::{black_box, criterion_group, criterion_main, BatchSize, Criterion};
use faultline::policy::{Readahead, Streams};
use faultline::region::{Region, RegionEntry, RegionMap};
use faultline::source::ZeroSource;
use faultline::state::PageStates;
use faultline_uffd::MemoryKind;

fn states(c: &mut Criterion) {
    let pages = 262_144; // 1 GiB of 4 KiB pages
    c.bench_function("state/claim+present (1 GiB bitmap)", |b| {
        b.iter_batched(
            || PageStates::new(pages),
            |s| {
                for p in (0..pages).step_by(61) {
                    if s.try_claim(p) {
                        s.set_present(p);
                    }
                }
                s
            },
            BatchSize::LargeInput,
        )
    });
    let s = PageStates::new(pages);
    c.bench_function("state/get", |b| {
        b.iter(|| black_box(s.get(black_box(123_457))))
    });
}

fn regions(c: &mut Criterion) {
    let src = Arc::new(ZeroSource::new(1 << 40));
    let mut map = RegionMap::new();
    for i in 0..64u64 {
        let r = Region::new(
            0x7f00_0000_0000 + i * (1 << 30),
            1 << 29,
            MemoryKind::PrivateAnonymous,
            src.clone(),
            0,
        );
        map.insert(RegionEntry::new(r)).expect("insert");
    }
    c.bench_function("region/find among 64", |b| {
        b.iter(|| black_box(map.find(black_box(0x7f00_0000_0000 + 37 * (1 << 30) + 12345))))
    });
}

fn readahead(c: &mut Criterion) {
    c.bench_function("readahead/adaptive decision", |b| {
        let mut st = Streams::default();
        let mut page = 0usize;
        let policy = Readahead::Adaptive {
            min_pages: 1,
            max_pages: 512,
        };
        b.iter(|| {
            let w = st.on_fault(policy, 0, page);
            page += w.now + w.ahead;
            black_box(w)
        })
    });
}

criterion_group!(benches, states, regions, readahead);
criterion_main!(benches);
