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
    /// Several independent problems (e.g. one per output tensor).
    #[error("{}", many_message(.0))]
    Many(Vec<Error>),
}

fn many_message(v: &[Error]) -> String {
    const SHOW: usize = 12;
    let mut s = format!("{} problems:", v.len());
    for e in v.iter().take(SHOW) {
        s.push_str("\n  - ");
        s.push_str(&e.to_string());
    }
    if v.len() > SHOW {
        s.push_str(&format!(
            "\n  … and {} more (run `smelt check --json` for all)",
            v.len() - SHOW
        ));
    }
    s
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

    /// The individual problems (one for a plain error).
    pub fn flatten(self) -> Vec<Error> {
        match self {
            Error::Many(v) => v.into_iter().flat_map(Error::flatten).collect(),
            e => vec![e],
        }
    }

    /// A stable, machine-readable category for `smelt check --json`.
    pub fn code(&self) -> &'static str {
        let text = self.to_string();
        let has = |s: &str| text.contains(s);
        match self {
            Error::Io { .. } => "io_error",
            Error::Format { .. } if has("YAML syntax") => "yaml_syntax",
            Error::Format { .. } => "bad_model_file",
            Error::Config { field, .. } if field == "merge_method" => "unknown_method",
            Error::Config { field, .. } if field.ends_with("dtype") => "unknown_dtype",
            Error::Config { field, .. } if field == "base_model" => "missing_base_model",
            Error::Config { field, .. } if field.contains("layer_range") => "layer_range",
            Error::Config { .. } => "bad_config",
            Error::Tensor { .. } if has("required but not present") => "missing_tensor",
            Error::Tensor { .. } if has("shape") || has("smaller than") || has("widths") => {
                "shape_mismatch"
            }
            Error::Tensor { .. } if has("density") || has("epsilon") || has("parameter") => {
                "bad_parameter"
            }
            Error::Tensor { .. } => "tensor_error",
            Error::Msg(_) if has("missing required parameter") || has("has no `") => {
                "missing_parameter"
            }
            Error::Msg(_) if has("different architectures") => "architecture_mismatch",
            Error::Msg(_) if has("not found") => "model_not_found",
            Error::Msg(_) if has("same number of layers") => "layer_range",
            Error::Msg(_) => "error",
            Error::Many(_) => "many",
        }
    }
}

/// Shorthand for building an [`Error::Msg`] with `format!` syntax.
#[macro_export]
macro_rules! bail {
    ($($arg:tt)*) => { return Err($crate::error::Error::Msg(format!($($arg)*))) };
}
