//! Logging setup (text or JSON lines) and the one structured line per request.
//!
//! The access line is off the request path's critical costs: it is formatted
//! into a reused per-thread buffer (no allocation once warm), appended to a
//! shared in-memory buffer, and written to stderr by a background thread at
//! most every [`FLUSH_EVERY`] (or sooner when [`FLUSH_BYTES`] pile up). A
//! request never waits on stderr; if the writer falls far behind, lines are
//! dropped and counted (`infergate_access_log_dropped_total`) rather than
//! blocking. `tracing`'s filter still decides whether the line is written
//! (target `infergate::access`, level INFO).

use std::cell::RefCell;
use std::fmt::Write as _;
use std::io::Write as _;
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use infergate_core::civil::civil_from_days;
use infergate_core::config::LogFormat;
use infergate_core::cost::Money;

/// The longest a line waits in memory before it is written.
pub(crate) const FLUSH_EVERY: Duration = Duration::from_millis(100);
/// Buffered bytes that wake the writer early.
pub(crate) const FLUSH_BYTES: usize = 64 * 1024;
/// Buffered bytes past which lines are dropped (stderr is stuck).
const MAX_PENDING: usize = 8 * 1024 * 1024;

/// Installs the global `tracing` subscriber and the access-log writer.
/// `RUST_LOG` wins over `level`. Calling it twice is harmless (the second
/// call does nothing).
pub fn init(format: LogFormat, level: Option<&str>) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level.unwrap_or("info")))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let installed = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
    if installed.is_ok() {
        let _ = ACCESS.set(AccessLog::start(format));
    }
}

/// Writes the access lines still buffered (call before exiting).
pub fn flush() {
    if let Some(a) = ACCESS.get() {
        a.write_pending();
    }
}

/// The fields of a request's log line.
pub(crate) struct RequestLine<'a> {
    pub request_id: &'a str,
    /// The client's own `x-request-id`, when it sent one.
    pub client_request_id: Option<&'a str>,
    pub model: &'a str,
    pub route: &'a str,
    pub replica: &'a str,
    pub status: u16,
    pub outcome: &'a str,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub ttft: Option<Duration>,
    pub duration: Duration,
    pub attempts: u32,
    /// Of `prompt_tokens`, those the engine served from its prefix cache.
    pub cached_prompt_tokens: u64,
    /// The request's cost at the configured prices (zero when unpriced or
    /// not served).
    pub cost: Money,
}

/// Emits the request's line at target `infergate::access`.
pub(crate) fn request_line(l: &RequestLine<'_>) {
    if !tracing::enabled!(target: "infergate::access", tracing::Level::INFO) {
        return;
    }
    match ACCESS.get() {
        Some(a) => a.write(l),
        // No writer of ours (an embedding program's subscriber): go through tracing.
        None => tracing::info!(
            target: "infergate::access",
            request_id = l.request_id,
            client_request_id = l.client_request_id,
            model = l.model,
            route = l.route,
            replica = l.replica,
            status = l.status,
            outcome = l.outcome,
            prompt_tokens = l.prompt_tokens,
            completion_tokens = l.completion_tokens,
            ttft_ms = l.ttft.map(|t| t.as_secs_f64() * 1e3),
            duration_ms = l.duration.as_secs_f64() * 1e3,
            attempts = l.attempts,
            cached_prompt_tokens = l.cached_prompt_tokens,
            cost = %l.cost,
            "request"
        ),
    }
}

static ACCESS: OnceLock<AccessLog> = OnceLock::new();

struct AccessLog {
    format: LogFormat,
    pending: Mutex<Vec<u8>>,
    wake: Condvar,
}

thread_local! {
    static LINE: RefCell<String> = RefCell::new(String::with_capacity(512));
}

