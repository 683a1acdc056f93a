//! The random numbers of the randomized tests that compare an incremental
//! structure with the same state built whole: a xorshift generator seeded
//! from the process id, the seed printed so a failure can be replayed.

/// `next(n)`: a number below `n`. `salt` keeps two tests' sequences apart.
pub fn xorshift(salt: u64) -> impl FnMut(u64) -> u64 {
    let mut seed: u64 = salt ^ u64::from(std::process::id());
    eprintln!("seed {seed:#x}");
    move |n| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    }
}
