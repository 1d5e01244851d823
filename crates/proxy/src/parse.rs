//! Parses only the request fields the gateway needs, in one pass over the
//! body with no `serde_json::Value` tree: the prompt is rendered to text as it
//! is read (the same text as `protocol::prompt`, which the simulator uses),
//! other fields are skipped (`IgnoredAny`), and the byte spans of `model` and
//! `stream_options` are kept so that a rewrite (a different upstream model
//! name, injected `stream_options.include_usage`) splices the original bytes
//! instead of parsing the body again. Otherwise the client's bytes go
//! upstream untouched.

use std::borrow::Cow;
use std::fmt;
use std::ops::Range;

use bytes::Bytes;
use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

use super::context::{ApiKind, RequestFeatures};
use infergate_protocol::error::ApiError;
use infergate_protocol::prompt::{push_message, render_pair, render_responses};
use infergate_protocol::tokenizer::count_tokens;

/// The subset of an OpenAI request body we read. Unknown fields are skipped
/// without being built; a duplicate known field is an error.
#[derive(Deserialize)]
struct Probe<'a> {
    #[serde(borrow, default)]
    model: Option<&'a RawValue>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    max_completion_tokens: Option<u32>,
    /// Responses API.
    #[serde(default)]
    max_output_tokens: Option<u32>,
    #[serde(default)]
    n: Option<u32>,
    #[serde(default)]
    best_of: Option<u32>,
    #[serde(default)]
    messages: Option<ChatText>,
    #[serde(default)]
    prompt: Option<PromptText>,
    /// Embeddings (a prompt) or the Responses API (a string or items):
    /// read once the API is known.
    #[serde(borrow, default)]
    input: Option<&'a RawValue>,
    /// Responses API.
    #[serde(borrow, default)]
    instructions: Option<&'a RawValue>,
    /// Anthropic messages.
    #[serde(borrow, default)]
    system: Option<&'a RawValue>,
    /// Rerank (`query`, `documents`) and score (`text_1`, `text_2`).
    #[serde(borrow, default)]
    query: Option<&'a RawValue>,
    #[serde(borrow, default)]
    documents: Option<&'a RawValue>,
    #[serde(borrow, default)]
    text_1: Option<&'a RawValue>,
    #[serde(borrow, default)]
    text_2: Option<&'a RawValue>,
    #[serde(borrow, default)]
    user: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    stream_options: Option<&'a RawValue>,
    /// vLLM's scheduling priority: only the gateway sets it (`upstream_body`).
    #[serde(borrow, default)]
    priority: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

