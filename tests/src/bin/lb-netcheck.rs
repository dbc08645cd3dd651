//! Test servers and clients for the namespace cluster (run inside a pod or
//! client namespace with `ip netns exec`).
//!
//! - `serve NAME`: HTTP on :8080 answering NAME (`/whoami`: NAME and the
//!   client address seen), `NAME:9090` and `NAME:9091` on those ports, UDP on :5353 answering `NAME:<payload>`, and a
//!   TCP echo on :7000.
//! - `udp ADDR:PORT COUNT`: one datagram per line of output: the answer,
//!   `refused` (ICMP port unreachable) or `timeout`.
//! - `udp-large ADDR:PORT BYTES COUNT`: datagrams of BYTES bytes (more than
//!   an MTU: sent in IP fragments), each from a fresh socket; one line per
//!   datagram: `NAME ok` when the answer echoes every byte, `NAME corrupt`,
//!   `refused` or `timeout`.
//! - `stream ADDR:PORT SECONDS`: a long-lived TCP connection through the
//!   echo server, checking every byte comes back; prints `ok <bytes>` or the
//!   error and exits non-zero.
//! - `http-close PORT`: the benchmark's server: answers every HTTP request
//!   with a fixed 200 and closes the connection, on two threads.
//! - `connect ADDR:PORT`: one TCP connect(): `ok`, `refused` or the error,
//!   then the milliseconds it took, then the peer getpeername() gives.
//! - `udp-from ADDR:PORT COUNT`: datagrams from one unconnected socket;
//!   each answer with the address recvfrom() says it came from.
//! - `udp-peer ADDR:PORT`: a connected UDP socket's getpeername().
//! - `udp-hold ADDR:PORT MILLIS`: a connected UDP socket asking every 20 ms,
//!   as a long-lived client does; when the socket fails it reports the
//!   error and connects a new one. Prints `<ms since start> <answer>`.
//! - `udp-loop ADDR:PORT SRCPORT MILLIS`: a query every 50 ms, each from a
//!   new socket bound to the same source port (Kubernetes' conntrack e2e
//!   client: `nc -u -p SRCPORT` in a loop), so every datagram is the same
//!   flow to the network. Prints `<ms since start> <answer>`.

use std::{
    io::{ErrorKind, Read, Write},
    net::{TcpListener, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["serve", name] => serve(name),
        ["udp", to, count] => udp(to, count.parse()?),
        ["udp-large", to, bytes, count] => udp_large(to, bytes.parse()?, count.parse()?),
        ["stream", to, seconds] => stream(to, Duration::from_secs(seconds.parse()?)),
        ["http-close", port] => http_close(port.parse()?),
        ["connect", to] => connect(to),
        ["udp-from", to, count] => udp_from(to, count.parse()?),
        ["udp-peer", to] => udp_peer(to),
        ["udp-hold", to, millis] => udp_hold(to, Duration::from_millis(millis.parse()?)),
        ["udp-loop", to, src, millis] => udp_loop(to, src.parse()?, Duration::from_millis(millis.parse()?)),
        _ => bail!(
            "usage: lb-netcheck serve NAME | udp ADDR:PORT COUNT | udp-large ADDR:PORT BYTES COUNT | stream ADDR:PORT SECONDS | http-close PORT \
             | connect ADDR:PORT | udp-from ADDR:PORT COUNT | udp-peer ADDR:PORT | udp-hold ADDR:PORT MILLIS \
             | udp-loop ADDR:PORT SRCPORT MILLIS"
        ),
    }
}

