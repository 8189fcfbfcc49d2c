//! Figures of the runs: per-target summaries, the markdown table, a JSON
//! dump, an SVG plot, and the splice into `docs/benchmarks.md`.

use std::path::Path;
use std::time::Duration;

use kvmesh_tests_harness::load::Outcome;
use plotters::prelude::*;
use serde_json::{Value, json};

/// One target's raw results.
#[derive(Debug)]
pub(crate) struct Run {
    pub(crate) name: String,
    pub(crate) outcomes: Vec<Outcome>,
    pub(crate) wall: Duration,
    /// Per replica, queued prefill tokens sampled every 100 ms.
    pub(crate) queues: Vec<Vec<f64>>,
    /// Per replica, prompt tokens computed (not from cache) in the run.
    pub(crate) prefill: Vec<f64>,
}

/// What the bench was.
#[derive(Debug)]
pub(crate) struct Setup {
    pub(crate) command: String,
    pub(crate) replicas: usize,
    pub(crate) requests: usize,
    pub(crate) workload: String,
    pub(crate) mode: String,
    pub(crate) output_tokens: (u32, u32),
    pub(crate) kv_blocks: u64,
    /// What the oracle took from cache.
    pub(crate) oracle: CacheUse,
}

/// What served requests took from cache: the cached-token ratio, and how many
/// got nothing from cache (each a prompt computed whole).
#[derive(Debug, Clone, Copy)]
pub(crate) struct CacheUse {
    pub(crate) ratio: f64,
    pub(crate) uncached: usize,
}

impl CacheUse {
    pub(crate) fn of<'a>(served: impl IntoIterator<Item = &'a Outcome>) -> CacheUse {
        let (mut cached, mut prompt, mut uncached) = (0u64, 0u64, 0usize);
        for o in served {
            cached += o.cached_tokens;
            prompt += o.prompt_tokens;
            uncached += usize::from(o.cached_tokens == 0);
        }
        CacheUse {
            ratio: cached as f64 / prompt.max(1) as f64,
            uncached,
        }
    }
}

