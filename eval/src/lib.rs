//! smelt's eval engine: per-token log-probabilities, task scores (log-likelihood,
//! multiple choice, greedy exact match) and an external-evaluator hook, for
//! Llama-family decoders (llama, mistral, qwen2, qwen3) on candle.
//!
//! One generic decoder covers grouped-query attention, q/k/v biases, tied
//! embeddings, sliding-window attention and the rope scalings transformers
//! implements for these families (default, linear, dynamic, llama3, yarn).
//! Models come from a Hugging Face directory, a `.gguf` file (dequantized to
//! f32, q/k un-permuted to the Hugging Face layout) or, for evolutionary
//! search, straight from an in-memory tensor map ([`Model::from_tensors`]).
//!
//! Numerics follow transformers' eager float32 path so that log-probabilities
//! agree to ~1e-5 on CPU.

pub mod config;
pub mod cpu;
pub mod external;
pub mod generate;
pub mod gguf;
pub mod logprobs;
pub mod model;
pub mod score;
pub mod tokenizer;

pub use candle_core::Device;
pub use config::ModelConfig;
pub use external::{ExternalOutcome, run_external};
pub use logprobs::{LogprobInput, LogprobRow, logprobs};
pub use model::{LoadedModel, Model, load_model};
pub use score::{Metrics, ScoreOptions, Task, score_file, score_task};
pub use tokenizer::TextTokenizer;

/// Every failure the engine reports: a message naming the file, tensor, field
/// or line involved.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Msg(String),
    #[error("{context}: {source}")]
    Candle {
        context: String,
        #[source]
        source: candle_core::Error,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn err<T>(msg: impl Into<String>) -> Result<T> {
    Err(Error::Msg(msg.into()))
}

/// Attaches context to candle and I/O errors.
pub(crate) trait Ctx<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> Ctx<T> for candle_core::Result<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Candle {
            context: what(),
            source,
        })
    }
}

impl<T> Ctx<T> for std::io::Result<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Io {
            context: what(),
            source,
        })
    }
}

/// Internal shorthand for candle results inside the forward pass, where a
/// failure means a bug or an inconsistent model, reported with the op name.
pub(crate) fn c<T>(r: candle_core::Result<T>) -> Result<T> {
    r.map_err(|source| Error::Candle {
        context: "tensor op".into(),
        source,
    })
}
