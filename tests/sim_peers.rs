//! vllm-router and sglang-router route streaming and non-streaming requests to
//! a fleet of `infergate sim` replicas (runs loadtest/peers_on_sim.sh).
//!
//! Needs the peer routers in a venv (PEERS_VENV, default /tmp/peers-venv) and
//! curl, so it is `#[ignore]`d: `cargo test -- --include-ignored` (what .ci/run
//! does, after installing them) runs it. Run that way without the routers, it
//! skips with a message, unless INFERGATE_REQUIRE_EXTERNAL=1 (CI), where their
//! absence fails the test.

use std::path::Path;
use std::process::Command;

#[test]
#[ignore = "needs vllm-router and sglang-router: python3 -m venv /tmp/peers-venv && /tmp/peers-venv/bin/pip install vllm-router==0.1.17 sglang-router==0.3.2"]
fn peer_routers_route_to_sim_replicas() {
    let venv = std::env::var("PEERS_VENV").unwrap_or_else(|_| "/tmp/peers-venv".into());
    let have = ["vllm-router", "sglang-router"]
        .iter()
        .all(|t| Path::new(&venv).join("bin").join(t).exists());
    if !have {
        let msg = format!("vllm-router/sglang-router not found in {venv}/bin");
        if std::env::var("INFERGATE_REQUIRE_EXTERNAL").as_deref() == Ok("1") {
            panic!("{msg} (INFERGATE_REQUIRE_EXTERNAL=1)");
        }
        eprintln!("skipping: {msg}");
        return;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("loadtest/peers_on_sim.sh");
    let out = Command::new("bash")
        .arg(script)
        .env("INFERGATE_BIN", env!("CARGO_BIN_EXE_infergate"))
        .env("PEERS_VENV", &venv)
        // One policy keeps the test short; the script runs both by default.
        .env("POLICIES", "cache_aware")
        .output()
        .expect("run peers_on_sim.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "peers_on_sim.sh failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("PASS vllm-router cache_aware: chat SSE with usage and [DONE]"));
    assert!(stdout.contains("PASS sglang-router cache_aware: chat JSON"));
}
