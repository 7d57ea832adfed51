//! How the load generator's sockets reach a server: each WebSocket (a
//! [`cinder_tests::Client`]) from the next of many 127.x.y.z source addresses, so the count
//! is not capped by the ephemeral ports of one address, with small buffers; opening many at
//! once; and the open-file limit raised as far as it goes.

use std::net::SocketAddr;

use cinder_tests::Client;

/// Connections per source address: well inside the ephemeral port range of one address.
const PER_SOURCE: usize = 5_000;

/// Connections opened by this process so far: each gets the next source slot.
static OPENED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// The source address of the next connection: 127.R.x.y, with R random per process so ports
/// still in TIME_WAIT from an earlier run are never in the way, and a new x.y every
/// `PER_SOURCE` connections.
fn next_source() -> std::net::Ipv4Addr {
    static RUN: std::sync::OnceLock<u8> = std::sync::OnceLock::new();
    let run = *RUN.get_or_init(|| 1 + (std::process::id() % 250) as u8);
    let slot = OPENED.fetch_add(1, std::sync::atomic::Ordering::Relaxed) / PER_SOURCE;
    std::net::Ipv4Addr::new(127, run, (slot / 250) as u8, 1 + (slot % 250) as u8)
}

/// Raises the open-file limit to `want` (or as far as it goes); returns the new limit.
pub fn raise_fd_limit(want: u64) -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    #[allow(unsafe_code)]
    // SAFETY: getrlimit and setrlimit only read and write the struct passed by pointer,
    // which lives on this stack frame for the duration of each call.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 0;
        }
        let raised = libc::rlimit {
            rlim_cur: want,
            rlim_max: want.max(limit.rlim_max),
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
            return want;
        }
        let soft = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &soft) == 0 {
            return limit.rlim_max;
        }
    }
    limit.rlim_cur
}

/// Lets the kernel pick the source port at `connect` (by the whole 4-tuple) rather than at
/// `bind`, so ports still in TIME_WAIT from an earlier phase do not run the range dry.
fn bind_address_no_port(socket: &tokio::net::TcpSocket) -> std::io::Result<()> {
    use std::os::fd::AsRawFd as _;
    let on: libc::c_int = 1;
    #[allow(unsafe_code)]
    // SAFETY: the fd is the socket's own and open for the duration of the call; the option
    // value points to a live c_int whose size is passed along.
    let status = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if status == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// A WebSocket to `url` on `addr`, with small buffers (tungstenite's defaults are 128 KiB
/// per connection); from the next 127.x.y.z source address when `addr` is an IPv4
/// loopback address (any other is reached from the address the kernel picks).
pub async fn connect(addr: SocketAddr, url: &str) -> anyhow::Result<Client> {
    let stream = match addr {
        SocketAddr::V4(v4) if v4.ip().is_loopback() => {
            let source = next_source();
            let socket = tokio::net::TcpSocket::new_v4()?;
            bind_address_no_port(&socket)?;
            socket.bind(SocketAddr::new(source.into(), 0))?;
            socket.connect(addr).await?
        }
        _ => tokio::net::TcpStream::connect(addr).await?,
    };
    stream.set_nodelay(true)?;
    let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0);
    Client::handshake(stream, url, Some(config)).await
}

/// Opens `n` sockets with `open_one`, 200 at a time.
pub async fn open_many<F, Fut>(n: usize, open_one: F) -> anyhow::Result<Vec<Client>>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Client>>,
{
    let mut all = Vec::with_capacity(n);
    for start in (0..n).step_by(200) {
        let batch =
            futures_util::future::try_join_all((start..n.min(start + 200)).map(&open_one)).await?;
        all.extend(batch);
    }
    Ok(all)
}
