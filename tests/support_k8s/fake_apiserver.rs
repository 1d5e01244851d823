//! An in-process fake Kubernetes API server for tests, speaking the real list
//! and watch protocol on 127.0.0.1 so kube-rs's watcher runs unmodified:
//!
//! - one global, monotonically increasing `resourceVersion`; every object
//!   carries its own, every list carries the current one;
//! - list (`GET .../{plural}`) honours `labelSelector` (`k=v`, `k==v`, `k!=v`,
//!   `k`, `!k`, `k in (a,b)`, `k notin (a,b)`) and `fieldSelector`
//!   (`metadata.name=`, `metadata.namespace=`, also `!=`);
//! - watch (`?watch=true&resourceVersion=N`) answers 200 with newline-terminated
//!   JSON events flushed one per chunk: history newer than N first, then live
//!   events; a watch subscribes under the same lock it reads history with, so
//!   nothing falls between list and watch; objects moving in or out of a
//!   selector are seen as ADDED / DELETED like the real server does;
//! - BOOKMARK events every `bookmark_interval` when `allowWatchBookmarks=true`;
//! - a watch from a compacted resource version gets `200` + one ERROR event with
//!   a `Status` of code 410 / reason `Expired`, then EOF (what kube-apiserver does);
//! - the stream closes after `timeoutSeconds` (capped by `max_watch`);
//! - `POST` creates (used for Events), `GET .../{name}` reads one object.
//!
//! Test hooks: [`FakeApiServer::upsert`], [`FakeApiServer::delete`],
//! [`FakeApiServer::compact_and_disconnect`] (optionally mutating while no watch
//! can see it, which forces clients to relist), [`FakeApiServer::fail_requests`],
//! [`FakeApiServer::forbid`], and call counters.
//!
//! Include it from a test with
//! `#[path = "support_k8s/fake_apiserver.rs"] mod fake_apiserver;`.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::channel::mpsc;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Value};

type Body = BoxBody<Bytes, Infallible>;

/// Behaviour knobs.
#[derive(Debug, Clone)]
pub struct FakeOptions {
    /// How often every open watch that asked for bookmarks gets one.
    pub bookmark_interval: Duration,
    /// Upper bound on how long one watch stays open (the client asks for 290 s).
    pub max_watch: Duration,
}

impl Default for FakeOptions {
    fn default() -> Self {
        FakeOptions {
            bookmark_interval: Duration::from_millis(300),
            max_watch: Duration::from_secs(290),
        }
    }
}

/// A running fake API server. Dropping it stops accepting connections.
pub struct FakeApiServer {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.accept.abort();
        // Close every open watch so clients see EOF.
        if let Ok(mut s) = self.state.lock() {
            s.watches.clear();
        }
    }
}

#[derive(Default)]
struct State {
    rv: u64,
    /// Watches from a resource version older than this get 410 Expired.
    history_start: u64,
    /// (plural, namespace, name) -> object
    objects: BTreeMap<(String, String, String), Value>,
    history: Vec<Change>,
    watches: Vec<Watch>,
    next_watch_id: u64,
    list_calls: HashMap<String, usize>,
    watch_calls: HashMap<String, usize>,
    /// Requests failing with 500 still to serve (any resource).
    failures_left: usize,
    forbidden: HashSet<String>,
}

#[derive(Clone)]
struct Change {
    rv: u64,
    plural: String,
    namespace: String,
    /// The object before the change (None for a creation).
    old: Option<Value>,
    /// The object after the change (None for a deletion; then `last` holds it).
    new: Option<Value>,
    last: Value,
}

struct Watch {
    id: u64,
    plural: String,
    namespace: Option<String>,
    labels: Selector,
    fields: Selector,
    bookmarks: bool,
    tx: mpsc::UnboundedSender<Result<Frame<Bytes>, Infallible>>,
}

impl FakeApiServer {
    pub async fn start() -> FakeApiServer {
        Self::start_with(FakeOptions::default()).await
    }

