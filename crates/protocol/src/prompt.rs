//! How a request's prompt becomes one text, for token counting and prefix hashing.
//!
//! Chat requests are rendered with a fixed template over *all* messages in order,
//! with their roles (`<|role|>\ncontent\n` each, then `<|assistant|>\n`), the way
//! an engine's chat template produces the text it tokenizes. A routing key made
//! of only the first message (a known peer bug) would make every conversation
//! sharing a system prompt look identical; the full rendering keeps multi-turn
//! sessions growing their own prefix. The simulator renders with the same
//! function, so the gateway's prefix index and the simulator's cache agree.

use serde::Deserialize;
use serde_json::Value;

/// One chat message as far as the prompt is concerned.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    #[serde(default)]
    pub content: Value,
}

/// Appends the text of a message `content` (a string, or an array of parts of
/// which `text` parts count) to `out`.
pub fn push_content_text(content: &Value, out: &mut String) {
    match content {
        Value::String(s) => out.push_str(s),
        Value::Array(parts) => {
            for p in parts {
                if let Some(t) = p.get("text").and_then(Value::as_str) {
                    out.push_str(t);
                }
            }
        }
        _ => {}
    }
}

/// What [`render_chat`] ends with: the assistant's turn opening (a chat
/// template's generation prompt).
pub const GENERATION_PROMPT: &str = "<|assistant|>\n";

/// Renders chat messages into the prompt text the engine would tokenize.
pub fn render_chat(messages: &[ChatMessage]) -> String {
    let mut out = String::with_capacity(
        messages
            .iter()
            .map(|m| 16 + m.content.as_str().map_or(64, str::len))
            .sum(),
    );
    for m in messages {
        push_message(&m.role, &m.content, &mut out);
    }
    out.push_str(GENERATION_PROMPT);
    out
}

/// Appends one rendered message (`<|role|>\ncontent\n`) to `out`.
pub fn push_message(role: &str, content: &Value, out: &mut String) {
    out.push_str("<|");
    out.push_str(role);
    out.push_str("|>\n");
    push_content_text(content, out);
    out.push('\n');
}

/// Renders a Responses API request (`instructions` and `input`) as the chat
/// it is: `instructions` as a system message, a string `input` as one user
/// message, an array `input` as its message items (`role` and `content`;
/// items without a role, such as tool outputs, add no prompt text here).
pub fn render_responses(instructions: Option<&Value>, input: Option<&Value>) -> String {
    let mut messages = Vec::new();
    if let Some(i) = instructions.filter(|i| !i.is_null()) {
        messages.push(ChatMessage {
            role: "system".into(),
            content: i.clone(),
        });
    }
    match input {
        Some(Value::Array(items)) => {
            messages.extend(items.iter().filter_map(|it| {
                Some(ChatMessage {
                    role: it.get("role")?.as_str()?.to_owned(),
                    content: it.get("content").cloned().unwrap_or(Value::Null),
                })
            }));
        }
        Some(v @ Value::String(_)) => messages.push(ChatMessage {
            role: "user".into(),
            content: v.clone(),
        }),
        _ => {}
    }
    render_chat(&messages)
}

/// Renders an Anthropic-style messages request: `system` (a string or text
/// blocks) first as a system message, then the messages (text blocks count).
pub fn render_anthropic(system: Option<&Value>, messages: &[ChatMessage]) -> String {
    match system.filter(|s| !s.is_null()) {
        Some(s) => {
            let mut all = Vec::with_capacity(messages.len() + 1);
            all.push(ChatMessage {
                role: "system".into(),
                content: s.clone(),
            });
            all.extend_from_slice(messages);
            render_chat(&all)
        }
        None => render_chat(messages),
    }
}

/// Renders a rerank or score request: the query (or `text_1`) followed by
/// every document (or `text_2`), each a string or an object with `text`.
pub fn render_pair(first: Option<&Value>, second: Option<&Value>) -> String {
    let mut out = String::new();
    for v in [first, second].into_iter().flatten() {
        match v {
            Value::Array(items) => {
                for it in items {
                    match it {
                        Value::String(s) => out.push_str(s),
                        other => push_content_text(&Value::Array(vec![other.clone()]), &mut out),
                    }
                    out.push('\n');
                }
            }
            Value::String(s) => {
                out.push_str(s);
                out.push('\n');
            }
            _ => {}
        }
    }
    out
}

/// Renders a completions `prompt` (a string, or an array of strings joined) into
/// text. Token-id arrays are rendered as their decimal ids separated by spaces so
/// that equal arrays still share prefixes.
pub fn render_completion_prompt(prompt: &Value) -> String {
    match prompt {
        Value::String(s) => s.clone(),
        Value::Array(items) => {
            let mut out = String::new();
            for it in items {
                match it {
                    Value::String(s) => out.push_str(s),
                    Value::Number(n) => {
                        out.push_str(&n.to_string());
                        out.push(' ');
                    }
                    other => out.push_str(&render_completion_prompt(other)),
                }
            }
            out
        }
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_all_messages_with_roles() {
        let msgs: Vec<ChatMessage> = serde_json::from_str(
            r#"[{"role":"system","content":"S"},{"role":"user","content":[{"type":"text","text":"Q"}]}]"#,
        )
        .unwrap();
        assert_eq!(
            render_chat(&msgs),
            "<|system|>\nS\n<|user|>\nQ\n<|assistant|>\n"
        );
        // A longer conversation extends the shorter one's rendering (prefix-stable).
        let mut longer = msgs.clone();
        longer.push(serde_json::from_str(r#"{"role":"assistant","content":"A"}"#).unwrap());
        let short = render_chat(&msgs);
        let long = render_chat(&longer);
        assert!(long.starts_with(short.trim_end_matches("<|assistant|>\n")));
    }

    #[test]
    fn renders_responses_anthropic_and_pairs_as_chats_and_texts() {
        let chat: Vec<ChatMessage> = serde_json::from_str(
            r#"[{"role":"system","content":"S"},{"role":"user","content":"Q"}]"#,
        )
        .unwrap();
        let expected = render_chat(&chat);
        let instr = serde_json::json!("S");
        assert_eq!(
            render_responses(Some(&instr), Some(&serde_json::json!("Q"))),
            expected
        );
        let items = serde_json::json!([
            {"role": "user", "content": [{"type": "input_text", "text": "Q"}]},
            {"type": "function_call_output", "call_id": "c", "output": "x"}
        ]);
        assert_eq!(render_responses(Some(&instr), Some(&items)), expected);
        let user: Vec<ChatMessage> =
            serde_json::from_str(r#"[{"role":"user","content":[{"type":"text","text":"Q"}]}]"#)
                .unwrap();
        let blocks = serde_json::json!([{"type": "text", "text": "S"}]);
        assert_eq!(render_anthropic(Some(&blocks), &user), expected);
        assert_eq!(
            render_pair(
                Some(&serde_json::json!("q")),
                Some(&serde_json::json!(["a", {"text": "b"}]))
            ),
            "q\na\nb\n"
        );
    }

    #[test]
    fn renders_completion_prompts() {
        assert_eq!(render_completion_prompt(&serde_json::json!("hi")), "hi");
        assert_eq!(
            render_completion_prompt(&serde_json::json!(["a", "b"])),
            "ab"
        );
        assert_eq!(render_completion_prompt(&serde_json::json!([1, 2])), "1 2 ");
    }
}
