//! The manifests in deploy/: they build with kustomize and validate against the
//! Kubernetes schemas (external tools: kubectl, kubernetes-validate), and they
//! agree with what the gateway reads (annotation names, ConfigMap name, config).
//!
//! The test that needs the tools is `#[ignore]`d: `cargo test --
//! --include-ignored` (what .ci/run does, after installing them) runs it. Run
//! that way without them, it skips with a message, unless
//! INFERGATE_REQUIRE_EXTERNAL=1 (CI), which fails it.

use std::path::{Path, PathBuf};
use std::process::Command;

use infergate_kube::Canary;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::rbac::v1::Role;
use serde::de::DeserializeOwned;
use serde::Deserialize;

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

/// Every document of `file` of the given kind.
fn docs<K: DeserializeOwned>(file: &str, kind: &str) -> Vec<K> {
    let text = std::fs::read_to_string(deploy().join(file)).unwrap();
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(serde_yaml_ng::Value::deserialize)
        .map(Result::unwrap)
        .filter(|v| v.get("kind").and_then(|k| k.as_str()) == Some(kind))
        .map(|v| serde_yaml_ng::from_value(v).unwrap())
        .collect()
}

fn tool_present(cmd: &str, arg: &str) -> bool {
    Command::new(cmd)
        .arg(arg)
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
#[ignore = "needs kubectl and kubernetes-validate: apt-get install kubectl; python3 -m pip install kubernetes-validate"]
fn every_overlay_builds_and_validates() {
    let missing: Vec<&str> = [("kubectl", "help"), ("kubernetes-validate", "--version")]
        .into_iter()
        .filter(|(c, a)| !tool_present(c, a))
        .map(|(c, _)| c)
        .collect();
    if !missing.is_empty() {
        if std::env::var("INFERGATE_REQUIRE_EXTERNAL").as_deref() == Ok("1") {
            panic!("required tools missing: {missing:?} (see .ci/run)");
        }
        eprintln!("skipping: {missing:?} not installed (pip install kubernetes-validate; apt-get install kubectl)");
        return;
    }
    let out = Command::new(deploy().join("validate.sh")).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "deploy/validate.sh failed:\n{stdout}\n{stderr}"
    );
    for dir in [
        "base",
        "overlays/dev",
        "overlays/production",
        "examples/vllm",
        "examples/scale-from-zero",
    ] {
        assert!(
            stdout.contains(&format!("kubectl kustomize deploy/{dir}")),
            "{dir} not built:\n{stdout}"
        );
    }
}

#[test]
fn the_example_canary_uses_the_annotations_the_gateway_reads() {
    let services: Vec<Service> = docs("examples/vllm/vllm-llama-v2-canary.yaml", "Service");
    let c = Canary::parse(&services[0])
        .unwrap()
        .expect("the example is a canary");
    assert_eq!(c.stable, "vllm-llama");
    assert_eq!(c.weight, 10);
    assert_eq!(c.model.as_deref(), Some("llama-3-8b-v2"));
    let stable: Vec<Service> = docs("examples/vllm/vllm-llama.yaml", "Service");
    assert_eq!(stable[0].metadata.name.as_deref(), Some("vllm-llama"));
    assert_eq!(Canary::parse(&stable[0]).unwrap(), None);
    // The stable Service must not select the canary's pods.
    let sel = |s: &Service| s.spec.as_ref().unwrap().selector.clone().unwrap();
    assert_ne!(sel(&stable[0]), sel(&services[0]));
}

/// Every `infergate_*` and `gen_ai_*` name in `text` (histogram suffixes
/// aside; GenAI label names are matched too, and exported too).
fn metric_names(text: &str) -> Vec<&str> {
    let mut names = Vec::new();
    let mut i = 0;
    let next = |from: usize| {
        ["infergate_", "gen_ai_"]
            .iter()
            .filter_map(|p| text[from..].find(p))
            .min()
    };
    while let Some(pos) = next(i) {
        let start = i + pos;
        let end = start
            + text[start..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(text.len() - start);
        i = end;
        // Skip recording-rule names (`route:infergate_...:rate5m`).
        if start > 0 && text.as_bytes()[start - 1] == b':' {
            continue;
        }
        let name = &text[start..end];
        names.push(
            ["_bucket", "_count", "_sum"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(name),
        );
    }
    names
}

/// The Rust sources of the workspace, concatenated.
fn sources() -> String {
    let mut sources = String::new();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut dirs = vec![root.join("src"), root.join("crates")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                sources.push_str(&std::fs::read_to_string(path).unwrap());
            }
        }
    }
    sources
}

