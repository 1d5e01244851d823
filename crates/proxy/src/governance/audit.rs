//! The audit log: one JSON line per request and per administrative change
//! (config reload, key file change, canary change, canary rollback), to
//! stdout, stderr or a file (`audit.output`).
//!
//! A request never waits on it: its line is formatted into a per-thread
//! buffer and appended to a bounded in-memory buffer (`audit.buffer` bytes)
//! under a short lock; a writer thread per sink drains it at most every
//! [`FLUSH_EVERY`]. When the buffer is full the line is dropped and counted
//! (`infergate_audit_dropped_total`). A request's key is never written, only
//! its key id; its prompt only when its route sets `audit_prompts`.

use std::cell::RefCell;
use std::fmt::Write as _;
use std::io::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, SystemTime};

use std::net::IpAddr;

use arc_swap::ArcSwapOption;
use http::HeaderValue;
use infergate_core::config::{AuditConfig, AuditOutput};
use infergate_core::cost::{Money, TokenUsage};

use crate::telemetry::log::{json_escape, write_timestamp};

/// The longest a line waits in memory before it is written.
const FLUSH_EVERY: Duration = Duration::from_millis(100);
/// Buffered bytes that wake the writer early.
const FLUSH_BYTES: usize = 64 * 1024;

/// Everything governance records about one finished request (its usage
/// row and its audit line).
pub(crate) struct RequestFacts<'a> {
    pub request_id: &'a str,
    pub client_request_id: Option<&'a str>,
    /// The caller's team (`-` when none) and whether the config lists it.
    pub team: Option<&'a Arc<str>>,
    pub team_listed: bool,
    pub key_id: Option<&'a HeaderValue>,
    pub requested_model: &'a str,
    pub route: &'a Arc<str>,
    /// The model and pool that served (or the route's, if none did).
    pub model: &'a Arc<str>,
    pub pool: &'a Arc<str>,
    pub replica: &'a str,
    pub priority: Option<&'static str>,
    pub status: u16,
    pub outcome: &'static str,
    pub usage: TokenUsage,
    pub cost: Money,
    pub client_addr: Option<IpAddr>,
    pub duration: Duration,
    pub prompt: Option<&'a str>,
}

struct Shared {
    pending: Mutex<Vec<u8>>,
    wake: Condvar,
    closed: AtomicBool,
    max: usize,
    /// Buffered bytes that wake the writer early.
    early: usize,
}

