//! Evaluating parameter settings for one tensor (spec §1.3): gradients,
//! filters, and the precedence chain source → slice → module → top level →
//! method default.

use crate::config::{ParamMap, ParamSetting};

/// Outcome of evaluating one setting for a tensor name and position `t`.
#[derive(Debug, Clone, PartialEq)]
pub enum Evaluated {
    Value(f64),
    /// No filter matched: fall through to the next precedence level.
    NoMatch,
    /// The setting cannot be evaluated (e.g. a bare `{filter, value}` map).
    Invalid(String),
}

/// Evaluates `setting` for `tensor_name` at interpolation position `t`.
pub fn evaluate(setting: &ParamSetting, tensor_name: &str, t: f64) -> Evaluated {
    match setting {
        ParamSetting::Scalar(v) => Evaluated::Value(*v),
        ParamSetting::Gradient(g) => Evaluated::Value(interpolate(g, t)),
        ParamSetting::Conditional(entries) => {
            for e in entries {
                let matches = match e.filter.as_deref() {
                    None | Some("*") => true,
                    Some(f) => !tensor_name.is_empty() && tensor_name.contains(f),
                };
                if matches {
                    return evaluate(&e.value, tensor_name, t);
                }
            }
            Evaluated::NoMatch
        }
        ParamSetting::Bare(_) => Evaluated::Invalid(
            "a bare {filter, value} mapping cannot be evaluated; wrap it in a list: \
             [{filter: ..., value: ...}]"
                .into(),
        ),
    }
}

/// Gradient interpolation: `s = t·(n−1)`, linear between neighbours.
pub fn interpolate(g: &[f64], t: f64) -> f64 {
    let n = g.len();
    if n == 1 {
        return g[0];
    }
    let s = t * (n - 1) as f64;
    let i0 = (s.trunc() as usize).min(n - 1);
    let i1 = (i0 + 1).min(n - 1);
    let f = s - i0 as f64;
    (1.0 - f) * g[i0] + f * g[i1]
}

/// Looks a parameter up through a list of parameter maps in precedence order.
/// Returns `Ok(None)` when no level provides a value.
pub fn resolve(
    levels: &[&ParamMap],
    name: &str,
    tensor_name: &str,
    t: f64,
) -> Result<Option<f64>, String> {
    for level in levels {
        if let Some(s) = level.get(name) {
            match evaluate(s, tensor_name, t) {
                Evaluated::Value(v) => return Ok(Some(v)),
                Evaluated::NoMatch => continue,
                Evaluated::Invalid(msg) => return Err(format!("parameter {name}: {msg}")),
            }
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ConditionalParam;

    #[test]
    fn gradient_interpolation() {
        let g = [0.0, 0.5, 0.3, 0.7, 1.0];
        assert_eq!(interpolate(&g, 0.0), 0.0);
        assert_eq!(interpolate(&g, 1.0), 1.0);
        assert!((interpolate(&g, 0.125) - 0.25).abs() < 1e-12);
        assert_eq!(interpolate(&[3.0], 0.7), 3.0);
    }

    #[test]
    fn filters_first_match_and_fallthrough() {
        let s = ParamSetting::Conditional(vec![
            ConditionalParam {
                filter: Some("self_attn".into()),
                value: Box::new(ParamSetting::Scalar(0.1)),
            },
            ConditionalParam {
                filter: Some("mlp".into()),
                value: Box::new(ParamSetting::Gradient(vec![0.0, 1.0])),
            },
        ]);
        assert_eq!(
            evaluate(&s, "model.layers.0.self_attn.q_proj.weight", 0.5),
            Evaluated::Value(0.1)
        );
        assert_eq!(
            evaluate(&s, "model.layers.0.mlp.up_proj.weight", 0.5),
            Evaluated::Value(0.5)
        );
        assert_eq!(evaluate(&s, "model.norm.weight", 0.5), Evaluated::NoMatch);
        let mut top = ParamMap::new();
        top.insert("t".into(), ParamSetting::Scalar(0.9));
        let mut slice = ParamMap::new();
        slice.insert("t".into(), s);
        assert_eq!(
            resolve(&[&slice, &top], "t", "model.norm.weight", 0.0),
            Ok(Some(0.9))
        );
        assert_eq!(
            resolve(&[&slice, &top], "x", "model.norm.weight", 0.0),
            Ok(None)
        );
    }
}
