//! Where the executor's output bytes go. [`crate::executor::run_tasks`]
//! writes each finished tensor (or row block) into its planned shard slot
//! through [`TensorSink`]: local shard files ([`crate::io::ShardWriter`]) or
//! streaming object-store uploads (the `smelt-store` crate).

use crate::error::Result;
use crate::io::writer::ShardWriter;

/// Receives tensor bytes at planned (shard, slot) positions, from many
/// threads, in any order.
pub trait TensorSink: Send + Sync {
    /// One whole tensor's bytes for its slot.
    fn write(&self, shard: usize, slot: usize, bytes: &[u8]) -> Result<()>;
    /// Part of a tensor's bytes, `byte_offset` bytes into its slot.
    fn write_part(&self, shard: usize, slot: usize, byte_offset: u64, bytes: &[u8]) -> Result<()>;
    /// [`TensorSink::write_part`] handing over the buffer (a sink may keep
    /// it instead of copying).
    fn write_part_owned(
        &self,
        shard: usize,
        slot: usize,
        byte_offset: u64,
        bytes: Vec<u8>,
    ) -> Result<()> {
        self.write_part(shard, slot, byte_offset, &bytes)
    }
    /// Whether bytes may be written a second time (after every byte of the
    /// tensor was written once), the later write winning: true for files,
    /// false for sinks that stream bytes out in order (object stores).
    fn rewrites(&self) -> bool {
        false
    }
}

/// A [`TensorSink`] for a set of output shards that is committed or
/// abandoned as a whole.
pub trait ShardSink: TensorSink {
    /// Checks every shard is complete and makes it durable/visible.
    fn finish(self: Box<Self>) -> Result<()>;
    /// Abandons the output (aborts unfinished uploads, removes what this
    /// sink wrote; best effort).
    fn abort(self: Box<Self>);
    /// Makes further writes fail (a cancelled job), so a running executor
    /// stops at its next tensor; call [`ShardSink::abort`] afterwards.
    fn cancel(&self);
}

impl TensorSink for ShardWriter {
    fn write(&self, shard: usize, slot: usize, bytes: &[u8]) -> Result<()> {
        ShardWriter::write(self, shard, slot, bytes)
    }
    fn write_part(&self, shard: usize, slot: usize, byte_offset: u64, bytes: &[u8]) -> Result<()> {
        ShardWriter::write_part(self, shard, slot, byte_offset, bytes)
    }
    fn write_part_owned(
        &self,
        shard: usize,
        slot: usize,
        byte_offset: u64,
        bytes: Vec<u8>,
    ) -> Result<()> {
        ShardWriter::write_part_owned(self, shard, slot, byte_offset, bytes)
    }
    /// Writes go to the file at their offsets, in the order they are made.
    fn rewrites(&self) -> bool {
        true
    }
}
