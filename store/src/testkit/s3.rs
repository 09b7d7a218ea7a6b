//! An s3s-fs server for tests.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};

use super::{find_tool, free_port, wait_for_port};

const KEY: &str = "smelt-test-key";
const SECRET: &str = "smelt-test-secret";

/// A running s3s-fs with one bucket, killed and deleted on drop.
#[derive(Debug)]
pub struct S3Server {
    child: Child,
    root: tempfile::TempDir,
    pub port: u16,
    pub bucket: String,
}

impl S3Server {
    /// Starts s3s-fs on a free port with a fresh root and bucket.
    pub fn start() -> S3Server {
        let bin = find_tool(
            "SMELT_S3S_FS",
            "bin/s3s-fs",
            "cargo install s3s-fs@0.14.1 --locked --features binary --root ~/.cache/smelt-tools",
        );
        let root = tempfile::tempdir().expect("temp dir for s3s-fs");
        let mut last = String::new();
        for _ in 0..5 {
            let port = free_port();
            let bucket = format!("smelt-{port}");
            std::fs::create_dir(root.path().join(&bucket)).expect("bucket dir");
            let mut child = Command::new(&bin)
                .args(["--host", "127.0.0.1", "--port", &port.to_string()])
                .args(["--access-key", KEY, "--secret-key", SECRET])
                .arg(root.path())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
            if wait_for_port(port, Duration::from_secs(10))
                && let Ok(None) = child.try_wait()
            {
                return S3Server {
                    child,
                    root,
                    port,
                    bucket,
                };
            }
            let _ = child.kill();
            let out = child.wait_with_output().ok();
            last = out
                .map(|o| String::from_utf8_lossy(&o.stderr).to_string())
                .unwrap_or_default();
            let _ = std::fs::remove_dir(root.path().join(&bucket));
        }
        panic!("s3s-fs did not start: {last}");
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `s3://BUCKET/path`.
    pub fn url(&self, path: &str) -> String {
        format!("s3://{}/{}", self.bucket, path.trim_start_matches('/'))
    }

    /// object_store options reaching this server at `endpoint` (itself, or
    /// a proxy in front of it).
    pub fn options_via(&self, endpoint: &str) -> Vec<(String, String)> {
        [
            ("aws_endpoint", endpoint),
            ("aws_allow_http", "true"),
            ("aws_access_key_id", KEY),
            ("aws_secret_access_key", SECRET),
            ("aws_region", "us-east-1"),
            ("aws_virtual_hosted_style_request", "false"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    pub fn options(&self) -> Vec<(String, String)> {
        self.options_via(&self.endpoint())
    }

    /// Environment variables for a `smelt` subprocess reaching this server
    /// at `endpoint`.
    pub fn env_via(&self, endpoint: &str) -> Vec<(String, String)> {
        [
            ("AWS_ENDPOINT_URL", endpoint),
            ("AWS_ALLOW_HTTP", "true"),
            ("AWS_ACCESS_KEY_ID", KEY),
            ("AWS_SECRET_ACCESS_KEY", SECRET),
            ("AWS_REGION", "us-east-1"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    pub fn env(&self) -> Vec<(String, String)> {
        self.env_via(&self.endpoint())
    }

    /// A client for the bucket, reaching the server at `endpoint`.
    pub fn store_via(&self, endpoint: &str) -> Arc<dyn ObjectStore> {
        let mut b = AmazonS3Builder::new().with_bucket_name(&self.bucket);
        for (k, v) in self.options_via(endpoint) {
            b = b.with_config(k.parse().expect("config key"), v);
        }
        Arc::new(b.build().expect("S3 client"))
    }

    pub fn store(&self) -> Arc<dyn ObjectStore> {
        self.store_via(&self.endpoint())
    }

    /// The server's data directory (to inspect, never to seed).
    pub fn root(&self) -> &Path {
        self.root.path()
    }

    /// Files s3s-fs keeps for multipart uploads that were neither completed
    /// nor aborted (`.upload-ID.json` and `.upload_id-ID.part-N` in its
    /// root).
    pub fn open_uploads(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.root.path())
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .filter(|n| n.starts_with(".upload-") || n.starts_with(".upload_id-"))
            .collect();
        v.sort();
        v
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Uploads every file of `dir` (not recursive) to `prefix/` in `store`:
/// small files with one PUT, larger ones as 5 MiB multipart parts.
pub fn upload_dir(store: &Arc<dyn ObjectStore>, dir: &Path, prefix: &str) {
    for e in std::fs::read_dir(dir).expect("reading a model dir") {
        let e = e.expect("dir entry");
        if !e.path().is_file() {
            continue;
        }
        let name = e.file_name().to_string_lossy().to_string();
        let bytes = std::fs::read(e.path()).expect("reading a model file");
        let path = ObjPath::from(format!("{}/{name}", prefix.trim_matches('/')));
        let store = store.clone();
        crate::rt::block_on(async move {
            if bytes.len() <= 8 << 20 {
                store.put(&path, PutPayload::from(bytes)).await?;
            } else {
                let up = store.put_multipart(&path).await?;
                let mut w = WriteMultipart::new_with_chunk_size(up, 5 << 20);
                w.write(&bytes);
                w.finish().await?;
            }
            Ok::<_, object_store::Error>(())
        })
        .unwrap_or_else(|e| panic!("uploading {name}: {e}"));
    }
}
