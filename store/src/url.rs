//! Model and output references as object stores: `s3://bucket/prefix`,
//! `gs://bucket/prefix`, `file:///abs/dir`, `http(s)://host/dir` and plain
//! local paths, each turned into an [`ObjectStore`] and a prefix inside it.
//!
//! Credentials and endpoints come from the environment variables that
//! object_store's `from_env` builders read (AWS_ACCESS_KEY_ID,
//! AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION / AWS_DEFAULT_REGION,
//! AWS_ENDPOINT_URL / AWS_ENDPOINT, AWS_ALLOW_HTTP; GOOGLE_SERVICE_ACCOUNT,
//! GOOGLE_SERVICE_ACCOUNT_KEY, GOOGLE_APPLICATION_CREDENTIALS), then from
//! explicit `(key, value)` options (object_store's config key names, e.g.
//! `aws_endpoint`, `google_service_account_key`), which win.

use std::sync::Arc;
use std::time::Duration;

use object_store::aws::AmazonS3Builder;
use object_store::gcp::GoogleCloudStorageBuilder;
use object_store::http::HttpBuilder;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjPath;
use object_store::{BackoffConfig, ObjectStore, RetryConfig};
use smelt_core::{Error, Result};

/// An object store and the prefix a URL names inside it.
#[derive(Debug, Clone)]
pub struct StoreUrl {
    pub store: Arc<dyn ObjectStore>,
    /// The folder inside the store (may be empty: the bucket's root).
    pub prefix: ObjPath,
    /// The reference as written (for messages).
    pub url: String,
}

impl StoreUrl {
    /// The path of `name` inside the folder.
    pub fn child(&self, name: &str) -> ObjPath {
        if self.prefix.as_ref().is_empty() {
            ObjPath::from(name)
        } else {
            ObjPath::from(format!("{}/{name}", self.prefix.as_ref()))
        }
    }
    /// How `name` inside the folder is written in messages.
    pub fn display_child(&self, name: &str) -> String {
        format!("{}/{name}", self.url.trim_end_matches('/'))
    }
}

/// The retry policy for every store: object_store retries 5xx answers,
/// 429s and connection errors with exponential backoff.
pub fn retry_config() -> RetryConfig {
    RetryConfig {
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(5),
            base: 2.0,
        },
        max_retries: 10,
        retry_timeout: Duration::from_secs(180),
    }
}

fn store_err(url: &str, e: impl std::fmt::Display) -> Error {
    Error::msg(format!("{url}: {e}"))
}

/// Parses a reference with credentials from the environment only.
pub fn parse_url(url: &str) -> Result<StoreUrl> {
    parse_url_opts(url, &[])
}

/// Parses a reference; `options` (object_store config keys) override the
/// environment.
pub fn parse_url_opts(url: &str, options: &[(String, String)]) -> Result<StoreUrl> {
    if !smelt_core::io::is_url(url) {
        return local(url, std::path::Path::new(url));
    }
    let parsed =
        ::url::Url::parse(url).map_err(|e| store_err(url, format!("not a valid URL: {e}")))?;
    let key_err = |k: &str, e: object_store::Error| store_err(url, format!("option {k}: {e}"));
    match parsed.scheme() {
        "file" => {
            let p = parsed
                .to_file_path()
                .map_err(|_| store_err(url, "not a local absolute file:// URL"))?;
            local(url, &p)
        }
        "s3" | "s3a" => {
            let bucket = bucket_of(&parsed, url, "s3")?;
            let mut b = AmazonS3Builder::from_env()
                .with_bucket_name(bucket)
                .with_retry(retry_config());
            for (k, v) in options {
                let key = k.parse().map_err(|e| key_err(k, e))?;
                b = b.with_config(key, v);
            }
            let store = b.build().map_err(|e| store_err(url, e))?;
            in_bucket(url, &parsed, Arc::new(store))
        }
        "gs" => {
            let bucket = bucket_of(&parsed, url, "gs")?;
            let mut b = GoogleCloudStorageBuilder::from_env()
                .with_bucket_name(bucket)
                .with_retry(retry_config());
            for (k, v) in options {
                let key = k.parse().map_err(|e| key_err(k, e))?;
                b = b.with_config(key, v);
            }
            let store = b.build().map_err(|e| store_err(url, e))?;
            in_bucket(url, &parsed, Arc::new(store))
        }
        "http" | "https" => {
            // the store is rooted at the server; the path is the prefix
            let mut root = parsed.clone();
            root.set_path("/");
            root.set_query(None);
            root.set_fragment(None);
            let mut b = HttpBuilder::new()
                .with_url(root.as_str())
                .with_retry(retry_config());
            for (k, v) in options {
                let key = k.parse().map_err(|e| key_err(k, e))?;
                b = b.with_config(key, v);
            }
            let store = b.build().map_err(|e| store_err(url, e))?;
            in_bucket(url, &parsed, Arc::new(store))
        }
        other => Err(store_err(
            url,
            format!(
                "unsupported URL scheme {other:?} (expected s3://, gs://, file://, http:// or https://)"
            ),
        )),
    }
}

fn local(url: &str, p: &std::path::Path) -> Result<StoreUrl> {
    let abs = std::path::absolute(p).map_err(|e| Error::io(p, e))?;
    // the store is rooted at / so that the prefix is the whole path
    let store = LocalFileSystem::new();
    let prefix = ObjPath::from_absolute_path(&abs)
        .map_err(|e| store_err(url, format!("bad local path: {e}")))?;
    Ok(StoreUrl {
        store: Arc::new(store),
        prefix,
        url: url.to_string(),
    })
}

/// The bucket of an `s3://`/`gs://` URL.
fn bucket_of<'a>(parsed: &'a url::Url, url: &str, scheme: &str) -> Result<&'a str> {
    parsed.host_str().filter(|b| !b.is_empty()).ok_or_else(|| {
        store_err(
            url,
            format!("no bucket name (expected {scheme}://BUCKET/PREFIX)"),
        )
    })
}

/// A store and the URL's path (percent-decoded, without leading/trailing
/// slashes) as the prefix within it.
fn in_bucket(url: &str, parsed: &url::Url, store: Arc<dyn ObjectStore>) -> Result<StoreUrl> {
    let prefix = ObjPath::from_url_path(parsed.path())
        .map_err(|e| store_err(url, format!("bad object path: {e}")))?;
    Ok(StoreUrl {
        store,
        prefix,
        url: url.to_string(),
    })
}
