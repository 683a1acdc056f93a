//! The handover's edge cases found in review (issue 12), through the real
//! `ringport` binary in the lab of `tests/upgrade_lab`: a successor
//! started with a low soft fd limit, a successor that never confirms, a
//! handed-over port the new configuration does not serve.
//!
//! Real sockets on loopback only; every loop is bounded in count and time;
//! every path and port is this test's own (tempdirs, ephemeral ports).

mod common;
mod upgrade_lab;

use std::time::Duration;

use common::{Backend, echo_ok, free_port};
use upgrade_lab::*;

/// The `sockets=N` a successor logged when it took the old sockets.
fn sockets_taken(log: &str) -> Option<usize> {
    let line = log.lines().find(|l| l.contains("took the old instance's sockets"))?;
    let at = line.find("sockets=")? + "sockets=".len();
    line[at..].split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

#[test]
fn a_successor_with_a_low_soft_fd_limit_takes_more_sockets_than_the_limit() {
    let echoes: Vec<Backend> = (0..5).map(|_| Backend::echo()).collect();
    let ports: Vec<u16> = echoes.iter().map(|_| free_port()).collect();
    let manifest = echoes
        .iter()
        .zip(&ports)
        .enumerate()
        .map(|(i, (e, p))| node_port_service(&format!("web{i}"), (*p, e.addr), None))
        .collect::<Vec<_>>()
        .join("---\n");
    let mut lab = Lab::new();
    let args = ["--workers", "8", "--drain-timeout", "1s"];
    let mut old = lab.first(&manifest, &args);
    let new = lab.start_limited(&manifest, &args, Some(64));
    new.wait_log("handover confirmed");
    let taken = sockets_taken(&new.log());
    assert!(
        taken.is_some_and(|n| n > 64),
        "more than 64 sockets taken under `ulimit -Sn 64`: {taken:?}\n{}",
        new.log()
    );
    assert!(!new.log().contains("handover failed"), "{}", new.log());
    assert!(old.wait_exit(Duration::from_secs(15)).success(), "{}", old.log());
    for (i, p) in ports.iter().enumerate() {
        assert!(echo_ok(local(*p), i), "port {p} serves after the upgrade:\n{}", new.log());
    }
}
