//! smelt-store: smelt's inputs and outputs on object stores.
//!
//! `smelt-core` reads model folders through `io::ModelLocation` /
//! `io::ByteSource` and writes shards through `io::TensorSink`; this crate
//! implements them over [`object_store`] (S3, GCS, HTTP, local files), so a
//! model reference or an output may be a URL:
//!
//! - [`url::parse_url`]: `s3://bucket/prefix`, `gs://bucket/prefix`,
//!   `file:///dir`, `http(s)://host/dir`, plain paths → store + prefix,
//!   credentials and endpoints from the standard environment variables;
//! - [`source::ObjectSource`]: ranged, concurrent, retried reads;
//! - [`location::ObjectLocation`]: a model folder under a prefix;
//! - [`location::ObjectOutput`] / [`sink::ObjectShardSink`]: streaming
//!   multipart upload of planned shards, byte-identical to local files;
//! - [`install`]: registers all of it with smelt-core, so `model: s3://…`
//!   in a YAML and `smelt merge cfg.yml s3://…/out` just work.
//!
//! The blocking engine talks to the async stores through [`rt::block_on`].

pub mod location;
pub mod rt;
pub mod sink;
pub mod source;
#[cfg(feature = "testkit")]
pub mod testkit;
pub mod url;

use std::sync::{Arc, RwLock};

/// The object_store crate smelt-store is built on (its types appear in this
/// crate's API).
pub use object_store;

pub use location::{ObjectLocation, ObjectOutput, list_folder, put_object};
pub use sink::{ObjectShardSink, SinkOptions};
pub use source::ObjectSource;
pub use url::{StoreUrl, parse_url, parse_url_opts};

use smelt_core::io::{ModelLocation, OutputLocation, UrlResolver};
use smelt_core::{Error, Result};

/// An object_store error about `what` (a URL), as a smelt error.
pub(crate) fn error(what: &str, e: object_store::Error) -> Error {
    match e {
        object_store::Error::NotFound { .. } => Error::io(
            what,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such object"),
        ),
        e => Error::msg(format!("{what}: {e}")),
    }
}

/// Options for URLs that start with a given prefix (e.g. an S3 endpoint
/// for one bucket); longest prefix wins; applied over the environment.
/// Per-URL-prefix options: (prefix, [(key, value)]).
type PrefixOptions = Vec<(String, Vec<(String, String)>)>;
static PREFIX_OPTIONS: RwLock<PrefixOptions> = RwLock::new(Vec::new());

/// Sets object_store options (config keys such as `aws_endpoint`,
/// `aws_access_key_id`, `google_service_account_key`) for every URL that
/// starts with `url_prefix`, e.g. `s3://bucket`. Replaces earlier options
/// for the same prefix.
pub fn set_prefix_options(url_prefix: &str, options: Vec<(String, String)>) {
    let mut v = PREFIX_OPTIONS.write().unwrap_or_else(|e| e.into_inner());
    v.retain(|(p, _)| p != url_prefix);
    v.push((url_prefix.to_string(), options));
}

/// Parses a URL with the environment plus any [`set_prefix_options`].
pub fn resolve(url: &str) -> Result<StoreUrl> {
    let opts = PREFIX_OPTIONS
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .filter(|(p, _)| url.starts_with(p.as_str()))
        .max_by_key(|(p, _)| p.len())
        .map(|(_, o)| o.clone())
        .unwrap_or_default();
    parse_url_opts(url, &opts)
}

/// The resolver smelt-core calls for URL model paths and outputs.
#[derive(Debug, Default)]
pub struct StoreResolver;

impl UrlResolver for StoreResolver {
    fn model_location(&self, url: &str) -> Result<Arc<dyn ModelLocation>> {
        Ok(Arc::new(ObjectLocation::new(resolve(url)?)))
    }
    fn output_location(&self, url: &str) -> Result<Arc<dyn OutputLocation>> {
        Ok(Arc::new(ObjectOutput::new(
            resolve(url)?,
            SinkOptions::from_env()?,
        )))
    }
}

/// Registers object-store URLs with smelt-core (idempotent). Call once at
/// start-up in every program that plans or runs merges.
pub fn install() {
    smelt_core::io::set_url_resolver(Arc::new(StoreResolver));
}
