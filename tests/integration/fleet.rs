//! A fleet on one machine (issue 12): three nodes on separate network hosts, each with a NATS
//! server of one cluster and a `factoryd serve`, importing from a registry on a fourth host
//! into a destination registry there (`support::fleet`). Nodes are cut off mid-job, their NATS
//! server partitioned while it leads the jobs stream, lost for good, and restarted one after
//! another under load; every job must end with exactly one result, and the destination must
//! hold the digest that result names.
//!
//! The tests need root (network namespaces); elsewhere each reports itself skipped, by name
//! (`support::netns::unavailable`), and `scripts/test.sh` counts it so.

use std::time::{Duration, Instant};

use factoryd::adapters::nats::Nats;
use factoryd::job::{JobResult, Status};
use futures_util::{FutureExt, StreamExt};

use crate::support::fleet::{block_on, Fleet, FleetConfig, SOURCE_ID};
use crate::worker_nats::{assert_one_result_each, ids, stream_state, wait_results};

/// The image every job imports: two small layers.
const SMALL: &str = "app/small:1";

/// The job record (`job.<id>` in the state bucket), as JSON, as the bucket's stream leader has
/// it. (A key-value `get` is a direct get, which any replica may answer: a replica still
/// catching up after a partition answers with an older record. factoryd's own reads may be
/// stale that way too; its writes are compare-and-sets at the leader, so a stale read costs it
/// a retry, never a wrong write.)
async fn record(nats: &Nats, id: &str) -> serde_json::Value {
    let bucket = &nats.names.state_bucket;
    let subject = format!(
        "$KV.{bucket}.{}",
        factoryd::adapters::nats::Names::state_key(id)
    );
    // Retried for a while: a leader election makes the cluster answer 503 meanwhile.
    let give_up = Instant::now() + Duration::from_secs(30);
    loop {
        let read = async {
            let stream = nats.js.get_stream(format!("KV_{bucket}")).await?;
            let message = stream.get_last_raw_message_by_subject(&subject).await?;
            Ok::<_, async_nats::Error>(message.payload)
        };
        match read.await {
            Ok(payload) => return serde_json::from_slice(&payload).expect("a JSON record"),
            Err(e) if Instant::now() < give_up => {
                eprintln!("record of {id} not readable yet: {e}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => panic!("read the record of {id}: {e}"),
        }
    }
}

/// The streams of the topology, by name (the bucket's backing stream included).
fn streams(nats: &Nats) -> Vec<String> {
    let n = &nats.names;
    vec![
        n.jobs_stream.clone(),
        format!("KV_{}", n.state_bucket),
        n.results_stream.clone(),
        n.events_stream.clone(),
        n.dlq_stream.clone(),
    ]
}

/// The name of the server leading `stream`, if it has a leader and the cluster answers.
async fn leader(nats: &Nats, stream: &str) -> Option<String> {
    let mut stream = nats.js.get_stream(stream).await.ok()?;
    let info = stream.info().await.ok()?;
    info.cluster.as_ref()?.leader.clone()
}

/// True when `stream` has a leader and every other replica is online and current.
async fn replicas_current(nats: &Nats, stream: &str) -> bool {
    let Ok(mut stream) = nats.js.get_stream(stream).await else {
        return false;
    };
    let Ok(info) = stream.info().await else {
        return false;
    };
    info.cluster
        .as_ref()
        .is_some_and(|c| c.leader.is_some() && c.replicas.iter().all(|p| p.current && !p.offline))
}

/// Results stored so far.
async fn results_stored(nats: &Nats) -> u64 {
    stream_state(nats, &nats.names.results_stream)
        .await
        .messages
}

/// Waits until at least `n` results are stored (`secs` at most).
async fn wait_for_results(fleet: &Fleet, nats: &Nats, n: u64, secs: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let stored = results_stored(nats).await;
        if stored >= n {
            return stored;
        }
        assert!(
            Instant::now() < deadline,
            "{stored} results after {secs} s, waiting for {n}\n{}",
            fleet.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Runs `check` until it holds (`secs` at most), a cluster query at a time.
async fn wait_for_cluster<F, Fut>(fleet: &Fleet, what: &str, secs: u64, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !check().await {
        assert!(
            Instant::now() < deadline,
            "timed out after {secs} s waiting for {what}\n{}",
            fleet.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Every job of `ids` succeeded once, its result is the only one stored and the destination
/// holds its digest; nothing was dead-lettered.
async fn assert_every_job_ended_once(fleet: &Fleet, nats: &Nats, ids: &[String]) {
    let results = wait_results(nats, ids, Duration::from_secs(60)).await;
    assert!(
        results.values().all(|r| r.status == Status::Succeeded),
        "{:?}",
        results
            .values()
            .filter(|r| r.status != Status::Succeeded)
            .collect::<Vec<_>>()
    );
    assert_one_result_each(nats, ids.len()).await;
    fleet.assert_destination_holds(&results).await;
}

/// A node cut off mid-job (its download held by the source proxy) stops the job itself once it
/// cannot confirm its lease; another node takes the job over when the lease lapses and
/// finishes it; when the cut-off node is back (and its download let through) it neither
/// publishes a result nor pushes the job's tag, so the job has one result and the destination
/// the digest that result names.
#[test]
fn a_worker_cut_off_mid_job_loses_it_to_a_takeover_and_neither_pushes_nor_publishes_after_it() {
    if crate::support::netns::unavailable("fleet::a_worker_cut_off_mid_job_loses_it_to_a_takeover_and_neither_pushes_nor_publishes_after_it") {
        return;
    }
    // A lease of 20 s, not the fleet's 6 s: when the cut-off node's server led the state
    // bucket, nats-server 2.9.10 goes on routing requests to it until the route's write
    // deadline fires (~90 s here, whatever the ping settings), and every claim meanwhile fails;
    // its message is put back with a delay that grows with the delivery (capped at two
    // leases), so with 6 s leases the job's five deliveries ran out within that stall and it
    // was dead-lettered. With 20 s they span it, as the defaults (60 s) do by far.
    let mut fleet = Fleet::start(FleetConfig {
        import_slots: 1,
        ack_wait_secs: 20,
        ..FleetConfig::default()
    });
    fleet.seed("app/slow:1", &[1 << 20]);
    fleet.source.hold_first_blob_client();
    let lease = Duration::from_secs(fleet.config.ack_wait_secs);
    block_on(async {
        let nats = fleet.client(&[]).await;
        fleet.publish(&nats, "cut", "app/slow:1").await;
        fleet
            .wait_until("a worker to be mid-download", 60, || {
                fleet.source.holding().is_some()
            })
            .await;
        let held = fleet.source.holding().expect("a held client");
        let x = fleet.node_at(held).expect("a node holds the download");
        let cut_off = fleet.nodes[x].name.clone();
        // From here on, a client on the other nodes' servers sees every result published.
        let watcher = fleet.client(&[x]).await;
        let mut published = watcher
            .client
            .subscribe(format!("{}.results.>", watcher.names.prefix))
            .await
            .expect("subscribe to results");
        watcher.client.flush().await.expect("flush");
        assert_eq!(record(&watcher, "cut").await["worker"], cut_off.as_str());

        fleet.cut(x);
        let cut_at = Instant::now();
        fleet
            .wait_until("the cut-off worker to stop its job", 30, || {
                fleet.nodes[x]
                    .log()
                    .contains("Cannot confirm the job's lease")
            })
            .await;
        let stopped_after = cut_at.elapsed();
        assert!(
            stopped_after < lease,
            "stopped {stopped_after:?} after the cut: not before its lease ({lease:?}) lapsed"
        );
        let results = wait_results(&watcher, &["cut".into()], Duration::from_secs(240)).await;
        let result = &results["cut"];
        assert_eq!(result.status, Status::Succeeded, "{result:?}");
        let taker = result.worker.clone();
        assert_ne!(taker, cut_off, "taken over by another node");

        // The cut-off node is back, and its held download goes on.
        fleet.heal(x);
        fleet.source.release();
        fleet
            .wait_until("the cut-off worker's attempt to end", 60, || {
                fleet.nodes[x]
                    .log()
                    .contains("Attempt failed; handing the job back.")
            })
            .await;
        // Nothing can publish or push after this.
        fleet.stop_workers().await;

        let x_log = fleet.nodes[x].log();
        assert!(
            !x_log.contains("Job finished."),
            "the cut-off worker finished the job:\n{x_log}"
        );
        watcher.client.flush().await.expect("flush");
        let mut seen: Vec<JobResult> = Vec::new();
        while let Some(Some(msg)) = published.next().now_or_never() {
            seen.push(serde_json::from_slice(&msg.payload).expect("a result"));
        }
        assert!(
            seen.iter().all(|r| r.worker == taker && r.job_id == "cut"),
            "results published: {seen:?}"
        );
        assert_one_result_each(&watcher, 1).await;

        let tag_pushes: Vec<_> = fleet
            .destination
            .seen()
            .into_iter()
            .filter(|(_, line)| {
                line.starts_with("PUT ")
                    && line.contains(&format!("/v2/{SOURCE_ID}/manifests/cut "))
            })
            .collect();
        let y = fleet
            .nodes
            .iter()
            .position(|n| n.name == taker)
            .expect("the taker is a node");
        assert_eq!(
            tag_pushes
                .iter()
                .map(|(ip, _)| fleet.node_at(*ip))
                .collect::<Vec<_>>(),
            [Some(y)],
            "pushes of the job's tag, by node"
        );
        fleet.assert_destination_holds(&results).await;
        let record = record(&watcher, "cut").await;
        assert_eq!(
            (&record["state"], &record["worker"]),
            (&"succeeded".into(), &taker.as_str().into())
        );
    });
}

/// While 200 jobs run: the node whose NATS server leads the jobs stream is cut off (its worker
/// with it) until the stream has a new leader and the other nodes have finished more jobs, then
/// healed; once its worker runs jobs again, that node is lost for good (killed, its namespace
/// deleted). Every job ends once: 200 results, none twice, none lost, the dead-letter stream
/// empty.
///
/// The node lost is the one that was cut off: losing another one while the healed server still
/// catches up can leave an R3 asset without a quorum for good (seen with nats-server 2.9.10:
/// the healed replica's catch-up from a leader that dies stalls, and the state bucket never
/// gets a leader again). That is NATS's limit, which the README states, not factoryd's.
///
/// `worker.max_lost_attempts` is 4 here, not 2: a job running on the node when it is cut off
/// loses that attempt, and it may well be running there again when the node is lost — two
/// lost attempts, which the default gives up as poison (seen: a job whose handback could not
/// reach the state store in time was claimed again by the healed node just before it was
/// lost). The README says so.
#[test]
fn two_hundred_jobs_survive_a_partitioned_stream_leader_then_its_node_lost_for_good() {
    if crate::support::netns::unavailable(
        "fleet::two_hundred_jobs_survive_a_partitioned_stream_leader_then_its_node_lost_for_good",
    ) {
        return;
    }
    let t0 = Instant::now();
    let mut fleet = Fleet::start(FleetConfig {
        ack_wait_secs: 10,
        source_delay: Duration::from_millis(400),
        max_lost_attempts: 4,
        ..FleetConfig::default()
    });
    fleet.seed(SMALL, &[64 * 1024, 200 * 1024]);
    fleet.share_layers(SMALL);
    let all = ids("p", 200);
    let at = |what: &str| eprintln!("{:>6.1} s  {what}", t0.elapsed().as_secs_f64());
    at("fleet started");
    block_on(async {
        let nats = fleet.client(&[]).await;
        for id in &all {
            fleet.publish(&nats, id, SMALL).await;
        }
        wait_for_results(&fleet, &nats, 20, 90).await;
        at("20 results");

        // The jobs stream's leader is cut off, worker and all.
        let server = leader(&nats, &nats.names.jobs_stream)
            .await
            .expect("the jobs stream has a leader");
        let l = fleet
            .node_of_server(&server)
            .expect("a node's server leads");
        drop(nats);
        fleet.cut(l);
        let rest = fleet.client(&[l]).await;
        let jobs = rest.names.jobs_stream.clone();
        wait_for_cluster(&fleet, "a new leader of the jobs stream", 60, || async {
            leader(&rest, &jobs).await.is_some_and(|s| s != server)
        })
        .await;
        at(&format!("{} cut off; new leader", fleet.nodes[l].name));
        let before = results_stored(&rest).await;
        let during = wait_for_results(&fleet, &rest, before + 15, 90).await;
        assert!(during < 200, "the run ended before the partition healed");

        fleet.heal(l);
        let started_before = fleet.nodes[l].log().matches("Job started.").count();
        at(&format!("{during} results; healed"));
        let names = streams(&rest);
        wait_for_cluster(&fleet, "every replica current again", 90, || async {
            for stream in &names {
                if !replicas_current(&rest, stream).await {
                    return false;
                }
            }
            true
        })
        .await;
        fleet
            .wait_until("the healed node to run jobs again", 60, || {
                fleet.nodes[l].log().matches("Job started.").count() > started_before
            })
            .await;
        let stored = results_stored(&rest).await;
        assert!(stored < 200, "the run ended before the node was lost");
        drop(rest);
        fleet.lose_node(l);
        at(&format!(
            "{} lost for good at {stored} results",
            fleet.nodes[l].name
        ));
        // The disruptions are over: the rest may run at full speed.
        fleet.source.set_delay(Duration::ZERO);

        let nats = fleet.client(&[]).await;
        wait_results(&nats, &all, Duration::from_secs(120)).await;
        at("all results");
        fleet.stop_workers().await;
        assert_every_job_ended_once(&fleet, &nats, &all).await;
    });
}

/// While 200 jobs run, every worker in turn gets SIGTERM, exits 0 within its grace period, and
/// is started again (and pulling) before the next one is stopped: no job is lost or run to a
/// result twice.
#[test]
fn a_rolling_restart_of_every_worker_during_two_hundred_jobs_loses_and_repeats_none() {
    if crate::support::netns::unavailable(
        "fleet::a_rolling_restart_of_every_worker_during_two_hundred_jobs_loses_and_repeats_none",
    ) {
        return;
    }
    let mut fleet = Fleet::start(FleetConfig {
        ack_wait_secs: 10,
        source_delay: Duration::from_millis(400),
        ..FleetConfig::default()
    });
    fleet.seed(SMALL, &[64 * 1024, 200 * 1024]);
    fleet.share_layers(SMALL);
    let all = ids("r", 200);
    let grace = Duration::from_secs(fleet.config.grace_period_secs);
    block_on(async {
        let nats = fleet.client(&[]).await;
        for id in &all {
            fleet.publish(&nats, id, SMALL).await;
        }
        wait_for_results(&fleet, &nats, 10, 90).await;
        for i in 0..fleet.nodes.len() {
            let stored = results_stored(&nats).await;
            assert!(
                stored < 200,
                "the run ended before {} stopped",
                fleet.nodes[i].name
            );
            let (status, took) = fleet.terminate_worker(i).await;
            let name = &fleet.nodes[i].name;
            assert_eq!(status.code(), Some(0), "{name}:\n{}", fleet.nodes[i].log());
            assert!(took < grace, "{name} took {took:?} to stop");
            eprintln!("{name} stopped in {took:?} at {stored} results");
            fleet.start_worker(i);
            fleet.wait_worker_ready(i).await;
        }
        // Every worker was restarted: the rest may run at full speed.
        fleet.source.set_delay(Duration::ZERO);
        wait_results(&nats, &all, Duration::from_secs(150)).await;
        fleet.stop_workers().await;
        assert_every_job_ended_once(&fleet, &nats, &all).await;
    });
}
