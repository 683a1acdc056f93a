//! How much a UDP listener reads, and so sends on, per wake-up: a byte
//! budget that spreads a burst of large datagrams over several short
//! rounds instead of re-sending it back to back. Pure policy, no I/O: the
//! worker (`udp_worker.rs`) asks how many datagrams the next `recvmmsg`
//! may take and reports what it got.
//!
//! Why: a client that sends a burst (iperf3 sends about eight 32 KiB
//! datagrams per 1 ms tick) leaves it queued on the listener while the
//! worker is busy or asleep; read whole and re-sent in one submit, the
//! burst reaches the receiver tighter than the client sent it and
//! overflows a default 208 KiB receive buffer (`docs/udp.md`, "Loss at
//! high rates"). With the budget, a round sends at most
//! [`BASE_BUDGET`] bytes, the rest waits on the listener (8 MiB buffer)
//! for the next round, one short timer ([`PACE`]) later.
//!
//! Invariants:
//! - Small datagrams are never held back: a round always reads whole
//!   batches until the budget is spent, and 16 datagrams of a few hundred
//!   bytes are far below it.
//! - Every round reads at least one datagram, so a listener always moves.
//! - Pacing never caps a sustained stream: when the listener stays
//!   backlogged round after round ([`GROW_AFTER`]), the budget doubles (up
//!   to [`MAX_BUDGET`]); a round that drains the listener halves it back
//!   toward [`BASE_BUDGET`].

use std::time::Duration;

/// Bytes one round may read from a listener while it is not backlogged:
/// two 32 KiB datagrams, a third of a default receive buffer.
pub const BASE_BUDGET: usize = 64 << 10;
/// The most one round may read, however long the backlog lasts.
pub const MAX_BUDGET: usize = 1 << 20;
/// Consecutive rounds that end with datagrams still waiting before the
/// budget doubles.
pub const GROW_AFTER: u32 = 16;
/// The pause between two rounds of a listener whose budget ran out.
pub const PACE: Duration = Duration::from_micros(100);
/// Batches one round reads at most, whatever their size: other listeners
/// and connections get their turn.
pub const BATCHES_PER_ROUND: usize = 8;

/// What the worker does after a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// Read another batch of at most this many datagrams.
    Read(usize),
    /// The listener is drained (or the round read its batches): wait for
    /// readiness.
    Poll,
    /// The budget is spent with datagrams still waiting: read again after
    /// [`PACE`].
    Later,
}

/// One listener's pacing state, kept across wake-ups.
#[derive(Clone, Debug)]
pub struct ReadPace {
    batch: usize,
    budget: usize,
    spent: usize,
    batches: usize,
    /// Mean size of the datagrams of the last batch (0: none seen yet).
    size: usize,
    /// Rounds in a row that ended with datagrams waiting.
    backlogged: u32,
}

impl ReadPace {
    /// `batch`: the most datagrams one `recvmmsg` takes.
    pub fn new(batch: usize) -> Self {
        Self { batch: batch.max(1), budget: BASE_BUDGET, spent: 0, batches: 0, size: 0, backlogged: 0 }
    }

    /// A new round: how many datagrams its first `recvmmsg` may take.
    pub fn begin(&mut self) -> usize {
        self.spent = 0;
        self.batches = 0;
        self.limit()
    }

    /// A `recvmmsg` that could take `asked` datagrams returned `n` of
    /// `bytes` in all.
    pub fn read(&mut self, asked: usize, n: usize, bytes: usize) -> Next {
        self.batches += 1;
        self.spent += bytes;
        if let Some(size) = bytes.checked_div(n) {
            self.size = size;
        }
        if n < asked {
            self.backlogged = 0;
            self.budget = (self.budget / 2).max(BASE_BUDGET);
            return Next::Poll;
        }
        if self.spent + self.size > self.budget {
            self.backlogged += 1;
            if self.backlogged >= GROW_AFTER {
                self.backlogged = 0;
                self.budget = (self.budget * 2).min(MAX_BUDGET);
            }
            return Next::Later;
        }
        if self.batches >= BATCHES_PER_ROUND {
            return Next::Poll;
        }
        Next::Read(self.limit())
    }

    /// The bytes one round may read now.
    #[cfg(test)]
    pub fn budget(&self) -> usize {
        self.budget
    }