fn serve(name: &str) -> Result<()> {
    for port in [8080u16, 9090, 9091] {
        let server =
            tiny_http::Server::http(("0.0.0.0", port)).map_err(|e| anyhow::anyhow!("http :{port}: {e}"))?;
        let body = if port == 8080 { name.to_string() } else { format!("{name}:{port}") };
        std::thread::spawn(move || {
            for request in server.incoming_requests() {
                // `/whoami` also says which client address the pod saw.
                let answer = match (request.url(), request.remote_addr()) {
                    ("/whoami", Some(peer)) => format!("{body} {}", peer.ip()),
                    _ => body.clone(),
                };
                let _ = request.respond(tiny_http::Response::from_string(answer));
            }
        });
    }
    let udp = UdpSocket::bind("0.0.0.0:5353")?;
    let udp_name = name.to_string();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 65_536];
        while let Ok((n, from)) = udp.recv_from(&mut buf) {
            let reply = format!("{udp_name}:{}", String::from_utf8_lossy(&buf[..n]));
            let _ = udp.send_to(reply.as_bytes(), from);
        }
    });
    let echo = TcpListener::bind("0.0.0.0:7000")?;
    for conn in echo.incoming() {
        let Ok(mut conn) = conn else { continue };
        std::thread::spawn(move || {
            let mut buf = [0u8; 16 * 1024];
            while let Ok(n) = conn.read(&mut buf) {
                if n == 0 || conn.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        });
    }
    Ok(())
}

fn udp(to: &str, count: u32) -> Result<()> {
    for i in 0..count {
        // A fresh socket (and source port) per query: a new flow each time.
        let sock = UdpSocket::bind("0.0.0.0:0")?;
        sock.connect(to)?;
        sock.set_read_timeout(Some(Duration::from_secs(2)))?;
        sock.send(format!("q{i}").as_bytes())?;
        let mut buf = [0u8; 1500];
        match sock.recv(&mut buf) {
            Ok(n) => println!("{}", String::from_utf8_lossy(&buf[..n])),
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => println!("refused"),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => println!("timeout"),
            Err(e) => println!("error {e}"),
        }
    }
    Ok(())
}

fn udp_large(to: &str, bytes: usize, count: u32) -> Result<()> {
    for i in 0..count {
        let sock = UdpSocket::bind("0.0.0.0:0")?;
        sock.connect(to)?;
        sock.set_read_timeout(Some(Duration::from_secs(2)))?;
        let payload: Vec<u8> = (0..bytes).map(|b| b"0123456789abcdef"[(b + i as usize) % 16]).collect();
        sock.send(&payload)?;
        let mut buf = vec![0u8; 65_536];
        match sock.recv(&mut buf) {
            Ok(n) => {
                let answer = &buf[..n];
                let name_end = answer.iter().position(|&b| b == b':').unwrap_or(n);
                let name = String::from_utf8_lossy(&answer[..name_end]);
                let intact = answer.get(name_end + 1..) == Some(&payload[..]);
                println!("{name} {}", if intact { "ok" } else { "corrupt" });
            }
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => println!("refused"),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => println!("timeout"),
            Err(e) => println!("error {e}"),
        }
    }
    Ok(())
}

fn stream(to: &str, duration: Duration) -> Result<()> {
    let mut conn = TcpStream::connect_timeout(&to.parse()?, Duration::from_secs(2)).context("connect")?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    let started = Instant::now();
    let mut total: u64 = 0;
    let mut seq: u64 = 0;
    while started.elapsed() < duration {
        let chunk: Vec<u8> = (0..1024u64).map(|i| ((seq * 1024 + i) % 251) as u8).collect();
        conn.write_all(&chunk).with_context(|| format!("write after {total} bytes"))?;
        let mut back = vec![0u8; chunk.len()];
        conn.read_exact(&mut back).with_context(|| format!("read after {total} bytes"))?;
        if back != chunk {
            bail!("corrupted echo after {total} bytes");
        }
        total += chunk.len() as u64;
        seq += 1;
        std::thread::sleep(Duration::from_millis(10));
    }
    println!("ok {total}");
    Ok(())
}

