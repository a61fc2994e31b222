//! Live progress of a local run: bars on a terminal, plain periodic lines otherwise.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use switchyard_crds::topology::UnitType;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ProgressMode {
    /// Bars on a terminal, plain lines otherwise.
    Auto,
    Bars,
    Lines,
    None,
}

/// One unit's state, as shown.
#[derive(Clone, Debug, Default)]
pub struct Row {
    pub unit: String,
    pub kind: Option<UnitType>,
    pub replicas: usize,
    /// Inputs finished (for a source: messages stored).
    pub processed: u64,
    /// Outputs stored downstream, or written by a sink.
    pub published: u64,
    /// Pending plus unacknowledged messages of the unit's consumer.
    pub lag: Option<u64>,
    pub dead_lettered: u64,
    /// How many a finite source will produce, when known.
    pub total: Option<u64>,
    pub finished: bool,
}

pub struct Display {
    mode: ProgressMode,
    multi: Option<MultiProgress>,
    header: Option<ProgressBar>,
    bars: Vec<ProgressBar>,
    last_lines: Option<Instant>,
}

/// Plain lines are printed this often.
const LINES_EVERY: Duration = Duration::from_secs(2);

impl Display {
    pub fn new(mode: ProgressMode, units: usize) -> Display {
        let mode = match mode {
            ProgressMode::Auto if std::io::stderr().is_terminal() => ProgressMode::Bars,
            ProgressMode::Auto => ProgressMode::Lines,
            other => other,
        };
        let (multi, header, bars) = if mode == ProgressMode::Bars {
            let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(8));
            let style = ProgressStyle::with_template("{msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar());
            let header = multi.add(ProgressBar::new_spinner().with_style(style.clone()));
            let bars = (0..units)
                .map(|_| multi.add(ProgressBar::new_spinner().with_style(style.clone())))
                .collect();
            (Some(multi), Some(header), bars)
        } else {
            (None, None, Vec::new())
        };
        Display {
            mode,
            multi,
            header,
            bars,
            last_lines: None,
        }
    }

    /// One bar per unit, after an edit added or removed units.
    pub fn resize(&mut self, units: usize) {
        let Some(multi) = &self.multi else {
            return;
        };
        let style =
            ProgressStyle::with_template("{msg}").unwrap_or_else(|_| ProgressStyle::default_bar());
        while self.bars.len() < units {
            self.bars
                .push(multi.add(ProgressBar::new_spinner().with_style(style.clone())));
        }
        while self.bars.len() > units {
            if let Some(bar) = self.bars.pop() {
                bar.finish_and_clear();
                multi.remove(&bar);
            }
        }
    }

    pub fn update(&mut self, elapsed: Duration, rows: &[Row]) {
        let width = rows.iter().map(|r| r.unit.len()).max().unwrap_or(4).max(4);
        match self.mode {
            ProgressMode::Bars => {
                if let Some(header) = &self.header {
                    header.set_message(format!(
                        "{:>6.1}s  {}",
                        elapsed.as_secs_f64(),
                        heading(width)
                    ));
                }
                for (bar, row) in self.bars.iter().zip(rows) {
                    bar.set_message(format!("         {}", format_row(row, width)));
                }
            }
            ProgressMode::Lines => {
                if self.last_lines.is_some_and(|t| t.elapsed() < LINES_EVERY) {
                    return;
                }
                self.last_lines = Some(Instant::now());
                let mut block = format!("[{:>6.1}s] {}\n", elapsed.as_secs_f64(), heading(width));
                for row in rows {
                    block.push_str(&format!("           {}\n", format_row(row, width)));
                }
                eprint!("{block}");
            }
            ProgressMode::Auto | ProgressMode::None => {}
        }
    }

    /// A line on stderr, above the bars.
    pub fn note(&self, text: &str) {
        match &self.multi {
            Some(multi) => {
                let _ = multi.println(text);
            }
            None => eprintln!("{text}"),
        }
    }

    /// A line on stdout (what a log sink prints), without tearing the bars.
    pub fn output(&self, text: &str) {
        match &self.multi {
            Some(multi) => multi.suspend(|| println!("{text}")),
            None => println!("{text}"),
        }
    }

    /// Shows the final state once more and leaves the terminal clean for the summary.
    pub fn finish(&mut self, elapsed: Duration, rows: &[Row]) {
        if self.mode == ProgressMode::Lines {
            self.last_lines = None;
        }
        self.update(elapsed, rows);
        for bar in self.bars.iter().chain(self.header.iter()) {
            bar.finish_and_clear();
        }
        if let Some(multi) = &self.multi {
            let _ = multi.clear();
        }
    }
}

fn heading(width: usize) -> String {
    format!(
        "{:<width$}  {:<8} {:>4} {:>15} {:>10} {:>8} {:>6}",
        "unit", "kind", "×", "in", "out", "lag", "dead"
    )
}

fn format_row(row: &Row, width: usize) -> String {
    let source = row.kind == Some(UnitType::Source);
    let input = match (source, row.total) {
        (true, Some(total)) => format!("{}/{}", thousands(row.processed), thousands(total)),
        (true, None) => "-".to_string(),
        (false, _) => thousands(row.processed),
    };
    let output = if source {
        thousands(row.processed)
    } else {
        thousands(row.published)
    };
    let lag = row.lag.map(thousands).unwrap_or_else(|| "-".to_string());
    let state = if row.finished { "  done" } else { "" };
    format!(
        "{:<width$}  {:<8} {:>4} {:>15} {:>10} {:>8} {:>6}{state}",
        row.unit,
        row.kind.map_or("-", UnitType::as_str),
        row.replicas,
        input,
        output,
        lag,
        thousands(row.dead_lettered),
    )
}

pub use switchyard_ops::thousands;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_are_separated() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(1234567), "1,234,567");
    }

    #[test]
    fn rows_line_up() {
        let row = Row {
            unit: "person".into(),
            kind: Some(UnitType::Group),
            replicas: 1,
            processed: 1500,
            published: 1500,
            lag: Some(12),
            ..Row::default()
        };
        let text = format_row(&row, 8);
        assert_eq!(text.chars().count(), heading(8).chars().count());
        assert!(text.starts_with("person    group"), "{text}");
    }
}
