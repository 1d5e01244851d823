//! One request's plan: the state machine that decides every attempt.
//!
//! A request may be admitted on the canary or the stable side of its route,
//! retried on another replica, moved to a fallback model, or refused. All of
//! those decisions live here, in one place, and nowhere else: the plan takes
//! the outcome of the last step ([`Event`]) and returns the next one
//! ([`Step`]). It does no I/O: the data plane (today the HTTP proxy; later an
//! Envoy ext_proc endpoint picker) executes each step (admits on a pool, which
//! may wait in its queue; sends to the reserved replica) and reports back.
//!
//! The rules:
//! - **side**: the canary split picks canary or stable; a canary side with no
//!   ready replica counts against the canary and serves from stable.
//! - **admission refusals** (no ready replica, queue deadline) move to the next
//!   fallback model when the route's triggers allow; shedding and a full queue
//!   are the client's answer (429), never a fallback.
//! - **waiting for a replica** (scale from zero,
//!   [`Ticket::wait_for_replica`]): a side with no ready replica is waited for,
//!   up to the request's deadline, only when nothing else could serve it now:
//!   not on the canary side, a retry, after an upstream failure, or when a
//!   fallback takes over on "no ready replica".
//! - **retry** ([`RequestPlan::is_retryable`]): only before any response byte:
//!   a connect failure, or a status in `retries.on_status` while another
//!   untried replica exists, within `retries.attempts` tries on the side.
//!   Never after a first-byte timeout (the engine may be working on it) or a
//!   failure after the request was sent.
//! - **upstream failure**: when every try on a side failed (a 5xx answer, or an
//!   error other than a first-byte timeout) before the first-byte deadline,
//!   the next fallback model is admitted if the route allows.

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{HeaderMap, StatusCode};
use infergate_protocol::error::ApiError;

use crate::admission::budget::Cost;
use crate::admission::fallback::{self, FallbackReason, FallbackTrigger};
use crate::admission::queue::{AdmitError, Ticket};
use crate::admission::{classify, CanarySide, CanarySplit, Entitlements, RequestClass, Stratum};
use crate::config::RouteConfig;
use crate::pool::Pool;

#[cfg(test)]
mod tests;

/// What the plan needs to know of a route (or of a route's canary side). The
/// proxy's route implements it; so can another front end's.
pub trait PlanRoute: Sized {
    /// The route's primary model name.
    fn name(&self) -> &Arc<str>;
    fn config(&self) -> &RouteConfig;
    /// The route's canary split (no canary configured: always stable).
    fn canary(&self) -> &Arc<CanarySplit>;
    /// The canary side: this route's config over the canary pool.
    fn canary_side(&self) -> Option<&Arc<Self>>;
    fn pool(&self) -> &Pool;
    /// `Retry-After` seconds for a refusal on this route's pool.
    fn retry_after_secs(&self) -> u64;
}

/// What the executor does next.
#[derive(Debug)]
pub enum Step<R> {
    /// Reserve a replica of `route`'s pool for the request (it may wait in the
    /// pool's queue), never one of [`RequestPlan::excluded`]; report
    /// [`Event::Admitted`] or [`Event::NotAdmitted`].
    Admit {
        route: Arc<R>,
        /// Set when this admission is a retry of the same side.
        retry: Option<RetryReason>,
    },
    /// Send the request to the reserved replica (the `attempt`-th try on this
    /// side); report how it went.
    Send { route: Arc<R>, attempt: u32 },
    /// Response headers arrived: hand the response to the client. Nothing is
    /// retried after this.
    Respond,
    /// Answer the client with an error.
    Fail(Failure),
    /// The client went away: stop, answer nothing.
    Abandon,
}

/// Why a side is tried again on another replica (a metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryReason {
    Connect,
    Status,
}

impl RetryReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RetryReason::Connect => "connect",
            RetryReason::Status => "status",
        }
    }
}

