//! Quotas and budgets per team and per key: requests and tokens per minute,
//! requests in flight, tokens and money per day or month, each optionally
//! scaled per priority band. A request reserves its estimate before
//! admission ([`QuotaStore::reserve`]) and settles what it used when it ends
//! ([`Grant::settle`]). Counting is a fixed window on the UTC clock
//! ([`window`]); counters live in this process (one replica) or in a shared
//! backend behind [`SharedCounters`] (Redis, in the `infergate-quota`
//! crate, so core links no Redis client). Pure decisions, no sockets.

mod config;
mod counters;
mod rules;
mod slot;
mod store;
mod window;

pub use config::{DownPolicy, GovernanceConfig, QuotaSpec, QuotasConfig, RedisConfig, WhenDown};
pub use counters::{
    CounterOp, LocalCounters, LocalSlot, ReleaseFuture, ReserveFuture, SharedCounters, Unavailable,
    Verdict,
};
pub use rules::{Demand, Dim, Limit, QuotaTable, ScopeKind, MICROS};
pub use store::{
    AskBackend, BackendState, Grant, LimitRefusal, QuotaStore, RateSnapshot, Refusal, Source,
    DECISION_SECONDS,
};
pub use window::Window;
