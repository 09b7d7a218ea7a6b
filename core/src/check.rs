//! `smelt check`: everything that can be verified from headers, reported at
//! once — configuration fields, model files, tensors, shapes, parameters —
//! before a single tensor byte is read. `smelt merge` runs the same checks.

use std::path::{Path, PathBuf};

use crate::config::{MergeBody, MergeConfig, ParamMap};
use crate::error::Error;
use crate::methods;
use crate::model::{self, LoadedModel};
use crate::plan::{MergePlan, PlanOptions, plan_merge};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
}

/// One finding, naming what it is about.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Problem {
    pub severity: Severity,
    pub code: String,
    pub message: String,
    pub model: Option<String>,
    pub file: Option<String>,
    pub tensor: Option<String>,
    pub field: Option<String>,
    pub line: Option<usize>,
    pub column: Option<usize>,
}

/// What the plan will produce.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PlanSummary {
    pub method: String,
    pub architecture: String,
    pub models: Vec<String>,
    pub output_tensors: usize,
    pub output_bytes: u64,
    pub shards: usize,
    pub estimated_peak_memory_bytes: u64,
    pub output_dir: String,
    pub free_disk_bytes: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct CheckReport {
    pub ok: bool,
    pub problems: Vec<Problem>,
    pub plan: Option<PlanSummary>,
}

#[derive(Debug, Clone)]
pub struct CheckOptions {
    pub plan: PlanOptions,
    pub strict: bool,
    /// Where the output would go (for the free-disk figure).
    pub out: Option<PathBuf>,
    pub memory_budget: u64,
}

/// Everything a successful check produced (for `smelt merge`).
pub struct Checked {
    pub report: CheckReport,
    pub config: Option<MergeConfig>,
    pub models: Vec<LoadedModel>,
    pub plan: Option<MergePlan>,
}

/// Runs every check on a configuration file.
pub fn check(config_path: &Path, opts: &CheckOptions) -> Checked {
    let file = config_path.display().to_string();
    let text = match std::fs::read_to_string(config_path) {
        Ok(t) => t,
        Err(e) => {
            let problems = vec![from_error(&Error::io(config_path, e), None, &file)];
            return finish(problems, None, vec![], None, None, opts);
        }
    };
    let dir = config_path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    check_text(&text, &file, &dir, opts)
}

fn finish(
    mut problems: Vec<Problem>,
    config: Option<MergeConfig>,
    models: Vec<LoadedModel>,
    plan: Option<MergePlan>,
    summary: Option<PlanSummary>,
    opts: &CheckOptions,
) -> Checked {
    if opts.strict {
        for p in &mut problems {
            p.severity = Severity::Error;
        }
    }
    let ok = !problems.iter().any(|p| p.severity == Severity::Error);
    Checked {
        report: CheckReport {
            ok,
            problems,
            plan: summary,
        },
        config,
        models,
        plan,
    }
}

/// Runs every check on configuration text named `file` (for messages) whose
/// relative model paths resolve against `dir` (a submitted job's config).
pub fn check_text(text: &str, file: &str, dir: &Path, opts: &CheckOptions) -> Checked {
    let text = text.to_string();
    let file = file.to_string();
    let mut problems = Vec::new();
    let done = |problems: Vec<Problem>, config, models, plan, summary| {
        finish(problems, config, models, plan, summary, opts)
    };
    let cfg = match crate::parse_config(&text, &file) {
        Ok(c) => c,
        Err(e) => {
            problems.push(from_error(&e, Some(&text), &file));
            return done(problems, None, vec![], None, None);
        }
    };
    for w in &cfg.warnings {
        // "<file>: <field>: unknown key, ignored"
        let field = w
            .strip_prefix(&format!("{file}: "))
            .and_then(|r| r.split(": ").next())
            .map(str::to_string);
        let (line, column) = field.as_deref().and_then(|f| locate(&text, f)).unzip();
        problems.push(Problem {
            severity: Severity::Warning,
            code: "unknown_key".into(),
            message: w.clone(),
            model: None,
            file: Some(file.clone()),
            tensor: None,
            field,
            line,
            column,
        });
    }
    problems.extend(ignored_parameters(&cfg, &text, &file));
    let mut models = Vec::new();
    let mut failed = false;
    for r in cfg.referenced_models() {
        match model::load_model(&r, dir, opts.plan.hf_cache.as_deref()) {
            Ok(m) => models.push(m),
            Err(e) => {
                failed = true;
                let mut p = from_error(&e, Some(&text), &file);
                p.model = Some(r.to_string());
                problems.push(p);
            }
        }
    }
    if failed {
        return done(problems, Some(cfg), models, None, None);
    }
    let plan = match plan_merge(&cfg, &models, &opts.plan) {
        Ok(p) => p,
        Err(e) => {
            for e in e.flatten() {
                problems.push(from_error(&e, Some(&text), &file));
            }
            return done(problems, Some(cfg), models, None, None);
        }
    };
    for w in &plan.warnings {
        if cfg.warnings.contains(w) {
            continue;
        }
        problems.push(Problem {
            severity: Severity::Warning,
            code: if w.contains("skipping") {
                "skipped_input".into()
            } else {
                "plan_warning".into()
            },
            message: w.clone(),
            model: None,
            file: Some(file.clone()),
            tensor: w
                .split(':')
                .next()
                .filter(|t| plan.tensors.iter().any(|x| x.name == *t))
                .map(str::to_string),
            field: None,
            line: None,
            column: None,
        });
    }
    let out = opts.out.clone().unwrap_or_else(|| PathBuf::from("."));
    let probe = out
        .ancestors()
        .find(|p| !p.as_os_str().is_empty() && p.exists())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let free = crate::free_space(&probe);
    let peak = plan
        .tensors
        .iter()
        .map(|t| t.working_bytes())
        .max()
        .unwrap_or(0)
        .max(
            opts.memory_budget
                .min(plan.tensors.iter().map(|t| t.working_bytes()).sum()),
        );
    if let Some(f) = free
        && f < plan.total_bytes()
    {
        problems.push(Problem {
            severity: Severity::Error,
            code: "disk_space".into(),
            message: format!(
                "the output needs {} bytes but {} has {} free",
                plan.total_bytes(),
                probe.display(),
                f
            ),
            model: None,
            file: Some(out.display().to_string()),
            tensor: None,
            field: None,
            line: None,
            column: None,
        });
    }
    let summary = PlanSummary {
        method: plan.method.clone(),
        architecture: plan.architecture.clone(),
        models: plan
            .models
            .iter()
            .map(|m| m.reference.to_string())
            .collect(),
        output_tensors: plan.tensors.len(),
        output_bytes: plan.total_bytes(),
        shards: plan.shards.len(),
        estimated_peak_memory_bytes: peak,
        output_dir: out.display().to_string(),
        free_disk_bytes: free,
    };
    done(problems, Some(cfg), models, Some(plan), Some(summary))
}