/// One target's figures.
#[derive(Debug, Clone)]
pub(crate) struct Summary {
    pub(crate) name: String,
    pub(crate) ok: usize,
    pub(crate) failed: usize,
    pub(crate) cached_ratio: f64,
    pub(crate) of_oracle: f64,
    /// Requests served with nothing from cache.
    pub(crate) uncached: usize,
    /// Mostly cached requests sent while a long prefill ran on their replica
    /// (see [`behind_long_prefill`]); `None` when no response named its replica.
    pub(crate) behind_long: Option<usize>,
    pub(crate) ttft_ms: [f64; 3],
    pub(crate) e2e_ms: [f64; 2],
    pub(crate) decode_tps: f64,
    pub(crate) throughput_tps: f64,
    pub(crate) queue_max_over_mean: f64,
    pub(crate) prefill_max_over_mean: f64,
    /// Per replica, the mean of its queued prefill samples.
    pub(crate) queue_means: Vec<f64>,
    /// Per replica, prompt tokens computed.
    pub(crate) prefill: Vec<f64>,
    pub(crate) wall_s: f64,
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

/// Prompt tokens to compute above which a prefill counts as long (a pasted
/// document rather than a question after a cached system prompt).
const LONG_PREFILL_TOKENS: u64 = 1000;

/// Of `served`, the requests with over half their prompt from cache that were
/// sent while a long prefill (over [`LONG_PREFILL_TOKENS`] to compute, until
/// its first token) was running on the replica that answered them, as their
/// `x-kvmesh-replica` headers say. Such a request shares its replica's steps
/// with the long prefill's chunks, which is what its TTFT pays for: how routers
/// place long prompts shows up here before it does in the p50. `None` when no
/// response named its replica.
pub(crate) fn behind_long_prefill(served: &[&Outcome]) -> Option<usize> {
    if served.iter().all(|o| o.replica.is_none()) {
        return None;
    }
    let long: Vec<(usize, &str, Duration, Duration)> = served
        .iter()
        .enumerate()
        .filter(|(_, o)| o.prompt_tokens.saturating_sub(o.cached_tokens) > LONG_PREFILL_TOKENS)
        .filter_map(|(i, o)| Some((i, o.replica.as_deref()?, o.sent, o.sent + o.ttft?)))
        .collect();
    let behind = served
        .iter()
        .enumerate()
        .filter(|(_, o)| o.cached_tokens * 2 > o.prompt_tokens)
        .filter(|&(i, o)| {
            long.iter().any(|&(j, r, from, to)| {
                j != i && o.replica.as_deref() == Some(r) && from <= o.sent && o.sent < to
            })
        })
        .count();
    Some(behind)
}

fn max_over_mean(v: &[f64]) -> f64 {
    let mean = v.iter().sum::<f64>() / v.len().max(1) as f64;
    let max = v.iter().copied().fold(0.0, f64::max);
    if mean > 0.0 { max / mean } else { f64::NAN }
}

impl Summary {
    pub(crate) fn of(run: &Run, oracle: f64) -> Summary {
        let ok: Vec<&Outcome> = run.outcomes.iter().filter(|o| o.ok).collect();
        let cache = CacheUse::of(ok.iter().copied());
        let cached_ratio = cache.ratio;
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let ttft = sorted(ok.iter().filter_map(|o| o.ttft.map(ms)).collect());
        let e2e = sorted(ok.iter().map(|o| ms(o.e2e)).collect());
        let decode = sorted(ok.iter().filter_map(|o| o.decode_tokens_per_s()).collect());
        let tokens: u64 = ok.iter().map(|o| o.completion_tokens).sum();
        let queue_means: Vec<f64> = run
            .queues
            .iter()
            .map(|s| s.iter().sum::<f64>() / s.len().max(1) as f64)
            .collect();
        Summary {
            name: run.name.clone(),
            ok: ok.len(),
            failed: run.outcomes.len() - ok.len(),
            cached_ratio,
            of_oracle: if oracle > 0.0 {
                cached_ratio / oracle
            } else {
                f64::NAN
            },
            uncached: cache.uncached,
            behind_long: behind_long_prefill(&ok),
            ttft_ms: [pct(&ttft, 0.5), pct(&ttft, 0.9), pct(&ttft, 0.99)],
            e2e_ms: [pct(&e2e, 0.5), pct(&e2e, 0.99)],
            decode_tps: pct(&decode, 0.5),
            throughput_tps: tokens as f64 / run.wall.as_secs_f64().max(1e-9),
            queue_max_over_mean: max_over_mean(&queue_means),
            prefill_max_over_mean: max_over_mean(&run.prefill),
            queue_means,
            prefill: run.prefill.clone(),
            wall_s: run.wall.as_secs_f64(),
        }
    }

