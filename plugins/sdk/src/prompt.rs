//! Canonical prompt bytes from an OpenAI request body.
//!
//! - `/v1/completions`: the `prompt` string; each string of a prompt array is
//!   a prompt of its own. Token-id prompts have no text and so no identity.
//! - `/v1/chat/completions`: for each message in order, its role, the byte
//!   [`ROLE_SEPARATOR`], its text (a string, or the concatenated `text` of its
//!   content parts), the byte [`MESSAGE_TERMINATOR`].
//!
//! Everything else in the body (tools, images, sampling parameters) takes no
//! part. Parsing borrows from the body and skips unknown fields without
//! building them, so its cost is one pass over the bytes.

use std::borrow::Cow;
use std::fmt;

use serde::Deserializer;
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// Ends a message's role in the canonical chat rendering.
pub const ROLE_SEPARATOR: u8 = 0x1f;
/// Ends a message in the canonical chat rendering.
pub const MESSAGE_TERMINATOR: u8 = 0x1e;

/// The two OpenAI APIs whose prompts kvmesh identifies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// `/v1/completions`
    Completions,
    /// `/v1/chat/completions`
    ChatCompletions,
}

impl Api {
    /// The API served at `path` (a query string is ignored). A path prefix before `/v1/` is
    /// allowed: gateways that serve several pools on one listener route by it
    /// (`/<namespace>/<name>/v1/completions`) and strip it only in the router, after the filter.
    pub fn from_path(path: &str) -> Option<Api> {
        let path = path.split(['?', '#']).next().unwrap_or(path);
        let path = path.trim_end_matches('/');
        if path.ends_with("/v1/chat/completions") {
            Some(Api::ChatCompletions)
        } else if path.ends_with("/v1/completions") {
            Some(Api::Completions)
        } else {
            None
        }
    }
}

/// The identity-relevant part of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prompt {
    /// The requested model.
    pub model: String,
    /// Canonical bytes of each prompt, in request order.
    pub canonical: Vec<Vec<u8>>,
}

/// Why a body has no prompt identity. The request is still routed (by the
/// strategy's fallback); the model server answers the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PromptError {
    /// Not a JSON object of the expected shape (or not UTF-8).
    #[error("malformed request body: {0}")]
    Malformed(String),
    /// No `model` field.
    #[error("request body has no model")]
    NoModel,
    /// No `prompt` / `messages` with text.
    #[error("request body has no text prompt")]
    NoPrompt,
}

impl PromptError {
    /// A short, stable label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            PromptError::Malformed(_) => "malformed",
            PromptError::NoModel => "no_model",
            PromptError::NoPrompt => "no_prompt",
        }
    }
}

/// Parses `body` for `api` into canonical prompts.
pub fn parse(api: Api, body: &[u8]) -> Result<Prompt, PromptError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let parsed = de
        .deserialize_map(BodyVisitor { api })
        .map_err(|e| PromptError::Malformed(e.to_string()))?;
    de.end()
        .map_err(|e| PromptError::Malformed(e.to_string()))?;
    let model = parsed.model.ok_or(PromptError::NoModel)?;
    if parsed.canonical.is_empty() {
        return Err(PromptError::NoPrompt);
    }
    Ok(Prompt {
        model,
        canonical: parsed.canonical,
    })
}

/// Appends one chat message's canonical bytes to `out`.
pub fn render_message(role: &str, text: &str, out: &mut Vec<u8>) {
    out.extend_from_slice(role.as_bytes());
    out.push(ROLE_SEPARATOR);
    out.extend_from_slice(text.as_bytes());
    out.push(MESSAGE_TERMINATOR);
}

// === impl BodyVisitor ===

struct Parsed {
    model: Option<String>,
    canonical: Vec<Vec<u8>>,
}

struct BodyVisitor {
    api: Api,
}

