//! `ringport demo`: three small HTTP backends, the real proxy in front of
//! them on `examples/edge.yaml`, and a client whose requests show round
//! robin. Real sockets through the real data plane, on loopback only.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::listen::ListenRole;
use crate::model::{ServiceName, ServicePortName};
use crate::run::{self, Handles, RunOptions};

/// The shipped example, used when `examples/edge.yaml` is not on disk here.
const EDGE_YAML: &str = include_str!("../examples/edge.yaml");
/// The example's backends.
const BACKENDS: [([u8; 4], u16); 3] =
    [([127, 0, 0, 11], 8080), ([127, 0, 0, 12], 8080), ([127, 0, 0, 13], 8080)];
const REQUESTS: usize = 6;

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("cannot start demo backend on {addr}")]
    Backend {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("cannot write the example manifest to {path}")]
    Example {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Run(#[from] run::RunError),
}

/// The manifest the demo serves: the given one, or the embedded example.
pub fn example_path(wanted: &Path) -> Result<PathBuf, DemoError> {
    if wanted.exists() {
        return Ok(wanted.to_path_buf());
    }
    let dir = std::env::temp_dir().join("ringport-demo");
    let path = dir.join("edge.yaml");
    std::fs::create_dir_all(&dir)
        .and_then(|()| std::fs::write(&path, EDGE_YAML))
        .map_err(|source| DemoError::Example { path: path.clone(), source })?;
    Ok(path)
}

/// Run the demo until Ctrl-C.
pub fn demo(opts: RunOptions) -> Result<(), DemoError> {
    for (ip, port) in BACKENDS {
        let addr = SocketAddr::from((ip, port));
        let listener = TcpListener::bind(addr).map_err(|source| DemoError::Backend { addr, source })?;
        std::thread::spawn(move || serve_backend(listener));
    }
    let handles = Handles::new(opts.workers.workers);
    let watcher = handles.clone();
    std::thread::spawn(move || client(&watcher));
    run::run(opts, handles)?;
    Ok(())
}

/// A tiny HTTP/1.1 responder that names itself in every answer.
fn serve_backend(listener: TcpListener) {
    let me = listener.local_addr().map_or_else(|_| "?".into(), |a| a.to_string());
    for stream in listener.incoming().flatten() {
        let me = me.clone();
        std::thread::spawn(move || {
            let _ = answer(stream, &me);
        });
    }
}

fn answer(stream: TcpStream, me: &str) -> io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    // Read the request head; the body, if any, is ignored.
    while reader.read_line(&mut line)? > 2 {
        line.clear();
    }
    let body = format!("hello from backend {me}\n");
    let mut stream = stream;
    write!(
        stream,
        "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// Wait for the proxy, then show round robin through it.
fn client(handles: &Handles) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !handles.ready.load(Ordering::Acquire) {
        if Instant::now() > deadline {
            eprintln!("demo: the proxy did not become ready in 10 s; see the log above");
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let web = ServicePortName { service: ServiceName::new("default", "web"), port: "http".into() };
    let snapshot = handles.snapshot.load_full();
    let Some(target) = snapshot
        .listeners
        .iter()
        .find(|l| l.key.port == web && matches!(l.key.role, ListenRole::NodePort(_)))
        .map(|l| SocketAddr::new(loopback_if_wildcard(l.addr.ip()), l.addr.port()))
    else {
        eprintln!("demo: the manifest has no nodePort for default/web:http; nothing to show");
        return;
    };
    println!(
        "\nringport demo: {REQUESTS} requests to {target} (default/web, nodePort), one connection each:"
    );
    for i in 1..=REQUESTS {
        match get(target) {
            Ok(body) => println!("  request {i} -> {}", body.trim()),
            Err(e) => println!("  request {i} -> failed: {e}"),
        }
    }
    println!(
        "\nStill serving. Try `curl http://{target}/`, edit the manifest to change endpoints, or press Ctrl-C to stop.\n"
    );
}

fn loopback_if_wildcard(ip: IpAddr) -> IpAddr {
    if ip.is_unspecified() { Ipv4Addr::LOCALHOST.into() } else { ip }
}

fn get(target: SocketAddr) -> io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&target, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(stream, "GET / HTTP/1.1\r\nhost: demo\r\nconnection: close\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response.split("\r\n\r\n").nth(1).unwrap_or_default().to_string())
}