/// The final error of a request, with what the access log needs.
#[derive(Debug)]
pub struct Failure {
    pub error: ApiError,
    /// Tries made on the last side.
    pub attempts: u32,
    /// The last replica tried.
    pub replica: Option<Arc<str>>,
    /// Refused by admission before any try (a 429/503 of the queue), not a
    /// failed upstream.
    pub rejected: bool,
}

/// The outcome of the last step, as the executor saw it.
#[derive(Debug)]
pub enum Event {
    /// A replica was reserved.
    Admitted {
        replica: Arc<str>,
    },
    NotAdmitted(AdmitError),
    /// Response headers arrived with this status.
    Answered {
        status: StatusCode,
    },
    /// No connection could be made: nothing was sent, so another replica may
    /// take it.
    ConnectFailed,
    /// The try failed after the request may have reached the engine.
    SendFailed {
        detail: String,
    },
    /// No response header before the first-byte deadline.
    FirstByteTimeout,
    /// The client went away.
    ClientGone,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Admitting the request's side (a refusal may fall back).
    Admitting,
    /// Admitting a fallback after an upstream failure (a refusal moves on
    /// down the fallback list).
    AdmittingAfterFailure,
    /// Admitting a retry on the same side, tried replicas excluded.
    Retrying,
    /// A replica is reserved; the next event is the try's outcome.
    Sending,
    Done,
}

/// One request's plan. Build it with [`RequestPlan::new`], take the first
/// step from [`RequestPlan::start`], then feed each outcome to
/// [`RequestPlan::on`] until it returns `Respond`, `Fail` or `Abandon`.
#[derive(Debug)]
pub struct RequestPlan<R: PlanRoute> {
    class: RequestClass,
    cost: Cost,
    /// The model the client asked for.
    requested_model: String,
    /// The canary split and the side chosen, when the route has a canary.
    canary: Option<(Arc<CanarySplit>, CanarySide)>,
    /// The route the client named: its config decides.
    origin: Arc<R>,
    /// Fallback routes not tried yet, in order (empty when forbidden).
    fallbacks: std::vec::IntoIter<Arc<R>>,
    /// The side being admitted or served.
    side: Arc<R>,
    /// Why a fallback serves the request (`None`: its own route).
    fallback: Option<FallbackReason>,
    phase: Phase,
    /// Replicas of this side that failed before a first byte.
    tried: Vec<Arc<str>>,
    /// Tries sent on this side.
    attempt: u32,
    /// The replica reserved for the current try.
    replica: Option<Arc<str>>,
    /// Why the last try failed, for the final error.
    last_error: Option<ApiError>,
    first_byte_deadline: Option<Instant>,
}

impl<R: PlanRoute> RequestPlan<R> {
    /// Classifies the request (band, tenant, deadline), chooses its canary
    /// side and lists the fallbacks it may use. `fallbacks` are the routes of
    /// `route`'s `admission.fallback.models`, resolved by the caller; `ent`
    /// says which of the request's control headers the caller may use.
    pub fn new(
        route: &Arc<R>,
        fallbacks: Vec<Arc<R>>,
        headers: &HeaderMap,
        requested_model: &str,
        user: Option<&str>,
        cost: Cost,
        ent: &Entitlements,
    ) -> Self {
        let cfg = &route.config().admission;
        let class = classify(headers, user, cfg, ent);
        let (side, target) = route.canary().choose(headers, user, ent.may_force_canary);
        let canary_side = match (&target, route.canary_side()) {
            (Some(t), Some(cs)) if *cs.pool().name == *t.pool => Some(cs.clone()),
            _ => None,
        };
        let canary = (cfg.canary.is_some() || route.canary().config().is_some()).then(|| {
            let side = if canary_side.is_some() {
                side
            } else {
                CanarySide::Stable
            };
            (route.canary().clone(), side)
        });
        let fallbacks = if ent.may_forbid_fallback && fallback::forbidden(headers) {
            Vec::new()
        } else {
            fallbacks
        };
        RequestPlan {
            class,
            cost,
            requested_model: requested_model.to_owned(),
            canary,
            origin: route.clone(),
            fallbacks: fallbacks.into_iter(),
            side: canary_side.unwrap_or_else(|| route.clone()),
            fallback: None,
            phase: Phase::Admitting,
            tried: Vec::new(),
            attempt: 0,
            replica: None,
            last_error: None,
            first_byte_deadline: None,
        }
    }

