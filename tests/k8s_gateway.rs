//! The whole gateway in Kubernetes mode, in-process: config from a ConfigMap,
//! replicas from EndpointSlices, both served by the fake API server; simulated
//! vLLM replicas on 127.0.0.1 (one EndpointSlice each, as the EndpointSlice
//! controller does for pods whose named port maps to different numbers).

#[path = "support_k8s/fake_apiserver.rs"]
mod fake_apiserver;
#[path = "../crates/sim/tests/sim_util/mod.rs"]
mod sim_util;

use std::time::Duration;

use fake_apiserver::FakeApiServer;
use infergate::control_plane::{ConfigSource, ControlOptions, ControlPlane, Loaded};
use infergate_core::config::Config;
use infergate_core::discovery::GateOptions;
use infergate_kube::{
    Cluster, ConfigMapWatch, DiscoveryOptions, WatchOptions, CANARY_OF, CANARY_WEIGHT,
};
use infergate_proxy::Gateway;
use infergate_proxy::ServerHandle;
use infergate_sim::{start_fleet, Faults, Fleet, FleetConfig, Profile};
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use sim_util::{chat, client, eventually, open_stream, post_json, read_events};

const NS: &str = "llm";
const SEC: Duration = Duration::from_secs(1);
const MODEL: &str = "sim-tiny";

fn config_yaml(aliases: &str) -> String {
    format!(
        "listeners:\n  main: {{ address: \"127.0.0.1:0\" }}\n  admin: {{ address: \"127.0.0.1:0\" }}\n\
         pools:\n  - name: vllm\n    engine: vllm\n    service: {{ name: vllm, port: http }}\n\
         routes:\n  - model: {MODEL}\n    aliases: [{aliases}]\n    target_model: {MODEL}\n    pool: vllm\n"
    )
}

fn configmap(text: &str) -> ConfigMap {
    fake_apiserver::configmap(NS, "infergate-routes", "config.yaml", text)
}

/// The slice of one simulated replica of `service`: (ready, terminating).
fn slice_in(
    service: &str,
    fleet: &Fleet,
    i: usize,
    ready: Option<bool>,
    terminating: Option<bool>,
) -> EndpointSlice {
    let addr = fleet.replica(i).addr();
    EndpointSlice {
        address_type: "IPv4".into(),
        endpoints: vec![Endpoint {
            addresses: vec![addr.ip().to_string()],
            conditions: Some(EndpointConditions {
                ready,
                serving: Some(true),
                terminating,
            }),
            ..Endpoint::default()
        }],
        metadata: ObjectMeta {
            name: Some(format!("{service}-{i}")),
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
            port: Some(i32::from(addr.port())),
            protocol: Some("TCP".into()),
            ..EndpointPort::default()
        }]),
    }
}

/// The slice of replica `i` of the stable Service `vllm`.
fn slice_of(
    fleet: &Fleet,
    i: usize,
    ready: Option<bool>,
    terminating: Option<bool>,
) -> EndpointSlice {
    slice_in("vllm", fleet, i, ready, terminating)
}

struct Setup {
    api: FakeApiServer,
    fleet: Fleet,
    server: ServerHandle,
    _control: ControlPlane,
}

impl Setup {
    fn members(&self) -> Vec<String> {
        let mut m: Vec<String> = self
            .server
            .gateway
            .pool("vllm")
            .map(|p| p.replicas().iter().map(|r| r.key().to_string()).collect())
            .unwrap_or_default();
        m.sort();
        m
    }

    fn key(&self, i: usize) -> String {
        self.fleet.replica(i).addr().to_string()
    }

    fn url(&self) -> String {
        format!("{}/v1/chat/completions", self.server.url())
    }
}

/// Fleet of `n` replicas (the ones in `loading` refuse connections, like a
/// vLLM still loading its model), all listed as ready in EndpointSlices, and
/// the gateway reading its config from the ConfigMap.
async fn setup(n: usize, loading: &[usize]) -> Setup {
    setup_with(&vec!["vllm"; n], loading).await
}

