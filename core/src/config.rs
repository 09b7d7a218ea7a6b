//! mergekit's YAML merge configuration, parsed unchanged (spec §1).
//!
//! The YAML is read into a JSON tree first (serde-saphyr, duplicate keys: last
//! wins, like PyYAML), then converted field by field so every error names the
//! field path (`models[1].parameters.weight`). Unknown keys are ignored, as
//! mergekit ignores them, and reported as warnings.

use std::collections::BTreeMap;
use std::fmt;

use serde_json::Value;

use crate::dtype::DType;
use crate::error::{Error, Result};

/// `PATH[@REVISION][+LORA[@REVISION]]`, or the mapping form (spec §1.2).
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct ModelRef {
    pub path: String,
    pub revision: Option<String>,
    pub lora: Option<LoraRef>,
    pub override_architecture: Option<String>,
}

#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct LoraRef {
    pub path: String,
    pub revision: Option<String>,
}

impl ModelRef {
    pub fn local(path: impl Into<String>) -> ModelRef {
        ModelRef {
            path: path.into(),
            revision: None,
            lora: None,
            override_architecture: None,
        }
    }

    /// Parses the string form.
    pub fn parse(s: &str) -> std::result::Result<ModelRef, String> {
        let parts: Vec<&str> = s.split('+').collect();
        if parts.len() > 2 {
            return Err(format!(
                "can't parse model reference {s:?}: more than one '+'"
            ));
        }
        let split_rev = |p: &str| -> std::result::Result<(String, Option<String>), String> {
            let at: Vec<&str> = p.split('@').collect();
            match at.len() {
                1 => Ok((p.to_string(), None)),
                2 => Ok((at[0].to_string(), Some(at[1].to_string()))),
                _ => Err(format!(
                    "can't parse model reference {s:?}: more than one '@'"
                )),
            }
        };
        let (path, revision) = split_rev(parts[0])?;
        if path.is_empty() {
            return Err("empty model path".into());
        }
        let lora = match parts.get(1) {
            Some(l) => {
                let (path, revision) = split_rev(l)?;
                Some(LoraRef { path, revision })
            }
            None => None,
        };
        Ok(ModelRef {
            path,
            revision,
            lora,
            override_architecture: None,
        })
    }
}

impl fmt::Display for ModelRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.path)?;
        if let Some(r) = &self.revision {
            write!(f, "@{r}")?;
        }
        if let Some(l) = &self.lora {
            write!(f, "+{}", l.path)?;
            if let Some(r) = &l.revision {
                write!(f, "@{r}")?;
            }
        }
        Ok(())
    }
}

/// A parameter value: scalar, gradient, or filtered list (spec §1.3).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum ParamSetting {
    Scalar(Scalar),
    /// A gradient (interpolated for numeric parameters, picked for boolean
    /// ones). Empty: not set here (mergekit 0.1.5 falls through to the next
    /// level).
    Gradient(Vec<Scalar>),
    /// A list of `{filter, value}` entries, first match wins (a bare
    /// `{filter, value}` mapping is a list of one, as in mergekit 0.1.5).
    Conditional(Vec<ConditionalParam>),
}

/// One value as written in the YAML, checked against the parameter's type
/// when it is evaluated (mergekit 0.1.5 validates with pydantic's lax
/// rules: `"0.5"` is a float, `"false"` / `0` a boolean, `2` is not).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Scalar {
    Num(f64),
    Bool(bool),
    /// A string that reads as a number or a boolean word.
    Str(String),
}

