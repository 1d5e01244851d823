//! The compiled `quotas:` section: per team and per key, the list of limits
//! (what is counted, over which window, how much), the share of each limit a
//! priority band may fill, and what happens while Redis is down. Built once
//! per config; a request only looks its caller up.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, RwLock};

use super::config::{QuotaSpec, QuotasConfig, WhenDown};
use super::slot::{LocalSlot, SLOT_LIMIT_MAX};
use super::window::Window;
use crate::admission::Priority;

/// Money is counted in millionths of the price table's currency unit.
pub const MICROS: f64 = 1_000_000.0;

/// What a limit counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dim {
    Requests,
    /// Input plus output tokens.
    Tokens,
    InputTokens,
    OutputTokens,
    /// Money, in [`MICROS`].
    Cost,
    /// Requests in flight.
    Concurrent,
}

impl Dim {
    pub fn tag(self) -> &'static str {
        match self {
            Dim::Requests => "req",
            Dim::Tokens => "tok",
            Dim::InputTokens => "in",
            Dim::OutputTokens => "out",
            Dim::Cost => "usd",
            Dim::Concurrent => "conc",
        }
    }
}

/// What one request counts (or counted).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Demand {
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// Money in [`MICROS`].
    pub cost_micros: u64,
}

impl Demand {
    /// How much of `dim` this demand takes (one request, one slot).
    pub fn amount(&self, dim: Dim) -> u64 {
        match dim {
            Dim::Requests | Dim::Concurrent => 1,
            Dim::Tokens => self.input_tokens.saturating_add(self.output_tokens),
            Dim::InputTokens => self.input_tokens,
            Dim::OutputTokens => self.output_tokens,
            Dim::Cost => self.cost_micros,
        }
    }
}

/// One limit: `amount` of `dim` per `window`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limit {
    pub dim: Dim,
    pub window: Window,
    pub amount: u64,
}

impl Limit {
    /// The limit's name in errors and metric labels.
    pub fn label(&self) -> &'static str {
        match (self.dim, self.window) {
            (Dim::Requests, _) => "requests_per_minute",
            (Dim::Tokens, Window::Minute) => "tokens_per_minute",
            (Dim::InputTokens, _) => "input_tokens_per_minute",
            (Dim::OutputTokens, _) => "output_tokens_per_minute",
            (Dim::Concurrent, _) => "concurrent_requests",
            (Dim::Tokens, Window::Day) => "tokens_per_day",
            (Dim::Tokens, _) => "tokens_per_month",
            (Dim::Cost, Window::Day) => "cost_per_day",
            (Dim::Cost, _) => "cost_per_month",
        }
    }

    /// A budget over a day or month (answered `insufficient_quota`), rather
    /// than a rate.
    pub fn is_budget(&self) -> bool {
        matches!(self.window, Window::Day | Window::Month)
    }
}

/// Whose limits: a team's or a key's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScopeKind {
    Team,
    Key,
}

impl ScopeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ScopeKind::Team => "team",
            ScopeKind::Key => "key",
        }
    }
}

/// The limits of one team or key.
#[derive(Debug)]
pub struct Rules {
    pub kind: ScopeKind,
    /// The config entry (`quotas.teams.NAME`, `keys.ID`, or
    /// `default_team`): the metrics label, never client input.
    pub entry: Arc<str>,
    pub limits: Vec<Limit>,
    /// The share of each limit a band may fill, by `Priority as usize`.
    bands: [f64; 3],
    pub when_down: WhenDown,
    /// Local mode's counters, one per limit (`None`: the rules serve scopes
    /// made up per request, `default_team`, which count in the map).
    slots: Option<Arc<[AtomicU64]>>,
}

impl Rules {
    fn new(kind: ScopeKind, entry: &str, spec: &QuotaSpec, when_down: WhenDown) -> Rules {
        let mut limits = Vec::new();
        let mut add = |dim, window, amount: Option<u64>| {
            if let Some(amount) = amount {
                limits.push(Limit {
                    dim,
                    window,
                    amount,
                });
            }
        };
        // Rates first: a request refused by a rate is told the soonest retry.
        add(Dim::Concurrent, Window::None, spec.concurrent_requests);
        add(Dim::Requests, Window::Minute, spec.requests_per_minute);
        add(Dim::Tokens, Window::Minute, spec.tokens_per_minute);
        add(
            Dim::InputTokens,
            Window::Minute,
            spec.input_tokens_per_minute,
        );
        add(
            Dim::OutputTokens,
            Window::Minute,
            spec.output_tokens_per_minute,
        );
        add(Dim::Tokens, Window::Day, spec.tokens_per_day);
        add(Dim::Tokens, Window::Month, spec.tokens_per_month);
        let money = |m: Option<f64>| m.map(|m| (m * MICROS).round() as u64);
        add(Dim::Cost, Window::Day, money(spec.cost_per_day));
        add(Dim::Cost, Window::Month, money(spec.cost_per_month));
        let mut bands = [1.0; 3];
        for (band, share) in &spec.bands {
            bands[*band as usize] = *share;
        }
        Rules {
            kind,
            entry: entry.into(),
            limits,
            bands,
            when_down: WhenDown::resolve(spec.when_redis_down, spec.local_share, when_down),
            slots: None,
        }
    }

