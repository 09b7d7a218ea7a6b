//! smelt-store against real servers (s3s-fs, fake-gcs-server, a faulty
//! proxy) on loopback ports chosen at run time.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt};
use rayon::prelude::*;
use smelt_core::io::writer::SlotSpec;
use smelt_core::io::{ByteSource, ModelTensors, ShardSink, ShardWriter, TensorSink};
use smelt_core::synth::{LlamaSpec, write_family};
use smelt_core::{DType, MergeOptions};
use smelt_store::testkit::{FakeGcs, FaultProxy, ProxyConfig, S3Server, upload_dir};
use smelt_store::{ObjectLocation, ObjectOutput, ObjectSource, SinkOptions, StoreUrl};

const MIB: usize = 1 << 20;

/// Deterministic pseudo-random bytes.
fn bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn store_url(s: &S3Server, endpoint: &str, prefix: &str) -> StoreUrl {
    StoreUrl {
        store: s.store_via(endpoint),
        prefix: ObjPath::from(prefix),
        url: s.url(prefix),
    }
}

/// Every object under `prefix/` with its bytes.
fn objects(store: &Arc<dyn ObjectStore>, prefix: &str) -> BTreeMap<String, Vec<u8>> {
    smelt_store::testkit::read_folder(store, prefix)
}

fn dir_files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().to_string(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

#[test]
fn ranged_reads_match_the_object() {
    let s3 = S3Server::start();
    let tmp = tempfile::tempdir().unwrap();
    let data = bytes(20 * MIB + 1234, 1);
    std::fs::write(tmp.path().join("blob.bin"), &data).unwrap();
    upload_dir(&s3.store(), tmp.path(), "d");
    let src = ObjectSource::open(
        s3.store(),
        ObjPath::from("d/blob.bin"),
        s3.url("d/blob.bin"),
    )
    .unwrap();
    assert_eq!(src.len(), data.len() as u64);
    for (off, n) in [
        (0usize, 8usize),
        (5, 1000),
        (8 * MIB - 3, 7),
        (MIB, 17 * MIB + 5),
        (0, data.len()),
    ] {
        let mut buf = vec![0u8; n];
        src.read_at(off as u64, &mut buf).unwrap();
        assert!(buf == data[off..off + n], "range {off}+{n} differs");
    }
    let mut buf = vec![0u8; 10];
    let e = src
        .read_at(data.len() as u64 - 5, &mut buf)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&s3.url("d/blob.bin")) && e.contains("past the end"),
        "{e}"
    );
    // a missing object is reported with its URL
    let e = ObjectSource::open(s3.store(), ObjPath::from("d/none"), s3.url("d/none"))
        .unwrap_err()
        .to_string();
    assert!(e.contains(&s3.url("d/none")), "{e}");
}

/// Three shards; the first (~13 MB) needs multipart parts.
fn test_shards() -> Vec<(String, Vec<SlotSpec>)> {
    let slot = |name: &str, n: usize| SlotSpec {
        name: name.into(),
        dtype: DType::BF16,
        shape: vec![n / 2],
    };
    vec![
        (
            "a.safetensors".into(),
            vec![
                slot("a0", 6 * MIB),
                slot("a1", 2),
                slot("a2", 4 * MIB + 10),
                slot("a3", 3 * MIB),
            ],
        ),
        (
            "b.safetensors".into(),
            vec![slot("b0", 1000), slot("b1", 64)],
        ),
        ("c.safetensors".into(), vec![slot("c0", 5 * MIB)]),
    ]
}