/// Like [`setup`], replica `i` being an endpoint of Service `services[i]`.
async fn setup_with(services: &[&str], loading: &[usize]) -> Setup {
    let n = services.len();
    let fleet = start_fleet(FleetConfig {
        replicas: n,
        time_scale: 0.5,
        ..FleetConfig::with_profile(Profile::Tiny)
    })
    .await
    .unwrap();
    for &i in loading {
        fleet.replica(i).set_faults(Faults {
            refuse_connections: true,
            ..Faults::default()
        });
    }
    let api = FakeApiServer::start().await;
    for (i, service) in services.iter().enumerate() {
        api.upsert(&slice_in(service, &fleet, i, Some(true), Some(false)));
    }
    let text = config_yaml("llama");
    api.upsert(&configmap(&text));
    let fast = WatchOptions {
        backoff_min: Duration::from_millis(50),
        backoff_max: Duration::from_millis(400),
    };
    let loaded = Loaded {
        config: Config::parse(&text, "configmap").unwrap(),
        text,
        source: ConfigSource::ConfigMap(ConfigMapWatch::new(NS, "infergate-routes")),
        cluster: Some(Cluster {
            client: api.client(NS),
            namespace: NS.into(),
        }),
        canary_annotations: true,
    };
    let config = loaded.config.clone();
    let gateway = Gateway::new(config.clone()).unwrap();
    let opts = ControlOptions {
        discovery: DiscoveryOptions {
            watch: fast,
            gate: GateOptions {
                timeout: Duration::from_millis(300),
                interval: Duration::from_millis(50),
                max_interval: Duration::from_millis(100),
                ..GateOptions::default()
            },
        },
        initial_sync: 5 * SEC,
        ..ControlOptions::default()
    };
    let control = ControlPlane::start(gateway.clone(), loaded, opts).await;
    let server = infergate_proxy::start_with(
        gateway,
        &config.listeners.main,
        config.listeners.admin.as_ref(),
    )
    .await
    .unwrap();
    Setup {
        api,
        fleet,
        server,
        _control: control,
    }
}

async fn expect_members(s: &Setup, want: &[String], within: Duration) {
    let mut want = want.to_vec();
    want.sort();
    if !eventually(within, || s.members() == want).await {
        panic!(
            "pool members {:?}, wanted {want:?} within {within:?}",
            s.members()
        );
    }
}

#[tokio::test]
async fn a_service_scaled_down_while_streams_run_loses_no_stream_and_no_request() {
    let s = setup(3, &[]).await;
    let all: Vec<String> = (0..3).map(|i| s.key(i)).collect();
    expect_members(&s, &all, SEC).await;

    // 12 streams of 300 tokens (over a second each), spread over the replicas.
    let c = client();
    let mut streams = Vec::new();
    for i in 0..12 {
        let resp = open_stream(
            &c,
            &s.url(),
            &chat(MODEL, &format!("stream {i}"), 300, true),
        )
        .await;
        assert_eq!(resp.status(), 200);
        streams.push(tokio::spawn(read_events(resp.into_body())));
    }
    assert!(
        eventually(SEC, || s.fleet.replica(2).stats().running > 0).await,
        "replica 2 carries streams"
    );

    // Scale down replica 2: its endpoint turns terminating (still serving),
    // then its slice is deleted; it keeps running until its streams end.
    s.api
        .upsert(&slice_of(&s.fleet, 2, Some(false), Some(true)));
    expect_members(&s, &all[..2], SEC).await;
    let served_before = s.fleet.replica(2).stats().requests_received;
    s.api.delete("endpointslices", NS, "vllm-2");

    // New requests during the scale-down all succeed, none on replica 2.
    for i in 0..10 {
        let (status, body) =
            post_json(&c, &s.url(), &chat(MODEL, &format!("after {i}"), 5, false)).await;
        assert_eq!(status, 200, "{body}");
    }
    assert_eq!(s.fleet.replica(2).stats().requests_received, served_before);

    // Every stream, including those on replica 2, ran to its end.
    for st in streams {
        let events = st.await.unwrap();
        assert_eq!(events.last().map(|e| e.data.as_str()), Some("[DONE]"));
        let tokens = events
            .iter()
            .filter(|e| e.data.contains("\"content\""))
            .count();
        // 300 tokens (plus the role chunk): nothing was cut.
        assert!(tokens >= 300, "stream cut short: {tokens} content events");
    }
}

#[tokio::test]
async fn a_replica_is_routable_only_after_its_first_scrape() {
    // Replica 1 is "loading": Kubernetes says ready, but nothing answers yet.
    let s = setup(2, &[1]).await;
    expect_members(&s, &[s.key(0)], SEC).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        s.members(),
        [s.key(0)],
        "not routable before a scrape succeeded"
    );
    let c = client();
    for i in 0..4 {
        let (status, _) = post_json(&c, &s.url(), &chat(MODEL, &format!("q{i}"), 3, false)).await;
        assert_eq!(status, 200);
    }
    // The model finished loading: admitted within a second.
    s.fleet.replica(1).set_faults(Faults::default());
    expect_members(&s, &[s.key(0), s.key(1)], SEC).await;
}

