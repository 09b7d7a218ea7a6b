//! Evaluating parameter settings for one tensor (spec §1.3): gradients,
//! filters, and the precedence chain source → slice → module → top level →
//! method default.

use crate::config::{ParamMap, ParamSetting, Scalar};

/// The type a method declares for a parameter; values are checked against
/// it as mergekit 0.1.5 does (pydantic's lax mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ParamKind {
    /// Numbers, numeric strings, true/false (1/0). Gradients interpolate.
    #[default]
    Float,
    /// Whole numbers (`5`, `5.0`, `"5"`). Gradients interpolate, and the
    /// result must be whole.
    Int,
    /// true/false, 0/1, and the words yes/no, on/off, t/f, y/n, "1"/"0".
    /// Gradients pick an entry (`values[int(t·(n−1))]`) instead of
    /// interpolating.
    Bool,
}

/// Outcome of evaluating one setting for a tensor name and position `t`.
#[derive(Debug, Clone, PartialEq)]
pub enum Evaluated {
    Value(f64),
    /// No filter matched (or an empty list): fall through to the next
    /// precedence level.
    NoMatch,
    /// The value does not fit the parameter's type.
    Invalid(String),
}

/// A number written as a string (`"0.5"`, `" 1e-2"`), as pydantic reads it.
pub fn str_number(s: &str) -> Option<f64> {
    s.trim().parse::<f64>().ok().filter(|v| v.is_finite())
}

/// A boolean written as a string, as pydantic reads it.
pub fn str_bool(s: &str) -> Option<bool> {
    match s.trim().to_ascii_lowercase().as_str() {
        "1" | "on" | "t" | "true" | "y" | "yes" => Some(true),
        "0" | "off" | "f" | "false" | "n" | "no" => Some(false),
        _ => None,
    }
}

/// Checks one value against `kind`; booleans come back as 1.0 / 0.0.
pub fn validate(v: &Scalar, kind: ParamKind) -> Result<f64, String> {
    let num = |v: &Scalar| -> Result<f64, String> {
        match v {
            Scalar::Num(x) => Ok(*x),
            Scalar::Bool(b) => Ok(*b as u8 as f64),
            Scalar::Str(s) => str_number(s).ok_or_else(|| format!("{s:?} is not a number")),
        }
    };
    match kind {
        ParamKind::Float => num(v),
        ParamKind::Int => {
            let x = num(v)?;
            if x.fract() == 0.0 {
                Ok(x)
            } else {
                Err(format!("{x} is not a whole number"))
            }
        }
        ParamKind::Bool => match v {
            Scalar::Bool(b) => Ok(*b as u8 as f64),
            Scalar::Num(x) if *x == 0.0 || *x == 1.0 => Ok(*x),
            Scalar::Num(x) => Err(format!("{x} is not a boolean (true/false, 1/0)")),
            Scalar::Str(s) => str_bool(s)
                .map(|b| b as u8 as f64)
                .ok_or_else(|| format!("{s:?} is not a boolean (true/false, 1/0)")),
        },
    }
}