    /// The first step: admit on the chosen side.
    pub fn start(&mut self) -> Step<R> {
        self.phase = Phase::Admitting;
        self.admit(None)
    }

    /// The next step after `event`, observed at `now`.
    pub fn on(&mut self, event: Event, now: Instant) -> Step<R> {
        if matches!(event, Event::ClientGone) {
            self.phase = Phase::Done;
            return Step::Abandon;
        }
        match (self.phase, event) {
            (Phase::Done, _) => Step::Abandon,
            (
                Phase::Admitting | Phase::AdmittingAfterFailure | Phase::Retrying,
                Event::Admitted { replica },
            ) => {
                // The first-byte clock starts once the request leaves the queue.
                self.first_byte_deadline
                    .get_or_insert_with(|| now + self.origin.config().timeouts.first_byte);
                self.replica = Some(replica);
                self.attempt += 1;
                self.phase = Phase::Sending;
                Step::Send {
                    route: self.side.clone(),
                    attempt: self.attempt,
                }
            }
            (Phase::Admitting, Event::NotAdmitted(e)) => self.refused(e),
            (Phase::AdmittingAfterFailure, Event::NotAdmitted(e)) => match self.fallbacks.next() {
                Some(next) => {
                    self.side = next;
                    self.admit(None)
                }
                None => {
                    let error = e.to_api_error(self.side.name(), self.side.retry_after_secs());
                    self.fail(error, 0, None, false)
                }
            },
            // No replica left for a retry: the side has failed.
            (Phase::Retrying, Event::NotAdmitted(_)) => self.retries_exhausted(now),
            (Phase::Sending, Event::Answered { status }) => self.answered(status, now),
            (Phase::Sending, Event::ConnectFailed) => {
                let replica = self.take_replica();
                // The address goes to the log, never to the client.
                tracing::warn!(route = %self.side.name(), %replica, "cannot connect to replica");
                self.last_error = Some(upstream_failed("cannot connect to a replica"));
                self.tried.push(replica);
                if self.attempt < self.side.config().retries.attempts {
                    self.phase = Phase::Retrying;
                    return self.admit(Some(RetryReason::Connect));
                }
                self.retries_exhausted(now)
            }
            (Phase::Sending, Event::SendFailed { detail }) => {
                let replica = self.take_replica();
                self.side_failed(upstream_failed(detail), self.attempt, Some(replica), now)
            }
            (Phase::Sending, Event::FirstByteTimeout) => {
                // The engine may be working on it: never resent, never moved.
                let replica = self.take_replica();
                let error = upstream_timeout("first byte", self.side.config().timeouts.first_byte);
                self.fail(error, self.attempt, Some(replica), false)
            }
            // An outcome that does not fit the phase is the executor's bug:
            // end the request with an error rather than guess.
            (_, event) => {
                tracing::error!(?event, phase = ?self.phase, "request plan: event out of order");
                self.fail(out_of_order(), self.attempt, self.replica.clone(), false)
            }
        }
    }

    /// Replicas a retry must not use.
    pub fn excluded(&self) -> &[Arc<str>] {
        &self.tried
    }

    /// What admission needs to know about the request.
    pub fn ticket(&self) -> Ticket {
        let fb = &self.origin.config().admission.fallback;
        Ticket {
            class: self.class.clone(),
            cost: self.cost,
            predict_wait: self.fallbacks.len() > 0 && fb.triggers(FallbackReason::QueueDeadline),
            wait_for_replica: self.waits_for_replica(),
        }
    }

