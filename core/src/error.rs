//! The error type of the merge engine. Every message names the file, tensor
//! or configuration field it is about.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O failure on a named path.
    #[error("{}: {err}", path.display())]
    Io {
        path: PathBuf,
        // not a #[source]: the message already includes it
        err: std::io::Error,
    },
    /// The merge configuration is invalid; `field` is a path such as
    /// `models[1].parameters.weight`.
    #[error("{file}: {field}: {msg}")]
    Config {
        file: String,
        field: String,
        msg: String,
    },
    /// A model file (safetensors, index, config.json) is malformed.
    #[error("{file}: {msg}")]
    Format { file: String, msg: String },
    /// A merge failed on one output tensor.
    #[error("tensor {tensor}: {msg}")]
    Tensor { tensor: String, msg: String },
    /// Anything else, already phrased for the user.
    #[error("{0}")]
    Msg(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Error {
        Error::Io {
            path: path.into(),
            err: source,
        }
    }
    pub fn format(file: impl std::fmt::Display, msg: impl Into<String>) -> Error {
        Error::Format {
            file: file.to_string(),
            msg: msg.into(),
        }
    }
    pub fn tensor(tensor: impl Into<String>, msg: impl Into<String>) -> Error {
        Error::Tensor {
            tensor: tensor.into(),
            msg: msg.into(),
        }
    }
    pub fn msg(msg: impl Into<String>) -> Error {
        Error::Msg(msg.into())
    }
}

/// Shorthand for building an [`Error::Msg`] with `format!` syntax.
#[macro_export]
macro_rules! bail {
    ($($arg:tt)*) => { return Err($crate::error::Error::Msg(format!($($arg)*))) };
}