impl Shared {
    fn new(buffer: u64) -> Shared {
        let max = usize::try_from(buffer).unwrap_or(usize::MAX).max(4096);
        Shared {
            pending: Mutex::new(Vec::with_capacity(FLUSH_BYTES.min(max))),
            wake: Condvar::new(),
            closed: AtomicBool::new(false),
            max,
            early: FLUSH_BYTES.min(max / 2),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One open output and its writer thread; dropping it flushes and ends the
/// thread.
struct Sink {
    config: AuditConfig,
    shared: Arc<Shared>,
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::Release);
        self.shared.wake.notify_one();
    }
}

/// The audit log of one gateway.
#[derive(Default)]
pub(crate) struct Audit {
    sink: ArcSwapOption<Sink>,
    dropped: AtomicU64,
    written: Arc<AtomicU64>,
}

thread_local! {
    static LINE: RefCell<String> = RefCell::new(String::with_capacity(512));
}

impl Audit {
    /// Opens the configured output (when it changed). An output that cannot
    /// be opened is an error and the previous one stays.
    pub(crate) fn configure(&self, cfg: &AuditConfig) -> Result<(), String> {
        if let Some(s) = self.sink.load().as_ref() {
            if s.config == *cfg {
                return Ok(());
            }
        }
        let Some(output) = &cfg.output else {
            self.sink.store(None);
            return Ok(());
        };
        let mut writer: Box<dyn std::io::Write + Send> = match output {
            AuditOutput::Stdout => Box::new(std::io::stdout()),
            AuditOutput::Stderr => Box::new(std::io::stderr()),
            AuditOutput::File(path) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|e| format!("audit.output {}: cannot open: {e}", path.display()))?,
            ),
        };
        let shared = Arc::new(Shared::new(cfg.buffer));
        let s = shared.clone();
        let written = self.written.clone();
        std::thread::Builder::new()
            .name("infergate-audit".into())
            .spawn(move || loop {
                let out = {
                    let mut pending = s.lock();
                    if pending.len() < s.early && !s.closed.load(Ordering::Acquire) {
                        pending = s
                            .wake
                            .wait_timeout(pending, FLUSH_EVERY)
                            .map(|(g, _)| g)
                            .unwrap_or_else(|p| p.into_inner().0);
                    }
                    std::mem::take(&mut *pending)
                };
                if !out.is_empty() {
                    let lines = memchr::memchr_iter(b'\n', &out).count() as u64;
                    if writer.write_all(&out).and_then(|_| writer.flush()).is_ok() {
                        written.fetch_add(lines, Ordering::Relaxed);
                    }
                }
                if s.closed.load(Ordering::Acquire) && s.lock().is_empty() {
                    return;
                }
            })
            .map_err(|e| format!("audit: cannot start the writer: {e}"))?;
        self.sink.store(Some(Arc::new(Sink {
            config: cfg.clone(),
            shared,
        })));
        Ok(())
    }

    /// Whether lines are written at all.
    pub(crate) fn enabled(&self) -> bool {
        self.sink.load().is_some()
    }

    fn push(&self, line: &str) {
        let guard = self.sink.load();
        let Some(sink) = guard.as_ref() else { return };
        let mut pending = sink.shared.lock();
        if pending.len() + line.len() > sink.shared.max {
            drop(pending);
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        pending.extend_from_slice(line.as_bytes());
        if pending.len() >= sink.shared.early {
            sink.shared.wake.notify_one();
        }
    }

    /// Writes a request's line (`team`: its team, `-` when none).
    pub(crate) fn request(&self, r: &RequestFacts<'_>, team: &str, currency: &str) {
        if !self.enabled() {
            return;
        }
        LINE.with(|line| {
            let Ok(mut line) = line.try_borrow_mut() else {
                return;
            };
            line.clear();
            format_request(&mut line, SystemTime::now(), r, team, currency);
            self.push(&line);
        });
    }

    /// Writes an administrative change: `event` and its fields.
    pub(crate) fn admin(&self, event: &str, fields: serde_json::Value) {
        if !self.enabled() {
            return;
        }
        let mut line = String::with_capacity(256);
        line.push_str("{\"time\":\"");
        write_timestamp(&mut line, SystemTime::now());
        line.push_str("\",\"event\":\"");
        json_escape(&mut line, event);
        line.push('"');
        if let serde_json::Value::Object(map) = fields {
            for (k, v) in map {
                line.push_str(",\"");
                json_escape(&mut line, &k);
                line.push_str("\":");
                line.push_str(&v.to_string());
            }
        }
        line.push_str("}\n");
        self.push(&line);
    }

    /// Lines dropped because the buffer was full.
    pub(crate) fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    pub(crate) fn render_metrics(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "# HELP infergate_audit_dropped_total Audit lines dropped because the audit buffer was full.\n# TYPE infergate_audit_dropped_total counter\ninfergate_audit_dropped_total {}\n# HELP infergate_audit_written_total Audit lines written.\n# TYPE infergate_audit_written_total counter\ninfergate_audit_written_total {}",
            self.dropped(),
            self.written.load(Ordering::Relaxed)
        );
    }
}

fn push_str_field(out: &mut String, k: &str, v: &str) {
    let _ = write!(out, ",\"{k}\":\"");
    json_escape(out, v);
    out.push('"');
}

