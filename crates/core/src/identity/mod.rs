//! Identity and entitlements: who is calling ([`authenticate`]: an API key,
//! a trusted proxy's headers, or nobody with `auth: none`), and what that
//! caller may do ([`policy`]: models, highest priority band, canary and
//! fallback control, fairness tenant, and which control headers are
//! stripped before forwarding). Pure decisions without sockets: the proxy
//! extracts headers and the peer address, asks [`Authenticator`] and applies
//! the answer. Keys are kept only as SHA-256 digests ([`keys`]); the live
//! state is swapped whole on config or key-file changes ([`store`]).

mod authenticate;
mod cidr;
mod config;
mod keys;
mod policy;
mod store;

pub use authenticate::{AuthError, Authenticator, Caller};
pub use cidr::Cidr;
pub use config::{AdminAuth, AuthConfig, AuthMode, TrustedHeaders, ADMIN_TOKEN_ENV};
pub use keys::{hash_key, KeyFile};
pub use policy::{Policy, PolicySpec, API_KEY_HEADER};
pub use store::{IdentityStore, PreparedAuth};