    pub(crate) fn line(&self) -> String {
        format!(
            "ok {} failed {} cached {:.3} uncached {} TTFT p50 {:.0} ms p99 {:.0} ms e2e p50 {:.0} ms queued-prefill max/mean {:.2} prefill max/mean {:.2} wall {:.1} s",
            self.ok,
            self.failed,
            self.cached_ratio,
            self.uncached,
            self.ttft_ms[0],
            self.ttft_ms[2],
            self.e2e_ms[0],
            self.queue_max_over_mean,
            self.prefill_max_over_mean,
            self.wall_s
        )
    }
}

pub(crate) fn markdown(setup: &Setup, rows: &[Summary]) -> String {
    let mut s = format!(
        "Command: `{}`\n\n{} replicas, {} requests, {}, {}, output tokens {}-{} (greedy), {} KV blocks of 16 tokens per replica; \
         oracle cached-token ratio {:.3}, {} requests with nothing cached (the trace in order on one replica whose cache never evicts).\n\n",
        setup.command,
        setup.replicas,
        setup.requests,
        setup.workload,
        setup.mode,
        setup.output_tokens.0,
        setup.output_tokens.1,
        setup.kv_blocks,
        setup.oracle.ratio,
        setup.oracle.uncached
    );
    s.push_str("| target | ok | failed | cached ratio | of oracle | uncached requests | cached behind a long prefill | TTFT p50 ms | TTFT p90 ms | TTFT p99 ms | e2e p50 ms | e2e p99 ms | decode tok/s p50 | output tok/s | queued prefill max/mean | prefill tokens max/mean | wall s |\n");
    s.push_str("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n");
    for r in rows {
        s.push_str(&format!(
            "| {} | {} | {} | {:.3} | {:.2} | {} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.1} | {:.1} | {:.2} | {:.2} | {:.1} |\n",
            r.name,
            r.ok,
            r.failed,
            r.cached_ratio,
            r.of_oracle,
            r.uncached,
            r.behind_long.map_or("-".to_owned(), |n| n.to_string()),
            r.ttft_ms[0],
            r.ttft_ms[1],
            r.ttft_ms[2],
            r.e2e_ms[0],
            r.e2e_ms[1],
            r.decode_tps,
            r.throughput_tps,
            r.queue_max_over_mean,
            r.prefill_max_over_mean,
            r.wall_s
        ));
    }
    s
}

/// Per request of one run, in trace order: what the analysis of a single
/// miss or a slow request needs.
fn requests(run: &Run, tags: &[Option<String>]) -> Vec<Value> {
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    run.outcomes
        .iter()
        .enumerate()
        .map(|(i, o)| {
            json!({
                "i": i, "tag": tags.get(i).cloned().flatten(), "ok": o.ok,
                "sent_ms": ms(o.sent), "ttft_ms": o.ttft.map(ms), "e2e_ms": ms(o.e2e),
                "prompt_tokens": o.prompt_tokens, "cached_tokens": o.cached_tokens,
                "decision": o.decision, "replica": o.replica,
            })
        })
        .collect()
}

/// The summaries, and every request of every run (`tags`: the trace's).
pub(crate) fn json(
    setup: &Setup,
    rows: &[Summary],
    runs: &[Run],
    tags: &[Option<String>],
) -> Value {
    json!({
        "command": setup.command,
        "replicas": setup.replicas,
        "requests": setup.requests,
        "workload": setup.workload,
        "mode": setup.mode,
        "oracle_ratio": setup.oracle.ratio,
        "oracle_uncached_requests": setup.oracle.uncached,
        "targets": rows.iter().zip(runs).map(|(r, run)| json!({
            "name": r.name, "ok": r.ok, "failed": r.failed,
            "cached_ratio": r.cached_ratio, "of_oracle": r.of_oracle,
            "uncached_requests": r.uncached,
            "cached_behind_long_prefill": r.behind_long,
            "ttft_ms": {"p50": r.ttft_ms[0], "p90": r.ttft_ms[1], "p99": r.ttft_ms[2]},
            "e2e_ms": {"p50": r.e2e_ms[0], "p99": r.e2e_ms[1]},
            "decode_tokens_per_s_p50": r.decode_tps,
            "output_tokens_per_s": r.throughput_tps,
            "queued_prefill_max_over_mean": r.queue_max_over_mean,
            "prefill_tokens_max_over_mean": r.prefill_max_over_mean,
            "queued_prefill_means": r.queue_means,
            "prefill_tokens": r.prefill,
            "wall_s": r.wall_s,
            "requests": requests(run, tags),
        })).collect::<Vec<_>>(),
    })
}

/// Two panels: cached-token ratio per target (dashed line: the oracle) and
/// TTFT p50 / p99.
pub(crate) fn svg(rows: &[Summary], oracle: f64) -> anyhow::Result<String> {
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, (1000, 420)).into_drawing_area();
        root.fill(&WHITE)?;
        let (left, right) = root.split_horizontally(500);
        let n = rows.len() as i32;
        let names: Vec<String> = rows.iter().map(|r| r.name.clone()).collect();
        {
            let mut c = ChartBuilder::on(&left)
                .caption("cached-token ratio (dashed: oracle)", ("sans-serif", 16))
                .margin(10)
                .x_label_area_size(40)
                .y_label_area_size(45)
                .build_cartesian_2d((0..n).into_segmented(), 0.0..1.0f64)?;
            let labels = names.clone();
            c.configure_mesh()
                .disable_x_mesh()
                .x_label_formatter(&|x| match x {
                    SegmentValue::CenterOf(i) => {
                        labels.get(*i as usize).cloned().unwrap_or_default()
                    }
                    _ => String::new(),
                })
                .draw()?;
            c.draw_series(rows.iter().enumerate().map(|(i, r)| {
                let i = i as i32;
                Rectangle::new(
                    [
                        (SegmentValue::Exact(i), 0.0),
                        (SegmentValue::Exact(i + 1), r.cached_ratio),
                    ],
                    BLUE.mix(0.6).filled(),
                )
            }))?;
            c.draw_series(DashedLineSeries::new(
                [
                    (SegmentValue::Exact(0), oracle),
                    (SegmentValue::Exact(n), oracle),
                ],
                6,
                4,
                BLACK.stroke_width(2),
            ))?;
        }
        {
            let top = rows
                .iter()
                .map(|r| r.ttft_ms[2])
                .filter(|v| v.is_finite())
                .fold(1.0, f64::max)
                * 1.1;
            let mut c = ChartBuilder::on(&right)
                .caption("TTFT ms (green p50, red p99)", ("sans-serif", 16))
                .margin(10)
                .x_label_area_size(40)
                .y_label_area_size(55)
                .build_cartesian_2d(0.0..f64::from(n), 0.0..top)?;
            let labels = names;
            c.configure_mesh()
                .disable_x_mesh()
                .x_labels(rows.len() * 2 + 1)
                .x_label_formatter(&|x| {
                    let i = x.floor() as usize;
                    if (x - x.floor() - 0.5).abs() < 0.01 {
                        labels.get(i).cloned().unwrap_or_default()
                    } else {
                        String::new()
                    }
                })
                .draw()?;
            for (i, r) in rows.iter().enumerate() {
                let x = i as f64;
                c.draw_series([
                    Rectangle::new(
                        [(x + 0.1, 0.0), (x + 0.48, r.ttft_ms[0])],
                        GREEN.mix(0.6).filled(),
                    ),
                    Rectangle::new(
                        [(x + 0.52, 0.0), (x + 0.9, r.ttft_ms[2])],
                        RED.mix(0.6).filled(),
                    ),
                ])?;
            }
        }
        root.present()?;
    }
    Ok(out)
}