#[tokio::test]
async fn a_configmap_update_applies_within_a_second_and_an_invalid_one_keeps_the_last_good() {
    let s = setup(1, &[]).await;
    expect_members(&s, &[s.key(0)], SEC).await;
    let c = client();
    let (status, _) = post_json(&c, &s.url(), &chat("llama", "hi", 3, false)).await;
    assert_eq!(status, 200);
    let (status, _) = post_json(&c, &s.url(), &chat("tiny", "hi", 3, false)).await;
    assert_eq!(status, 404);

    s.api.upsert(&configmap(&config_yaml("llama, tiny")));
    assert!(
        eventually(SEC, || s.server.gateway.routes().resolve("tiny").is_some()).await,
        "new alias applied within 1 s"
    );
    let (status, _) = post_json(&c, &s.url(), &chat("tiny", "hi", 3, false)).await;
    assert_eq!(status, 200);

    // Invalid: a route naming a pool that does not exist.
    s.api.upsert(&configmap(
        "listeners:\n  main: { address: \"127.0.0.1:0\" }\npools: []\nroutes:\n  - model: x\n    pool: nope\n",
    ));
    assert!(
        eventually(SEC, || s
            .api
            .objects("events")
            .iter()
            .any(|e| e["reason"] == "ConfigRejected"))
        .await,
        "a Warning Event on the ConfigMap"
    );
    let (status, _) = post_json(&c, &s.url(), &chat("tiny", "hi", 3, false)).await;
    assert_eq!(status, 200, "the last good config still serves");
    assert_eq!(s.members(), [s.key(0)], "discovery unaffected");

    // A duration that used to panic the watcher (`Duration::from_secs_f64(1e20)`)
    // is a rejected config with its Event, and the watcher keeps going.
    let rejected = || {
        s.api
            .objects("events")
            .iter()
            .filter(|e| e["reason"] == "ConfigRejected")
            .count()
    };
    let before = rejected();
    let absurd = config_yaml("llama, tiny, huge").replace(
        "    pool: vllm\n",
        "    pool: vllm\n    timeouts: { first_byte: 1e20 }\n",
    );
    s.api.upsert(&configmap(&absurd));
    assert!(
        eventually(SEC, || rejected() > before).await,
        "first_byte: 1e20 gives a Warning Event"
    );
    assert!(s.server.gateway.routes().resolve("huge").is_none());
    let (status, _) = post_json(&c, &s.url(), &chat("tiny", "hi", 3, false)).await;
    assert_eq!(status, 200, "the last good config still serves");
    s.api.upsert(&configmap(&config_yaml("llama, tiny, later")));
    assert!(
        eventually(SEC, || s.server.gateway.routes().resolve("later").is_some()).await,
        "the watcher survived: a later good config applies"
    );
}

fn service(name: &str, annotations: &[(&str, &str)]) -> Service {
    fake_apiserver::annotated_service(NS, name, annotations)
}

/// Sends `n` requests from distinct users; returns how many the canary served.
async fn canary_share(s: &Setup, n: usize) -> usize {
    let c = client();
    let mut canary = 0;
    for i in 0..n {
        let mut body = chat(MODEL, "hello", 2, false);
        body["user"] = format!("user-{i}").into();
        let (status, headers, _) = sim_util::call(&c, "POST", &s.url(), Some(&body)).await;
        assert_eq!(status, 200);
        if headers
            .get("x-infergate-canary-side")
            .is_some_and(|v| v == "canary")
        {
            canary += 1;
        }
    }
    canary
}

