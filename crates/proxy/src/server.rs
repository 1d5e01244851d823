//! Listeners and lifecycle: accepts connections (HTTP/1.1 and h2c on
//! cleartext; TLS with ALPN h2/http1.1 when configured), serves the proxy and
//! the admin endpoints, and drains gracefully.
//!
//! [`start`] is also the in-process API tests use: it binds the listeners
//! (port 0 works), spawns the accept loops and returns a [`ServerHandle`].

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::gateway::Gateway;
use crate::backpressure::StallIo;
use infergate_core::config::{Config, ConfigError, Limits, Listener, TlsConfig};

/// The server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS setup failed: {0}")]
    Tls(String),
    #[error("the admin listener binds {0}, beyond loopback, without a token: set `auth.admin.token_file` (or INFERGATE_ADMIN_TOKEN), or bind it to 127.0.0.1")]
    AdminUnprotected(SocketAddr),
}

/// A running gateway.
pub struct ServerHandle {
    /// Where the OpenAI API listens.
    pub local_addr: SocketAddr,
    /// Where `/metrics`, `/healthz`, `/readyz` and `/routes` listen.
    pub admin_addr: Option<SocketAddr>,
    pub gateway: Arc<Gateway>,
    stop_main: watch::Sender<Option<Duration>>,
    main_task: JoinHandle<()>,
    stop_admin: watch::Sender<Option<Duration>>,
    admin_task: Option<JoinHandle<()>>,
}

impl ServerHandle {
    /// The base URL of the API, `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.local_addr)
    }

    /// The admin base URL.
    pub fn admin_url(&self) -> Option<String> {
        self.admin_addr.map(|a| format!("http://{a}"))
    }

    /// Graceful shutdown: readiness turns off, the main listener stops
    /// accepting, idle connections close, requests in flight may finish for up
    /// to `grace`; whatever is left then is cut. The admin listener keeps
    /// answering (`/readyz` says draining) until the main one is done. Returns
    /// as soon as all is done (no fixed sleep).
    pub async fn drain(self, grace: Duration) {
        self.gateway.set_ready(false);
        let _ = self.stop_main.send(Some(grace));
        let _ = self.main_task.await;
        // Requests drained: what this replica leased from Redis goes back.
        self.gateway.quotas().release().await;
        let _ = self.stop_admin.send(Some(Duration::ZERO));
        if let Some(t) = self.admin_task {
            let _ = t.await;
        }
        // The spans of the requests just drained go out before the exit.
        if let Some(t) = self.gateway.tracing() {
            t.shutdown().await;
        }
    }

    /// Stops at once (in-flight requests are cut).
    pub async fn shutdown(self) {
        self.drain(Duration::ZERO).await
    }
}

/// Binds the listeners of `config` and starts serving.
pub async fn start(config: Config) -> Result<ServerHandle, StartError> {
    let listeners = config.listeners.clone();
    let gateway = Gateway::new(config)?;
    start_with(gateway, &listeners.main, listeners.admin.as_ref()).await
}

/// Writes each canary rollback to the gateway's audit log.
async fn audit_rollbacks(
    mut rx: tokio::sync::broadcast::Receiver<infergate_core::admission::RolledBack>,
    gw: std::sync::Weak<Gateway>,
) {
    use tokio::sync::broadcast::error::RecvError;
    loop {
        let rb = match rx.recv().await {
            Ok(rb) => rb,
            Err(RecvError::Lagged(n)) => {
                tracing::warn!(missed = n, "audit: canary rollbacks missed");
                continue;
            }
            Err(RecvError::Closed) => return,
        };
        let Some(g) = gw.upgrade() else { return };
        g.governance().audit.admin(
            "canary_rollback",
            serde_json::json!({"route": &*rb.route, "pool": rb.pool, "reason": rb.reason}),
        );
    }
}

