//! The HTTP surface of a replica: the OpenAI routes, the vLLM and SGLang
//! side endpoints the peer routers probe, `/metrics`, and the admin endpoint
//! for runtime faults. Bad input gets vLLM's answer (400/404 with an
//! OpenAI-style JSON error), never a panic.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde_json::{json, Value};

use super::body::{SeqGuard, SimBody, SseBody, Stall};
use super::config::{Faults, OutputLen};
use super::engine::{NewSeq, SeqShared, SeqStatus};
use super::metrics::{render, MetricsContext};
use super::replica::{lock, unix_now, FaultVerdict, Replica};
use super::wire::{self, ApiKind, GenRequest, SseFramer};
use infergate_protocol::error::ApiError;
use infergate_protocol::prompt::{
    render_anthropic, render_chat, render_completion_prompt, render_pair, render_responses,
    GENERATION_PROMPT as CHAT_GENERATION_PROMPT,
};
use infergate_protocol::tokenizer;
use infergate_protocol::EngineKind;

/// Largest request body accepted.
const MAX_BODY: usize = 64 << 20;

/// The connection is cut without a response (a crash).
#[derive(Debug, thiserror::Error)]
#[error("replica crashed")]
pub(crate) struct Crashed;

type Resp = Response<SimBody>;

fn json_response(status: StatusCode, v: &Value) -> Resp {
    let body = Bytes::from(serde_json::to_vec(v).unwrap_or_default());
    let mut r = Response::new(SimBody::from(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn text_response(status: StatusCode, ctype: &'static str, body: impl Into<Bytes>) -> Resp {
    let mut r = Response::new(SimBody::from(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
    r
}

fn not_found() -> Resp {
    json_response(StatusCode::NOT_FOUND, &json!({"detail": "Not Found"}))
}

fn loading_error() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "service_unavailable",
        "The model is still loading.",
    )
    .with_retry_after(1)
}

/// Entry point of every request.
pub(crate) async fn handle(rep: Arc<Replica>, req: Request<Incoming>) -> Result<Resp, Crashed> {
    rep.http_requests.fetch_add(1, Ordering::Relaxed);
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let request_id = req.headers().get("x-request-id").cloned();
    let mut resp = match route(&rep, &method, &path, req).await {
        Ok(r) => r,
        Err(Fail::Api(e)) => {
            tracing::info!(replica = rep.index, %path, status = e.status.as_u16(), "{}", e.message);
            e.into_response()
        }
        Err(Fail::Crash) => {
            tracing::warn!(replica = rep.index, "simulated crash");
            rep.crash();
            return Err(Crashed);
        }
    };
    let h = resp.headers_mut();
    if let Some(id) = request_id {
        h.insert("x-request-id", id);
    }
    h.insert("x-sim-replica", HeaderValue::from(rep.index));
    Ok(resp)
}

enum Fail {
    Api(ApiError),
    Crash,
}

impl From<ApiError> for Fail {
    fn from(e: ApiError) -> Self {
        Fail::Api(e)
    }
}

async fn read_body(req: Request<Incoming>) -> Result<Bytes, ApiError> {
    match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) => Err(ApiError::bad_request(format!("cannot read body: {e}"))),
    }
}

async fn route(
    rep: &Arc<Replica>,
    method: &Method,
    path: &str,
    req: Request<Incoming>,
) -> Result<Resp, Fail> {
    let get = *method == Method::GET || *method == Method::HEAD;
    let post = *method == Method::POST;
    let r = match path {
        "/v1/chat/completions" if post => return generate(rep, ApiKind::Chat, req).await,
        "/v1/completions" if post => return generate(rep, ApiKind::Completion, req).await,
        "/v1/responses" if post => return generate(rep, ApiKind::Responses, req).await,
        "/v1/messages" if post => return generate(rep, ApiKind::Messages, req).await,
        "/v1/rerank" | "/rerank" | "/v2/rerank" if post => return rerank(rep, req).await,
        "/v1/score" | "/score" if post => return score(rep, req).await,
        "/health" | "/ping" if get || (path == "/ping" && post) => {
            if rep.loading() {
                return Err(loading_error().into());
            }
            text_response(StatusCode::OK, "text/plain", Bytes::new())
        }
        "/health_generate" if get => {
            if rep.loading() {
                return Err(loading_error().into());
            }
            text_response(StatusCode::OK, "text/plain", Bytes::new())
        }
        "/v1/models" | "/models" if get => json_response(StatusCode::OK, &models(rep)),
        "/version" if get => {
            json_response(StatusCode::OK, &json!({"version": "0.11.0-infergate-sim"}))
        }
        "/metrics" if get => {
            let text = {
                let e = lock(&rep.engine);
                render(
                    &e,
                    &MetricsContext {
                        model: rep.cfg.model(),
                        flavor: rep.cfg.metrics_flavor,
                        lora_names: &rep.cfg.lora_adapters,
                        max_loras: rep.cfg.params.max_loras,
                        now_unix: unix_now() as f64,
                    },
                )
            };
            text_response(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                text,
            )
        }
        "/load" if get => {
            let s = rep.snapshot();
            json_response(
                StatusCode::OK,
                &json!({"server_load": s.running + s.waiting}),
            )
        }
        "/get_load" if get => json_response(StatusCode::OK, &load(rep)),
        "/server_info" | "/get_server_info" if get => {
            json_response(StatusCode::OK, &server_info(rep))
        }
        "/model_info" | "/get_model_info" if get => json_response(StatusCode::OK, &model_info(rep)),
        "/tokenize" if post => {
            // vLLM's: `messages` through the chat template (the generation
            // prompt unless `add_generation_prompt: false`) or `prompt`; the
            // ids are those the engine caches, so the gateway keys its
            // precise index from them (`routing.kv_events.tokenize`).
            let body = read_body(req).await?;
            let r = wire::parse::<GenRequest>(&body)?;
            let (kind, mut text) = prompt_of(&r, None)?;
            if kind == ApiKind::Chat && r.add_generation_prompt == Some(false) {
                if let Some(n) = text.strip_suffix(CHAT_GENERATION_PROMPT).map(str::len) {
                    text.truncate(n);
                }
            }
            let tokens = tokenizer::token_ids(&text);
            json_response(
                StatusCode::OK,
                &json!({"count": tokens.len(), "max_model_len": rep.cfg.params.max_model_len,
                        "tokens": tokens, "token_strs": null}),
            )
        }
        "/detokenize" if post => {
            let body = read_body(req).await?;
            let v: Value = wire::parse(&body)?;
            let n = v
                .get("tokens")
                .and_then(Value::as_array)
                .map_or(0, Vec::len) as u32;
            json_response(StatusCode::OK, &json!({"prompt": wire::output_text(0, n)}))
        }
        "/v1/chat/completions/render" | "/v1/completions/render" if post => {
            let body = read_body(req).await?;
            let r: GenRequest = wire::parse(&body)?;
            let kind = if path.contains("chat") {
                ApiKind::Chat
            } else {
                ApiKind::Completion
            };
            let (_, text) = prompt_of(&r, Some(kind))?;
            let obj = json!({
                "token_ids": tokenizer::token_ids(&text),
                "model": r.model.as_deref().unwrap_or(rep.cfg.model()),
                "request_id": wire::new_id(kind),
                "sampling_params": {"max_tokens": r.max_completion_tokens.or(r.max_tokens)},
            });
            let v = if kind == ApiKind::Chat {
                obj
            } else {
                json!([obj])
            };
            json_response(StatusCode::OK, &v)
        }
        "/v1/embeddings" if post => return embeddings(rep, req).await,
        "/reset_prefix_cache" | "/flush_cache" if post => {
            lock(&rep.engine).reset_prefix_cache();
            text_response(StatusCode::OK, "text/plain", Bytes::new())
        }
        "/admin/faults" if get => json_response(StatusCode::OK, &json!(rep.faults())),
        "/admin/faults" if post => {
            let body = read_body(req).await?;
            let f: Faults = wire::parse(&body)?;
            rep.set_faults(f);
            json_response(StatusCode::OK, &json!(rep.faults()))
        }
        "/admin/stats" if get => json_response(StatusCode::OK, &stats_json(rep)),
        "/v1/chat/completions"
        | "/v1/completions"
        | "/health"
        | "/v1/models"
        | "/metrics"
        | "/tokenize"
        | "/admin/faults" => json_response(
            StatusCode::METHOD_NOT_ALLOWED,
            &json!({"detail": "Method Not Allowed"}),
        ),
        _ => not_found(),
    };
    Ok(r)
}

/// The prompt text of a request (chat messages or completion prompt) and
/// whether it was chat. `kind` = None accepts either (`/tokenize`).
fn prompt_of(r: &GenRequest, kind: Option<ApiKind>) -> Result<(ApiKind, String), ApiError> {
    match (kind, &r.messages) {
        (Some(ApiKind::Responses), _) => {
            if r.input.is_none() {
                return Err(ApiError::bad_request("Field required: input").with_param("input"));
            }
            let text = render_responses(r.instructions.as_ref(), r.input.as_ref());
            return Ok((ApiKind::Responses, text));
        }
        (Some(ApiKind::Messages), Some(m)) if !m.is_empty() => {
            return Ok((ApiKind::Messages, render_anthropic(r.system.as_ref(), m)));
        }
        (Some(ApiKind::Messages), _) => {
            return Err(ApiError::bad_request("Field required: messages").with_param("messages"));
        }
        _ => {}
    }
    match (kind, &r.messages, &r.prompt) {
        (Some(ApiKind::Chat) | None, Some(m), _) => {
            if m.is_empty() {
                return Err(
                    ApiError::bad_request("messages must not be empty").with_param("messages")
                );
            }
            Ok((ApiKind::Chat, render_chat(m)))
        }
        (Some(ApiKind::Completion) | None, _, Some(p)) => {
            let text = render_completion_prompt(p);
            if text.is_empty() {
                return Err(ApiError::bad_request("Prompt cannot be empty").with_param("prompt"));
            }
            Ok((ApiKind::Completion, text))
        }
        (Some(ApiKind::Chat), None, _) => {
            Err(ApiError::bad_request("Field required: messages").with_param("messages"))
        }
        _ => Err(ApiError::bad_request("Field required: prompt").with_param("prompt")),
    }
}

/// Resolves the requested model to the base model (None) or a LoRA adapter index.
fn resolve_model(rep: &Replica, model: Option<&str>) -> Result<Option<u16>, ApiError> {
    let Some(m) = model else { return Ok(None) };
    if m == rep.cfg.model() {
        return Ok(None);
    }
    match rep.cfg.lora_adapters.iter().position(|a| a == m) {
        Some(i) => Ok(Some(i as u16)),
        None => Err(ApiError::model_not_found(m)),
    }
}

async fn generate(rep: &Arc<Replica>, kind: ApiKind, req: Request<Incoming>) -> Result<Resp, Fail> {
    rep.generation_requests.fetch_add(1, Ordering::Relaxed);
    let arrival = Instant::now();
    *lock(&rep.last_headers) = Some(req.headers().clone());
    let body = read_body(req).await?;
    let r: GenRequest = wire::parse(&body)?;
    wire::validate(&r)?;
    let stream = r.stream.unwrap_or(false);
    let stall = match rep.fault_verdict(stream) {
        FaultVerdict::Proceed { stall } => stall,
        FaultVerdict::Loading => return Err(loading_error().into()),
        FaultVerdict::Error(code) => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            return Err(
                ApiError::new(status, "internal_server_error", "simulated engine error").into(),
            );
        }
        FaultVerdict::RateLimited => {
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "simulated rate limit",
            )
            .with_retry_after(1)
            .into())
        }
        FaultVerdict::Crash => return Err(Fail::Crash),
    };
    let lora = resolve_model(rep, r.model.as_deref())?;
    let model_name = r
        .model
        .clone()
        .unwrap_or_else(|| rep.cfg.model().to_owned());
    if r.stream_options.is_some() && !stream {
        return Err(ApiError::bad_request(
            "Stream options can only be defined when `stream=True`.",
        )
        .with_param("stream_options")
        .into());
    }
    let (_, text) = prompt_of(&r, Some(kind))?;
    let p = &rep.cfg.params;
    let priority = r.priority.unwrap_or(0);
    if priority != 0 && !p.priority_scheduling {
        return Err(ApiError::bad_request(format!(
            "Got priority {priority} but Priority scheduling is not enabled."
        ))
        .with_param("priority")
        .into());
    }
    let prompt_tokens = tokenizer::count_tokens(&text);
    let asked = match kind {
        ApiKind::Responses => r.max_output_tokens,
        _ => r.max_completion_tokens.or(r.max_tokens),
    };
    let requested = match asked {
        Some(m) if m < 1 => {
            return Err(
                ApiError::bad_request(format!("max_tokens must be at least 1, got {m}."))
                    .with_param("max_tokens")
                    .into(),
            )
        }
        Some(m) => Some(u32::try_from(m).unwrap_or(u32::MAX)),
        None => None,
    };
    let room = p.max_model_len.saturating_sub(prompt_tokens);
    let max_tokens = match requested {
        _ if room == 0 => return Err(wire::too_long(p.max_model_len, prompt_tokens, None).into()),
        Some(m) if m > room => {
            return Err(wire::too_long(p.max_model_len, prompt_tokens, Some(m)).into())
        }
        Some(m) => m,
        None => rep.cfg.default_max_tokens.clamp(1, room),
    };
    let seed = tokenizer::model_seed(&text);
    let output_tokens = match rep.cfg.output_len {
        OutputLen::MaxTokens => max_tokens,
        OutputLen::Uniform { min, max } => {
            let span = u64::from(max - min) + 1;
            (min + (seed % span) as u32).min(max_tokens)
        }
    };
    let hashes = tokenizer::block_hashes(
        &text,
        p.block_size as usize,
        tokenizer::model_seed(&model_name),
        usize::MAX,
    );
    // Token ids only matter to KV events (BlockStored carries them).
    let token_ids = if rep.cfg.kv_events.is_some() {
        tokenizer::token_ids(&text)
    } else {
        Vec::new()
    };
    let shared = Arc::new(SeqShared::new(rep.next_seq_id(), prompt_tokens));
    lock(&rep.engine).submit(NewSeq {
        shared: shared.clone(),
        hashes,
        token_ids,
        output_tokens,
        hits_max_tokens: output_tokens == max_tokens,
        lora,
        arrival,
        priority,
    });
    rep.poke();
    let guard = SeqGuard {
        replica: rep.clone(),
        shared,
    };
    let id = wire::new_id(kind);
    let created = unix_now();
    if stream {
        let include_usage = r
            .stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false);
        let f = rep.faults();
        let stall = stall.then(|| {
            Stall::new(
                f.stall_after_tokens,
                (f.stall_ms > 0).then(|| rep.cfg.wall_ms(f.stall_ms)),
            )
        });
        let framer =
            SseFramer::new(kind, &id, created, &model_name, seed).with_prompt_tokens(prompt_tokens);
        let body = SseBody::new(guard, framer, include_usage, stall);
        let mut resp = Response::new(SimBody::Sse(Box::new(body)));
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream; charset=utf-8"),
        );
        return Ok(resp);
    }
    let (status, generated) = guard.finished().await;
    if status == SeqStatus::Failed {
        return Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_server_error",
            "the engine dropped the request",
        )
        .into());
    }
    let v = wire::full_response(
        kind,
        &id,
        created,
        &model_name,
        seed,
        generated,
        status.finish_reason(),
        prompt_tokens,
        guard.shared.cached_tokens(),
    );
    Ok(json_response(StatusCode::OK, &v))
}