impl<'de> Visitor<'de> for BodyVisitor {
    type Value = Parsed;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Parsed, A::Error> {
        let mut parsed = Parsed {
            model: None,
            canonical: Vec::new(),
        };
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            match (key.as_ref(), self.api) {
                ("model", _) => {
                    let model: Option<Cow<'de, str>> = map.next_value()?;
                    parsed.model = model.map(Cow::into_owned);
                }
                ("prompt", Api::Completions) => {
                    parsed.canonical = map.next_value_seed(PromptSeed)?;
                }
                ("messages", Api::ChatCompletions) => {
                    let rendered = map.next_value_seed(MessagesSeed)?;
                    parsed.canonical = if rendered.is_empty() {
                        Vec::new()
                    } else {
                        vec![rendered]
                    };
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(parsed)
    }
}

/// `prompt`: a string, an array of strings, or token ids (no identity).
struct PromptSeed;

impl<'de> DeserializeSeed<'de> for PromptSeed {
    type Value = Vec<Vec<u8>>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for PromptSeed {
    type Value = Vec<Vec<u8>>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a prompt string or array")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(vec![v.as_bytes().to_vec()])
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Vec::new())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut out = Vec::new();
        while let Some(item) = seq.next_element::<PromptItem<'de>>()? {
            if let PromptItem::Text(text) = item {
                out.push(text.as_bytes().to_vec());
            }
        }
        Ok(out)
    }
}

/// One element of a prompt array: text, or anything else (token ids).
enum PromptItem<'a> {
    Text(Cow<'a, str>),
    Other,
}

impl<'de> serde::Deserialize<'de> for PromptItem<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = PromptItem<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a prompt array element")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(PromptItem::Text(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(PromptItem::Text(Cow::Owned(v.to_owned())))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
                Ok(PromptItem::Other)
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
                Ok(PromptItem::Other)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(PromptItem::Other)
            }
        }
        d.deserialize_any(V)
    }
}

/// `messages`: rendered straight into one canonical buffer.
struct MessagesSeed;

impl<'de> DeserializeSeed<'de> for MessagesSeed {
    type Value = Vec<u8>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for MessagesSeed {
    type Value = Vec<u8>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array of messages")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut out = Vec::new();
        while seq
            .next_element_seed(MessageSeed { out: &mut out })?
            .is_some()
        {}
        Ok(out)
    }
}

struct MessageSeed<'o> {
    out: &'o mut Vec<u8>,
}

impl<'de> DeserializeSeed<'de> for MessageSeed<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for MessageSeed<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a message object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut role: Option<Cow<'de, str>> = None;
        let mut text: Vec<Cow<'de, str>> = Vec::new();
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            match key.as_ref() {
                "role" => role = Some(map.next_value()?),
                "content" => text = map.next_value_seed(ContentSeed)?,
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        let role = role.ok_or_else(|| de::Error::missing_field("role"))?;
        self.out.extend_from_slice(role.as_bytes());
        self.out.push(ROLE_SEPARATOR);
        for part in &text {
            self.out.extend_from_slice(part.as_bytes());
        }
        self.out.push(MESSAGE_TERMINATOR);
        Ok(())
    }
}

/// `content`: a string, null, or an array of parts whose `text` counts.
struct ContentSeed;

impl<'de> DeserializeSeed<'de> for ContentSeed {
    type Value = Vec<Cow<'de, str>>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ContentSeed {
    type Value = Vec<Cow<'de, str>>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("message content: a string, null or an array of parts")
    }

    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(vec![Cow::Borrowed(v)])
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(vec![Cow::Owned(v.to_owned())])
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Vec::new())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut parts = Vec::new();
        while let Some(part) = seq.next_element::<Part<'de>>()? {
            if let Some(text) = part.0 {
                parts.push(text);
            }
        }
        Ok(parts)
    }
}

/// One content part; only a part of type `text` contributes.
struct Part<'a>(Option<Cow<'a, str>>);