#[tokio::test]
async fn canary_annotations_change_the_split_and_removing_them_ends_it() {
    // Replica 0 serves the stable Service, replica 1 the canary's.
    let s = setup_with(&["vllm", "vllm-v2"], &[]).await;
    s.api.upsert(&service("vllm", &[]));
    expect_members(&s, &[s.key(0)], SEC).await;
    assert_eq!(canary_share(&s, 10).await, 0, "no canary yet");

    // The model team annotates its Service: 100 % of users go to the canary.
    s.api.upsert(&service(
        "vllm-v2",
        &[(CANARY_OF, "vllm"), (CANARY_WEIGHT, "100")],
    ));
    let canary_pool = || s.server.gateway.pool("canary:llm/vllm-v2");
    assert!(
        eventually(SEC, || canary_pool()
            .is_some_and(|p| p.replicas().len() == 1))
        .await,
        "canary pool discovered within 1 s"
    );
    let before = s.fleet.replica(1).stats().requests_received;
    assert_eq!(canary_share(&s, 10).await, 10);
    assert_eq!(s.fleet.replica(1).stats().requests_received, before + 10);

    // Weight 30: a share of the users (sticky per user), not all.
    s.api.upsert(&service(
        "vllm-v2",
        &[(CANARY_OF, "vllm"), (CANARY_WEIGHT, "30")],
    ));
    assert!(
        eventually(SEC, || s
            .server
            .gateway
            .canary(MODEL)
            .and_then(|c| c.config())
            .is_some_and(|c| c.weight == 30.0))
        .await,
        "weight change applied within 1 s"
    );
    let share = canary_share(&s, 60).await;
    assert!((5..=35).contains(&share), "30 % of 60 users, got {share}");

    // Removing the annotation ends the canary: everything back on stable.
    s.api.upsert(&service("vllm-v2", &[]));
    assert!(
        eventually(SEC, || canary_pool().is_none()).await,
        "canary pool gone within 1 s"
    );
    let before = s.fleet.replica(1).stats().requests_received;
    assert_eq!(canary_share(&s, 10).await, 0);
    assert_eq!(s.fleet.replica(1).stats().requests_received, before);
}

/// Starts the real binary with `args`, returns it and its API URL (from the
/// "infergate listening on URL" line it prints).
async fn spawn_binary(args: &[&str]) -> (tokio::process::Child, String) {
    use tokio::io::AsyncBufReadExt;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_infergate"))
        .args(args)
        .env_remove("KUBECONFIG")
        .env_remove("POD_NAMESPACE")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let url = tokio::time::timeout(10 * SEC, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(rest) = line.strip_prefix("infergate listening on ") {
                return rest.split_whitespace().next().unwrap().to_string();
            }
        }
        panic!("the binary exited before listening");
    })
    .await
    .expect("listening within 10 s");
    (child, url)
}

