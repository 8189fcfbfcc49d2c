//! The comparison report: one row per plugin, as a text table, JSON and SVG.

use plotters::prelude::*;
use serde::Serialize;

/// The outcome of one simulation run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Requests replayed.
    pub requests: usize,
    /// Replicas simulated.
    pub replicas: usize,
    /// Per-replica capacity in chunks (device, host, disk).
    pub capacity_chunks: [usize; 3],
    /// Cached-token ratio of the oracle (infinite cache, best routing).
    pub oracle_ratio: f64,
    /// One row per plugin, in the order given.
    pub plugins: Vec<PluginReport>,
}

/// How one plugin did.
#[derive(Debug, Clone, Serialize)]
pub struct PluginReport {
    /// Plugin label.
    pub name: String,
    /// Prompt tokens served from cache.
    pub cached_tokens: f64,
    /// All prompt tokens.
    pub prompt_tokens: f64,
    /// cached / prompt tokens.
    pub cached_ratio: f64,
    /// The oracle's ratio.
    pub oracle_ratio: f64,
    /// cached_ratio / oracle_ratio.
    pub fraction_of_oracle: f64,
    /// Requests served per replica.
    pub served: Vec<u64>,
    /// Most requests on one replica.
    pub max_load: u64,
    /// Mean requests per replica.
    pub mean_load: f64,
    /// Simulated time to first token, median, milliseconds.
    pub ttft_p50_ms: f64,
    /// Simulated time to first token, 99th percentile, milliseconds.
    pub ttft_p99_ms: f64,
    /// Requests without a usable endpoint header (routed round-robin).
    pub fallbacks: u64,
    /// Requests the host could not complete (non-trap errors).
    pub errors: u64,
}

impl PluginReport {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        name: &str,
        cached: f64,
        prompt: f64,
        oracle_cached: f64,
        served: &[u64],
        mut ttfts: Vec<f64>,
        fallbacks: u64,
        errors: u64,
    ) -> Self {
        ttfts.sort_by(f64::total_cmp);
        let q = |p: f64| -> f64 {
            if ttfts.is_empty() {
                return 0.0;
            }
            let i = ((ttfts.len() as f64 - 1.0) * p).round() as usize;
            ttfts[i.min(ttfts.len() - 1)]
        };
        let cached_ratio = crate::ratio(cached, prompt);
        let oracle_ratio = crate::ratio(oracle_cached, prompt);
        Self {
            name: name.to_owned(),
            cached_tokens: cached,
            prompt_tokens: prompt,
            cached_ratio,
            oracle_ratio,
            fraction_of_oracle: crate::ratio(cached_ratio, oracle_ratio),
            served: served.to_vec(),
            max_load: served.iter().copied().max().unwrap_or(0),
            mean_load: served.iter().sum::<u64>() as f64 / served.len().max(1) as f64,
            ttft_p50_ms: q(0.5),
            ttft_p99_ms: q(0.99),
            fallbacks,
            errors,
        }
    }
}

impl Report {
    /// A fixed-width text table.
    pub fn table(&self) -> String {
        let mut s = format!(
            "{} requests, {} replicas, capacity (chunks) device/host/disk {}/{}/{}, oracle cached ratio {:.3}\n",
            self.requests,
            self.replicas,
            self.capacity_chunks[0],
            self.capacity_chunks[1],
            self.capacity_chunks[2],
            self.oracle_ratio
        );
        s.push_str(&format!(
            "{:<16} {:>8} {:>9} {:>8} {:>9} {:>12} {:>12} {:>9}\n",
            "plugin",
            "cached",
            "of oracle",
            "max load",
            "mean load",
            "TTFT p50 ms",
            "TTFT p99 ms",
            "fallback"
        ));
        for p in &self.plugins {
            s.push_str(&format!(
                "{:<16} {:>8.3} {:>9.3} {:>8} {:>9.1} {:>12.1} {:>12.1} {:>9}\n",
                p.name,
                p.cached_ratio,
                p.fraction_of_oracle,
                p.max_load,
                p.mean_load,
                p.ttft_p50_ms,
                p.ttft_p99_ms,
                p.fallbacks
            ));
        }
        s
    }

