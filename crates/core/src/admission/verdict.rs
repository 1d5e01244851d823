//! The canary verdict: whether the samples of the canary side show, at the
//! configured confidence, that it is worse than the stable side by more than
//! the tolerated margin. Pure statistics over two sample sets; the canary
//! split (`canary`) keeps the samples and acts on the verdict.
//!
//! The rules (`canary.rollback` in the config):
//! - **Matched traffic.** Each sample carries its [`Stratum`] (priority band
//!   and prompt-length bucket, powers of two). TTFT is compared inside each
//!   stratum both sides have at least [`MIN_PER_STRATUM`] samples of, so a
//!   canary that happens to get the long prompts is not blamed for them;
//!   errors are compared over the same window.
//! - **A margin, then a test.** The null hypothesis is "the canary is within
//!   the margin", not "the canary equals stable": an identical canary sits
//!   far inside it, so the verdict does not turn into a coin toss however
//!   often it is evaluated. Errors: one-sided two-proportion z-test of
//!   `canary rate - stable rate > max_error_rate_increase`. TTFT: one-sided
//!   stratified Mann-Whitney U (van Elteren) of canary TTFT against stable
//!   TTFT raised to `max(ttft * max_ttft_p90_ratio, ttft + ttft_floor_ms)`,
//!   plus the same bound on the p90s themselves, so differences under the
//!   absolute floor never count.
//! - **Enough data.** At least `min_requests` samples per side (after the
//!   warm-up the split applies), and a p-value under `1 - confidence`.

use std::fmt::Write as _;

use super::config::RollbackConfig;
use super::Priority;

/// Samples a side needs in a stratum for the stratum to be compared.
pub(crate) const MIN_PER_STRATUM: usize = 5;

/// Which traffic a sample is matched with: its band and prompt-length bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Stratum(u8);

impl Stratum {
    /// Band, and prompt length rounded to a power of two (1-2, 3-4, 5-8, ...
    /// tokens; everything from 32k up is one bucket).
    pub fn of(band: Priority, prompt_tokens: u64) -> Stratum {
        let bucket = (64 - prompt_tokens.max(1).saturating_sub(1).leading_zeros()).min(15) as u8;
        Stratum(band.index() as u8 * 16 + bucket)
    }
}

/// One finished request on one side.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sample {
    pub ok: bool,
    pub ttft_ms: Option<f64>,
    pub stratum: Stratum,
}

/// What the comparison found: the figures of both sides and, when the
/// canary must roll back, why.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Verdict {
    /// `Some(kind)` ("errors" or "ttft"): roll back.
    pub rollback: Option<&'static str>,
    /// Both sides' figures, sample sizes and the test: the reason text.
    pub summary: String,
}

/// Compares the two sides (the samples after warm-up, over one window).
/// `None`: not enough samples for a verdict.
pub(crate) fn judge(stable: &[Sample], canary: &[Sample], rb: &RollbackConfig) -> Option<Verdict> {
    let min = rb.min_requests.max(1) as usize;
    if stable.len() < min || canary.len() < min {
        return None;
    }
    let alpha = (1.0 - rb.confidence).clamp(1e-9, 0.5);
    let errors = |q: &[Sample]| q.iter().filter(|s| !s.ok).count();
    let (es, ec) = (errors(stable), errors(canary));
    let (ns, nc) = (stable.len() as f64, canary.len() as f64);
    let (ps, pc) = (es as f64 / ns, ec as f64 / nc);
    let p_err = one_sided_p(
        (pc - ps - rb.max_error_rate_increase)
            / ((pc * (1.0 - pc) / nc + ps * (1.0 - ps) / ns).sqrt()).max(1e-12),
    );
    let mut summary = format!(
        "errors {:.1}% (n={}) vs stable {:.1}% (n={}), p={p_err:.2e} for more than +{:.1} points",
        pc * 100.0,
        canary.len(),
        ps * 100.0,
        stable.len(),
        rb.max_error_rate_increase * 100.0
    );
    if pc - ps > rb.max_error_rate_increase && p_err < alpha {
        return Some(Verdict {
            rollback: Some("errors"),
            summary,
        });
    }
    let ttft = ttft_test(stable, canary, rb);
    let Some(t) = ttft else {
        return Some(Verdict {
            rollback: None,
            summary,
        });
    };
    let _ = write!(
        summary,
        "; p90 TTFT {:.1} ms (n={}) vs stable {:.1} ms (n={}) over {} matched strata, \
         Mann-Whitney p={:.2e} for worse than x{} and +{} ms; confidence {}",
        t.p90_canary,
        t.n_canary,
        t.p90_stable,
        t.n_stable,
        t.strata,
        t.p,
        rb.max_ttft_p90_ratio,
        rb.ttft_floor_ms,
        rb.confidence
    );
    let p90_worse = t.p90_canary > tolerated(t.p90_stable, rb);
    Some(Verdict {
        rollback: (p90_worse && t.p < alpha).then_some("ttft"),
        summary,
    })
}

