//! `smelt merge` with model paths and the output on S3 (s3s-fs on a free
//! loopback port), credentials and endpoint from the standard environment
//! variables: identical to a local `smelt merge`, also through a proxy that
//! fails 5 % of requests.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use common::{assert_ok, dir_bytes, smelt, stderr};
use smelt_core::DType;
use smelt_core::synth::{LlamaSpec, write_family};
use smelt_store::object_store::ObjectStore;
use smelt_store::testkit::{FaultProxy, ProxyConfig, S3Server, upload_dir};

fn objects(store: &Arc<dyn ObjectStore>, prefix: &str) -> BTreeMap<String, Vec<u8>> {
    smelt_store::testkit::read_folder(store, prefix)
}

fn family(root: &Path) -> Vec<PathBuf> {
    let spec = LlamaSpec {
        layers: 4,
        hidden: 256,
        intermediate: 1024,
        vocab: 4096,
        heads: 4,
        kv_heads: 2,
        dtype: DType::BF16,
        lm_head: true,
        shard_bytes: 3_000_000,
    };
    write_family(&root.join("fam"), &spec, 9, 2, 0.02).unwrap()
}

fn config(refs: &[String]) -> String {
    format!(
        "models:\n  - model: {}\n    parameters: {{weight: 0.7, density: 0.6}}\n  - model: {}\n    parameters: {{weight: 0.5, density: 0.5}}\nmerge_method: ties\nbase_model: {}\ndtype: bfloat16\n",
        refs[1], refs[2], refs[0]
    )
}

const ARGS: &[&str] = &["--out-shard-size", "7M", "--random-seed", "3", "--quiet"];

fn merge_s3(
    cwd: &Path,
    cfg: &Path,
    out: &str,
    env: &[(String, String)],
    extra: &[&str],
) -> std::process::Output {
    smelt()
        .current_dir(cwd)
        .arg("merge")
        .arg(cfg)
        .arg(out)
        .args(ARGS)
        .args(extra)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env("SMELT_UPLOAD_PART_SIZE", (5 << 20).to_string())
        .output()
        .expect("smelt runs")
}

fn assert_same(local: &Path, remote: &BTreeMap<String, Vec<u8>>) {
    let local = dir_bytes(local);
    assert_eq!(
        local.keys().collect::<Vec<_>>(),
        remote.keys().collect::<Vec<_>>()
    );
    assert!(
        local.contains_key("model.safetensors.index.json"),
        "expected several shards"
    );
    for (name, b) in &local {
        // these two quote the configuration's model paths
        if name != "README.md" && name != "mergekit_config.yml" {
            assert!(remote[name] == *b, "{name} differs from the local merge");
        }
    }
}

#[test]
fn merge_with_models_and_output_on_s3_matches_local_merge() {
    let tmp = tempfile::tempdir().unwrap();
    let models = family(tmp.path());
    let local_cfg = tmp.path().join("local.yml");
    let refs: Vec<String> = models.iter().map(|m| m.display().to_string()).collect();
    std::fs::write(&local_cfg, config(&refs)).unwrap();
    let local = tmp.path().join("local-out");
    let o = smelt()
        .arg("merge")
        .arg(&local_cfg)
        .arg(&local)
        .args(ARGS)
        .output()
        .unwrap();
    assert_ok(&o);

    let s3 = S3Server::start();
    let urls: Vec<String> = models
        .iter()
        .map(|m| {
            let n = m.file_name().unwrap().to_string_lossy().to_string();
            upload_dir(&s3.store(), m, &format!("models/{n}"));
            s3.url(&format!("models/{n}"))
        })
        .collect();
    let cfg = tmp.path().join("s3.yml");
    std::fs::write(&cfg, config(&urls)).unwrap();

    let out = s3.url("merges/direct");
    let o = merge_s3(tmp.path(), &cfg, &out, &s3.env(), &[]);
    assert_ok(&o);
    assert_same(&local, &objects(&s3.store(), "merges/direct"));
    assert!(s3.open_uploads().is_empty());

    // not empty: refused without --overwrite, replaced with it
    let o = merge_s3(tmp.path(), &cfg, &out, &s3.env(), &[]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--overwrite"), "{}", stderr(&o));
    let o = merge_s3(tmp.path(), &cfg, &out, &s3.env(), &["--overwrite"]);
    assert_ok(&o);
    assert_same(&local, &objects(&s3.store(), "merges/direct"));

    // through a proxy failing every 20th request (503 or reset): retried
    let proxy = FaultProxy::start(
        format!("127.0.0.1:{}", s3.port).parse().unwrap(),
        ProxyConfig::default(),
    );
    let o = merge_s3(
        tmp.path(),
        &cfg,
        &s3.url("merges/faulty"),
        &s3.env_via(&proxy.endpoint()),
        &[],
    );
    assert_ok(&o);
    assert_same(&local, &objects(&s3.store(), "merges/faulty"));
    assert!(
        proxy.stats.answered_503.load(Ordering::Relaxed) > 0
            && proxy.stats.resets.load(Ordering::Relaxed) > 0,
        "no faults injected in {} requests",
        proxy.stats.requests.load(Ordering::Relaxed)
    );
    assert!(s3.open_uploads().is_empty());

    // wrong credentials: a clear error naming the URL, nothing written
    let mut bad = s3.env();
    for (k, v) in bad.iter_mut() {
        if k == "AWS_SECRET_ACCESS_KEY" {
            *v = "wrong".into();
        }
    }
    let o = merge_s3(tmp.path(), &cfg, &s3.url("merges/denied"), &bad, &[]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains(&urls[0]) || e.contains("s3://"), "{e}");
    assert!(!e.contains("panicked"), "{e}");
    assert!(objects(&s3.store(), "merges/denied").is_empty());
}
