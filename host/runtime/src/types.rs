//! The typed values of the test API: header maps, requests, recorded effects.

/// A proxy-wasm status code, as the hostcalls return it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Status {
    /// Success.
    Ok = 0,
    /// No such key, queue, buffer, property, token or function.
    NotFound = 1,
    /// An argument out of range or of the wrong kind.
    BadArgument = 2,
    /// A value could not be serialized.
    SerializationFailure = 3,
    /// A value could not be parsed (a malformed header map).
    ParseFailure = 4,
    /// A pointer outside the module's memory.
    InvalidMemoryAccess = 6,
    /// Nothing to dequeue.
    Empty = 7,
    /// Shared data changed since the caller read it.
    CasMismatch = 8,
    /// The host failed.
    InternalFailure = 10,
    /// The host does not provide this.
    Unimplemented = 12,
}

/// An HTTP header map that keeps order and duplicates; names are lowercased
/// as Envoy does, values are bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers(Vec<(String, Vec<u8>)>);

// === impl Headers ===

impl Headers {
    /// An empty map.
    pub fn new() -> Self {
        Self::default()
    }

    /// Builds a map from name/value pairs.
    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        let mut h = Self::new();
        for (k, v) in pairs {
            h.add(k, v.as_bytes());
        }
        h
    }

    /// The first value of `name`, if present and valid UTF-8.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.get_bytes(name)
            .and_then(|v| std::str::from_utf8(v).ok())
    }

    /// The first value of `name`, as bytes.
    pub fn get_bytes(&self, name: &str) -> Option<&[u8]> {
        let name = name.to_ascii_lowercase();
        self.0
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_slice())
    }

    /// Every value of `name`.
    pub fn get_all(&self, name: &str) -> Vec<&[u8]> {
        let name = name.to_ascii_lowercase();
        self.0
            .iter()
            .filter(|(k, _)| *k == name)
            .map(|(_, v)| v.as_slice())
            .collect()
    }

    /// Appends a value.
    pub fn add(&mut self, name: &str, value: &[u8]) {
        self.0.push((name.to_ascii_lowercase(), value.to_vec()));
    }

    /// Replaces every value of `name` with one.
    pub fn replace(&mut self, name: &str, value: &[u8]) {
        let lower = name.to_ascii_lowercase();
        match self.0.iter().position(|(k, _)| *k == lower) {
            Some(i) => {
                self.0[i].1 = value.to_vec();
                let mut seen = 0usize;
                self.0.retain(|(k, _)| {
                    if *k == lower {
                        seen += 1;
                        seen == 1
                    } else {
                        true
                    }
                });
            }
            None => self.add(name, value),
        }
    }

    /// Removes every value of `name`.
    pub fn remove(&mut self, name: &str) {
        let name = name.to_ascii_lowercase();
        self.0.retain(|(k, _)| *k != name);
    }

    /// The pairs, in order.
    pub fn pairs(&self) -> &[(String, Vec<u8>)] {
        &self.0
    }

    /// Number of pairs.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when there are no pairs.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The proxy-wasm wire form: count, (name len, value len)*, (name\0 value\0)*.
    pub(crate) fn serialize(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&(self.0.len() as u32).to_le_bytes());
        for (k, v) in &self.0 {
            out.extend_from_slice(&(k.len() as u32).to_le_bytes());
            out.extend_from_slice(&(v.len() as u32).to_le_bytes());
        }
        for (k, v) in &self.0 {
            out.extend_from_slice(k.as_bytes());
            out.push(0);
            out.extend_from_slice(v);
            out.push(0);
        }
        out
    }

    /// Parses the wire form; `None` when it is malformed.
    pub(crate) fn deserialize(bytes: &[u8]) -> Option<Self> {
        if bytes.is_empty() {
            return Some(Self::new());
        }
        let word = |at: usize| -> Option<usize> {
            let b = bytes.get(at..at + 4)?;
            Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
        };
        let n = word(0)?;
        let mut sizes = Vec::with_capacity(n.min(1024));
        for i in 0..n {
            sizes.push((word(4 + i * 8)?, word(8 + i * 8)?));
        }
        let mut at = 4 + n.checked_mul(8)?;
        let mut h = Self::new();
        for (ks, vs) in sizes {
            let k = bytes.get(at..at.checked_add(ks)?)?;
            at += ks + 1;
            let v = bytes.get(at..at.checked_add(vs)?)?;
            at += vs + 1;
            h.add(std::str::from_utf8(k).ok()?, v);
        }
        Some(h)
    }
}

/// One HTTP request to send through a plugin.
#[derive(Debug, Clone, Default)]
pub struct HttpRequest {
    /// Request headers, pseudo-headers (`:method`, `:path`, `:authority`) included.
    pub headers: Headers,
    /// The body as it arrives, one entry per data frame; empty for no body.
    pub body_chunks: Vec<Vec<u8>>,
    /// Request trailers; empty for none.
    pub trailers: Headers,
}

// === impl HttpRequest ===

