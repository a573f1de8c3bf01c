//! Prometheus metrics with vLLM's names (`vllm:` prefix, `model_name` label), so dashboards
//! built for vLLM's `/metrics` work unchanged. Latencies are measured at engine token steps
//! (not at SSE frames): TTFT from arrival to the first token, inter-token latency between token
//! events (one event per step; several tokens per event under speculative decoding, so ITL per
//! event and TPOT per request are both exported). [`ServerMetrics`]: the front door's
//! connection and request gauges (`ultra:` prefix).

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

/// Every metric the server exports.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub time_to_first_token: Histogram,
    pub inter_token_latency: Histogram,
    pub e2e_request_latency: Histogram,
    pub request_queue_time: Histogram,
    pub request_time_per_output_token: Histogram,
    pub num_requests_running: IntGauge,
    pub num_requests_waiting: IntGauge,
    pub kv_cache_usage_perc: Gauge,
    pub prompt_tokens: IntCounter,
    pub generation_tokens: IntCounter,
    pub request_success: IntCounterVec,
    pub spec_decode_num_drafts: IntCounter,
    pub spec_decode_num_draft_tokens: IntCounter,
    pub spec_decode_num_accepted_tokens: IntCounter,
    pub spec_decode_num_accepted_tokens_per_pos: IntCounterVec,
    pub prefix_cache_queries: IntCounter,
    pub prefix_cache_hits: IntCounter,
    pub num_preemptions: IntCounter,
    /// Bytes of decode-step results (logits, or token ids when sampled on the device) handed
    /// from the executor to the scheduler: on a GPU backend, what crosses to the host.
    pub decode_result_bytes: IntCounter,
    /// Plain decode steps (one batched executor call each).
    pub decode_steps: IntCounter,
}

/// Latency buckets in seconds (vLLM's TTFT buckets, which also cover ITL and e2e on a CPU).
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];

