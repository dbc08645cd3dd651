//! Socket-level load balancing, the agent's side: where the cgroup hooks
//! attach, whose sockets they serve, and the connected UDP sockets they
//! leave behind when a backend goes away.
//!
//! A connected UDP socket never calls connect() again: after its backend
//! left, it would send into the void for good (kube-proxy flushes the
//! conntrack entries of such flows for the same reason). The agent destroys
//! those sockets through sock_diag (`SOCK_DESTROY`, kernels with
//! `CONFIG_INET_DIAG_DESTROY`), so the application sees an error and
//! connects again, to a live backend.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    fs,
    net::{IpAddr, Ipv4Addr},
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkDeserializable, NetlinkHeader, NetlinkMessage,
    NetlinkPayload, NetlinkSerializable,
};
use netlink_packet_sock_diag::{
    SockDiagDestroy, SockDiagMessage,
    constants::{AF_INET, IPPROTO_UDP},
    inet::{ExtensionFlags, InetRequest, SocketId, StateFlags},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_SOCK_DIAG};
use tracing::{debug, warn};

/// Which sockets the hooks serve (`--socket-lb`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// None: host clients reach only what the packet hooks translate.
    Off,
    /// Sockets of the node's own network namespace.
    Host,
    /// Those and pods' (TCP and connected UDP at connect(), no per-packet
    /// NAT for them).
    All,
}

const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// Where cgroup v2 is mounted, from the text of `/proc/self/mountinfo`:
/// `/sys/fs/cgroup` on unified hosts, `/sys/fs/cgroup/unified` on hybrid
/// ones.
pub fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // "<id> <parent> <dev> <root> <mount point> <options> [optional...] - <fstype> <source> <super options>"
        let (before, after) = line.split_once(" - ")?;
        let fstype = after.split_whitespace().next()?;
        let fields: Vec<&str> = before.split_whitespace().collect();
        let mount_point = fields.get(4)?;
        (fstype == "cgroup2" && fields.get(3) == Some(&"/")).then(|| PathBuf::from(unescape(mount_point)))
    })
}

/// mountinfo escapes spaces, tabs, newlines and backslashes as octal.
fn unescape(field: &str) -> String {
    field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")
}

fn is_cgroup2(dir: &Path) -> bool {
    nix::sys::statfs::statfs(dir).is_ok_and(|st| st.filesystem_type().0 == CGROUP2_SUPER_MAGIC)
}

/// The cgroup v2 directory the hooks attach to: `given` (or its `unified`
/// child, on a hybrid host whose /sys/fs/cgroup a DaemonSet mounted
/// whole), else this host's cgroup v2 root.
pub fn cgroup_root(given: Option<&Path>, procfs: &Path) -> Result<PathBuf> {
    let dir = match given {
        Some(dir) => dir.to_path_buf(),
        None => {
            let mountinfo = procfs.join("self/mountinfo");
            let text =
                fs::read_to_string(&mountinfo).with_context(|| format!("reading {}", mountinfo.display()))?;
            cgroup2_mount(&text).context(
                "no cgroup v2 mount on this host: the socket hooks need one (mount -t cgroup2 none <dir>, then \
                 --cgroup-root <dir>), or run with --socket-lb off",
            )?
        }
    };
    if is_cgroup2(&dir) {
        return Ok(dir);
    }
    let unified = dir.join("unified");
    if is_cgroup2(&unified) {
        return Ok(unified);
    }
    bail!("{} is not a cgroup v2 directory (--cgroup-root)", dir.display())
}

/// The cgroup's id (the inode of its directory), which names its links.
pub fn cgroup_id(dir: &Path) -> Result<u64> {
    Ok(fs::metadata(dir).with_context(|| format!("reading {}", dir.display()))?.ino())
}

/// The cookie of this process's network namespace: the hooks serve its
/// sockets as the node's.
pub fn netns_cookie() -> Result<u64> {
    let socket =
        std::net::UdpSocket::bind("127.0.0.1:0").context("a socket to read the netns cookie from")?;
    let mut cookie = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: a valid socket; the kernel writes at most `len` bytes into `cookie`.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        bail!(
            "SO_NETNS_COOKIE: {} (the socket hooks need Linux 5.14 or later)",
            std::io::Error::last_os_error()
        );
    }
    Ok(cookie)
}