const BEGIN: &str = "<!-- kvmesh-bench: begin -->";
const END: &str = "<!-- kvmesh-bench: end -->";

/// Replaces the block between the bench markers under `## whole stack` (the
/// section and markers are added at the end when missing).
pub(crate) fn splice(path: &Path, table: &str) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let block = format!("{BEGIN}\n{table}{END}");
    let new = match (text.find(BEGIN), text.find(END)) {
        (Some(a), Some(b)) if b > a => format!("{}{block}{}", &text[..a], &text[b + END.len()..]),
        _ => format!("{}\n## whole stack\n\n{block}\n", text.trim_end()),
    };
    std::fs::write(path, new)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(ok: bool, prompt: u64, cached: u64) -> Outcome {
        Outcome {
            ok,
            status: if ok { 200 } else { 503 },
            prompt_tokens: prompt,
            cached_tokens: cached,
            completion_tokens: 4,
            ttft: Some(Duration::from_millis(100)),
            e2e: Duration::from_millis(300),
            ..Default::default()
        }
    }

    #[test]
    fn a_summary_counts_requests_served_with_nothing_cached_and_the_table_lines_up() {
        let run = Run {
            name: "kvmesh prefix-aware".into(),
            outcomes: vec![
                outcome(true, 800, 0),
                outcome(true, 800, 640),
                outcome(true, 800, 0),
                outcome(false, 0, 0),
            ],
            wall: Duration::from_secs(2),
            queues: vec![vec![10.0, 30.0], vec![20.0, 20.0]],
            prefill: vec![1600.0, 960.0],
        };
        let s = Summary::of(&run, 0.5);
        assert_eq!((s.ok, s.failed, s.uncached), (3, 1, 2));
        assert_eq!(s.queue_means, vec![20.0, 20.0]);
        assert!((s.prefill_max_over_mean - 1600.0 / 1280.0).abs() < 1e-12);
        assert!((s.cached_ratio - 640.0 / 2400.0).abs() < 1e-12);

        let setup = Setup {
            command: "kvmesh-bench".into(),
            replicas: 2,
            requests: 4,
            workload: "w".into(),
            mode: "closed loop, 4 clients".into(),
            output_tokens: (16, 32),
            kv_blocks: 240,
            oracle: CacheUse {
                ratio: 0.5,
                uncached: 1,
            },
        };
        let md = markdown(&setup, &[s]);
        assert!(md.contains("1 requests with nothing cached"), "{md}");
        let rows: Vec<Vec<&str>> = md
            .lines()
            .filter(|l| l.starts_with('|'))
            .map(|l| l.split('|').map(str::trim).collect())
            .collect();
        assert_eq!(rows.len(), 3, "{md}");
        assert!(rows.iter().all(|r| r.len() == rows[0].len()), "{md}");
        let col = rows[0]
            .iter()
            .position(|&h| h == "uncached requests")
            .unwrap();
        assert_eq!(rows[2][col], "2");
        let col = rows[0]
            .iter()
            .position(|&h| h == "cached behind a long prefill")
            .unwrap();
        assert_eq!(rows[2][col], "-", "no response named its replica");
    }

    #[test]
    fn cached_requests_behind_a_long_prefill_count_only_on_its_replica_until_its_first_token() {
        let at = |replica: &str, sent_s: u64, prompt: u64, cached: u64, ttft_s: u64| Outcome {
            replica: Some(replica.to_owned()),
            sent: Duration::from_secs(sent_s),
            ttft: Some(Duration::from_secs(ttft_s)),
            ..outcome(true, prompt, cached)
        };
        let served = [
            at("r0", 10, 3200, 800, 20), // long: 2,400 to compute, prefilling 10-30 s
            at("r0", 15, 850, 800, 1),   // cached, behind it: counted
            at("r0", 29, 850, 800, 1),   // still before its first token: counted
            at("r0", 30, 850, 800, 1),   // at its first token: not
            at("r1", 15, 850, 800, 1),   // another replica: not
            at("r0", 15, 850, 0, 1),     // behind it but not mostly cached: not
            at("r0", 5, 850, 800, 1),    // before it: not
            at("r1", 40, 1900, 800, 9),  // 1,100 to compute: long, and mostly its own
            at("r1", 41, 850, 800, 1),   // behind that one: counted
        ];
        let refs: Vec<&Outcome> = served.iter().collect();
        assert_eq!(behind_long_prefill(&refs), Some(3));
        // 1,000 tokens to compute is not long.
        let short = [at("r0", 0, 1800, 800, 20), at("r0", 1, 850, 800, 1)];
        assert_eq!(
            behind_long_prefill(&short.iter().collect::<Vec<_>>()),
            Some(0)
        );
        // Through a router that drops the header, nothing to say.
        let bare = [Outcome {
            replica: None,
            ..at("r0", 1, 850, 800, 1)
        }];
        assert_eq!(behind_long_prefill(&bare.iter().collect::<Vec<_>>()), None);
    }
}