    /// The same rules with counters of their own (a team under `default_team`).
    fn with_own_slots(&self) -> Rules {
        Rules {
            kind: self.kind,
            entry: self.entry.clone(),
            limits: self.limits.clone(),
            bands: self.bands,
            when_down: self.when_down,
            slots: Some(LocalSlot::new_set(self.limits.len())),
        }
    }

    fn with_slots(mut self) -> Rules {
        self.slots = Some(LocalSlot::new_set(self.limits.len()));
        self
    }

    /// Local mode's counter of limit `i`, if it has one.
    pub fn slot(&self, i: usize) -> Option<LocalSlot> {
        let set = self.slots.as_ref()?;
        (self.limits.get(i)?.amount < SLOT_LIMIT_MAX).then(|| LocalSlot::of(set, i))
    }

    /// Takes over `old`'s counts of the limits both have.
    fn carry_from(&self, old: &Rules) {
        for (i, l) in self.limits.iter().enumerate() {
            let j = old
                .limits
                .iter()
                .position(|o| o.dim == l.dim && o.window == l.window);
            if let (Some(new), Some(old)) = (self.slot(i), j.and_then(|j| old.slot(j))) {
                new.copy_from(&old);
            }
        }
    }

    /// `limit` as seen by a request of `band`.
    pub fn limit_for(&self, limit: &Limit, band: Priority) -> u64 {
        let share = self.bands[band as usize];
        if share >= 1.0 {
            limit.amount
        } else {
            (limit.amount as f64 * share).floor() as u64
        }
    }
}

/// Every team's and key's limits, for one config.
#[derive(Debug, Default)]
pub struct QuotaTable {
    teams: HashMap<Box<str>, (Arc<str>, Arc<Rules>)>,
    keys: HashMap<Box<str>, (Arc<str>, Arc<Rules>)>,
    default_team: Option<Arc<Rules>>,
    /// `default_team`'s rules per team seen, each with its own counters,
    /// made on a team's first request (then a read lock, no allocation).
    default_scopes: RwLock<HashMap<Box<str>, Scoped>>,
}

type Scoped = (Arc<str>, Arc<Rules>);

/// Teams under `default_team` that get their own counters; beyond, a team
/// counts in the map (team names may come from a trusted proxy's header).
const MAX_DEFAULT_SCOPES: usize = 10_000;

/// The rules that apply to one request: its key's, then its team's.
pub struct Applicable {
    /// (scope name in counter keys, rules); at most two.
    pub scopes: [Option<(Arc<str>, Arc<Rules>)>; 2],
}

