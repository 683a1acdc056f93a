//! Giving memory back to the system after a large update, and keeping
//! huge pages out of the heap.
//!
//! A load of 100k Services frees about as much memory as it keeps (parse
//! trees, sort buffers, the rule text), on the control and rule-sync threads.
//! mimalloc purges freed pages only after a delay, checked when the freeing
//! thread allocates again, and those threads then sit idle: the freed pages
//! stay resident for good. After an update that touched many service ports,
//! the thread that did the work asks mimalloc to purge them at once.

/// Service ports an update must set or remove before the thread that
/// applied it purges what it freed: a purge costs milliseconds, which an
/// endpoint change must not pay.
pub const LARGE: usize = 1_000;

/// Purge the calling thread's freed memory (and every purge already due),
/// when `ports` service ports changed.
pub fn release_after(ports: usize) {
    if ports >= LARGE {
        // SAFETY: mi_collect only walks the allocator's own structures; any
        // thread may call it at any time (without mimalloc as the global
        // allocator it collects an unused heap).
        unsafe { libmimalloc_sys::mi_collect(true) };
    }
}

/// Keep transparent huge pages out of the process, unless the operator set
/// `MIMALLOC_ALLOW_THP` (mimalloc's own switch, which it reads at start).
///
/// mimalloc asks for huge pages (`MADV_HUGEPAGE`) on its segments, and a
/// 2 MB page is resident whole once one byte of it is touched: the heap's
/// half-used segments cost full pages. Measured (`bench/README.md`, "Memory
/// at 100k service ports (session 7)"): 29 MB -> 12 MB for the process
/// with one Service, about 15 MB less at 100k service ports, and no
/// difference in the data-plane benchmarks beyond their noise. Disabling
/// them for the whole process is what mimalloc itself does when told not
/// to use them (`PR_SET_THP_DISABLE`); the rule tools it starts inherit it.
pub fn no_huge_pages() {
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_some() {
        return;
    }
    // SAFETY: prctl with PR_SET_THP_DISABLE takes plain integer arguments
    // and changes only this process's memory policy. Should it fail (a
    // kernel before 3.15), huge pages stay and nothing else changes.
    let _ = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
}

#[cfg(test)]
mod tests {
    #[test]
    fn huge_pages_are_off_for_the_process_unless_mimalloc_is_told_otherwise() {
        // SAFETY: PR_GET_THP_DISABLE reads this process's flag.
        let flag = || unsafe { libc::prctl(libc::PR_GET_THP_DISABLE, 0, 0, 0, 0) };
        super::no_huge_pages();
        let expected = if std::env::var_os("MIMALLOC_ALLOW_THP").is_some() { 0 } else { 1 };
        assert_eq!(flag(), expected);
    }
}