#[test]
fn sink_streams_shards_identical_to_the_local_writer_in_any_order() {
    let s3 = S3Server::start();
    let tmp = tempfile::tempdir().unwrap();
    let shards = test_shards();
    // (shard, slot, offset, bytes): whole tensors and row-block pieces
    let mut writes: Vec<(usize, usize, Option<u64>, Vec<u8>)> = Vec::new();
    for (k, (_, slots)) in shards.iter().enumerate() {
        for (j, s) in slots.iter().enumerate() {
            let data = bytes(s.nbytes() as usize, (k * 10 + j) as u64);
            if data.len() > MIB {
                for (i, c) in data.chunks(MIB / 3 * 2).enumerate() {
                    writes.push((k, j, Some((i * (MIB / 3 * 2)) as u64), c.to_vec()));
                }
            } else {
                writes.push((k, j, None, data));
            }
        }
    }
    writes.reverse();
    writes.swap(1, 7);
    let local = ShardWriter::create(tmp.path(), &shards).unwrap();
    let at = store_url(&s3, &s3.endpoint(), "out");
    let sink = smelt_store::ObjectShardSink::create(
        at,
        &shards,
        &[0, 1, 2],
        SinkOptions {
            part_size: 5 * MIB,
            max_inflight_parts: 2,
        },
    )
    .unwrap();
    for w in [&local as &dyn TensorSink, &sink as &dyn TensorSink] {
        writes.par_iter().for_each(|(k, j, off, b)| match off {
            None => w.write(*k, *j, b).unwrap(),
            Some(o) => w.write_part(*k, *j, *o, b).unwrap(),
        });
    }
    local.finish().unwrap();
    assert_eq!(sink.done_shards(), vec![0, 1, 2]);
    Box::new(sink).finish().unwrap();
    let got = objects(&s3.store(), "out");
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        ["a.safetensors", "b.safetensors", "c.safetensors"]
    );
    for (name, b) in &got {
        assert!(
            *b == std::fs::read(tmp.path().join(name)).unwrap(),
            "{name} differs"
        );
    }
    // the big shard went up in parts (S3 multipart ETags end in -N)
    let store = s3.store();
    let etag = smelt_store::rt::block_on(async move {
        store
            .head(&ObjPath::from("out/a.safetensors"))
            .await
            .unwrap()
            .e_tag
    });
    assert!(etag.as_deref().unwrap_or("").contains('-'), "{etag:?}");
    assert!(s3.open_uploads().is_empty(), "{:?}", s3.open_uploads());
}

#[test]
fn aborting_or_dropping_a_sink_aborts_its_uploads() {
    let s3 = S3Server::start();
    let shards = test_shards();
    for drop_only in [false, true] {
        let at = store_url(&s3, &s3.endpoint(), "out");
        let sink = smelt_store::ObjectShardSink::create(
            at,
            &shards,
            &[0],
            SinkOptions {
                part_size: 5 * MIB,
                max_inflight_parts: 2,
            },
        )
        .unwrap();
        // the first 6 MiB tensor: one part goes up, the shard stays open
        sink.write(0, 0, &bytes(6 * MIB, 3)).unwrap();
        let e = sink.write(1, 0, &[0u8; 1000]).unwrap_err().to_string();
        assert!(e.contains("not written by this output sink"), "{e}");
        assert!(
            !s3.open_uploads().is_empty(),
            "no multipart upload was started"
        );
        if drop_only {
            drop(sink);
        } else {
            Box::new(sink).abort();
        }
        assert!(s3.open_uploads().is_empty(), "{:?}", s3.open_uploads());
        assert!(objects(&s3.store(), "out").is_empty());
    }
}

fn spec() -> LlamaSpec {
    LlamaSpec {
        layers: 4,
        hidden: 256,
        intermediate: 1024,
        vocab: 4096,
        heads: 4,
        kv_heads: 2,
        dtype: DType::BF16,
        lm_head: true,
        shard_bytes: 3_000_000,
    }
}

/// A base and two fine-tunes (~12 MB each, 4 shards) on disk.
fn family(root: &Path) -> Vec<PathBuf> {
    write_family(&root.join("fam"), &spec(), 5, 2, 0.02).unwrap()
}

