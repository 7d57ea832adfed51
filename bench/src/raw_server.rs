//! `raw-server`: the raw baseline the fan-out measures Cinder against, a tokio-tungstenite
//! server with no protocol, no auth and no plugin that sends every text frame it gets to
//! every other connection; and starting it as a child process of the bench.

use std::net::SocketAddr;
use std::process::Stdio;

use futures_util::{SinkExt as _, StreamExt as _};
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::{Child, Command};
use tokio_tungstenite::tungstenite::Message;

/// The server's side of one connection.
type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// A frame on the baseline's channel: the sending connection and the text.
type RawFrame = (u64, tokio_tungstenite::tungstenite::Utf8Bytes);

/// Writes `first` and what else the baseline's channel has ready (up to 64 frames, the
/// connection's own skipped) in one flush, as Cinder's socket task does. False once the
/// connection or the channel is gone.
async fn raw_write(
    ws: &mut Ws,
    rx: &mut tokio::sync::broadcast::Receiver<RawFrame>,
    id: u64,
    first: Option<RawFrame>,
) -> bool {
    use tokio::sync::broadcast::error::TryRecvError;
    let mut next = first;
    let mut batch = 0;
    loop {
        if let Some((from, text)) = next.take()
            && from != id
        {
            if ws.feed(Message::Text(text)).await.is_err() {
                return false;
            }
            batch += 1;
        }
        if batch == 64 {
            break;
        }
        next = match rx.try_recv() {
            Ok(frame) => Some(frame),
            Err(TryRecvError::Lagged(_)) => None,
            Err(TryRecvError::Empty) => break,
            Err(TryRecvError::Closed) => return false,
        };
    }
    ws.flush().await.is_ok()
}

/// The raw baseline: every text frame a connection sends goes to every other connection.
/// No protocol, no auth, no plugin: what tokio-tungstenite alone costs.
pub async fn run() -> anyhow::Result<()> {
    use tokio::sync::broadcast;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    println!("raw listening on {}", listener.local_addr()?);
    let (tx, _) = broadcast::channel::<RawFrame>(4096);
    let mut next_id = 0u64;
    loop {
        let (stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        next_id += 1;
        let id = next_id;
        let tx = tx.clone();
        let mut rx = tx.subscribe();
        tokio::spawn(async move {
            let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
                .read_buffer_size(1024)
                .write_buffer_size(16 << 10);
            let Ok(mut ws) =
                tokio_tungstenite::accept_async_with_config(stream, Some(config)).await
            else {
                return;
            };
            loop {
                tokio::select! {
                    msg = ws.next() => match msg {
                        Some(Ok(Message::Text(text))) => { let _ = tx.send((id, text)); }
                        Some(Ok(_)) => {}
                        _ => break,
                    },
                    got = rx.recv() => {
                        let first = match got {
                            Ok(frame) => Some(frame),
                            Err(broadcast::error::RecvError::Lagged(_)) => None,
                            Err(broadcast::error::RecvError::Closed) => break,
                        };
                        if !raw_write(&mut ws, &mut rx, id, first).await {
                            break;
                        }
                    }
                }
            }
        });
    }
}

/// Starts `cinder-bench raw-server` and returns it with its address.
pub async fn start() -> anyhow::Result<(Child, SocketAddr)> {
    let mut child = Command::new(std::env::current_exe()?)
        .arg("raw-server")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
    let line = BufReader::new(stdout)
        .lines()
        .next_line()
        .await?
        .ok_or_else(|| anyhow::anyhow!("raw server exited"))?;
    let addr = line
        .strip_prefix("raw listening on ")
        .ok_or_else(|| anyhow::anyhow!("unexpected line {line}"))?
        .parse()?;
    Ok((child, addr))
}
