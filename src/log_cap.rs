//! Log lines per error, capped: an update with thousands of bad objects
//! (100k service ports, one bad template) logs a few of them and a count
//! of the rest, so the log stays readable. Every per-error line of the
//! control path (invalid manifests, manifest warnings, errors served
//! through, endpoint loops, bind errors) goes through here.

use std::fmt::Display;

/// Lines shown per kind and update; the rest are counted on one line.
pub const SHOWN: usize = 5;

/// `each` on the first [`SHOWN`] of `items`; `rest` with how many more
/// there were, if any. How many were shown.
pub fn capped<T>(
    items: impl IntoIterator<Item = T>,
    mut each: impl FnMut(T),
    rest: impl FnOnce(usize),
) -> usize {
    let mut n = 0;
    for item in items {
        if n < SHOWN {
            each(item);
        }
        n += 1;
    }
    if n > SHOWN {
        rest(n - SHOWN);
    }
    n.min(SHOWN)
}

/// `items` at error level, as `what`, a few at most.
pub fn error<T: Display>(items: impl IntoIterator<Item = T>, what: &str) -> usize {
    capped(
        items,
        |e| tracing::error!(error = %e, "{what}"),
        |more| tracing::error!(more, "{what}: {more} more (not shown)"),
    )
}

/// `items` at warning level, as `what`, a few at most.
pub fn warn<T: Display>(items: impl IntoIterator<Item = T>, what: &str) -> usize {
    capped(
        items,
        |w| tracing::warn!(warning = %w, "{what}"),
        |more| tracing::warn!(more, "{what}: {more} more (not shown)"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_few_are_shown_and_the_rest_counted_once() {
        let (mut shown, mut rest) = (Vec::new(), Vec::new());
        let n = capped(0..1000, |i| shown.push(i), |more| rest.push(more));
        assert_eq!((n, shown, rest), (SHOWN, (0..SHOWN).collect::<Vec<_>>(), vec![1000 - SHOWN]));
        let mut rest = Vec::new();
        assert_eq!(capped(0..3, |_| {}, |more| rest.push(more)), 3);
        assert!(rest.is_empty(), "nothing more to count");
    }
}
