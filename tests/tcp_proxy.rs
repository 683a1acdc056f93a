//! TCP through the real `ringport` binary: integrity, half-close, closes and
//! resets from either side, many connections, idle connections, and round
//! robin. Real sockets on loopback, real backends started here.
//!
//! Every test of the relay runs once per `--relay` mode (splice, copy, ring,
//! auto; see `in_every_relay_mode!` at the bottom): whatever moves the
//! bytes, the same bytes must arrive, ends must pass, and idle connections
//! must stay cheap.

mod common;

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::Duration;

use common::{Backend, Proxy, eventually, service_with_endpoints, whoami};
use sha2::{Digest, Sha256};

const SVC: &str = "default/svc";

fn proxy_for(backends: &[&Backend]) -> Proxy {
    proxy_in(backends, "splice")
}

fn proxy_in(backends: &[&Backend], relay: &str) -> Proxy {
    let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
    Proxy::start(&service_with_endpoints("svc", &addrs), &["--relay", relay])
}

/// The thousand-connection tests of the four modes one at a time: at once,
/// their backends' threads and fds would crowd this shared machine.
static THOUSANDS: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_thousand_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    THOUSANDS.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A deterministic pseudo-random stream (xorshift64*).
fn fill(buf: &mut [u8], state: &mut u64) {
    for chunk in buf.chunks_mut(8) {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        let v = state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}

fn random_64_mib_echoed_both_ways_at_once_arrives_intact(relay: &str) {
    const TOTAL: usize = 64 << 20;
    let backend = Backend::echo();
    let proxy = proxy_in(&[&backend], relay);
    let client = TcpStream::connect(proxy.proxy_addr(SVC)).expect("connect");
    client.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
    let mut writer = client.try_clone().expect("clone");
    let sender = std::thread::spawn(move || {
        let (mut state, mut sent, mut buf) = (0x9e37_79b9_7f4a_7c15u64, Sha256::new(), vec![0u8; 1 << 16]);
        for _ in 0..TOTAL / buf.len() {
            fill(&mut buf, &mut state);
            sent.update(&buf);
            writer.write_all(&buf).expect("send");
        }
        writer.shutdown(Shutdown::Write).expect("half-close");
        sent.finalize()
    });
    let (mut received, mut n, mut buf, mut reader) = (Sha256::new(), 0usize, vec![0u8; 1 << 16], client);
    loop {
        match reader.read(&mut buf).expect("read echo") {
            0 => break,
            k => {
                received.update(&buf[..k]);
                n += k;
            }
        }
    }
    let sent = sender.join().expect("sender");
    assert_eq!(n, TOTAL, "every byte came back");
    assert_eq!(received.finalize(), sent, "checksums match");
}

fn half_close_delivers_the_whole_answer_then_eof(relay: &str) {
    // Reads the request to EOF, then answers with its length and 1 MiB.
    let backend = Backend::spawn("127.0.0.1:0", |mut s| {
        let mut request = Vec::new();
        if s.read_to_end(&mut request).is_err() {
            return;
        }
        let mut answer = format!("got {} bytes\n", request.len()).into_bytes();
        answer.extend(std::iter::repeat_n(b'a', 1 << 20));
        let _ = s.write_all(&answer);
    });
    let proxy = proxy_in(&[&backend], relay);
    let mut c = TcpStream::connect(proxy.proxy_addr(SVC)).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    c.write_all(&vec![b'q'; 100_000]).expect("request");
    c.shutdown(Shutdown::Write).expect("half-close");
    let mut answer = Vec::new();
    c.read_to_end(&mut answer).expect("answer, then EOF");
    let head = b"got 100000 bytes\n";
    assert!(answer.starts_with(head), "{:?}", String::from_utf8_lossy(&answer[..40.min(answer.len())]));
    assert_eq!(answer.len(), head.len() + (1 << 20));
}

fn backend_closing_first_delivers_every_byte_then_eof(relay: &str) {
    let backend = Backend::spawn("127.0.0.1:0", |mut s| {
        let _ = s.write_all(&vec![b'z'; 3 << 20]);
    });
    let proxy = proxy_in(&[&backend], relay);
    let mut c = TcpStream::connect(proxy.proxy_addr(SVC)).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let mut got = Vec::new();
    c.read_to_end(&mut got).expect("bytes, then EOF");
    assert_eq!(got.len(), 3 << 20);
    assert!(got.iter().all(|b| *b == b'z'));
}

fn backend_reset_reaches_the_client_promptly(relay: &str) {
    let backend = Backend::spawn("127.0.0.1:0", |mut s| {
        let _ = s.write_all(b"partial");
        std::thread::sleep(Duration::from_millis(100));
        let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
    });
    let proxy = proxy_in(&[&backend], relay);
    let baseline = proxy.fd_count();
    let mut c = TcpStream::connect(proxy.proxy_addr(SVC)).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(3))).expect("timeout");
    let mut got = Vec::new();
    match c.read_to_end(&mut got) {
        Ok(_) => {}
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        Err(e) => panic!("expected a reset or EOF within 3 s, got {e}"),
    }
    eventually(Duration::from_secs(5), "the proxy to close both sockets", || proxy.fd_count() <= baseline);
}

