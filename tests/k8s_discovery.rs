//! EndpointSlice discovery against the in-process fake API server: the real
//! kube-runtime watcher, our store and the pool, with the list/watch protocol
//! (resource versions, JSON-lines events, bookmarks, 410 Expired) on loopback.

#[path = "support_k8s/fake_apiserver.rs"]
mod fake_apiserver;

use std::sync::Arc;
use std::time::Duration;

use fake_apiserver::FakeApiServer;
use futures::StreamExt;
use infergate_core::config::PortRef;
use infergate_core::pool::Pool;
use infergate_kube::{watch_endpoints, ServiceTarget, WatchOptions};
use infergate_protocol::EngineKind;
use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

const NS: &str = "llm";

/// (address, ready, terminating)
type Ep<'a> = (&'a str, Option<bool>, Option<bool>);

fn slice(service: &str, name: &str, port: i32, eps: &[Ep]) -> EndpointSlice {
    EndpointSlice {
        address_type: "IPv4".into(),
        endpoints: eps
            .iter()
            .map(|(addr, ready, terminating)| Endpoint {
                addresses: vec![addr.to_string()],
                conditions: Some(EndpointConditions {
                    ready: *ready,
                    serving: *ready,
                    terminating: *terminating,
                }),
                ..Endpoint::default()
            })
            .collect(),
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(NS.into()),
            labels: Some(
                [(
                    "kubernetes.io/service-name".to_string(),
                    service.to_string(),
                )]
                .into_iter()
                .collect(),
            ),
            ..ObjectMeta::default()
        },
        ports: Some(vec![EndpointPort {
            name: Some("http".into()),
            port: Some(port),
            protocol: Some("TCP".into()),
            ..EndpointPort::default()
        }]),
    }
}

fn fast() -> WatchOptions {
    WatchOptions {
        backoff_min: Duration::from_millis(50),
        backoff_max: Duration::from_millis(400),
    }
}

/// Runs discovery for `service` into a fresh pool.
fn discover(
    api: &FakeApiServer,
    service: &str,
    port: PortRef,
) -> (Arc<Pool>, tokio::task::JoinHandle<()>) {
    let pool = Arc::new(Pool::new(service, EngineKind::Vllm));
    let target = ServiceTarget {
        namespace: NS.into(),
        name: service.into(),
        port,
    };
    let mut updates = watch_endpoints(api.client(NS), target, &fast()).boxed();
    let p = pool.clone();
    let task = tokio::spawn(async move {
        while let Some(u) = updates.next().await {
            p.apply(u);
        }
    });
    (pool, task)
}

fn members(pool: &Pool) -> Vec<String> {
    let mut m: Vec<String> = pool
        .replicas()
        .iter()
        .map(|r| r.key().to_string())
        .collect();
    m.sort();
    m
}

