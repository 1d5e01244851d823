//! The admission hook: the step between resolving the route and picking a
//! replica, where a request may wait (queue), be shed (429) or be redirected.
//!
//! Today every request is admitted at once. The admission module plugs in here:
//! `admit` may await, and the [`AdmissionPermit`] it returns lives as long as the
//! request (it is dropped when the response body ends, on every path), so a
//! permit's `Drop` can release queue slots or token budget.

use super::context::RequestContext;
use super::gateway::Route;
use crate::protocol::error::ApiError;

/// Held for the request's whole life; dropping it releases whatever admission reserved.
#[derive(Default)]
pub struct AdmissionPermit {
    _held: Option<Box<dyn Send + Sync>>,
}

impl AdmissionPermit {
    /// Wraps anything whose `Drop` releases the admission's reservation.
    pub fn holding(value: impl Send + Sync + 'static) -> Self {
        AdmissionPermit {
            _held: Some(Box::new(value)),
        }
    }
}

impl std::fmt::Debug for AdmissionPermit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdmissionPermit")
    }
}

/// Decides whether `ctx` may go to `route`'s pool now. Errors (429 shed,
/// 503 no capacity) are answered to the client as they are.
pub async fn admit(route: &Route, ctx: &RequestContext) -> Result<AdmissionPermit, ApiError> {
    let _ = (route, ctx);
    Ok(AdmissionPermit::default())
}
