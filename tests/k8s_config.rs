//! The routes ConfigMap, canary annotations, Events and client setup against
//! the in-process fake API server.

#[path = "support_k8s/fake_apiserver.rs"]
mod fake_apiserver;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use fake_apiserver::FakeApiServer;
use infergate_core::reload::Rejected;
use infergate_kube::{
    connect, CanarySet, CanaryWatch, ConfigMapWatch, EventPublisher, KubeOptions, WatchOptions,
    CANARY_MODEL, CANARY_OF, CANARY_WEIGHT,
};
use k8s_openapi::api::core::v1::{ConfigMap, Service};

const NS: &str = "llm";
const SEC: Duration = Duration::from_secs(1);

fn fast() -> WatchOptions {
    WatchOptions {
        backoff_min: Duration::from_millis(50),
        backoff_max: Duration::from_millis(400),
    }
}

fn configmap(text: &str) -> ConfigMap {
    fake_apiserver::configmap(NS, "infergate-routes", "config.yaml", text)
}

/// A config target accepting YAML with a string `version`; records what it applied.
fn target() -> (
    impl infergate_core::reload::ConfigTarget,
    Arc<Mutex<Vec<String>>>,
) {
    let applied = Arc::new(Mutex::new(Vec::new()));
    let a = applied.clone();
    let t = move |yaml: &str, _origin: &str| -> Result<(), Rejected> {
        let v: serde_yaml_ng::Value =
            serde_yaml_ng::from_str(yaml).map_err(|e| Rejected(e.to_string()))?;
        let version = v
            .get("version")
            .and_then(|v| v.as_str())
            .ok_or_else(|| Rejected("version: missing".into()))?;
        a.lock().unwrap().push(version.to_string());
        Ok(())
    };
    (t, applied)
}

