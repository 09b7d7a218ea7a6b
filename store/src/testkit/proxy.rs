//! A fault-injecting HTTP/1.1 proxy for object-store tests.
//!
//! Each client connection carries one request: the proxy reads it whole
//! (head and body, Content-Length or chunked), then either injects a fault
//! or forwards it upstream with `Connection: close` and relays the answer
//! until the upstream closes. Faults happen before forwarding, so the
//! server never sees a failed request: every `every`-th request (a fixed
//! 1/every share, 5 % by default) is answered `503 SlowDown` or has its
//! connection reset (alternately). `deny` answers chosen requests with a
//! non-retryable `403 AccessDenied`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Decides which requests the proxy denies: (method, target) → deny?
pub type DenyFn = Arc<dyn Fn(&str, &str) -> bool + Send + Sync>;

/// What the proxy does.
#[derive(Clone)]
pub struct ProxyConfig {
    /// Fail one request in `every` (0: never).
    pub every: u64,
    /// Requests answered 403 (checked before `every`).
    pub deny: Option<DenyFn>,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            every: 20,
            deny: None,
        }
    }
}

/// What the proxy saw.
#[derive(Debug, Default)]
pub struct ProxyStats {
    pub requests: AtomicU64,
    pub answered_503: AtomicU64,
    pub resets: AtomicU64,
    pub denied: AtomicU64,
    /// "METHOD target" of every request, in arrival order.
    pub log: Mutex<Vec<String>>,
}

impl ProxyStats {
    pub fn faults(&self) -> u64 {
        self.answered_503.load(Ordering::Relaxed) + self.resets.load(Ordering::Relaxed)
    }
    pub fn requests(&self) -> Vec<String> {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// A running proxy; stops on drop.
pub struct FaultProxy {
    pub addr: SocketAddr,
    pub stats: Arc<ProxyStats>,
    rt: Option<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for FaultProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultProxy")
            .field("addr", &self.addr)
            .finish()
    }
}

impl FaultProxy {
    /// Starts a proxy on a free loopback port in front of `upstream`
    /// (host:port).
    pub fn start(upstream: SocketAddr, config: ProxyConfig) -> FaultProxy {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("proxy runtime");
        let listener = rt
            .block_on(TcpListener::bind("127.0.0.1:0"))
            .expect("binding the proxy port");
        let addr = listener.local_addr().expect("proxy address");
        let stats = Arc::new(ProxyStats::default());
        let st = stats.clone();
        rt.spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                let (st, cfg) = (st.clone(), config.clone());
                tokio::spawn(async move {
                    let _ = serve(client, upstream, cfg, st).await;
                });
            }
        });
        FaultProxy {
            addr,
            stats,
            rt: Some(rt),
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

fn find(h: &[u8], pat: &[u8]) -> Option<usize> {
    h.windows(pat.len()).position(|w| w == pat)
}

/// Reads until `buf` holds `n` bytes past `from`.
async fn fill(s: &mut TcpStream, buf: &mut Vec<u8>, upto: usize) -> std::io::Result<()> {
    let mut tmp = [0u8; 64 * 1024];
    while buf.len() < upto {
        let k = s.read(&mut tmp).await?;
        if k == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&tmp[..k]);
    }
    Ok(())
}

/// Reads one line (ending in CRLF) starting at `at`; returns its end.
async fn line_at(s: &mut TcpStream, buf: &mut Vec<u8>, at: usize) -> std::io::Result<usize> {
    loop {
        if let Some(i) = find(&buf[at..], b"\r\n") {
            return Ok(at + i + 2);
        }
        let n = buf.len() + 1;
        fill(s, buf, n).await?;
    }
}

async fn serve(
    mut client: TcpStream,
    upstream: SocketAddr,
    cfg: ProxyConfig,
    st: Arc<ProxyStats>,
) -> std::io::Result<()> {
    // --- the request head
    let mut buf = Vec::new();
    let head_end = loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i + 4;
        }
        let n = buf.len() + 1;
        if fill(&mut client, &mut buf, n).await.is_err() {
            return Ok(()); // closed before a request
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default().to_string();
    let mut parts = request_line.split(' ');
    let method = parts.next().unwrap_or_default().to_string();
    let target = parts.next().unwrap_or_default().to_string();
    let mut content_length = 0usize;
    let mut chunked = false;
    let mut out_head = format!("{request_line}\r\n");
    for l in lines.filter(|l| !l.is_empty()) {
        let (k, v) = l.split_once(':').unwrap_or((l, ""));
        let k = k.trim().to_ascii_lowercase();
        match k.as_str() {
            "content-length" => content_length = v.trim().parse().unwrap_or(0),
            "transfer-encoding" if v.to_ascii_lowercase().contains("chunked") => chunked = true,
            _ => {}
        }
        if k != "connection" {
            out_head.push_str(l);
            out_head.push_str("\r\n");
        }
    }
    out_head.push_str("Connection: close\r\n\r\n");
    // --- the body (kept raw)
    let body_end = if chunked {
        let mut at = head_end;
        loop {
            let end = line_at(&mut client, &mut buf, at).await?;
            let size_s = String::from_utf8_lossy(&buf[at..end - 2]).to_string();
            let size = usize::from_str_radix(size_s.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| std::io::Error::other("bad chunk size"))?;
            if size > 0 {
                at = end + size + 2;
                fill(&mut client, &mut buf, at).await?;
                continue;
            }
            // the last chunk: trailers until an empty line
            let mut t = end;
            loop {
                let e = line_at(&mut client, &mut buf, t).await?;
                if e - t == 2 {
                    break;
                }
                t = e;
            }
            break t + 2;
        }
    } else {
        fill(&mut client, &mut buf, head_end + content_length).await?;
        head_end + content_length
    };
    let n = st.requests.fetch_add(1, Ordering::Relaxed) + 1;
    st.log
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(format!("{method} {target}"));
    if cfg.deny.as_ref().is_some_and(|d| d(&method, &target)) {
        st.denied.fetch_add(1, Ordering::Relaxed);
        let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>AccessDenied</Code><Message>denied by the test proxy</Message></Error>";
        let resp = format!(
            "HTTP/1.1 403 Forbidden\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        client.write_all(resp.as_bytes()).await?;
        return client.shutdown().await;
    }
    if cfg.every > 0 && n % cfg.every == cfg.every / 2 {
        if (n / cfg.every).is_multiple_of(2) {
            st.answered_503.fetch_add(1, Ordering::Relaxed);
            let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>SlowDown</Code><Message>injected by the test proxy</Message></Error>";
            let resp = format!(
                "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            client.write_all(resp.as_bytes()).await?;
            return client.shutdown().await;
        }
        st.resets.fetch_add(1, Ordering::Relaxed);
        // RST instead of FIN
        client.set_zero_linger()?;
        drop(client);
        return Ok(());
    }
    // --- forward
    let mut up = TcpStream::connect(upstream).await?;
    up.write_all(out_head.as_bytes()).await?;
    up.write_all(&buf[head_end..body_end]).await?;
    up.flush().await?;
    let _ = tokio::io::copy(&mut up, &mut client).await;
    client.shutdown().await
}