/// Serves an existing [`Gateway`] on the given listeners.
pub async fn start_with(
    gateway: Arc<Gateway>,
    main: &Listener,
    admin: Option<&Listener>,
) -> Result<ServerHandle, StartError> {
    if let Some(a) = admin {
        if !a.address.ip().is_loopback() && !gateway.identity().authenticator().admin_protected() {
            return Err(StartError::AdminUnprotected(a.address));
        }
    }
    let (stop_main, stop_rx) = watch::channel(None);
    let (stop_admin, stop_admin_rx) = watch::channel(None);

    let main_listener = bind(main.address).await?;
    let local_addr = main_listener
        .local_addr()
        .map_err(|source| StartError::Bind {
            addr: main.address,
            source,
        })?;
    let tls = main.tls.as_ref().map(tls_acceptor).transpose()?;
    // Read at start (like `workers`): a reload does not rebuild listeners.
    let limits = ConnLimits::new(&gateway.config().limits);
    let gw = gateway.clone();
    // The request's future is boxed: hyper keeps its future's slot for the
    // connection's life, so an unboxed one (several KiB) would stay with
    // every open stream and idle keep-alive connection after its response
    // head went out; boxed, the slot is a pointer and the box is freed then.
    let handler = move |req, peer: SocketAddr| {
        let gw = gw.clone();
        Box::pin(
            async move { Ok::<_, Infallible>(super::handler::handle(gw, req, peer.ip()).await) },
        ) as BoxedResponse
    };
    let main_task = match main.workers {
        None | Some(0) => tokio::spawn(accept_loop(
            main_listener,
            tls,
            main.client_stall,
            limits.clone(),
            stop_rx,
            handler,
        )),
        Some(n) => spawn_workers(
            n,
            main_listener,
            tls,
            main.client_stall,
            limits.clone(),
            stop_rx,
            handler,
        )
        .map_err(|source| StartError::Bind {
            addr: local_addr,
            source,
        })?,
    };

    let mut admin_addr = None;
    let mut admin_task = None;
    if let Some(a) = admin {
        let l = bind(a.address).await?;
        admin_addr = l.local_addr().ok();
        let tls = a.tls.as_ref().map(tls_acceptor).transpose()?;
        // The status page's charts: one sample a second while the gateway lives.
        tokio::spawn(crate::telemetry::live::sample_loop(
            Arc::downgrade(&gateway),
            Gateway::history,
            Gateway::queue_depth,
        ));
        // Pool capacity samples, and canary rollbacks into the audit log.
        tokio::spawn(crate::governance::sample_loop(
            Arc::downgrade(&gateway),
            |g: &Gateway| &**g.governance(),
            Gateway::pools,
        ));
        tokio::spawn(audit_rollbacks(
            gateway.canary_rollbacks(),
            Arc::downgrade(&gateway),
        ));
        let gw = gateway.clone();
        admin_task = Some(tokio::spawn(accept_loop(
            l,
            tls,
            a.client_stall,
            limits.for_another_listener(),
            stop_admin_rx,
            move |req, _peer| {
                let r = super::admin::handle(&gw, &req);
                async move { Ok::<_, Infallible>(r) }
            },
        )));
    }
    tracing::info!(%local_addr, admin = ?admin_addr, "infergate listening");
    Ok(ServerHandle {
        local_addr,
        admin_addr,
        gateway,
        stop_main,
        main_task,
        stop_admin,
        admin_task,
    })
}