impl HttpRequest {
    /// A request with `:method`, `:path`, `:authority` and `:scheme` set.
    pub fn new(method: &str, path: &str) -> Self {
        Self {
            headers: Headers::from_pairs([
                (":method", method),
                (":path", path),
                (":authority", "kvmesh.test"),
                (":scheme", "http"),
            ]),
            ..Self::default()
        }
    }

    /// A POST with a JSON body sent in one frame.
    pub fn post_json(path: &str, body: &[u8]) -> Self {
        Self::new("POST", path)
            .header("content-type", "application/json")
            .chunk(body)
    }

    /// Adds a header.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.add(name, value.as_bytes());
        self
    }

    /// Appends one body frame.
    pub fn chunk(mut self, data: &[u8]) -> Self {
        self.body_chunks.push(data.to_vec());
        self
    }

    /// Sends `body` in frames of at most `size` bytes.
    pub fn body_in_chunks(mut self, body: &[u8], size: usize) -> Self {
        self.body_chunks = body.chunks(size.max(1)).map(<[u8]>::to_vec).collect();
        self
    }

    /// Adds a trailer.
    pub fn trailer(mut self, name: &str, value: &str) -> Self {
        self.trailers.add(name, value.as_bytes());
        self
    }
}

/// The upstream's response, replayed through the plugin's response callbacks.
#[derive(Debug, Clone, Default)]
pub struct HttpResponse {
    /// Response headers (`:status` included).
    pub headers: Headers,
    /// The body, in frames.
    pub body_chunks: Vec<Vec<u8>>,
    /// Response trailers.
    pub trailers: Headers,
}

impl HttpResponse {
    /// A response with this status and a body in one frame.
    pub fn new(status: u16, body: &[u8]) -> Self {
        Self {
            headers: Headers::from_pairs([(":status", status.to_string().as_str())]),
            body_chunks: if body.is_empty() {
                Vec::new()
            } else {
                vec![body.to_vec()]
            },
            trailers: Headers::new(),
        }
    }
}

/// A response the plugin sent itself instead of forwarding the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalResponse {
    /// HTTP status.
    pub status: u32,
    /// Envoy's response code details.
    pub details: String,
    /// Headers the plugin added.
    pub headers: Headers,
    /// Body.
    pub body: Vec<u8>,
    /// gRPC status, -1 for none.
    pub grpc_status: i32,
}

/// What a callback returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Let the stream go on.
    Continue,
    /// Hold the stream (and buffer the body) until the plugin continues it.
    Pause,
}

/// Where a request ended up after its request callbacks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestState {
    /// Forwarded upstream.
    Forwarded,
    /// Held: the plugin paused it and has not continued it yet (waiting on a
    /// callout, or stuck: Envoy would hold it until the stream timeout).
    Paused,
    /// Answered by the plugin with a local response.
    LocalResponse,
    /// Reset by the plugin (`proxy_close_stream`).
    Closed,
}

/// Everything the plugin did to one HTTP stream.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The stream's context id.
    pub context_id: u32,
    /// Where the request ended up.
    pub state: RequestState,
    /// Request headers as they went upstream (after the plugin's changes).
    pub request_headers: Headers,
    /// Request body as it went upstream.
    pub request_body: Vec<u8>,
    /// Request trailers after the plugin's changes.
    pub request_trailers: Headers,
    /// Response headers as they went to the client, when a response was given.
    pub response_headers: Headers,
    /// Response body as it went to the client.
    pub response_body: Vec<u8>,
    /// The plugin's local response, if it sent one.
    pub local_response: Option<LocalResponse>,
    /// Each callback's name and returned action, in order.
    pub actions: Vec<(&'static str, Action)>,
}

/// A log line the plugin wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEntry {
    /// proxy-wasm level: 0 trace .. 5 critical.
    pub level: u32,
    /// The context that was effective when it logged.
    pub context_id: u32,
    /// The message.
    pub message: String,
}

/// An HTTP callout the plugin dispatched, waiting for the test or simulator
/// to answer it.
#[derive(Debug, Clone)]
pub struct HttpCallout {
    /// Token the plugin got back.
    pub token: u32,
    /// The context that dispatched it.
    pub context_id: u32,
    /// Cluster name.
    pub upstream: String,
    /// Request headers.
    pub headers: Headers,
    /// Request body.
    pub body: Vec<u8>,
    /// Request trailers.
    pub trailers: Headers,
    /// Timeout in milliseconds.
    pub timeout_ms: u32,
}

/// A gRPC call or stream the plugin opened.
#[derive(Debug, Clone)]
pub struct GrpcCallout {
    /// Token the plugin got back.
    pub token: u32,
    /// The context that opened it.
    pub context_id: u32,
    /// Cluster name.
    pub upstream: String,
    /// Fully qualified service name.
    pub service: String,
    /// Method name.
    pub method: String,
    /// Initial metadata.
    pub initial_metadata: Headers,
    /// Messages the plugin sent, in order (one for a unary call).
    pub sent: Vec<Vec<u8>>,
    /// True for a stream, false for a unary call.
    pub streaming: bool,
    /// The plugin half-closed the stream (end_stream on send).
    pub half_closed: bool,
    /// The plugin cancelled or closed it.
    pub cancelled: bool,
}