/// Parses the body of a `/v1/*` POST into [`RequestFeatures`].
/// 400 for malformed JSON, a non-object body, or a missing `model`.
pub(crate) fn parse_features(kind: ApiKind, body: &[u8]) -> Result<RequestFeatures, ApiError> {
    let invalid = |e: &dyn fmt::Display| {
        ApiError::bad_request(format!(
            "We could not parse the JSON body of your request: {e}"
        ))
        .with_code("invalid_json")
    };
    // A derived struct also accepts a JSON array (fields by position): only
    // an object is a request, and the splices below rely on it.
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(invalid(&"expected a JSON object"));
    }
    TEXT_CAP.set(body.len());
    let probe: Probe<'_> = serde_json::from_slice(body).map_err(|e| invalid(&e))?;
    let model_span = probe.model.map(|raw| span_of(body, raw));
    let model: Option<Cow<'_, str>> = match probe.model {
        Some(raw) => serde_json::from_str(raw.get())
            .map_err(|_| ApiError::bad_request("`model` must be a string.").with_param("model"))?,
        None => None,
    };
    let model = match model {
        Some(m) if !m.is_empty() => m.into_owned(),
        _ => {
            return Err(
                ApiError::bad_request("You must provide a model parameter.").with_param("model")
            )
        }
    };
    let include_usage = match probe.stream_options {
        Some(raw) if raw.get() != "null" => serde_json::from_str::<StreamOptions>(raw.get())
            .map_err(|e| invalid(&e))?
            .include_usage
            .unwrap_or(false),
        _ => false,
    };
    let chat = probe.messages.map(|c| c.0);
    let prompt = probe.prompt.map(|p| p.0);
    // The fields only the newer APIs use are small beside their prompt
    // (instructions, a system prompt, a query): those are read as values.
    let value = |raw: Option<&RawValue>| -> Result<Option<serde_json::Value>, ApiError> {
        raw.map(|r| serde_json::from_str(r.get()).map_err(|e| invalid(&e)))
            .transpose()
    };
    let prompt_text = match kind {
        ApiKind::ChatCompletions => chat,
        ApiKind::Completions => prompt,
        ApiKind::Embeddings => match probe.input {
            Some(raw) => Some(
                serde_json::from_str::<PromptText>(raw.get())
                    .map_err(|e| invalid(&e))?
                    .0,
            ),
            None => None,
        },
        ApiKind::Responses => Some(render_responses(
            value(probe.instructions)?.as_ref(),
            value(probe.input)?.as_ref(),
        )),
        ApiKind::Messages => match value(probe.system)?.filter(|s| !s.is_null()) {
            // `render_anthropic`: the system prompt as the first message.
            Some(system) => {
                let mut text = String::new();
                push_message("system", &system, &mut text);
                text.push_str(chat.as_deref().unwrap_or("<|assistant|>\n"));
                Some(text)
            }
            None => chat,
        },
        ApiKind::Rerank => Some(render_pair(
            value(probe.query)?.as_ref(),
            value(probe.documents)?.as_ref(),
        )),
        ApiKind::Score => Some(render_pair(
            value(probe.text_1)?.as_ref(),
            value(probe.text_2)?.as_ref(),
        )),
        ApiKind::Other => chat.or(prompt),
    }
    .unwrap_or_default();
    let max_tokens = match kind {
        // Nothing is generated: the whole cost is the prompt.
        ApiKind::Rerank | ApiKind::Score => Some(0),
        ApiKind::Responses => probe.max_output_tokens,
        _ => probe.max_completion_tokens.or(probe.max_tokens),
    };
    Ok(RequestFeatures {
        api: kind,
        model,
        stream: probe.stream.unwrap_or(false),
        max_tokens,
        choices: probe.n.unwrap_or(1).max(probe.best_of.unwrap_or(1)),
        prompt_tokens: count_tokens(&prompt_text),
        prompt_text,
        user: probe.user.map(Cow::into_owned),
        include_usage,
        model_span,
        stream_options_span: probe.stream_options.map(|raw| span_of(body, raw)),
        priority_span: probe.priority.map(|raw| span_of(body, raw)),
    })
}

