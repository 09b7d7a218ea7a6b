//! The bridge from smelt's blocking, rayon-threaded engine to async object
//! stores: one process-wide tokio runtime with its own threads. Futures are
//! spawned onto it and the calling thread waits on a channel, so this works
//! from rayon threads, plain threads and even from inside another tokio
//! runtime (a worker's gRPC server) without "cannot block inside a runtime"
//! panics.

use std::future::Future;
use std::sync::OnceLock;

use tokio::runtime::{Handle, Runtime};

static RUNTIME: OnceLock<Runtime> = OnceLock::new();

/// The I/O runtime (created on first use: 2 worker threads, enough to keep
/// many HTTP requests in flight).
pub fn handle() -> &'static Handle {
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("smelt-io")
                .enable_all()
                .build()
                .expect("the smelt-io tokio runtime starts")
        })
        .handle()
}

/// Runs `fut` on the I/O runtime and blocks the calling thread until it is
/// done.
pub fn block_on<F>(fut: F) -> F::Output
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    handle().spawn(async move {
        let _ = tx.send(fut.await);
    });
    rx.recv()
        .expect("an I/O task on the smelt-io runtime panicked")
}
