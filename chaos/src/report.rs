//! The run's report: `report.json` (everything the checks used) and a self-contained
//! `report.html` whose charts are SVG drawn with plotters.
//!
//! In the timeline, every fault is a circle and nothing else is, so a reader (or the page test)
//! can count the faults in the picture; interruptions are triangles and commits are crosses.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use anyhow::Result;
use plotters::prelude::*;

use crate::run::RunResult;
use ckpt_chaos::simulate::Summary;

const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(23, 190, 207),
];

fn err(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("drawing a chart: {e}")
}

/// Faults by category, in a stable order.
pub fn by_category(r: &RunResult) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for f in r.faults.iter().filter(|f| f.unix_ms.is_some()) {
        *m.entry(f.planned.category.clone()).or_default() += 1;
    }
    m
}

fn timeline(r: &RunResult) -> Result<String> {
    let mut svg = String::new();
    let cats: Vec<String> = by_category(r).into_keys().collect();
    let t0 = r.started_unix_ms as f64;
    let secs = |ms: u64| (ms as f64 - t0) / 1e3;
    let end = r.wall_s.max(1.0);
    {
        let root = SVGBackend::with_string(&mut svg, (1000, 200 + 40 * cats.len() as u32)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let lanes = cats.len() as f64 + 2.0;
        let mut chart = ChartBuilder::on(&root)
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(10)
            .caption(
                "Timeline: faults (circles) by category, interruptions (triangles), commits (crosses)",
                ("sans-serif", 16),
            )
            .build_cartesian_2d(0.0..end, 0.0..lanes)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("seconds since the harness started")
            .disable_y_mesh()
            .y_labels(0)
            .draw()
            .map_err(err)?;
        let commits: Vec<(f64, f64)> =
            r.commits_unix_ms.iter().copied().map(|ms| (secs(ms), 0.5)).filter(|(x, _)| *x >= 0.0).collect();
        // Legend markers are squares: circles in this chart are faults and nothing else.
        let square =
            |c: RGBColor| move |(x, y): (i32, i32)| Rectangle::new([(x - 5, y - 5), (x + 5, y + 5)], c.filled());
        chart
            .draw_series(commits.iter().map(|&p| Cross::new(p, 4, BLACK.stroke_width(1))))
            .map_err(err)?
            .label("checkpoint committed")
            .legend(square(BLACK));
        let interruptions: Vec<(f64, f64)> = r.goodput["interruptions"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|i| i["detected_unix_ms"].as_u64())
            .map(|ms| (secs(ms), 1.5))
            .collect();
        chart
            .draw_series(interruptions.iter().map(|&p| TriangleMarker::new(p, 6, RED.filled())))
            .map_err(err)?
            .label("interruption detected")
            .legend(square(RED));
        for (k, cat) in cats.iter().enumerate() {
            let color = PALETTE[k % PALETTE.len()];
            let pts: Vec<(f64, f64)> = r
                .faults
                .iter()
                .filter(|f| &f.planned.category == cat)
                .filter_map(|f| f.unix_ms)
                .map(|ms| (secs(ms), k as f64 + 2.5))
                .collect();
            chart
                .draw_series(pts.iter().map(|&p| Circle::new(p, 6, color.filled())))
                .map_err(err)?
                .label(format!("fault: {cat}"))
                .legend(square(color));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(err)?;
        root.present().map_err(err)?;
    }
    Ok(svg)
}

fn loss_curve(r: &RunResult) -> Result<String> {
    let mut svg = String::new();
    let pts: Vec<(f64, f64)> = r.goodput["losses"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| Some((p[0].as_f64()?, p[1].as_f64()?)))
        .collect();
    {
        let root = SVGBackend::with_string(&mut svg, (1000, 320)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let (xmax, ymax) = pts.iter().fold((1.0f64, 0.1f64), |a, p| (a.0.max(p.0), a.1.max(p.1)));
        let mut chart = ChartBuilder::on(&root)
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(50)
            .caption("Training loss of the steps the final weights descend from", ("sans-serif", 16))
            .build_cartesian_2d(0.0..xmax, 0.0..ymax * 1.05)
            .map_err(err)?;
        chart.configure_mesh().x_desc("step").y_desc("loss").draw().map_err(err)?;
        chart.draw_series(LineSeries::new(pts, PALETTE[0].stroke_width(2))).map_err(err)?;
        root.present().map_err(err)?;
    }
    Ok(svg)
}

fn bars(title: &str, ylabel: &str, items: &[(String, f64)]) -> Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (1000, 340)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let ymax = items.iter().map(|i| i.1).fold(1.0f64, f64::max) * 1.1;
        let n = items.len().max(1);
        let mut chart = ChartBuilder::on(&root)
            .margin(10)
            .x_label_area_size(60)
            .y_label_area_size(60)
            .caption(title, ("sans-serif", 16))
            .build_cartesian_2d(0.0..n as f64, 0.0..ymax)
            .map_err(err)?;
        chart.configure_mesh().disable_x_mesh().x_labels(0).y_desc(ylabel).draw().map_err(err)?;
        chart
            .draw_series(items.iter().enumerate().map(|(k, (_, v))| {
                Rectangle::new([(k as f64 + 0.15, 0.0), (k as f64 + 0.85, *v)], PALETTE[k % PALETTE.len()].filled())
            }))
            .map_err(err)?;
        let style = ("sans-serif", 13).into_font().color(&BLACK);
        chart
            .draw_series(items.iter().enumerate().map(|(k, (name, v))| {
                Text::new(format!("{name} ({v:.1})"), (k as f64 + 0.15, v + ymax * 0.03), style.clone())
            }))
            .map_err(err)?;
        root.present().map_err(err)?;
    }
    Ok(svg)
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

pub fn html(r: &RunResult) -> Result<String> {
    let cats: Vec<(String, f64)> = by_category(r).into_iter().map(|(k, v)| (k, v as f64)).collect();
    let ints: Vec<&serde_json::Value> =
        r.goodput["interruptions"].as_array().map(|a| a.iter().collect()).unwrap_or_default();
    let detect: Vec<(String, f64)> = ints
        .iter()
        .enumerate()
        .map(|(k, i)| (format!("#{k}"), i["detection_ms"].as_f64().unwrap_or(0.0) / 1e3))
        .collect();
    let recover: Vec<(String, f64)> = ints
        .iter()
        .enumerate()
        .map(|(k, i)| {
            let ms = i["restart_ms"].as_f64().unwrap_or(0.0) + i["restore_ms"].as_f64().unwrap_or(0.0);
            (format!("#{k}"), ms / 1e3)
        })
        .collect();
    let charts = [
        ("chart-timeline", timeline(r)?),
        ("chart-loss", loss_curve(r)?),
        ("chart-categories", bars("Faults by category", "faults", &cats)?),
        ("chart-detection", bars("Detection time per interruption", "seconds", &detect)?),
        ("chart-recovery", bars("Restart and restore time per interruption", "seconds", &recover)?),
    ];
    let eff = r.goodput["effective_training_time_pct"].as_f64().unwrap_or(0.0);
    let lost: u64 = ints.iter().filter_map(|i| i["steps_lost"].as_u64()).sum();
    let mut h = String::new();
    let _ = write!(
        h,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>ckpt chaos report</title>\
         <style>body{{font-family:sans-serif;max-width:1040px;margin:2em auto;color:#222}}\
         table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:3px 8px;text-align:left}}\
         .bad{{color:#b00;font-weight:bold}}.ok{{color:#070;font-weight:bold}}</style></head><body>\
         <h1>ckpt chaos run</h1><p>seed {seed}, {faults} faults, {ints} interruptions, {lost} steps lost, \
         effective training time <b>{eff:.1}%</b>, wall {wall:.0} s.</p>",
        seed = r.options.schedule.seed,
        faults = r.faults.iter().filter(|f| f.unix_ms.is_some()).count(),
        ints = ints.len(),
        wall = r.wall_s,
    );
    if r.violations.is_empty() {
        h.push_str("<p class=\"ok\" id=\"verdict\">No violations: every check passed.</p>");
    } else {
        let _ = write!(h, "<p class=\"bad\" id=\"verdict\">{} violation(s):</p><ul>", r.violations.len());
        for v in &r.violations {
            let _ = write!(h, "<li>{}</li>", esc(v));
        }
        h.push_str("</ul>");
    }
    for (id, svg) in &charts {
        let _ = write!(h, "<figure id=\"{id}\">{svg}</figure>");
    }
    h.push_str("<h2>Faults</h2><table id=\"faults\"><tr><th>step</th><th>component</th><th>category</th><th>fault</th><th>what happened</th></tr>");
    for f in &r.faults {
        let _ = write!(
            h,
            "<tr class=\"fault\"><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            f.planned.step,
            esc(&f.planned.component),
            esc(&f.planned.category),
            f.planned.fault.name(),
            esc(&f.what)
        );
    }
    h.push_str("</table><h2>Interruptions</h2><table id=\"interruptions\"><tr><th>cause</th><th>last step</th><th>resumed from</th><th>detection ms</th><th>restart ms</th><th>restore ms</th></tr>");
    for i in &ints {
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(i["cause"].as_str().unwrap_or("")),
            i["last_step"],
            i["resumed_from"],
            i["detection_ms"],
            i["restart_ms"],
            i["restore_ms"]
        );
    }
    let _ = write!(
        h,
        "</table><h2>Resources</h2><p>ckptd peak RSS {} MiB (limit {} MiB), open files {} (limit {}); \
         store {} MiB, ckptd state {} MiB.</p></body></html>",
        r.samples.ckptd_rss_bytes_max >> 20,
        r.options.ckptd_rss_bytes_max >> 20,
        r.samples.ckptd_open_files_max,
        r.options.ckptd_open_files_max,
        r.samples.store_bytes >> 20,
        r.samples.state_bytes >> 20
    );
    Ok(h)
}

/// The simulator's table and chart (effective training time against the interval).
pub fn simulation_html(
    base: &Summary,
    measured: Option<&Summary>,
    sweep: &[(f64, f64)],
    sweep_measured: &[(f64, f64)],
) -> Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (1000, 380)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let all: Vec<&(f64, f64)> = sweep.iter().chain(sweep_measured).collect();
        let (xlo, xhi) = all.iter().fold((f64::MAX, 0.0f64), |a, p| (a.0.min(p.0), a.1.max(p.0)));
        let (ylo, yhi) = all.iter().fold((100.0f64, 0.0f64), |a, p| (a.0.min(p.1), a.1.max(p.1)));
        let mut chart = ChartBuilder::on(&root)
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(50)
            .caption("Effective training time against the checkpoint interval (simulated)", ("sans-serif", 16))
            .build_cartesian_2d((xlo.max(1.0)..xhi.max(2.0)).log_scale(), (ylo - 1.0).max(0.0)..(yhi + 1.0).min(100.0))
            .map_err(err)?;
        chart.configure_mesh().x_desc("checkpoint interval, s (log)").y_desc("effective %").draw().map_err(err)?;
        chart
            .draw_series(LineSeries::new(sweep.to_vec(), PALETTE[0].stroke_width(2)))
            .map_err(err)?
            .label("paper's figures")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], PALETTE[0]));
        if !sweep_measured.is_empty() {
            chart
                .draw_series(LineSeries::new(sweep_measured.to_vec(), PALETTE[1].stroke_width(2)))
                .map_err(err)?
                .label("ckpt's measured stall and restore")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], PALETTE[1]));
        }
        chart.configure_series_labels().background_style(WHITE).border_style(BLACK).draw().map_err(err)?;
        root.present().map_err(err)?;
    }
    let mut h = String::from(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>ckpt goodput simulation</title>\
         <style>body{font-family:sans-serif;max-width:1040px;margin:2em auto}td,th{border:1px solid #ccc;padding:3px 8px}\
         table{border-collapse:collapse}</style></head><body><h1>Goodput at cluster scale</h1><table id=\"scenarios\">\
         <tr><th>scenario</th><th>stall s</th><th>restore s</th><th>interval s</th><th>effective % (mean, min-max)</th></tr>",
    );
    for s in std::iter::once(base).chain(measured) {
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{:.2}</td><td>{:.2}</td><td>{:.0}</td><td>{:.2} ({:.2}-{:.2})</td></tr>",
            esc(&s.scenario.name),
            s.scenario.stall_s,
            s.scenario.restore_s,
            s.scenario.interval_s,
            s.effective_pct_mean,
            s.effective_pct_min,
            s.effective_pct_max
        );
    }
    let _ = write!(h, "</table><figure id=\"chart-sweep\">{svg}</figure><h2>Sources</h2><ul>");
    for (k, v) in &base.scenario.sources {
        let _ = write!(h, "<li><b>{}</b>: {}</li>", esc(k), esc(v));
    }
    h.push_str("</ul></body></html>");
    Ok(h)
}
