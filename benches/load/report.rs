//! Results: the terminal table (with ratios against `direct` and `nginx`),
//! `target/bench-report/load.json`, SVG plots and a small `index.html`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

/// The figures of one path (direct, handover, nginx) under the relay workload.
pub struct PathResult {
    pub name: &'static str,
    pub connect_per_s: f64,
    pub deliveries: u64,
    pub deliveries_per_s: f64,
    pub lost: u64,
    pub duplicated: u64,
    pub disconnects: u64,
    /// Sorted.
    pub latencies_us: Vec<u32>,
    /// CPU seconds of the process(es) under test during the stream.
    pub cpu_s: Option<f64>,
    pub rss_bytes: Option<u64>,
}

impl PathResult {
    pub fn percentile(&self, q: f64) -> u32 {
        percentile(&self.latencies_us, q)
    }

    pub fn cpu_s_per_million(&self) -> Option<f64> {
        self.cpu_s
            .filter(|_| self.deliveries > 0)
            .map(|cpu| cpu / (self.deliveries as f64 / 1e6))
    }

    fn json(&self) -> Value {
        json!({
            "connect_per_s": self.connect_per_s,
            "deliveries": self.deliveries,
            "deliveries_per_s": self.deliveries_per_s,
            "p50_us": self.percentile(0.50),
            "p99_us": self.percentile(0.99),
            "p999_us": self.percentile(0.999),
            "max_us": self.latencies_us.last().copied().unwrap_or(0),
            "lost": self.lost,
            "duplicated": self.duplicated,
            "disconnects": self.disconnects,
            "cpu_s": self.cpu_s,
            "cpu_s_per_million": self.cpu_s_per_million(),
            "rss_bytes": self.rss_bytes,
        })
    }
}

