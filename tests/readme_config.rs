//! The config examples shown to users must be valid: every ```yaml block of
//! README.md and docs/config.md that is a whole gateway config (it has
//! `routes:` at the top level) parses and validates.

use infergate_core::config::Config;

fn whole_configs(markdown: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = markdown;
    while let Some(start) = rest.find("```yaml\n") {
        let body = &rest[start + 8..];
        let Some(end) = body.find("\n```") else { break };
        let block = &body[..end];
        if block.lines().any(|l| l.starts_with("routes:"))
            && block.lines().any(|l| l.starts_with("pools:"))
        {
            out.push(block.to_string());
        }
        rest = &body[end..];
    }
    out
}

#[test]
fn readme_and_config_reference_examples_are_valid_configs() {
    let mut checked = 0;
    for file in ["README.md", "docs/config.md"] {
        let text = std::fs::read_to_string(file).unwrap();
        for block in whole_configs(&text) {
            let cfg = Config::parse(&block, file)
                .unwrap_or_else(|e| panic!("{file}: example config invalid: {e}\n{block}"));
            cfg.validate()
                .unwrap_or_else(|e| panic!("{file}: example config invalid: {e}\n{block}"));
            checked += 1;
        }
    }
    assert!(
        checked >= 2,
        "expected the README and docs/config.md to carry whole config examples, found {checked}"
    );
}