/// How many CPUs this process may use (1 when unknown).
pub fn available_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Serves `listener` on `n` threads, each running a current-thread runtime
/// with its own accept loop on the shared socket: a connection, its request
/// and its upstream connection live on one thread, with no cross-thread
/// wake-ups or work stealing on the request path. The returned task ends when
/// every worker has drained.
fn spawn_workers<F, Fut>(
    n: usize,
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    client_stall: Option<Duration>,
    limits: ConnLimits,
    stop: watch::Receiver<Option<Duration>>,
    handler: F,
) -> std::io::Result<JoinHandle<()>>
where
    F: Fn(http::Request<hyper::body::Incoming>, SocketAddr) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<http::Response<super::relay::GatewayBody>, Infallible>>
        + Send
        + 'static,
{
    let shared = listener.into_std()?;
    let mut done = Vec::with_capacity(n);
    for i in 1..=n.max(1) {
        let socket = shared.try_clone()?;
        let (tls, stop, handler) = (tls.clone(), stop.clone(), handler.clone());
        let limits = limits.clone();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        std::thread::Builder::new()
            .name(format!("infergate-w{i}"))
            .spawn(move || {
                super::worker::enter(i);
                runtime.block_on(async move {
                    match TcpListener::from_std(socket) {
                        Ok(l) => accept_loop(l, tls, client_stall, limits, stop, handler).await,
                        Err(e) => tracing::error!(error = %e, worker = i, "worker cannot listen"),
                    }
                });
                // Dropping the runtime ends this worker's upstream connections.
                drop(runtime);
                let _ = tx.send(());
            })?;
        done.push(rx);
    }
    Ok(tokio::spawn(async move {
        for rx in done {
            let _ = rx.await;
        }
    }))
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { addr, source })
}

fn tls_acceptor(cfg: &TlsConfig) -> Result<tokio_rustls::TlsAcceptor, StartError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let resolver = Arc::new(ReloadingCert {
        current: arc_swap::ArcSwap::from_pointee(load_certified(cfg, &provider)?),
    });
    tokio::spawn(watch_cert(
        Arc::downgrade(&resolver),
        cfg.clone(),
        provider.clone(),
    ));
    let mut sc = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| StartError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    sc.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(sc)))
}

/// The listener's certificate, swapped when its files change (a renewed
/// certificate is served without a restart).
#[derive(Debug)]
struct ReloadingCert {
    current: arc_swap::ArcSwap<rustls::sign::CertifiedKey>,
}

impl rustls::server::ResolvesServerCert for ReloadingCert {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.current.load_full())
    }
}

fn load_certified(
    cfg: &TlsConfig,
    provider: &rustls::crypto::CryptoProvider,
) -> Result<rustls::sign::CertifiedKey, StartError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(&cfg.cert_file)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| StartError::Tls(format!("{}: {e}", cfg.cert_file.display())))?;
    if certs.is_empty() {
        return Err(StartError::Tls(format!(
            "{}: no certificate",
            cfg.cert_file.display()
        )));
    }
    let key = PrivateKeyDer::from_pem_file(&cfg.key_file)
        .map_err(|e| StartError::Tls(format!("{}: {e}", cfg.key_file.display())))?;
    let signer = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| StartError::Tls(format!("{}: {e}", cfg.key_file.display())))?;
    Ok(rustls::sign::CertifiedKey::new(certs, signer))
}

/// How often the certificate files are checked for a change.
const CERT_POLL: Duration = Duration::from_secs(1);

/// Polls the certificate and key files (modification time and length, which
/// also sees the symlink swap of a mounted Secret) and swaps in a new
/// certificate; one that does not load is logged and the old one kept. Ends
/// with the listener (when the resolver is dropped).
async fn watch_cert(
    resolver: std::sync::Weak<ReloadingCert>,
    cfg: TlsConfig,
    provider: Arc<rustls::crypto::CryptoProvider>,
) {
    let stamp = |cfg: &TlsConfig| {
        [&cfg.cert_file, &cfg.key_file].map(|p| {
            std::fs::metadata(p)
                .ok()
                .map(|m| (m.modified().ok(), m.len()))
        })
    };
    let mut seen = stamp(&cfg);
    loop {
        tokio::time::sleep(CERT_POLL).await;
        let Some(resolver) = resolver.upgrade() else {
            return;
        };
        let now = stamp(&cfg);
        if now == seen {
            continue;
        }
        match load_certified(&cfg, &provider) {
            Ok(k) => {
                resolver.current.store(Arc::new(k));
                seen = now;
                tracing::info!(cert = %cfg.cert_file.display(), "TLS certificate reloaded");
            }
            // Perhaps half written: the rest of the write changes the stamp again.
            Err(e) => {
                seen = now;
                tracing::warn!(error = %e, "TLS certificate not reloaded; keeping the current one");
            }
        }
    }
}

