//! Long transfers across an upgrade (issue 12): 4 downloads of 256 MiB in
//! flight while a new instance takes over either finish whole with a
//! matching SHA-256 (drain long enough) or end in a reset, never in a clean
//! EOF (drain too short). A test binary of their own, and one test at a
//! time, so that they never share the machine's 2 cores with the
//! continuous-load upgrades of `tests/handover.rs`.
//!
//! Real sockets on loopback only; every loop is bounded in count and time;
//! every path and port is this test's own (tempdirs, ephemeral ports).

mod common;
mod upgrade_lab;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Backend, eventually, free_port};
use sha2::{Digest, Sha256};
use upgrade_lab::*;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// How a download ended: the bytes that arrived and their SHA-256, or the
/// error that cut it.
type Ended = std::io::Result<(usize, Vec<u8>)>;

/// A download of up to `total` bytes through `target`, read slowly until
/// `fast` is set.
fn download(target: SocketAddr, total: usize, fast: Arc<AtomicBool>) -> Ended {
    let mut c = TcpStream::connect(target)?;
    c.set_read_timeout(Some(Duration::from_secs(60)))?;
    c.write_all(b"go")?;
    let (mut hash, mut got, mut buf) = (Sha256::new(), 0usize, vec![0u8; 1 << 16]);
    loop {
        match c.read(&mut buf)? {
            0 => return Ok((got, hash.finalize().to_vec())),
            n => {
                hash.update(&buf[..n]);
                got += n;
                if got > total {
                    return Err(std::io::Error::other("more bytes than sent"));
                }
            }
        }
        if !fast.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

const TRANSFER: usize = 256 << 20;

/// A backend that sends [`TRANSFER`] bytes of one fixed pseudo-random
/// stream to each client, then closes; and that stream's SHA-256.
fn bulk_backend() -> (Backend, Vec<u8>) {
    fn stream(mut each: impl FnMut(&[u8]) -> bool) {
        let (mut state, mut buf) = (0x9e37_79b9_7f4a_7c15u64, vec![0u8; 1 << 16]);
        for _ in 0..TRANSFER / buf.len() {
            for chunk in buf.chunks_mut(8) {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
            }
            if !each(&buf) {
                return;
            }
        }
    }
    let backend = Backend::spawn("127.0.0.1:0", |mut s| {
        let mut go = [0u8; 2];
        if s.read_exact(&mut go).is_err() {
            return;
        }
        stream(|b| s.write_all(b).is_ok());
        let _ = s.shutdown(Shutdown::Write);
    });
    let mut hash = Sha256::new();
    stream(|b| {
        hash.update(b);
        true
    });
    (backend, hash.finalize().to_vec())
}

/// Four downloads through the NodePort, started before an upgrade; what
/// each ended with once `drain` has run.
fn transfers_across_an_upgrade(drain: &str) -> (Vec<Ended>, Vec<u8>) {
    // One at a time: 8 transfers of 256 MiB at once starve a 2-core machine.
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let started = Instant::now();
    let (backend, expected) = bulk_backend();
    let port = free_port();
    let manifest = node_port_service("bulk", (port, backend.addr), None);
    let mut lab = Lab::new();
    let args = ["--drain-timeout", drain];
    let mut old = lab.first(&manifest, &args);
    let fast = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let fast = Arc::clone(&fast);
            std::thread::spawn(move || download(local(port), TRANSFER, fast))
        })
        .collect();
    eventually(Duration::from_secs(10), "4 transfers under way", || {
        backend.accepted.load(Ordering::SeqCst) == 4
    });
    let new = lab.start(&manifest, &args);
    new.wait_log("handover confirmed");
    old.wait_log("handed over to the successor");
    // The slow readers speed up only once the old instance drains.
    if drain != "500ms" {
        fast.store(true, Ordering::Relaxed);
    }
    let status = old.wait_exit(Duration::from_secs(90));
    fast.store(true, Ordering::Relaxed);
    assert!(status.success(), "the old instance exited with {status}:\n{}", old.log());
    let ended = clients.into_iter().map(|c| c.join().expect("client")).collect();
    println!("4 transfers of 256 MiB across an upgrade, --drain-timeout {drain}: {:?}", started.elapsed());
    (ended, expected)
}

#[test]
fn transfers_in_flight_finish_whole_when_the_drain_is_long_enough() {
    let (ended, expected) = transfers_across_an_upgrade("80s");
    for (i, e) in ended.into_iter().enumerate() {
        let (got, hash) = e.unwrap_or_else(|e| panic!("transfer {i} failed: {e}"));
        assert_eq!(got, TRANSFER, "transfer {i}: every byte");
        assert_eq!(hash, expected, "transfer {i}: SHA-256 matches");
    }
}

#[test]
fn transfers_cut_by_a_short_drain_end_in_reset_never_in_eof() {
    let (ended, _) = transfers_across_an_upgrade("500ms");
    for (i, e) in ended.into_iter().enumerate() {
        match e {
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
            Ok((got, _)) => panic!("transfer {i} ended in EOF after {got} of {TRANSFER} bytes"),
            Err(e) => panic!("transfer {i}: expected a reset, got {e}"),
        }
    }
}