/// A connected UDP socket, as sock_diag reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UdpSocket {
    pub cookie: u64,
    pub local: (Ipv4Addr, u16),
    pub peer: (Ipv4Addr, u16),
    id: SocketId,
}

/// A sock_diag connection in the network namespace of the calling thread.
pub struct SockDiag(Socket);

impl SockDiag {
    pub fn open() -> Result<Self> {
        let mut socket = Socket::new(NETLINK_SOCK_DIAG).context("sock_diag socket")?;
        socket.bind_auto().context("binding the sock_diag socket")?;
        socket.connect(&SocketAddr::new(0, 0)).context("connecting the sock_diag socket")?;
        Ok(Self(socket))
    }

    /// Every connected IPv4 UDP socket of the namespace.
    pub fn connected_udp(&self) -> Result<Vec<UdpSocket>> {
        let request = SockDiagMessage::InetRequest(InetRequest {
            family: AF_INET,
            protocol: IPPROTO_UDP,
            extensions: ExtensionFlags::empty(),
            // A connected UDP socket is in TCP_ESTABLISHED.
            states: StateFlags::ESTABLISHED,
            socket_id: SocketId::new_v4(),
        });
        let mut out = Vec::new();
        self.exchange(request, NLM_F_REQUEST | NLM_F_DUMP, |message: SockDiagMessage| {
            if let SockDiagMessage::InetResponse(r) = message {
                let id = &r.header.socket_id;
                if let (IpAddr::V4(src), IpAddr::V4(dst)) = (id.source_address, id.destination_address) {
                    out.push(UdpSocket {
                        cookie: u64::from_ne_bytes(id.cookie),
                        local: (src, id.source_port),
                        peer: (dst, id.destination_port),
                        id: id.clone(),
                    });
                }
            }
        })?;
        Ok(out)
    }

    /// Destroys `socket`: its owner's next call fails (ECONNABORTED).
    pub fn destroy(&self, socket: &UdpSocket) -> Result<()> {
        let request = SockDiagDestroy::new(SockDiagMessage::InetRequest(InetRequest {
            family: AF_INET,
            protocol: IPPROTO_UDP,
            extensions: ExtensionFlags::empty(),
            states: StateFlags::all(),
            socket_id: socket.id.clone(),
        }));
        self.exchange(request, NLM_F_REQUEST | NLM_F_ACK, |_: SockDiagDestroy| {})
    }

    /// Sends `request` and reads the answers up to the end of the dump or
    /// the acknowledgement; a netlink error is returned as one.
    fn exchange<Req, Resp>(&self, request: Req, flags: u16, mut each: impl FnMut(Resp)) -> Result<()>
    where
        Req: NetlinkSerializable + std::fmt::Debug,
        Resp: NetlinkDeserializable + std::fmt::Debug,
        NetlinkPayload<Req>: From<Req>,
    {
        let mut header = NetlinkHeader::default();
        header.flags = flags;
        let mut message = NetlinkMessage::new(header, NetlinkPayload::from(request));
        message.finalize();
        let mut buf = vec![0; message.buffer_len()];
        message.serialize(&mut buf);
        self.0.send(&buf, 0).context("sending to sock_diag")?;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let size = self.0.recv(&mut &mut buf[..], 0).context("reading sock_diag")?;
            let mut offset = 0;
            while offset < size {
                let reply = NetlinkMessage::<Resp>::deserialize(&buf[offset..size])
                    .map_err(|e| anyhow::anyhow!("bad sock_diag message: {e}"))?;
                let len = reply.header.length as usize;
                match reply.payload {
                    NetlinkPayload::InnerMessage(m) => each(m),
                    NetlinkPayload::Done(_) => return Ok(()),
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            None => Ok(()),
                            Some(code) => Err(std::io::Error::from_raw_os_error(-code.get()))
                                .context("sock_diag refused the request"),
                        };
                    }
                    _ => {}
                }
                if len == 0 {
                    break;
                }
                offset += len;
            }
            if flags & NLM_F_DUMP == 0 {
                return Ok(());
            }
        }
    }
}

