//! Fallback to smaller models: when a route's own target cannot serve a
//! request, its ordered list of fallback models is tried.
//!
//! Triggers (each can be switched off per route): the target has no ready
//! replica; the request would wait in the queue past its deadline; every
//! attempt failed before the first response byte. The request body's `model`
//! is rewritten for the fallback target, the response header
//! [`SERVED_MODEL_HEADER`] names the model that served, a metric counts
//! fallbacks by reason, and [`NO_FALLBACK_HEADER`] lets a client forbid it.

use http::HeaderMap;

use super::config::FallbackConfig;
use super::queue::AdmitError;

/// Request header: `true`/`1` forbids serving the request with another model.
pub(crate) const NO_FALLBACK_HEADER: &str = "x-infergate-no-fallback";
/// Response header naming the model that served the request.
pub const SERVED_MODEL_HEADER: http::HeaderName =
    http::HeaderName::from_static("x-infergate-served-model");
/// Response header with the fallback reason, when a fallback served.
pub const FALLBACK_REASON_HEADER: http::HeaderName =
    http::HeaderName::from_static("x-infergate-fallback-reason");

/// Why a request went to a fallback model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FallbackReason {
    NoReadyReplica,
    QueueDeadline,
    UpstreamFailure,
}

impl FallbackReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FallbackReason::NoReadyReplica => "no_ready_replica",
            FallbackReason::QueueDeadline => "queue_deadline",
            FallbackReason::UpstreamFailure => "upstream_failure",
        }
    }

    /// The trigger an admission refusal corresponds to (shedding and a full
    /// queue are load signals the client should see, not fallback triggers).
    pub fn from_admit(e: AdmitError) -> Option<FallbackReason> {
        match e {
            AdmitError::NoReadyReplica => Some(FallbackReason::NoReadyReplica),
            AdmitError::DeadlineExceeded | AdmitError::WouldExceedDeadline => {
                Some(FallbackReason::QueueDeadline)
            }
            AdmitError::Shed | AdmitError::QueueFull => None,
        }
    }
}

/// Per-route fallback decisions.
pub trait FallbackTrigger {
    /// Whether `reason` moves the request to the next fallback model.
    fn triggers(&self, reason: FallbackReason) -> bool;
}

impl FallbackTrigger for FallbackConfig {
    fn triggers(&self, reason: FallbackReason) -> bool {
        !self.models.is_empty()
            && match reason {
                FallbackReason::NoReadyReplica => self.on_no_ready_replica,
                FallbackReason::QueueDeadline => self.on_queue_deadline,
                FallbackReason::UpstreamFailure => self.on_upstream_failure,
            }
    }
}

/// Whether the client forbade fallback.
pub(crate) fn forbidden(headers: &HeaderMap) -> bool {
    headers
        .get(NO_FALLBACK_HEADER)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes"))
}

/// Counts one fallback (metric and log line).
pub(crate) fn record(route: &str, from: &str, to: &str, reason: FallbackReason) {
    metrics::counter!("infergate_fallbacks_total", "route" => route.to_string(), "from" => from.to_string(), "to" => to.to_string(), "reason" => reason.as_str())
        .increment(1);
    tracing::info!(
        route,
        from,
        to,
        reason = reason.as_str(),
        "request falls back to another model"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn triggers_follow_config_and_header() {
        let mut c = FallbackConfig::default();
        assert!(
            !c.triggers(FallbackReason::NoReadyReplica),
            "no models, no fallback"
        );
        c.models = vec!["small".into()];
        c.on_upstream_failure = false;
        assert!(c.triggers(FallbackReason::NoReadyReplica));
        assert!(c.triggers(FallbackReason::QueueDeadline));
        assert!(!c.triggers(FallbackReason::UpstreamFailure));
        assert_eq!(
            FallbackReason::from_admit(AdmitError::WouldExceedDeadline),
            Some(FallbackReason::QueueDeadline)
        );
        assert_eq!(FallbackReason::from_admit(AdmitError::Shed), None);
        let mut h = HeaderMap::new();
        assert!(!forbidden(&h));
        h.insert(NO_FALLBACK_HEADER, "true".parse().unwrap());
        assert!(forbidden(&h));
    }
}