/// Waits (at most `within`) until the pool holds exactly `want`.
/// Waits (at most `within`) until the pool holds exactly `want`; prints how
/// long it took (the change-to-routing latency, polled every 1 ms).
async fn expect_members(pool: &Pool, want: &[&str], within: Duration) {
    let started = tokio::time::Instant::now();
    let deadline = started + within;
    loop {
        let got = members(pool);
        if got == want {
            eprintln!("reflected {want:?} after {:?}", started.elapsed());
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("pool members {got:?}, wanted {want:?} within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

const SEC: Duration = Duration::from_secs(1);

#[tokio::test]
async fn endpoint_lifecycle_is_reflected_within_a_second() {
    let api = FakeApiServer::start().await;
    api.upsert(&slice(
        "vllm",
        "vllm-a",
        8000,
        &[("10.0.0.1", Some(true), None)],
    ));
    // Another Service's slice must never show up.
    api.upsert(&slice(
        "other",
        "other-a",
        8000,
        &[("10.9.9.9", Some(true), None)],
    ));
    let (pool, task) = discover(&api, "vllm", PortRef::Name("http".into()));
    expect_members(&pool, &["10.0.0.1:8000"], SEC).await;

    // Added (ready: null counts as ready), and a second slice duplicating .1.
    api.upsert(&slice(
        "vllm",
        "vllm-a",
        8000,
        &[("10.0.0.1", Some(true), None), ("10.0.0.2", None, None)],
    ));
    expect_members(&pool, &["10.0.0.1:8000", "10.0.0.2:8000"], SEC).await;
    api.upsert(&slice(
        "vllm",
        "vllm-b",
        8000,
        &[
            ("10.0.0.1", Some(true), None),
            ("10.0.0.3", Some(true), None),
        ],
    ));
    expect_members(
        &pool,
        &["10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000"],
        SEC,
    )
    .await;
    assert_eq!(pool.replicas().len(), 3, "deduplicated across slices");

    // Becoming not ready.
    api.upsert(&slice(
        "vllm",
        "vllm-a",
        8000,
        &[
            ("10.0.0.1", Some(true), None),
            ("10.0.0.2", Some(false), None),
        ],
    ));
    expect_members(&pool, &["10.0.0.1:8000", "10.0.0.3:8000"], SEC).await;

    // Terminating (still serving): out of new routing.
    api.upsert(&slice(
        "vllm",
        "vllm-b",
        8000,
        &[
            ("10.0.0.1", Some(true), None),
            ("10.0.0.3", Some(false), Some(true)),
        ],
    ));
    expect_members(&pool, &["10.0.0.1:8000"], SEC).await;

    // Deleted slices: .1 stays while any slice still lists it.
    api.delete("endpointslices", NS, "vllm-b");
    tokio::time::sleep(Duration::from_millis(100)).await;
    expect_members(&pool, &["10.0.0.1:8000"], SEC).await;
    api.delete("endpointslices", NS, "vllm-a");
    expect_members(&pool, &[], SEC).await;

    // The other Service's changes do not leak in.
    api.upsert(&slice(
        "other",
        "other-a",
        8000,
        &[("10.9.9.8", Some(true), None)],
    ));
    api.upsert(&slice(
        "vllm",
        "vllm-c",
        8000,
        &[("10.0.0.7", Some(true), None)],
    ));
    expect_members(&pool, &["10.0.0.7:8000"], SEC).await;
    task.abort();
}

#[tokio::test]
async fn numeric_service_port_maps_to_the_target_port() {
    let api = FakeApiServer::start().await;
    api.upsert(&slice(
        "vllm",
        "vllm-a",
        8000,
        &[("10.0.0.1", Some(true), None)],
    ));
    // Before the Service exists, port 80 matches no endpoint port.
    let (pool, task) = discover(&api, "vllm", PortRef::Number(80));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(members(&pool).is_empty());
    api.upsert(&Service {
        metadata: ObjectMeta {
            name: Some("vllm".into()),
            namespace: Some(NS.into()),
            ..ObjectMeta::default()
        },
        spec: Some(ServiceSpec {
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: 80,
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    });
    expect_members(&pool, &["10.0.0.1:8000"], SEC).await;
    task.abort();
}

#[tokio::test]
async fn a_watch_broken_with_410_relists_and_converges() {
    let api = FakeApiServer::start().await;
    api.upsert(&slice(
        "vllm",
        "vllm-a",
        8000,
        &[("10.0.0.1", Some(true), None)],
    ));
    api.upsert(&slice(
        "vllm",
        "vllm-b",
        8000,
        &[("10.0.0.2", Some(true), None)],
    ));
    let (pool, task) = discover(&api, "vllm", PortRef::Name("http".into()));
    expect_members(&pool, &["10.0.0.1:8000", "10.0.0.2:8000"], SEC).await;
    let lists_before = api.list_calls("endpointslices");
    assert_eq!(lists_before, 1);

    // While no watch can see it: one slice deleted, another changed; the
    // history is compacted so the resumed watch gets 410 Expired.
    api.compact_and_disconnect_with(|m| {
        m.delete("endpointslices", NS, "vllm-b");
        m.upsert(&slice(
            "vllm",
            "vllm-a",
            8000,
            &[("10.0.0.1", Some(true), None), ("10.0.0.4", None, None)],
        ));
    });
    expect_members(&pool, &["10.0.0.1:8000", "10.0.0.4:8000"], 2 * SEC).await;
    assert!(
        api.list_calls("endpointslices") > lists_before,
        "relisted after 410"
    );

    // The new watch is live: later changes arrive as usual.
    api.upsert(&slice(
        "vllm",
        "vllm-c",
        8000,
        &[("10.0.0.5", Some(true), None)],
    ));
    expect_members(
        &pool,
        &["10.0.0.1:8000", "10.0.0.4:8000", "10.0.0.5:8000"],
        SEC,
    )
    .await;
    task.abort();
}

#[tokio::test]
async fn a_closed_watch_resumes_without_relisting() {
    // Bookmarks every 100 ms keep the resume point current.
    let api = FakeApiServer::start_with(fake_apiserver::FakeOptions {
        bookmark_interval: Duration::from_millis(100),
        ..Default::default()
    })
    .await;
    api.upsert(&slice(
        "vllm",
        "vllm-a",
        8000,
        &[("10.0.0.1", Some(true), None)],
    ));
    let (pool, task) = discover(&api, "vllm", PortRef::Name("http".into()));
    expect_members(&pool, &["10.0.0.1:8000"], SEC).await;
    tokio::time::sleep(Duration::from_millis(250)).await;
    api.disconnect_watches();
    api.upsert(&slice(
        "vllm",
        "vllm-a",
        8000,
        &[
            ("10.0.0.1", Some(true), None),
            ("10.0.0.2", Some(true), None),
        ],
    ));
    expect_members(&pool, &["10.0.0.1:8000", "10.0.0.2:8000"], SEC).await;
    assert_eq!(
        api.list_calls("endpointslices"),
        1,
        "resumed from its resource version"
    );
    assert!(api.watch_calls("endpointslices") >= 2);
    task.abort();
}

#[tokio::test]
async fn api_errors_back_off_then_recover() {
    let api = FakeApiServer::start().await;
    api.upsert(&slice(
        "vllm",
        "vllm-a",
        8000,
        &[("10.0.0.1", Some(true), None)],
    ));
    // The first 6 requests fail with 500.
    api.fail_requests(6);
    let (pool, task) = discover(&api, "vllm", PortRef::Name("http".into()));
    // Backoff 50, 100, 200, 400, 400, 400 ms (jittered down by up to 25%):
    // recovery takes at least ~1.1 s; without backoff it would be instant.
    let started = tokio::time::Instant::now();
    expect_members(&pool, &["10.0.0.1:8000"], 4 * SEC).await;
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(800),
        "retried without backing off: {took:?}"
    );
    assert_eq!(api.list_calls("endpointslices"), 7);
    task.abort();
}

#[tokio::test]
async fn in_flight_requests_survive_scale_down() {
    let api = FakeApiServer::start().await;
    api.upsert(&slice(
        "vllm",
        "vllm-a",
        8000,
        &[
            ("10.0.0.1", Some(true), None),
            ("10.0.0.2", Some(true), None),
        ],
    ));
    let (pool, task) = discover(&api, "vllm", PortRef::Name("http".into()));
    expect_members(&pool, &["10.0.0.1:8000", "10.0.0.2:8000"], SEC).await;
    let doomed = pool
        .replicas()
        .iter()
        .find(|r| r.key() == "10.0.0.2:8000")
        .cloned()
        .unwrap();
    let stream = doomed.begin(1000, 0);
    // Scale down: the pod terminates, then its endpoint disappears.
    api.upsert(&slice(
        "vllm",
        "vllm-a",
        8000,
        &[
            ("10.0.0.1", Some(true), None),
            ("10.0.0.2", Some(false), Some(true)),
        ],
    ));
    expect_members(&pool, &["10.0.0.1:8000"], SEC).await;
    // The stream still holds its replica and its accounting.
    assert_eq!(stream.replica().load.requests(), 1);
    assert_eq!(stream.replica().key(), "10.0.0.2:8000");
    drop(stream);
    assert_eq!(doomed.load.requests(), 0);
    task.abort();
}
