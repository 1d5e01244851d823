//! Prices and the cost of a request: the `pricing:` section of the config (a
//! token price per model, a GPU-hour price per self-hosted pool) and the pure
//! function that turns a request's tokens into money.
//!
//! Money is kept in whole pico-dollars ([`Money`], 10^-12 of the currency
//! unit) and prices in whole micro-dollars per million tokens ([`Rate`]):
//! a token at a price written with up to six decimals per million tokens
//! then costs a whole number of pico-dollars, so a sum of request costs is
//! exact (not rounded per request) and totals agree to the cent however they
//! are grouped.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// An amount of money in pico-dollars (10^-12 of the currency unit). A
/// `u64` holds up to about 18.4 million; sums saturate there.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Money(pub u64);

/// Pico-dollars per dollar.
const PICO: u64 = 1_000_000_000_000;
/// Pico-dollars per micro-dollar.
const PICO_PER_MICRO: u64 = 1_000_000;

impl Money {
    pub const ZERO: Money = Money(0);

    pub fn from_dollars_f64(d: f64) -> Money {
        if d.is_finite() && d > 0.0 {
            Money((d * PICO as f64).round().min(u64::MAX as f64) as u64)
        } else {
            Money::ZERO
        }
    }

    pub fn saturating_add(self, other: Money) -> Money {
        Money(self.0.saturating_add(other.0))
    }

    /// Whole micro-dollars, rounded up (a budget never undercounts).
    pub fn micros_ceil(self) -> u64 {
        self.0.div_ceil(PICO_PER_MICRO)
    }

    /// Dollars as a float (for reports and Prometheus; exact sums use `.0`).
    pub fn dollars(self) -> f64 {
        self.0 as f64 / PICO as f64
    }

    /// Whole cents, rounded half up (how a total is compared "to the cent").
    pub fn cents(self) -> u64 {
        (self.0 + PICO / 200) / (PICO / 100)
    }

    /// Exact decimal dollars, without trailing zeros (`0.000123`, `12`).
    pub fn to_decimal(self) -> String {
        let whole = self.0 / PICO;
        let frac = self.0 % PICO;
        if frac == 0 {
            return whole.to_string();
        }
        let s = format!("{whole}.{frac:012}");
        s.trim_end_matches('0').to_string()
    }
}

impl std::ops::Add for Money {
    type Output = Money;
    fn add(self, o: Money) -> Money {
        self.saturating_add(o)
    }
}

impl std::iter::Sum for Money {
    fn sum<I: Iterator<Item = Money>>(iter: I) -> Money {
        iter.fold(Money::ZERO, Money::saturating_add)
    }
}

impl std::fmt::Display for Money {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_decimal())
    }
}

/// A price in micro-dollars per unit (per million tokens, or per GPU-hour).
/// Written in the config as dollars with at most six decimals (`0.15`,
/// `2.5`); more decimals are an error, never silently rounded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Rate(pub u64);

/// The highest price accepted: a million dollars per unit.
const MAX_RATE_DOLLARS: f64 = 1_000_000.0;

impl Rate {
    /// Parses dollars, checking range and precision.
    pub fn from_dollars(d: f64) -> Result<Rate, String> {
        if !d.is_finite() || d < 0.0 {
            return Err(format!(
                "a price must be a non-negative number of dollars, found {d}"
            ));
        }
        if d > MAX_RATE_DOLLARS {
            return Err(format!(
                "a price must be at most {MAX_RATE_DOLLARS} dollars, found {d}"
            ));
        }
        let micros = d * 1e6;
        let whole = micros.round();
        if (micros - whole).abs() > 1e-3 {
            return Err(format!(
                "a price has at most 6 decimals (micro-dollars), found {d}"
            ));
        }
        Ok(Rate(whole as u64))
    }

    pub fn dollars(self) -> f64 {
        self.0 as f64 / 1e6
    }

    /// `count` units at this rate per million units, exactly.
    fn per_million(self, count: u64) -> Money {
        Money(count.saturating_mul(self.0))
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Rate, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Num(f64),
            Text(String),
        }
        let v = match Raw::deserialize(d)? {
            Raw::Num(v) => v,
            Raw::Text(s) => s.trim().parse::<f64>().map_err(|_| {
                serde::de::Error::custom(format!("expected a price in dollars, found `{s}`"))
            })?,
        };
        Rate::from_dollars(v).map_err(serde::de::Error::custom)
    }
}