impl AccessLog {
    fn start(format: LogFormat) -> AccessLog {
        let spawned = std::thread::Builder::new()
            .name("infergate-access-log".into())
            .spawn(|| loop {
                let Some(a) = ACCESS.get() else {
                    std::thread::sleep(FLUSH_EVERY);
                    continue;
                };
                {
                    let pending = a.lock();
                    if pending.len() < FLUSH_BYTES {
                        let _ = a.wake.wait_timeout(pending, FLUSH_EVERY);
                    }
                }
                a.write_pending();
            });
        if let Err(e) = spawned {
            eprintln!("infergate: cannot start the access-log writer: {e}");
        }
        AccessLog {
            format,
            pending: Mutex::new(Vec::with_capacity(FLUSH_BYTES * 2)),
            wake: Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self, l: &RequestLine<'_>) {
        LINE.with(|line| {
            let Ok(mut line) = line.try_borrow_mut() else {
                return;
            };
            line.clear();
            match self.format {
                LogFormat::Json => format_json(&mut line, SystemTime::now(), l),
                LogFormat::Text => format_text(&mut line, SystemTime::now(), l),
            }
            let mut pending = self.lock();
            if pending.len() + line.len() > MAX_PENDING {
                drop(pending);
                metrics::counter!("infergate_access_log_dropped_total").increment(1);
                return;
            }
            pending.extend_from_slice(line.as_bytes());
            if pending.len() >= FLUSH_BYTES {
                self.wake.notify_one();
            }
        });
    }

    /// Swaps the buffer out and writes it (the lock is not held while writing).
    fn write_pending(&self) {
        let mut out = {
            let mut pending = self.lock();
            if pending.is_empty() {
                return;
            }
            std::mem::replace(&mut *pending, Vec::with_capacity(FLUSH_BYTES * 2))
        };
        let _ = std::io::stderr().lock().write_all(&out);
        out.clear();
    }
}

/// `2026-11-27T15:02:07.996772Z` (UTC, microseconds).
pub(crate) fn write_timestamp(out: &mut String, now: SystemTime) {
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    let _ = write!(
        out,
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:06}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        since.subsec_micros()
    );
}

/// Milliseconds with microsecond precision, without float formatting.
fn write_ms(out: &mut String, d: Duration) {
    let us = d.as_micros();
    let _ = write!(out, "{}.{:03}", us / 1000, us % 1000);
}

fn format_text(out: &mut String, now: SystemTime, l: &RequestLine<'_>) {
    write_timestamp(out, now);
    let _ = write!(
        out,
        "  INFO infergate::access: request request_id={} model=",
        l.request_id
    );
    push_text_value(out, l.model);
    let _ = write!(
        out,
        " route={} replica={} status={} outcome={} prompt_tokens={} completion_tokens={}",
        l.route, l.replica, l.status, l.outcome, l.prompt_tokens, l.completion_tokens
    );
    if let Some(id) = l.client_request_id {
        let _ = write!(out, " client_request_id={id}");
    }
    if let Some(t) = l.ttft {
        out.push_str(" ttft_ms=");
        write_ms(out, t);
    }
    out.push_str(" duration_ms=");
    write_ms(out, l.duration);
    let _ = writeln!(
        out,
        " attempts={} cached_prompt_tokens={} cost={}",
        l.attempts, l.cached_prompt_tokens, l.cost
    );
}

/// A client-chosen value in a text line: as is when it is one plain word,
/// else quoted with Rust's escapes, so a newline or a quote in it cannot
/// start a forged line or field.
fn push_text_value(out: &mut String, v: &str) {
    if !v.is_empty() && v.chars().all(|c| c.is_ascii_graphic() && c != '"') {
        out.push_str(v);
    } else {
        let _ = write!(out, "{v:?}");
    }
}