    /// Whether the request waits (up to its deadline) for a replica when its
    /// side has none ready (scale from zero): only when nothing else could
    /// serve it now. Not on a canary side (stable serves it), not on a retry
    /// (its untried replicas are gone), not after an upstream failure, and not
    /// when a fallback takes over on "no ready replica".
    fn waits_for_replica(&self) -> bool {
        let canary_side = self.fallback.is_none() && !Arc::ptr_eq(&self.side, &self.origin);
        let fb = &self.origin.config().admission.fallback;
        let falls_back = self.fallbacks.len() > 0 && fb.triggers(FallbackReason::NoReadyReplica);
        self.phase == Phase::Admitting && !canary_side && !falls_back
    }

    /// The model name sent upstream on the current side.
    pub fn upstream_model(&self) -> &str {
        upstream_model(&*self.side, &self.requested_model, self.fallback.is_some())
    }

    /// The side being admitted or served.
    pub fn side(&self) -> &Arc<R> {
        &self.side
    }

    /// The request's band, tenant and queue deadline.
    pub fn class(&self) -> &RequestClass {
        &self.class
    }

    /// Why a fallback serves the request (`None`: its own route).
    pub fn fallback(&self) -> Option<FallbackReason> {
        self.fallback
    }

    /// The traffic the request's canary outcome is matched with (its band
    /// and prompt length).
    pub fn canary_stratum(&self) -> Stratum {
        Stratum::of(self.class.priority, self.cost.prompt)
    }

    /// The canary split and side, when the route has a canary.
    pub fn canary(&self) -> Option<&(Arc<CanarySplit>, CanarySide)> {
        self.canary.as_ref()
    }

    /// When the first response byte is due (set once the request is admitted).
    pub fn first_byte_deadline(&self) -> Option<Instant> {
        self.first_byte_deadline
    }

    /// Whether `status` from the replica just tried is retried on another
    /// replica of the same side: the one definition of a retryable answer.
    pub fn is_retryable(&self, status: StatusCode) -> bool {
        let retries = &self.side.config().retries;
        let current = self.replica.as_deref().unwrap_or_default();
        retries.on_status.contains(&status.as_u16())
            && self.attempt < retries.attempts
            && self.side.pool().replicas().iter().any(|r| {
                let k = r.key();
                *k != *current && !self.tried.iter().any(|t| **t == *k)
            })
    }

    fn admit(&self, retry: Option<RetryReason>) -> Step<R> {
        Step::Admit {
            route: self.side.clone(),
            retry,
        }
    }

    fn take_replica(&mut self) -> Arc<str> {
        self.replica.take().unwrap_or_else(|| Arc::from("-"))
    }

    fn answered(&mut self, status: StatusCode, now: Instant) -> Step<R> {
        if self.is_retryable(status) {
            let replica = self.take_replica();
            self.last_error = Some(upstream_failed(format_args!(
                "replica answered status {}",
                status.as_u16()
            )));
            self.tried.push(replica);
            self.phase = Phase::Retrying;
            return self.admit(Some(RetryReason::Status));
        }
        if status.is_server_error() && self.within_first_byte(now) {
            if let Some(next) = self.next_fallback(FallbackReason::UpstreamFailure) {
                return self.fall_back_after_failure(next);
            }
        }
        self.phase = Phase::Done;
        Step::Respond
    }

    /// An admission refusal of the request's own side (or an earlier fallback).
    fn refused(&mut self, e: AdmitError) -> Step<R> {
        if e == AdmitError::NoReadyReplica
            && self.fallback.is_none()
            && !Arc::ptr_eq(&self.side, &self.origin)
        {
            // The canary side has no ready replica: count it against the
            // canary and serve the user from the stable side.
            let stratum = self.canary_stratum();
            if let Some((split, side)) = &mut self.canary {
                split.record(CanarySide::Canary, false, None, stratum);
                *side = CanarySide::Stable;
            }
            self.side = self.origin.clone();
            return self.admit(None);
        }
        let next = FallbackReason::from_admit(e)
            .and_then(|reason| self.next_fallback(reason).map(|n| (reason, n)));
        match next {
            Some((reason, next)) => {
                self.fallback = Some(reason);
                self.side = next;
                self.admit(None)
            }
            None => {
                let error = e.to_api_error(self.upstream_model(), self.side.retry_after_secs());
                self.fail(error, 0, None, true)
            }
        }
    }

