//! Simple load-only pickers: least request, round robin, random, power of two
//! choices. They serve as
//! baselines in benchmarks and for users who want them.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use rand::Rng;

use super::{is_excluded, Picker, RouteRequest};
use crate::pool::Replica;

fn allowed<'a>(
    replicas: &'a [Arc<Replica>],
    exclude: &'a [Arc<str>],
) -> impl Iterator<Item = &'a Arc<Replica>> + 'a {
    replicas.iter().filter(move |r| !is_excluded(r, exclude))
}

/// Fewest requests in flight, ties broken by fewest tokens in flight.
#[derive(Debug, Default)]
pub(crate) struct LeastRequest;

impl Picker for LeastRequest {
    fn pick(
        &self,
        replicas: &[Arc<Replica>],
        _req: &RouteRequest<'_>,
        exclude: &[Arc<str>],
    ) -> Option<Arc<Replica>> {
        allowed(replicas, exclude)
            .min_by_key(|r| (r.load.requests(), r.load.tokens()))
            .cloned()
    }
}

/// Each replica in turn.
#[derive(Debug, Default)]
pub(crate) struct RoundRobin {
    next: AtomicUsize,
}

impl Picker for RoundRobin {
    fn pick(
        &self,
        replicas: &[Arc<Replica>],
        _req: &RouteRequest<'_>,
        exclude: &[Arc<str>],
    ) -> Option<Arc<Replica>> {
        let n = replicas.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..n)
            .map(|i| &replicas[(start + i) % n])
            .find(|r| !is_excluded(r, exclude))
            .cloned()
    }
}

/// Uniformly at random.
#[derive(Debug, Default)]
pub(crate) struct Random;

impl Picker for Random {
    fn pick(
        &self,
        replicas: &[Arc<Replica>],
        _req: &RouteRequest<'_>,
        exclude: &[Arc<str>],
    ) -> Option<Arc<Replica>> {
        let candidates: Vec<&Arc<Replica>> = allowed(replicas, exclude).collect();
        if candidates.is_empty() {
            return None;
        }
        let i = rand::rng().random_range(0..candidates.len());
        Some(candidates[i].clone())
    }
}

/// Power of two choices: two distinct replicas at random, the less loaded wins.
#[derive(Debug, Default)]
pub(crate) struct PowerOfTwo;

impl Picker for PowerOfTwo {
    fn pick(
        &self,
        replicas: &[Arc<Replica>],
        _req: &RouteRequest<'_>,
        exclude: &[Arc<str>],
    ) -> Option<Arc<Replica>> {
        let candidates: Vec<&Arc<Replica>> = allowed(replicas, exclude).collect();
        let n = candidates.len();
        if n <= 1 {
            return candidates.first().map(|r| (*r).clone());
        }
        let mut rng = rand::rng();
        let a = rng.random_range(0..n);
        let b = (a + rng.random_range(1..n)) % n;
        let load = |r: &Replica| (r.load.requests(), r.load.tokens());
        let (ra, rb) = (candidates[a], candidates[b]);
        Some(if load(rb) < load(ra) { rb } else { ra }.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::Endpoint;

    fn replicas(n: u16) -> Vec<Arc<Replica>> {
        (0..n)
            .map(|i| {
                Arc::new(Replica::new(
                    Endpoint::from_url(&format!("http://127.0.0.1:{}", 9000 + i)).unwrap(),
                ))
            })
            .collect()
    }

    fn req() -> RouteRequest<'static> {
        RouteRequest {
            request_id: "r",
            model: "m",
            prompt_text: "",
            prompt_tokens: 1,
            max_tokens: 1,
            lora: None,
            hashes: Default::default(),
        }
    }

    #[test]
    fn least_request_prefers_idle_and_honours_exclude() {
        let rs = replicas(3);
        let _g = rs[0].begin(10, 0);
        let _g2 = rs[1].begin(10, 0);
        assert_eq!(
            LeastRequest.pick(&rs, &req(), &[]).unwrap().key(),
            rs[2].key()
        );
        let ex = [rs[2].endpoint.key.clone()];
        assert_ne!(
            LeastRequest.pick(&rs, &req(), &ex).unwrap().key(),
            rs[2].key()
        );
    }

    #[test]
    fn round_robin_cycles_and_skips_excluded() {
        let rs = replicas(3);
        let rr = RoundRobin::default();
        let keys: Vec<String> = (0..6)
            .map(|_| rr.pick(&rs, &req(), &[]).unwrap().key().to_string())
            .collect();
        assert_eq!(keys[0], keys[3]);
        assert_ne!(keys[0], keys[1]);
        let all: Vec<Arc<str>> = rs.iter().map(|r| r.endpoint.key.clone()).collect();
        assert!(rr.pick(&rs, &req(), &all).is_none());
        assert!(Random.pick(&rs, &req(), &all).is_none());
        assert!(Random.pick(&rs, &req(), &[]).is_some());
    }

    #[test]
    fn power_of_two_never_picks_the_busiest_of_two() {
        let rs = replicas(2);
        let _g = rs[0].begin(10, 0);
        for _ in 0..20 {
            assert_eq!(
                PowerOfTwo.pick(&rs, &req(), &[]).unwrap().key(),
                rs[1].key()
            );
        }
        let ex = [rs[1].endpoint.key.clone()];
        assert_eq!(
            PowerOfTwo.pick(&rs, &req(), &ex).unwrap().key(),
            rs[0].key()
        );
        let all: Vec<Arc<str>> = rs.iter().map(|r| r.endpoint.key.clone()).collect();
        assert!(PowerOfTwo.pick(&rs, &req(), &all).is_none());
    }
}
