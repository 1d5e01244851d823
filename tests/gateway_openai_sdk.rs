//! The unchanged `openai` Python SDK streams and non-streams through the
//! gateway (in front of simulated replicas).
//!
//! Needs python3 with the SDK, so it is `#[ignore]`d: `cargo test` lists it as
//! ignored, and `cargo test -- --include-ignored` (what .ci/run does, after
//! installing the SDK) runs it. Run that way without the SDK, it skips with a
//! printed reason, unless INFERGATE_REQUIRE_EXTERNAL=1 (CI), which fails it.

#[path = "support_gateway/mod.rs"]
mod support;

use infergate_sim::{start_fleet, FleetConfig, Profile};
use support::*;

#[tokio::test]
#[ignore = "needs the openai Python SDK: python3 -m pip install openai"]
async fn openai_python_sdk_works_through_the_gateway() {
    if !python_modules(
        "openai_python_sdk_works_through_the_gateway",
        "openai",
        "python3 -m pip install openai",
    ) {
        return;
    }
    let fleet = start_fleet(FleetConfig {
        replicas: 2,
        served_model_name: Some("m".into()),
        time_scale: 20.0,
        ..FleetConfig::with_profile(Profile::Tiny)
    })
    .await
    .unwrap();
    let gw = gateway(config(&fleet.urls(), "")).await;
    let args = [format!("{}/v1", gw.url()), "m".into()];
    let stdout = run_python("openai_client.py", &args).await;
    assert!(stdout.contains("openai sdk ok"), "{stdout}");
}