/// `POST /v1/embeddings`: deterministic unit vectors; no engine time.
async fn embeddings(rep: &Arc<Replica>, req: Request<Incoming>) -> Result<Resp, Fail> {
    let body = read_body(req).await?;
    let r: GenRequest = wire::parse(&body)?;
    resolve_model(rep, r.model.as_deref())?;
    let inputs: Vec<String> = match &r.input {
        Some(Value::Array(items)) if items.iter().all(Value::is_string) => items
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect(),
        Some(v @ (Value::String(_) | Value::Array(_))) => vec![render_completion_prompt(v)],
        _ => {
            return Err(ApiError::bad_request("Field required: input")
                .with_param("input")
                .into())
        }
    };
    let mut total = 0;
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(i, text)| {
            total += tokenizer::count_tokens(text);
            let h = tokenizer::model_seed(text);
            let v: Vec<f64> = (0..16)
                .map(|k| (((h >> (k * 4)) & 0xf) as f64 - 7.5) / 30.0)
                .collect();
            json!({"object": "embedding", "index": i, "embedding": v})
        })
        .collect();
    Ok(json_response(
        StatusCode::OK,
        &json!({"object": "list", "data": data, "model": r.model.as_deref().unwrap_or(rep.cfg.model()),
                "usage": {"prompt_tokens": total, "total_tokens": total}}),
    ))
}