pub fn percentile(sorted: &[u32], q: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// The rotation-under-load run.
pub struct RotationResult {
    pub handovers: u64,
    pub durations_ms: Vec<f64>,
    pub lost: u64,
    pub duplicated: u64,
    pub disconnects: u64,
    pub deliveries: u64,
    /// Per second: (second, deliveries, p50 µs, p99 µs).
    pub timeline: Vec<(u32, u64, u32, u32)>,
    /// Seconds since the stream started at which a handover completed.
    pub handover_marks: Vec<f64>,
}

pub struct Report {
    pub mode: &'static str,
    pub workload: Value,
    pub machine: Value,
    pub paths: Vec<PathResult>,
    pub idle: Vec<(usize, Option<u64>)>,
    pub open_files_note: Option<String>,
    pub fanout_deliveries_per_s: Option<f64>,
    /// (delivered, offered) deliveries.
    pub fanout_delivered: Option<(u64, u64)>,
    pub fanout_clients: usize,
    pub rotation: Option<RotationResult>,
    /// The rolling restart of a fleet under load.
    pub rollout: Option<handover::soak::rollout::RolloutReport>,
    pub notes: Vec<String>,
}

fn fmt_us(us: u32) -> String {
    if us >= 10_000 {
        format!("{:.1} ms", us as f64 / 1000.0)
    } else {
        format!("{us} µs")
    }
}

fn ratio(ours: f64, theirs: f64) -> String {
    if theirs > 0.0 {
        format!("×{:.2}", ours / theirs)
    } else {
        "–".into()
    }
}

impl Report {
    fn path(&self, name: &str) -> Option<&PathResult> {
        self.paths.iter().find(|p| p.name == name)
    }

    pub fn idle_per_client(&self, clients: usize) -> Option<u64> {
        self.idle
            .iter()
            .find(|(n, _)| *n == clients)
            .and_then(|(_, b)| *b)
    }

    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:<9} {:>10} {:>13} {:>9} {:>9} {:>9} {:>9} {:>6} {:>6} {:>10} {:>9}",
            "path",
            "connect/s",
            "deliveries/s",
            "p50",
            "p99",
            "p99.9",
            "max",
            "lost",
            "dup",
            "CPU s/M",
            "RSS MiB"
        );
        for p in &self.paths {
            let _ = writeln!(
                out,
                "{:<9} {:>10.0} {:>13.0} {:>9} {:>9} {:>9} {:>9} {:>6} {:>6} {:>10} {:>9}",
                p.name,
                p.connect_per_s,
                p.deliveries_per_s,
                fmt_us(p.percentile(0.5)),
                fmt_us(p.percentile(0.99)),
                fmt_us(p.percentile(0.999)),
                fmt_us(p.latencies_us.last().copied().unwrap_or(0)),
                p.lost,
                p.duplicated,
                p.cpu_s_per_million()
                    .map(|c| format!("{c:.2}"))
                    .unwrap_or_else(|| "–".into()),
                p.rss_bytes
                    .map(|b| format!("{:.1}", b as f64 / 1048576.0))
                    .unwrap_or_else(|| "–".into()),
            );
        }
        if let Some(h) = self.path("handover") {
            for base in ["direct", "nginx"] {
                let Some(b) = self.path(base) else { continue };
                let _ = writeln!(
                    out,
                    "handover vs {base:<6}: p50 {} ({:+} µs), p99 {} ({:+} µs), deliveries/s {}{}",
                    ratio(h.percentile(0.5) as f64, b.percentile(0.5) as f64),
                    h.percentile(0.5) as i64 - b.percentile(0.5) as i64,
                    ratio(h.percentile(0.99) as f64, b.percentile(0.99) as f64),
                    h.percentile(0.99) as i64 - b.percentile(0.99) as i64,
                    ratio(h.deliveries_per_s, b.deliveries_per_s),
                    match (h.cpu_s_per_million(), b.cpu_s_per_million()) {
                        (Some(ours), Some(theirs)) =>
                            format!(", CPU per delivery {}", ratio(ours, theirs)),
                        _ => String::new(),
                    }
                );
            }
        }
        for (clients, per_client) in &self.idle {
            let _ = writeln!(
                out,
                "idle memory: {} per client at {clients} clients",
                per_client
                    .map(|b| format!("{:.1} KiB", b as f64 / 1024.0))
                    .unwrap_or_else(|| "not measured".into())
            );
        }
        if let Some(note) = &self.open_files_note {
            let _ = writeln!(out, "  ({note})");
        }
        if let Some(rate) = self.fanout_deliveries_per_s {
            let (delivered, offered) = self.fanout_delivered.unwrap_or_default();
            let _ = writeln!(
                out,
                "fan-out: {rate:.0} deliveries/s to {} clients of one topic ({delivered} of {offered} offered deliveries arrived)",
                self.fanout_clients
            );
        }
        if let Some(r) = &self.rotation {
            let mut sorted = r.durations_ms.clone();
            sorted.sort_by(f64::total_cmp);
            let _ = writeln!(
                out,
                "rotation under load: {} handovers, duration p50 {:.0} ms p99 {:.0} ms, {} deliveries, lost {}, duplicated {}, disconnects {}",
                r.handovers,
                pct_f(&sorted, 0.5),
                pct_f(&sorted, 0.99),
                r.deliveries,
                r.lost,
                r.duplicated,
                r.disconnects
            );
        }
        if let Some(r) = &self.rollout {
            let v = &r.verdict;
            let seconds = r.delivered.len() as f64 * handover::soak::rollout::BIN.as_secs_f64();
            let _ = writeln!(
                out,
                "rollout under load: 3 replicas restarted in turn, {:.0} deliveries/s on average; lost {}, duplicated {}, gap notices {}, peak channels {} of {}, clean exits {}/{}",
                r.delivered.iter().sum::<u64>() as f64 / seconds.max(1.0),
                v.lost,
                v.duplicated,
                v.gaps,
                r.peak_channels,
                r.budget,
                r.clean_exits,
                r.stopped
            );
        }
        for note in &self.notes {
            let _ = writeln!(out, "note: {note}");
        }
        out
    }

    pub fn json(&self) -> Value {
        let paths: serde_json::Map<String, Value> = self
            .paths
            .iter()
            .map(|p| (p.name.to_owned(), p.json()))
            .collect();
        let mut durations = self
            .rotation
            .as_ref()
            .map(|r| r.durations_ms.clone())
            .unwrap_or_default();
        durations.sort_by(f64::total_cmp);
        json!({
            "mode": self.mode,
            "machine": self.machine,
            "workload": self.workload,
            "paths": paths,
            "idle_rss_per_client_bytes": self.idle_per_client(10_000).or_else(|| self.idle.last().and_then(|(_, b)| *b)),
            "idle": self.idle.iter().map(|(n, b)| json!({"clients": n, "rss_per_client_bytes": b})).collect::<Vec<_>>(),
            "fanout_deliveries_per_s": self.fanout_deliveries_per_s,
            "fanout_delivered": self.fanout_delivered.map(|d| d.0),
            "fanout_offered": self.fanout_delivered.map(|d| d.1),
            "fanout_clients": self.fanout_clients,
            "handovers": self.rotation.as_ref().map(|r| r.handovers),
            "handover_p50_ms": (!durations.is_empty()).then(|| pct_f(&durations, 0.5)),
            "handover_p99_ms": (!durations.is_empty()).then(|| pct_f(&durations, 0.99)),
            "rotation_lost": self.rotation.as_ref().map(|r| r.lost),
            "rotation_duplicated": self.rotation.as_ref().map(|r| r.duplicated),
            "rotation_disconnects": self.rotation.as_ref().map(|r| r.disconnects),
            "rollout_lost": self.rollout.as_ref().map(|r| r.verdict.lost),
            "rollout_duplicated": self.rollout.as_ref().map(|r| r.verdict.duplicated),
            "rollout_gap_notices": self.rollout.as_ref().map(|r| r.verdict.gaps),
            "rollout_peak_channels": self.rollout.as_ref().map(|r| r.peak_channels),
            "rollout_delivered_per_bin": self.rollout.as_ref().map(|r| r.delivered.clone()),
            "rollout_marks": self.rollout.as_ref().map(|r| r.marks.iter().map(|m| json!({"at_s": m.at.as_secs_f64(), "what": m.what})).collect::<Vec<_>>()),
            "notes": self.notes,
        })
    }

    /// Writes load.json, the SVGs and index.html; returns the directory.
    pub fn write(&self) -> anyhow::Result<PathBuf> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-report");
        std::fs::create_dir_all(&dir)?;
        std::fs::write(
            dir.join("load.json"),
            serde_json::to_string_pretty(&self.json())?,
        )?;
        std::fs::write(dir.join("latency_cdf.svg"), self.cdf_svg())?;
        let mut images = vec!["latency_cdf.svg"];
        if let Some(r) = &self.rotation {
            std::fs::write(dir.join("rotation_timeline.svg"), timeline_svg(r))?;
            images.push("rotation_timeline.svg");
        }
        if let Some(r) = &self.rollout {
            std::fs::write(dir.join("rollout_timeline.svg"), rollout_svg(r))?;
            images.push("rollout_timeline.svg");
        }
        let mut html = String::from(
            "<!doctype html><meta charset=utf-8><title>handover load bench</title>\
             <style>body{font-family:sans-serif;margin:2em;max-width:1000px}pre{background:#f4f4f4;padding:1em}</style>\
             <h1>handover load bench</h1>",
        );
        let _ = write!(
            html,
            "<p>mode: {} — machine: {}</p><pre>{}</pre>",
            self.mode,
            self.machine,
            escape(&self.table())
        );
        for image in images {
            let _ = write!(html, "<p><img src=\"{image}\" alt=\"{image}\"></p>");
        }
        html.push_str("<p>All figures: <a href=\"load.json\">load.json</a></p>");
        std::fs::write(dir.join("index.html"), html)?;
        Ok(dir)
    }

    fn cdf_svg(&self) -> String {
        let mut svg = Svg::new(
            800.0,
            480.0,
            "Latency CDF per path (upstream send → client receive)",
        );
        let (x0, x1) = (1.0_f64, 6.0_f64); // 10 µs .. 1 s, log10 of µs
        let frame = svg.frame(0.0, 100.0, "percentile", x0, x1, "latency (log scale)");
        for (decade, label) in [
            (1.0, "10µs"),
            (2.0, "100µs"),
            (3.0, "1ms"),
            (4.0, "10ms"),
            (5.0, "100ms"),
            (6.0, "1s"),
        ] {
            svg.x_tick(&frame, decade, label);
        }
        for pct in [0.0, 25.0, 50.0, 75.0, 90.0, 100.0] {
            svg.y_tick(&frame, pct, &format!("{pct}%"));
        }
        for (i, p) in self.paths.iter().enumerate() {
            let n = p.latencies_us.len();
            if n == 0 {
                continue;
            }
            let points: Vec<(f64, f64)> = (0..=400)
                .map(|k| {
                    let q = k as f64 / 400.0;
                    let us = percentile(&p.latencies_us, q.max(1.0 / n as f64)).max(10) as f64;
                    (us.log10().clamp(x0, x1), q * 100.0)
                })
                .collect();
            svg.line(&frame, &points, COLORS[i % COLORS.len()], p.name, i);
        }
        svg.finish()
    }
}

