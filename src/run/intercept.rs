//! How `run` intercepts service traffic: the redirect backend for
//! `--redirect`, the proxy addresses it DNATs to (made local here) and the
//! syncer thread that programs the rules, starting from the rules a
//! previous run left.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use super::{RunError, RunOptions};
use crate::metrics::Metrics;
use crate::redirect::{self, Intercept, RedirectMode, Syncer, SyncerThread};

/// The redirect syncer for `--redirect`, on its own thread, and the
/// redirects a previous run left in place. With rules,
/// proxy ports listen on one address per family that the rules DNAT to:
/// `--bind-address` when it names one, else the proxy addresses (IPv4 and,
/// where the node has IPv6, IPv6), put on `lo` here.
pub(super) fn start_redirect(
    opts: &mut RunOptions,
    ready: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
) -> Result<(SyncerThread, redirect::rules::Rules), RunError> {
    let bind = opts.listen.bind_address;
    let mut to = match bind {
        _ if opts.redirect == RedirectMode::None => Intercept::Redirect,
        std::net::IpAddr::V4(v4) if v4.is_unspecified() => {
            Intercept::ProxyAddress { v4: opts.proxy_address, v6: Some(opts.proxy_address6) }
        }
        std::net::IpAddr::V4(v4) => {
            if v4.is_loopback() {
                tracing::warn!(bind_address = %bind, "traffic from other interfaces DNATed to a loopback address is dropped as martian; pods and other hosts will not reach cluster IPs");
            }
            Intercept::Dnat(v4)
        }
        std::net::IpAddr::V6(_) => {
            tracing::warn!(bind_address = %bind, "IPv6 --bind-address: traffic is REDIRECTed, which needs an address on the receiving interface (address-less pod veths get no answer)");
            Intercept::Redirect
        }
    };
    let mut backend = redirect::backend(opts.redirect, to)?;
    // External proxy ports only where rules send traffic to them.
    opts.listen.redirect_rules = backend.name() != "none";
    if !opts.listen.redirect_rules && opts.listen.proxy_port_mode == crate::listen::ProxyPortMode::Shared {
        return Err(RunError::SharedWithoutRules);
    }
    redirect::transparent::start(&mut opts.transparent, opts.listen.redirect_rules);
    metrics.transparent_ready.store(u64::from(opts.transparent.ready), std::sync::atomic::Ordering::Relaxed);
    if let (Intercept::ProxyAddress { v4, v6: Some(v6) }, true) = (to, backend.name() != "none") {
        redirect::proxy_address(v4.into())?;
        opts.listen.bind_address = v4.into();
        match redirect::proxy_address(v6.into()) {
            Ok(()) => opts.listen.bind_address6 = Some(v6.into()),
            Err(e) => {
                tracing::warn!(proxy_address6 = %v6, error = %e, "no IPv6 proxy address (is IPv6 off on this node?): IPv6 cluster IPs are not served");
                to = Intercept::ProxyAddress { v4, v6: None };
                backend = redirect::backend(opts.redirect, to)?;
            }
        }
    }
    match (to.dnat_to(false), backend.name()) {
        (_, "none") | (None, _) => tracing::info!(backend = backend.name(), "redirect rules"),
        (Some(addr), _) => {
            let dnat_to6 =
                to.dnat_to(true).map(|a| a.to_string()).unwrap_or_else(|| "none (REDIRECT)".into());
            tracing::info!(backend = backend.name(), dnat_to = %addr, dnat_to6, "redirect rules: DNAT to the proxy ports' addresses");
        }
    }
    // After a crash: the rules still point at the last run's proxy ports;
    // bind those again, and sync the difference only.
    let read_back = backend.read_back().unwrap_or_default();
    if !read_back.redirects.is_empty() {
        tracing::info!(
            backend = backend.name(),
            redirects = read_back.redirects.len(),
            whole = read_back.whole.is_some(),
            "rules of a previous run found: their proxy ports are bound again"
        );
    }
    let syncer = Syncer::new(backend).from_read_back(read_back.whole);
    let thread = SyncerThread::spawn(syncer, ready, metrics).map_err(RunError::RedirectThread)?;
    Ok((thread, read_back.redirects))
}