/// The largest TTFT still tolerated against a stable TTFT of `ms`.
fn tolerated(ms: f64, rb: &RollbackConfig) -> f64 {
    (ms * rb.max_ttft_p90_ratio).max(ms + rb.ttft_floor_ms)
}

#[derive(Debug)]
struct TtftTest {
    p: f64,
    strata: usize,
    n_stable: usize,
    n_canary: usize,
    p90_stable: f64,
    p90_canary: f64,
}

/// Stratified one-sided Mann-Whitney U of canary TTFT against tolerated
/// stable TTFT (van Elteren: each stratum's U weighted by 1/(n+m+1)).
fn ttft_test(stable: &[Sample], canary: &[Sample], rb: &RollbackConfig) -> Option<TtftTest> {
    let by_stratum = |q: &[Sample]| {
        let mut v: Vec<(Stratum, f64)> = q
            .iter()
            .filter_map(|s| s.ttft_ms.map(|t| (s.stratum, t)))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.total_cmp(&b.1)));
        v
    };
    let (s, c) = (by_stratum(stable), by_stratum(canary));
    let canary_groups: Vec<(Stratum, Vec<f64>)> = groups(&c).collect();
    let (mut w, mut mean, mut var) = (0.0, 0.0, 0.0);
    let (mut strata, mut all_s, mut all_c) = (0, Vec::new(), Vec::new());
    for (key, xs) in groups(&s) {
        let Some((_, ys)) = canary_groups.iter().find(|(k, _)| *k == key) else {
            continue;
        };
        if xs.len() < MIN_PER_STRATUM || ys.len() < MIN_PER_STRATUM {
            continue;
        }
        // Raised stable values stay sorted: the bound is monotonic.
        let raised: Vec<f64> = xs.iter().map(|&x| tolerated(x, rb)).collect();
        let (n, m) = (raised.len() as f64, ys.len() as f64);
        // U: pairs where the canary is slower than tolerated (ties count half).
        let u: f64 = ys
            .iter()
            .map(|&y| {
                let below = raised.partition_point(|&x| x < y);
                let equal = raised[below..].partition_point(|&x| x <= y);
                below as f64 + equal as f64 / 2.0
            })
            .sum();
        let k = n + m + 1.0;
        w += u / k;
        mean += n * m / 2.0 / k;
        var += n * m / 12.0 / k;
        strata += 1;
        all_s.extend_from_slice(&xs);
        all_c.extend_from_slice(ys);
    }
    if strata == 0 || var <= 0.0 {
        return None;
    }
    Some(TtftTest {
        p: one_sided_p((w - mean) / var.sqrt()),
        strata,
        n_stable: all_s.len(),
        n_canary: all_c.len(),
        p90_stable: p90(&mut all_s),
        p90_canary: p90(&mut all_c),
    })
}

/// The runs of equal strata of a sorted list, with their values.
fn groups(v: &[(Stratum, f64)]) -> impl Iterator<Item = (Stratum, Vec<f64>)> + '_ {
    v.chunk_by(|a, b| a.0 == b.0)
        .map(|run| (run[0].0, run.iter().map(|x| x.1).collect()))
}