/// The connection bounds of a listener (`limits` in the config), shared by
/// its worker threads.
#[derive(Clone)]
struct ConnLimits {
    /// Connections open now, across the listener's workers.
    open: Arc<AtomicUsize>,
    max_connections: usize,
    tls_handshake_timeout: Duration,
    header_read_timeout: Duration,
    h2_max_streams: u32,
    h2_keepalive_interval: Option<Duration>,
    h2_keepalive_timeout: Duration,
}

impl ConnLimits {
    fn new(l: &Limits) -> Self {
        ConnLimits {
            open: Arc::default(),
            max_connections: l.max_connections,
            tls_handshake_timeout: l.tls_handshake_timeout,
            header_read_timeout: l.header_read_timeout,
            h2_max_streams: l.http2_max_concurrent_streams,
            h2_keepalive_interval: l.http2_keepalive_interval,
            h2_keepalive_timeout: l.http2_keepalive_timeout,
        }
    }

    /// The same bounds with a count of its own.
    fn for_another_listener(&self) -> Self {
        ConnLimits {
            open: Arc::default(),
            ..self.clone()
        }
    }

    /// Counts a new connection, or `None` when the listener is full.
    fn admit(&self) -> Option<OpenConn> {
        let before = self.open.fetch_add(1, Ordering::AcqRel);
        let guard = OpenConn(self.open.clone());
        (before < self.max_connections).then_some(guard)
    }

    fn builder(&self) -> auto::Builder<TokioExecutor> {
        let mut b = auto::Builder::new(TokioExecutor::new());
        b.http1()
            .timer(TokioTimer::new())
            // No `pipeline_flush`: it switches hyper to flattening every body
            // byte into its head buffer (a copy of each relayed frame) instead
            // of queueing the frames' buffers for one `writev`.
            .header_read_timeout(self.header_read_timeout);
        b.http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(self.h2_max_streams)
            .keep_alive_interval(self.h2_keepalive_interval)
            .keep_alive_timeout(self.h2_keepalive_timeout);
        b
    }
}

/// The request future hyper holds per connection.
type BoxedResponse = std::pin::Pin<
    Box<
        dyn std::future::Future<
                Output = Result<http::Response<super::relay::GatewayBody>, Infallible>,
            > + Send,
    >,
>;

/// One open connection of a listener; uncounted on drop.
struct OpenConn(Arc<AtomicUsize>);