    pub async fn start_with(opts: FakeOptions) -> FakeApiServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake apiserver");
        let addr = listener.local_addr().expect("local addr");
        let state = Arc::new(Mutex::new(State {
            rv: 1,
            history_start: 1,
            ..State::default()
        }));
        let st = state.clone();
        let accept = tokio::spawn(async move {
            let bookmarks = tokio::spawn(bookmark_loop(st.clone(), opts.bookmark_interval));
            let _bookmarks = AbortOnDrop(bookmarks);
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let st = st.clone();
                let opts = opts.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let st = st.clone();
                        let opts = opts.clone();
                        async move { Ok::<_, Infallible>(handle(st, &opts, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        FakeApiServer {
            addr,
            state,
            accept,
        }
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kube client talking to this server, default namespace `namespace`.
    pub fn client(&self, namespace: &str) -> kube::Client {
        let mut config = kube::Config::new(self.url().parse().expect("fake url"));
        config.default_namespace = namespace.to_string();
        kube::Client::try_from(config).expect("kube client for fake apiserver")
    }

    /// Writes a kubeconfig pointing at this server (context `test`, with
    /// `namespace`) into `dir`; returns its path.
    pub fn write_kubeconfig(&self, dir: &std::path::Path, namespace: &str) -> std::path::PathBuf {
        let path = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: test\n\
             clusters:\n- name: fake\n  cluster:\n    server: {}\n\
             users:\n- name: me\n  user:\n    token: not-a-secret\n\
             contexts:\n- name: test\n  context:\n    cluster: fake\n    user: me\n    namespace: {namespace}\n",
            self.url()
        );
        std::fs::write(&path, text).expect("write kubeconfig");
        path
    }

    /// Creates or replaces a typed object (its namespace must be set).
    pub fn upsert<K>(&self, obj: &K) -> u64
    where
        K: k8s_openapi::Resource + serde::Serialize,
    {
        let mut v = serde_json::to_value(obj).expect("serialize object");
        v["apiVersion"] = json!(K::API_VERSION);
        v["kind"] = json!(K::KIND);
        self.upsert_value(K::URL_PATH_SEGMENT, v)
    }

    /// Creates or replaces a JSON object of resource `plural`; returns its new
    /// resource version.
    pub fn upsert_value(&self, plural: &str, obj: Value) -> u64 {
        let mut s = self.state.lock().expect("fake state");
        s.upsert(plural, obj)
    }

    /// Deletes an object; watchers get DELETED with its last state at a new rv.
    pub fn delete(&self, plural: &str, namespace: &str, name: &str) -> bool {
        let mut s = self.state.lock().expect("fake state");
        s.delete(plural, namespace, name)
    }

    /// Applies `mutate` with no watcher seeing it, compacts the history past
    /// every resource version handed out so far and closes every watch: each
    /// client's next watch gets 410 Expired and must relist to see the change.
    pub fn compact_and_disconnect_with(&self, mutate: impl FnOnce(&mut Mutator)) {
        let mut s = self.state.lock().expect("fake state");
        s.watches.clear();
        mutate(&mut Mutator { state: &mut s });
        s.rv += 1;
        s.history_start = s.rv;
        s.history.clear();
    }

    pub fn compact_and_disconnect(&self) {
        self.compact_and_disconnect_with(|_| {});
    }

    /// Closes every open watch (clients resume from their last rv, no 410).
    pub fn disconnect_watches(&self) {
        self.state.lock().expect("fake state").watches.clear();
    }

    /// The next `n` requests (any resource) fail with 500.
    pub fn fail_requests(&self, n: usize) {
        let mut s = self.state.lock().expect("fake state");
        s.failures_left = n;
        s.watches.clear();
    }

    /// Requests for `plural` get 403 Forbidden (RBAC denies it).
    pub fn forbid(&self, plural: &str) {
        let mut s = self.state.lock().expect("fake state");
        s.forbidden.insert(plural.to_string());
    }

    pub fn list_calls(&self, plural: &str) -> usize {
        let s = self.state.lock().expect("fake state");
        s.list_calls.get(plural).copied().unwrap_or(0)
    }

    pub fn watch_calls(&self, plural: &str) -> usize {
        let s = self.state.lock().expect("fake state");
        s.watch_calls.get(plural).copied().unwrap_or(0)
    }

    pub fn open_watches(&self, plural: &str) -> usize {
        let mut s = self.state.lock().expect("fake state");
        s.watches.retain(|w| !w.tx.is_closed());
        s.watches.iter().filter(|w| w.plural == plural).count()
    }

    /// All stored objects of a resource (for example Events the code created).
    pub fn objects(&self, plural: &str) -> Vec<Value> {
        let s = self.state.lock().expect("fake state");
        s.objects
            .iter()
            .filter(|((p, _, _), _)| p == plural)
            .map(|(_, v)| v.clone())
            .collect()
    }

    pub fn resource_version(&self) -> u64 {
        self.state.lock().expect("fake state").rv
    }
}

/// Changes made inside [`FakeApiServer::compact_and_disconnect_with`].
pub struct Mutator<'a> {
    state: &'a mut State,
}

impl Mutator<'_> {
    pub fn upsert<K>(&mut self, obj: &K)
    where
        K: k8s_openapi::Resource + serde::Serialize,
    {
        let mut v = serde_json::to_value(obj).expect("serialize object");
        v["apiVersion"] = json!(K::API_VERSION);
        v["kind"] = json!(K::KIND);
        self.state.upsert(K::URL_PATH_SEGMENT, v);
    }

    pub fn delete(&mut self, plural: &str, namespace: &str, name: &str) {
        self.state.delete(plural, namespace, name);
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);
impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn bookmark_loop(state: Arc<Mutex<State>>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        let Ok(mut s) = state.lock() else { return };
        let rv = s.rv;
        s.watches.retain(|w| {
            if !w.bookmarks {
                return !w.tx.is_closed();
            }
            let bm = json!({
                "type": "BOOKMARK",
                "object": {
                    "kind": kind_of(&w.plural),
                    "apiVersion": api_version_of(&w.plural),
                    "metadata": {"resourceVersion": rv.to_string()}
                }
            });
            send_line(&w.tx, &bm)
        });
    }
}

fn send_line(tx: &mpsc::UnboundedSender<Result<Frame<Bytes>, Infallible>>, v: &Value) -> bool {
    let mut line = serde_json::to_vec(v).expect("json");
    line.push(b'\n');
    tx.unbounded_send(Ok(Frame::data(Bytes::from(line))))
        .is_ok()
}

impl State {
    fn upsert(&mut self, plural: &str, mut obj: Value) -> u64 {
        self.rv += 1;
        let rv = self.rv;
        let namespace = obj["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_string();
        let name = obj["metadata"]["name"]
            .as_str()
            .expect("object needs metadata.name")
            .to_string();
        let key = (plural.to_string(), namespace.clone(), name.clone());
        let old = self.objects.get(&key).cloned();
        let meta = &mut obj["metadata"];
        meta["namespace"] = json!(namespace);
        meta["resourceVersion"] = json!(rv.to_string());
        let uid = old
            .as_ref()
            .and_then(|o| o["metadata"]["uid"].as_str().map(str::to_string))
            .unwrap_or_else(|| format!("uid-{plural}-{namespace}-{name}-{rv}"));
        meta["uid"] = json!(uid);
        if meta.get("creationTimestamp").is_none() {
            meta["creationTimestamp"] = json!("2026-01-01T00:00:00Z");
        }
        self.objects.insert(key, obj.clone());
        self.record(Change {
            rv,
            plural: plural.to_string(),
            namespace,
            old,
            new: Some(obj.clone()),
            last: obj,
        });
        rv
    }

    fn delete(&mut self, plural: &str, namespace: &str, name: &str) -> bool {
        let key = (plural.to_string(), namespace.to_string(), name.to_string());
        let Some(old) = self.objects.remove(&key) else {
            return false;
        };
        self.rv += 1;
        let mut last = old.clone();
        last["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        self.record(Change {
            rv: self.rv,
            plural: plural.to_string(),
            namespace: namespace.to_string(),
            old: Some(old),
            new: None,
            last,
        });
        true
    }

    fn record(&mut self, change: Change) {
        self.watches.retain(|w| match event_for(w, &change) {
            Some(ev) => send_line(&w.tx, &ev),
            None => !w.tx.is_closed(),
        });
        self.history.push(change);
    }
}

/// The event watch `w` sees for `change`, if any.
fn event_for(w: &Watch, c: &Change) -> Option<Value> {
    if w.plural != c.plural || w.namespace.as_ref().is_some_and(|ns| *ns != c.namespace) {
        return None;
    }
    let matches = |o: &Option<Value>| {
        o.as_ref()
            .is_some_and(|o| w.labels.matches_labels(o) && w.fields.matches_fields(o))
    };
    let ty = match (matches(&c.old), matches(&c.new)) {
        (false, false) => return None,
        (false, true) => "ADDED",
        (true, true) => "MODIFIED",
        (true, false) => "DELETED",
    };
    Some(json!({"type": ty, "object": c.last}))
}

fn kind_of(plural: &str) -> &'static str {
    match plural {
        "endpointslices" => "EndpointSlice",
        "configmaps" => "ConfigMap",
        "services" => "Service",
        "events" => "Event",
        "pods" => "Pod",
        _ => "Unknown",
    }
}

fn api_version_of(plural: &str) -> &'static str {
    match plural {
        "endpointslices" => "discovery.k8s.io/v1",
        "events" => "events.k8s.io/v1",
        _ => "v1",
    }
}

