//! The proxy-wasm adapter: maps Envoy's callbacks onto [`Pump`]. Only
//! `Result`-returning hostcalls are used (the SDK's convenience setters
//! unwrap): a failure is logged and retried, never a panic.

use std::time::{Duration, UNIX_EPOCH};

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, RootContext};
use proxy_wasm::types::{BufferType, LogLevel, MetricType};

use crate::client::ProtocolError;
use crate::pump::{Pump, PumpConfig, Stream};

const SERVICE: &str = "envoy.service.discovery.v3.AggregatedDiscoveryService";
const METHOD: &str = "DeltaAggregatedResources";
/// Ticks are frequent so that writes leave soon after `flush_ms` elapsed
/// (a change that waited for the flush window goes out within a tick).
const TICK: Duration = Duration::from_millis(10);

fn log(level: LogLevel, msg: &str) {
    let _ = hostcalls::log(level, msg);
}

fn now_ms() -> u64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis() as u64)
}

/// Envoy stats the pump keeps (visible on the admin `/stats`).
#[derive(Debug, Default, Clone, Copy)]
struct Metrics {
    acks: Option<u32>,
    nacks: Option<u32>,
    flushes: Option<u32>,
    streams: Option<u32>,
    stream_failures: Option<u32>,
}

impl Metrics {
    fn define() -> Self {
        let counter = |n: &str| hostcalls::define_metric(MetricType::Counter, n).ok();
        Self {
            acks: counter("kvmesh_pump.acks"),
            nacks: counter("kvmesh_pump.nacks"),
            flushes: counter("kvmesh_pump.flushes"),
            streams: counter("kvmesh_pump.streams_opened"),
            stream_failures: counter("kvmesh_pump.stream_failures"),
        }
    }

    fn inc(id: Option<u32>) {
        if let Some(id) = id {
            let _ = hostcalls::increment_metric(id, 1);
        }
    }
}

#[derive(Default)]
pub(crate) struct Root {
    pump: Option<Pump>,
    metrics: Metrics,
}

impl Root {
    fn open(&mut self, now: u64) {
        let Some(pump) = &mut self.pump else { return };
        match hostcalls::open_grpc_stream(&pump.config.cluster, SERVICE, METHOD, vec![]) {
            Ok(token) => {
                pump.opened(token);
                Metrics::inc(self.metrics.streams);
                for req in pump.client.subscribe_requests() {
                    if let Err(e) = hostcalls::send_grpc_stream_message(token, Some(&req), false) {
                        log(
                            LogLevel::Warn,
                            &format!("kvmesh state pump: subscribe failed: {e:?}"),
                        );
                        let _ = hostcalls::cancel_grpc_stream(token);
                        pump.closed(now);
                        return;
                    }
                }
                log(LogLevel::Info, "kvmesh state pump: delta xDS stream opened");
            }
            Err(e) => {
                log(
                    LogLevel::Warn,
                    &format!(
                        "kvmesh state pump: cannot open stream to {}: {e:?}",
                        pump.config.cluster
                    ),
                );
                Metrics::inc(self.metrics.stream_failures);
                pump.closed(now);
            }
        }
    }

    fn flush(&mut self, now: u64) {
        let Some(pump) = &mut self.pump else { return };
        let writes = pump.flush_due(now);
        if writes.is_empty() {
            return;
        }
        for (key, value) in writes {
            if let Err(e) = hostcalls::set_shared_data(&key, Some(&value), None) {
                log(
                    LogLevel::Error,
                    &format!("kvmesh state pump: writing {key}: {e:?}"),
                );
            }
        }
        Metrics::inc(self.metrics.flushes);
    }
}

impl Context for Root {
    fn on_grpc_stream_message(&mut self, token_id: u32, message_size: usize) {
        let now = now_ms();
        let Some(pump) = &mut self.pump else { return };
        if pump.stream != (Stream::Open { token: token_id }) {
            return;
        }
        let limit = pump.client.limits().max_message_bytes;
        let outcome = if message_size > limit {
            Err(ProtocolError::TooLarge(message_size))
        } else {
            match hostcalls::get_buffer(BufferType::GrpcReceiveBuffer, 0, message_size) {
                Ok(Some(bytes)) => pump.client.on_message(&bytes),
                Ok(None) => pump.client.on_message(&[]),
                Err(e) => Err(ProtocolError::Undecodable(format!("{e:?}"))),
            }
        };
        match outcome {
            Ok(out) => {
                if let Some(reason) = &out.nacked {
                    log(
                        LogLevel::Warn,
                        &format!("kvmesh state pump: NACK: {reason}"),
                    );
                    Metrics::inc(self.metrics.nacks);
                } else {
                    Metrics::inc(self.metrics.acks);
                }
                pump.apply(out.changes);
                if let Err(e) =
                    hostcalls::send_grpc_stream_message(token_id, Some(&out.reply), false)
                {
                    log(
                        LogLevel::Warn,
                        &format!("kvmesh state pump: reply failed: {e:?}"),
                    );
                }
            }
            Err(e) => {
                log(
                    LogLevel::Warn,
                    &format!("kvmesh state pump: resetting stream: {e}"),
                );
                let _ = hostcalls::cancel_grpc_stream(token_id);
                Metrics::inc(self.metrics.stream_failures);
                pump.closed(now);
            }
        }
        self.flush(now);
    }

    fn on_grpc_stream_close(&mut self, token_id: u32, status_code: u32) {
        let now = now_ms();
        if let Some(pump) = &mut self.pump
            && pump.stream == (Stream::Open { token: token_id })
        {
            log(
                LogLevel::Info,
                &format!(
                    "kvmesh state pump: stream closed (grpc status {status_code}); will resync"
                ),
            );
            Metrics::inc(self.metrics.stream_failures);
            pump.closed(now);
        }
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, plugin_configuration_size: usize) -> bool {
        let bytes = match hostcalls::get_buffer(
            BufferType::PluginConfiguration,
            0,
            plugin_configuration_size,
        ) {
            Ok(b) => b.unwrap_or_default(),
            Err(e) => {
                log(
                    LogLevel::Error,
                    &format!("kvmesh state pump: reading configuration: {e:?}"),
                );
                return false;
            }
        };
        let config = match PumpConfig::parse(&bytes) {
            Ok(c) => c,
            Err(e) => {
                log(LogLevel::Error, &format!("kvmesh state pump: {e}"));
                return false;
            }
        };
        // Streams open on the first tick, not here: Envoy also runs
        // on_configure in a canary VM that must not keep a stream.
        let epoch = hostcalls::get_current_time()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(1, |d| d.as_nanos() as u64);
        self.pump = Some(Pump::new(config, epoch));
        self.metrics = Metrics::define();
        if let Err(e) = hostcalls::set_tick_period(TICK) {
            log(
                LogLevel::Error,
                &format!("kvmesh state pump: set_tick_period: {e:?}"),
            );
            return false;
        }
        true
    }

    fn on_tick(&mut self) {
        let now = now_ms();
        if self.pump.as_ref().is_some_and(|p| p.should_open(now)) {
            self.open(now);
        }
        self.flush(now);
    }
}

// SAFETY: `proxy_wasm::main!` only emits the `#[no_mangle] _initialize`
// entry point the proxy-wasm ABI requires; no unsafe code of ours.
#[allow(unsafe_code)]
mod entry {
    proxy_wasm::main! {{
        proxy_wasm::set_log_level(proxy_wasm::types::LogLevel::Info);
        proxy_wasm::set_root_context(|_| -> Box<dyn proxy_wasm::traits::RootContext> {
            Box::new(super::Root::default())
        });
    }}
}