fn format_json(out: &mut String, now: SystemTime, l: &RequestLine<'_>) {
    out.push_str("{\"timestamp\":\"");
    write_timestamp(out, now);
    out.push_str("\",\"level\":\"INFO\",\"message\":\"request\",\"target\":\"infergate::access\"");
    for (k, v) in [
        ("request_id", l.request_id),
        ("model", l.model),
        ("route", l.route),
        ("replica", l.replica),
    ] {
        let _ = write!(out, ",\"{k}\":\"");
        json_escape(out, v);
        out.push('"');
    }
    if let Some(id) = l.client_request_id {
        out.push_str(",\"client_request_id\":\"");
        json_escape(out, id);
        out.push('"');
    }
    let _ = write!(
        out,
        ",\"status\":{},\"outcome\":\"{}\",\"prompt_tokens\":{},\"completion_tokens\":{}",
        l.status, l.outcome, l.prompt_tokens, l.completion_tokens
    );
    if let Some(t) = l.ttft {
        out.push_str(",\"ttft_ms\":");
        write_ms(out, t);
    }
    out.push_str(",\"duration_ms\":");
    write_ms(out, l.duration);
    let _ = writeln!(
        out,
        ",\"attempts\":{},\"cached_prompt_tokens\":{},\"cost\":{}}}",
        l.attempts, l.cached_prompt_tokens, l.cost
    );
}

pub(crate) fn json_escape(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line() -> RequestLine<'static> {
        RequestLine {
            request_id: "r\"1",
            client_request_id: Some("c1"),
            model: "m\n",
            route: "m",
            replica: "127.0.0.1:1",
            status: 200,
            outcome: "ok",
            prompt_tokens: 3,
            completion_tokens: 4,
            ttft: Some(Duration::from_micros(1_234)),
            duration: Duration::from_micros(20_005),
            attempts: 1,
            cached_prompt_tokens: 2,
            cost: Money(426_000_000),
        }
    }

    #[test]
    fn json_line_is_valid_json_with_every_field() {
        let mut s = String::new();
        let t = UNIX_EPOCH + Duration::from_micros(1_795_791_727_996_772);
        format_json(&mut s, t, &line());
        assert!(s.ends_with('\n'));
        let v: serde_json::Value = serde_json::from_str(s.trim_end()).unwrap();
        assert_eq!(v["timestamp"], "2026-11-27T15:02:07.996772Z");
        assert_eq!(v["target"], "infergate::access");
        assert_eq!(v["request_id"], "r\"1");
        assert_eq!(v["client_request_id"], "c1");
        assert_eq!(v["model"], "m\n");
        assert_eq!(v["status"], 200);
        assert_eq!(v["ttft_ms"], 1.234);
        assert_eq!(v["duration_ms"], 20.005);
        assert_eq!(v["completion_tokens"], 4);
        assert_eq!(v["cached_prompt_tokens"], 2);
        assert_eq!(v["cost"], 0.000426);
    }

    #[test]
    fn text_line_has_the_fields() {
        let mut s = String::new();
        format_text(&mut s, UNIX_EPOCH, &line());
        assert!(s.starts_with("1970-01-01T00:00:00.000000Z  INFO infergate::access: request "));
        assert!(s.contains(" status=200 outcome=ok "));
        assert!(s.contains(
            " ttft_ms=1.234 duration_ms=20.005 attempts=1 cached_prompt_tokens=2 cost=0.000426\n"
        ));
    }

    #[test]
    fn a_client_model_name_cannot_forge_a_text_line() {
        let mut l = line();
        let forged = "m\n1970-01-01T00:00:00.000000Z  INFO infergate::access: request model=x";
        l.model = forged;
        let mut s = String::new();
        format_text(&mut s, UNIX_EPOCH, &l);
        assert_eq!(s.matches('\n').count(), 1, "one line: {s}");
        assert!(s.contains(r#" model="m\n1970"#), "{s}");
        let mut plain = String::new();
        l.model = "meta-llama/Llama-3.1-8B";
        format_text(&mut plain, UNIX_EPOCH, &l);
        assert!(plain.contains(" model=meta-llama/Llama-3.1-8B route="));
    }
}
