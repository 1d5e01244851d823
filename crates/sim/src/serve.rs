//! Serving one replica: the accept loop, which follows the replica's lifecycle
//! signals (it closes the listener while the replica refuses connections or is
//! crashed and binds the same address again after), and each HTTP/1
//! connection, cut at once by a crash or shutdown. Requests go to `http.rs`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use super::error::SimError;
use super::http::handle;
use super::replica::Replica;

/// Binds `addr` again after a crash or refusal, retrying for about 2 s while
/// the closed listener's port is still being released.
async fn bind(addr: SocketAddr) -> Result<TcpListener, SimError> {
    let mut last = None;
    for _ in 0..100 {
        match TcpListener::bind(addr).await {
            Ok(l) => return Ok(l),
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Err(SimError::Bind {
        addr,
        source: last.unwrap_or_else(|| std::io::Error::other("bind failed")),
    })
}

/// Accepts connections while the replica is up; closes the listener while it
/// refuses connections or is crashed, and binds the same address again after.
pub(crate) async fn accept_loop(rep: Arc<Replica>, listener: TcpListener) {
    let mut ctl = rep.control.subscribe();
    let mut listener = Some(listener);
    loop {
        let c = ctl.borrow_and_update().clone();
        if c.shutdown {
            return;
        }
        let up = !c.refuse && !c.crashed;
        if !up {
            listener = None;
        } else if listener.is_none() {
            match bind(rep.addr).await {
                Ok(l) => listener = Some(l),
                Err(e) => {
                    tracing::error!(replica = rep.index, "cannot listen again: {e}");
                    return;
                }
            }
        }
        match &listener {
            Some(l) => tokio::select! {
                r = l.accept() => match r {
                    Ok((stream, _)) => {
                        let _ = stream.set_nodelay(true);
                        tokio::spawn(serve_connection(rep.clone(), stream, c.kill_epoch));
                    }
                    Err(e) => {
                        tracing::warn!(replica = rep.index, "accept: {e}");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                },
                r = ctl.changed() => if r.is_err() { return },
            },
            None => {
                if ctl.changed().await.is_err() {
                    return;
                }
            }
        }
    }
}

async fn serve_connection(rep: Arc<Replica>, stream: tokio::net::TcpStream, epoch: u64) {
    let mut ctl = rep.control.subscribe();
    let svc_rep = rep.clone();
    let svc = service_fn(move |req| handle(svc_rep.clone(), req));
    // One flat buffer per write instead of a writev of chunk-size line, data
    // and CRLF: SSE chunks are small, so the copy is cheaper than the iovecs.
    let conn = http1::Builder::new()
        .keep_alive(true)
        .writev(false)
        .serve_connection(TokioIo::new(stream), svc);
    tokio::select! {
        biased; // a crash must win over a body that became ready at the same time
        _ = async {
            loop {
                if ctl.changed().await.is_err() { return; }
                let c = ctl.borrow();
                if c.shutdown || c.kill_epoch != epoch { return; }
            }
        } => {}
        r = conn => if let Err(e) = r {
            tracing::trace!(replica = rep.index, "connection ended: {e}");
        },
    }
}
