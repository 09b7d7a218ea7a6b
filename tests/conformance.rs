//! mergekit 0.1.5 conformance: every case under tests/conformance/cases is
//! merged with the real `smelt` binary and compared with mergekit's output
//! by compare.py (tolerances in tests/conformance/README.md).

mod common;

use std::process::Command;

#[test]
fn public_conformance_cases() {
    let cases_dir = common::repo().join("tests/conformance/cases");
    let compare = common::repo().join("tests/conformance/compare.py");
    let mut cases: Vec<_> = std::fs::read_dir(&cases_dir)
        .expect("cases dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.join("config.yml").exists())
        .collect();
    cases.sort();
    assert!(
        cases.len() >= 90,
        "expected the 12 public cases, the 55 of session 12 and the 23 of session 13, found {}",
        cases.len()
    );
    let tmp = tempfile::tempdir().expect("tmp");
    let mut failures = Vec::new();
    for case in &cases {
        let name = case.file_name().unwrap().to_string_lossy().to_string();
        let out = tmp.path().join(&name);
        let o = common::merge(case, std::path::Path::new("config.yml"), &out, &[]);
        if !o.status.success() {
            failures.push(format!("{name}: merge failed: {}", common::stderr(&o)));
            continue;
        }
        let kind = std::fs::read_to_string(case.join("kind.txt")).expect("kind.txt");
        let c = Command::new("python3")
            .arg(&compare)
            .arg(case.join("expected"))
            .arg(&out)
            .arg(kind.trim())
            .arg("--name")
            .arg(&name)
            .output()
            .expect("python3 runs compare.py (python3 is required for the conformance test)");
        let text = String::from_utf8_lossy(&c.stdout).to_string();
        let last = text.lines().last().unwrap_or("").to_string();
        if !c.status.success() || !last.starts_with("PASS") {
            failures.push(format!("{name}: {last}\n{text}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}
