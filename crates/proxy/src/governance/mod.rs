//! Governance: what each request cost and who made it. The usage ledger
//! ([`ledger`]: per-minute totals per team, key id, model, route and pool;
//! `/usage` for chargeback; the per-team Prometheus counters), pool capacity
//! and idle cost ([`capacity`]: replica load sampled against GPU-hour prices;
//! `/capacity`), and the audit log ([`audit`]). One [`Governance`] per
//! gateway; its settings (`pricing`, `accounting`, `audit`) reload with the
//! config. Prices themselves and the cost function are `core::cost`.

pub(crate) mod audit;
pub(crate) mod capacity;
pub(crate) mod ledger;
pub(crate) mod report;

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use infergate_core::config::{AccountingConfig, Config};
use infergate_core::cost::{PoolPrice, PricingConfig};

use audit::Audit;
pub(crate) use audit::RequestFacts;
use capacity::Capacity;
use ledger::{Ledger, RowKey, SeriesKey, Totals};

/// The team label of a caller whose team only a trusted proxy's header named.
pub(crate) const UNLISTED_TEAM: &str = "unlisted";
/// The team of an anonymous caller (`auth: none`) or a request refused
/// before it was authenticated.
pub(crate) const NO_TEAM: &str = "-";

/// The settings in force.
struct Settings {
    pricing: PricingConfig,
    accounting: AccountingConfig,
}

/// Governance state of one gateway.
pub(crate) struct Governance {
    pub ledger: Ledger,
    pub capacity: Capacity,
    pub audit: Audit,
    settings: ArcSwap<Settings>,
    unlisted: Arc<str>,
    no_team: Arc<str>,
}

impl std::fmt::Debug for Governance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Governance")
            .field("audit", &self.audit.enabled())
            .finish()
    }
}

fn minutes(retention: Duration) -> u64 {
    retention.as_secs().div_ceil(60).max(1)
}

/// Minutes since the Unix epoch, now.
pub(crate) fn minute_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 60)
}

impl Governance {
    pub(crate) fn new(config: &Config) -> Governance {
        let a = &config.accounting;
        Governance {
            ledger: Ledger::new(minutes(a.retention), a.max_rows),
            capacity: Capacity::new(minutes(a.retention)),
            audit: Audit::default(),
            settings: ArcSwap::from_pointee(Settings {
                pricing: config.pricing.clone(),
                accounting: a.clone(),
            }),
            unlisted: Arc::from(UNLISTED_TEAM),
            no_team: Arc::from(NO_TEAM),
        }
    }

    /// Opens what `config` needs that can fail (the audit output) without
    /// applying anything else.
    pub(crate) fn prepare(&self, config: &Config) -> Result<(), String> {
        self.audit.configure(&config.audit)
    }

    /// Takes `config`'s prices and accounting settings.
    pub(crate) fn apply(&self, config: &Config) {
        let a = &config.accounting;
        self.ledger.configure(minutes(a.retention), a.max_rows);
        self.capacity.configure(minutes(a.retention));
        self.settings.store(Arc::new(Settings {
            pricing: config.pricing.clone(),
            accounting: a.clone(),
        }));
    }

    pub(crate) fn currency(&self) -> String {
        self.settings.load().pricing.currency.clone()
    }

    pub(crate) fn pool_price(&self, pool: &str) -> Option<PoolPrice> {
        self.settings.load().pricing.pools.get(pool).copied()
    }

    pub(crate) fn sample_interval(&self) -> Duration {
        self.settings.load().accounting.pool_sample_interval
    }

    pub(crate) fn retention(&self) -> Duration {
        self.settings.load().accounting.retention
    }

    /// Records a finished request: its ledger row, its team's counters and
    /// its audit line.
    pub(crate) fn request(&self, f: &RequestFacts<'_>) {
        // An anonymous caller's team is "" (`auth: none`): shown as `-`.
        let team = f.team.filter(|t| !t.is_empty()).unwrap_or(&self.no_team);
        let label = if f.team_listed { team } else { &self.unlisted };
        self.ledger.add(
            minute_now(),
            RowKey {
                team: team.clone(),
                key: f.key_id.cloned(),
                model: f.model.clone(),
                route: f.route.clone(),
                pool: f.pool.clone(),
            },
            SeriesKey {
                team: label.clone(),
                route: f.route.clone(),
                model: f.model.clone(),
                pool: f.pool.clone(),
            },
            Totals::of(f.usage, f.cost),
        );
        if self.audit.enabled() {
            let settings = self.settings.load();
            self.audit.request(f, team, &settings.pricing.currency);
        }
    }

    /// Appends governance's Prometheus text.
    pub(crate) fn render_metrics(&self, out: &mut String) {
        self.ledger.render_metrics(out);
        self.capacity.render_metrics(out);
        self.audit.render_metrics(out);
    }
}

/// Samples pool capacity every `accounting.pool_sample_interval` while the
/// gateway lives.
pub(crate) async fn sample_loop<T: Send + Sync + 'static>(
    owner: Weak<T>,
    governance: impl Fn(&T) -> &Governance + Send + 'static,
    pools: impl Fn(&T) -> Vec<Arc<infergate_core::pool::Pool>> + Send + 'static,
) {
    loop {
        let interval = match owner.upgrade() {
            Some(o) => {
                let g = governance(&o);
                let every = g.sample_interval();
                g.ledger.expire(minute_now());
                g.capacity
                    .sample(Instant::now(), minute_now(), &pools(&o), |p| {
                        g.pool_price(p)
                    });
                every
            }
            None => return,
        };
        tokio::time::sleep(interval).await;
    }
}
