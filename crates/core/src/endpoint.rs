//! The forwarding allow-list: which request paths are inference endpoints
//! (and so may reach a replica), and how a path is normalised first.
//!
//! Only these are forwarded, named as vLLM serves them: `/v1/chat/completions`,
//! `/v1/completions`, `/v1/embeddings`, `/v1/responses`, `/v1/messages`
//! (Anthropic style), `/rerank` (also `/v1/rerank`, `/v2/rerank`), `/score`
//! (also `/v1/score`), `/tokenize`, `/detokenize`. Everything else (for
//! example `/v1/load_lora_adapter`) is answered 404 by the gateway; a route
//! may narrow the list with `endpoints:`.
//!
//! Normalisation: repeated slashes collapse (`//v1//completions` is
//! `/v1/completions`); a dot segment (`.`, `..`) or a percent-encoded dot,
//! slash or backslash (`%2e`, `%2f`, `%5c`), or a backslash, is refused with
//! 400, since an engine or an intermediary could resolve it differently
//! from the gateway.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

/// An inference endpoint (the `endpoints:` names of a route).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InferenceEndpoint {
    ChatCompletions,
    Completions,
    Embeddings,
    Responses,
    Messages,
    Rerank,
    Score,
    Tokenize,
    Detokenize,
}

/// Every forwarded path and its endpoint.
const PATHS: [(&str, InferenceEndpoint); 12] = [
    ("/v1/chat/completions", InferenceEndpoint::ChatCompletions),
    ("/v1/completions", InferenceEndpoint::Completions),
    ("/v1/embeddings", InferenceEndpoint::Embeddings),
    ("/v1/responses", InferenceEndpoint::Responses),
    ("/v1/messages", InferenceEndpoint::Messages),
    ("/rerank", InferenceEndpoint::Rerank),
    ("/v1/rerank", InferenceEndpoint::Rerank),
    ("/v2/rerank", InferenceEndpoint::Rerank),
    ("/score", InferenceEndpoint::Score),
    ("/v1/score", InferenceEndpoint::Score),
    ("/tokenize", InferenceEndpoint::Tokenize),
    ("/detokenize", InferenceEndpoint::Detokenize),
];

impl InferenceEndpoint {
    /// The endpoint of a normalised path and its canonical (static) spelling.
    pub fn from_path(path: &str) -> Option<(InferenceEndpoint, &'static str)> {
        PATHS
            .iter()
            .find(|(p, _)| *p == path)
            .map(|(p, e)| (*e, *p))
    }
}

/// A path the gateway refuses to interpret.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    /// A `.` or `..` segment.
    DotSegment,
    /// A percent-encoded dot, slash or backslash, or a backslash.
    EncodedSeparator,
}

impl PathError {
    pub fn message(self) -> &'static str {
        match self {
            PathError::DotSegment => "The request path must not contain `.` or `..` segments.",
            PathError::EncodedSeparator => {
                "The request path must not contain backslashes or percent-encoded dots, slashes or backslashes."
            }
        }
    }
}

/// Normalises a request path (see the module doc): borrowed when already
/// normal, which is the common case.
pub fn normalize_path(path: &str) -> Result<Cow<'_, str>, PathError> {
    // One pass over the bytes: an encoded separator anywhere is refused
    // first, then a dot segment; a repeated slash is only noted.
    let b = path.as_bytes();
    let mut dot = false;
    let mut repeated = false;
    let mut segment = 0;
    for (i, &c) in b.iter().enumerate() {
        match c {
            b'\\' => return Err(PathError::EncodedSeparator),
            b'%' if is_encoded_separator(b.get(i + 1..i + 3)) => {
                return Err(PathError::EncodedSeparator)
            }
            b'/' => {
                dot |= is_dot_segment(&b[segment..i]);
                repeated |= i > 0 && b[i - 1] == b'/';
                segment = i + 1;
            }
            _ => {}
        }
    }
    if dot || is_dot_segment(&b[segment..]) {
        return Err(PathError::DotSegment);
    }
    if !repeated {
        return Ok(Cow::Borrowed(path));
    }
    Ok(Cow::Owned(collapse_slashes(path)))
}