impl<'de> serde::Deserialize<'de> for Part<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Part<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a content part")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut kind: Option<Cow<'de, str>> = None;
                let mut text: Option<Cow<'de, str>> = None;
                while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                    match key.as_ref() {
                        "type" => kind = Some(map.next_value()?),
                        "text" => text = map.next_value()?,
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                let is_text = kind.as_deref().is_none_or(|k| k == "text");
                Ok(Part(text.filter(|_| is_text)))
            }
        }
        d.deserialize_map(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(body: &str) -> Result<Prompt, PromptError> {
        parse(Api::ChatCompletions, body.as_bytes())
    }

    #[test]
    fn api_from_path() {
        assert_eq!(Api::from_path("/v1/completions"), Some(Api::Completions));
        assert_eq!(
            Api::from_path("/v1/chat/completions?stream=1"),
            Some(Api::ChatCompletions)
        );
        assert_eq!(Api::from_path("/v1/models"), None);
        assert_eq!(
            Api::from_path("/team-a/llama/v1/chat/completions"),
            Some(Api::ChatCompletions)
        );
        assert_eq!(
            Api::from_path("/team-a/llama/v1/completions"),
            Some(Api::Completions)
        );
        assert_eq!(Api::from_path("/v1/completionsx"), None);
        assert_eq!(Api::from_path("/team-a/llama/v1/models"), None);
    }

    #[test]
    fn chat_renders_role_text_and_separators() {
        let p = chat(r#"{"model":"m","messages":[{"role":"system","content":"be brief"},{"role":"user","content":[{"type":"text","text":"hi "},{"type":"image_url","image_url":{"url":"x"}},{"type":"text","text":"there"}]}],"tools":[{"x":1}]}"#).unwrap();
        assert_eq!(p.model, "m");
        assert_eq!(
            p.canonical,
            vec![b"system\x1fbe brief\x1euser\x1fhi there\x1e".to_vec()]
        );
    }

    #[test]
    fn fields_in_any_order_and_escapes_decoded() {
        let a =
            chat(r#"{"messages":[{"content":"a\"b\u00e9","role":"user"}],"model":"m"}"#).unwrap();
        assert_eq!(
            a.canonical,
            vec!["user\x1fa\"b\u{e9}\x1e".as_bytes().to_vec()]
        );
    }

    #[test]
    fn null_content_is_empty_text() {
        let p = chat(
            r#"{"model":"m","messages":[{"role":"assistant","content":null,"tool_calls":[]}]}"#,
        )
        .unwrap();
        assert_eq!(p.canonical, vec![b"assistant\x1f\x1e".to_vec()]);
    }

    #[test]
    fn completions_string_and_array() {
        let one = parse(Api::Completions, br#"{"model":"m","prompt":"hello"}"#).unwrap();
        assert_eq!(one.canonical, vec![b"hello".to_vec()]);
        let many = parse(
            Api::Completions,
            br#"{"model":"m","prompt":["a","b",[1,2]]}"#,
        )
        .unwrap();
        assert_eq!(many.canonical, vec![b"a".to_vec(), b"b".to_vec()]);
        assert_eq!(
            parse(Api::Completions, br#"{"model":"m","prompt":[1,2,3]}"#),
            Err(PromptError::NoPrompt)
        );
    }

    #[test]
    fn bad_bodies_are_errors_not_panics() {
        for body in [
            &b""[..],
            b"not json",
            b"[1,2]",
            b"{\"model\":\"m\",\"messages\":[{\"content\":\"x\"}]}",
            b"{\"model\":\"m\",\"messages\":\"x\"}",
            b"{\"model\":\"m\",\"messages\":[{\"role\":\"u\",\"content\":\"\xff\xfe\"}]}",
            b"{\"model\":\"m\",\"messages\":[]} trailing",
            b"{\"model\":1,\"prompt\":\"x\"}",
        ] {
            assert!(parse(Api::ChatCompletions, body).is_err(), "{body:?}");
        }
        assert_eq!(
            chat(r#"{"messages":[{"role":"u","content":"x"}]}"#),
            Err(PromptError::NoModel)
        );
        assert_eq!(
            chat(r#"{"model":"m","messages":[]}"#),
            Err(PromptError::NoPrompt)
        );
        assert_eq!(
            chat(r#"{"model":"m","prompt":"x"}"#),
            Err(PromptError::NoPrompt)
        );
    }

    #[test]
    fn render_message_matches_parse() {
        let mut out = Vec::new();
        render_message("user", "hi", &mut out);
        let p = chat(r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#).unwrap();
        assert_eq!(p.canonical[0], out);
    }
}
