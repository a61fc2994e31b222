//! A Pipeline's books read off NATS (`switchyard_crds::books`), and each edge's state now: settled
//! (its reader has nothing pending), so its two ends must agree, or with items on their way.

use std::time::Duration;

use serde::Serialize;
use switchyard_crds::books::{self, Books, Edge};

use crate::target::{OpsError, Target};

/// The books as stored now.
pub async fn read(target: &Target) -> Result<Books, OpsError> {
    let books = &target.layout.nats.books;
    let read = switchyard_platform::books::read(&target.js, &books.name, &books.filter())
        .await
        .map_err(|e| OpsError::Nats {
            action: "read the Pipeline's books".to_string(),
            source: Box::new(e),
        })?;
    Ok(read.books(&books.root))
}

/// One edge now.
#[derive(Clone, Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EdgeNow {
    #[serde(flatten)]
    pub edge: Edge,
    /// Its reader had nothing pending or unacknowledged, before and after the books were read, and
    /// took nothing new meanwhile: out and in must agree.
    pub settled: bool,
}

impl EdgeNow {
    /// Items stored on the edge and not yet taken in (while it is not settled).
    pub fn on_its_way(&self) -> u64 {
        self.edge.out.saturating_sub(self.edge.received)
    }

    pub fn balanced(&self) -> bool {
        !self.settled || self.edge.out == self.edge.received
    }
}

/// The books and every edge, each with whether it is settled.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BooksNow {
    pub books: Books,
    pub edges: Vec<EdgeNow>,
    /// Units that took in a different number of items than they accounted for.
    pub unaccounted: Vec<String>,
}

impl BooksNow {
    /// What does not balance, said as `switchyard_crds::books::Imbalance` says it.
    pub fn problems(&self) -> Vec<String> {
        self.edges
            .iter()
            .filter(|e| !e.balanced())
            .map(|e| books::Imbalance::Edge(e.edge.clone()).to_string())
            .chain(self.unaccounted.iter().cloned())
            .collect()
    }
}

/// How long `now` waits before it reads again an edge that looks unbalanced: a record of what was
/// stored can be stored a moment after what it records was taken in.
const LOOK_AGAIN_AFTER: Duration = Duration::from_secs(2);

/// The books now, with every edge settled or not. An edge that does not balance although settled
/// is read again a moment later, and reported only if it still does not.
pub async fn now(target: &Target) -> Result<BooksNow, OpsError> {
    let mut found = once(target).await?;
    if !found.problems().is_empty() {
        tokio::time::sleep(LOOK_AGAIN_AFTER).await;
        let again = once(target).await?;
        for edge in &mut found.edges {
            let same = again.edges.iter().any(|e| e == edge);
            edge.settled = edge.settled && same;
        }
        found.unaccounted.retain(|u| again.unaccounted.contains(u));
    }
    Ok(found)
}

async fn once(target: &Target) -> Result<BooksNow, OpsError> {
    let before = idle_readers(target).await?;
    let books = read(target).await?;
    let after = idle_readers(target).await?;
    let settled = |reader: &str| {
        let at = |idle: &[(String, u64)]| {
            idle.iter()
                .find(|(unit, _)| unit == reader)
                .map(|(_, seq)| *seq)
        };
        matches!((at(&before), at(&after)), (Some(a), Some(b)) if a == b)
    };
    // What each unit reads now (a migrated Pipeline's units read subjects of later epochs).
    let wiring = books::wiring(&target.layout.units);
    let edges = books
        .edges(&wiring)
        .into_iter()
        .map(|edge| EdgeNow {
            settled: settled(&edge.to),
            edge,
        })
        .collect();
    let unaccounted = books::check(&wiring, &books)
        .into_iter()
        .filter(|i| matches!(i, books::Imbalance::Unit { unit, .. } if settled(unit)))
        .map(|i| i.to_string())
        .collect();
    Ok(BooksNow {
        books,
        edges,
        unaccounted,
    })
}

/// The units whose consumer has nothing pending or unacknowledged, with the last stream sequence it
/// delivered.
async fn idle_readers(target: &Target) -> Result<Vec<(String, u64)>, OpsError> {
    let stream = target.stream().await?;
    let mut idle = Vec::new();
    for config in &target.layout.units {
        let Some(input) = &config.input else { continue };
        match stream.consumer_info(&input.durable).await {
            Ok(info) if info.num_pending == 0 && info.num_ack_pending == 0 => {
                idle.push((config.unit.clone(), info.delivered.stream_sequence));
            }
            Ok(_) => {}
            Err(e) => tracing::debug!("cannot read consumer {}: {e}", input.durable),
        }
    }
    Ok(idle)
}

/// The edges as a table: stored, taken in, and what is on its way while the edge is not settled.
pub fn render_edges(edges: &[EdgeNow]) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let width = edges
        .iter()
        .map(|e| e.edge.name().chars().count())
        .max()
        .unwrap_or(4)
        .max(4);
    let _ = writeln!(
        out,
        "  {:<width$}  {:>12} {:>12} {:>12}",
        "edge", "stored", "taken in", "on its way"
    );
    for e in edges {
        let on_its_way = if e.settled {
            "-".to_string()
        } else {
            crate::text::thousands(e.on_its_way())
        };
        let _ = writeln!(
            out,
            "  {:<width$}  {:>12} {:>12} {:>12}",
            e.edge.name(),
            crate::text::thousands(e.edge.out),
            crate::text::thousands(e.edge.received),
            on_its_way,
        );
    }
    out
}

/// The edges as a table, and what does not balance.
pub fn render(now: &BooksNow) -> String {
    use std::fmt::Write as _;
    let mut out = render_edges(&now.edges);
    let problems = now.problems();
    if problems.is_empty() {
        let _ = writeln!(
            out,
            "\n  The books balance: every item stored on a settled edge was taken in once."
        );
    } else {
        let _ = writeln!(out, "\n  The books do not balance:");
        for p in problems {
            let _ = writeln!(out, "    {p}");
        }
    }
    out
}