fn format_request(
    out: &mut String,
    now: SystemTime,
    r: &RequestFacts<'_>,
    team: &str,
    currency: &str,
) {
    out.push_str("{\"time\":\"");
    write_timestamp(out, now);
    out.push_str("\",\"event\":\"request\"");
    push_str_field(out, "request_id", r.request_id);
    if let Some(c) = r.client_request_id {
        push_str_field(out, "client_request_id", c);
    }
    match r.key_id {
        Some(k) => push_str_field(out, "key_id", &String::from_utf8_lossy(k.as_bytes())),
        None => out.push_str(",\"key_id\":null"),
    }
    push_str_field(out, "team", team);
    push_str_field(out, "requested_model", r.requested_model);
    push_str_field(out, "model", r.model);
    push_str_field(out, "route", r.route);
    push_str_field(out, "pool", r.pool);
    push_str_field(out, "replica", r.replica);
    match r.priority {
        Some(p) => push_str_field(out, "priority", p),
        None => out.push_str(",\"priority\":null"),
    }
    let _ = write!(
        out,
        ",\"status\":{},\"outcome\":\"{}\",\"input_tokens\":{},\"cached_input_tokens\":{},\"output_tokens\":{},\"cost\":\"{}\"",
        r.status, r.outcome, r.usage.input, r.usage.cached_input, r.usage.output, r.cost
    );
    push_str_field(out, "currency", currency);
    match r.client_addr {
        Some(a) => {
            let _ = write!(out, ",\"client_addr\":\"{a}\"");
        }
        None => out.push_str(",\"client_addr\":null"),
    }
    let us = r.duration.as_micros();
    let _ = write!(out, ",\"duration_ms\":{}.{:03}", us / 1000, us % 1000);
    if let Some(p) = r.prompt {
        push_str_field(out, "prompt", p);
    }
    out.push_str("}\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Calls `f` with a sample request's facts.
    fn with_line<R>(prompt: Option<&str>, f: impl FnOnce(&RequestFacts<'_>) -> R) -> R {
        let m: Arc<str> = Arc::from("m");
        let p: Arc<str> = Arc::from("p");
        let team: Arc<str> = Arc::from("search");
        let key = HeaderValue::from_static("search-prod");
        f(&RequestFacts {
            request_id: "r1",
            client_request_id: None,
            team: Some(&team),
            team_listed: true,
            key_id: Some(&key),
            requested_model: "m\"x",
            route: &m,
            model: &m,
            pool: &p,
            replica: "127.0.0.1:1",
            priority: Some("critical"),
            status: 200,
            outcome: "ok",
            usage: TokenUsage::new(10, 4, 5),
            cost: Money(426_000_000),
            client_addr: Some([10, 0, 0, 1].into()),
            duration: Duration::from_micros(1500),
            prompt,
        })
    }

    fn format(prompt: Option<&str>) -> String {
        let mut s = String::new();
        with_line(prompt, |l| {
            format_request(&mut s, SystemTime::UNIX_EPOCH, l, "search", "USD")
        });
        s
    }

    #[test]
    fn request_lines_are_json_with_the_fields_and_no_prompt_unless_asked() {
        let s = format(None);
        let v: serde_json::Value = serde_json::from_str(s.trim_end()).unwrap();
        assert_eq!(v["event"], "request");
        assert_eq!(v["time"], "1970-01-01T00:00:00.000000Z");
        assert_eq!(v["key_id"], "search-prod");
        assert_eq!(v["requested_model"], "m\"x");
        assert_eq!(v["priority"], "critical");
        assert_eq!(v["cost"], "0.000426");
        assert_eq!(v["client_addr"], "10.0.0.1");
        assert_eq!(v["duration_ms"], 1.5);
        assert!(v.get("prompt").is_none());
        let s = format(Some("hi\n"));
        let v: serde_json::Value = serde_json::from_str(s.trim_end()).unwrap();
        assert_eq!(v["prompt"], "hi\n");
    }

    #[test]
    fn a_full_buffer_drops_and_counts_without_waiting() {
        // A sink whose writer never runs: the buffer fills and stays full.
        let a = Audit::default();
        let shared = Arc::new(Shared::new(4096));
        a.sink.store(Some(Arc::new(Sink {
            config: AuditConfig::default(),
            shared: shared.clone(),
        })));
        let one = format(None);
        let fit = 4096 / one.len() as u64;
        for _ in 0..100 {
            with_line(None, |l| a.request(l, "search", "USD"));
        }
        assert_eq!(a.dropped(), 100 - fit);
        assert!(shared.lock().len() <= 4096);
    }

    #[test]
    fn a_file_gets_every_line_not_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let a = Audit::default();
        assert!(!a.enabled());
        with_line(None, |l| a.request(l, "search", "USD")); // off: nothing, nothing dropped
        assert_eq!(a.dropped(), 0);
        let cfg = AuditConfig {
            output: Some(AuditOutput::File(path.clone())),
            buffer: 8192,
        };
        a.configure(&cfg).unwrap();
        for _ in 0..1000 {
            with_line(None, |l| a.request(l, "search", "USD"));
        }
        a.admin("config_reload", serde_json::json!({"result": "applied"}));
        // Turning the output off flushes what was buffered.
        a.configure(&AuditConfig::default()).unwrap();
        let dropped = a.dropped();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let text = loop {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let n = text.lines().count() as u64;
            if n + dropped >= 1001 || std::time::Instant::now() > deadline {
                break text;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(
            text.lines().count() as u64 + dropped,
            1001,
            "every line written or counted"
        );
        for l in text.lines() {
            serde_json::from_str::<serde_json::Value>(l).unwrap();
        }
        let bad = AuditConfig {
            output: Some(AuditOutput::File(dir.path().join("no/such/dir/a.jsonl"))),
            buffer: 4096,
        };
        assert!(a.configure(&bad).unwrap_err().contains("cannot open"));
    }
}