    /// Every try on the side failed before a first byte.
    fn side_failed(
        &mut self,
        error: ApiError,
        attempts: u32,
        replica: Option<Arc<str>>,
        now: Instant,
    ) -> Step<R> {
        if self.within_first_byte(now) {
            if let Some(next) = self.next_fallback(FallbackReason::UpstreamFailure) {
                return self.fall_back_after_failure(next);
            }
        }
        self.fail(error, attempts, replica, false)
    }

    /// No try left on the side (or no replica left to retry on): it failed
    /// with the last try's error.
    fn retries_exhausted(&mut self, now: Instant) -> Step<R> {
        let error = self
            .last_error
            .take()
            .unwrap_or_else(|| no_replica(self.side.name()));
        let replica = self.tried.last().cloned();
        self.side_failed(error, self.tried.len() as u32, replica, now)
    }

    fn fall_back_after_failure(&mut self, next: Arc<R>) -> Step<R> {
        self.side = next;
        self.fallback = Some(FallbackReason::UpstreamFailure);
        self.phase = Phase::AdmittingAfterFailure;
        self.tried.clear();
        self.attempt = 0;
        self.replica = None;
        self.last_error = None;
        self.admit(None)
    }

    fn within_first_byte(&self, now: Instant) -> bool {
        self.first_byte_deadline.is_some_and(|d| now < d)
    }

    /// The next fallback route, when the route's config lets `reason` move
    /// the request (counted as a fallback from the current side).
    fn next_fallback(&mut self, reason: FallbackReason) -> Option<Arc<R>> {
        if !self.origin.config().admission.fallback.triggers(reason) {
            return None;
        }
        let next = self.fallbacks.next()?;
        fallback::record(self.origin.name(), self.side.name(), next.name(), reason);
        Some(next)
    }

    fn fail(
        &mut self,
        error: ApiError,
        attempts: u32,
        replica: Option<Arc<str>>,
        rejected: bool,
    ) -> Step<R> {
        self.phase = Phase::Done;
        Step::Fail(Failure {
            error,
            attempts,
            replica,
            rejected,
        })
    }
}

/// The model name sent upstream on `route`: its `target_model`; else what the
/// client asked for when the route forwards aliases (never on a fallback, whose
/// route has its own name); else the route's own name, so an alias is
/// rewritten to the canonical model the engine serves.
fn upstream_model<'a, R: PlanRoute>(route: &'a R, requested: &'a str, fallback: bool) -> &'a str {
    let config = route.config();
    match (&config.target_model, fallback) {
        (Some(t), _) => t,
        (None, false) if config.forward_alias => requested,
        (None, _) => route.name(),
    }
}

/// 502: the plan and its executor disagree on the request's phase (a bug:
/// the request ends rather than guess).
pub fn out_of_order() -> ApiError {
    upstream_failed("internal error: request plan out of order")
}

/// 503: no replica to send to.
pub fn no_replica(route: &str) -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "service_unavailable",
        format!("No ready replica for model `{route}`"),
    )
    .with_code("no_ready_replica")
    .with_retry_after(1)
}

/// 504: the replica did not answer in time.
pub fn upstream_timeout(what: &str, after: Duration) -> ApiError {
    ApiError::new(
        StatusCode::GATEWAY_TIMEOUT,
        "timeout",
        format!("The model server did not answer: {what} timeout of {after:?} elapsed"),
    )
    .with_code("upstream_timeout")
}

/// 502: the replica failed.
pub fn upstream_failed(detail: impl std::fmt::Display) -> ApiError {
    ApiError::new(
        StatusCode::BAD_GATEWAY,
        "upstream_error",
        format!("The model server failed: {detail}"),
    )
    .with_code("upstream_error")
}