impl Metrics {
    /// A fresh registry for `model_name`.
    pub fn new(model_name: &str) -> prometheus::Result<Metrics> {
        let registry = Registry::new();
        let opts = |name: &str, help: &str| {
            Opts::new(format!("vllm:{name}"), help).const_label("model_name", model_name)
        };
        let hist = |name: &str, help: &str| -> prometheus::Result<Histogram> {
            let o = opts(name, help);
            let h = Histogram::with_opts(HistogramOpts::from(o).buckets(LATENCY_BUCKETS.to_vec()))?;
            registry.register(Box::new(h.clone()))?;
            Ok(h)
        };
        let counter = |name: &str, help: &str| -> prometheus::Result<IntCounter> {
            let c = IntCounter::with_opts(opts(name, help))?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let counter_vec =
            |name: &str, help: &str, label: &str| -> prometheus::Result<IntCounterVec> {
                let c = IntCounterVec::new(opts(name, help), &[label])?;
                registry.register(Box::new(c.clone()))?;
                Ok(c)
            };
        let gauge = |name: &str, help: &str| -> prometheus::Result<IntGauge> {
            let g = IntGauge::with_opts(opts(name, help))?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let kv_cache_usage_perc = Gauge::with_opts(opts(
            "kv_cache_usage_perc",
            "Fraction of the KV-cache blocks in use by admitted requests (1 = full; cached \
             blocks no request uses count as free).",
        ))?;
        registry.register(Box::new(kv_cache_usage_perc.clone()))?;
        Ok(Metrics {
            time_to_first_token: hist(
                "time_to_first_token_seconds",
                "Time from arrival to the first generated token.",
            )?,
            inter_token_latency: hist(
                "inter_token_latency_seconds",
                "Time between consecutive token events of a request.",
            )?,
            e2e_request_latency: hist(
                "e2e_request_latency_seconds",
                "Time from arrival to the end of a request.",
            )?,
            request_queue_time: hist(
                "request_queue_time_seconds",
                "Time a request waited before admission.",
            )?,
            request_time_per_output_token: hist(
                "request_time_per_output_token_seconds",
                "Per request: decode time divided by the generated tokens after the first.",
            )?,
            num_requests_running: gauge("num_requests_running", "Requests in the running batch.")?,
            num_requests_waiting: gauge("num_requests_waiting", "Requests waiting for admission.")?,
            kv_cache_usage_perc,
            prompt_tokens: counter("prompt_tokens_total", "Prefilled prompt tokens.")?,
            generation_tokens: counter("generation_tokens_total", "Generated tokens.")?,
            decode_result_bytes: counter(
                "decode_result_bytes_total",
                "Bytes of decode-step results (logits, or token ids sampled on the device) the \
                 executor handed to the scheduler: on a GPU, what crossed to the host.",
            )?,
            decode_steps: counter("decode_steps_total", "Plain decode steps.")?,
            request_success: counter_vec(
                "request_success_total",
                "Finished requests by finish reason.",
                "finished_reason",
            )?,
            spec_decode_num_drafts: counter(
                "spec_decode_num_drafts_total",
                "Speculative verify rounds that proposed drafts.",
            )?,
            spec_decode_num_draft_tokens: counter(
                "spec_decode_num_draft_tokens_total",
                "Draft tokens proposed.",
            )?,
            spec_decode_num_accepted_tokens: counter(
                "spec_decode_num_accepted_tokens_total",
                "Draft tokens accepted.",
            )?,
            spec_decode_num_accepted_tokens_per_pos: counter_vec(
                "spec_decode_num_accepted_tokens_per_pos_total",
                "Draft tokens accepted, by position in the block.",
                "position",
            )?,
            prefix_cache_queries: counter(
                "prefix_cache_queries_total",
                "Prompt tokens looked up in the prefix cache.",
            )?,
            prefix_cache_hits: counter(
                "prefix_cache_hits_total",
                "Prompt tokens found in the prefix cache (not prefilled).",
            )?,
            num_preemptions: counter(
                "num_preemptions_total",
                "Requests preempted (their KV blocks freed, recomputed later) for lack of blocks.",
            )?,
            registry,
        })
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail on I/O; a registry error would be a naming bug.
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            return format!("# error encoding metrics: {e}\n");
        }
        String::from_utf8_lossy(&buf).into_owned()
    }
}

/// The front door's metrics (`ultra:` prefix; they exist before the model loads): open,
/// refused and timed-out connections per API, and requests in flight.
#[derive(Clone)]
pub struct ServerMetrics {
    registry: Registry,
    pub open_connections: IntGaugeVec,
    pub accepted_connections: IntCounterVec,
    pub refused_connections: IntCounterVec,
    pub closed_idle_connections: IntCounterVec,
    pub requests_in_flight: IntGauge,
    pub rejected_requests: IntCounterVec,
}

impl ServerMetrics {
    pub fn new() -> prometheus::Result<ServerMetrics> {
        let registry = Registry::new();
        let vec = |name: &str, help: &str, label: &str| -> prometheus::Result<IntCounterVec> {
            let c = IntCounterVec::new(Opts::new(name, help), &[label])?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let open_connections = IntGaugeVec::new(
            Opts::new("ultra:open_connections", "Open connections by API."),
            &["api"],
        )?;
        registry.register(Box::new(open_connections.clone()))?;
        let requests_in_flight = IntGauge::with_opts(Opts::new(
            "ultra:requests_in_flight",
            "HTTP requests and gRPC calls whose responses are not finished.",
        ))?;
        registry.register(Box::new(requests_in_flight.clone()))?;
        Ok(ServerMetrics {
            open_connections,
            accepted_connections: vec(
                "ultra:accepted_connections_total",
                "Connections accepted, by API.",
                "api",
            )?,
            refused_connections: vec(
                "ultra:refused_connections_total",
                "Connections refused at the --max-connections cap, by API.",
                "api",
            )?,
            closed_idle_connections: vec(
                "ultra:closed_idle_connections_total",
                "Connections closed by the header-read or idle timeout, by API.",
                "api",
            )?,
            requests_in_flight,
            rejected_requests: vec(
                "ultra:rejected_requests_total",
                "Requests refused by the front door (auth, origin, host, size, body timeout), by cause.",
                "cause",
            )?,
            registry,
        })
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            return format!("# error encoding metrics: {e}\n");
        }
        String::from_utf8_lossy(&buf).into_owned()
    }
}