thread_local! {
    /// The most bytes a rendered prompt may hold: the body's length, set by
    /// [`parse_features`] before it parses (a derived field has no other way
    /// to learn it). Strings only shrink when rendered (escapes, role tags are
    /// shorter than their JSON), so only prompts of floats (`1e5` renders as
    /// `100000.0 `) are ever cut; it bounds a request's memory to twice its
    /// body, which the body budget accounts for.
    static TEXT_CAP: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Appends `s` to a rendered prompt, within [`TEXT_CAP`] bytes, allocated once.
fn push_capped(out: &mut String, s: &str) {
    let cap = TEXT_CAP.get();
    if out.capacity() == 0 {
        out.reserve_exact(cap);
    }
    let room = cap.saturating_sub(out.len());
    if s.len() <= room {
        out.push_str(s);
        return;
    }
    let mut end = room;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    out.push_str(&s[..end]);
}

/// Where `raw` (borrowed from `body`) sits in `body`.
fn span_of(body: &[u8], raw: &RawValue) -> Range<usize> {
    let start = (raw.get().as_ptr() as usize).saturating_sub(body.as_ptr() as usize);
    start..start + raw.get().len()
}

/// Returns the body to send upstream: the original bytes when nothing needs to
/// change, or the original bytes with `model` replaced, and/or
/// `stream_options.include_usage: true` set, and/or `priority` set to
/// `engine_priority` (the pool's engines take the band) or to vLLM's default
/// 0 (they do not: a client never picks its engine priority), spliced at the
/// spans the parse recorded (the rest of the body is copied, never parsed
/// again).
pub(crate) fn upstream_body(
    original: &Bytes,
    features: &RequestFeatures,
    target_model: Option<&str>,
    inject_usage: bool,
    engine_priority: Option<i64>,
) -> Result<Bytes, ApiError> {
    let rename = target_model.filter(|t| *t != features.model);
    let inject = inject_usage
        && features.stream
        && !features.include_usage
        && features.api.takes_stream_options();
    let priority = match (engine_priority, &features.priority_span) {
        (Some(p), span) => Some((span.clone(), p)),
        (None, Some(span)) if &original[span.clone()] != b"0" => Some((Some(span.clone()), 0)),
        (None, _) => None,
    };
    if rename.is_none() && !inject && priority.is_none() {
        return Ok(original.clone());
    }
    let encode_err =
        |e: serde_json::Error| ApiError::bad_request(format!("Could not re-encode the body: {e}"));
    // (span replaced, new bytes), applied in order of position.
    let mut edits: Vec<(Range<usize>, Vec<u8>)> = Vec::with_capacity(3);
    if let Some(t) = rename {
        let span = features.model_span.clone().ok_or_else(|| {
            ApiError::bad_request("You must provide a model parameter.").with_param("model")
        })?;
        edits.push((span, serde_json::to_vec(t).map_err(encode_err)?));
    }
    if inject {
        match &features.stream_options_span {
            Some(span) => {
                // Only the small `stream_options` value is parsed again.
                let mut opts: serde_json::Map<String, serde_json::Value> =
                    serde_json::from_slice(&original[span.clone()]).unwrap_or_default();
                opts.insert("include_usage".into(), serde_json::Value::Bool(true));
                edits.push((span.clone(), serde_json::to_vec(&opts).map_err(encode_err)?));
            }
            None => {
                // Just inside the opening brace (the body is a non-empty object).
                let brace = original.iter().position(|b| *b == b'{').unwrap_or(0);
                let at = brace + 1;
                edits.push((
                    at..at,
                    br#""stream_options":{"include_usage":true},"#.to_vec(),
                ));
            }
        }
    }
    if let Some((span, p)) = priority {
        let value = itoa::Buffer::new().format(p).as_bytes().to_vec();
        match span {
            Some(span) => edits.push((span, value)),
            None => {
                let at = original.iter().position(|b| *b == b'{').unwrap_or(0) + 1;
                let mut member = br#""priority":"#.to_vec();
                member.extend_from_slice(&value);
                member.push(b',');
                edits.push((at..at, member));
            }
        }
    }
    edits.sort_by_key(|(span, _)| span.start);
    let extra: usize = edits.iter().map(|(_, b)| b.len()).sum();
    let mut out = Vec::with_capacity(original.len() + extra);
    let mut at = 0;
    for (span, bytes) in edits {
        out.extend_from_slice(&original[at..span.start]);
        out.extend_from_slice(&bytes);
        at = span.end;
    }
    out.extend_from_slice(&original[at..]);
    Ok(Bytes::from(out))
}

/// A completions `prompt` (or embeddings `input`) rendered as
/// `protocol::prompt::render_completion_prompt` renders it, while it is read.
struct PromptText(String);

impl<'de> Deserialize<'de> for PromptText {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut out = String::new();
        d.deserialize_any(PromptVisitor {
            out: &mut out,
            top: true,
        })?;
        Ok(PromptText(out))
    }
}

/// Appends one prompt value: a string as is, an array item by item (a number
/// in an array as its decimal text and a space, so token-id prompts keep
/// their prefixes), anything else nothing.
struct PromptVisitor<'o> {
    out: &'o mut String,
    /// The prompt itself (a bare number renders as nothing) rather than an item.
    top: bool,
}

impl PromptVisitor<'_> {
    fn number(self, n: &str) {
        if !self.top {
            push_capped(self.out, n);
            push_capped(self.out, " ");
        }
    }
}

impl<'de> DeserializeSeed<'de> for PromptVisitor<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for PromptVisitor<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a prompt (a string or an array)")
    }
    fn visit_str<E>(self, s: &str) -> Result<(), E> {
        push_capped(self.out, s);
        Ok(())
    }
    fn visit_u64<E>(self, n: u64) -> Result<(), E> {
        self.number(itoa::Buffer::new().format(n));
        Ok(())
    }
    fn visit_i64<E>(self, n: i64) -> Result<(), E> {
        self.number(itoa::Buffer::new().format(n));
        Ok(())
    }
    fn visit_f64<E>(self, n: f64) -> Result<(), E> {
        // serde_json's own rendering of a float, as `Value::Number` prints it.
        if let Some(n) = serde_json::Number::from_f64(n) {
            self.number(&n.to_string());
        }
        Ok(())
    }
    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_none<E>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq
            .next_element_seed(PromptVisitor {
                out: self.out,
                top: false,
            })?
            .is_some()
        {}
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(())
    }
}

