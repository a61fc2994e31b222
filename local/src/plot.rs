//! `switchyard run --plot FILE.svg`: lag and replicas of every unit over the run, one panel per unit,
//! so that a person sees how the pipeline scaled.

use std::fmt::Write as _;

use crate::scaling::Point;
use crate::summary::Summary;
use switchyard_crds::topology::UnitType;

const WIDTH: f64 = 960.0;
const PANEL: f64 = 150.0;
const GAP: f64 = 46.0;
const LEFT: f64 = 72.0;
const RIGHT: f64 = 64.0;
const TOP: f64 = 64.0;
const LAG_COLOUR: &str = "#2563eb";
const REPLICA_COLOUR: &str = "#ea580c";

/// The plot as an SVG document.
pub fn render(summary: &Summary) -> String {
    // In the Pipeline's order: sources, stages, sinks.
    let units: Vec<(&String, &Vec<Point>)> = summary
        .units
        .iter()
        .filter_map(|u| summary.timeline.get_key_value(&u.name))
        .collect();
    let height = TOP + units.len() as f64 * (PANEL + GAP) + 10.0;
    let end = summary
        .timeline
        .values()
        .flat_map(|points| points.iter().map(|p| p.t))
        .fold(summary.wall_seconds, f64::max)
        .max(1.0);
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height:.0}" viewBox="0 0 {WIDTH} {height:.0}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        svg,
        r#"<text x="{LEFT}" y="24" font-size="16" font-weight="bold">{}: lag and replicas per unit</text>"#,
        escape(&summary.pipeline)
    );
    let _ = writeln!(
        svg,
        r#"<line x1="{LEFT}" y1="42" x2="{}" y2="42" stroke="{LAG_COLOUR}" stroke-width="2"/><text x="{}" y="46">lag (messages pending or unacknowledged)</text>"#,
        LEFT + 24.0,
        LEFT + 30.0
    );
    let _ = writeln!(
        svg,
        r#"<line x1="{}" y1="42" x2="{}" y2="42" stroke="{REPLICA_COLOUR}" stroke-width="2"/><text x="{}" y="46">replicas running</text><line x1="{}" y1="42" x2="{}" y2="42" stroke="{REPLICA_COLOUR}" stroke-width="1.5" stroke-dasharray="4 3"/><text x="{}" y="46">replicas wanted</text>"#,
        LEFT + 320.0,
        LEFT + 344.0,
        LEFT + 350.0,
        LEFT + 470.0,
        LEFT + 494.0,
        LEFT + 500.0
    );
    for (i, (unit, points)) in units.iter().enumerate() {
        let top = TOP + i as f64 * (PANEL + GAP) + 18.0;
        panel(&mut svg, summary, unit, points, top, end);
    }
    svg.push_str("</svg>\n");
    svg
}

fn panel(svg: &mut String, summary: &Summary, unit: &str, points: &[Point], top: f64, end: f64) {
    let limit = summary.switchers.get(unit).map(|s| s.max_replicas as usize);
    let max_replicas = points
        .iter()
        .map(|p| p.replicas.max(p.desired))
        .chain(limit)
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let scales = Scales {
        top,
        end,
        max_lag: nice(points.iter().filter_map(|p| p.lag).max().unwrap_or(0) as f64).max(4.0),
        max_replicas,
    };
    let _ = writeln!(
        svg,
        r#"<text x="{LEFT}" y="{:.1}" font-weight="bold">{}</text>"#,
        top - 6.0,
        escape(&title(summary, unit))
    );
    let _ = writeln!(
        svg,
        r##"<rect x="{LEFT}" y="{top:.1}" width="{:.1}" height="{PANEL}" fill="none" stroke="#9ca3af"/>"##,
        scales.width()
    );
    scales.axes(svg, points.iter().any(|p| p.lag.is_some()));
    if let Some(limit) = limit {
        let yy = scales.y_replicas(limit as f64);
        let _ = writeln!(
            svg,
            r#"<line x1="{LEFT}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="{REPLICA_COLOUR}" stroke-opacity="0.35" stroke-dasharray="1 3"/><text x="{:.1}" y="{:.1}" fill="{REPLICA_COLOUR}" fill-opacity="0.7" text-anchor="end">maxReplicas</text>"#,
            LEFT + scales.width(),
            LEFT + scales.width() - 4.0,
            yy - 4.0
        );
    }
    scales.lines(svg, points);
    for event in summary.scale_events.iter().filter(|e| e.unit == unit) {
        let _ = writeln!(
            svg,
            r#"<path d="M{:.1},{:.1} l-4,-7 h8 z" fill="{REPLICA_COLOUR}"><title>{:.1}s: {}</title></path>"#,
            scales.x(event.t),
            top - 1.0,
            event.t,
            escape(&event.reason)
        );
    }
}

fn title(summary: &Summary, unit: &str) -> String {
    let kind = summary
        .units
        .iter()
        .find(|u| u.name == unit)
        .and_then(|u| u.kind)
        .map_or("unit", UnitType::as_str);
    match summary.switchers.get(unit) {
        Some(s) => format!(
            "{unit} ({kind}: {}..{} replicas, target lag {} per replica)",
            s.min_replicas, s.max_replicas, s.target_lag_per_replica
        ),
        None => format!("{unit} ({kind})"),
    }
}

