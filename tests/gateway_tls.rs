//! TLS on the main listener: ALPN negotiates h2 (and http/1.1 still works).
//! The certificate is made with the `openssl` CLI; without it the test skips
//! with a printed reason, unless INFERGATE_REQUIRE_EXTERNAL=1.

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
        .unwrap()
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