impl QuotaTable {
    pub fn new(cfg: &QuotasConfig, when_down: WhenDown) -> QuotaTable {
        let build =
            |kind: ScopeKind, prefix: &str, m: &std::collections::BTreeMap<String, QuotaSpec>| {
                m.iter()
                    .filter(|(_, s)| !s.is_empty())
                    .map(|(name, spec)| {
                        let scope: Arc<str> = format!("{prefix}:{name}").into();
                        let rules = Arc::new(Rules::new(kind, name, spec, when_down).with_slots());
                        (Box::from(name.as_str()), (scope, rules))
                    })
                    .collect()
            };
        QuotaTable {
            teams: build(ScopeKind::Team, "t", &cfg.teams),
            keys: build(ScopeKind::Key, "k", &cfg.keys),
            default_team: cfg
                .default_team
                .as_ref()
                .filter(|s| !s.is_empty())
                .map(|s| Arc::new(Rules::new(ScopeKind::Team, "default_team", s, when_down))),
            default_scopes: RwLock::default(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.teams.is_empty() && self.keys.is_empty() && self.default_team.is_none()
    }

    /// Local mode's counter of `scope`'s limit (`t:NAME`, `k:NAME`).
    pub fn slot_of(&self, scope: &str, dim: Dim, window: Window) -> Option<LocalSlot> {
        let defaults = self
            .default_scopes
            .read()
            .unwrap_or_else(|p| p.into_inner());
        let (_, rules) = self
            .teams
            .values()
            .chain(self.keys.values())
            .chain(defaults.values())
            .find(|(s, _)| &**s == scope)?;
        let i = rules
            .limits
            .iter()
            .position(|l| l.dim == dim && l.window == window)?;
        rules.slot(i)
    }

    /// Takes over the counts a previous config's table holds (local mode).
    pub fn carry_from(&self, old: &QuotaTable) {
        let pairs = |new: &HashMap<Box<str>, (Arc<str>, Arc<Rules>)>,
                     old: &HashMap<Box<str>, (Arc<str>, Arc<Rules>)>| {
            for (name, (_, rules)) in new {
                if let Some((_, o)) = old.get(name) {
                    rules.carry_from(o);
                }
            }
        };
        pairs(&self.teams, &old.teams);
        pairs(&self.keys, &old.keys);
        if self.default_team.is_some() {
            let old = old.default_scopes.read().unwrap_or_else(|p| p.into_inner());
            for (team, (_, rules)) in old.iter() {
                if let Some((_, new)) = self.default_scope(team) {
                    new.carry_from(rules);
                }
            }
        }
    }

    /// Whether some limit is a money budget (requests then need a price).
    pub fn counts_money(&self) -> bool {
        self.teams
            .values()
            .chain(self.keys.values())
            .map(|(_, r)| r)
            .chain(self.default_team.iter())
            .any(|r| r.limits.iter().any(|l| l.dim == Dim::Cost))
    }

    /// The rules for a caller of `team` presenting key id `key`.
    pub fn lookup(&self, team: &str, key: Option<&str>) -> Applicable {
        let key = key.and_then(|k| self.keys.get(k)).cloned();
        let team = match self.teams.get(team) {
            Some(t) => Some(t.clone()),
            None => self.default_scope(team),
        };
        Applicable {
            scopes: [key, team],
        }
    }

    /// `default_team`'s scope and rules for `team`.
    fn default_scope(&self, team: &str) -> Option<Scoped> {
        let rules = self.default_team.as_ref()?;
        let lock = &self.default_scopes;
        if let Some(s) = lock.read().unwrap_or_else(|p| p.into_inner()).get(team) {
            return Some(s.clone());
        }
        let mut w = lock.write().unwrap_or_else(|p| p.into_inner());
        if w.len() >= MAX_DEFAULT_SCOPES && !w.contains_key(team) {
            return Some((Arc::from(format!("t:{team}")), rules.clone()));
        }
        let s = w.entry(team.into()).or_insert_with(|| {
            (
                Arc::from(format!("t:{team}")),
                Arc::new(rules.with_own_slots()),
            )
        });
        Some(s.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bands_scale_limits_and_lookup_layers_key_over_team() {
        let cfg: QuotasConfig = serde_yaml_ng::from_str(
            "teams:\n  search: {tokens_per_minute: 1000, cost_per_day: 2.5, bands: {sheddable: 0.5, standard: 0.8}}\nkeys:\n  k1: {requests_per_minute: 10}\ndefault_team: {concurrent_requests: 2}\n",
        )
        .unwrap();
        let t = QuotaTable::new(&cfg, WhenDown::FailClosed);
        let a = t.lookup("search", Some("k1"));
        let (ks, kr) = a.scopes[0].as_ref().unwrap();
        assert_eq!(&**ks, "k:k1");
        assert_eq!(kr.limits[0].label(), "requests_per_minute");
        let (ts, tr) = a.scopes[1].as_ref().unwrap();
        assert_eq!(&**ts, "t:search");
        let tpm = tr.limits[0];
        assert_eq!(tr.limit_for(&tpm, Priority::Critical), 1000);
        assert_eq!(tr.limit_for(&tpm, Priority::Standard), 800);
        assert_eq!(tr.limit_for(&tpm, Priority::Sheddable), 500);
        assert_eq!(tr.limits[1].amount, 2_500_000, "money in micros");
        assert!(tr.limits[1].is_budget());
        assert_eq!(tr.when_down, WhenDown::FailClosed);

        let other = t.lookup("ads", Some("unknown"));
        assert!(other.scopes[0].is_none());
        let (s, r) = other.scopes[1].as_ref().unwrap();
        assert_eq!((&**s, &*r.entry), ("t:ads", "default_team"));
        // Each team under default_team has its own counters, made once.
        let again = t.lookup("ads", None).scopes[1].clone().unwrap();
        assert!(
            Arc::ptr_eq(r, &again.1),
            "the second request finds the first's"
        );
        let (s2, r2) = t.lookup("maps", None).scopes[1].clone().unwrap();
        assert_eq!(&*s2, "t:maps");
        assert!(!Arc::ptr_eq(r, &r2) && r2.slot(0).is_some());
        assert!(QuotaTable::new(&QuotasConfig::default(), WhenDown::FailClosed).is_empty());
    }
}
