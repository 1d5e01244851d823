//! TLS on the main listener: ALPN negotiates h2 (and http/1.1 still works).
//! The certificate is made with the `openssl` CLI, so the tests are ignored
//! by default (counted as such in the summary); `.ci/run` installs openssl
//! and runs them with `--include-ignored`.

#[path = "support_gateway/mod.rs"]
mod support;

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use support::*;

fn make_cert(dir: &std::path::Path) -> Result<(), String> {
    let out = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-addext",
            "basicConstraints=critical,CA:FALSE",
            "-keyout",
        ])
        .arg(dir.join("key.pem"))
        .arg("-out")
        .arg(dir.join("cert.pem"))
        .output()
        .map_err(|e| format!("openssl not found: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "openssl failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

async fn connect(
    addr: std::net::SocketAddr,
    cert: &std::path::Path,
    alpn: &[u8],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    try_connect(addr, cert, alpn).await.unwrap()
}

/// A TLS handshake trusting only the certificate in `cert`.
async fn try_connect(
    addr: std::net::SocketAddr,
    cert: &std::path::Path,
    alpn: &[u8],
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(cert).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![alpn.to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
}

fn request(url: &str) -> http::Request<Full<Bytes>> {
    http::Request::post(format!("{url}/v1/completions"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(
            br#"{"model":"m","prompt":"x","stream":true,"max_tokens":3}"#,
        )))
        .unwrap()
}

#[tokio::test]
#[ignore = "needs openssl: apt-get install openssl"]
async fn tls_listener_speaks_h2_and_http1_by_alpn() {
    let dir = tempfile::tempdir().unwrap();
    if let Err(why) = make_cert(dir.path()) {
        if std::env::var("INFERGATE_REQUIRE_EXTERNAL").as_deref() == Ok("1") {
            panic!("required external tool missing: {why}");
        }
        eprintln!("SKIPPED tls_listener_speaks_h2_and_http1_by_alpn: {why}");
        return;
    }
    let up = mini_upstream("a", Behaviour::Echo).await;
    let mut cfg = config(&[up.url()], "");
    cfg.listeners.main.tls = Some(infergate_core::config::TlsConfig {
        cert_file: dir.path().join("cert.pem"),
        key_file: dir.path().join("key.pem"),
    });
    let gw = gateway(cfg).await;
    let url = format!("https://localhost:{}", gw.local_addr.port());
    let cert = dir.path().join("cert.pem");

    let tls = connect(gw.local_addr, &cert, b"h2").await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let resp = send.send_request(request(&url)).await.unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(body.ends_with(b"data: [DONE]\n\n"));

    let tls = connect(gw.local_addr, &cert, b"http/1.1").await;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let resp = send.send_request(request(&url)).await.unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_11);
    assert_eq!(resp.status(), 200);
}

/// A renewed certificate is served without a restart, and a client that
/// never finishes its handshake is cut after `limits.tls_handshake_timeout`.
#[tokio::test]
#[ignore = "needs openssl: apt-get install openssl"]
async fn certificate_files_are_reloaded_and_stalled_handshakes_are_cut() {
    let dir = tempfile::tempdir().unwrap();
    if let Err(why) = make_cert(dir.path()) {
        if std::env::var("INFERGATE_REQUIRE_EXTERNAL").as_deref() == Ok("1") {
            panic!("required external tool missing: {why}");
        }
        eprintln!("SKIPPED certificate_files_are_reloaded_and_stalled_handshakes_are_cut: {why}");
        return;
    }
    let up = mini_upstream("a", Behaviour::Echo).await;
    let mut cfg = config(&[up.url()], "");
    cfg.listeners.main.tls = Some(infergate_core::config::TlsConfig {
        cert_file: dir.path().join("cert.pem"),
        key_file: dir.path().join("key.pem"),
    });
    cfg.limits.tls_handshake_timeout = std::time::Duration::from_millis(300);
    let gw = gateway(cfg).await;
    let first = dir.path().join("first.pem");
    std::fs::copy(dir.path().join("cert.pem"), &first).unwrap();
    assert!(try_connect(gw.local_addr, &first, b"h2").await.is_ok());

    // A new self-signed certificate (a new key) replaces the files.
    make_cert(dir.path()).unwrap();
    let second = dir.path().join("cert.pem");
    let started = std::time::Instant::now();
    while try_connect(gw.local_addr, &second, b"h2").await.is_err() {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(5),
            "the new certificate is served within 5 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(
        try_connect(gw.local_addr, &first, b"h2").await.is_err(),
        "the old certificate is no longer served"
    );

    // A client that sends nothing after connecting is closed.
    use tokio::io::AsyncReadExt;
    let mut tcp = tokio::net::TcpStream::connect(gw.local_addr).await.unwrap();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(std::time::Duration::from_secs(3), tcp.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "closed after the handshake timeout: {read:?}"
    );
}
