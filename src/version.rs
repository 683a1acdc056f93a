//! What this binary is: its version, the commit it was built from and the
//! build date, as `build.rs` found them (`unknown` when it could not).

/// The crate version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The git commit (12 hex digits, `-dirty` if the tree had changes).
pub const COMMIT: &str = env!("RINGPORT_COMMIT");
/// The UTC date of the build (or of `SOURCE_DATE_EPOCH`), `YYYY-MM-DD`.
pub const BUILD_DATE: &str = env!("RINGPORT_BUILD_DATE");

/// `--version`'s text: `0.1.0 (commit 0123456789ab, built 2026-12-01)`.
pub const LONG: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("RINGPORT_COMMIT"),
    ", built ",
    env!("RINGPORT_BUILD_DATE"),
    ")"
);
