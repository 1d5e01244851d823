//! The admission step of the request path: between resolving the route and
//! sending upstream. It classifies the request (band, tenant, deadline),
//! picks the canary or stable side, and admits the request on that side's pool
//! (token budget, queue, shedding; see `infergate_core::admission`), falling back to
//! the route's smaller models when a trigger fires. The [`Reservation`] it
//! returns holds the request's tokens on the chosen replica until the
//! response body ends.

use std::sync::Arc;

use http::{HeaderMap, HeaderValue};

use super::context::RequestContext;
use super::gateway::{Route, RouteTable};
use infergate_core::admission::budget::Cost;
use infergate_core::admission::canary;
use infergate_core::admission::fallback::{self, FallbackReason, FallbackTrigger};
use infergate_core::admission::{classify, CanarySide, CanarySplit, RequestClass, Reservation, Ticket};
use infergate_protocol::error::ApiError;
use infergate_core::routing::RouteRequest;

/// Which model and side served a request: for the response headers and the
/// canary's statistics.
#[derive(Debug, Clone, Default)]
pub struct Served {
    /// The model name sent upstream.
    pub model: String,
    pub fallback: Option<FallbackReason>,
    pub canary: Option<(Arc<CanarySplit>, CanarySide)>,
}

/// Adds `x-infergate-served-model`, and when they apply
/// `x-infergate-fallback-reason` and `x-infergate-canary-side`.
pub fn served_headers(h: &mut HeaderMap, s: &Served) {
    if let Ok(v) = HeaderValue::from_str(&s.model) {
        h.insert(fallback::SERVED_MODEL_HEADER, v);
    }
    if let Some(r) = s.fallback {
        h.insert(
            fallback::FALLBACK_REASON_HEADER,
            HeaderValue::from_static(r.as_str()),
        );
    }
    if let Some((_, side)) = &s.canary {
        h.insert(canary::SIDE_HEADER, HeaderValue::from_static(side.as_str()));
    }
}

/// The route side a request was admitted to, with its reservation.
#[derive(Debug)]
pub struct Admitted {
    /// The route (or canary side, or fallback route) serving the request.
    pub route: Arc<Route>,
    pub reservation: Reservation,
    /// Why a fallback serves it (`None`: its own route).
    pub fallback: Option<FallbackReason>,
}

impl Admitted {
    /// The model name sent upstream.
    pub fn upstream_model<'a>(&'a self, ctx: &'a RequestContext) -> &'a str {
        upstream_model(&self.route, ctx, self.fallback.is_some())
    }
}

fn upstream_model<'a>(route: &'a Route, ctx: &'a RequestContext, fallback: bool) -> &'a str {
    match (&route.config.target_model, fallback) {
        (Some(t), _) => t,
        (None, true) => &route.name,
        (None, false) => &ctx.features.model,
    }
}

/// One request's admission: its class, its side, what it may fall back to.
#[derive(Debug)]
pub struct AdmissionPlan {
    pub class: RequestClass,
    /// The canary split and side, when the route has a canary.
    pub canary: Option<(Arc<CanarySplit>, CanarySide)>,
    /// The route whose config decides (the one the client named).
    origin: Arc<Route>,
    primary: Arc<Route>,
    /// Fallback routes not tried yet, in order (empty when forbidden).
    fallbacks: std::vec::IntoIter<Arc<Route>>,
}

impl AdmissionPlan {
    pub fn new(
        table: &RouteTable,
        route: &Arc<Route>,
        ctx: &RequestContext,
        headers: &HeaderMap,
    ) -> Self {
        let cfg = &route.config.admission;
        let user = ctx.features.user.as_deref();
        let class = classify(headers, user, cfg);
        let (side, target) = route.canary.choose(headers, user);
        let canary_side = match (&target, &route.canary_side) {
            (Some(t), Some(cs)) if *cs.pool.name == *t.pool => Some(cs.clone()),
            _ => None,
        };
        let canary = (cfg.canary.is_some() || route.canary.config().is_some()).then(|| {
            let side = if canary_side.is_some() {
                side
            } else {
                CanarySide::Stable
            };
            (route.canary.clone(), side)
        });
        let fallbacks: Vec<Arc<Route>> = if fallback::forbidden(headers) {
            Vec::new()
        } else {
            cfg.fallback
                .models
                .iter()
                .filter_map(|m| table.resolve(m).cloned())
                .collect()
        };
        AdmissionPlan {
            class,
            canary,
            origin: route.clone(),
            primary: canary_side.unwrap_or_else(|| route.clone()),
            fallbacks: fallbacks.into_iter(),
        }
    }

