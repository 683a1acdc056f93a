//! Giving memory back to the system after a large update.
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