/// Parses `/api/v1[/namespaces/{ns}]/{plural}[/{name}]` and
/// `/apis/{group}/{version}[/namespaces/{ns}]/{plural}[/{name}]`.
fn parse_path(path: &str) -> Option<(Option<String>, String, Option<String>)> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let rest = match *parts.first()? {
        "api" => parts.get(2..)?,
        "apis" => parts.get(3..)?,
        _ => return None,
    };
    match rest {
        ["namespaces", ns, plural] => Some((Some(ns.to_string()), plural.to_string(), None)),
        ["namespaces", ns, plural, name] => Some((
            Some(ns.to_string()),
            plural.to_string(),
            Some(name.to_string()),
        )),
        [plural] => Some((None, plural.to_string(), None)),
        _ => None,
    }
}

fn query_map(query: Option<&str>) -> HashMap<String, String> {
    query
        .unwrap_or("")
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(byte) => {
                        out.push(byte);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code.as_u16()
    });
    json_response(code, &body)
}

fn json_response(code: StatusCode, v: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(serde_json::to_vec(v).expect("json"))).boxed())
        .expect("response")
}

async fn handle(
    state: Arc<Mutex<State>>,
    opts: &FakeOptions,
    req: Request<Incoming>,
) -> Response<Body> {
    let Some((namespace, plural, name)) = parse_path(req.uri().path()) else {
        return status(StatusCode::NOT_FOUND, "NotFound", "no such path");
    };
    let q = query_map(req.uri().query());
    {
        let mut s = state.lock().expect("fake state");
        if s.forbidden.contains(&plural) {
            return status(StatusCode::FORBIDDEN, "Forbidden", "forbidden by the test");
        }
        if s.failures_left > 0 {
            s.failures_left -= 1;
            if q.get("watch").map(String::as_str) == Some("true") {
                *s.watch_calls.entry(plural.clone()).or_default() += 1;
            } else if req.method() == Method::GET {
                *s.list_calls.entry(plural.clone()).or_default() += 1;
            }
            return status(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalError",
                "injected failure",
            );
        }
    }
    match (req.method().clone(), name) {
        (Method::GET, Some(name)) => {
            let s = state.lock().expect("fake state");
            let ns = namespace.unwrap_or_default();
            match s.objects.get(&(plural.clone(), ns, name)) {
                Some(o) => json_response(StatusCode::OK, o),
                None => status(StatusCode::NOT_FOUND, "NotFound", "not found"),
            }
        }
        (Method::GET, None) if q.get("watch").map(String::as_str) == Some("true") => {
            watch(state, opts, namespace, plural, &q)
        }
        (Method::GET, None) => list(state, namespace, plural, &q),
        (Method::POST, None) => {
            let Ok(body) = req.into_body().collect().await else {
                return status(StatusCode::BAD_REQUEST, "BadRequest", "unreadable body");
            };
            let Ok(mut obj) = serde_json::from_slice::<Value>(&body.to_bytes()) else {
                return status(StatusCode::BAD_REQUEST, "BadRequest", "invalid json");
            };
            if let Some(ns) = namespace {
                obj["metadata"]["namespace"] = json!(ns);
            }
            let ns = obj["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default")
                .to_string();
            let Some(name) = obj["metadata"]["name"].as_str().map(str::to_string) else {
                return status(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "Invalid",
                    "metadata.name is required",
                );
            };
            let mut s = state.lock().expect("fake state");
            s.upsert(&plural, obj);
            let stored = s.objects[&(plural, ns, name)].clone();
            json_response(StatusCode::CREATED, &stored)
        }
        _ => status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "unsupported",
        ),
    }
}