/// `path` with every run of `/` made one, keeping a trailing one (`/` for none).
fn collapse_slashes(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for s in path.split('/').filter(|s| !s.is_empty()) {
        out.push('/');
        out.push_str(s);
    }
    if path.ends_with('/') || out.is_empty() {
        out.push('/');
    }
    out
}

/// `%2e`, `%2f` or `%5c` (any case) after the `%`.
fn is_encoded_separator(after: Option<&[u8]>) -> bool {
    matches!(
        after,
        Some(&[b'2', c]) if matches!(c.to_ascii_lowercase(), b'e' | b'f')
    ) || matches!(after, Some(&[b'5', c]) if c.eq_ignore_ascii_case(&b'c'))
}

fn is_dot_segment(s: &[u8]) -> bool {
    s == b"." || s == b".."
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_inference_paths_are_endpoints() {
        use InferenceEndpoint as E;
        assert_eq!(
            E::from_path("/v1/chat/completions"),
            Some((E::ChatCompletions, "/v1/chat/completions"))
        );
        assert_eq!(E::from_path("/v2/rerank").map(|e| e.0), Some(E::Rerank));
        assert_eq!(E::from_path("/tokenize").map(|e| e.0), Some(E::Tokenize));
        for p in [
            "/v1/load_lora_adapter",
            "/v1/unload_lora_adapter",
            "/v1/models",
            "/v1/chat/completions/",
            "/metrics",
            "/",
            "",
        ] {
            assert_eq!(E::from_path(p), None, "{p}");
        }
        let e: Vec<E> = serde_yaml_ng::from_str("[chat_completions, rerank, detokenize]").unwrap();
        assert_eq!(e, [E::ChatCompletions, E::Rerank, E::Detokenize]);
    }

    /// The two-pass normalisation of before (searches for `\\`, `%`, dot
    /// segments and `//` one after another), kept to check the one pass.
    fn normalize_path_before(path: &str) -> Result<Cow<'_, str>, PathError> {
        let b = path.as_bytes();
        if b.contains(&b'\\') {
            return Err(PathError::EncodedSeparator);
        }
        for w in b.windows(3) {
            if w[0] == b'%'
                && matches!(
                    (w[1], w[2].to_ascii_lowercase()),
                    (b'2', b'e') | (b'2', b'f') | (b'5', b'c')
                )
            {
                return Err(PathError::EncodedSeparator);
            }
        }
        if path.split('/').any(|s| s == "." || s == "..") {
            return Err(PathError::DotSegment);
        }
        if !path.contains("//") {
            return Ok(Cow::Borrowed(path));
        }
        Ok(Cow::Owned(collapse_slashes(path)))
    }

    proptest::proptest! {
        /// Paths made of the characters that matter: the one pass answers
        /// as the searches of before, error kind and result alike.
        #[test]
        fn one_pass_answers_as_before(path in "[/.%25ecfEFC\\\\av1]{0,24}") {
            proptest::prop_assert_eq!(normalize_path(&path), normalize_path_before(&path));
        }
    }

    #[test]
    fn paths_normalise_or_are_refused() {
        assert!(matches!(
            normalize_path("/v1/completions"),
            Ok(Cow::Borrowed(_))
        ));
        assert_eq!(
            normalize_path("//v1///completions").unwrap(),
            "/v1/completions"
        );
        assert_eq!(normalize_path("/v1//x/").unwrap(), "/v1/x/");
        assert_eq!(normalize_path("//").unwrap(), "/");
        for p in [
            "/v1/../v1/unload_lora_adapter",
            "/v1/./completions",
            "/v1/chat/completions/..",
        ] {
            assert_eq!(normalize_path(p), Err(PathError::DotSegment), "{p}");
        }
        for p in [
            "/v1/%2e%2e/unload_lora_adapter",
            "/v1%2Funload_lora_adapter",
            "/v1/%2E/x",
            "/v1\\x",
            "/v1/%5cx",
        ] {
            assert_eq!(normalize_path(p), Err(PathError::EncodedSeparator), "{p}");
        }
    }
}
