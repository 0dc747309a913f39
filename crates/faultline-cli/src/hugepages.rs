//! The huge-page pool for hugetlb memory of `faultline bench` and `faultline client`.
//!
//! (The bindings do not write system settings; this is the command's own copy of the test
//! helper `faultline_testing::reserve_huge_pages`. The Firecracker kit's pool, given back on
//! drop, is `fckit::HugePages`.)

/// Reserve at least `pages` 2 MiB huge pages in `/proc/sys/vm/nr_hugepages`; returns whether they
/// are available (free).
pub fn reserve_huge_pages(pages: u64) -> bool {
    let free = || -> Option<u64> {
        let s = std::fs::read_to_string("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")
            .ok()?;
        s.trim().parse().ok()
    };
    if free().unwrap_or(0) >= pages {
        return true;
    }
    let Ok(cur) = std::fs::read_to_string("/proc/sys/vm/nr_hugepages") else {
        return false;
    };
    let cur: u64 = cur.trim().parse().unwrap_or(0);
    let want = cur + pages - free().unwrap_or(0).min(pages);
    let _ = std::fs::write("/proc/sys/vm/nr_hugepages", want.to_string());
    free().unwrap_or(0) >= pages
}