/// Parameters the method never reads (mergekit ignores them silently).
fn ignored_parameters(cfg: &MergeConfig, text: &str, file: &str) -> Vec<Problem> {
    let Some(m) = methods::get(&cfg.merge_method) else {
        return vec![];
    };
    let mut known: Vec<&str> = m.global_params().iter().map(|p| p.name).collect();
    known.extend(m.model_params().iter().map(|p| p.name));
    let mut maps: Vec<(String, &ParamMap)> = vec![("parameters".into(), &cfg.parameters)];
    match &cfg.body {
        MergeBody::Models(ms) => {
            for (i, x) in ms.iter().enumerate() {
                maps.push((format!("models[{i}].parameters"), &x.parameters));
            }
        }
        MergeBody::Slices(ss) => {
            for (i, s) in ss.iter().enumerate() {
                maps.push((format!("slices[{i}].parameters"), &s.parameters));
                for (j, src) in s.sources.iter().enumerate() {
                    maps.push((
                        format!("slices[{i}].sources[{j}].parameters"),
                        &src.parameters,
                    ));
                }
            }
        }
    }
    let mut out = Vec::new();
    for (path, map) in maps {
        for k in map.keys() {
            if !known.contains(&k.as_str()) {
                let field = format!("{path}.{k}");
                let (line, column) = locate(text, &field).unzip();
                out.push(Problem {
                    severity: Severity::Warning,
                    code: "ignored_parameter".into(),
                    message: format!(
                        "{file}: {field}: merge method {} does not use parameter `{k}` (it takes: {})",
                        m.name(),
                        known.join(", ")
                    ),
                    model: None,
                    file: Some(file.to_string()),
                    tensor: None,
                    field: Some(field),
                    line,
                    column,
                });
            }
        }
    }
    out
}

/// Converts an engine error into a problem.
pub fn from_error(e: &Error, text: Option<&str>, config_file: &str) -> Problem {
    let mut p = Problem {
        severity: Severity::Error,
        code: e.code().to_string(),
        message: e.to_string(),
        model: None,
        file: None,
        tensor: None,
        field: None,
        line: None,
        column: None,
    };
    match e {
        Error::Config { file, field, .. } => {
            p.file = Some(file.clone());
            p.field = Some(field.clone());
            if let Some(t) = text
                && let Some((l, c)) = locate(t, field)
            {
                p.line = Some(l);
                p.column = Some(c);
            }
        }
        Error::Format { file, msg } => {
            p.file = Some(file.clone());
            if let Some((l, c)) = line_col_in(msg) {
                p.line = Some(l);
                p.column = Some(c);
            }
            if let Some(t) = msg
                .strip_prefix("tensor ")
                .and_then(|r| r.split(':').next())
            {
                p.tensor = Some(t.to_string());
            }
        }
        Error::Tensor { tensor, msg } => {
            p.tensor = Some(tensor.clone());
            p.file = Some(config_file.to_string());
            if let Some(m) = msg.split("model ").nth(1) {
                p.model = Some(m.split([' ', ')']).next().unwrap_or(m).to_string());
            }
        }
        Error::Io { path, .. } => p.file = Some(path.display().to_string()),
        Error::Msg(m) => {
            p.file = Some(config_file.to_string());
            if let Some(x) = m.split("model ").nth(1) {
                p.model = Some(
                    x.split([' ', ')', ':', ';'])
                        .next()
                        .unwrap_or(x)
                        .to_string(),
                );
            }
            if let Some(x) = m.split("tensor ").nth(1) {
                p.tensor = Some(x.split([' ', ')']).next().unwrap_or(x).to_string());
            }
        }
        Error::Many(_) => {}
    }
    p
}