/// Evaluates `setting` for `tensor_name` at interpolation position `t`
/// (mergekit 0.1.5's `evaluate_setting`).
pub fn evaluate(setting: &ParamSetting, kind: ParamKind, tensor_name: &str, t: f64) -> Evaluated {
    let checked = |r: Result<f64, String>| match r {
        Ok(v) => Evaluated::Value(v),
        Err(e) => Evaluated::Invalid(e),
    };
    match setting {
        ParamSetting::Scalar(v) => checked(validate(v, kind)),
        ParamSetting::Gradient(g) if g.is_empty() => Evaluated::NoMatch,
        ParamSetting::Gradient(g) => {
            let values = match g
                .iter()
                .map(|v| validate(v, kind))
                .collect::<Result<Vec<_>, _>>()
            {
                Ok(v) => v,
                Err(e) => return Evaluated::Invalid(e),
            };
            if kind == ParamKind::Bool {
                let i = ((t * (values.len() - 1) as f64) as usize).min(values.len() - 1);
                return Evaluated::Value(values[i]);
            }
            checked(validate(&Scalar::Num(interpolate(&values, t)), kind))
        }
        ParamSetting::Conditional(entries) => {
            for e in entries {
                let matches = match e.filter.as_deref() {
                    None | Some("*") => true,
                    Some(f) => !tensor_name.is_empty() && tensor_name.contains(f),
                };
                if matches {
                    return evaluate(&e.value, kind, tensor_name, t);
                }
            }
            Evaluated::NoMatch
        }
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
    kind: ParamKind,
    tensor_name: &str,
    t: f64,
) -> Result<Option<f64>, String> {
    for level in levels {
        if let Some(s) = level.get(name) {
            match evaluate(s, kind, tensor_name, t) {
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

    const F: ParamKind = ParamKind::Float;

    fn num(v: f64) -> ParamSetting {
        ParamSetting::Scalar(Scalar::Num(v))
    }

    #[test]
    fn filters_first_match_and_fallthrough() {
        let s = ParamSetting::Conditional(vec![
            ConditionalParam {
                filter: Some("self_attn".into()),
                value: Box::new(num(0.1)),
            },
            ConditionalParam {
                filter: Some("mlp".into()),
                value: Box::new(ParamSetting::Gradient(vec![0.0.into(), 1.0.into()])),
            },
        ]);
        assert_eq!(
            evaluate(&s, F, "model.layers.0.self_attn.q_proj.weight", 0.5),
            Evaluated::Value(0.1)
        );
        assert_eq!(
            evaluate(&s, F, "model.layers.0.mlp.up_proj.weight", 0.5),
            Evaluated::Value(0.5)
        );
        assert_eq!(
            evaluate(&s, F, "model.norm.weight", 0.5),
            Evaluated::NoMatch
        );
        let mut top = ParamMap::new();
        top.insert("t".into(), num(0.9));
        let mut slice = ParamMap::new();
        slice.insert("t".into(), s);
        assert_eq!(
            resolve(&[&slice, &top], "t", F, "model.norm.weight", 0.0),
            Ok(Some(0.9))
        );
        assert_eq!(
            resolve(&[&slice, &top], "x", F, "model.norm.weight", 0.0),
            Ok(None)
        );
    }

    /// mergekit 0.1.5 (`config.evaluate_setting` with pydantic validation):
    /// boolean gradients pick `values[int(t·(n−1))]`, strings are read by
    /// the parameter's type, an empty list falls through, integers must be
    /// whole.
    #[test]
    fn values_are_checked_against_the_parameter_type() {
        let b = ParamKind::Bool;
        let g = ParamSetting::Gradient(vec![
            Scalar::Bool(true),
            Scalar::Num(0.0),
            Scalar::Str("yes".into()),
        ]);
        // t = 0.6: index int(1.2) = 1 → false (interpolating would give 0.8)
        assert_eq!(evaluate(&g, b, "x", 0.6), Evaluated::Value(0.0));
        assert_eq!(evaluate(&g, b, "x", 0.99), Evaluated::Value(0.0));
        assert_eq!(evaluate(&g, b, "x", 1.0), Evaluated::Value(1.0));
        assert_eq!(evaluate(&g, b, "x", 0.0), Evaluated::Value(1.0));
        for bad in [Scalar::Num(2.0), Scalar::Num(0.5), Scalar::Str("2".into())] {
            assert!(matches!(
                evaluate(&ParamSetting::Scalar(bad), b, "x", 0.0),
                Evaluated::Invalid(_)
            ));
        }
        let s = |x: &str| ParamSetting::Scalar(Scalar::Str(x.into()));
        assert_eq!(evaluate(&s("false"), b, "x", 0.0), Evaluated::Value(0.0));
        assert_eq!(evaluate(&s("On"), b, "x", 0.0), Evaluated::Value(1.0));
        assert_eq!(evaluate(&s(" 0.5"), F, "x", 0.0), Evaluated::Value(0.5));
        assert_eq!(evaluate(&s("1e-2"), F, "x", 0.0), Evaluated::Value(0.01));
        assert!(matches!(
            evaluate(&s("false"), F, "x", 0.0),
            Evaluated::Invalid(_)
        ));
        assert_eq!(
            evaluate(&ParamSetting::Scalar(Scalar::Bool(true)), F, "x", 0.0),
            Evaluated::Value(1.0)
        );
        // numeric gradients interpolate, strings included
        let g = ParamSetting::Gradient(vec![Scalar::Str("0".into()), 1.0.into()]);
        assert_eq!(evaluate(&g, F, "x", 0.25), Evaluated::Value(0.25));
        let i = ParamKind::Int;
        assert_eq!(evaluate(&s("5.0"), i, "x", 0.0), Evaluated::Value(5.0));
        assert!(matches!(
            evaluate(&num(5.5), i, "x", 0.0),
            Evaluated::Invalid(_)
        ));
        let g = ParamSetting::Gradient(vec![4.0.into(), 5.0.into()]);
        assert!(matches!(evaluate(&g, i, "x", 0.5), Evaluated::Invalid(_)));
        assert_eq!(evaluate(&g, i, "x", 1.0), Evaluated::Value(5.0));
        // an empty list is "not set here"
        let mut top = ParamMap::new();
        top.insert("t".into(), num(0.3));
        let mut slice = ParamMap::new();
        slice.insert("t".into(), ParamSetting::Gradient(vec![]));
        assert_eq!(resolve(&[&slice, &top], "t", F, "x", 0.0), Ok(Some(0.3)));
        // ... also as the value of the first matching filter
        slice.insert(
            "t".into(),
            ParamSetting::Conditional(vec![
                ConditionalParam {
                    filter: Some("x".into()),
                    value: Box::new(ParamSetting::Gradient(vec![])),
                },
                ConditionalParam {
                    filter: None,
                    value: Box::new(num(0.9)),
                },
            ]),
        );
        assert_eq!(resolve(&[&slice, &top], "t", F, "x", 0.0), Ok(Some(0.3)));
    }
}
