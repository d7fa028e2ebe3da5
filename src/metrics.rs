//! Metrics plumbing: the registry every part registers its own metrics into (with
//! `prometheus-client`, the Prometheus project's Rust client), gauges read when
//! scraped, the process' own figures, and the exposition.
//!
//! Every part creates its metrics itself and registers them through a
//! `register_metrics` method, so the admin listener only encodes the registry and
//! knows no part. Names follow Prometheus' conventions: base units (`_seconds`,
//! `_bytes`), `_total` for counters (added by the encoder), the `handover_` prefix
//! for ours.

use std::fmt;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::info::Info;
pub use prometheus_client::registry::Registry;

/// The exposition's content type (OpenMetrics text).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A registry with the process' own figures (`process_…`) at its root; the proxy's
/// metrics go into its `handover_` sub-registry (see [`ours`]).
pub fn registry() -> Registry {
    let mut root = Registry::default();
    root.register_collector(Box::new(Process));
    root
}

/// The `handover_` sub-registry of `root`, with `handover_build_info` in it.
pub fn ours(root: &mut Registry) -> &mut Registry {
    let ours = root.sub_registry_with_prefix("handover");
    ours.register(
        "build",
        "The running build.",
        Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
    );
    ours
}

/// The registry as OpenMetrics text.
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out
}

/// A counter by `reason` (refusals, mostly); clones count into the same family.
#[derive(Clone, Default)]
pub struct ByReason(Family<ReasonLabels, Counter>);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

impl ByReason {
    pub fn count(&self, reason: &'static str) {
        self.0.get_or_create(&ReasonLabels { reason }).inc();
    }

    /// Registers it as `name`, with each of `reasons` from zero so that dashboards
    /// and alerts see the series before the first one.
    pub fn register(
        &self,
        registry: &mut Registry,
        name: &'static str,
        help: &'static str,
        reasons: &[&'static str],
    ) {
        for &reason in reasons {
            let _ = self.0.get_or_create(&ReasonLabels { reason });
        }
        registry.register(name, help, self.0.clone());
    }
}

/// Reads a gauge's value when scraped.
type Read = Box<dyn Fn() -> i64 + Send + Sync>;

/// Gauges whose values are read when scraped (counts that live elsewhere: sessions,
/// topics, tasks): `(name, help, read)`.
pub struct Readings {
    gauges: Vec<(&'static str, &'static str, Read)>,
}

impl Readings {
    pub fn new() -> Self {
        Self { gauges: Vec::new() }
    }

    pub fn gauge(
        mut self,
        name: &'static str,
        help: &'static str,
        read: impl Fn() -> i64 + Send + Sync + 'static,
    ) -> Self {
        self.gauges.push((name, help, Box::new(read)));
        self
    }

    /// Registers them into `registry` (names get its prefix).
    pub fn register(self, registry: &mut Registry) {
        registry.register_collector(Box::new(self));
    }
}

impl Default for Readings {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for Readings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.gauges.iter().map(|(name, ..)| *name).collect();
        f.debug_struct("Readings").field("gauges", &names).finish()
    }
}

impl Collector for Readings {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        for (name, help, read) in &self.gauges {
            let gauge = ConstGauge::new(read());
            let metric = encoder.encode_descriptor(name, help, None, gauge.metric_type())?;
            gauge.encode(metric)?;
        }
        Ok(())
    }
}

/// `process_resident_memory_bytes` and `process_open_fds`, read from `/proc/self`.
#[derive(Debug)]
struct Process;

impl Collector for Process {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let resident = std::fs::read_to_string("/proc/self/statm")
            .ok()
            .and_then(|s| s.split_whitespace().nth(1)?.parse::<i64>().ok())
            .map_or(0, |pages| pages * 4096);
        let fds = std::fs::read_dir("/proc/self/fd").map_or(0, |dir| dir.count() as i64);
        for (name, help, value) in [
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
                resident,
            ),
            ("process_open_fds", "Number of open file descriptors.", fds),
        ] {
            let gauge = ConstGauge::new(value);
            let metric = encoder.encode_descriptor(name, help, None, gauge.metric_type())?;
            gauge.encode(metric)?;
        }
        Ok(())
    }
}