impl Serialize for Rate {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(self.dollars())
    }
}

/// A model's token prices, in dollars per million tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenPrice {
    /// Input (prompt) tokens not served from the prefix cache.
    #[serde(default)]
    pub input: Rate,
    /// Input tokens the engine reported as cached
    /// (`usage.prompt_tokens_details.cached_tokens`); default: `input`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cached_input: Option<Rate>,
    /// Output (completion) tokens.
    #[serde(default)]
    pub output: Rate,
}

/// The tokens of one request, as the engine reported them (or as counted).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TokenUsage {
    /// All input tokens, cached ones included (OpenAI's `prompt_tokens`).
    pub input: u64,
    /// Of `input`, those served from the prefix cache.
    pub cached_input: u64,
    pub output: u64,
}

impl TokenUsage {
    pub fn new(input: u64, cached_input: u64, output: u64) -> TokenUsage {
        TokenUsage {
            input,
            cached_input,
            output,
        }
    }
}

impl TokenPrice {
    /// The cost of `usage`: uncached input at `input`, cached input at
    /// `cached_input` (cached tokens beyond the input count are not billed
    /// twice), output at `output`. Exact in pico-dollars.
    pub fn cost(&self, usage: TokenUsage) -> Money {
        let cached = usage.cached_input.min(usage.input);
        let cached_rate = self.cached_input.unwrap_or(self.input);
        self.input.per_million(usage.input - cached)
            + cached_rate.per_million(cached)
            + self.output.per_million(usage.output)
    }
}

/// A self-hosted pool's capacity price: what one replica costs per hour
/// while it exists, whatever it serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolPrice {
    /// Dollars per GPU-hour.
    pub gpu_hour: Rate,
    /// GPUs behind one replica (tensor parallel size, for example).
    #[serde(default = "one")]
    pub gpus_per_replica: u32,
    /// Sequences a replica runs at once (vLLM `--max-num-seqs`): the batch
    /// limit utilisation is measured against. Unset: the limit the gateway
    /// observed (running requests at a scrape that showed a queue).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_num_seqs: Option<u32>,
}

fn one() -> u32 {
    1
}

impl PoolPrice {
    /// Dollars per hour of one replica.
    pub fn replica_hour_dollars(&self) -> f64 {
        self.gpu_hour.dollars() * f64::from(self.gpus_per_replica)
    }
}

/// `pricing:` of the config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PricingConfig {
    /// Currency name shown in reports (prices are plain numbers).
    #[serde(default = "usd")]
    pub currency: String,
    /// Token prices by model name: a route's `model`, an alias, its
    /// `target_model` or a canary's `model`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub models: BTreeMap<String, TokenPrice>,
    /// GPU-hour prices by pool name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pools: BTreeMap<String, PoolPrice>,
}

fn usd() -> String {
    "USD".into()
}

impl Default for PricingConfig {
    fn default() -> Self {
        PricingConfig {
            currency: usd(),
            models: BTreeMap::new(),
            pools: BTreeMap::new(),
        }
    }
}

