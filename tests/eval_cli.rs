//! `smelt eval` through the real binary: per-token log-probabilities against
//! transformers' reference numbers (tests/eval, copied from the shared
//! conformance set), task scores with hand-checkable expectations, and the
//! external-evaluator hook with small shell scripts.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Output;

use serde_json::Value;

fn eval_dir() -> PathBuf {
    common::repo().join("tests/eval")
}

fn run(args: &[&str]) -> Output {
    common::smelt()
        .arg("eval")
        .args(args)
        .output()
        .expect("smelt runs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "smelt eval failed ({}):\nstdout: {}\nstderr: {}",
        o.status,
        stdout(o),
        stderr(o)
    );
    stdout(o)
}

fn rows(text: &str) -> HashMap<String, Value> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}"));
            (v["id"].as_str().expect("string id").to_string(), v)
        })
        .collect()
}

/// Compares with the expected file in Rust (same rules as compare_logprobs.py)
/// and returns the worst absolute difference.
fn check_against(expected: &Path, actual: &str, tol: f64) -> f64 {
    let exp = rows(&std::fs::read_to_string(expected).expect("expected file"));
    let act = rows(actual);
    assert!(!exp.is_empty());
    let mut worst = 0f64;
    for (id, e) in &exp {
        let a = act
            .get(id)
            .unwrap_or_else(|| panic!("id {id} missing from output"));
        assert_eq!(a["tokens"], e["tokens"], "id {id}: tokens differ");
        let el = e["logprobs"].as_array().unwrap();
        let al = a["logprobs"].as_array().unwrap();
        assert_eq!(el.len(), al.len(), "id {id}: number of logprobs");
        for (i, (x, y)) in el.iter().zip(al).enumerate() {
            let d = (x.as_f64().unwrap() - y.as_f64().unwrap()).abs();
            assert!(
                d <= tol,
                "id {id} position {i}: expected {x}, got {y} (|diff| {d:.2e} > {tol})"
            );
            worst = worst.max(d);
        }
    }
    worst
}

#[test]
fn logprobs_match_transformers_for_public_models() {
    for name in ["eval_llama", "eval_qwen2"] {
        let model = eval_dir().join("models").join(name);
        let input = eval_dir().join("inputs.jsonl");
        let o = run(&["logprobs", model.to_str().unwrap(), input.to_str().unwrap()]);
        let out = ok(&o);
        let expected = eval_dir().join("expected").join(format!("{name}.jsonl"));
        let worst = check_against(&expected, &out, 1e-4);
        eprintln!("{name}: max |diff| {worst:.2e}");
        // The shared checker agrees (when python3 is there; scripts/test.sh installs it).
        let tmp = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(tmp.path(), &out).unwrap();
        let c = std::process::Command::new("python3")
            .arg(eval_dir().join("compare_logprobs.py"))
            .arg(&expected)
            .arg(tmp.path())
            .output()
            .expect("python3 (installed by scripts/test.sh) runs compare_logprobs.py");
        let last = stdout(&c).lines().last().unwrap_or("").to_string();
        assert!(
            last.starts_with("PASS"),
            "{name}: compare_logprobs.py: {}{}",
            stdout(&c),
            stderr(&c)
        );
    }
}

#[test]
fn logprobs_are_independent_of_batching() {
    let model = eval_dir().join("models/eval_llama");
    let input = eval_dir().join("inputs.jsonl");
    let all = ok(&run(&[
        "logprobs",
        model.to_str().unwrap(),
        input.to_str().unwrap(),
    ]));
    // One sequence per forward pass vs everything in one padded batch.
    let single = ok(&run(&[
        "logprobs",
        model.to_str().unwrap(),
        input.to_str().unwrap(),
        "--batch-tokens",
        "1",
    ]));
    let (a, b) = (rows(&all), rows(&single));
    assert_eq!(a.len(), 15);
    for (id, r) in &a {
        let x = r["logprobs"].as_array().unwrap();
        let y = b[id]["logprobs"].as_array().unwrap();
        for (p, q) in x.iter().zip(y) {
            assert!(
                (p.as_f64().unwrap() - q.as_f64().unwrap()).abs() < 1e-5,
                "{id}"
            );
        }
    }
}

