//! The cost authentication adds to a request: `Authenticator::authenticate`
//! for a valid key among 1,000 (one SHA-256 of the presented key, one lookup,
//! one constant-time compare), a wrong key, and `auth: none`.
//!
//! Run: `cargo bench -p infergate-core --bench identity`.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};

use criterion::{criterion_group, criterion_main, Criterion};
use http::{HeaderMap, HeaderValue};
use infergate_core::identity::{hash_key, AuthConfig, Authenticator, KeyFile};

const KEYS: usize = 1_000;

fn key(i: usize) -> String {
    format!("sk-bench-{i:06}-0123456789abcdef0123456789abcdef")
}

fn bench(c: &mut Criterion) {
    let mut yaml = String::new();
    for i in 0..KEYS {
        yaml.push_str(&format!(
            "- {{id: k{i}, sha256: {}, team: t{}}}\n",
            hash_key(&key(i)),
            i % 10
        ));
    }
    let keys = KeyFile::parse(&yaml, "bench").expect("key file");
    let keyed: AuthConfig = serde_yaml_ng::from_str("mode: keys").expect("auth config");
    let none: AuthConfig = serde_yaml_ng::from_str("mode: none").expect("auth config");
    let with_keys = Authenticator::new(&keyed, &keys, None);
    let open = Authenticator::new(&none, &KeyFile::default(), None);
    let peer = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let headers = |k: &str| {
        let mut h = HeaderMap::new();
        h.insert(
            http::header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {k}")).expect("header"),
        );
        h.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h
    };
    let valid = headers(&key(KEYS / 2));
    let wrong = headers("sk-not-a-key-0123456789abcdef0123456789abcdef");
    assert!(with_keys.authenticate(&valid, peer).is_ok());
    assert!(with_keys.authenticate(&wrong, peer).is_err());
    c.bench_function("authenticate_valid_key_of_1000", |b| {
        b.iter(|| black_box(with_keys.authenticate(black_box(&valid), peer).is_ok()))
    });
    c.bench_function("authenticate_wrong_key", |b| {
        b.iter(|| black_box(with_keys.authenticate(black_box(&wrong), peer).is_err()))
    });
    c.bench_function("authenticate_auth_none", |b| {
        b.iter(|| black_box(open.authenticate(black_box(&valid), peer).is_ok()))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
