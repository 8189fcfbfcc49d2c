//! The root and per-request contexts.

use std::cell::RefCell;
use std::fmt::Write as _;
use std::rc::Rc;
use std::time::{SystemTime, UNIX_EPOCH};

use kvmesh_plugins_sdk::board::Decision;
use kvmesh_plugins_sdk::chunk::chunk_hashes;
use kvmesh_plugins_sdk::policy::{Choice, Event, Policy, Request};
use kvmesh_plugins_sdk::prompt::{self, Api, PromptError};
use kvmesh_plugins_sdk::snapshot::ReplicaRef;
use kvmesh_plugins_sdk::state::{Refresh, StateReader};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, MapType};

use crate::MakePolicy;
use crate::board::BoardView;
use crate::config::FilterConfig;
use crate::metrics::{Metrics, Unparsed};

/// The request header Envoy's `override_host` load balancer reads:
/// `primary,fallback1,...` (Gateway API Inference Extension convention).
pub const ENDPOINT_HEADER: &str = "x-gateway-destination-endpoint";

/// The response header that describes the decision.
pub const DECISION_HEADER: &str = "x-kvmesh-decision";

/// State shared by all requests of one VM (one Envoy worker).
struct Shared<P> {
    config: FilterConfig,
    policy: P,
    reader: StateReader,
    metrics: Metrics,
    board: BoardView,
}

/// The root context: configuration and the strategy of one VM.
pub struct Root<P> {
    make: MakePolicy<P>,
    shared: Option<Rc<RefCell<Shared<P>>>>,
}

impl<P> std::fmt::Debug for Root<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Root")
            .field("configured", &self.shared.is_some())
            .finish()
    }
}

impl<P: Policy + 'static> Root<P> {
    /// A root whose strategy `make` builds from the configuration.
    pub fn new(make: MakePolicy<P>) -> Self {
        Self { make, shared: None }
    }
}

impl<P: Policy + 'static> Context for Root<P> {}

