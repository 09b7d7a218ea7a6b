//! etcd plumbing shared by coordinators and workers: a lease kept alive
//! across etcd restarts, fenced writes, prefix reads.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, GetOptions, PutOptions, Txn, TxnOp};
use smelt_core::{Error, Result};

fn err(what: &str, e: etcd_client::Error) -> Error {
    Error::msg(format!("etcd {what}: {e}"))
}

/// Connects to etcd (`endpoints` comma-separated, with or without http://).
pub async fn connect(endpoints: &str) -> Result<Client> {
    let eps: Vec<String> = endpoints
        .split(',')
        .map(|e| e.trim().to_string())
        .filter(|e| !e.is_empty())
        .collect();
    if eps.is_empty() {
        return Err(Error::msg("no etcd endpoint given"));
    }
    let opts = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(3))
        .with_timeout(Duration::from_secs(5))
        .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2));
    // retry a while: etcd may be starting
    let mut last = None;
    for _ in 0..50 {
        match Client::connect(eps.clone(), Some(opts.clone())).await {
            Ok(c) => return Ok(c),
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(Error::msg(format!(
        "cannot reach etcd at {endpoints}: {}",
        last.map(|e| e.to_string()).unwrap_or_default()
    )))
}

/// Every key/value under `prefix`.
pub async fn get_prefix(c: &Client, prefix: &str) -> Result<Vec<(String, Vec<u8>)>> {
    let mut c = c.clone();
    let r = c
        .get(prefix, Some(GetOptions::new().with_prefix()))
        .await
        .map_err(|e| err("get", e))?;
    Ok(r.kvs()
        .iter()
        .map(|kv| {
            (
                String::from_utf8_lossy(kv.key()).to_string(),
                kv.value().to_vec(),
            )
        })
        .collect())
}

/// Writes `kvs` in transactions guarded by `fence` (a key that must exist:
/// the leader's election key). Returns false if the fence is gone (this
/// process is no longer the leader); nothing is written then.
pub async fn fenced_put(c: &Client, fence: &[u8], kvs: &[(String, Vec<u8>)]) -> Result<bool> {
    let mut c = c.clone();
    for chunk in kvs.chunks(100) {
        let ops: Vec<TxnOp> = chunk
            .iter()
            .map(|(k, v)| TxnOp::put(k.as_str(), v.clone(), None))
            .collect();
        let txn = Txn::new()
            .when(vec![Compare::create_revision(
                fence.to_vec(),
                CompareOp::Greater,
                0,
            )])
            .and_then(ops);
        let r = c.txn(txn).await.map_err(|e| err("txn", e))?;
        if !r.succeeded() {
            return Ok(false);
        }
    }
    Ok(true)
}

/// A lease kept alive in the background. `lost()` turns true once etcd
/// says the lease is gone (expired or revoked); connection errors (etcd
/// restarting) are retried, since etcd refreshes leases when it restarts.
pub struct Lease {
    pub id: i64,
    lost: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Lease {
    pub async fn grant(c: &Client, ttl: i64) -> Result<Lease> {
        let mut c = c.clone();
        let id = c
            .lease_grant(ttl, None)
            .await
            .map_err(|e| err("lease grant", e))?
            .id();
        let lost = Arc::new(AtomicBool::new(false));
        let flag = lost.clone();
        let period = Duration::from_millis((ttl as u64 * 1000 / 3).max(100));
        let task = tokio::spawn(async move {
            loop {
                let (mut keeper, mut stream) = match c.lease_keep_alive(id).await {
                    Ok(p) => p,
                    Err(e) => {
                        if is_lease_gone(&e) {
                            flag.store(true, Ordering::SeqCst);
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                };
                loop {
                    if keeper.keep_alive().await.is_err() {
                        break;
                    }
                    match tokio::time::timeout(period * 2, stream.message()).await {
                        Ok(Ok(Some(r))) if r.ttl() > 0 => {}
                        Ok(Ok(Some(_))) => {
                            flag.store(true, Ordering::SeqCst);
                            return;
                        }
                        Ok(Err(e)) if is_lease_gone(&e) => {
                            flag.store(true, Ordering::SeqCst);
                            return;
                        }
                        _ => break,
                    }
                    tokio::time::sleep(period).await;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        Ok(Lease { id, lost, task })
    }

    pub fn lost(&self) -> bool {
        self.lost.load(Ordering::SeqCst)
    }

    /// Waits until the lease is lost.
    pub async fn wait_lost(&self) {
        while !self.lost() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn is_lease_gone(e: &etcd_client::Error) -> bool {
    let s = e.to_string();
    s.contains("lease not found") || s.contains("requested lease not found")
}

/// Puts `key` attached to `lease`.
pub async fn put_with_lease(c: &Client, key: &str, value: &str, lease: i64) -> Result<()> {
    let mut c = c.clone();
    c.put(key, value, Some(PutOptions::new().with_lease(lease)))
        .await
        .map_err(|e| err("put", e))?;
    Ok(())
}

/// The current leader's value (its gRPC URL), if any.
pub async fn leader(c: &Client, election: &str) -> Result<Option<String>> {
    let mut c = c.clone();
    match c.leader(election).await {
        Ok(r) => Ok(r
            .kv()
            .map(|kv| String::from_utf8_lossy(kv.value()).to_string())),
        Err(e) if e.to_string().contains("no leader") => Ok(None),
        Err(e) => Err(err("leader", e)),
    }
}

/// Campaigns until elected; returns the leader key (the write fence).
pub async fn campaign(c: &Client, election: &str, value: &str, lease: i64) -> Result<Vec<u8>> {
    let mut c = c.clone();
    let r = c
        .campaign(election, value, lease)
        .await
        .map_err(|e| err("campaign", e))?;
    r.leader()
        .map(|k| k.key().to_vec())
        .ok_or_else(|| Error::msg("etcd campaign returned no leader key"))
}