#[tokio::test]
async fn the_binary_runs_out_of_cluster_with_a_kubeconfig_and_its_context_namespace() {
    let fleet = start_fleet(FleetConfig {
        replicas: 1,
        ..FleetConfig::with_profile(Profile::Tiny)
    })
    .await
    .unwrap();
    let api = FakeApiServer::start().await;
    api.upsert(&slice_of(&fleet, 0, Some(true), None));
    api.upsert(&configmap(&config_yaml("llama")));
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = api.write_kubeconfig(dir.path(), NS);
    let (mut child, url) = spawn_binary(&[
        "serve",
        "--configmap",
        "infergate-routes",
        "--kubeconfig",
        kubeconfig.to_str().unwrap(),
    ])
    .await;
    let c = client();
    let (status, body) = post_json(
        &c,
        &format!("{url}/v1/chat/completions"),
        &chat("llama", "hi", 3, false),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    // The ConfigMap is live: a new alias works within a second.
    api.upsert(&configmap(&config_yaml("llama, tiny")));
    let mut served = false;
    for _ in 0..20 {
        let (status, _) = post_json(
            &c,
            &format!("{url}/v1/chat/completions"),
            &chat("tiny", "hi", 3, false),
        )
        .await;
        if status == 200 {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(served, "the new alias is served within a second");
    child.kill().await.unwrap();
}

#[tokio::test]
async fn the_binary_hot_reloads_its_config_file_outside_kubernetes() {
    let fleet = start_fleet(FleetConfig {
        replicas: 1,
        ..FleetConfig::with_profile(Profile::Tiny)
    })
    .await
    .unwrap();
    let file_config = |aliases: &str| {
        format!(
            "listeners:\n  main: {{ address: \"127.0.0.1:0\" }}\n\
             pools:\n  - name: p\n    endpoints: [\"{}\"]\n\
             routes:\n  - model: {MODEL}\n    aliases: [{aliases}]\n    target_model: {MODEL}\n    pool: p\n",
            fleet.replica(0).url()
        )
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.yaml");
    std::fs::write(&path, file_config("llama")).unwrap();
    let (mut child, url) = spawn_binary(&["serve", "--config", path.to_str().unwrap()]).await;
    let c = client();
    let chat_url = format!("{url}/v1/chat/completions");
    let status_of = |model: &'static str| {
        let c = c.clone();
        let chat_url = chat_url.clone();
        async move {
            post_json(&c, &chat_url, &chat(model, "hi", 3, false))
                .await
                .0
        }
    };
    assert_eq!(status_of("llama").await, 200);
    assert_eq!(status_of("tiny").await, 404);

    std::fs::write(&path, file_config("llama, tiny")).unwrap();
    let started = std::time::Instant::now();
    while status_of("tiny").await != 200 {
        assert!(
            started.elapsed() < SEC,
            "file change not applied within 1 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // An invalid file is rejected; the last good config keeps serving.
    std::fs::write(&path, "routes: [ {model: x, pool: nope} ]\n").unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(status_of("tiny").await, 200);
    assert_eq!(status_of("llama").await, 200);
    // Durations that used to panic (`1e20`, NaN, negative) are rejected configs:
    // the old one keeps serving and the watcher keeps watching.
    for bad in ["1e20", ".nan", "-5", ".inf"] {
        let text = file_config("llama, tiny, huge").replace(
            "    pool: p\n",
            &format!("    pool: p\n    timeouts: {{ first_byte: {bad} }}\n"),
        );
        std::fs::write(&path, text).unwrap();
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert_eq!(status_of("huge").await, 404, "{bad} rejected");
        assert_eq!(status_of("tiny").await, 200, "{bad}: old config serves");
    }
    std::fs::write(&path, file_config("llama, later")).unwrap();
    let started = std::time::Instant::now();
    while status_of("later").await != 200 {
        assert!(started.elapsed() < 2 * SEC, "the file watcher survived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(child.try_wait().unwrap(), None, "the gateway did not exit");
    child.kill().await.unwrap();
}

#[tokio::test]
async fn a_bad_canary_declared_by_annotation_is_rolled_back_automatically() {
    let s = setup_with(&["vllm", "vllm-v2"], &[]).await;
    // The new version answers every request with 500.
    s.fleet.replica(1).set_faults(Faults {
        error_rate: 1.0,
        ..Faults::default()
    });
    s.api.upsert(&service(
        "vllm-v2",
        &[(CANARY_OF, "vllm"), (CANARY_WEIGHT, "50")],
    ));
    let split = || s.server.gateway.canary(MODEL);
    assert!(
        eventually(SEC, || split()
            .and_then(|c| c.config())
            .is_some_and(|c| c.weight == 50.0))
        .await
            && eventually(SEC, || s
                .server
                .gateway
                .pool("canary:llm/vllm-v2")
                .is_some_and(|p| !p.replicas().is_empty()))
            .await,
        "canary active"
    );
    // Distinct users until the default rollback rules (10 s warm-up, then
    // 50 requests per side, error rate +5 points at 99%) trip; bounded at
    // 30 s and 6,000 requests.
    let c = client();
    let (mut sent, t0) = (0, std::time::Instant::now());
    while split().is_some_and(|c| c.rolled_back().is_none())
        && sent < 6000
        && t0.elapsed() < Duration::from_secs(30)
    {
        let mut body = chat(MODEL, "hello", 2, false);
        body["user"] = format!("user-{sent}").into();
        let _ = sim_util::call(&c, "POST", &s.url(), Some(&body)).await;
        sent += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let reason = split().and_then(|c| c.rolled_back());
    eprintln!("rolled back after {sent} requests: {reason:?}");
    assert!(reason.is_some(), "not rolled back after {sent} requests");
    assert_eq!(canary_share(&s, 20).await, 0, "rolled back: all on stable");
    // A Warning Event on the canary's Service gives the reason and figures.
    let event = || {
        s.api
            .objects("events")
            .into_iter()
            .find(|e| e["reason"] == "CanaryRolledBack" && e["regarding"]["name"] == "vllm-v2")
    };
    assert!(
        eventually(SEC, || event().is_some()).await,
        "no rollback Event"
    );
    let note = event().unwrap()["note"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(note.contains("vs stable") && note.contains("(n="), "{note}");

    // The model team fixes the canary and changes the annotation: re-armed.
    s.fleet.replica(1).set_faults(Faults::default());
    s.api.upsert(&service(
        "vllm-v2",
        &[(CANARY_OF, "vllm"), (CANARY_WEIGHT, "100")],
    ));
    assert!(
        eventually(SEC, || split().is_some_and(
            |c| c.rolled_back().is_none() && c.effective_weight() == 100.0
        ))
        .await,
        "a new annotation re-arms the canary"
    );
    // (Its replica itself stays ejected by outlier detection for a few
    // seconds after failing every request; that is the admission layer's.)
}