impl PricingConfig {
    /// The token price of the first of `names` that has one (a served
    /// route's upstream model, then its own name and aliases).
    pub fn model_price<'a>(&self, names: impl IntoIterator<Item = &'a str>) -> Option<TokenPrice> {
        names.into_iter().find_map(|n| self.models.get(n).copied())
    }

    /// The cost of `usage` on the first of `names` with a price; zero when
    /// the model has none.
    pub fn cost<'a>(&self, names: impl IntoIterator<Item = &'a str>, usage: TokenUsage) -> Money {
        self.model_price(names)
            .map_or(Money::ZERO, |p| p.cost(usage))
    }

    /// Checks every priced model and pool exists; `Err((needle, message))`.
    pub fn check(
        &self,
        is_model: impl Fn(&str) -> bool,
        is_pool: impl Fn(&str) -> bool,
    ) -> Result<(), (String, String)> {
        if self.currency.is_empty() {
            return Err((
                "currency".into(),
                "pricing.currency must not be empty".into(),
            ));
        }
        for m in self.models.keys() {
            if !is_model(m) {
                return Err((
                    m.clone(),
                    format!("pricing.models: `{m}` is not a model name, alias, target_model or canary model of any route"),
                ));
            }
        }
        for (p, price) in &self.pools {
            if !is_pool(p) {
                return Err((p.clone(), format!("pricing.pools: unknown pool `{p}`")));
            }
            if price.gpus_per_replica == 0 || price.max_num_seqs == Some(0) {
                return Err((
                    p.clone(),
                    format!(
                        "pricing.pools.{p}: gpus_per_replica and max_num_seqs must be at least 1"
                    ),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> PricingConfig {
        serde_yaml_ng::from_str(
            "models:\n  llama: { input: 0.15, cached_input: 0.03, output: 0.6 }\n  small: { input: \"0.0125\", output: 0.05 }\npools:\n  gpu: { gpu_hour: 2.5, gpus_per_replica: 2, max_num_seqs: 64 }\n",
        )
        .unwrap()
    }

    #[test]
    fn cost_is_exact_in_picodollars() {
        let t = table();
        // 1000 input (200 cached), 500 output on llama:
        // 800 * 0.15e-6 + 200 * 0.03e-6 + 500 * 0.6e-6 = 0.000426 dollars.
        let c = t.cost(["llama"], TokenUsage::new(1000, 200, 500));
        assert_eq!(c, Money(426_000_000));
        assert_eq!(c.to_decimal(), "0.000426");
        // Uncached input price applies to cached tokens without a cached price.
        let s = t.cost(["nope", "small"], TokenUsage::new(3, 3, 1));
        assert_eq!(s, Money(3 * 12_500 + 50_000));
        // Unpriced models cost nothing; cached beyond input is not billed.
        assert_eq!(t.cost(["other"], TokenUsage::new(5, 0, 5)), Money::ZERO);
        let over = t.cost(["llama"], TokenUsage::new(10, 50, 0));
        assert_eq!(over, Money(10 * 30_000));
    }

    #[test]
    fn many_small_costs_sum_exactly_to_the_cent() {
        // A million one-token requests at $0.15/M: exactly 15 cents, where
        // rounding each to micro-dollars would have made it zero.
        let p = table().models["llama"];
        let total: Money = (0..1_000_000)
            .map(|_| p.cost(TokenUsage::new(1, 0, 0)))
            .sum();
        assert_eq!(total.cents(), 15);
        assert_eq!(total.to_decimal(), "0.15");
        assert_eq!(Money(1).micros_ceil(), 1);
        assert_eq!(Money(4_999_999_999).cents(), 0);
        assert_eq!(Money(5_000_000_000).cents(), 1);
        assert_eq!(Money(7 * PICO).to_decimal(), "7");
    }

    #[test]
    fn rates_reject_bad_values_and_excess_precision() {
        assert_eq!(Rate::from_dollars(0.1).unwrap(), Rate(100_000));
        assert_eq!(Rate::from_dollars(0.000001).unwrap(), Rate(1));
        assert_eq!(Rate::from_dollars(2.5).unwrap().dollars(), 2.5);
        for bad in [-1.0, f64::NAN, f64::INFINITY, 1e7, 0.0000001] {
            assert!(Rate::from_dollars(bad).is_err(), "{bad}");
        }
        let e = serde_yaml_ng::from_str::<PricingConfig>("models: {m: {input: 0.1234567}}")
            .unwrap_err()
            .to_string();
        assert!(e.contains("at most 6 decimals"), "{e}");
        let e = serde_yaml_ng::from_str::<PricingConfig>("models: {m: {inptu: 1}}")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field"), "{e}");
        assert!(serde_yaml_ng::from_str::<PricingConfig>("models: {m: {input: cheap}}").is_err());
    }

    #[test]
    fn check_names_unknown_models_and_pools() {
        let t = table();
        assert_eq!(t.currency, "USD");
        t.check(|m| m == "llama" || m == "small", |p| p == "gpu")
            .unwrap();
        let e = t.check(|m| m == "llama", |_| true).unwrap_err();
        assert!(e.1.contains("`small`"), "{e:?}");
        let e = t.check(|_| true, |_| false).unwrap_err();
        assert_eq!(e.1, "pricing.pools: unknown pool `gpu`");
        let p = t.pools["gpu"];
        assert_eq!(p.replica_hour_dollars(), 5.0);
        assert_eq!(p.max_num_seqs, Some(64));
    }
}