fn config(refs: &[String]) -> String {
    format!(
        "models:\n  - model: {}\n    parameters: {{weight: 1.0, density: 0.5}}\n  - model: {}\n    parameters: {{weight: 0.6, density: 0.7}}\nmerge_method: dare_ties\nbase_model: {}\ndtype: bfloat16\n",
        refs[1], refs[2], refs[0]
    )
}

fn merge_options() -> MergeOptions {
    let mut o = MergeOptions::default();
    o.plan.out_shard_size = 7_000_000;
    o.plan.random_seed = 42;
    o
}

/// `smelt merge` of the family, locally.
fn local_merge(root: &Path, models: &[PathBuf]) -> PathBuf {
    let refs: Vec<String> = models.iter().map(|m| m.display().to_string()).collect();
    let cfg = root.join("local.yml");
    std::fs::write(&cfg, config(&refs)).unwrap();
    let out = root.join("local-out");
    let plan = smelt_core::merge(&cfg, &out, &merge_options(), &|_, _, _| {}).unwrap();
    assert!(plan.shards.len() >= 2, "{} shards", plan.shards.len());
    out
}

/// Uploads the family to `fam/{base,ft1,ft2}` and returns their URLs.
fn upload_family(s3: &S3Server, models: &[PathBuf]) -> Vec<String> {
    models
        .iter()
        .map(|m| {
            let name = m.file_name().unwrap().to_string_lossy().to_string();
            upload_dir(&s3.store(), m, &format!("fam/{name}"));
            s3.url(&format!("fam/{name}"))
        })
        .collect()
}

/// Compares an object-store output with the local one: every file the
/// same bytes, except the two that quote the configuration's paths.
fn assert_same_output(local: &Path, remote: &BTreeMap<String, Vec<u8>>) {
    let local = dir_files(local);
    assert_eq!(
        local.keys().collect::<Vec<_>>(),
        remote.keys().collect::<Vec<_>>()
    );
    assert!(local.contains_key("model.safetensors.index.json"));
    for (name, b) in &local {
        if name == "README.md" || name == "mergekit_config.yml" {
            continue;
        }
        assert!(remote[name] == *b, "{name} differs from the local merge");
    }
}

/// Merges the family with inputs and output on S3 through a proxy.
fn s3_merge(
    s3: &S3Server,
    proxy: &FaultProxy,
    refs: &[String],
    root: &Path,
) -> smelt_core::Result<smelt_core::MergePlan> {
    smelt_store::install();
    smelt_store::set_prefix_options(
        &format!("s3://{}", s3.bucket),
        s3.options_via(&proxy.endpoint()),
    );
    let cfg = root.join("s3.yml");
    std::fs::write(&cfg, config(refs)).unwrap();
    let out = ObjectOutput::new(
        store_url(s3, &proxy.endpoint(), "out/merged"),
        SinkOptions {
            part_size: 5 * MIB,
            max_inflight_parts: 3,
        },
    );
    smelt_core::merge_to(&cfg, &out, &merge_options(), &|_, _, _| {})
}

#[test]
fn merge_on_s3_matches_the_local_merge_and_writes_the_index_last() {
    let tmp = tempfile::tempdir().unwrap();
    let models = family(tmp.path());
    let local = local_merge(tmp.path(), &models);
    let s3 = S3Server::start();
    let refs = upload_family(&s3, &models);
    let proxy = FaultProxy::start(
        format!("127.0.0.1:{}", s3.port).parse().unwrap(),
        ProxyConfig {
            every: 0,
            deny: None,
        },
    );
    let plan = s3_merge(&s3, &proxy, &refs, tmp.path()).unwrap();
    let remote = objects(&s3.store(), "out/merged");
    assert_same_output(&local, &remote);
    // the card names the output and the S3 models
    let card = String::from_utf8(remote["README.md"].clone()).unwrap();
    assert!(
        card.contains("# merged") && card.contains(&refs[1]),
        "{card}"
    );
    // multipart for shards larger than a part, index last
    let log = proxy.stats.requests();
    assert!(
        log.iter()
            .any(|l| l.starts_with("POST") && l.contains("?uploads")),
        "no multipart upload"
    );
    let writes: Vec<&String> = log
        .iter()
        .filter(|l| l.starts_with("PUT") || l.starts_with("POST"))
        .collect();
    assert!(
        writes
            .last()
            .unwrap()
            .contains("model.safetensors.index.json"),
        "last write: {:?}",
        writes.last()
    );
    // inputs were read by ranges, never whole: fewer bytes than 3 models
    assert!(plan.shards.len() >= 2);
    assert!(s3.open_uploads().is_empty());
    // a second merge into the same prefix is refused without overwrite
    let e = s3_merge(&s3, &proxy, &refs, tmp.path())
        .unwrap_err()
        .to_string();
    assert!(e.contains("not empty") && e.contains("--overwrite"), "{e}");
}