async fn eventually(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + within;
    while !cond() {
        if tokio::time::Instant::now() >= deadline {
            panic!("{what}: not within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn configmap_updates_apply_within_a_second_and_invalid_ones_keep_the_last_good() {
    let api = FakeApiServer::start().await;
    api.upsert(&configmap("version: v1\n"));
    let client = api.client(NS);
    let watch = ConfigMapWatch {
        options: fast(),
        ..ConfigMapWatch::new(NS, "infergate-routes")
    };
    let initial = watch.initial(client.clone()).await.unwrap();
    assert_eq!(initial, "version: v1\n");
    let (t, applied) = target();
    let events = EventPublisher::new(client.clone());
    let task = tokio::spawn(watch.run(client, t, Some(events), Some("version: v1\n".into())));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        applied.lock().unwrap().is_empty(),
        "the initial config is not re-applied"
    );

    api.upsert(&configmap("version: v2\n"));
    eventually("v2 applied", SEC, || *applied.lock().unwrap() == ["v2"]).await;

    // Invalid: rejected, a Warning Event on the ConfigMap, v2 stays.
    api.upsert(&configmap("routes: [\n"));
    eventually("ConfigRejected event", SEC, || {
        api.objects("events").iter().any(|e| {
            e["reason"] == "ConfigRejected"
                && e["type"] == "Warning"
                && e["regarding"]["kind"] == "ConfigMap"
                && e["regarding"]["name"] == "infergate-routes"
        })
    })
    .await;
    assert_eq!(*applied.lock().unwrap(), ["v2"]);

    // A ConfigMap without the key is rejected the same way.
    let mut wrong_key = configmap("version: v3\n");
    wrong_key.data = Some(
        [("other.yaml".to_string(), "version: v3\n".to_string())]
            .into_iter()
            .collect(),
    );
    api.upsert(&wrong_key);
    eventually("missing-key event", SEC, || {
        api.objects("events").iter().any(|e| {
            e["note"]
                .as_str()
                .is_some_and(|n| n.contains("no data key"))
        })
    })
    .await;

    // Deleting it keeps the config; recreating it applies again, also after a 410.
    api.delete("configmaps", NS, "infergate-routes");
    tokio::time::sleep(Duration::from_millis(100)).await;
    api.compact_and_disconnect_with(|m| m.upsert(&configmap("version: v4\n")));
    eventually("v4 applied after relist", 2 * SEC, || {
        *applied.lock().unwrap() == ["v2", "v4"]
    })
    .await;
    task.abort();
}

#[tokio::test]
async fn events_forbidden_by_rbac_do_not_break_reloads() {
    let api = FakeApiServer::start().await;
    api.forbid("events");
    api.upsert(&configmap("version: v1\n"));
    let client = api.client(NS);
    let (t, applied) = target();
    let watch = ConfigMapWatch {
        options: fast(),
        ..ConfigMapWatch::new(NS, "infergate-routes")
    };
    let task = tokio::spawn(watch.run(client.clone(), t, Some(EventPublisher::new(client)), None));
    eventually("v1 applied", SEC, || *applied.lock().unwrap() == ["v1"]).await;
    api.upsert(&configmap("nope: [\n"));
    api.upsert(&configmap("version: v2\n"));
    eventually("v2 applied", SEC, || {
        *applied.lock().unwrap() == ["v1", "v2"]
    })
    .await;
    assert!(api.objects("events").is_empty());
    task.abort();
}

fn service(name: &str, annotations: &[(&str, &str)]) -> Service {
    fake_apiserver::annotated_service(NS, name, annotations)
}

#[tokio::test]
async fn canary_annotations_change_and_end_the_split() {
    let api = FakeApiServer::start().await;
    api.upsert(&service("llama-v1", &[]));
    let client = api.client(NS);
    let (tx, mut rx) = tokio::sync::watch::channel(CanarySet::default());
    let watch = CanaryWatch {
        options: fast(),
        ..CanaryWatch::new(NS)
    };
    let task = tokio::spawn(watch.run(client.clone(), tx, Some(EventPublisher::new(client))));
    let weight = |rx: &tokio::sync::watch::Receiver<CanarySet>| {
        rx.borrow()
            .for_stable(NS, "llama-v1")
            .map(|c| (c.service.clone(), c.weight))
    };

    api.upsert(&service(
        "llama-v2",
        &[
            (CANARY_OF, "llama-v1"),
            (CANARY_WEIGHT, "10"),
            (CANARY_MODEL, "llama-3-8b-v2"),
        ],
    ));
    tokio::time::timeout(SEC, rx.wait_for(|s| !s.0.is_empty()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(weight(&rx), Some(("llama-v2".to_string(), 10)));

    // Promote: 50 %.
    api.upsert(&service(
        "llama-v2",
        &[
            (CANARY_OF, "llama-v1"),
            (CANARY_WEIGHT, "50"),
            (CANARY_MODEL, "llama-3-8b-v2"),
        ],
    ));
    tokio::time::timeout(
        SEC,
        rx.wait_for(|s| s.0.first().is_some_and(|c| c.weight == 50)),
    )
    .await
    .unwrap()
    .unwrap();

    // An invalid weight ends the split and is reported on the Service.
    api.upsert(&service(
        "llama-v2",
        &[(CANARY_OF, "llama-v1"), (CANARY_WEIGHT, "lots")],
    ));
    tokio::time::timeout(SEC, rx.wait_for(|s| s.0.is_empty()))
        .await
        .unwrap()
        .unwrap();
    eventually("InvalidCanary event", SEC, || {
        api.objects("events")
            .iter()
            .any(|e| e["reason"] == "InvalidCanary" && e["regarding"]["name"] == "llama-v2")
    })
    .await;

    // Back to 10 %, then the annotation is removed: the split ends.
    api.upsert(&service(
        "llama-v2",
        &[(CANARY_OF, "llama-v1"), (CANARY_WEIGHT, "10")],
    ));
    tokio::time::timeout(SEC, rx.wait_for(|s| !s.0.is_empty()))
        .await
        .unwrap()
        .unwrap();
    api.upsert(&service("llama-v2", &[]));
    tokio::time::timeout(SEC, rx.wait_for(|s| s.0.is_empty()))
        .await
        .unwrap()
        .unwrap();

    // Deleting a canary Service also ends it.
    api.upsert(&service(
        "llama-v3",
        &[(CANARY_OF, "llama-v1"), (CANARY_WEIGHT, "5")],
    ));
    tokio::time::timeout(SEC, rx.wait_for(|s| !s.0.is_empty()))
        .await
        .unwrap()
        .unwrap();
    api.delete("services", NS, "llama-v3");
    tokio::time::timeout(SEC, rx.wait_for(|s| s.0.is_empty()))
        .await
        .unwrap()
        .unwrap();
    task.abort();
}

#[tokio::test]
async fn connects_with_an_explicit_kubeconfig_and_its_namespace() {
    let api = FakeApiServer::start().await;
    api.upsert(&configmap("version: v1\n"));
    let dir = tempfile::tempdir().unwrap();
    let path = api.write_kubeconfig(dir.path(), NS);
    let cluster = connect(&KubeOptions {
        kubeconfig: Some(path.clone()),
        ..KubeOptions::default()
    })
    .await
    .unwrap();
    assert_eq!(cluster.namespace, NS);
    let text = ConfigMapWatch::new(&cluster.namespace, "infergate-routes")
        .initial(cluster.client)
        .await
        .unwrap();
    assert_eq!(text, "version: v1\n");

    // The flag wins over the context's namespace.
    let cluster = connect(&KubeOptions {
        kubeconfig: Some(path),
        namespace: Some("other".into()),
        ..KubeOptions::default()
    })
    .await
    .unwrap();
    assert_eq!(cluster.namespace, "other");
    let err = ConfigMapWatch::new("other", "infergate-routes")
        .initial(cluster.client)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("does not exist"), "{err}");
}
