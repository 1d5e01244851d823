//! The data plane: one OpenAI-compatible endpoint in front of model replicas.
//!
//! A request's path through these modules, one concern each:
//! 1. [`server`]: listeners (HTTP/1.1 + h2c, TLS with ALPN h2), graceful drain.
//! 2. [`handler`]: the per-request pipeline wiring the steps below.
//! 3. [`body`]: read the body whole, within the size limit.
//! 4. [`parse`]: parse only what routing needs ([`context::RequestFeatures`]);
//!    rewrite the body only when the route asks for it.
//! 5. [`gateway`]: resolve the route from the current config snapshot.
//! 6. [`admit`]: the admission hook (queueing, shedding).
//! 7. [`forward`]: pick a replica (routing `Picker`), send upstream over pooled
//!    keep-alive connections ([`upstream`], our HTTP/1.1 client), retry on
//!    another replica before any byte went out.
//! 8. [`relay`]: stream the answer back, enforcing first-byte / idle / total
//!    timeouts, counting usage ([`usage`]), sending SSE keep-alives and a final
//!    SSE error event, and releasing the replica's load guard on every path.
//!
//! [`admin`] serves `/metrics`, `/healthz`, `/readyz` and `/routes`.

pub mod admin;
pub mod admit;
pub mod backpressure;
pub mod body;
pub mod context;
pub mod forward;
pub mod gateway;
pub mod handler;
pub mod headers;
pub mod parse;
pub mod record;
pub mod relay;
pub mod server;
pub mod telemetry;
pub mod upstream;
pub mod usage;

pub use context::{ApiKind, RequestContext, RequestFeatures};
pub use gateway::{Gateway, Route, RouteTable};
pub use server::{start, ServerHandle, StartError};