#[test]
fn merge_through_a_proxy_failing_5_percent_is_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let models = family(tmp.path());
    let local = local_merge(tmp.path(), &models);
    let s3 = S3Server::start();
    let refs = upload_family(&s3, &models);
    let proxy = FaultProxy::start(
        format!("127.0.0.1:{}", s3.port).parse().unwrap(),
        ProxyConfig::default(),
    );
    s3_merge(&s3, &proxy, &refs, tmp.path()).unwrap();
    assert_same_output(&local, &objects(&s3.store(), "out/merged"));
    let st = &proxy.stats;
    assert!(
        st.answered_503.load(Ordering::Relaxed) > 0 && st.resets.load(Ordering::Relaxed) > 0,
        "no faults injected in {} requests",
        st.requests.load(Ordering::Relaxed)
    );
    assert!(s3.open_uploads().is_empty());
}

#[test]
fn a_failed_upload_aborts_and_leaves_no_index() {
    let tmp = tempfile::tempdir().unwrap();
    let models = family(tmp.path());
    let s3 = S3Server::start();
    let refs = upload_family(&s3, &models);
    // every part upload is refused (403: not retried)
    let proxy = FaultProxy::start(
        format!("127.0.0.1:{}", s3.port).parse().unwrap(),
        ProxyConfig {
            every: 0,
            deny: Some(Arc::new(|m: &str, t: &str| {
                m == "PUT" && t.contains("partNumber=")
            })),
        },
    );
    let e = s3_merge(&s3, &proxy, &refs, tmp.path())
        .unwrap_err()
        .to_string();
    assert!(e.contains("out/merged/model-0000"), "{e}");
    let left = objects(&s3.store(), "out/merged");
    assert!(
        !left.contains_key("model.safetensors.index.json"),
        "{:?}",
        left.keys()
    );
    assert!(left.is_empty(), "left behind: {:?}", left.keys());
    assert!(s3.open_uploads().is_empty(), "{:?}", s3.open_uploads());
    let log = proxy.stats.requests();
    assert!(
        log.iter()
            .any(|l| l.starts_with("DELETE") && l.contains("uploadId=")),
        "no multipart upload was aborted: {log:?}"
    );
}

#[test]
fn cancelling_a_sink_stops_the_executor_and_aborts() {
    let tmp = tempfile::tempdir().unwrap();
    let models = family(tmp.path());
    let refs: Vec<String> = models.iter().map(|m| m.display().to_string()).collect();
    let cfg = tmp.path().join("c.yml");
    std::fs::write(&cfg, config(&refs)).unwrap();
    let prepared = smelt_core::prepare(&cfg, &merge_options().plan).unwrap();
    let plan = &prepared.plan;
    let s3 = S3Server::start();
    let out = ObjectOutput::new(
        store_url(&s3, &s3.endpoint(), "out/c"),
        SinkOptions {
            part_size: 5 * MIB,
            max_inflight_parts: 2,
        },
    );
    let all: Vec<usize> = (0..plan.tensors.len()).collect();
    let shards: Vec<usize> = (0..plan.shards.len()).collect();
    let sink = out.shard_sink(&plan.shard_slots(), &shards).unwrap();
    let tensors: Vec<ModelTensors> = prepared.models.iter().map(|m| m.tensors.clone()).collect();
    let r = smelt_core::executor::run_tasks(plan, &all, &tensors, &sink, 1 << 20, &|done, _, _| {
        if done == 3 {
            sink.cancel();
        }
    });
    let e = r.unwrap_err().to_string();
    assert!(e.contains("cancelled"), "{e}");
    Box::new(sink).abort();
    assert!(s3.open_uploads().is_empty(), "{:?}", s3.open_uploads());
}