impl<P: Policy + 'static> RootContext for Root<P> {
    fn on_configure(&mut self, size: usize) -> bool {
        let bytes = match hostcalls::get_buffer(BufferType::PluginConfiguration, 0, size) {
            Ok(b) => b.unwrap_or_default(),
            Err(status) => {
                log::error!("kvmesh: cannot read plugin configuration: {status:?}");
                return false;
            }
        };
        let config = match FilterConfig::parse(&bytes) {
            Ok(c) => c,
            Err(e) => {
                log::error!("kvmesh: {e}");
                return false;
            }
        };
        let policy = match (self.make)(&config.strategy) {
            Ok(p) => p,
            Err(e) => {
                log::error!("kvmesh: {e}");
                return false;
            }
        };
        // A configuration-only update (ECDS) keeps the live pool view when the
        // pool is the same and no static replicas replace it.
        let reader = match &self.shared {
            Some(old) if old.borrow().config.pool == config.pool && config.replicas.is_empty() => {
                old.borrow().reader.clone()
            }
            _ => StateReader::new(&config.pool, config.initial_snapshot()),
        };
        let metrics = Metrics::define(policy.name());
        // A new policy starts from the board's recent placements.
        let board = BoardView::new(&config.pool);
        if policy.shares_placements() {
            board.ensure();
        }
        log::info!(
            "kvmesh: {} configured for pool {:?} ({} static replicas)",
            policy.name(),
            config.pool,
            config.replicas.len()
        );
        self.shared = Some(Rc::new(RefCell::new(Shared {
            config,
            policy,
            reader,
            metrics,
            board,
        })));
        true
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Filter {
            shared: self.shared.clone(),
            api: None,
            decision: None,
            primary: None,
            endpoints: Vec::new(),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// One request.
struct Filter<P> {
    shared: Option<Rc<RefCell<Shared<P>>>>,
    api: Option<Api>,
    /// Value of the decision header, once decided.
    decision: Option<String>,
    /// Where the request was sent, for `Finished`.
    primary: Option<ReplicaRef>,
    /// Addresses written to the endpoint header, primary first.
    endpoints: Vec<String>,
}

impl<P: Policy> Context for Filter<P> {}

impl<P: Policy> HttpContext for Filter<P> {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let Some(shared) = self.shared.clone() else {
            return Action::Continue;
        };
        let path = header_bytes(MapType::HttpRequestHeaders, ":path");
        self.api = path
            .as_deref()
            .and_then(|p| std::str::from_utf8(p).ok())
            .and_then(Api::from_path);
        let too_large = header_bytes(MapType::HttpRequestHeaders, "content-length")
            .and_then(|v| std::str::from_utf8(&v).ok()?.trim().parse::<usize>().ok())
            .is_some_and(|len| len > shared.borrow().config.max_body_bytes);
        let unparsed = match (self.api, too_large, end_of_stream) {
            (None, _, _) => Unparsed::NotAnApi,
            (Some(_), true, _) => Unparsed::TooLarge,
            (Some(_), false, true) => Unparsed::NoPrompt,
            (Some(_), false, false) => return Action::Pause,
        };
        self.decide(&shared, Err(unparsed));
        Action::Continue
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let Some(shared) = self.shared.clone() else {
            return Action::Continue;
        };
        if self.decision.is_some() {
            return Action::Continue;
        }
        if body_size > shared.borrow().config.max_body_bytes {
            // Chunked upload past the limit: stop buffering and route now.
            self.decide(&shared, Err(Unparsed::TooLarge));
            return Action::Continue;
        }
        if !end_of_stream {
            return Action::Pause;
        }
        let body = match hostcalls::get_buffer(BufferType::HttpRequestBody, 0, body_size) {
            Ok(b) => b.unwrap_or_default(),
            Err(status) => {
                log::warn!("kvmesh: cannot read request body: {status:?}");
                Vec::new()
            }
        };
        let parsed = match self.api {
            Some(api) => prompt::parse(api, &body).map_err(|e| match e {
                PromptError::Malformed(_) => Unparsed::Malformed,
                PromptError::NoModel => Unparsed::NoModel,
                PromptError::NoPrompt => Unparsed::NoPrompt,
            }),
            None => Err(Unparsed::NotAnApi),
        };
        self.decide(&shared, parsed);
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let Some(shared) = self.shared.clone() else {
            return Action::Continue;
        };
        let shared = shared.borrow();
        if let Some(decision) = self
            .decision
            .as_deref()
            .filter(|_| shared.config.decision_header)
        {
            let _ = hostcalls::set_map_value(
                MapType::HttpResponseHeaders,
                DECISION_HEADER,
                Some(decision),
            );
        }
        if let Some(primary) = self.endpoints.first() {
            let upstream = hostcalls::get_property(vec!["upstream", "address"])
                .ok()
                .flatten();
            if upstream.is_some_and(|u| u != primary.as_bytes()) {
                shared.metrics.fallback_used();
            }
        }
        Action::Continue
    }

    fn on_log(&mut self) {
        let (Some(shared), Some(replica)) = (self.shared.as_ref(), self.primary.take()) else {
            return;
        };
        let mut shared = shared.borrow_mut();
        let Shared { policy, reader, .. } = &mut *shared;
        policy.observe(reader.snapshot(), &Event::Finished { replica });
    }
}

impl<P: Policy> Filter<P> {
    /// Picks the replicas and writes the endpoint header.
    fn decide(
        &mut self,
        shared: &Rc<RefCell<Shared<P>>>,
        parsed: Result<prompt::Prompt, Unparsed>,
    ) {
        let started = now();
        let mut guard = shared.borrow_mut();
        let Shared {
            config,
            policy,
            reader,
            metrics,
            board,
        } = &mut *guard;
        match reader.refresh(|key| hostcalls::get_shared_data(key).ok().and_then(|(v, _)| v)) {
            Ok(Refresh::Reloaded) => metrics.state_reload(),
            Ok(_) => {}
            Err(e) => {
                metrics.state_error();
                log::warn!("kvmesh: pool {:?}: {e}", config.pool);
            }
        }
        let snapshot = reader.snapshot();
        let chunk_bytes = match snapshot.chunk_bytes() {
            0 => config.chunk_bytes,
            n => n,
        };
        let (chunks, prompt_bytes) = match &parsed {
            Ok(p) => {
                let first = p.canonical.first().map_or(&[][..], Vec::as_slice);
                (chunk_hashes(&p.model, first, chunk_bytes), first.len())
            }
            Err(why) => {
                metrics.unparsed(*why);
                (Vec::new(), 0)
            }
        };
        let request = Request {
            chunks: &chunks,
            prompt_bytes,
        };
        let now_ms = started
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let choice = if policy.shares_placements() {
            // Learn the other VMs' shared decisions, decide, and publish this
            // one if the policy shares it; when another VM wrote in between,
            // it may have placed this very prefix (or loaded this very
            // replica): read again and decide again.
            let mut attempts = 0;
            loop {
                let read = board.read(policy, snapshot, now_ms, metrics);
                let choice = policy.select(snapshot, &request);
                let shared = choice
                    .primary
                    .filter(|_| !chunks.is_empty() && policy.shares(&request, &choice))
                    .and_then(|r| snapshot.get(r));
                match shared {
                    Some(rep) if attempts < 3 => {
                        let decision = Decision {
                            replica_key: rep.key,
                            at_ms: now_ms,
                            chunks: &chunks,
                            own_chunks: choice.own_chunks(&request),
                            placed: choice.reason.is_placement(),
                        };
                        if board.push(read, decision) {
                            break choice;
                        }
                        metrics.board_conflict();
                        attempts += 1;
                    }
                    _ => break choice,
                }
            }
        } else {
            policy.select(snapshot, &request)
        };
        self.endpoints = choice
            .endpoints()
            .filter_map(|r| snapshot.get(r).map(|rep| rep.address.clone()))
            .collect();
        // Always replace what the client sent; with no replicas known, drop it
        // so Envoy's own load balancer decides.
        let header = (!self.endpoints.is_empty()).then(|| self.endpoints.join(","));
        if let Err(status) = hostcalls::set_map_value(
            MapType::HttpRequestHeaders,
            crate::ENDPOINT_HEADER,
            header.as_deref(),
        ) {
            log::warn!("kvmesh: cannot set {}: {status:?}", crate::ENDPOINT_HEADER);
        }
        policy.observe(
            snapshot,
            &Event::Routed {
                request: &request,
                choice: &choice,
            },
        );
        self.primary = choice.primary;
        metrics.decision(choice.reason, choice.matched_chunks);
        let micros = elapsed_micros(started);
        metrics.decision_time(micros);
        self.decision = Some(describe(
            policy.name(),
            &choice,
            &self.endpoints,
            chunks.len(),
            micros,
        ));
    }
}

fn describe(
    strategy: &str,
    choice: &Choice,
    endpoints: &[String],
    chunks: usize,
    micros: u64,
) -> String {
    let mut header = format!(
        "strategy={strategy}; endpoint={}; reason={}; matched={}/{chunks}; fallbacks={}; ",
        endpoints.first().map_or("-", String::as_str),
        choice.reason.label(),
        choice.matched_chunks,
        endpoints.len().saturating_sub(1),
    );
    for (name, value) in &choice.figures {
        let _ = write!(header, "{name}={value}; ");
    }
    let _ = write!(header, "us={micros}");
    header
}

fn header_bytes(map: MapType, name: &str) -> Option<Vec<u8>> {
    hostcalls::get_map_value_bytes(map, name).ok().flatten()
}

fn now() -> Option<SystemTime> {
    hostcalls::get_current_time().ok()
}

fn elapsed_micros(started: Option<SystemTime>) -> u64 {
    let (Some(start), Some(end)) = (started, now()) else {
        return 0;
    };
    end.duration_since(start)
        .map_or(0, |d| d.as_micros() as u64)
}

#[cfg(test)]
mod tests {
    use kvmesh_plugins_sdk::policy::Reason;

    use super::*;

    #[test]
    fn the_decision_header_lists_the_figures_weighed_before_the_timing() {
        let choice = Choice {
            primary: None,
            fallbacks: Vec::new(),
            matched_chunks: 0,
            reason: Reason::Spilled,
            figures: vec![("home_queued", 5000), ("prefill_bound", 3306)],
        };
        let endpoints = ["127.0.0.1:1".to_owned(), "127.0.0.1:2".to_owned()];
        assert_eq!(
            describe("prefix-aware", &choice, &endpoints, 16, 7),
            "strategy=prefix-aware; endpoint=127.0.0.1:1; reason=spilled; matched=0/16; \
             fallbacks=1; home_queued=5000; prefill_bound=3306; us=7"
        );
        let plain = Choice {
            figures: Vec::new(),
            ..choice
        };
        assert_eq!(
            describe("prefix-aware", &plain, &endpoints[..1], 16, 7),
            "strategy=prefix-aware; endpoint=127.0.0.1:1; reason=spilled; matched=0/16; \
             fallbacks=0; us=7"
        );
    }
}