/// Where a panel puts time, lag and replicas.
struct Scales {
    top: f64,
    end: f64,
    max_lag: f64,
    max_replicas: f64,
}

impl Scales {
    fn width(&self) -> f64 {
        WIDTH - LEFT - RIGHT
    }

    fn bottom(&self) -> f64 {
        self.top + PANEL
    }

    fn x(&self, t: f64) -> f64 {
        LEFT + t / self.end * self.width()
    }

    fn y_lag(&self, lag: f64) -> f64 {
        self.bottom() - lag / self.max_lag * PANEL
    }

    fn y_replicas(&self, r: f64) -> f64 {
        self.bottom() - r / (self.max_replicas + 0.5) * PANEL
    }

    /// Lag on the left, replicas on the right, seconds below.
    fn axes(&self, svg: &mut String, has_lag: bool) {
        for k in 0..=4 {
            let value = self.max_lag * f64::from(k) / 4.0;
            let yy = self.y_lag(value);
            let _ = writeln!(
                svg,
                r##"<line x1="{LEFT}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="#e5e7eb"/>"##,
                LEFT + self.width(),
            );
            if has_lag {
                let _ = writeln!(
                    svg,
                    r#"<text x="{:.1}" y="{:.1}" text-anchor="end" fill="{LAG_COLOUR}">{}</text>"#,
                    LEFT - 6.0,
                    yy + 4.0,
                    short(value)
                );
            }
        }
        let step = ((self.max_replicas / 5.0).ceil()).max(1.0);
        let mut r = 0.0;
        while r <= self.max_replicas {
            let _ = writeln!(
                svg,
                r#"<text x="{:.1}" y="{:.1}" fill="{REPLICA_COLOUR}">{r:.0}</text>"#,
                LEFT + self.width() + 6.0,
                self.y_replicas(r) + 4.0
            );
            r += step;
        }
        for k in 0..=6 {
            let t = self.end * f64::from(k) / 6.0;
            let _ = writeln!(
                svg,
                r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" fill="#4b5563">{t:.0}s</text>"##,
                self.x(t),
                self.bottom() + 16.0
            );
        }
    }

    /// The lag line, and the replicas running and wanted as steps.
    fn lines(&self, svg: &mut String, points: &[Point]) {
        let lag_points: Vec<String> = points
            .iter()
            .filter_map(|p| {
                p.lag
                    .map(|lag| format!("{:.1},{:.1}", self.x(p.t), self.y_lag(lag as f64)))
            })
            .collect();
        if !lag_points.is_empty() {
            let _ = writeln!(
                svg,
                r#"<polyline fill="none" stroke="{LAG_COLOUR}" stroke-width="1.6" points="{}"/>"#,
                lag_points.join(" ")
            );
        }
        let steps = |value: fn(&Point) -> usize| -> String {
            let mut out = Vec::new();
            let mut previous: Option<usize> = None;
            for p in points {
                let v = value(p);
                if let Some(prev) = previous {
                    out.push(format!(
                        "{:.1},{:.1}",
                        self.x(p.t),
                        self.y_replicas(prev as f64)
                    ));
                }
                out.push(format!(
                    "{:.1},{:.1}",
                    self.x(p.t),
                    self.y_replicas(v as f64)
                ));
                previous = Some(v);
            }
            out.join(" ")
        };
        let _ = writeln!(
            svg,
            r#"<polyline fill="none" stroke="{REPLICA_COLOUR}" stroke-width="2" points="{}"/>"#,
            steps(|p| p.replicas)
        );
        let _ = writeln!(
            svg,
            r#"<polyline fill="none" stroke="{REPLICA_COLOUR}" stroke-width="1.5" stroke-dasharray="4 3" points="{}"/>"#,
            steps(|p| p.desired)
        );
    }
}

/// A round upper bound for an axis.
fn nice(max: f64) -> f64 {
    if max <= 0.0 {
        return 1.0;
    }
    let magnitude = 10f64.powf(max.log10().floor());
    for factor in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if factor * magnitude >= max {
            return factor * magnitude;
        }
    }
    10.0 * magnitude
}

fn short(value: f64) -> String {
    if value >= 1_000_000.0 {
        format!("{:.1}M", value / 1_000_000.0)
    } else if value >= 10_000.0 {
        format!("{:.0}k", value / 1000.0)
    } else if value >= 1000.0 {
        format!("{:.1}k", value / 1000.0)
    } else {
        format!("{value:.0}")
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axes_get_round_bounds() {
        assert_eq!(nice(0.0), 1.0);
        assert_eq!(nice(7.0), 10.0);
        assert_eq!(nice(1800.0), 2000.0);
        assert_eq!(nice(2300.0), 2500.0);
        assert_eq!(short(2500.0), "2.5k");
        assert_eq!(short(25_000.0), "25k");
    }
}
