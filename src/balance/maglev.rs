//! Maglev consistent hashing (Eisenbud et al., NSDI 2016): a lookup table
//! of prime size in which each endpoint owns an almost equal share of
//! slots, built so that removing one of N endpoints moves only the clients
//! that were on it.
//!
//! Plain Maglev moves a few clients between surviving endpoints too when
//! one is removed. [`Maglev::shrink`] does better: it keeps every slot of
//! the surviving endpoints and deals out only the removed endpoint's slots,
//! so exactly its clients move, and the shares stay even.
//!
//! Invariants:
//! - The table size is a prime ≥ 65537, so every endpoint's permutation
//!   visits every slot.
//! - A fresh table depends only on the set of endpoint addresses (not their
//!   order). A shrunk table depends on its history too; every worker uses
//!   the same table object, so they all agree.

use crate::model::EndpointAddr;

/// Table size: the smallest prime ≥ 65537 is 65537 itself.
pub const TABLE_SIZE: usize = 65_537;
/// An unowned slot.
const EMPTY: u16 = u16::MAX;

#[derive(Debug)]
pub struct Maglev {
    /// Slot -> index into the endpoint list the table was built from.
    table: Vec<u16>,
}

impl Maglev {
    /// Build the table for `endpoints` (at most `u16::MAX` of them).
    pub fn new(endpoints: &[EndpointAddr]) -> Option<Self> {
        let table = vec![EMPTY; TABLE_SIZE];
        Self::fill(table, endpoints)
    }

    /// The table after removing endpoints: `old` is the list this table was
    /// built for, `new` the survivors (a subset). Survivors keep all their
    /// slots; only the removed endpoints' slots are dealt out again.
    /// `None` when `new` is not a subset of `old` (build afresh then).
    pub fn shrink(&self, old: &[EndpointAddr], new: &[EndpointAddr]) -> Option<Self> {
        let renumber: Vec<u16> =
            old.iter().map(|e| new.iter().position(|n| n == e).map_or(EMPTY, |i| i as u16)).collect();
        if new.iter().any(|n| !old.contains(n)) {
            return None;
        }
        let table = self
            .table
            .iter()
            .map(|&slot| renumber.get(usize::from(slot)).copied().unwrap_or(EMPTY))
            .collect();
        Self::fill(table, new)
    }

    /// Give every empty slot an owner: endpoints take turns, each taking the
    /// next empty slot along its own permutation of the table.
    fn fill(mut table: Vec<u16>, endpoints: &[EndpointAddr]) -> Option<Self> {
        let n = endpoints.len();
        if n == 0 || n >= usize::from(EMPTY) {
            return None;
        }
        let m = TABLE_SIZE as u64;
        // (offset, skip) of each endpoint's permutation of the slots.
        let perms: Vec<(u64, u64)> = endpoints
            .iter()
            .map(|e| {
                let name = e.0.to_string();
                let h1 = super::hash_bytes(name.as_bytes(), 0x6d61_676c_6576_3031);
                let h2 = super::hash_bytes(name.as_bytes(), 0x6d61_676c_6576_3032);
                (h1 % m, h2 % (m - 1) + 1)
            })
            .collect();
        let mut next = vec![0u64; n];
        let mut empty = table.iter().filter(|&&s| s == EMPTY).count();
        while empty > 0 {
            for (i, &(offset, skip)) in perms.iter().enumerate() {
                // Walk endpoint i's permutation to its next empty slot.
                let mut slot = ((offset + next[i] * skip) % m) as usize;
                while table[slot] != EMPTY {
                    next[i] += 1;
                    slot = ((offset + next[i] * skip) % m) as usize;
                }
                table[slot] = i as u16;
                next[i] += 1;
                empty -= 1;
                if empty == 0 {
                    break;
                }
            }
        }
        Some(Self { table })
    }

    /// The endpoint index for a key hash.
    pub fn lookup(&self, hash: u64) -> usize {
        usize::from(self.table[(hash % TABLE_SIZE as u64) as usize])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::net::{IpAddr, SocketAddr};

    fn endpoints(n: u8) -> Vec<EndpointAddr> {
        (1..=n).map(|i| EndpointAddr(SocketAddr::from(([10, 1, 0, i], 8080)))).collect()
    }

    fn owner(table: &Maglev, eps: &[EndpointAddr], client: IpAddr) -> EndpointAddr {
        eps[table.lookup(crate::balance::hash_ip(client))]
    }

    fn clients(n: u32) -> Vec<IpAddr> {
        (0..n).map(|i| IpAddr::from((0x0a64_0000u32 + i).to_be_bytes())).collect()
    }

    #[test]
    fn every_endpoint_gets_an_almost_equal_share_of_slots() {
        let eps = endpoints(7);
        let t = Maglev::new(&eps).unwrap();
        let mut count = HashMap::new();
        for slot in &t.table {
            *count.entry(*slot).or_insert(0usize) += 1;
        }
        let ideal = TABLE_SIZE / 7;
        for (i, c) in count {
            assert!(c.abs_diff(ideal) <= ideal / 100 + 1, "endpoint {i} owns {c} slots, ideal {ideal}");
        }
    }

    #[test]
    fn shrinking_keeps_the_shares_even() {
        let eps = endpoints(6);
        let t = Maglev::new(&eps).unwrap().shrink(&eps, &eps[1..]).unwrap();
        let ideal = TABLE_SIZE / 5;
        for i in 0..5u16 {
            let c = t.table.iter().filter(|&&s| s == i).count();
            assert!(c.abs_diff(ideal) <= ideal / 50, "endpoint {i} owns {c} slots, ideal {ideal}");
        }
        assert!(Maglev::new(&eps).unwrap().shrink(&eps[1..], &eps).is_none(), "growing is not shrinking");
    }

    #[test]
    fn table_depends_on_the_set_not_the_order() {
        let eps = endpoints(5);
        let mut reversed = eps.clone();
        reversed.reverse();
        let (a, b) = (Maglev::new(&eps).unwrap(), Maglev::new(&reversed).unwrap());
        for c in clients(1000) {
            assert_eq!(owner(&a, &eps, c), owner(&b, &reversed, c));
        }
    }

    /// Removing 1 of N endpoints remaps only its own clients, about 1/N.
    #[test]
    fn removing_one_of_n_endpoints_moves_only_its_clients() {
        for n in [2u8, 3, 5, 10, 20] {
            let eps = endpoints(n);
            let before = Maglev::new(&eps).unwrap();
            for gone in [0usize, usize::from(n) - 1] {
                let rest: Vec<_> =
                    eps.iter().copied().enumerate().filter(|(i, _)| *i != gone).map(|(_, e)| e).collect();
                let after = before.shrink(&eps, &rest).unwrap();
                let population = clients(20_000);
                let mut moved = 0;
                for c in &population {
                    let (was, now) = (owner(&before, &eps, *c), owner(&after, &rest, *c));
                    if was != now {
                        assert_eq!(was, eps[gone], "client {c} moved off a surviving endpoint (n={n})");
                        moved += 1;
                    }
                }
                let share = moved as f64 / population.len() as f64;
                let ideal = 1.0 / f64::from(n);
                assert!((share - ideal).abs() < ideal * 0.15, "n={n}: moved {share:.3}, ideal {ideal:.3}");
            }
        }
    }
}