/// Chat `messages` rendered as `protocol::prompt::render_chat` renders them
/// (`<|role|>\ncontent\n` each, then `<|assistant|>\n`), while they are read.
struct ChatText(String);

impl<'de> Deserialize<'de> for ChatText {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut out = String::new();
        d.deserialize_seq(MessagesVisitor(&mut out))?;
        push_capped(&mut out, "<|assistant|>\n");
        Ok(ChatText(out))
    }
}

struct MessagesVisitor<'o>(&'o mut String);

impl<'de> Visitor<'de> for MessagesVisitor<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array of messages")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(MessageVisitor(self.0))?.is_some() {}
        Ok(())
    }
}

/// One message: `role` (required string) and `content`; other keys skipped.
struct MessageVisitor<'o>(&'o mut String);

impl<'de> DeserializeSeed<'de> for MessageVisitor<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for MessageVisitor<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a message object with a `role`")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let out = self.0;
        let start = out.len();
        let mut role_seen = false;
        let mut content_seen = false;
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            match &*key {
                "role" if role_seen => return Err(serde::de::Error::duplicate_field("role")),
                "role" => {
                    let role: Cow<'de, str> = map.next_value()?;
                    // Usually the role comes first; when `content` came
                    // before it, its text is already in place after `start`.
                    if out.capacity() == 0 {
                        push_capped(out, "");
                    }
                    let room = TEXT_CAP.get().saturating_sub(out.len());
                    if role.len() + 5 <= room {
                        for piece in ["|>\n", &role, "<|"] {
                            out.insert_str(start, piece);
                        }
                    }
                    role_seen = true;
                }
                "content" if content_seen => {
                    return Err(serde::de::Error::duplicate_field("content"))
                }
                "content" => {
                    map.next_value_seed(ContentVisitor(out))?;
                    content_seen = true;
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        if !role_seen {
            return Err(serde::de::Error::missing_field("role"));
        }
        push_capped(out, "\n");
        Ok(())
    }
}

/// The visits of numbers, booleans and null for a visitor that renders
/// nothing from them (its answer is `()`).
macro_rules! skip_scalars {
    () => {
        fn visit_u64<E>(self, _: u64) -> Result<(), E> {
            Ok(())
        }
        fn visit_i64<E>(self, _: i64) -> Result<(), E> {
            Ok(())
        }
        fn visit_f64<E>(self, _: f64) -> Result<(), E> {
            Ok(())
        }
        fn visit_bool<E>(self, _: bool) -> Result<(), E> {
            Ok(())
        }
        fn visit_unit<E>(self) -> Result<(), E> {
            Ok(())
        }
    };
}

/// A message's `content`: a string, or an array of parts of which the `text`
/// string of object parts counts (as `protocol::prompt::push_content_text`).
struct ContentVisitor<'o>(&'o mut String);

impl<'de> DeserializeSeed<'de> for ContentVisitor<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ContentVisitor<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("message content")
    }
    fn visit_str<E>(self, s: &str) -> Result<(), E> {
        push_capped(self.0, s);
        Ok(())
    }
    skip_scalars!();
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(PartVisitor(self.0))?.is_some() {}
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(())
    }
}

/// One content part: its `text`, when it is an object with a string `text`
/// (the last one wins, as in a `Value` object).
struct PartVisitor<'o>(&'o mut String);

impl<'de> DeserializeSeed<'de> for PartVisitor<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for PartVisitor<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a content part")
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    skip_scalars!();
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut text: Option<Cow<'de, str>> = None;
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            if key == "text" {
                text = map.next_value::<MaybeStr<'de>>()?.0;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        if let Some(t) = text {
            push_capped(self.0, &t);
        }
        Ok(())
    }
}

/// A string, or `None` for any other JSON value (skipped unbuilt).
struct MaybeStr<'de>(Option<Cow<'de, str>>);

impl<'de> Deserialize<'de> for MaybeStr<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = MaybeStr<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any value")
            }
            fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Self::Value, E> {
                Ok(MaybeStr(Some(Cow::Borrowed(s))))
            }
            fn visit_str<E>(self, s: &str) -> Result<Self::Value, E> {
                Ok(MaybeStr(Some(Cow::Owned(s.to_owned()))))
            }
            fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
                Ok(MaybeStr(None))
            }
            fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
                Ok(MaybeStr(None))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
                Ok(MaybeStr(None))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
                Ok(MaybeStr(None))
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(MaybeStr(None))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(MaybeStr(None))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(MaybeStr(None))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests;
