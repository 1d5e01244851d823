//! The data plane: one OpenAI-compatible endpoint in front of model replicas.
//! It executes what `infergate_core` decides; it decides nothing itself.
//!
//! A request's path through these modules, one concern each:
//! 1. [`server`]: listeners (HTTP/1.1 + h2c, TLS with ALPN h2), graceful drain;
//!    [`backpressure`] cuts clients that stop reading.
//! 2. [`handler`]: the per-request pipeline wiring the steps below.
//! 3. [`body`]: read the body whole, within the size limit.
//! 4. [`parse`]: parse only what routing needs ([`context::RequestFeatures`]);
//!    rewrite the body only when the route asks for it.
//! 5. [`gateway`]: resolve the route from the current config snapshot.
//! 6. [`execute`]: run the request's plan (`infergate_core::plan`): admit on
//!    the side the plan names (queueing, shedding), send over pooled keep-alive
//!    connections ([`upstream`], our HTTP/1.1 client), report each outcome back
//!    to the plan, which alone decides retries and fallbacks.
//! 7. [`relay`]: stream the answer back, enforcing first-byte / idle / total
//!    timeouts, counting usage ([`usage`]), sending SSE keep-alives and a final
//!    SSE error event, and releasing the replica's load guard on every path.
//! 8. [`record`]: one log line and the metrics of a request ([`telemetry`]).
//!
//! 9. [`governance`]: the request's usage row, cost and audit line; pool
//!    capacity and idle cost.
//!
//! [`admin`] serves `/metrics`, `/healthz`, `/readyz`, `/routes`, `/usage`
//! and `/capacity`.

mod admin;
mod backpressure;
mod body;
mod context;
mod execute;
mod gateway;
mod governance;
mod handler;
mod headers;
mod parse;
mod record;
mod relay;
mod server;
mod telemetry;
mod upstream;
mod usage;
mod worker;

pub use gateway::{Gateway, Route, RouteTable};
pub use server::{available_cpus, start, start_with, ServerHandle, StartError};
pub use telemetry::log::{flush as flush_logs, init as init_logging};
pub use telemetry::trace::Tracing;
