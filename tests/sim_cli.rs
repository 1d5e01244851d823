//! `infergate sim` as a user runs it: --help documents the flags, and the
//! binary serves the replicas it prints.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

#[test]
fn help_documents_every_flag() {
    let out = Command::new(env!("CARGO_BIN_EXE_infergate"))
        .args(["sim", "--help"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for flag in [
        "--profile",
        "--replicas",
        "--base-port",
        "--time-scale",
        "--served-model-name",
        "--lora",
        "--metrics-flavor",
        "--output-len",
        "--block-size",
        "--num-gpu-blocks",
        "--max-num-seqs",
        "--max-num-batched-tokens",
        "--max-model-len",
        "--step-fixed-us",
        "--prefill-us-per-token",
        "--decode-us-per-seq",
        "--kv-read-ns-per-token",
        "--max-loras",
        "--lora-load-ms",
        "--fault-error-rate",
        "--fault-429-rate",
        "--fault-stall-rate",
        "--fault-crash-after",
        "--fault-refuse",
        "--load-delay-ms",
        "llama-8b-h100",
        "llama-70b-4xh100",
        "llama-1b-l4",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}:\n{help}");
    }
}

/// Kills the child on drop so a failing test leaves no process behind.
struct Child(std::process::Child);
impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn binary_serves_the_replicas_it_prints() {
    let mut child = Child(
        Command::new(env!("CARGO_BIN_EXE_infergate"))
            .args([
                "sim",
                "--profile",
                "tiny",
                "--replicas",
                "2",
                "--base-port",
                "0",
                "--time-scale",
                "10",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut lines = BufReader::new(child.0.stdout.take().unwrap()).lines();
    let mut addrs = Vec::new();
    for _ in 0..2 {
        let line = lines.next().unwrap().unwrap();
        let url = line.split_whitespace().nth(2).unwrap().to_owned();
        addrs.push(url.trim_start_matches("http://").to_owned());
    }
    for addr in addrs {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let body = r#"{"prompt":"hello","max_tokens":2}"#;
        write!(s, "POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len()).unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).unwrap();
        assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
        assert!(resp.contains("\"completion_tokens\":2"), "{resp}");
    }
}
