//! Tensor I/O: model folders ([`ModelLocation`]: local directories, or object
//! stores plugged in by URL), byte sources, safetensors headers and readers,
//! and output sinks ([`TensorSink`]: the local shard writer, or streaming
//! uploads).

pub mod location;
pub mod pickle;
pub mod safetensors;
pub mod sink;
pub mod source;
pub mod writer;

pub use location::{
    LocalDir, ModelLocation, OutputLocation, UrlResolver, is_url, open_location, open_output,
    set_url_resolver,
};
pub use safetensors::{ModelTensors, TensorLoc};
pub use sink::{ShardSink, TensorSink};
pub use source::{ByteSource, LocalFile};
pub use writer::ShardWriter;
