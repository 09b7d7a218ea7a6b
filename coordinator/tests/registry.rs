//! The leader's job table: transitions, and that etcd's copy of it (the
//! writes each transition returns) rebuilds exactly the same table.

use std::collections::{BTreeMap, HashSet};

use smelt_coordinator::registry::{
    JobSpec, JobState, Registry, Reported, Settings, TaskState, Writes,
};
use smelt_core::synth::{LlamaSpec, write_family};
use smelt_proto as pb;

fn plan(dir: &std::path::Path) -> smelt_core::MergePlan {
    let ms = write_family(&dir.join("fam"), &LlamaSpec::tiny(), 3, 1, 0.02).unwrap();
    let cfg = dir.join("c.yml");
    std::fs::write(
        &cfg,
        format!(
            "models:\n  - model: {}\n  - model: {}\nmerge_method: linear\nparameters: {{weight: 0.5}}\n",
            ms[0].display(),
            ms[1].display()
        ),
    )
    .unwrap();
    let opts = smelt_core::PlanOptions {
        out_shard_size: 20_000,
        ..Default::default()
    };
    smelt_core::prepare(&cfg, &opts).unwrap().plan
}

fn spec() -> JobSpec {
    JobSpec {
        config_yaml: "x".into(),
        config_name: "c.yml".into(),
        base_dir: "/".into(),
        out_url: "/tmp/out".into(),
        settings: Settings::default(),
        created_ms: 1,
    }
}

/// A stand-in for etcd: applies writes to a map.
#[derive(Default)]
struct Kv(BTreeMap<String, Vec<u8>>);
impl Kv {
    fn apply(&mut self, w: Writes) {
        for (k, v) in w {
            self.0.insert(k, v);
        }
    }
    fn reload(&self) -> Registry {
        let kvs: Vec<(String, Vec<u8>)> = self.0.clone().into_iter().collect();
        let (r, skipped) = Registry::load(&kvs);
        assert!(skipped.is_empty());
        r
    }
}

fn report(job: &str, k: u32, attempt: u32, worker: &str, ok: bool) -> pb::ReportRequest {
    pb::ReportRequest {
        task: Some(pb::TaskRef {
            job_id: job.into(),
            task_index: k,
            attempt,
            worker_id: worker.into(),
        }),
        ok,
        error: if ok { String::new() } else { "boom".into() },
        bytes: 10,
    }
}

#[test]
fn tasks_flow_and_etcd_state_rebuilds_the_table() {
    let tmp = tempfile::tempdir().unwrap();
    let p = plan(tmp.path());
    let n = p.shards.len();
    assert!(n >= 3, "{n} shards");
    let mut reg = Registry::default();
    let mut kv = Kv::default();
    kv.apply(reg.insert("j1".into(), spec(), p));

    let (t0, w) = reg.acquire("a").unwrap();
    kv.apply(w);
    assert_eq!((t0.task_index, t0.attempt), (0, 1));
    let (t1, w) = reg.acquire("b").unwrap();
    kv.apply(w);
    assert_eq!(t1.task_index, 1);

    // a stale or foreign report is ignored
    let (r, w) = reg.report(&report("j1", 0, 1, "b", true), 5);
    assert_eq!(r, Reported::Rejected);
    assert!(w.is_empty());
    let (r, w) = reg.report(&report("j1", 0, 1, "a", true), 5);
    assert_eq!(r, Reported::Accepted);
    kv.apply(w);

    // worker b vanishes: its task goes back to the queue
    let live: HashSet<String> = ["a".to_string()].into();
    let (moved, w) = reg.requeue_lost(&live);
    assert_eq!(moved, vec![("j1".to_string(), 1)]);
    kv.apply(w);
    // b's late report does not count
    let (r, _) = reg.report(&report("j1", 1, 1, "b", true), 6);
    assert_eq!(r, Reported::Rejected);

    // a new leader loading etcd's keys sees the same table
    let mut again = kv.reload();
    let a = reg.status("j1").unwrap();
    let b = again.status("j1").unwrap();
    assert_eq!(a, b);
    assert_eq!(b.tasks[0].state, pb::TaskState::Done as i32);
    assert_eq!(b.tasks[1].state, pb::TaskState::Pending as i32);

    // the new leader hands out task 1 again (attempt 2), then the rest
    let (t, w) = again.acquire("a").unwrap();
    kv.apply(w);
    assert_eq!((t.task_index, t.attempt), (1, 2));
    let mut last = Reported::Accepted;
    let (r, w) = again.report(&report("j1", 1, 2, "a", true), 7);
    kv.apply(w);
    assert_eq!(r, Reported::Accepted);
    while let Some((t, w)) = again.acquire("a") {
        kv.apply(w);
        let (r, w) = again.report(&report("j1", t.task_index, t.attempt, "a", true), 8);
        kv.apply(w);
        last = r;
    }
    assert_eq!(last, Reported::AllDone);
    assert_eq!(again.ready_to_finalise(), vec!["j1".to_string()]);
    kv.apply(again.finish("j1", JobState::Succeeded, "", 9));
    let fin = kv.reload();
    let st = fin.status("j1").unwrap();
    assert_eq!(st.state, pb::JobState::Succeeded as i32);
    assert_eq!(st.tasks_done as usize, n);
    assert_eq!(st.tasks[0].attempts, 1);
    assert_eq!(st.tasks[1].attempts, 2);
}