/// Destroys the connected UDP sockets of this thread's network namespace
/// whose peer `stale` names (cookie, peer address, peer port); how many.
pub fn terminate_stale(diag: &SockDiag, stale: &mut impl FnMut(u64, [u8; 4], u16) -> bool) -> Result<usize> {
    let mut n = 0;
    for socket in diag.connected_udp()? {
        if stale(socket.cookie, socket.peer.0.octets(), socket.peer.1) {
            match diag.destroy(&socket) {
                Ok(()) => {
                    debug!(local = ?socket.local, peer = ?socket.peer, "destroyed a UDP socket connected to a gone backend");
                    n += 1;
                }
                // It may have closed meanwhile.
                Err(e) => {
                    warn!(peer = ?socket.peer, error = format!("{e:#}"), "cannot destroy a stale UDP socket")
                }
            }
        }
    }
    Ok(n)
}

/// Runs `f` once in every network namespace other than this process's,
/// found through the processes under `procfs` (pods' namespaces, with
/// `--socket-lb all`): each on a thread that entered it.
pub fn in_other_namespaces(procfs: &Path, mut f: impl FnMut() -> Result<usize> + Send) -> Result<usize> {
    let own = fs::metadata(procfs.join("self/ns/net")).context("this process's network namespace")?;
    let mut seen: HashSet<(u64, u64)> = [(own.dev(), own.ino())].into();
    let mut paths = BTreeSet::new();
    for entry in fs::read_dir(procfs).with_context(|| format!("listing {}", procfs.display()))?.flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let path = entry.path().join("ns/net");
        // Processes come and go, kernel threads have none: skip what cannot be read.
        if let Ok(meta) = fs::metadata(&path)
            && seen.insert((meta.dev(), meta.ino()))
        {
            paths.insert(path);
        }
    }
    let mut total = 0;
    for path in paths {
        let Ok(file) = fs::File::open(&path) else { continue };
        let f = &mut f;
        let result = std::thread::scope(|s| {
            s.spawn(move || -> Result<usize> {
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                    .with_context(|| format!("entering {}", path.display()))?;
                f()
            })
            .join()
        });
        match result {
            Ok(Ok(n)) => total += n,
            Ok(Err(e)) => debug!(error = format!("{e:#}"), "a network namespace was not searched"),
            Err(_) => warn!("searching a network namespace panicked"),
        }
    }
    Ok(total)
}

/// The backends each frontend may send to now, as (address, port): what a
/// socket the hooks connected must still point at.
pub type LiveBackends = HashMap<u32, HashSet<([u8; 4], u16)>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cgroup2_mount_is_found_on_unified_and_hybrid_hosts() {
        let unified = "29 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(cgroup2_mount(unified), Some(PathBuf::from("/sys/fs/cgroup")));
        let hybrid = "\
25 23 0:22 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
26 25 0:23 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
27 25 0:24 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid shared:11 - cgroup cgroup rw,cpu,cpuacct
";
        assert_eq!(cgroup2_mount(hybrid), Some(PathBuf::from("/sys/fs/cgroup/unified")));
        // A container's view of a sub-tree is not the host's root.
        let nested = "40 30 0:26 /kubepods/pod1 /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        assert_eq!(cgroup2_mount(nested), None);
        let spaced = "29 23 0:26 / /mnt/my\\040cgroup rw shared:4 - cgroup2 none rw\n";
        assert_eq!(cgroup2_mount(spaced), Some(PathBuf::from("/mnt/my cgroup")));
        assert_eq!(cgroup2_mount("29 23 0:26 / /sys/fs/cgroup rw - cgroup cgroup rw,memory\n"), None);
        assert_eq!(cgroup2_mount("garbage\n\n"), None);
    }
}