impl Drop for OpenConn {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

async fn accept_loop<F, Fut>(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    client_stall: Option<Duration>,
    limits: ConnLimits,
    mut stop: watch::Receiver<Option<Duration>>,
    handler: F,
) where
    F: Fn(http::Request<hyper::body::Incoming>, SocketAddr) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<http::Response<super::relay::GatewayBody>, Infallible>>
        + Send
        + 'static,
{
    let builder = Arc::new(limits.builder());
    let handshake_timeout = limits.tls_handshake_timeout;
    let graceful = GracefulShutdown::new();
    let mut conns = tokio::task::JoinSet::new();
    let grace = loop {
        tokio::select! {
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(s) => s,
                    Err(e) => {
                        // Out of file descriptors and the like: back off briefly.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Some(open) = limits.admit() else {
                    // Over the cap: closed at once (dropped), before any read.
                    tracing::debug!(max = limits.max_connections, "connection refused: listener full");
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let stream = StallIo::new(stream, client_stall);
                let h = handler.clone();
                // The peer address is the caller's source for `auth.trusted_headers`.
                let svc = service_fn(move |req| h(req, peer));
                let builder = builder.clone();
                let watcher = graceful.watcher();
                let tls = tls.clone();
                // Plain and TLS connections are separate tasks: a task is as
                // large as its future, and the TLS one carries rustls state.
                match tls {
                    None => {
                        conns.spawn(async move {
                            let _open = open;
                            let conn = builder.serve_connection(TokioIo::new(stream), svc);
                            if let Err(e) = watcher.watch(conn.into_owned()).await {
                                tracing::debug!(error = %e, "connection ended with an error");
                            }
                        });
                    }
                    Some(acceptor) => {
                        conns.spawn(async move {
                            let _open = open;
                            let handshake = tokio::time::timeout(handshake_timeout, acceptor.accept(stream));
                            let s = match handshake.await {
                                Ok(Ok(s)) => s,
                                Ok(Err(e)) => {
                                    tracing::debug!(error = %e, "TLS handshake failed");
                                    return;
                                }
                                Err(_) => {
                                    tracing::debug!("TLS handshake timed out");
                                    return;
                                }
                            };
                            let conn = builder.serve_connection(TokioIo::new(s), svc);
                            if let Err(e) = watcher.watch(conn.into_owned()).await {
                                tracing::debug!(error = %e, "connection ended with an error");
                            }
                        });
                    }
                }
            }
            changed = stop.changed() => {
                let grace = match changed {
                    Ok(()) => stop.borrow().unwrap_or_default(),
                    Err(_) => Duration::ZERO,
                };
                break grace;
            }
        }
    };
    drop(listener);
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            ?grace,
            "grace period over: cutting the remaining connections"
        );
        conns.abort_all();
    }
    while conns.join_next().await.is_some() {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// The request header names the vendored hyper matches without its
    /// table (`header_name!` in `vendor/hyper/src/proto/h1/role.rs`) reach
    /// the handler under their own names, lowercase or not.
    #[tokio::test]
    async fn common_request_header_names_arrive_as_sent() {
        let sent = [
            ("host", "h"),
            ("accept", "a"),
            ("connection", "keep-alive"),
            ("user-agent", "u"),
            ("content-type", "t"),
            ("authorization", "z"),
            ("content-length", "0"),
            ("accept-encoding", "e"),
            ("x-other", "o"),
        ];
        let want: Vec<String> = sent.iter().map(|(n, v)| format!("{n}={v}")).collect();
        let want = want.join(",");
        for upper in [false, true] {
            let (mut client, server) = tokio::io::duplex(4096);
            let svc = service_fn(|req: http::Request<hyper::body::Incoming>| async move {
                let seen: Vec<String> = req
                    .headers()
                    .iter()
                    .map(|(n, v)| format!("{}={}", n.as_str(), v.to_str().unwrap_or("?")))
                    .collect();
                Ok::<_, Infallible>(http::Response::new(seen.join(",")))
            });
            let conn = tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(server), svc),
            );
            let mut head = String::from("POST /v1/completions HTTP/1.1\r\n");
            for (n, v) in sent {
                let n = if upper {
                    n.to_ascii_uppercase()
                } else {
                    n.to_owned()
                };
                head.push_str(&format!("{n}: {v}\r\n"));
            }
            head.push_str("\r\n");
            client.write_all(head.as_bytes()).await.unwrap();
            let mut got = Vec::new();
            let read = async {
                let mut buf = [0u8; 1024];
                while !got.ends_with(want.as_bytes()) {
                    let n = client.read(&mut buf).await.unwrap();
                    assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&got));
                    got.extend_from_slice(&buf[..n]);
                }
            };
            tokio::time::timeout(Duration::from_secs(10), read)
                .await
                .unwrap();
            assert!(got.starts_with(b"HTTP/1.1 200"), "upper: {upper}");
            drop(client);
            let _ = conn.await;
        }
    }
}
