//! Redirect rules: send `ClusterIP:port` traffic (and that of non-local
//! externalIPs and LoadBalancer IPs) to the service port's proxy port.
//!
//! snapshot -> desired rules ([`rules`], pure) -> diff with what was last
//! applied -> one batch for the backend ([`nft`] or [`iptables`]), run by
//! the [`syncer`] on a thread of its own, so neither the data plane nor
//! the control loop ever waits on a rule tool.
//!
//! Invariants:
//! - ringport only ever touches its own table (`inet ringport`) and its
//!   own chains (`RINGPORT-*`, and one jump to each).
//! - Every sync is one process per table or family, never one per rule.
//! - A service port with no usable endpoints needs no special rule for
//!   TCP: its proxy port stays bound but stops listening, so the kernel
//!   answers a redirected SYN with RST at once.

pub mod command;
pub mod iptables;
pub mod nft;
pub mod rules;
pub mod syncer;

use std::process::ExitStatus;

pub use syncer::{RESYNC, Syncer, SyncerThread};

use rules::{Diff, Rules};

/// `--redirect`: which rules program the redirects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum RedirectMode {
    /// nft when `nft list tables` works, else iptables, else none.
    Auto,
    Nft,
    Iptables,
    /// No rules (the edge proxy, or tests): only proxy ports, node ports and
    /// local addresses are served.
    None,
}

#[derive(Debug, thiserror::Error)]
pub enum RedirectError {
    #[error("cannot run {program}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{program} {args}` failed ({status}): {stderr}")]
    Failed { program: String, args: String, status: ExitStatus, stderr: String },
    #[error("{what} are still there after cleanup (see `{program}`)")]
    Leftover { program: String, what: &'static str },
    #[error("--redirect {mode}: {program} does not work here")]
    Unavailable { mode: &'static str, program: &'static str },
}

/// A way of programming the rules.
pub trait Backend: Send {
    fn name(&self) -> &'static str;
    /// Make ringport's rules exactly `rules`, whatever was there before (a
    /// stale run's state included).
    fn replace(&mut self, rules: &Rules) -> Result<(), RedirectError>;
    /// Apply `diff` to the rules last applied; `rules` is the result.
    fn update(&mut self, diff: &Diff, rules: &Rules) -> Result<(), RedirectError>;
}

/// `--redirect none`.
pub struct NoRules;

impl Backend for NoRules {
    fn name(&self) -> &'static str {
        "none"
    }

    fn replace(&mut self, _rules: &Rules) -> Result<(), RedirectError> {
        Ok(())
    }

    fn update(&mut self, _diff: &Diff, _rules: &Rules) -> Result<(), RedirectError> {
        Ok(())
    }
}

/// The backend `mode` asks for; `auto` falls back to iptables, then to
/// no rules with a warning.
pub fn backend(mode: RedirectMode) -> Result<Box<dyn Backend>, RedirectError> {
    match mode {
        RedirectMode::None => Ok(Box::new(NoRules)),
        RedirectMode::Nft if nft::Nft::available() => Ok(Box::new(nft::Nft)),
        RedirectMode::Nft => Err(RedirectError::Unavailable { mode: "nft", program: "nft list tables" }),
        RedirectMode::Iptables if iptables::Iptables::available() => Ok(Box::new(iptables::Iptables)),
        RedirectMode::Iptables => {
            Err(RedirectError::Unavailable { mode: "iptables", program: "iptables -t nat -S" })
        }
        RedirectMode::Auto if nft::Nft::available() => Ok(Box::new(nft::Nft)),
        RedirectMode::Auto if iptables::Iptables::available() => Ok(Box::new(iptables::Iptables)),
        RedirectMode::Auto => {
            tracing::warn!(
                "--redirect auto: neither nft nor iptables works here; no redirect rules, so cluster IPs are not served"
            );
            Ok(Box::new(NoRules))
        }
    }
}

/// Remove the state of the backends other than `keep` (a previous run may
/// have used another one); `keep` replaces its own state on its first sync.
pub fn remove_stale(keep: &str) -> Result<(), RedirectError> {
    if keep != "nft" && nft::cleanup()? {
        tracing::info!("removed a stale nft table inet ringport");
    }
    if keep != "iptables" && iptables::cleanup()? {
        tracing::info!("removed stale RINGPORT-* iptables chains");
    }
    Ok(())
}

/// What `ringport cleanup` removed.
#[derive(Debug, Default)]
pub struct Cleaned {
    pub nft_table: bool,
    pub iptables_chains: bool,
}

/// Remove every rule, chain and table ringport made, with either backend,
/// in both families. Nothing to remove is a success.
pub fn cleanup() -> Result<Cleaned, RedirectError> {
    Ok(Cleaned { nft_table: nft::cleanup()?, iptables_chains: iptables::cleanup()? })
}