fn http_close(port: u16) -> Result<()> {
    const RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok";
    let listener = TcpListener::bind(("0.0.0.0", port))?;
    let serve = move |listener: TcpListener| {
        let mut buf = [0u8; 4096];
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            // Read the request head (small, usually one segment), answer, close.
            let mut seen = 0;
            while let Ok(n) = conn.read(&mut buf[seen..]) {
                seen += n;
                if n == 0 || buf[..seen].windows(4).any(|w| w == b"\r\n\r\n") || seen == buf.len() {
                    break;
                }
            }
            let _ = conn.write_all(RESPONSE);
        }
    };
    let second = listener.try_clone()?;
    std::thread::spawn(move || serve(second));
    serve(listener);
    Ok(())
}

fn connect(to: &str) -> Result<()> {
    let started = Instant::now();
    let result = TcpStream::connect_timeout(&to.parse()?, Duration::from_secs(2));
    let ms = started.elapsed().as_millis();
    match result {
        Ok(conn) => println!("ok {ms} {}", conn.peer_addr()?),
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => println!("refused {ms}"),
        Err(e) => println!("error {ms} {e}"),
    }
    Ok(())
}

fn udp_from(to: &str, count: u32) -> Result<()> {
    // An IPv6 (dual-stack) socket for `[::ffff:a.b.c.d]:port`.
    let sock = UdpSocket::bind(if to.starts_with('[') { "[::]:0" } else { "0.0.0.0:0" })?;
    sock.set_read_timeout(Some(Duration::from_secs(2)))?;
    for i in 0..count {
        sock.send_to(format!("q{i}").as_bytes(), to)?;
        let mut buf = [0u8; 1500];
        match sock.recv_from(&mut buf) {
            Ok((n, from)) => println!("{} {from}", String::from_utf8_lossy(&buf[..n])),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => println!("timeout"),
            Err(e) => println!("error {e}"),
        }
    }
    Ok(())
}

fn udp_peer(to: &str) -> Result<()> {
    let sock = UdpSocket::bind("0.0.0.0:0")?;
    sock.connect(to)?;
    println!("{}", sock.peer_addr()?);
    Ok(())
}

fn udp_hold(to: &str, duration: Duration) -> Result<()> {
    let started = Instant::now();
    let mut sock: Option<UdpSocket> = None;
    let mut i = 0u64;
    while started.elapsed() < duration {
        let s = match sock.take() {
            Some(s) => s,
            None => {
                let s = UdpSocket::bind("0.0.0.0:0")?;
                s.connect(to)?;
                s.set_read_timeout(Some(Duration::from_millis(200)))?;
                s
            }
        };
        i += 1;
        let ms = started.elapsed().as_millis();
        let mut buf = [0u8; 1500];
        let answer = s.send(format!("h{i}").as_bytes()).and_then(|_| s.recv(&mut buf));
        match answer {
            Ok(n) => {
                println!("{ms} {}", String::from_utf8_lossy(&buf[..n]));
                sock = Some(s);
            }
            // No answer yet: the same socket asks again.
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                println!("{ms} timeout");
                sock = Some(s);
            }
            // The socket was destroyed (or refused): a client connects anew.
            Err(e) => println!("{ms} error {e}"),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn udp_loop(to: &str, src: u16, duration: Duration) -> Result<()> {
    let started = Instant::now();
    let mut i = 0u64;
    while started.elapsed() < duration {
        i += 1;
        let ms = started.elapsed().as_millis();
        // The previous socket is closed: its port is free again at once.
        let answer = UdpSocket::bind(("0.0.0.0", src)).and_then(|s| {
            s.set_read_timeout(Some(Duration::from_millis(200)))?;
            s.connect(to)?;
            s.send(format!("l{i}").as_bytes())?;
            let mut buf = [0u8; 1500];
            let n = s.recv(&mut buf)?;
            Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
        });
        match answer {
            Ok(a) => println!("{ms} {a}"),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                println!("{ms} timeout")
            }
            Err(e) => println!("{ms} error {e}"),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}