#[test]
fn model_folders_on_s3_read_like_local_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let models = family(tmp.path());
    let s3 = S3Server::start();
    let refs = upload_family(&s3, &models[..1]);
    let loc = ObjectLocation::new(store_url(&s3, &s3.endpoint(), "fam/base"));
    let remote = ModelTensors::open(&loc, "base").unwrap();
    let local = ModelTensors::open_dir(&models[0], "base").unwrap();
    assert!(remote.shards.len() > 1);
    assert_eq!(remote.tensors, local.tensors);
    for name in local.tensors.keys().take(5) {
        assert_eq!(
            remote.read_raw(name).unwrap(),
            local.read_raw(name).unwrap()
        );
    }
    use smelt_core::io::ModelLocation;
    assert!(loc.list().unwrap().contains(&"config.json".to_string()));
    assert_eq!(
        loc.read("config.json").unwrap(),
        std::fs::read(models[0].join("config.json")).unwrap()
    );
    // a folder without a model names the URL
    let empty = ObjectLocation::new(store_url(&s3, &s3.endpoint(), "fam/nothing"));
    let e = ModelTensors::open(&empty, "x").unwrap_err().to_string();
    assert!(
        e.contains(&s3.url("fam/nothing")) && e.contains("no model files"),
        "{e}"
    );
    // through the resolver, as a YAML reference
    smelt_store::install();
    smelt_store::set_prefix_options(&format!("s3://{}", s3.bucket), s3.options());
    let l = smelt_core::io::open_location(&refs[0]).unwrap();
    assert_eq!(l.display(), refs[0]);
    assert!(l.exists("model.safetensors.index.json").unwrap());
}

#[test]
fn gcs_inputs_merge_to_a_file_url_like_local() {
    let tmp = tempfile::tempdir().unwrap();
    let models = family(tmp.path());
    let local = local_merge(tmp.path(), &models);
    // fake-gcs-server preloads data/BUCKET/... (its upload API does not
    // fit object_store's XML-API writes, so GCS writes stay untested)
    let data = tmp.path().join("gcs-data");
    let bucket = "smelt-gcs";
    for m in &models {
        let d = data.join(bucket).join("fam").join(m.file_name().unwrap());
        std::fs::create_dir_all(&d).unwrap();
        for (n, b) in dir_files(m) {
            std::fs::write(d.join(n), b).unwrap();
        }
    }
    let gcs = FakeGcs::start(&data);
    smelt_store::install();
    smelt_store::set_prefix_options(&format!("gs://{bucket}"), gcs.options());
    let refs: Vec<String> = models
        .iter()
        .map(|m| {
            format!(
                "gs://{bucket}/fam/{}",
                m.file_name().unwrap().to_string_lossy()
            )
        })
        .collect();
    let cfg = tmp.path().join("gcs.yml");
    std::fs::write(&cfg, config(&refs)).unwrap();
    let out_dir = tmp.path().join("file-out");
    let out_url = format!("file://{}", out_dir.display());
    let out = smelt_core::io::open_output(&out_url).unwrap();
    assert_eq!(out.name(), "file-out");
    smelt_core::merge_to(&cfg, out.as_ref(), &merge_options(), &|_, _, _| {}).unwrap();
    let got = dir_files(&out_dir);
    assert_same_output(&local, &got);
}