/// A deterministic relevance in 0..1 of `doc` to `query`.
fn relevance(query: &str, doc: &str) -> f64 {
    let h = tokenizer::model_seed(&format!("{query}\u{0}{doc}"));
    (h % 10_000) as f64 / 10_000.0
}

/// The texts of a rerank `documents` or score `text_*` field: a string, or an
/// array of strings or `{text}` objects.
fn texts(v: Option<&Value>, field: &'static str) -> Result<Vec<String>, ApiError> {
    match v {
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(items)) if !items.is_empty() => Ok(items
            .iter()
            .map(|it| render_pair(Some(&Value::Array(vec![it.clone()])), None))
            .map(|t| t.trim_end_matches('\n').to_owned())
            .collect()),
        _ => Err(ApiError::bad_request(format!("Field required: {field}")).with_param(field)),
    }
}

/// `POST /v1/rerank` (and `/rerank`, `/v2/rerank`), as vLLM's pooling
/// models answer it: results by relevance, usage as total tokens; no engine
/// time.
async fn rerank(rep: &Arc<Replica>, req: Request<Incoming>) -> Result<Resp, Fail> {
    let body = read_body(req).await?;
    let v: Value = wire::parse(&body)?;
    let model = v.get("model").and_then(Value::as_str);
    resolve_model(rep, model)?;
    let query = texts(v.get("query"), "query")?.concat();
    let docs = texts(v.get("documents"), "documents")?;
    let top_n = v
        .get("top_n")
        .and_then(Value::as_u64)
        .map_or(docs.len(), |n| n as usize);
    let total = tokenizer::count_tokens(&render_pair(v.get("query"), v.get("documents")));
    let mut results: Vec<Value> = docs
        .iter()
        .enumerate()
        .map(|(i, d)| json!({"index": i, "document": {"text": d}, "relevance_score": relevance(&query, d)}))
        .collect();
    results.sort_by(|a, b| {
        b["relevance_score"]
            .as_f64()
            .partial_cmp(&a["relevance_score"].as_f64())
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    results.truncate(top_n);
    Ok(json_response(
        StatusCode::OK,
        &json!({"id": format!("rerank-{}", uuid::Uuid::new_v4().simple()),
                "model": model.unwrap_or(rep.cfg.model()),
                "usage": {"total_tokens": total}, "results": results}),
    ))
}

/// `POST /v1/score` (and `/score`): `text_1` against each `text_2`.
async fn score(rep: &Arc<Replica>, req: Request<Incoming>) -> Result<Resp, Fail> {
    let body = read_body(req).await?;
    let v: Value = wire::parse(&body)?;
    let model = v.get("model").and_then(Value::as_str);
    resolve_model(rep, model)?;
    let first = texts(v.get("text_1"), "text_1")?.concat();
    let data: Vec<Value> = texts(v.get("text_2"), "text_2")?
        .iter()
        .enumerate()
        .map(|(i, t)| json!({"index": i, "object": "score", "score": relevance(&first, t)}))
        .collect();
    let total = tokenizer::count_tokens(&render_pair(v.get("text_1"), v.get("text_2")));
    Ok(json_response(
        StatusCode::OK,
        &json!({"id": format!("score-{}", uuid::Uuid::new_v4().simple()), "object": "list",
                "created": unix_now(), "model": model.unwrap_or(rep.cfg.model()), "data": data,
                "usage": {"prompt_tokens": total, "total_tokens": total, "completion_tokens": 0}}),
    ))
}

fn models(rep: &Replica) -> Value {
    let base = rep.cfg.model();
    let mut data = vec![json!({
        "id": base, "object": "model", "created": rep.created_unix, "owned_by": "vllm",
        "root": base, "parent": null, "max_model_len": rep.cfg.params.max_model_len, "permission": [],
    })];
    for a in &rep.cfg.lora_adapters {
        data.push(json!({
            "id": a, "object": "model", "created": rep.created_unix, "owned_by": "vllm",
            "root": a, "parent": base, "max_model_len": null, "permission": [],
        }));
    }
    json!({"object": "list", "data": data})
}

fn load(rep: &Replica) -> Value {
    let s = rep.snapshot();
    let n = s.running + s.waiting;
    if rep.cfg.metrics_flavor == EngineKind::Sglang {
        json!([{"dp_rank": 0, "num_reqs": n, "num_waiting_reqs": s.waiting, "num_tokens": s.tokens_in_use}])
    } else {
        json!({"load": n})
    }
}

fn model_path(rep: &Replica) -> &str {
    rep.cfg.model_path.as_deref().unwrap_or(rep.cfg.model())
}

fn server_info(rep: &Replica) -> Value {
    let s = rep.snapshot();
    let p = &rep.cfg.params;
    json!({
        "model_path": model_path(rep), "tokenizer_path": model_path(rep),
        "served_model_name": rep.cfg.model(), "dp_size": 1, "tp_size": 1,
        "version": "0.11.0-infergate-sim", "is_generation": true,
        "max_total_num_tokens": p.num_gpu_blocks * p.block_size,
        "page_size": p.block_size, "max_running_requests": p.max_num_seqs,
        "context_length": p.max_model_len,
        "internal_states": [{"last_gen_throughput": 0.0, "num_running_reqs": s.running,
                             "num_waiting_reqs": s.waiting}],
        "replica": rep.index,
    })
}

fn model_info(rep: &Replica) -> Value {
    json!({
        "model_path": model_path(rep), "tokenizer_path": model_path(rep), "is_generation": true,
        "preferred_sampling_params": null, "weight_version": "default",
        "has_image_understanding": false, "has_audio_understanding": false,
        "model_type": "llama", "architectures": ["LlamaForCausalLM"],
    })
}

fn stats_json(rep: &Replica) -> Value {
    let s = rep.stats();
    let c = &s.counters;
    json!({
        "index": s.index, "running": s.running, "waiting": s.waiting,
        "kv_blocks_used": s.kv_blocks_used, "kv_blocks_total": s.kv_blocks_total,
        "kv_blocks_cached": s.kv_blocks_cached,
        "prefix_cache_hits": s.prefix_cache_hits, "prefix_cache_queries": s.prefix_cache_queries,
        "requests_received": s.requests_received, "generation_requests": s.generation_requests,
        "http_requests": s.http_requests, "requests_aborted": s.requests_aborted,
        "requests_failed": c.requests_failed, "preemptions": c.preemptions,
        "prompt_tokens": c.prompt_tokens, "generation_tokens": c.generation_tokens,
        "steps": c.steps, "modelled_step_us": c.modelled_step_us,
        "observed_step_us": c.observed_step_us, "step_abs_error_us": c.step_abs_error_us,
        "resident_loras": s.resident_loras, "crashed": s.crashed,
    })
}