fn pct_f(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

const COLORS: [&str; 4] = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"];

fn timeline_svg(r: &RotationResult) -> String {
    let mut svg = Svg::new(
        900.0,
        560.0,
        "Rotation under load: latency and delivered rate per second, handovers marked",
    );
    let seconds = r.timeline.last().map(|t| t.0 as f64 + 1.0).unwrap_or(1.0);
    let max_ms = r
        .timeline
        .iter()
        .map(|t| t.3 as f64 / 1000.0)
        .fold(1.0, f64::max)
        * 1.1;
    let max_rate = r.timeline.iter().map(|t| t.1 as f64).fold(1.0, f64::max) * 1.1;
    let top = svg.panel(
        Frame {
            left: 60.0,
            top: 50.0,
            width: 800.0,
            height: 200.0,
            y0: 0.0,
            y1: max_ms,
            x0: 0.0,
            x1: seconds,
        },
        "latency ms",
    );
    let bottom = svg.panel(
        Frame {
            left: 60.0,
            top: 320.0,
            width: 800.0,
            height: 180.0,
            y0: 0.0,
            y1: max_rate,
            x0: 0.0,
            x1: seconds,
        },
        "deliveries/s",
    );
    for f in [&top, &bottom] {
        // A handover completed after the last delivery would be drawn off the plot.
        for &mark in r
            .handover_marks
            .iter()
            .filter(|&&m| (0.0..=seconds).contains(&m))
        {
            svg.vline(f, mark);
        }
        let step = (seconds / 10.0).ceil().max(1.0);
        let mut s = 0.0;
        while s <= seconds {
            svg.x_tick(f, s, &format!("{s:.0}s"));
            s += step;
        }
    }
    for (v, label) in [
        (0.0, "0"),
        (max_ms / 2.0, &format!("{:.1}", max_ms / 2.0)[..]),
        (max_ms, &format!("{max_ms:.1}")[..]),
    ] {
        svg.y_tick(&top, v, label);
    }
    for (v, label) in [
        (0.0, "0".to_owned()),
        (max_rate / 2.0, format!("{:.0}", max_rate / 2.0)),
        (max_rate, format!("{max_rate:.0}")),
    ] {
        svg.y_tick(&bottom, v, &label);
    }
    let p50: Vec<(f64, f64)> = r
        .timeline
        .iter()
        .map(|t| (t.0 as f64 + 0.5, t.2 as f64 / 1000.0))
        .collect();
    let p99: Vec<(f64, f64)> = r
        .timeline
        .iter()
        .map(|t| (t.0 as f64 + 0.5, t.3 as f64 / 1000.0))
        .collect();
    let rate: Vec<(f64, f64)> = r
        .timeline
        .iter()
        .map(|t| (t.0 as f64 + 0.5, t.1 as f64))
        .collect();
    svg.line(&top, &p50, COLORS[0], "p50", 0);
    svg.line(&top, &p99, COLORS[1], "p99", 1);
    svg.line(&bottom, &rate, COLORS[2], "deliveries/s", 0);
    svg.legend_note(&bottom, "dashed: a handover completed");
    svg.finish()
}

/// The delivered rate through a rolling restart, each restart marked.
fn rollout_svg(r: &handover::soak::rollout::RolloutReport) -> String {
    let bin = handover::soak::rollout::BIN.as_secs_f64();
    let mut svg = Svg::new(
        900.0,
        360.0,
        "Rolling restart under load: deliveries/s to all desktops, restarts marked",
    );
    let seconds = (r.delivered.len() as f64 * bin).max(1.0);
    let max_rate = r
        .delivered
        .iter()
        .map(|&n| n as f64 / bin)
        .fold(1.0, f64::max)
        * 1.1;
    let frame = svg.panel(
        Frame {
            left: 60.0,
            top: 50.0,
            width: 800.0,
            height: 240.0,
            y0: 0.0,
            y1: max_rate,
            x0: 0.0,
            x1: seconds,
        },
        "deliveries/s",
    );
    for mark in r.marks.iter().filter(|m| m.what.starts_with("SIGTERM")) {
        svg.vline(&frame, mark.at.as_secs_f64());
    }
    let step = (seconds / 10.0).ceil().max(1.0);
    let mut s = 0.0;
    while s <= seconds {
        svg.x_tick(&frame, s, &format!("{s:.0}s"));
        s += step;
    }
    for (v, label) in [
        (0.0, "0".to_owned()),
        (max_rate / 2.0, format!("{:.0}", max_rate / 2.0)),
        (max_rate, format!("{max_rate:.0}")),
    ] {
        svg.y_tick(&frame, v, &label);
    }
    let rate: Vec<(f64, f64)> = r
        .delivered
        .iter()
        .enumerate()
        .map(|(i, &n)| ((i as f64 + 0.5) * bin, n as f64 / bin))
        .collect();
    svg.line(&frame, &rate, COLORS[2], "deliveries/s", 0);
    svg.legend_note(
        &frame,
        "dashed: a replica gets SIGTERM (its successor is ready)",
    );
    svg.finish()
}

/// A plotting frame: where data coordinates land on the canvas.
struct Frame {
    left: f64,
    top: f64,
    width: f64,
    height: f64,
    y0: f64,
    y1: f64,
    x0: f64,
    x1: f64,
}

impl Frame {
    fn at(&self, x: f64, y: f64) -> (f64, f64) {
        let px = self.left + (x - self.x0) / (self.x1 - self.x0) * self.width;
        let py = self.top + self.height
            - (y - self.y0) / (self.y1 - self.y0).max(f64::EPSILON) * self.height;
        (px, py)
    }
}

/// Just enough SVG for line charts.
struct Svg {
    body: String,
    width: f64,
    height: f64,
}

impl Svg {
    fn new(width: f64, height: f64, title: &str) -> Self {
        let mut body = String::new();
        let _ = write!(
            body,
            "<rect width=\"100%\" height=\"100%\" fill=\"white\"/><text x=\"{}\" y=\"24\" font-size=\"16\" text-anchor=\"middle\">{}</text>",
            width / 2.0,
            escape(title)
        );
        Self {
            body,
            width,
            height,
        }
    }

    fn frame(&mut self, y0: f64, y1: f64, y_label: &str, x0: f64, x1: f64, x_label: &str) -> Frame {
        let (w, h) = (self.width - 120.0, self.height - 110.0);
        let frame = self.panel(
            Frame {
                left: 70.0,
                top: 45.0,
                width: w,
                height: h,
                y0,
                y1,
                x0,
                x1,
            },
            y_label,
        );
        let _ = write!(
            self.body,
            "<text x=\"{}\" y=\"{}\" font-size=\"12\" text-anchor=\"middle\">{}</text>",
            70.0 + w / 2.0,
            45.0 + h + 40.0,
            escape(x_label)
        );
        frame
    }

    /// Draws the frame's box and its y label; returns the frame to plot into.
    fn panel(&mut self, frame: Frame, y_label: &str) -> Frame {
        let Frame {
            left,
            top,
            width,
            height,
            ..
        } = frame;
        let _ = write!(
            self.body,
            "<rect x=\"{left}\" y=\"{top}\" width=\"{width}\" height=\"{height}\" fill=\"none\" stroke=\"#888\"/>\
             <text x=\"{}\" y=\"{}\" font-size=\"12\" transform=\"rotate(-90 {} {})\" text-anchor=\"middle\">{}</text>",
            left - 48.0,
            top + height / 2.0,
            left - 48.0,
            top + height / 2.0,
            escape(y_label)
        );
        frame
    }

    fn x_tick(&mut self, f: &Frame, x: f64, label: &str) {
        let (px, py) = f.at(x, f.y0);
        let _ = write!(
            self.body,
            "<line x1=\"{px:.1}\" y1=\"{:.1}\" x2=\"{px:.1}\" y2=\"{py:.1}\" stroke=\"#eee\"/>\
             <text x=\"{px:.1}\" y=\"{:.1}\" font-size=\"11\" text-anchor=\"middle\">{}</text>",
            f.top,
            py + 15.0,
            escape(label)
        );
    }

    fn y_tick(&mut self, f: &Frame, y: f64, label: &str) {
        let (px, py) = f.at(f.x0, y);
        let _ = write!(
            self.body,
            "<line x1=\"{px:.1}\" y1=\"{py:.1}\" x2=\"{:.1}\" y2=\"{py:.1}\" stroke=\"#eee\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" font-size=\"11\" text-anchor=\"end\">{}</text>",
            f.left + f.width,
            px - 4.0,
            py + 4.0,
            escape(label)
        );
    }

    fn vline(&mut self, f: &Frame, x: f64) {
        let (px, _) = f.at(x, f.y0);
        let _ = write!(
            self.body,
            "<line x1=\"{px:.1}\" y1=\"{:.1}\" x2=\"{px:.1}\" y2=\"{:.1}\" stroke=\"#999\" stroke-dasharray=\"4 3\"/>",
            f.top,
            f.top + f.height
        );
    }

    fn line(&mut self, f: &Frame, points: &[(f64, f64)], color: &str, label: &str, index: usize) {
        let path: Vec<String> = points
            .iter()
            .map(|&(x, y)| {
                let (px, py) = f.at(x, y);
                format!("{px:.1},{py:.1}")
            })
            .collect();
        let _ = write!(
            self.body,
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>\
             <rect x=\"{:.1}\" y=\"{:.1}\" width=\"12\" height=\"3\" fill=\"{color}\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" font-size=\"12\">{}</text>",
            path.join(" "),
            f.left + 10.0,
            f.top + 12.0 + index as f64 * 16.0,
            f.left + 28.0,
            f.top + 16.0 + index as f64 * 16.0,
            escape(label)
        );
    }

    fn legend_note(&mut self, f: &Frame, note: &str) {
        let _ = write!(
            self.body,
            "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"11\" fill=\"#555\">{}</text>",
            f.left,
            f.top + f.height + 32.0,
            escape(note)
        );
    }

    fn finish(self) -> String {
        format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{}\" viewBox=\"0 0 {} {}\">{}</svg>\n",
            self.width, self.height, self.width, self.height, self.body
        )
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