fn p90(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let i = (((v.len() as f64) * 0.9).ceil() as usize).clamp(1, v.len()) - 1;
    v[i]
}

/// P(Z > z) for a standard normal Z.
fn one_sided_p(z: f64) -> f64 {
    0.5 * erfc(z / std::f64::consts::SQRT_2)
}

/// The complementary error function (Numerical Recipes' `erfcc`, relative
/// error under 1.2e-7 everywhere).
fn erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98
                                + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let r = t * poly.exp();
    if x >= 0.0 {
        r
    } else {
        2.0 - r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rb() -> RollbackConfig {
        RollbackConfig::default()
    }

    fn samples(n: usize, ttft: impl Fn(usize) -> f64, ok: impl Fn(usize) -> bool) -> Vec<Sample> {
        (0..n)
            .map(|i| Sample {
                ok: ok(i),
                ttft_ms: Some(ttft(i)),
                stratum: Stratum::of(Priority::Standard, 100),
            })
            .collect()
    }

    #[test]
    fn the_normal_tail_is_right() {
        assert!((one_sided_p(0.0) - 0.5).abs() < 1e-6);
        assert!((one_sided_p(2.326) - 0.01).abs() < 1e-4);
        assert!((one_sided_p(-1.645) - 0.95).abs() < 1e-4);
    }

    #[test]
    fn strata_match_band_and_prompt_length() {
        let s = |b, t| Stratum::of(b, t);
        assert_eq!(s(Priority::Critical, 100), s(Priority::Critical, 120));
        assert_ne!(s(Priority::Critical, 100), s(Priority::Critical, 300));
        assert_ne!(s(Priority::Critical, 100), s(Priority::Standard, 100));
        assert_eq!(
            s(Priority::Sheddable, 1 << 40),
            s(Priority::Sheddable, 1 << 20)
        );
    }

    #[test]
    fn a_clear_difference_rolls_back_and_a_small_one_does_not() {
        let base = |i: usize| 100.0 + (i % 17) as f64 * 5.0;
        let stable = samples(200, base, |_| true);
        assert_eq!(judge(&stable, &stable[..10], &rb()), None, "too few");
        let same = judge(&stable, &stable, &rb()).unwrap();
        assert_eq!(same.rollback, None, "{}", same.summary);
        let slow = samples(200, |i| 2.0 * base(i), |_| true);
        let v = judge(&stable, &slow, &rb()).unwrap();
        assert_eq!(v.rollback, Some("ttft"), "{}", v.summary);
        assert!(v.summary.contains("(n=200)"), "{}", v.summary);
        // Twice a tiny TTFT is under the absolute floor: not a regression.
        let tiny = samples(200, |i| 1.0 + (i % 7) as f64, |_| true);
        let tiny2 = samples(200, |i| 2.0 * (1.0 + (i % 7) as f64), |_| true);
        assert_eq!(judge(&tiny, &tiny2, &rb()).unwrap().rollback, None);
        let failing = samples(400, base, |i| i % 5 != 0);
        let v = judge(&stable, &failing, &rb()).unwrap();
        assert_eq!(v.rollback, Some("errors"), "{}", v.summary);
        let slightly = samples(400, base, |i| i % 50 != 0);
        assert_eq!(judge(&stable, &slightly, &rb()).unwrap().rollback, None);
    }

    #[test]
    fn unmatched_traffic_is_not_compared() {
        // The canary gets only long prompts (slow): nothing to match.
        let stable = samples(200, |_| 100.0, |_| true);
        let long: Vec<Sample> = samples(200, |_| 400.0, |_| true)
            .into_iter()
            .map(|s| Sample {
                stratum: Stratum::of(Priority::Standard, 4000),
                ..s
            })
            .collect();
        let v = judge(&stable, &long, &rb()).unwrap();
        assert_eq!(v.rollback, None, "{}", v.summary);
    }
}