fn thousand_concurrent_connections_complete_and_fds_return_to_baseline(relay: &str) {
    let _one = one_thousand_at_a_time();
    let backend = Backend::echo();
    let proxy = proxy_in(&[&backend], relay);
    let target = proxy.proxy_addr(SVC);
    let baseline = proxy.fd_count();
    let mut conns: Vec<TcpStream> = (0..1000)
        .map(|i| TcpStream::connect(target).unwrap_or_else(|e| panic!("connect {i}: {e}")))
        .collect();
    for (i, c) in conns.iter_mut().enumerate() {
        c.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        c.write_all(format!("hello {i:04}").as_bytes()).expect("send");
        c.shutdown(Shutdown::Write).expect("half-close");
    }
    for (i, c) in conns.iter_mut().enumerate() {
        let mut back = String::new();
        c.read_to_string(&mut back).expect("echo, then EOF");
        assert_eq!(back, format!("hello {i:04}"));
    }
    drop(conns);
    eventually(Duration::from_secs(10), "the proxy's fd count to return to its baseline", || {
        proxy.fd_count() <= baseline
    });
}

fn thousand_idle_connections_hold_few_io_wq_threads(relay: &str) {
    let _one = one_thousand_at_a_time();
    let backend = Backend::echo();
    let proxy = proxy_in(&[&backend], relay);
    let target = proxy.proxy_addr(SVC);
    let mut conns = Vec::new();
    for i in 0..1000 {
        let mut c = TcpStream::connect(target).unwrap_or_else(|e| panic!("connect {i}: {e}"));
        c.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        // One exchange, so every connection is past connect and relaying.
        c.write_all(b"ping").expect("send");
        let mut back = [0u8; 4];
        c.read_exact(&mut back).expect("echo");
        conns.push(c);
    }
    std::thread::sleep(Duration::from_millis(500)); // let any io-wq thread appear
    let threads = proxy.io_wq_threads();
    assert!(threads < 16, "{threads} iou-wrk threads for 1000 idle connections");
    assert_eq!(backend.accepted.load(std::sync::atomic::Ordering::SeqCst), 1000);
}

#[test]
fn round_robin_spreads_300_connections_100_per_backend() {
    let backends = [Backend::greeter(), Backend::greeter(), Backend::greeter()];
    let proxy = proxy_for(&backends.iter().collect::<Vec<_>>());
    let target = proxy.proxy_addr(SVC);
    let mut seen: HashMap<String, usize> = HashMap::new();
    for _ in 0..300 {
        *seen.entry(whoami(target)).or_default() += 1;
    }
    assert_eq!(seen.len(), 3, "{seen:?}");
    for b in &backends {
        let n = seen.get(&b.addr.to_string()).copied().unwrap_or(0);
        assert!((99..=101).contains(&n), "{} got {n}: {seen:?}", b.addr);
    }
}

/// Each test named runs in every `--relay` mode, as `<mode>::<test>`.
macro_rules! in_every_relay_mode {
    ($($mode:ident),*; $tests:tt) => {
        $( in_every_relay_mode!(@mode $mode $tests); )*
    };
    (@mode $mode:ident [$($test:ident),* $(,)?]) => {
        mod $mode {
            $(
                #[test]
                fn $test() {
                    super::$test(stringify!($mode));
                }
            )*
        }
    };
}

in_every_relay_mode!(splice, copy, ring, auto; [
    random_64_mib_echoed_both_ways_at_once_arrives_intact,
    half_close_delivers_the_whole_answer_then_eof,
    backend_closing_first_delivers_every_byte_then_eof,
    backend_reset_reaches_the_client_promptly,
    thousand_concurrent_connections_complete_and_fds_return_to_baseline,
    thousand_idle_connections_hold_few_io_wq_threads,
]);
