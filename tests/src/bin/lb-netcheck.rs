//! Test servers and clients for the namespace cluster (run inside a pod or
//! client namespace with `ip netns exec`).
//!
//! - `serve NAME`: HTTP on :8080 answering NAME (`/whoami`: NAME and the
//!   client address seen), `NAME:9090` and `NAME:9091` on those ports, UDP on :5353 answering `NAME:<payload>`, a
//!   TCP echo on :7000, and SCTP on :5060 (raw sockets, so the kernel needs
//!   no SCTP) answering `NAME:<payload>`.
//! - `sctp ADDR:PORT COUNT`: one SCTP packet per query (raw socket, CRC32c
//!   computed); one line each: the answer, `badcrc` or `timeout`.
//! - `udp ADDR:PORT COUNT`: one datagram per line of output: the answer,
//!   `refused` (ICMP port unreachable) or `timeout`.
//! - `udp-large ADDR:PORT BYTES COUNT`: datagrams of BYTES bytes (more than
//!   an MTU: sent in IP fragments), each from a fresh socket; one line per
//!   datagram: `NAME ok` when the answer echoes every byte, `NAME corrupt`,
//!   `refused` or `timeout`.
//! - `stream ADDR:PORT SECONDS`: a long-lived TCP connection through the
//!   echo server, checking every byte comes back; prints `ok <bytes>` or the
//!   error and exits non-zero.
//! - `boom PORT SECONDS SHIFT`: Kubernetes' INVALID-conntrack e2e server
//!   (regression test for kubernetes#74839): a TCP echo server on PORT that
//!   sends each new connection's client, from a raw socket, one segment far
//!   outside the window, from its own port plus SHIFT (0: the connection's
//!   port; 1: a port no connection has, the control), and counts the RSTs
//!   coming back to that port. A proxy that passed the segment without its
//!   reverse translation makes the client answer it with a RST, which kills
//!   the real connection. Prints `connections C bad B rst R` at the end.
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
        ["sctp", to, count] => sctp(to, count.parse()?),
        ["stream", to, seconds] => stream(to, Duration::from_secs(seconds.parse()?)),
        ["http-close", port] => http_close(port.parse()?),
        ["boom", port, seconds, shift] => boom(port.parse()?, seconds.parse()?, shift.parse()?),
        ["connect", to] => connect(to),
        ["udp-from", to, count] => udp_from(to, count.parse()?),
        ["udp-peer", to] => udp_peer(to),
        ["udp-hold", to, millis] => udp_hold(to, Duration::from_millis(millis.parse()?)),
        ["udp-loop", to, src, millis] => udp_loop(to, src.parse()?, Duration::from_millis(millis.parse()?)),
        _ => bail!(
            "usage: lb-netcheck serve NAME | udp ADDR:PORT COUNT | udp-large ADDR:PORT BYTES COUNT | sctp ADDR:PORT COUNT | stream ADDR:PORT SECONDS | http-close PORT | boom PORT SECONDS SHIFT \
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
    let sctp = RawIp::open(libc::IPPROTO_SCTP)?;
    let sctp_name = name.to_string();
    std::thread::spawn(move || sctp_serve(&sctp, &sctp_name));
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

/// SCTP's port here, as upstream's `agnhost netexec --sctp-port`.
const SCTP_PORT: u16 = 5060;

/// An SCTP packet with one DATA chunk carrying `payload`, its CRC32c
/// computed.
fn sctp_packet(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    lb_tests::packet::sctp_packet(sport, dport, 0, payload, false)
}

/// One SCTP packet read from a raw socket's bytes (IP header first): its
/// source, ports, whether its CRC32c holds, and its first chunk's value.
struct SctpSeen {
    from: std::net::Ipv4Addr,
    sport: u16,
    dport: u16,
    crc_ok: bool,
    payload: Vec<u8>,
}

fn sctp_parse(buf: &[u8]) -> Option<SctpSeen> {
    let (ip, rest) = etherparse::Ipv4Header::from_slice(buf).ok()?;
    let len = (ip.total_len as usize).checked_sub(ip.header_len())?;
    let mut s = rest.get(..len)?.to_vec();
    if s.len() < 16 {
        return None;
    }
    let crc = u32::from_le_bytes([s[8], s[9], s[10], s[11]]);
    s[8..12].copy_from_slice(&[0; 4]);
    let chunk_len = u16::from_be_bytes([s[14], s[15]]) as usize;
    Some(SctpSeen {
        from: ip.source.into(),
        sport: u16::from_be_bytes([s[0], s[1]]),
        dport: u16::from_be_bytes([s[2], s[3]]),
        crc_ok: crc == lb_tests::packet::CRC32C.checksum(&s),
        payload: s.get(16..12 + chunk_len.max(4))?.to_vec(),
    })
}

/// The pods' SCTP server, on raw sockets (the test machines' kernels need
/// not have SCTP): answers each packet to its port with `NAME:<payload>`,
/// or `NAME:badcrc` when the packet's CRC32c does not hold.
fn sctp_serve(sock: &RawIp, name: &str) {
    let mut buf = [0u8; 2048];
    loop {
        let Some(n) = sock.recv(&mut buf) else { continue };
        let Some(seen) = sctp_parse(&buf[..n]) else { continue };
        if seen.dport != SCTP_PORT {
            continue;
        }
        let text =
            if seen.crc_ok { String::from_utf8_lossy(&seen.payload).into_owned() } else { "badcrc".into() };
        let reply = sctp_packet(SCTP_PORT, seen.sport, format!("{name}:{text}").as_bytes());
        let _ = sock.send_to(&reply, seen.from);
    }
}

/// `sctp ADDR:PORT COUNT`: a packet per query from a fresh source port;
/// prints the answer (`NAME:q<i>`), `badcrc` when the answer's CRC32c does
/// not hold, or `timeout`.
fn sctp(to: &str, count: u32) -> Result<()> {
    let to: std::net::SocketAddrV4 = to.parse()?;
    let sock = RawIp::open(libc::IPPROTO_SCTP)?;
    for i in 0..count {
        let sport = 40_000 + (std::process::id() as u16 % 10_000) + i as u16;
        sock.send_to(&sctp_packet(sport, to.port(), format!("q{i}").as_bytes()), *to.ip())?;
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut answer = "timeout".to_string();
        let mut buf = [0u8; 2048];
        while Instant::now() < deadline {
            let Some(n) = sock.recv(&mut buf) else { continue };
            let Some(seen) = sctp_parse(&buf[..n]) else { continue };
            if seen.from != *to.ip() || seen.sport != to.port() || seen.dport != sport {
                continue;
            }
            answer = if seen.crc_ok {
                String::from_utf8_lossy(&seen.payload).trim_end_matches('\0').to_string()
            } else {
                "badcrc".into()
            };
            break;
        }
        println!("{answer}");
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

fn boom(port: u16, seconds: u64, shift: u16) -> Result<()> {
    use std::sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    };
    let listener = TcpListener::bind(("0.0.0.0", port))?;
    listener.set_nonblocking(true)?;
    let from_port = port + shift;
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let rsts = Arc::new(AtomicU32::new(0));
    let counter = {
        let rsts = rsts.clone();
        let watch = RawIp::open(libc::IPPROTO_TCP)?;
        std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while Instant::now() < deadline {
                let Some(n) = watch.recv(&mut buf) else { continue };
                let Ok((_, rest)) = etherparse::Ipv4Header::from_slice(&buf[..n]) else { continue };
                let Ok((tcp, _)) = etherparse::TcpHeader::from_slice(rest) else { continue };
                if tcp.rst && tcp.destination_port == from_port {
                    rsts.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    let send = RawIp::open(libc::IPPROTO_TCP)?;
    let (mut connections, mut bad) = (0u32, 0u32);
    while Instant::now() < deadline {
        let conn = match listener.accept() {
            Ok((conn, _)) => conn,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        connections += 1;
        conn.set_nonblocking(false)?;
        let (std::net::SocketAddr::V4(local), std::net::SocketAddr::V4(peer)) =
            (conn.local_addr()?, conn.peer_addr()?)
        else {
            bail!("IPv4 only");
        };
        let echo = conn.try_clone()?;
        std::thread::spawn(move || {
            let (mut rx, mut tx) = (echo.try_clone().expect("clone"), echo);
            let mut buf = [0u8; 16 * 1024];
            while let Ok(n) = rx.read(&mut buf) {
                if n == 0 || tx.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        });
        // Let the connection carry data first, as a long-lived one does.
        std::thread::sleep(Duration::from_millis(200));
        let mut tcp = etherparse::TcpHeader::new(from_port, peer.port(), 0x8000_0000, 64_240);
        tcp.ack = true;
        tcp.psh = true;
        tcp.acknowledgment_number = 0x4000_0000;
        let payload = b"boom";
        tcp.checksum = tcp.calc_checksum_ipv4_raw(local.ip().octets(), peer.ip().octets(), payload)?;
        let mut segment = tcp.to_bytes().to_vec();
        segment.extend_from_slice(payload);
        send.send_to(&segment, *peer.ip())?;
        bad += 1;
        drop(conn);
    }
    counter.join().ok();
    println!("connections {connections} bad {bad} rst {}", rsts.load(Ordering::Relaxed));
    Ok(())
}

/// A raw IPv4 socket of one protocol: sends packets whose transport header
/// we wrote (the kernel adds the IP header), and receives a copy of every
/// packet of that protocol for this host, IP header first.
struct RawIp(std::os::fd::OwnedFd);

impl RawIp {
    fn open(protocol: i32) -> Result<Self> {
        use std::os::fd::FromRawFd;
        // SAFETY: plain socket calls; the fd is owned from here on.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, protocol) };
        if fd < 0 {
            bail!("raw socket: {}", std::io::Error::last_os_error());
        }
        let sock = Self(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) });
        let timeout = libc::timeval { tv_sec: 0, tv_usec: 200_000 };
        // SAFETY: a valid option of the right size.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &timeout as *const _ as *const libc::c_void,
                size_of::<libc::timeval>() as u32,
            )
        };
        Ok(sock)
    }

    fn recv(&self, buf: &mut [u8]) -> Option<usize> {
        use std::os::fd::AsRawFd;
        // SAFETY: the buffer is ours and as long as said.
        let n =
            unsafe { libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0) };
        (n > 0).then_some(n as usize)
    }

    fn send_to(&self, segment: &[u8], to: std::net::Ipv4Addr) -> Result<()> {
        use std::os::fd::AsRawFd;
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: 0,
            sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(to.octets()) },
            sin_zero: [0; 8],
        };
        // SAFETY: the segment and the address are ours, sizes as given.
        let n = unsafe {
            libc::sendto(
                self.0.as_raw_fd(),
                segment.as_ptr() as *const libc::c_void,
                segment.len(),
                0,
                &addr as *const _ as *const libc::sockaddr,
                size_of::<libc::sockaddr_in>() as u32,
            )
        };
        if n < 0 {
            bail!("raw send: {}", std::io::Error::last_os_error());
        }
        Ok(())
    }
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
