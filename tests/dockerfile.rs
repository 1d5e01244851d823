//! The Dockerfile stays in step with the manifests and the code: a
//! multi-stage build whose runtime stage runs as the user the Deployment
//! requires, exposes the ports it names and the config listens on, starts the
//! binary the build stage builds with arguments the CLI accepts, copies
//! everything the build needs, and uses a toolchain new enough for the
//! workspace. (No container builder can pull base images on this machine:
//! docs/kubernetes.md, "The container image", says what was tried.)

use std::collections::BTreeSet;
use std::path::Path;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(p: &str) -> String {
    std::fs::read_to_string(root().join(p)).unwrap_or_else(|e| panic!("{p}: {e}"))
}

/// Instructions of the Dockerfile: (keyword, arguments), continuation lines
/// joined, comments dropped.
fn instructions(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('#') || (t.is_empty() && cur.is_empty()) {
            continue;
        }
        cur.push_str(t.trim_end_matches('\\'));
        cur.push(' ');
        if !t.ends_with('\\') {
            let (k, rest) = cur.trim().split_once(' ').unwrap_or((cur.trim(), ""));
            out.push((k.to_ascii_uppercase(), rest.trim().to_string()));
            cur.clear();
        }
    }
    out
}

/// Numbers following `key:` in YAML text.
fn yaml_numbers(text: &str, key: &str) -> BTreeSet<u32> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix(key)?.trim().parse().ok())
        .collect()
}

fn json_array(args: &str) -> Vec<String> {
    serde_json::from_str(args).unwrap_or_else(|e| panic!("not a JSON array ({e}): {args}"))
}

#[test]
fn dockerfile_matches_the_manifests_and_the_code() {
    let ins = instructions(&read("Dockerfile"));
    let froms: Vec<usize> = (0..ins.len()).filter(|&i| ins[i].0 == "FROM").collect();
    assert!(froms.len() >= 2, "multi-stage: {froms:?}");
    let (build, runtime) = (&ins[froms[0]..froms[1]], &ins[*froms.last().unwrap()..]);
    assert!(build[0].1.ends_with(" AS build"), "{:?}", build[0]);
    assert!(
        !runtime[0].1.contains("rust:"),
        "the runtime stage carries no toolchain: {:?}",
        runtime[0]
    );

    // The toolchain is new enough for the workspace.
    let image = build[0].1.split_whitespace().next().unwrap();
    let tag = image.rsplit(':').next().unwrap();
    let version = |v: &str| -> (u32, u32) {
        let mut it = v.split(['.', '-']).map(|x| x.parse().unwrap_or(0));
        (it.next().unwrap_or(0), it.next().unwrap_or(0))
    };
    let cargo = read("Cargo.toml");
    let msrv = cargo
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = "))
        .unwrap()
        .trim_matches('"');
    assert!(version(tag) >= version(msrv), "{tag} < {msrv}");

    // The build copies every path it needs, and each exists.
    let copied: Vec<String> = build
        .iter()
        .filter(|(k, _)| k == "COPY")
        .flat_map(|(_, a)| {
            let parts: Vec<&str> = a.split_whitespace().collect();
            parts[..parts.len() - 1]
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
        })
        .collect();
    for p in &copied {
        assert!(root().join(p).exists(), "COPY {p}: no such path");
    }
    for needed in ["Cargo.toml", "Cargo.lock", "crates", "src", "config"] {
        assert!(copied.iter().any(|c| c == needed), "{needed} not copied");
    }
    let run = build
        .iter()
        .find(|(k, _)| k == "RUN")
        .map(|(_, a)| a.clone())
        .unwrap();
    assert!(
        run.contains("cargo build --release --locked --bin infergate"),
        "{run}"
    );

    // Runtime: the user and ports the Deployment expects, the config's ports.
    let deployment = read("deploy/base/deployment.yaml");
    let user = runtime.iter().find(|(k, _)| k == "USER").unwrap().1.clone();
    let uid = yaml_numbers(&deployment, "runAsUser:");
    let gid = yaml_numbers(&deployment, "runAsGroup:");
    assert_eq!(
        user,
        format!(
            "{}:{}",
            uid.iter().next().unwrap(),
            gid.iter().next().unwrap()
        )
    );
    let exposed: BTreeSet<u32> = runtime
        .iter()
        .filter(|(k, _)| k == "EXPOSE")
        .flat_map(|(_, a)| a.split_whitespace().map(|p| p.parse::<u32>().unwrap()))
        .collect();
    assert_eq!(exposed, yaml_numbers(&deployment, "containerPort:"));
    let config = read("deploy/base/config.yaml");
    let listen: BTreeSet<u32> = config
        .lines()
        .filter_map(|l| {
            let at = l.find("address: \"")? + "address: \"".len();
            let addr = &l[at..at + l[at..].find('"')?];
            addr.rsplit(':').next()?.parse().ok()
        })
        .collect();
    assert_eq!(exposed, listen, "deploy/base/config.yaml listeners");

    // The entrypoint is the built binary, and the default arguments parse.
    let entry = json_array(&runtime.iter().find(|(k, _)| k == "ENTRYPOINT").unwrap().1);
    assert_eq!(entry, ["/usr/local/bin/infergate"]);
    assert!(runtime
        .iter()
        .any(|(k, a)| k == "COPY" && a.ends_with(&entry[0]) && a.contains("--from=build")));
    let cmd = json_array(&runtime.iter().find(|(k, _)| k == "CMD").unwrap().1);
    let missing = tempfile::tempdir().unwrap().path().join("config.yaml");
    let args: Vec<String> = cmd
        .iter()
        .map(|a| {
            if a.starts_with("/etc/infergate/") {
                missing.display().to_string()
            } else {
                a.clone()
            }
        })
        .collect();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_infergate"))
        .args(&args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Arguments clap rejects exit with 2; a missing config file is reported by name.
    assert_ne!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("config.yaml"), "{stderr}");

    // The build context leaves target/ and .git out.
    let ignore = read(".dockerignore");
    for p in ["target", ".git"] {
        assert!(
            ignore.lines().any(|l| l.trim() == p),
            ".dockerignore lacks {p}"
        );
    }
}