#[test]
fn logprobs_bad_inputs_are_clear_errors() {
    let model = eval_dir().join("models/eval_llama");
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"id\": \"a\", \"tokens\": [1, 2]}\n{\"id\": \"b\", \"tokens\": [1, 999]}\n",
    )
    .unwrap();
    let o = run(&["logprobs", model.to_str().unwrap(), bad.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(stdout(&o).is_empty(), "no partial output: {}", stdout(&o));
    assert!(
        stderr(&o).contains("999") && stderr(&o).contains("vocab"),
        "{}",
        stderr(&o)
    );
    std::fs::write(&bad, "{\"id\": \"a\", \"tokens\": [1, 2]}\nnot json\n").unwrap();
    let o = run(&["logprobs", model.to_str().unwrap(), bad.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("bad.jsonl:2"), "{}", stderr(&o));
    std::fs::write(&bad, "{\"id\": \"a\", \"tokens\": [1, 2]}\n").unwrap();
    let o = run(&[
        "logprobs",
        tmp.path().join("nope").to_str().unwrap(),
        bad.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("nope"), "{}", stderr(&o));
}

#[test]
fn text_score_is_the_mean_of_logprobs() {
    let model = eval_dir().join("models/eval_qwen2");
    let tmp = tempfile::tempdir().unwrap();
    let texts = [
        "the quick brown fox jumps over the lazy dog",
        "a",
        "numbers 12345 and symbols",
        "repeat repeat repeat",
    ];
    let task = tmp.path().join("text.jsonl");
    let inputs = tmp.path().join("in.jsonl");
    let mut t = String::new();
    let mut i = String::new();
    for (k, x) in texts.iter().enumerate() {
        t.push_str(&format!("{}\n", serde_json::json!({ "text": x })));
        i.push_str(&format!(
            "{}\n",
            serde_json::json!({ "id": k.to_string(), "text": x })
        ));
    }
    std::fs::write(&task, t).unwrap();
    std::fs::write(&inputs, i).unwrap();
    let lp = rows(&ok(&run(&[
        "logprobs",
        model.to_str().unwrap(),
        inputs.to_str().unwrap(),
    ])));
    let all: Vec<f64> = (0..texts.len())
        .flat_map(|k| {
            lp[&k.to_string()]["logprobs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect::<Vec<_>>()
        })
        .collect();
    let mean = all.iter().sum::<f64>() / all.len() as f64;
    let s: Value = serde_json::from_str(
        ok(&run(&[
            "score",
            model.to_str().unwrap(),
            task.to_str().unwrap(),
        ]))
        .trim(),
    )
    .unwrap();
    assert_eq!(s["tokens"].as_u64().unwrap() as usize, all.len());
    assert!(
        (s["mean_logprob"].as_f64().unwrap() - mean).abs() < 1e-5,
        "{s} vs {mean}"
    );
    assert!((s["perplexity"].as_f64().unwrap() - (-mean).exp()).abs() < 1e-3 * (-mean).exp());
}

/// Log-likelihood of `cont` after `ctx` from the logprobs command (token ids).
fn loglik(model: &Path, ctx: &[u32], cont: &[u32], tmp: &Path) -> f64 {
    let f = tmp.join("ll.jsonl");
    let mut toks = ctx.to_vec();
    toks.extend_from_slice(cont);
    std::fs::write(
        &f,
        format!("{}\n", serde_json::json!({"id": "x", "tokens": toks})),
    )
    .unwrap();
    let r = rows(&ok(&run(&[
        "logprobs",
        model.to_str().unwrap(),
        f.to_str().unwrap(),
    ])));
    let lp = r["x"]["logprobs"].as_array().unwrap();
    lp[lp.len() - cont.len()..]
        .iter()
        .map(|x| x.as_f64().unwrap())
        .sum()
}

#[test]
fn multiple_choice_accuracy_follows_loglikelihoods() {
    // eval_llama's tokenizer: whitespace pre-tokenizer, BPE over characters
    // (see tests/eval/expected: "a" → 67). Single-character choices keep the
    // continuation one token; the model's own preferences decide the
    // expected answers, computed here from `logprobs`.
    let model = eval_dir().join("models/eval_llama");
    let tmp = tempfile::tempdir().unwrap();
    // ids from the expected file: text2 "a" → [67]
    let ctx_text = "a";
    let ctx_ids = [67u32];
    let choices = [" b", " c", " d", " e"];
    // Token ids of the choices, from the tokenizer via logprobs' `tokens`.
    let inp = tmp.path().join("t.jsonl");
    let mut lines = String::new();
    for c in &choices {
        lines.push_str(&format!(
            "{}\n",
            serde_json::json!({"id": c, "text": format!("{ctx_text}{c}")})
        ));
    }
    std::fs::write(&inp, lines).unwrap();
    let toks = rows(&ok(&run(&[
        "logprobs",
        model.to_str().unwrap(),
        inp.to_str().unwrap(),
    ])));
    let mut lls = Vec::new();
    for c in &choices {
        let t: Vec<u32> = toks[*c]["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        // The whitespace pre-tokenizer keeps "a" and the choice apart.
        assert_eq!(t[0], ctx_ids[0], "context token");
        lls.push(loglik(&model, &ctx_ids, &t[1..], tmp.path()));
    }
    let best = (0..lls.len()).fold(0, |b, i| if lls[i] > lls[b] { i } else { b });
    let worst = (0..lls.len()).fold(0, |b, i| if lls[i] < lls[b] { i } else { b });
    assert_ne!(best, worst);
    let task = tmp.path().join("mc.jsonl");
    // Two items answered by the best choice, one by the worst: acc = 2/3.
    let item = |ans: usize| {
        serde_json::json!({"context": ctx_text, "choices": choices, "answer": ans}).to_string()
    };
    std::fs::write(
        &task,
        format!("{}\n{}\n{}\n", item(best), item(best), item(worst)),
    )
    .unwrap();
    let s: Value = serde_json::from_str(
        ok(&run(&[
            "score",
            model.to_str().unwrap(),
            task.to_str().unwrap(),
        ]))
        .trim(),
    )
    .unwrap();
    assert!(
        (s["acc"].as_f64().unwrap() - 2.0 / 3.0).abs() < 1e-12,
        "{s} lls {lls:?}"
    );
    // All choices are two bytes long: acc_norm ranks the same way.
    assert!(
        (s["acc_norm"].as_f64().unwrap() - 2.0 / 3.0).abs() < 1e-12,
        "{s}"
    );
    assert_eq!(s["examples"].as_u64(), Some(3));
}

#[test]
fn exact_match_uses_greedy_continuations() {
    let model = eval_dir().join("models/eval_llama");
    let tmp = tempfile::tempdir().unwrap();
    // What does the model continue "the quick" with? Ask `generate`, then
    // build a task whose first answer is that continuation and whose second
    // is something else: exact_match = 1/2.
    let g = ok(&run(&[
        "generate",
        model.to_str().unwrap(),
        "the quick",
        "--max-new-tokens",
        "3",
    ]));
    let cont = g
        .trim_end_matches('\n')
        .strip_prefix("the quick")
        .expect("echoes the prompt")
        .to_string();
    let first_line = cont.split('\n').next().unwrap().to_string();
    let task = tmp.path().join("gen.jsonl");
    let l1 = serde_json::json!({"prompt": "the quick", "answer": format!("  {}  ", first_line.trim()), "max_new_tokens": 3});
    let l2 = serde_json::json!({"prompt": "the quick", "answer": "definitely not this", "max_new_tokens": 3});
    std::fs::write(&task, format!("{l1}\n{l2}\n")).unwrap();
    let s: Value = serde_json::from_str(
        ok(&run(&[
            "score",
            model.to_str().unwrap(),
            task.to_str().unwrap(),
        ]))
        .trim(),
    )
    .unwrap();
    assert_eq!(
        s["exact_match"].as_f64(),
        Some(0.5),
        "{s}; continuation {cont:?}"
    );
}

#[test]
fn mixed_task_kinds_are_rejected_with_the_line() {
    let model = eval_dir().join("models/eval_llama");
    let tmp = tempfile::tempdir().unwrap();
    let task = tmp.path().join("mixed.jsonl");
    std::fs::write(
        &task,
        "{\"text\": \"a b\"}\n{\"prompt\": \"a\", \"answer\": \"b\", \"max_new_tokens\": 2}\n",
    )
    .unwrap();
    let o = run(&["score", model.to_str().unwrap(), task.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("mixed.jsonl:2"), "{}", stderr(&o));
    assert!(stdout(&o).is_empty());
}

fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join(name);
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

#[test]
fn external_command_scores_and_failures() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    // Echoes its arguments in the score so the test sees them passed on.
    let good = script(
        d,
        "good.sh",
        "echo \"loading $1\"; echo 'noise {\"score\": 0}' ; [ \"$2\" = mytask ] && echo '{\"score\": 0.625}'",
    );
    let o = run(&[
        "score",
        "/some/model",
        "mytask",
        "--external-cmd",
        good.to_str().unwrap(),
    ]);
    let v: Value = serde_json::from_str(ok(&o).trim()).unwrap();
    assert_eq!(v["score"].as_f64(), Some(0.625));

    let failing = script(
        d,
        "fail.sh",
        "echo '{\"score\": 1}'; echo 'CUDA out of memory' >&2; exit 3",
    );
    let o = run(&[
        "score",
        "/m",
        "t",
        "--external-cmd",
        failing.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stdout(&o).is_empty());
    let e = stderr(&o);
    assert!(
        e.contains("candidate failed")
            && e.contains("status 3")
            && e.contains("CUDA out of memory"),
        "{e}"
    );

    let slow = script(d, "slow.sh", "sleep 30; echo '{\"score\": 1}'");
    let t = std::time::Instant::now();
    let o = run(&[
        "score",
        "/m",
        "t",
        "--external-cmd",
        slow.to_str().unwrap(),
        "--timeout",
        "0.5",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        t.elapsed().as_secs_f64() < 10.0,
        "killed promptly, not after the sleep"
    );
    assert!(stderr(&o).contains("timed out"), "{}", stderr(&o));

    let garbage = script(d, "garbage.sh", "echo 'score: high'");
    let o = run(&[
        "score",
        "/m",
        "t",
        "--external-cmd",
        garbage.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("not JSON"), "{}", stderr(&o));

    let nan = script(d, "nan.sh", "echo '{\"score\": \"NaN\"}'");
    let o = run(&["score", "/m", "t", "--external-cmd", nan.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));

    // A command line with its own arguments.
    let args = script(
        d,
        "args.sh",
        "[ \"$1\" = --flag ] && [ \"$3\" = task2 ] && echo '{\"score\": 2}'",
    );
    let cmd = format!("{} --flag", args.display());
    let v: Value =
        serde_json::from_str(ok(&run(&["score", "/m", "task2", "--external-cmd", &cmd])).trim())
            .unwrap();
    assert_eq!(v["score"].as_f64(), Some(2.0));

    let o = run(&[
        "score",
        "/m",
        "t",
        "--external-cmd",
        d.join("missing.sh").to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("candidate failed"), "{}", stderr(&o));
}

/// `smelt eval score MODEL TASK` → the metric `key`.
fn score_metric(model: &Path, task: &Path, key: &str) -> f64 {
    let m = model.display().to_string();
    let t = task.display().to_string();
    let v: Value =
        serde_json::from_str(ok(&run(&["score", &m, &t])).trim()).expect("one JSON object");
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("no {key} in {v} for {m} on {t}"))
}

/// The committed fixture models, scored by the engine (not the fixtures'
/// own scorer): each skill fine-tune is good at its skill and bad at the
/// other's.
#[test]
fn fixture_skill_models_score_as_documented() {
    let fx = common::repo().join("fixtures");
    let task = |n: &str| fx.join(format!("tasks/{n}_heldout.jsonl"));
    let model = |n: &str| fx.join(format!("models/{n}"));
    for (own, other) in [("reverse", "sort"), ("sort", "reverse")] {
        let good = score_metric(&model(own), &task(own), "exact_match");
        let bad = score_metric(&model(other), &task(own), "exact_match");
        assert!(good >= 0.9, "{own} on its own skill: {good}");
        assert!(bad <= 0.3, "{other} on {own}: {bad}");
    }
}

/// A linear ½/½ `smelt merge` of the two language fine-tunes beats both
/// parents on the combined held-out mean log-probability.
#[test]
fn half_half_merge_of_fixture_languages_beats_both_parents() {
    let fx = common::repo().join("fixtures");
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("merge.yml");
    std::fs::write(
        &cfg,
        format!(
            "models:\n  - model: {a}\n    parameters: {{weight: 0.5}}\n  - model: {b}\n    parameters: {{weight: 0.5}}\nmerge_method: linear\ndtype: float32\n",
            a = fx.join("models/lang_a").display(),
            b = fx.join("models/lang_b").display()
        ),
    )
    .unwrap();
    let merged = tmp.path().join("merged");
    common::assert_ok(&common::merge(tmp.path(), &cfg, &merged, &[]));
    let combined = |m: &Path| {
        ["lang_a", "lang_b"]
            .iter()
            .map(|l| {
                score_metric(
                    m,
                    &fx.join(format!("tasks/{l}_heldout.jsonl")),
                    "mean_logprob",
                )
            })
            .sum::<f64>()
            / 2.0
    };
    let (a, b, m) = (
        combined(&fx.join("models/lang_a")),
        combined(&fx.join("models/lang_b")),
        combined(&merged),
    );
    assert!(m > a && m > b, "merge {m} vs parents {a} / {b}");
}

/// `smelt eval bench --compare-transformers PY` runs the embedded script
/// with PY and reports the ratio; here PY is a stand-in that reports a
/// fixed throughput, so the ratio is checked exactly. A PY that fails gives
/// a clear error.
#[test]
fn eval_bench_compares_with_the_given_python() {
    let tmp = tempfile::tempdir().unwrap();
    let fake = tmp.path().join("fake-python");
    std::fs::write(
        &fake,
        "#!/bin/sh\n# $1 is the script; check it is the transformers benchmark\ngrep -q AutoModelForCausalLM \"$1\" || exit 3\necho '{\"engine\": \"transformers\", \"tokens_per_s\": 100.0}'\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let model = common::repo().join("fixtures/models/sort");
    let m = model.display().to_string();
    let f = fake.display().to_string();
    let args = [
        "bench",
        &m,
        "--sequences",
        "2",
        "--seq-len",
        "16",
        "--repeat",
        "1",
    ];
    let mut with = args.to_vec();
    with.extend(["--compare-transformers", &f]);
    let v: Value = serde_json::from_str(ok(&run(&with)).trim()).unwrap();
    let tps = v["tokens_per_s"].as_f64().unwrap();
    assert!(tps > 0.0);
    assert_eq!(v["transformers"]["tokens_per_s"], 100.0);
    let ratio = v["ratio_vs_transformers"].as_f64().unwrap();
    assert!((ratio - tps / 100.0).abs() < 1e-9, "{v}");

    let kernels = v["kernels"].as_str().unwrap();
    assert!(kernels == "packed-avx512" || kernels == "candle", "{v}");

    // --rounds alternates the engines and keeps each one's best run.
    let counted = tmp.path().join("counted-python");
    let calls = tmp.path().join("calls");
    std::fs::write(
        &counted,
        format!(
            "#!/bin/sh\necho x >> {c}\nn=$(wc -l < {c})\ncase $n in 2) echo '{{\"best_s\": 1.0, \"tokens_per_s\": 100.0}}';; *) echo '{{\"best_s\": 2.0, \"tokens_per_s\": 50.0}}';; esac\n",
            c = calls.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&counted, std::fs::Permissions::from_mode(0o755)).unwrap();
    let cp = counted.display().to_string();
    let mut rounds = args.to_vec();
    rounds.extend(["--compare-transformers", &cp, "--rounds", "3"]);
    let v: Value = serde_json::from_str(ok(&run(&rounds)).trim()).unwrap();
    assert_eq!(std::fs::read_to_string(&calls).unwrap().lines().count(), 3);
    assert_eq!(v["rounds"], 3);
    assert_eq!(v["transformers"]["tokens_per_s"], 100.0, "{v}");

    let mut bad = args.to_vec();
    bad.extend(["--compare-transformers", "/bin/false"]);
    let o = run(&bad);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("torch and transformers"),
        "{}",
        stderr(&o)
    );
}