fn list(
    state: Arc<Mutex<State>>,
    namespace: Option<String>,
    plural: String,
    q: &HashMap<String, String>,
) -> Response<Body> {
    let labels = Selector::parse(q.get("labelSelector").map(String::as_str).unwrap_or(""));
    let fields = Selector::parse(q.get("fieldSelector").map(String::as_str).unwrap_or(""));
    let mut s = state.lock().expect("fake state");
    *s.list_calls.entry(plural.clone()).or_default() += 1;
    let items: Vec<Value> = s
        .objects
        .iter()
        .filter(|((p, ns, _), _)| *p == plural && namespace.as_ref().is_none_or(|n| n == ns))
        .filter(|(_, o)| labels.matches_labels(o) && fields.matches_fields(o))
        .map(|(_, o)| o.clone())
        .collect();
    let body = json!({
        "apiVersion": api_version_of(&plural),
        "kind": format!("{}List", kind_of(&plural)),
        "metadata": {"resourceVersion": s.rv.to_string()},
        "items": items,
    });
    json_response(StatusCode::OK, &body)
}

fn watch(
    state: Arc<Mutex<State>>,
    opts: &FakeOptions,
    namespace: Option<String>,
    plural: String,
    q: &HashMap<String, String>,
) -> Response<Body> {
    let (tx, rx) = mpsc::unbounded();
    let from: u64 = q
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|v| v.parse().ok())
        .map(Duration::from_secs)
        .unwrap_or(opts.max_watch)
        .min(opts.max_watch);
    let w = Watch {
        id: 0,
        plural: plural.clone(),
        namespace,
        labels: Selector::parse(q.get("labelSelector").map(String::as_str).unwrap_or("")),
        fields: Selector::parse(q.get("fieldSelector").map(String::as_str).unwrap_or("")),
        bookmarks: q.get("allowWatchBookmarks").map(String::as_str) == Some("true"),
        tx,
    };
    {
        let mut s = state.lock().expect("fake state");
        *s.watch_calls.entry(plural.clone()).or_default() += 1;
        if from != 0 && from < s.history_start {
            let expired = json!({
                "type": "ERROR",
                "object": {
                    "kind": "Status", "apiVersion": "v1", "metadata": {},
                    "status": "Failure",
                    "message": format!("too old resource version: {from} ({})", s.history_start),
                    "reason": "Expired", "code": 410
                }
            });
            send_line(&w.tx, &expired);
            // w (and its sender) drops here: the stream ends after the error.
        } else {
            if from == 0 {
                // "Any version": start with the current state as ADDED events.
                for ((p, ns, _), o) in &s.objects {
                    let c = Change {
                        rv: 0,
                        plural: p.clone(),
                        namespace: ns.clone(),
                        old: None,
                        new: Some(o.clone()),
                        last: o.clone(),
                    };
                    if let Some(ev) = event_for(&w, &c) {
                        send_line(&w.tx, &ev);
                    }
                }
            } else {
                for c in s.history.iter().filter(|c| c.rv > from) {
                    if let Some(ev) = event_for(&w, c) {
                        send_line(&w.tx, &ev);
                    }
                }
            }
            let id = s.next_watch_id;
            s.next_watch_id += 1;
            // The list holds the only sender: removing the watch ends its stream.
            s.watches.push(Watch { id, ..w });
            let st = state.clone();
            tokio::spawn(async move {
                tokio::time::sleep(timeout).await;
                if let Ok(mut s) = st.lock() {
                    s.watches.retain(|w| w.id != id);
                }
            });
        }
    }
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(BodyExt::boxed(StreamBody::new(rx)))
        .expect("response")
}

