//! Model folders and output targets on object stores.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use object_store::{ObjectStoreExt, PutPayload};
use smelt_core::io::writer::SlotSpec;
use smelt_core::io::{ByteSource, ModelLocation, OutputLocation, ShardSink};
use smelt_core::{Error, Result};

use crate::rt::block_on;
use crate::sink::{ObjectShardSink, SinkOptions};
use crate::source::ObjectSource;
use crate::url::StoreUrl;

/// Lists the objects directly under a prefix: name → size.
pub fn list_folder(at: &StoreUrl) -> Result<BTreeMap<String, u64>> {
    let (store, prefix) = (at.store.clone(), at.prefix.clone());
    let listed = match block_on(async move {
        let p = (!prefix.as_ref().is_empty()).then_some(&prefix);
        store.list_with_delimiter(p).await
    }) {
        Ok(l) => l,
        // a local folder that does not exist yet lists as empty
        Err(object_store::Error::NotFound { .. }) => return Ok(BTreeMap::new()),
        Err(e) => return Err(crate::error(&at.url, e)),
    };
    Ok(listed
        .objects
        .into_iter()
        .filter_map(|m| {
            let name = m.location.filename()?.to_string();
            Some((name, m.size))
        })
        .collect())
}

/// A model folder under an object-store prefix. The folder is listed once
/// (one request) and the listing answers existence and sizes; stores that
/// cannot list (plain HTTP servers) are asked per file with HEAD requests.
#[derive(Debug)]
pub struct ObjectLocation {
    at: StoreUrl,
    listing: OnceLock<Option<BTreeMap<String, u64>>>,
}

impl ObjectLocation {
    pub fn new(at: StoreUrl) -> ObjectLocation {
        ObjectLocation {
            at,
            listing: OnceLock::new(),
        }
    }

    /// Opens a URL (credentials from the environment).
    pub fn open(url: &str) -> Result<ObjectLocation> {
        Ok(Self::new(crate::url::parse_url(url)?))
    }

    pub fn store_url(&self) -> &StoreUrl {
        &self.at
    }

    fn listing(&self) -> Option<&BTreeMap<String, u64>> {
        self.listing
            .get_or_init(|| match list_folder(&self.at) {
                Ok(l) => Some(l),
                Err(e) => {
                    tracing::debug!(url = %self.at.url, error = %e, "listing failed; using HEAD requests");
                    None
                }
            })
            .as_ref()
    }

    fn size(&self, name: &str) -> Result<Option<u64>> {
        if let Some(l) = self.listing() {
            return Ok(l.get(name).copied());
        }
        let (store, path) = (self.at.store.clone(), self.at.child(name));
        match block_on(async move { store.head(&path).await }) {
            Ok(m) => Ok(Some(m.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(crate::error(&self.at.display_child(name), e)),
        }
    }
}

impl ModelLocation for ObjectLocation {
    fn display(&self) -> String {
        self.at.url.clone()
    }
    fn file_display(&self, name: &str) -> String {
        self.at.display_child(name)
    }
    fn exists(&self, name: &str) -> Result<bool> {
        Ok(self.size(name)?.is_some())
    }
    fn list(&self) -> Result<Vec<String>> {
        match self.listing() {
            Some(l) => Ok(l.keys().cloned().collect()),
            None => list_folder(&self.at).map(|l| l.into_keys().collect()),
        }
    }
    fn open(&self, name: &str) -> Result<Arc<dyn ByteSource>> {
        let shown = self.at.display_child(name);
        let len = self.size(name)?.ok_or_else(|| {
            Error::io(
                &shown,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such object"),
            )
        })?;
        Ok(Arc::new(ObjectSource::new(
            self.at.store.clone(),
            self.at.child(name),
            len,
            shown,
        )))
    }
    fn read(&self, name: &str) -> Result<Vec<u8>> {
        let shown = self.at.display_child(name);
        let (store, path) = (self.at.store.clone(), self.at.child(name));
        let r = block_on(async move { store.get(&path).await?.bytes().await });
        match r {
            Ok(b) => Ok(b.to_vec()),
            Err(object_store::Error::NotFound { .. }) => Err(Error::io(
                &shown,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such object"),
            )),
            Err(e) => Err(crate::error(&shown, e)),
        }
    }
}

/// An output target under an object-store prefix.
#[derive(Debug)]
pub struct ObjectOutput {
    at: StoreUrl,
    options: SinkOptions,
}

impl ObjectOutput {
    pub fn new(at: StoreUrl, options: SinkOptions) -> ObjectOutput {
        ObjectOutput { at, options }
    }

    /// Opens a URL (credentials from the environment).
    pub fn open(url: &str) -> Result<ObjectOutput> {
        Ok(Self::new(
            crate::url::parse_url(url)?,
            SinkOptions::default(),
        ))
    }

    pub fn store_url(&self) -> &StoreUrl {
        &self.at
    }

    /// The concrete sink (with [`ObjectShardSink`]'s extra methods).
    pub fn shard_sink(
        &self,
        shards: &[(String, Vec<SlotSpec>)],
        which: &[usize],
    ) -> Result<ObjectShardSink> {
        ObjectShardSink::create(self.at.clone(), shards, which, self.options.clone())
    }
}

impl OutputLocation for ObjectOutput {
    fn display(&self) -> String {
        self.at.url.clone()
    }
    fn name(&self) -> String {
        self.at
            .prefix
            .filename()
            .map(str::to_string)
            .unwrap_or_else(|| "Untitled Model (1)".into())
    }
    fn list(&self) -> Result<Vec<String>> {
        list_folder(&self.at).map(|l| l.into_keys().collect())
    }
    fn put(&self, name: &str, bytes: &[u8]) -> Result<()> {
        put_object(&self.at, name, bytes)
    }
    fn delete(&self, name: &str) -> Result<()> {
        let (store, path) = (self.at.store.clone(), self.at.child(name));
        match block_on(async move { store.delete(&path).await }) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(crate::error(&self.at.display_child(name), e)),
        }
    }
    fn create_shards(
        &self,
        shards: &[(String, Vec<SlotSpec>)],
        which: &[usize],
    ) -> Result<Box<dyn ShardSink>> {
        Ok(Box::new(self.shard_sink(shards, which)?))
    }
}

/// Writes one whole object `name` under the folder.
pub fn put_object(at: &StoreUrl, name: &str, bytes: &[u8]) -> Result<()> {
    let (store, path) = (at.store.clone(), at.child(name));
    let payload = PutPayload::from(bytes::Bytes::copy_from_slice(bytes));
    block_on(async move { store.put(&path, payload).await })
        .map(|_| ())
        .map_err(|e| crate::error(&at.display_child(name), e))
}
