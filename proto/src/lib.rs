//! smelt's gRPC contract (package `smelt.v1`), generated from
//! `proto/smelt/v1/smelt.proto` by tonic/prost at build time.

#[allow(clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("smelt.v1");
}

pub use v1::*;

/// Largest message either side accepts (plans of 70B merges are ~1 MB).
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;
