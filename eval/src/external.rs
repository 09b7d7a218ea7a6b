//! The external evaluator hook (lm-eval-harness, vLLM, … on another box):
//! `CMD MODEL_DIR TASK_NAME` runs through `sh -c`, its last non-empty stdout
//! line must be `{"score": x}`. A non-zero exit, a timeout, a spawn failure or
//! unreadable output marks the candidate failed; nothing here panics, and a
//! timed-out command is killed with its whole process group.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// What became of one external evaluation.
#[derive(Debug, Clone, PartialEq)]
pub enum ExternalOutcome {
    Score(f64),
    /// The candidate failed; the reason names the command and what happened.
    Failed(String),
}

impl ExternalOutcome {
    pub fn score(&self) -> Option<f64> {
        match self {
            ExternalOutcome::Score(s) => Some(*s),
            ExternalOutcome::Failed(_) => None,
        }
    }
}

/// Runs `cmd model_dir task` (cmd is a shell command line, so it may carry
/// its own arguments). `timeout`: kill and fail after this long.
pub fn run_external(
    cmd: &str,
    model_dir: &Path,
    task: &str,
    timeout: Option<Duration>,
) -> ExternalOutcome {
    let fail = |m: String| ExternalOutcome::Failed(format!("external evaluator `{cmd}`: {m}"));
    let mut child = match Command::new("sh")
        .arg("-c")
        .arg(format!("{cmd} \"$@\""))
        .arg("smelt-external")
        .arg(model_dir)
        .arg(task)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
    {
        Ok(c) => c,
        Err(e) => return fail(format!("could not start: {e}")),
    };
    let pid = child.id() as i32;
    let mut out = child.stdout.take();
    let mut errp = child.stderr.take();
    let out_t = std::thread::spawn(move || {
        let mut s = Vec::new();
        if let Some(o) = out.as_mut() {
            let _ = o.read_to_end(&mut s);
        }
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = Vec::new();
        if let Some(o) = errp.as_mut() {
            let _ = o.read_to_end(&mut s);
        }
        s
    });
    let start = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break Ok(st),
            Ok(None) => {}
            Err(e) => break Err(format!("waiting for it failed: {e}")),
        }
        if let Some(t) = timeout
            && start.elapsed() >= t
        {
            // SAFETY: signals the process group we created for the child.
            unsafe {
                libc::kill(-pid, libc::SIGKILL);
            }
            let _ = child.wait();
            break Err(format!("timed out after {:.1} s (killed)", t.as_secs_f64()));
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    // Leftover background processes of the evaluator would hold the pipes
    // open: end the whole group before reading to the end.
    // SAFETY: signals the process group we created for the child.
    unsafe {
        libc::kill(-pid, libc::SIGKILL);
    }
    let stdout = out_t.join().unwrap_or_default();
    let stderr = err_t.join().unwrap_or_default();
    let stderr = String::from_utf8_lossy(&stderr);
    let tail: String = {
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        let from = lines.len().saturating_sub(3);
        lines[from..].join(" | ")
    };
    let with_tail = |m: String| {
        if tail.is_empty() {
            fail(m)
        } else {
            fail(format!("{m}; stderr: {tail}"))
        }
    };
    let status = match status {
        Ok(s) => s,
        Err(m) => return with_tail(m),
    };
    if !status.success() {
        return with_tail(match status.code() {
            Some(c) => format!("exited with status {c}"),
            None => "killed by a signal".to_string(),
        });
    }
    let stdout = String::from_utf8_lossy(&stdout);
    let Some(last) = stdout.lines().rev().find(|l| !l.trim().is_empty()) else {
        return with_tail("printed nothing on stdout (expected a last line {\"score\": x})".into());
    };
    let v: serde_json::Value = match serde_json::from_str(last.trim()) {
        Ok(v) => v,
        Err(_) => {
            return fail(format!(
                "last stdout line is not JSON {{\"score\": x}}: {:?}",
                last.chars().take(200).collect::<String>()
            ));
        }
    };
    match v.get("score").and_then(serde_json::Value::as_f64) {
        Some(x) if x.is_finite() => ExternalOutcome::Score(x),
        _ => fail(format!(
            "last stdout line has no finite number `score`: {}",
            last.chars().take(200).collect::<String>()
        )),
    }
}