/// The scale-from-zero example scales the example Deployment from 0 on a
/// query of gauges the gateway exports, for a pool the routes config names.
#[test]
fn the_scale_from_zero_example_queries_the_demand_of_a_configured_pool() {
    let text = std::fs::read_to_string(deploy().join("examples/scale-from-zero/scaledobject.yaml"))
        .unwrap();
    let so: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).unwrap();
    assert_eq!(so["kind"].as_str(), Some("ScaledObject"));
    let spec = &so["spec"];
    assert_eq!(spec["minReplicaCount"].as_u64(), Some(0), "scales to zero");
    let target = spec["scaleTargetRef"]["name"].as_str().unwrap();
    let deployments: Vec<Deployment> = docs("examples/vllm/vllm-llama.yaml", "Deployment");
    assert_eq!(deployments[0].metadata.name.as_deref(), Some(target));
    let trigger = &spec["triggers"][0];
    assert_eq!(trigger["type"].as_str(), Some("prometheus"));
    let query = trigger["metadata"]["query"].as_str().unwrap();
    let names = metric_names(query);
    assert!(
        names.contains(&"infergate_admission_queue_depth"),
        "{query}"
    );
    let sources = sources();
    for name in names {
        assert!(
            sources.contains(&format!("\"{name}\"")),
            "the query uses {name}, which no code exports"
        );
    }
    let path = deploy().join("base/config.yaml");
    let config = infergate_core::config::Config::parse(
        &std::fs::read_to_string(&path).unwrap(),
        &path.display().to_string(),
    )
    .unwrap();
    let pools: Vec<&str> = config.pools.iter().map(|p| p.name.as_str()).collect();
    let label = query
        .split("pool=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .unwrap();
    assert!(pools.contains(&label), "pool {label} not in {pools:?}");
    assert!(
        query.matches(&format!("pool=\"{label}\"")).count() == query.matches("pool=").count(),
        "one pool throughout: {query}"
    );
}

#[test]
fn rbac_allows_exactly_the_configmap_the_deployment_watches() {
    let deployments: Vec<Deployment> = docs("base/deployment.yaml", "Deployment");
    let pod = deployments[0]
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap();
    let args = pod.containers[0].args.clone().unwrap();
    let name = args
        .iter()
        .find_map(|a| a.strip_prefix("--configmap="))
        .expect("--configmap=NAME in the args");
    let roles: Vec<Role> = docs("base/rbac.yaml", "Role");
    let rules = roles[0].rules.clone().unwrap();
    let cm_rule = rules
        .iter()
        .find(|r| {
            r.resources
                .as_ref()
                .is_some_and(|res| res.contains(&"configmaps".to_string()))
        })
        .unwrap();
    assert_eq!(
        cm_rule.resource_names.as_deref(),
        Some(&[name.to_string()][..])
    );
    // Read-only everywhere except creating Events.
    for r in &rules {
        let verbs = &r.verbs;
        let events = r
            .resources
            .as_ref()
            .unwrap()
            .contains(&"events".to_string());
        if events {
            assert_eq!(verbs, &["create"]);
        } else {
            assert!(
                verbs
                    .iter()
                    .all(|v| ["get", "list", "watch"].contains(&v.as_str())),
                "{verbs:?}"
            );
        }
    }
    let kustomization = std::fs::read_to_string(deploy().join("base/kustomization.yaml")).unwrap();
    assert!(
        kustomization.contains(&format!("- name: {name}")),
        "ConfigMap generator named {name}"
    );
    assert!(kustomization.contains("disableNameSuffixHash: true"));
}

#[test]
fn the_routes_configmap_is_a_valid_config_naming_the_example_service() {
    let path = deploy().join("base/config.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let config = infergate_core::config::Config::parse(&text, &path.display().to_string())
        .unwrap_or_else(|e| panic!("{e}"));
    let stable: Vec<Service> = docs("examples/vllm/vllm-llama.yaml", "Service");
    let svc_name = stable[0].metadata.name.clone().unwrap();
    let port_names: Vec<String> = stable[0]
        .spec
        .as_ref()
        .unwrap()
        .ports
        .as_ref()
        .unwrap()
        .iter()
        .filter_map(|p| p.name.clone())
        .collect();
    let pool = config
        .pools
        .iter()
        .find(|p| p.service.is_some())
        .expect("a Service pool");
    let sref = pool.service.as_ref().unwrap();
    assert_eq!(sref.name, svc_name);
    match &sref.port {
        infergate_core::config::PortRef::Name(n) => {
            assert!(port_names.contains(n), "{n} not in {port_names:?}")
        }
        infergate_core::config::PortRef::Number(n) => panic!("use the port name, found {n}"),
    }
    // Listeners reachable from the pod network and the probes' admin port.
    assert_eq!(config.listeners.main.address.port(), 8080);
    assert_eq!(
        config.listeners.admin.as_ref().unwrap().address.port(),
        9090
    );
}

/// Every `infergate_*` metric the alerts and the dashboard query is one the
/// code exports (histogram suffixes aside), so they cannot drift apart.
#[test]
fn alerts_and_dashboard_query_metrics_the_code_exports() {
    let sources = sources();
    let mut checked = 0;
    for file in [
        "components/monitoring/prometheusrule.yaml",
        "components/monitoring/infergate-dashboard.json",
    ] {
        let text = std::fs::read_to_string(deploy().join(file)).unwrap();
        for base in metric_names(&text) {
            // A metric is registered by name or written as text (`# TYPE`).
            assert!(
                sources.contains(&format!("\"{base}\""))
                    || sources.contains(&format!("# TYPE {base} ")),
                "{file} queries {base}, which no code exports"
            );
            checked += 1;
        }
    }
    assert!(checked > 20, "only {checked} metric references found");
}