/// A parsed label or field selector: all requirements must hold.
#[derive(Debug, Clone, Default)]
struct Selector(Vec<Req>);

#[derive(Debug, Clone)]
enum Req {
    Eq(String, String),
    NotEq(String, String),
    Exists(String),
    NotExists(String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
}

impl Selector {
    fn parse(s: &str) -> Selector {
        let mut reqs = Vec::new();
        // Split on commas outside parentheses.
        let mut depth = 0;
        let mut start = 0;
        let mut parts = Vec::new();
        for (i, c) in s.char_indices() {
            match c {
                '(' => depth += 1,
                ')' => depth -= 1,
                ',' if depth == 0 => {
                    parts.push(&s[start..i]);
                    start = i + 1;
                }
                _ => {}
            }
        }
        parts.push(&s[start..]);
        for p in parts.into_iter().map(str::trim).filter(|p| !p.is_empty()) {
            let set = |rest: &str| {
                rest.trim()
                    .trim_start_matches('(')
                    .trim_end_matches(')')
                    .split(',')
                    .map(|v| v.trim().to_string())
                    .collect::<Vec<_>>()
            };
            if let Some((k, v)) = p.split_once("!=") {
                reqs.push(Req::NotEq(k.trim().into(), v.trim().into()));
            } else if let Some((k, v)) = p.split_once("==") {
                reqs.push(Req::Eq(k.trim().into(), v.trim().into()));
            } else if let Some((k, v)) = p.split_once('=') {
                reqs.push(Req::Eq(k.trim().into(), v.trim().into()));
            } else if let Some((k, rest)) = p.split_once(" notin ") {
                reqs.push(Req::NotIn(k.trim().into(), set(rest)));
            } else if let Some((k, rest)) = p.split_once(" in ") {
                reqs.push(Req::In(k.trim().into(), set(rest)));
            } else if let Some(k) = p.strip_prefix('!') {
                reqs.push(Req::NotExists(k.trim().into()));
            } else {
                reqs.push(Req::Exists(p.into()));
            }
        }
        Selector(reqs)
    }