impl From<f64> for Scalar {
    fn from(v: f64) -> Scalar {
        Scalar::Num(v)
    }
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ConditionalParam {
    pub filter: Option<String>,
    pub value: Box<ParamSetting>,
}

pub type ParamMap = BTreeMap<String, ParamSetting>;

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct InputModel {
    pub model: ModelRef,
    pub parameters: ParamMap,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct InputSlice {
    pub model: ModelRef,
    pub layer_range: Option<(usize, usize)>,
    pub parameters: ParamMap,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct OutputSlice {
    pub sources: Vec<InputSlice>,
    pub base_model: Option<ModelRef>,
    pub parameters: ParamMap,
}

/// The merge body: whole models, or slices (frankenmerge).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum MergeBody {
    Models(Vec<InputModel>),
    Slices(Vec<OutputSlice>),
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum TokenizerSource {
    Union,
    Base,
    Model(ModelRef),
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum EmbedSource {
    Model(ModelRef),
    Zero,
    ModelTokenId { model: ModelRef, token_id: usize },
    ModelToken { model: ModelRef, token: String },
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TokenSpec {
    pub source: Option<EmbedSource>,
    pub force: bool,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TokenizerConfig {
    pub source: TokenizerSource,
    /// Token string → settings, in YAML order.
    pub tokens: Vec<(String, TokenSpec)>,
    pub pad_to_multiple_of: Option<usize>,
}

/// A validated merge configuration.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MergeConfig {
    pub merge_method: String,
    pub body: MergeBody,
    /// Parameters of an explicit single `modules:` entry (precedence level 3).
    pub module_parameters: ParamMap,
    pub base_model: Option<ModelRef>,
    pub parameters: ParamMap,
    pub dtype: Option<DType>,
    pub out_dtype: Option<DType>,
    pub tokenizer: Option<TokenizerConfig>,
    pub chat_template: Option<String>,
    /// The YAML text exactly as read (written as mergekit_config.yml).
    pub source_text: String,
    /// The configuration file's name, for messages.
    pub file: String,
    /// Things mergekit tolerates but a user may want to know (unknown keys...).
    pub warnings: Vec<String>,
}

impl MergeConfig {
    /// Every model the configuration references, in configuration order,
    /// without duplicates: base model first if set, then sources in order.
    pub fn referenced_models(&self) -> Vec<ModelRef> {
        let mut out: Vec<ModelRef> = Vec::new();
        let mut push = |m: &ModelRef| {
            if !out.contains(m) {
                out.push(m.clone())
            }
        };
        if let Some(b) = &self.base_model {
            push(b);
        }
        match &self.body {
            MergeBody::Models(ms) => ms.iter().for_each(|m| push(&m.model)),
            MergeBody::Slices(ss) => {
                for s in ss {
                    if let Some(b) = &s.base_model {
                        push(b)
                    }
                    s.sources.iter().for_each(|src| push(&src.model));
                }
            }
        }
        out
    }
}

struct Ctx<'a> {
    file: &'a str,
    warnings: Vec<String>,
}

impl Ctx<'_> {
    fn err(&self, field: &str, msg: impl Into<String>) -> Error {
        Error::Config {
            file: self.file.to_string(),
            field: field.to_string(),
            msg: msg.into(),
        }
    }

    fn obj<'v>(&self, v: &'v Value, field: &str) -> Result<&'v serde_json::Map<String, Value>> {
        v.as_object()
            .ok_or_else(|| self.err(field, format!("expected a mapping, found {}", kind(v))))
    }

    fn list<'v>(&self, v: &'v Value, field: &str) -> Result<&'v Vec<Value>> {
        v.as_array()
            .ok_or_else(|| self.err(field, format!("expected a list, found {}", kind(v))))
    }

    fn string(&self, v: &Value, field: &str) -> Result<String> {
        match v {
            Value::String(s) => Ok(s.clone()),
            Value::Number(n) => Ok(n.to_string()),
            _ => Err(self.err(field, format!("expected a string, found {}", kind(v)))),
        }
    }

    fn check_keys(&mut self, m: &serde_json::Map<String, Value>, field: &str, known: &[&str]) {
        for k in m.keys() {
            if !known.contains(&k.as_str()) {
                let at = if field.is_empty() {
                    k.clone()
                } else {
                    format!("{field}.{k}")
                };
                self.warnings
                    .push(format!("{}: {at}: unknown key, ignored", self.file));
            }
        }
    }

    fn model_ref(&mut self, v: &Value, field: &str) -> Result<ModelRef> {
        match v {
            Value::String(s) => ModelRef::parse(s).map_err(|e| self.err(field, e)),
            Value::Object(m) => {
                self.check_keys(m, field, &["model", "lora", "override_architecture"]);
                let model = m
                    .get("model")
                    .ok_or_else(|| self.err(field, "model reference mapping needs `model`"))?;
                let (path, revision) = self.path_rev(model, &format!("{field}.model"))?;
                let lora = match m.get("lora") {
                    None | Some(Value::Null) => None,
                    Some(l) => {
                        let (path, revision) = self.path_rev(l, &format!("{field}.lora"))?;
                        Some(LoraRef { path, revision })
                    }
                };
                let override_architecture = match m.get("override_architecture") {
                    None | Some(Value::Null) => None,
                    Some(a) => Some(self.string(a, &format!("{field}.override_architecture"))?),
                };
                Ok(ModelRef {
                    path,
                    revision,
                    lora,
                    override_architecture,
                })
            }
            _ => Err(self.err(
                field,
                format!(
                    "expected a model reference (string or mapping), found {}",
                    kind(v)
                ),
            )),
        }
    }

    fn path_rev(&mut self, v: &Value, field: &str) -> Result<(String, Option<String>)> {
        match v {
            Value::String(s) => Ok((s.clone(), None)),
            Value::Object(m) => {
                self.check_keys(m, field, &["path", "revision"]);
                let path = self.string(
                    m.get("path")
                        .ok_or_else(|| self.err(field, "needs `path`"))?,
                    &format!("{field}.path"),
                )?;
                let revision = match m.get("revision") {
                    None | Some(Value::Null) => None,
                    Some(r) => Some(self.string(r, &format!("{field}.revision"))?),
                };
                Ok((path, revision))
            }
            _ => Err(self.err(field, format!("expected a path, found {}", kind(v)))),
        }
    }

    fn scalar(&self, v: &Value, field: &str) -> Result<Scalar> {
        match v {
            Value::Number(n) => n
                .as_f64()
                .map(Scalar::Num)
                .ok_or_else(|| self.err(field, "number out of range")),
            Value::Bool(b) => Ok(Scalar::Bool(*b)),
            Value::String(s) if matches!(s.as_str(), ".nan" | ".inf" | "-.inf" | "+.inf") => {
                Err(self.err(
                    field,
                    format!("{s} is not allowed: parameters must be finite numbers"),
                ))
            }
            Value::String(s)
                if crate::params::str_number(s).is_some()
                    || crate::params::str_bool(s).is_some() =>
            {
                Ok(Scalar::Str(s.clone()))
            }
            _ => Err(self.err(
                field,
                format!(
                    "expected a number or true/false (or a list / filtered list), found {}",
                    kind(v)
                ),
            )),
        }
    }

    fn setting(&mut self, v: &Value, field: &str) -> Result<ParamSetting> {
        match v {
            Value::Array(items) => {
                if items.iter().all(|i| !i.is_object()) {
                    // empty: not set at this level
                    let g = items
                        .iter()
                        .enumerate()
                        .map(|(i, x)| self.scalar(x, &format!("{field}[{i}]")))
                        .collect::<Result<Vec<_>>>()?;
                    Ok(ParamSetting::Gradient(g))
                } else {
                    let mut out = Vec::new();
                    for (i, item) in items.iter().enumerate() {
                        let f = format!("{field}[{i}]");
                        match item {
                            Value::Object(_) => out.push(self.conditional(item, &f)?),
                            _ => {
                                return Err(self.err(
                                    &f,
                                    format!(
                                        "a list mixing numbers and {{filter, value}} entries: found {}",
                                        kind(item)
                                    ),
                                ));
                            }
                        }
                    }
                    Ok(ParamSetting::Conditional(out))
                }
            }
            Value::Object(_) => Ok(ParamSetting::Conditional(vec![self.conditional(v, field)?])),
            _ => Ok(ParamSetting::Scalar(self.scalar(v, field)?)),
        }
    }

    fn conditional(&mut self, v: &Value, field: &str) -> Result<ConditionalParam> {
        let m = self.obj(v, field)?;
        self.check_keys(m, field, &["filter", "value"]);
        let filter = match m.get("filter") {
            None | Some(Value::Null) => None,
            Some(f) => Some(self.string(f, &format!("{field}.filter"))?),
        };
        let value = m
            .get("value")
            .ok_or_else(|| self.err(field, "conditional parameter needs `value`"))?;
        let value = match value {
            Value::Array(_) | Value::Number(_) | Value::Bool(_) | Value::String(_) => {
                self.setting(value, &format!("{field}.value"))?
            }
            _ => {
                return Err(self.err(
                    &format!("{field}.value"),
                    format!(
                        "expected a number, true/false or a list of them, found {}",
                        kind(value)
                    ),
                ));
            }
        };
        if let ParamSetting::Conditional(_) = value {
            return Err(self.err(&format!("{field}.value"), "nested filters are not allowed"));
        }
        Ok(ConditionalParam {
            filter,
            value: Box::new(value),
        })
    }

    fn params(&mut self, v: Option<&Value>, field: &str) -> Result<ParamMap> {
        let mut out = ParamMap::new();
        let Some(v) = v else { return Ok(out) };
        if v.is_null() {
            return Ok(out);
        }
        let m = self.obj(v, field)?;
        for (k, val) in m {
            if val.is_null() {
                continue;
            }
            out.insert(k.clone(), self.setting(val, &format!("{field}.{k}"))?);
        }
        Ok(out)
    }

    fn dtype(&self, v: Option<&Value>, field: &str) -> Result<Option<DType>> {
        match v {
            None | Some(Value::Null) => Ok(None),
            Some(v) => {
                let s = self.string(v, field)?;
                DType::from_config_name(&s).map(Some).ok_or_else(|| {
                    self.err(
                        field,
                        format!(
                            "unknown dtype {s:?} (expected bfloat16, float16, float32, float64 or int64)"
                        ),
                    )
                })
            }
        }
    }

    fn layer_range(&self, v: &Value, field: &str) -> Result<(usize, usize)> {
        let l = self.list(v, field)?;
        if l.len() != 2 {
            return Err(self.err(
                field,
                format!("expected [start, end], found {} values", l.len()),
            ));
        }
        let get = |i: usize| -> Result<usize> {
            l[i].as_u64().map(|x| x as usize).ok_or_else(|| {
                self.err(&format!("{field}[{i}]"), "expected a non-negative integer")
            })
        };
        let (a, b) = (get(0)?, get(1)?);
        if b < a {
            return Err(self.err(field, format!("end {b} is before start {a}")));
        }
        Ok((a, b))
    }

    fn input_slice(&mut self, v: &Value, field: &str) -> Result<InputSlice> {
        let m = self.obj(v, field)?;
        self.check_keys(m, field, &["model", "layer_range", "parameters"]);
        let model = self.model_ref(
            m.get("model")
                .ok_or_else(|| self.err(field, "missing `model`"))?,
            &format!("{field}.model"),
        )?;
        let layer_range = match m.get("layer_range") {
            None | Some(Value::Null) => None,
            Some(r) => Some(self.layer_range(r, &format!("{field}.layer_range"))?),
        };
        let parameters = self.params(m.get("parameters"), &format!("{field}.parameters"))?;
        Ok(InputSlice {
            model,
            layer_range,
            parameters,
        })
    }

    fn slices(&mut self, v: &Value, field: &str) -> Result<Vec<OutputSlice>> {
        let mut out = Vec::new();
        for (i, s) in self.list(v, field)?.iter().enumerate() {
            let f = format!("{field}[{i}]");
            let m = self.obj(s, &f)?;
            self.check_keys(
                m,
                &f,
                &["sources", "base_model", "residual_weight", "parameters"],
            );
            let srcs = m
                .get("sources")
                .ok_or_else(|| self.err(&f, "missing `sources`"))?;
            let mut sources = Vec::new();
            for (j, src) in self.list(srcs, &format!("{f}.sources"))?.iter().enumerate() {
                let sf = format!("{f}.sources[{j}]");
                let s = self.input_slice(src, &sf)?;
                if s.layer_range.is_none() {
                    return Err(self.err(&sf, "missing `layer_range`"));
                }
                sources.push(s);
            }
            if sources.is_empty() {
                return Err(self.err(&format!("{f}.sources"), "a slice needs at least one source"));
            }
            let base_model = match m.get("base_model") {
                None | Some(Value::Null) => None,
                Some(b) => Some(self.model_ref(b, &format!("{f}.base_model"))?),
            };
            let parameters = self.params(m.get("parameters"), &format!("{f}.parameters"))?;
            out.push(OutputSlice {
                sources,
                base_model,
                parameters,
            });
        }
        Ok(out)
    }

    fn models(&mut self, v: &Value, field: &str) -> Result<Vec<InputModel>> {
        let mut out = Vec::new();
        for (i, item) in self.list(v, field)?.iter().enumerate() {
            let f = format!("{field}[{i}]");
            // mergekit-evolve emits `layer_range` here; it is ignored.
            let s = match item {
                Value::String(_) => InputSlice {
                    model: self.model_ref(item, &f)?,
                    layer_range: None,
                    parameters: ParamMap::new(),
                },
                _ => self.input_slice(item, &f)?,
            };
            out.push(InputModel {
                model: s.model,
                parameters: s.parameters,
            });
        }
        Ok(out)
    }

    fn tokenizer_source(&mut self, v: &Value, field: &str) -> Result<TokenizerSource> {
        match v {
            Value::String(s) if s == "union" => Ok(TokenizerSource::Union),
            Value::String(s) if s == "base" => Ok(TokenizerSource::Base),
            _ => Ok(TokenizerSource::Model(self.model_ref(v, field)?)),
        }
    }

    fn tokenizer(&mut self, v: &Value, field: &str) -> Result<TokenizerConfig> {
        let m = self.obj(v, field)?;
        self.check_keys(m, field, &["source", "tokens", "pad_to_multiple_of"]);
        let source = match m.get("source") {
            None | Some(Value::Null) => TokenizerSource::Union,
            Some(s) => self.tokenizer_source(s, &format!("{field}.source"))?,
        };
        let pad_to_multiple_of = match m.get("pad_to_multiple_of") {
            None | Some(Value::Null) => None,
            Some(p) => match p.as_u64() {
                Some(n) if n > 0 => Some(n as usize),
                _ => {
                    return Err(self.err(
                        &format!("{field}.pad_to_multiple_of"),
                        "expected a positive integer",
                    ));
                }
            },
        };
        let mut tokens = Vec::new();
        if let Some(t) = m.get("tokens").filter(|t| !t.is_null()) {
            let tf = format!("{field}.tokens");
            for (tok, spec) in self.obj(t, &tf)?.clone() {
                let f = format!("{tf}.{tok}");
                let sm = self.obj(&spec, &f)?.clone();
                self.check_keys(&sm, &f, &["source", "force"]);
                let force = match sm.get("force") {
                    None | Some(Value::Null) => false,
                    Some(Value::Bool(b)) => *b,
                    Some(_) => {
                        return Err(self.err(&format!("{f}.force"), "expected true or false"));
                    }
                };
                let source = match sm.get("source") {
                    None | Some(Value::Null) => None,
                    Some(s) => Some(self.embed_source(s, &format!("{f}.source"))?),
                };
                tokens.push((tok.clone(), TokenSpec { source, force }));
            }
        }
        Ok(TokenizerConfig {
            source,
            tokens,
            pad_to_multiple_of,
        })
    }

    fn embed_source(&mut self, v: &Value, field: &str) -> Result<EmbedSource> {
        if let Value::Object(m) = v
            && let Some(k) = m.get("kind")
        {
            let kind_s = self.string(k, &format!("{field}.kind"))?;
            return match kind_s.as_str() {
                "zero" => Ok(EmbedSource::Zero),
                "model_token" => {
                    let model = self.model_ref(
                        m.get("model")
                            .ok_or_else(|| self.err(field, "needs `model`"))?,
                        &format!("{field}.model"),
                    )?;
                    match (m.get("token_id"), m.get("token")) {
                        (Some(id), None) => Ok(EmbedSource::ModelTokenId {
                            model,
                            token_id: id.as_u64().ok_or_else(|| {
                                self.err(
                                    &format!("{field}.token_id"),
                                    "expected a non-negative integer",
                                )
                            })? as usize,
                        }),
                        (None, Some(t)) => Ok(EmbedSource::ModelToken {
                            model,
                            token: self.string(t, &format!("{field}.token"))?,
                        }),
                        _ => {
                            Err(self
                                .err(field, "exactly one of `token_id` and `token` is required"))
                        }
                    }
                }
                other => Err(self.err(
                    &format!("{field}.kind"),
                    format!("unknown kind {other:?} (expected zero or model_token)"),
                )),
            };
        }
        Ok(EmbedSource::Model(self.model_ref(v, field)?))
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}

