//! The socket a connection or UDP flow opens towards its endpoint: plain
//! (the node's address), or transparent (`IP_TRANSPARENT`, bound to the
//! client's address) as the service port's [`SourcePlan`] decides.
//!
//! Invariants:
//! - A transparent socket the kernel refuses (no `CAP_NET_ADMIN`, an
//!   address it will not bind) is replaced by a plain one: the connection
//!   goes on from the node's address, counted as a `refused` fallback and
//!   warned about once per process.
//! - Only an error making the socket itself is returned (a local one).
//!
//! [`SourcePlan`]: crate::source_ip::SourcePlan

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};

use socket2::{Domain, Socket, Type};

use crate::source_ip::{Decision, Fallback, Source};

static WARNED: AtomicBool = AtomicBool::new(false);

/// A non-blocking, close-on-exec socket of `ty` for `endpoint`, bound as
/// `decision` says, and whose address it got.
pub fn open(endpoint: SocketAddr, ty: Type, decision: Decision) -> io::Result<(Socket, Source)> {
    let plain = || Socket::new(Domain::for_address(endpoint), ty.nonblocking().cloexec(), None);
    match decision {
        Decision::Plain(why) => Ok((plain()?, Source::Proxy(why))),
        Decision::Transparent { bind } => {
            let socket = plain()?;
            match transparent(&socket, bind) {
                Ok(()) => Ok((socket, Source::Client)),
                Err(e) => {
                    if !WARNED.swap(true, Ordering::Relaxed) {
                        tracing::warn!(client = %bind.ip(), error = %e, "cannot bind an upstream socket to the client's address (IP_TRANSPARENT); connecting from the node's address (warned once; see ringport_source_ip_fallback_total{{reason=\"refused\"}})");
                    }
                    Ok((plain()?, Source::Proxy(Some(Fallback::Refused))))
                }
            }
        }
    }
}

fn transparent(socket: &Socket, bind: SocketAddr) -> io::Result<()> {
    match bind {
        SocketAddr::V4(_) => socket.set_ip_transparent_v4(true)?,
        SocketAddr::V6(_) => socket.set_ip_transparent_v6(true)?,
    }
    socket.bind(&bind.into())
}
