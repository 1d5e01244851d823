//! Kubernetes Events about objects we read (a rejected ConfigMap, a bad canary
//! annotation), so `kubectl describe` shows the problem next to the object.
//!
//! Events are best effort: where RBAC forbids creating them the first refusal
//! is logged once and no more are attempted; publishing never blocks the caller.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use ::kube::api::{Api, PostParams};
use ::kube::Client;
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;

/// The name under which infergate reports events.
const REPORTING_CONTROLLER: &str = "infergate.io/gateway";

/// Publishes Warning events (cheap to clone).
#[derive(Clone)]
pub struct EventPublisher {
    client: Client,
    /// This pod's name (`POD_NAME` from the downward API), else the controller name.
    instance: String,
    disabled: Arc<AtomicBool>,
}

impl std::fmt::Debug for EventPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventPublisher")
            .field("instance", &self.instance)
            .finish_non_exhaustive()
    }
}

impl EventPublisher {
    pub fn new(client: Client) -> Self {
        EventPublisher {
            client,
            instance: std::env::var("POD_NAME").unwrap_or_else(|_| "infergate".to_string()),
            disabled: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Publishes a Warning event about `regarding` in the background.
    pub(crate) fn warn(
        &self,
        regarding: ObjectReference,
        reason: &str,
        action: &str,
        note: String,
    ) {
        if self.disabled.load(Ordering::Relaxed) {
            return;
        }
        let this = self.clone();
        let event = warning(regarding, reason, action, note, &self.instance);
        tokio::spawn(async move {
            let ns = event
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".to_string());
            let api: Api<Event> = Api::namespaced(this.client.clone(), &ns);
            match api.create(&PostParams::default(), &event).await {
                Ok(_) => {}
                Err(::kube::Error::Api(status)) if status.is_forbidden() => {
                    if !this.disabled.swap(true, Ordering::Relaxed) {
                        tracing::warn!(
                            "RBAC does not allow creating events.k8s.io Events; not publishing any ({})",
                            status.message
                        );
                    }
                }
                Err(e) => tracing::warn!(error = %e, "publishing a Kubernetes Event failed"),
            }
        });
    }
}

fn warning(
    regarding: ObjectReference,
    reason: &str,
    action: &str,
    note: String,
    instance: &str,
) -> Event {
    let now = Timestamp::now();
    // The note is limited to 1 kB by the API.
    let mut note = note;
    if note.len() > 1000 {
        let mut cut = 1000;
        while !note.is_char_boundary(cut) {
            cut -= 1;
        }
        note.truncate(cut);
    }
    Event {
        metadata: ObjectMeta {
            name: Some(format!(
                "{}.{:x}",
                regarding.name.as_deref().unwrap_or("infergate"),
                now.as_nanosecond()
            )),
            namespace: regarding.namespace.clone(),
            ..ObjectMeta::default()
        },
        event_time: Some(MicroTime(now)),
        type_: Some("Warning".to_string()),
        reason: Some(reason.to_string()),
        action: Some(action.to_string()),
        note: Some(note),
        regarding: Some(regarding),
        reporting_controller: Some(REPORTING_CONTROLLER.to_string()),
        reporting_instance: Some(instance.to_string()),
        ..Event::default()
    }
}

/// A reference to a namespaced object of type `K`.
pub(crate) fn object_ref<K>(namespace: &str, name: &str, uid: Option<String>) -> ObjectReference
where
    K: k8s_openapi::Resource,
{
    ObjectReference {
        api_version: Some(K::API_VERSION.to_string()),
        kind: Some(K::KIND.to_string()),
        namespace: Some(namespace.to_string()),
        name: Some(name.to_string()),
        uid,
        ..ObjectReference::default()
    }
}