    fn matches(&self, get: impl Fn(&str) -> Option<String>) -> bool {
        self.0.iter().all(|r| match r {
            Req::Eq(k, v) => get(k).as_deref() == Some(v),
            Req::NotEq(k, v) => get(k).as_deref() != Some(v),
            Req::Exists(k) => get(k).is_some(),
            Req::NotExists(k) => get(k).is_none(),
            Req::In(k, vs) => get(k).is_some_and(|x| vs.contains(&x)),
            Req::NotIn(k, vs) => get(k).is_none_or(|x| !vs.contains(&x)),
        })
    }

    fn matches_labels(&self, obj: &Value) -> bool {
        let labels = &obj["metadata"]["labels"];
        self.matches(|k| labels.get(k).and_then(Value::as_str).map(str::to_string))
    }

    fn matches_fields(&self, obj: &Value) -> bool {
        self.matches(|k| {
            let mut v = obj;
            for part in k.split('.') {
                v = v.get(part)?;
            }
            v.as_str().map(str::to_string)
        })
    }
}

/// A ConfigMap holding `text` under `key`.
pub fn configmap(
    namespace: &str,
    name: &str,
    key: &str,
    text: &str,
) -> k8s_openapi::api::core::v1::ConfigMap {
    k8s_openapi::api::core::v1::ConfigMap {
        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            ..Default::default()
        },
        data: Some([(key.to_string(), text.to_string())].into_iter().collect()),
        ..Default::default()
    }
}

/// A Service with these annotations (no spec: enough for canary annotations).
pub fn annotated_service(
    namespace: &str,
    name: &str,
    annotations: &[(&str, &str)],
) -> k8s_openapi::api::core::v1::Service {
    k8s_openapi::api::core::v1::Service {
        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            annotations: Some(
                annotations
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            ..Default::default()
        },
        ..Default::default()
    }
}