/// Finds "line N column M" in a parser message.
fn line_col_in(msg: &str) -> Option<(usize, usize)> {
    let i = msg.find("line ")?;
    let rest = &msg[i + 5..];
    let line: usize = rest
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()?;
    let col = rest
        .find("column ")
        .and_then(|j| {
            rest[j + 7..]
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(1);
    Some((line, col))
}

/// Locates a field path (`models[1].parameters.weight`) in block- or
/// flow-style YAML text: 1-based (line, column) of the key, or of the list
/// item for an index. Best effort: `None` when it cannot tell.
pub fn locate(text: &str, path: &str) -> Option<(usize, usize)> {
    let lines: Vec<&str> = text.lines().collect();
    let mut parts: Vec<(String, Option<usize>)> = Vec::new();
    for seg in path.split('.') {
        let (key, idx) = match seg.find('[') {
            Some(b) => (
                seg[..b].to_string(),
                seg[b + 1..].trim_end_matches(']').parse().ok(),
            ),
            None => (seg.to_string(), None),
        };
        parts.push((key, idx));
    }
    let indent = |l: &str| l.len() - l.trim_start().len();
    let (mut from, mut min_indent, mut found) = (0usize, 0usize, None);
    let mut first = true;
    let mut inline: Option<(usize, usize)> = None;
    for (key, idx) in parts {
        // inside a flow mapping on the previous key's line
        if let Some((n, after)) = inline {
            let l = lines[n];
            let p = l[after..].find(&format!("{key}:"))? + after;
            return Some((n + 1, p + 1));
        }
        // find `key:` at indentation ≥ min_indent (allowing a `- ` prefix)
        let mut hit = None;
        for (n, l) in lines.iter().enumerate().skip(from) {
            let t = l.trim_start();
            if t.is_empty() || t.starts_with('#') {
                continue;
            }
            if !first && n > from && indent(l) < min_indent && !t.starts_with("- ") {
                break;
            }
            let body = t.trim_start_matches("- ");
            let col = indent(l) + (t.len() - body.len());
            if body.starts_with(&format!("{key}:")) {
                hit = Some((n, col));
                break;
            }
            if let Some(p) = l.find(&format!("{key}:"))
                && (l[..p].ends_with('{') || l[..p].ends_with(' ') || l[..p].ends_with(','))
                && l[..p].contains('{')
            {
                return Some((n + 1, p + 1));
            }
        }
        let (n, col) = hit?;
        found = Some((n + 1, col + 1));
        let after = col + key.len() + 1;
        if lines[n]
            .get(after..)
            .is_some_and(|r| r.trim_start().starts_with('{'))
        {
            inline = Some((n, after));
        }
        from = n + 1;
        min_indent = col + 1;
        first = false;
        if let Some(i) = idx {
            // the i-th `- ` item below the key
            let mut count = 0usize;
            let mut item_indent = None;
            let mut item = None;
            for (m, l) in lines.iter().enumerate().skip(from) {
                let t = l.trim_start();
                if t.is_empty() || t.starts_with('#') {
                    continue;
                }
                if indent(l) < col || (indent(l) == col && !t.starts_with("- ")) {
                    break;
                }
                if t.starts_with("- ") && item_indent.is_none_or(|ii| ii == indent(l)) {
                    item_indent = Some(indent(l));
                    if count == i {
                        item = Some((m, indent(l)));
                        break;
                    }
                    count += 1;
                }
            }
            let (m, ind) = item?;
            found = Some((m + 1, ind + 1));
            from = m;
            min_indent = ind + 1;
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::locate;

    #[test]
    fn locates_fields() {
        let y = "models:\n  - model: a\n    parameters:\n      weight: 1\n  - model: b\n    parameters:\n      weight: x\nmerge_method: linear\ndtype: float8\n";
        assert_eq!(locate(y, "dtype"), Some((9, 1)));
        assert_eq!(locate(y, "models[1].parameters.weight"), Some((7, 7)));
        assert_eq!(locate(y, "models[0].parameters.weight"), Some((4, 7)));
        assert_eq!(locate(y, "models[1]"), Some((5, 3)));
        let f =
            "models:\n  - model: a\n    parameters: {weight: 1, densty: 2}\nmerge_method: ties\n";
        assert_eq!(locate(f, "models[0].parameters.densty"), Some((3, 29)));
    }
}