    fn ticket(&self, ctx: &RequestContext) -> Ticket {
        let fb = &self.origin.config.admission.fallback;
        Ticket {
            class: self.class.clone(),
            cost: Cost::estimate(
                ctx.features.prompt_tokens,
                Some(ctx.expected_output_tokens),
                0,
            ),
            predict_wait: self.fallbacks.len() > 0 && fb.triggers(FallbackReason::QueueDeadline),
        }
    }

    /// Admits the request on its side's pool, or on the fallbacks as the
    /// route's triggers allow. Waits in the queue when the pool is full.
    pub async fn admit(&mut self, ctx: &RequestContext) -> Result<Admitted, ApiError> {
        let mut candidate = self.primary.clone();
        let mut reason = None;
        loop {
            match acquire(&candidate, ctx, &self.ticket(ctx), reason.is_some(), &[]).await {
                Ok(reservation) => {
                    return Ok(Admitted {
                        route: candidate,
                        reservation,
                        fallback: reason,
                    })
                }
                Err(infergate_core::admission::AdmitError::NoReadyReplica)
                    if reason.is_none() && !Arc::ptr_eq(&candidate, &self.origin) =>
                {
                    // The canary side has no ready replica: count it against
                    // the canary and serve the user from the stable side.
                    if let Some((split, side)) = &mut self.canary {
                        split.record(CanarySide::Canary, false, None);
                        *side = CanarySide::Stable;
                    }
                    candidate = self.origin.clone();
                }
                Err(e) => {
                    let model = upstream_model(&candidate, ctx, reason.is_some()).to_owned();
                    let next = FallbackReason::from_admit(e)
                        .and_then(|r| self.next_fallback(&candidate, r).map(|n| (r, n)));
                    match next {
                        Some((r, n)) => {
                            reason = Some(r);
                            candidate = n;
                        }
                        None => {
                            let retry = candidate.admission.queue_config().retry_after_secs;
                            return Err(e.to_api_error(&model, retry));
                        }
                    }
                }
            }
        }
    }

    /// Every attempt on `failed` failed before the first byte: admits the
    /// request on the next fallback when the route allows it.
    pub async fn after_upstream_failure(
        &mut self,
        failed: &Arc<Route>,
        ctx: &RequestContext,
    ) -> Option<Result<Admitted, ApiError>> {
        let mut candidate = self.next_fallback(failed, FallbackReason::UpstreamFailure)?;
        loop {
            match acquire(&candidate, ctx, &self.ticket(ctx), true, &[]).await {
                Ok(reservation) => {
                    return Some(Ok(Admitted {
                        route: candidate,
                        reservation,
                        fallback: Some(FallbackReason::UpstreamFailure),
                    }))
                }
                Err(e) => match self.fallbacks.next() {
                    Some(n) => candidate = n,
                    None => {
                        let retry = candidate.admission.queue_config().retry_after_secs;
                        return Some(Err(e.to_api_error(&candidate.name, retry)));
                    }
                },
            }
        }
    }

    /// A retry on `route` (the side admitted), never on a replica in `exclude`.
    pub async fn retry(
        &self,
        route: &Route,
        fallback: bool,
        ctx: &RequestContext,
        exclude: &[Arc<str>],
    ) -> Option<Reservation> {
        acquire(route, ctx, &self.ticket(ctx), fallback, exclude)
            .await
            .ok()
    }

    fn next_fallback(&mut self, from: &Route, reason: FallbackReason) -> Option<Arc<Route>> {
        if !self.origin.config.admission.fallback.triggers(reason) {
            return None;
        }
        let next = self.fallbacks.next()?;
        fallback::record(&self.origin.name, &from.name, &next.name, reason);
        Some(next)
    }
}

async fn acquire(
    route: &Route,
    ctx: &RequestContext,
    ticket: &Ticket,
    fallback: bool,
    exclude: &[Arc<str>],
) -> Result<Reservation, infergate_core::admission::AdmitError> {
    let rr = RouteRequest {
        request_id: &ctx.request_id,
        model: upstream_model(route, ctx, fallback),
        prompt_text: &ctx.features.prompt_text,
        prompt_tokens: ctx.features.prompt_tokens,
        max_tokens: ctx.expected_output_tokens,
        lora: None,
        hashes: Default::default(),
    };
    route
        .admission
        .acquire(&route.pool, &*route.picker, &rr, ticket, exclude)
        .await
}
