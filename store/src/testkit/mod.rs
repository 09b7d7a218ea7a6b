//! Test support (feature `testkit`): real servers on loopback ports chosen
//! at run time, cleaned up on drop.
//!
//! - [`S3Server`]: s3s-fs (installed by scripts/test.sh) with a temporary
//!   root and one bucket; objects are seeded through object_store puts and
//!   multipart uploads ([`upload_dir`]), never by copying files into the
//!   root (s3s-fs would then hash whole objects on every ranged GET);
//! - [`FaultProxy`]: an HTTP/1.1 proxy that answers a fixed share of
//!   requests with 503 or a connection reset, or denies chosen ones;
//! - [`FakeGcs`]: fake-gcs-server (fetched by scripts/test.sh) for reads.
//!
//! A missing tool is a test failure with instructions, never a skip.

mod gcs;
mod proxy;
mod s3;

pub use gcs::FakeGcs;
pub use proxy::{FaultProxy, ProxyConfig, ProxyStats};
pub use s3::{S3Server, upload_dir};

use std::path::PathBuf;

/// A free loopback port (the listener is closed again; a server started
/// right after binds it).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding a loopback port")
}

/// Where scripts/test.sh installs test tools.
pub fn tools_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("SMELT_TOOLS") {
        return PathBuf::from(d);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| ".".into());
    PathBuf::from(home).join(".cache/smelt-tools")
}

/// Finds a tool: `$ENV_VAR`, then the tools dir, then PATH; panics with
/// instructions when it is nowhere.
pub fn find_tool(env_var: &str, rel: &str, how: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env_var) {
        return PathBuf::from(p);
    }
    let t = tools_dir().join(rel);
    if t.is_file() {
        return t;
    }
    let name = std::path::Path::new(rel).file_name().expect("tool name");
    if let Some(paths) = std::env::var_os("PATH") {
        for d in std::env::split_paths(&paths) {
            let c = d.join(name);
            if c.is_file() {
                return c;
            }
        }
    }
    panic!(
        "test tool {} not found (looked at ${env_var}, {}, PATH): run scripts/test.sh, which installs it ({how})",
        name.to_string_lossy(),
        t.display()
    );
}

/// Waits until a TCP port accepts connections.
pub fn wait_for_port(port: u16, timeout: std::time::Duration) -> bool {
    let start = std::time::Instant::now();
    while start.elapsed() < timeout {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    false
}

/// Every object directly under `prefix/` with its bytes.
pub fn read_folder(
    store: &std::sync::Arc<dyn object_store::ObjectStore>,
    prefix: &str,
) -> std::collections::BTreeMap<String, Vec<u8>> {
    use object_store::ObjectStoreExt;
    let store = store.clone();
    let prefix = object_store::path::Path::from(prefix);
    crate::rt::block_on(async move {
        let listed = store
            .list_with_delimiter(Some(&prefix))
            .await
            .expect("listing");
        let mut out = std::collections::BTreeMap::new();
        for m in listed.objects {
            let b = store
                .get(&m.location)
                .await
                .expect("get")
                .bytes()
                .await
                .expect("body");
            out.insert(
                m.location.filename().expect("file name").to_string(),
                b.to_vec(),
            );
        }
        out
    })
}