#[test]
fn repeated_errors_fail_the_job_and_cancel_closes_it() {
    let tmp = tempfile::tempdir().unwrap();
    let p = plan(tmp.path());
    let mut reg = Registry::default();
    reg.insert("j1".into(), spec(), p.clone());
    for attempt in 1..=3 {
        let (t, _) = reg.acquire("a").unwrap();
        assert_eq!((t.task_index, t.attempt), (0, attempt));
        reg.report(&report("j1", 0, attempt, "a", false), 5);
    }
    let st = reg.status("j1").unwrap();
    assert_eq!(st.state, pb::JobState::Failed as i32);
    assert!(
        st.error.contains("boom") && st.error.contains("3 times"),
        "{}",
        st.error
    );
    assert_eq!(st.tasks[0].state, pb::TaskState::Failed as i32);
    assert!(reg.acquire("a").is_none(), "a failed job hands out nothing");

    reg.insert("j2".into(), spec(), p);
    let (t, _) = reg.acquire("a").unwrap();
    assert_eq!(t.job_id, "j2");
    let tr = pb::TaskRef {
        job_id: "j2".into(),
        task_index: t.task_index,
        attempt: t.attempt,
        worker_id: "a".into(),
    };
    assert!(reg.alive(&tr));
    reg.finish("j2", JobState::Cancelled, "cancelled", 6);
    assert!(!reg.alive(&tr), "a cancelled job's tasks are not wanted");
    assert!(reg.acquire("a").is_none());
    let (r, _) = reg.report(&report("j2", t.task_index, t.attempt, "a", true), 7);
    assert_eq!(r, Reported::Rejected);
    // finishing twice changes nothing
    assert!(reg.finish("j2", JobState::Succeeded, "", 8).is_empty());
    let _ = TaskState::Done;
}

/// A task recorded as handed to a worker that then asks for work again
/// (the leader died before its reply reached the worker) goes back to the
/// queue instead of waiting forever on a live worker; the orphaned
/// attempt's late report does not count.
#[test]
fn a_worker_asking_again_frees_the_task_it_never_got() {
    let tmp = tempfile::tempdir().unwrap();
    let p = plan(tmp.path());
    let mut reg = Registry::default();
    let mut kv = Kv::default();
    kv.apply(reg.insert("j1".into(), spec(), p));
    let (t0, w) = reg.acquire("a").unwrap();
    kv.apply(w);
    assert_eq!((t0.task_index, t0.attempt), (0, 1));
    // the reply was lost with the leader: a new leader loads etcd's state
    let mut again = kv.reload();
    assert_eq!(
        again.status("j1").unwrap().tasks[0].state,
        pb::TaskState::Running as i32
    );
    let (t, w) = again.acquire("a").unwrap();
    kv.apply(w);
    assert_eq!(
        (t.task_index, t.attempt),
        (0, 2),
        "task 0 is handed out again"
    );
    let (r, _) = again.report(&report("j1", 0, 1, "a", true), 5);
    assert_eq!(r, Reported::Rejected);
    // other workers' running tasks are left alone
    let (t1, w) = again.acquire("b").unwrap();
    kv.apply(w);
    assert_eq!(t1.task_index, 1);
    let (t2, w) = again.acquire("c").unwrap();
    kv.apply(w);
    assert_eq!(t2.task_index, 2);
    let st = kv.reload().status("j1").unwrap();
    assert_eq!(st.tasks[0].state, pb::TaskState::Running as i32);
    assert_eq!(st.tasks[1].state, pb::TaskState::Running as i32);
    let (r, _) = again.report(&report("j1", 1, 1, "b", true), 6);
    assert_eq!(r, Reported::Accepted);
}