    /// Pretty JSON.
    pub fn json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// An SVG with two panels: cached-token ratio (with the oracle line) and
    /// TTFT p50/p99, one bar group per plugin.
    pub fn svg(&self) -> Result<String, String> {
        let mut out = String::new();
        {
            let root = SVGBackend::with_string(&mut out, (960, 420)).into_drawing_area();
            root.fill(&WHITE).map_err(|e| e.to_string())?;
            let (left, right) = root.split_horizontally(480);
            let n = self.plugins.len().max(1) as f64;
            self.panel(
                &left,
                "cached-token ratio (dashed: oracle)",
                1.0,
                n,
                |p| vec![(p.cached_ratio, BLUE.mix(0.7))],
                Some(self.oracle_ratio),
            )?;
            let top = self
                .plugins
                .iter()
                .map(|p| p.ttft_p99_ms)
                .fold(1.0f64, f64::max)
                * 1.1;
            self.panel(
                &right,
                "simulated TTFT ms (p50, p99)",
                top,
                n,
                |p| {
                    vec![
                        (p.ttft_p50_ms, GREEN.mix(0.7)),
                        (p.ttft_p99_ms, RED.mix(0.7)),
                    ]
                },
                None,
            )?;
            root.present().map_err(|e| e.to_string())?;
        }
        Ok(out)
    }

    fn panel(
        &self,
        area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
        title: &str,
        top: f64,
        n: f64,
        bars: impl Fn(&PluginReport) -> Vec<(f64, RGBAColor)>,
        line: Option<f64>,
    ) -> Result<(), String> {
        let e = |e: DrawingAreaErrorKind<_>| e.to_string();
        let (w, h) = area.dim_in_pixel();
        let (x0, y0, x1, y1) = (50i32, 40i32, w as i32 - 10, h as i32 - 50);
        area.draw(&Text::new(title.to_owned(), (x0, 10), ("sans-serif", 16)))
            .map_err(e)?;
        area.draw(&PathElement::new(vec![(x0, y1), (x1, y1)], BLACK))
            .map_err(e)?;
        area.draw(&PathElement::new(vec![(x0, y0), (x0, y1)], BLACK))
            .map_err(e)?;
        let y_of = |v: f64| y1 - ((v / top).clamp(0.0, 1.0) * f64::from(y1 - y0)) as i32;
        for i in 0..=4 {
            let v = top * f64::from(i) / 4.0;
            area.draw(&Text::new(
                format!("{v:.2}"),
                (2, y_of(v) - 6),
                ("sans-serif", 11),
            ))
            .map_err(e)?;
        }
        let group = f64::from(x1 - x0) / n;
        for (i, p) in self.plugins.iter().enumerate() {
            let gx = x0 + (group * i as f64) as i32;
            let bs = bars(p);
            let bw = ((group * 0.7) / bs.len().max(1) as f64) as i32;
            for (j, (v, color)) in bs.into_iter().enumerate() {
                let bx = gx + (group * 0.15) as i32 + j as i32 * bw;
                area.draw(&Rectangle::new(
                    [(bx, y_of(v)), (bx + bw - 2, y1)],
                    color.filled(),
                ))
                .map_err(e)?;
                area.draw(&Text::new(
                    format!("{v:.2}"),
                    (bx, y_of(v) - 14),
                    ("sans-serif", 10),
                ))
                .map_err(e)?;
            }
            area.draw(&Text::new(
                p.name.clone(),
                (gx + 4, y1 + 8),
                ("sans-serif", 12),
            ))
            .map_err(e)?;
        }
        if let Some(v) = line {
            let y = y_of(v);
            let mut x = x0;
            while x < x1 {
                area.draw(&PathElement::new(vec![(x, y), ((x + 8).min(x1), y)], BLACK))
                    .map_err(e)?;
                x += 14;
            }
        }
        Ok(())
    }
}
