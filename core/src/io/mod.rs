//! Tensor I/O: byte sources (local files now; object stores plug in behind
//! the same trait), safetensors headers and readers, and the shard writer.

pub mod pickle;
pub mod safetensors;
pub mod source;
pub mod writer;

pub use safetensors::{ModelTensors, TensorLoc};
pub use source::{ByteSource, LocalFile};
pub use writer::ShardWriter;