    /// Datagrams the next batch may take: what is left of the budget at
    /// the last batch's mean size, at least one, at most a whole batch.
    fn limit(&self) -> usize {
        if self.size == 0 {
            return self.batch;
        }
        (self.budget.saturating_sub(self.spent) / self.size).clamp(1, self.batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K32: usize = 32 << 10;

    #[test]
    fn small_datagrams_are_read_in_whole_batches_and_never_held_back() {
        let mut p = ReadPace::new(16);
        for _ in 0..100 {
            assert_eq!(p.begin(), 16);
            assert_eq!(p.read(16, 16, 16 * 64), Next::Read(16));
            assert_eq!(p.read(16, 5, 5 * 64), Next::Poll, "drained");
        }
        assert_eq!(p.budget(), BASE_BUDGET);
    }

    #[test]
    fn a_burst_of_large_datagrams_is_spread_over_rounds() {
        let mut p = ReadPace::new(16);
        // Size unknown at first: a whole batch, then the budget holds back.
        assert_eq!(p.begin(), 16);
        assert_eq!(p.read(16, 16, 16 * K32), Next::Later);
        // From now on a round takes what the budget allows: two of 32 KiB.
        assert_eq!(p.begin(), 2);
        assert_eq!(p.read(2, 2, 2 * K32), Next::Later);
        assert_eq!(p.begin(), 2);
        assert_eq!(p.read(2, 1, K32), Next::Poll, "drained: wait for readiness");
        // A mixed batch: 1 KiB datagrams then fill the rest of the budget.
        assert_eq!(p.begin(), 2);
        assert_eq!(p.read(2, 2, 2 << 10), Next::Read(16));
    }

    #[test]
    fn a_round_holds_back_after_44_mtu_sized_datagrams_and_never_at_508_bytes_or_less() {
        // What a round reads of an endless backlog of `size`-byte
        // datagrams, once the size is known (the first batch of all takes
        // 16 whatever their size).
        let round = |size: usize| {
            let mut p = ReadPace::new(16);
            let mut last = (0, Next::Poll);
            for _ in 0..2 {
                let (mut asked, mut total) = (p.begin(), 0);
                last = loop {
                    total += asked;
                    match p.read(asked, asked, asked * size) {
                        Next::Read(n) => asked = n,
                        next => break (total, next),
                    }
                };
            }
            last
        };
        assert_eq!(round(1472), (44, Next::Later), "a 1500-byte MTU's payload");
        assert_eq!(round(K32), (2, Next::Later));
        assert_eq!(round(508), (128, Next::Poll), "the round's 8 batches end it, not the budget");
        assert_eq!(round(509), (128, Next::Later));
    }

    #[test]
    fn every_round_reads_at_least_one_datagram() {
        let mut p = ReadPace::new(16);
        p.begin();
        p.read(16, 1, 65_000);
        assert_eq!(p.begin(), 1);
        assert_eq!(p.read(1, 1, 65_000), Next::Later);
    }

    #[test]
    fn a_lasting_backlog_grows_the_budget_and_a_drain_shrinks_it() {
        let mut p = ReadPace::new(16);
        p.begin();
        p.read(16, 16, 16 * K32);
        let mut rounds = 1;
        while p.budget() < MAX_BUDGET {
            let asked = p.begin();
            assert_eq!(p.read(asked, asked, asked * K32), Next::Later);
            rounds += 1;
            assert!(rounds < 1000, "the budget reaches its cap");
        }
        assert_eq!(p.begin(), 16, "a backlogged listener reads whole batches");
        assert_eq!(p.read(16, 3, 3 * K32), Next::Poll);
        assert_eq!(p.budget(), MAX_BUDGET / 2);
        for _ in 0..10 {
            let asked = p.begin();
            p.read(asked, 0, 0);
        }
        assert_eq!(p.budget(), BASE_BUDGET);
    }

    #[test]
    fn a_round_yields_after_its_batches_even_within_budget() {
        let mut p = ReadPace::new(16);
        p.begin();
        for _ in 1..BATCHES_PER_ROUND {
            assert_eq!(p.read(16, 16, 16 * 100), Next::Read(16));
        }
        assert_eq!(p.read(16, 16, 16 * 100), Next::Poll);
    }
}