/// Parses YAML text into a JSON tree (PyYAML-compatible: last duplicate key wins).
pub fn yaml_to_value(text: &str, file: &str) -> Result<Value> {
    let opts = serde_saphyr::options! {
        duplicate_keys: serde_saphyr::options::DuplicateKeyPolicy::LastWins,
        non_finite_float_policy: serde_saphyr::options::NonFiniteFloatPolicy::AsString,
    };
    serde_saphyr::from_str_with_options::<Value>(text, opts)
        .map_err(|e| Error::format(file, format!("YAML syntax error: {e}")))
}

/// Parses a merge configuration from YAML text. `file` names it in errors.
pub fn parse_config(text: &str, file: &str) -> Result<MergeConfig> {
    let root = yaml_to_value(text, file)?;
    let mut cx = Ctx {
        file,
        warnings: Vec::new(),
    };
    let m = match &root {
        Value::Object(m) => m,
        Value::Null => return Err(cx.err("(document)", "the configuration is empty")),
        other => {
            return Err(cx.err(
                "(document)",
                format!("expected a mapping, found {}", kind(other)),
            ));
        }
    };
    cx.check_keys(
        m,
        "",
        &[
            "merge_method",
            "models",
            "slices",
            "modules",
            "base_model",
            "parameters",
            "dtype",
            "out_dtype",
            "tokenizer_source",
            "tokenizer",
            "chat_template",
            "name",
        ],
    );
    let merge_method = match m.get("merge_method") {
        Some(v) if !v.is_null() => cx.string(v, "merge_method")?,
        _ => return Err(cx.err("merge_method", "required field missing")),
    };
    let present = |k: &str| match m.get(k) {
        None | Some(Value::Null) => false,
        Some(Value::Array(a)) => !a.is_empty(),
        Some(Value::Object(o)) => !o.is_empty(),
        Some(_) => true,
    };
    let n_forms = ["models", "slices", "modules"]
        .iter()
        .filter(|k| present(k))
        .count();
    if n_forms != 1 {
        return Err(cx.err(
            "models",
            "exactly one of 'models', 'slices', or 'modules' must be present (and non-empty)",
        ));
    }
    let mut module_parameters = ParamMap::new();
    let body = if present("models") {
        MergeBody::Models(cx.models(&m["models"], "models")?)
    } else if present("slices") {
        MergeBody::Slices(cx.slices(&m["slices"], "slices")?)
    } else {
        let mods = cx.obj(&m["modules"], "modules")?.clone();
        if mods.len() != 1 {
            return Err(cx.err(
                "modules",
                "multi-module architectures are not supported yet; give one module",
            ));
        }
        let (name, def) = mods.iter().next().expect("one module");
        let f = format!("modules.{name}");
        let dm = cx.obj(def, &f)?.clone();
        cx.check_keys(&dm, &f, &["slices", "models", "parameters"]);
        module_parameters = cx.params(dm.get("parameters"), &format!("{f}.parameters"))?;
        let has = |k: &str| {
            dm.get(k)
                .is_some_and(|v| v.as_array().is_some_and(|a| !a.is_empty()))
        };
        match (has("slices"), has("models")) {
            (true, false) => MergeBody::Slices(cx.slices(&dm["slices"], &format!("{f}.slices"))?),
            (false, true) => MergeBody::Models(cx.models(&dm["models"], &format!("{f}.models"))?),
            _ => return Err(cx.err(&f, "exactly one of 'slices' or 'models' must be present")),
        }
    };
    let base_model = match m.get("base_model") {
        None | Some(Value::Null) => None,
        Some(b) => Some(cx.model_ref(b, "base_model")?),
    };
    let parameters = cx.params(m.get("parameters"), "parameters")?;
    let dtype = cx.dtype(m.get("dtype"), "dtype")?;
    let out_dtype = cx.dtype(m.get("out_dtype"), "out_dtype")?;
    let ts = m.get("tokenizer_source").filter(|v| !v.is_null());
    let tb = m.get("tokenizer").filter(|v| !v.is_null());
    let tokenizer = match (ts, tb) {
        (Some(_), Some(_)) => {
            return Err(cx.err(
                "tokenizer",
                "cannot use both 'tokenizer_source' and 'tokenizer'",
            ));
        }
        (Some(s), None) => Some(TokenizerConfig {
            source: cx.tokenizer_source(s, "tokenizer_source")?,
            tokens: Vec::new(),
            pad_to_multiple_of: None,
        }),
        (None, Some(t)) => Some(cx.tokenizer(t, "tokenizer")?),
        (None, None) => None,
    };
    let chat_template = match m.get("chat_template") {
        None | Some(Value::Null) => None,
        Some(v) => Some(cx.string(v, "chat_template")?),
    };
    Ok(MergeConfig {
        merge_method,
        body,
        module_parameters,
        base_model,
        parameters,
        dtype,
        out_dtype,
        tokenizer,
        chat_template,
        source_text: text.to_string(),
        file: file.to_string(),
        warnings: cx.warnings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_models_form_with_gradients_and_filters() {
        let y = r#"
models:
  - model: a
    parameters:
      weight: [0, 0.5, 1]
  - model: b@rev+lora
    parameters:
      weight:
        - filter: mlp
          value: 2
        - value: true
merge_method: linear
dtype: bfloat16
extra_key: 1
"#;
        let c = parse_config(y, "c.yml").unwrap();
        let MergeBody::Models(ms) = &c.body else {
            panic!()
        };
        assert_eq!(
            ms[0].parameters["weight"],
            ParamSetting::Gradient(vec![0.0.into(), 0.5.into(), 1.0.into()])
        );
        assert_eq!(ms[1].model.revision.as_deref(), Some("rev"));
        assert_eq!(ms[1].model.lora.as_ref().unwrap().path, "lora");
        match &ms[1].parameters["weight"] {
            ParamSetting::Conditional(v) => {
                assert_eq!(v[0].filter.as_deref(), Some("mlp"));
                assert_eq!(*v[1].value, ParamSetting::Scalar(Scalar::Bool(true)));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(c.dtype, Some(DType::BF16));
        assert_eq!(c.warnings.len(), 1);
        assert!(c.warnings[0].contains("extra_key"));
    }

    #[test]
    fn model_ref_parsing() {
        assert!(ModelRef::parse("a+b+c").is_err());
        assert!(ModelRef::parse("a@b@c").is_err());
        let r = ModelRef::parse("org/m@main+lora@v1").unwrap();
        assert_eq!(r.to_string(), "org/m@main+lora@v1");
    }

    #[test]
    fn errors_name_the_field() {
        let y =
            "models:\n  - model: a\n    parameters:\n      weight: heavy\nmerge_method: linear\n";
        let e = parse_config(y, "c.yml").unwrap_err().to_string();
        assert!(e.contains("models[0].parameters.weight"), "{e}");
        let e = parse_config("merge_method: linear\n", "c.yml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("exactly one of"), "{e}");
        let e = parse_config(
            "models: [a]\nmerge_method: linear\ndtype: float8\n",
            "c.yml",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("dtype") && e.contains("float8"), "{e}");
    }
}
