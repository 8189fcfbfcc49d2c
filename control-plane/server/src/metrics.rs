//! Prometheus metrics of the control plane: xDS pushes and answers, push
//! latency, replicas by state, state reports and the state stream lag.

use std::sync::Arc;
use std::time::Duration;

use kvmesh_control_plane_xds::{Answer, Observer};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TypeLabel {
    pub type_url: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AnswerLabel {
    pub type_url: String,
    pub answer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReplicaLabel {
    pub pool: String,
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub pool: String,
    pub outcome: String,
}

/// All metrics, registered once.
#[derive(Debug)]
pub struct Metrics {
    pub registry: Registry,
    pub pushes: Family<TypeLabel, Counter>,
    pub push_bytes: Family<TypeLabel, Counter>,
    pub answers: Family<AnswerLabel, Counter>,
    /// Time from sending a response to its ACK/NACK.
    pub push_latency: Family<TypeLabel, Histogram>,
    pub xds_streams: Gauge,
    pub replicas: Family<ReplicaLabel, Gauge>,
    pub reports: Family<KindLabel, Counter>,
    pub rejected: Counter,
    pub resyncs: Counter,
    /// Time from a state report arriving to its publication in xDS.
    pub state_lag: Histogram,
    pub strategy_pushes: Family<OutcomeLabel, Counter>,
}

fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("kvmesh_cp");
        let pushes = Family::<TypeLabel, Counter>::default();
        let push_bytes = Family::<TypeLabel, Counter>::default();
        let answers = Family::<AnswerLabel, Counter>::default();
        let push_latency = Family::<TypeLabel, Histogram>::new_with_constructor(latency_histogram);
        let xds_streams = Gauge::default();
        let replicas = Family::<ReplicaLabel, Gauge>::default();
        let reports = Family::<KindLabel, Counter>::default();
        let rejected = Counter::default();
        let resyncs = Counter::default();
        let state_lag = latency_histogram();
        let strategy_pushes = Family::<OutcomeLabel, Counter>::default();
        registry.register("xds_pushes", "xDS responses sent", pushes.clone());
        registry.register(
            "xds_push_bytes",
            "Encoded bytes of xDS responses sent",
            push_bytes.clone(),
        );
        registry.register("xds_answers", "ACKs and NACKs received", answers.clone());
        registry.register(
            "xds_push_latency_seconds",
            "Time from an xDS response to its ACK/NACK",
            push_latency.clone(),
        );
        registry.register("xds_streams", "Open ADS streams", xds_streams.clone());
        registry.register("replicas", "Replicas by pool and state", replicas.clone());
        registry.register(
            "state_reports",
            "Replica state reports received, by kind",
            reports.clone(),
        );
        registry.register(
            "state_rejected",
            "Replica state reports refused as malformed",
            rejected.clone(),
        );
        registry.register(
            "state_resyncs",
            "Resyncs requested from replicas",
            resyncs.clone(),
        );
        registry.register(
            "state_lag_seconds",
            "Time from a state report to its publication",
            state_lag.clone(),
        );
        registry.register(
            "strategy_pushes",
            "Strategy changes by outcome",
            strategy_pushes.clone(),
        );
        Self {
            registry,
            pushes,
            push_bytes,
            answers,
            push_latency,
            xds_streams,
            replicas,
            reports,
            rejected,
            resyncs,
            state_lag,
            strategy_pushes,
        }
    }
}

impl Metrics {
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Feeds xDS events into [`Metrics`].
#[derive(Debug)]
pub struct XdsObserver(pub Arc<Metrics>);

impl Observer for XdsObserver {
    fn pushed(&self, _node: &str, type_url: &str, _resources: usize, bytes: usize) {
        let l = TypeLabel {
            type_url: type_url.to_owned(),
        };
        self.0.pushes.get_or_create(&l).inc();
        self.0.push_bytes.get_or_create(&l).inc_by(bytes as u64);
    }

    fn answered(&self, _node: &str, type_url: &str, answer: &Answer, latency: Duration) {
        let answer = match answer {
            Answer::Acked => "ack",
            Answer::Nacked(_) => "nack",
        };
        self.0
            .answers
            .get_or_create(&AnswerLabel {
                type_url: type_url.to_owned(),
                answer: answer.into(),
            })
            .inc();
        self.0
            .push_latency
            .get_or_create(&TypeLabel {
                type_url: type_url.to_owned(),
            })
            .observe(latency.as_secs_f64());
    }

    fn stream(&self, _node: &str, _delta: bool, open: bool) {
        if open {
            self.0.xds_streams.inc();
        } else {
            self.0.xds_streams.dec();
        }
    }
}
