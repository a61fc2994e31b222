//! The topology as a picture: Mermaid and DOT text for documents and tools, and an SVG of its own
//! with the last run's counts on the edges. Pure: a topology (and counts) in, text out.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use switchyard_crds::topology::{Topology, Unit, UnitKind};

use crate::text::thousands;

/// What a unit took in and put out, as the last run counted it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub processed: u64,
    pub published: u64,
    pub dead_lettered: u64,
}

fn kind(unit: &Unit) -> &'static str {
    match unit.kind {
        UnitKind::Source(_) => "source",
        UnitKind::Sink(_) => "sink",
        // It waits for its branches, whatever scales it.
        UnitKind::Process if unit.join.is_some() => "join",
        UnitKind::Process if unit.switcher.is_some() => "switcher",
        UnitKind::Process => "group",
    }
}

/// The unit's steps, as one line (`wash → dry`).
fn steps(unit: &Unit) -> String {
    unit.steps
        .iter()
        .map(|s| s.path.rsplit(" > ").next().unwrap_or(&s.path).to_string())
        .collect::<Vec<_>>()
        .join(" → ")
}

fn label(unit: &Unit) -> String {
    let mut label = format!("{} ({})", unit.name, kind(unit));
    if let Some(s) = &unit.switcher {
        let _ = write!(label, " {}..{}", s.min_replicas, s.max_replicas);
    }
    label
}

/// What crossed the edge out of `from`: a source's items, or a unit's outputs.
fn edge_count(topology: &Topology, from: &str, counts: &BTreeMap<String, Counts>) -> Option<u64> {
    let unit = topology.unit(from)?;
    let c = counts.get(from)?;
    Some(match unit.kind {
        UnitKind::Source(_) => c.processed,
        _ => c.published,
    })
}

/// Mermaid's `flowchart`: sources as stadiums, sinks as cylinders, switchers as double boxes.
pub fn mermaid(topology: &Topology, counts: &BTreeMap<String, Counts>) -> String {
    let mut out = String::from("flowchart LR\n");
    for unit in &topology.units {
        let text = mermaid_text(&label(unit), &steps(unit));
        let node = match unit.kind {
            UnitKind::Source(_) => format!("([\"{text}\"])"),
            UnitKind::Sink(_) => format!("[(\"{text}\")]"),
            UnitKind::Process if unit.switcher.is_some() => format!("[[\"{text}\"]]"),
            UnitKind::Process => format!("[\"{text}\"]"),
        };
        let _ = writeln!(out, "    {}{node}", node_id(&unit.name));
    }
    for unit in &topology.units {
        for input in &unit.inputs {
            let arrow = match edge_count(topology, input, counts) {
                Some(n) => format!("-- \"{n}\" -->"),
                None => "-->".to_string(),
            };
            let _ = writeln!(
                out,
                "    {} {arrow} {}",
                node_id(input),
                node_id(&unit.name)
            );
        }
    }
    out
}

fn mermaid_text(label: &str, steps: &str) -> String {
    let escape = |s: &str| s.replace('"', "#quot;");
    if steps.is_empty() {
        escape(label)
    } else {
        format!("{}<br/>{}", escape(label), escape(steps))
    }
}

/// Mermaid and DOT ids: unit names may hold `-`, which neither takes bare.
fn node_id(name: &str) -> String {
    format!("u_{}", name.replace('-', "_"))
}

/// Graphviz DOT.
pub fn dot(topology: &Topology, counts: &BTreeMap<String, Counts>) -> String {
    let mut out = format!(
        "digraph \"{}\" {{\n    rankdir=LR;\n    node [fontname=\"Helvetica\", fontsize=11];\n",
        topology.pipeline
    );
    for unit in &topology.units {
        let shape = match unit.kind {
            UnitKind::Source(_) => "shape=box, style=rounded",
            UnitKind::Sink(_) => "shape=cylinder",
            UnitKind::Process if unit.switcher.is_some() => "shape=box, peripheries=2",
            UnitKind::Process => "shape=box",
        };
        let steps = steps(unit);
        let text = if steps.is_empty() {
            label(unit)
        } else {
            format!("{}\\n{steps}", label(unit))
        };
        let _ = writeln!(
            out,
            "    \"{}\" [label=\"{}\", {shape}];",
            unit.name,
            text.replace('"', "\\\"")
        );
    }
    for unit in &topology.units {
        for input in &unit.inputs {
            let label = edge_count(topology, input, counts)
                .map_or(String::new(), |n| format!(" [label=\"{n}\"]"));
            let _ = writeln!(out, "    \"{input}\" -> \"{}\"{label};", unit.name);
        }
    }
    out.push_str("}\n");
    out
}

const BOX_W: f64 = 190.0;
const BOX_H: f64 = 48.0;
const GAP_X: f64 = 90.0;
const GAP_Y: f64 = 28.0;
const MARGIN: f64 = 20.0;

/// Each unit's column: one more than its furthest input.
fn columns(topology: &Topology) -> BTreeMap<String, usize> {
    let mut column = BTreeMap::new();
    for unit in topology.topological_order() {
        let c = unit
            .inputs
            .iter()
            .filter_map(|i| column.get(i).copied())
            .max()
            .map_or(0, |c: usize| c + 1);
        column.insert(unit.name.clone(), c);
    }
    column
}

/// An SVG drawing, with the counts on the edges (and dead letters under a unit) when given.
pub fn svg(topology: &Topology, counts: &BTreeMap<String, Counts>) -> String {
    let column = columns(topology);
    let mut rows: BTreeMap<usize, usize> = BTreeMap::new();
    let mut place: BTreeMap<&str, (f64, f64)> = BTreeMap::new();
    for unit in &topology.units {
        let c = column.get(&unit.name).copied().unwrap_or(0);
        let r = rows.entry(c).or_insert(0);
        let x = MARGIN + c as f64 * (BOX_W + GAP_X);
        let y = MARGIN + *r as f64 * (BOX_H + GAP_Y);
        *r += 1;
        place.insert(&unit.name, (x, y));
    }
    let width = MARGIN * 2.0 + (rows.len().max(1) as f64) * (BOX_W + GAP_X) - GAP_X;
    let height =
        MARGIN * 2.0 + (rows.values().copied().max().unwrap_or(1) as f64) * (BOX_H + GAP_Y) - GAP_Y
            + 14.0;
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width:.0}\" height=\"{height:.0}\" viewBox=\"0 0 {width:.0} {height:.0}\" font-family=\"Helvetica, Arial, sans-serif\" font-size=\"12\">\n"
    );
    out.push_str("  <defs><marker id=\"arrow\" viewBox=\"0 0 10 10\" refX=\"10\" refY=\"5\" markerWidth=\"7\" markerHeight=\"7\" orient=\"auto-start-reverse\"><path d=\"M 0 0 L 10 5 L 0 10 z\" fill=\"#555\"/></marker></defs>\n");
    let _ = writeln!(out, "  <title>{}</title>", xml(&topology.pipeline));
    svg_edges(&mut out, topology, counts, &place);
    for unit in &topology.units {
        if let Some(&at) = place.get(unit.name.as_str()) {
            svg_box(&mut out, unit, at, counts.get(&unit.name));
        }
    }
    out.push_str("</svg>\n");
    out
}

/// The arrows from each unit's inputs to it, each with the items that crossed it.
fn svg_edges(
    out: &mut String,
    topology: &Topology,
    counts: &BTreeMap<String, Counts>,
    place: &BTreeMap<&str, (f64, f64)>,
) {
    for unit in &topology.units {
        let Some(&(x2, y2)) = place.get(unit.name.as_str()) else {
            continue;
        };
        for input in &unit.inputs {
            let Some(&(x1, y1)) = place.get(input.as_str()) else {
                continue;
            };
            let (ax, ay) = (x1 + BOX_W, y1 + BOX_H / 2.0);
            let (bx, by) = (x2, y2 + BOX_H / 2.0);
            let _ = writeln!(
                out,
                "  <path d=\"M {ax:.1} {ay:.1} C {:.1} {ay:.1}, {:.1} {by:.1}, {bx:.1} {by:.1}\" fill=\"none\" stroke=\"#555\" stroke-width=\"1.5\" marker-end=\"url(#arrow)\"/>",
                ax + GAP_X / 2.0,
                bx - GAP_X / 2.0
            );
            if let Some(n) = edge_count(topology, input, counts) {
                let _ = writeln!(
                    out,
                    "  <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" fill=\"#222\">{}</text>",
                    (ax + bx) / 2.0,
                    (ay + by) / 2.0 - 5.0,
                    thousands(n)
                );
            }
        }
    }
}

/// A unit's box at `(x, y)`: its kind by colour (a switcher doubled), its name and steps, and
/// its dead letters below it.
fn svg_box(out: &mut String, unit: &Unit, (x, y): (f64, f64), counts: Option<&Counts>) {
    let (fill, rx) = match unit.kind {
        UnitKind::Source(_) => ("#e3f2fd", 20),
        UnitKind::Sink(_) => ("#e8f5e9", 4),
        UnitKind::Process if unit.switcher.is_some() => ("#fff3e0", 4),
        UnitKind::Process => ("#f5f5f5", 4),
    };
    let _ = writeln!(
        out,
        "  <rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{BOX_W}\" height=\"{BOX_H}\" rx=\"{rx}\" fill=\"{fill}\" stroke=\"#333\"/>"
    );
    if unit.switcher.is_some() {
        let _ = writeln!(
            out,
            "  <rect x=\"{:.1}\" y=\"{:.1}\" width=\"{}\" height=\"{}\" rx=\"3\" fill=\"none\" stroke=\"#333\"/>",
            x + 3.0,
            y + 3.0,
            BOX_W - 6.0,
            BOX_H - 6.0
        );
    }
    let steps = steps(unit);
    // Centred in its box when it is alone, above the steps otherwise.
    let title_y = if steps.is_empty() { y + 28.0 } else { y + 20.0 };
    let _ = writeln!(
        out,
        "  <text x=\"{:.1}\" y=\"{title_y:.1}\" text-anchor=\"middle\" font-weight=\"bold\">{}</text>",
        x + BOX_W / 2.0,
        xml(&label(unit))
    );
    if !steps.is_empty() {
        let _ = writeln!(
            out,
            "  <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" fill=\"#444\">{}</text>",
            x + BOX_W / 2.0,
            y + 37.0,
            xml(&steps)
        );
    }
    if let Some(c) = counts.filter(|c| c.dead_lettered > 0) {
        let _ = writeln!(
            out,
            "  <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" fill=\"#b71c1c\">{} dead-lettered</text>",
            x + BOX_W / 2.0,
            y + BOX_H + 13.0,
            thousands(c.dead_lettered)
        );
    }
}

fn xml(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn laundry() -> Topology {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../examples/laundry.yaml"
        ))
        .unwrap();
        let pipeline: switchyard_crds::Pipeline = serde_norway::from_str(&text).unwrap();
        switchyard_crds::validate::analyze(&pipeline).unwrap()
    }

    #[test]
    fn mermaid_and_dot_name_every_unit_and_edge() {
        let topology = laundry();
        let edges: usize = topology.units.iter().map(|u| u.inputs.len()).sum();
        let m = mermaid(&topology, &BTreeMap::new());
        assert!(m.starts_with("flowchart LR\n"));
        assert_eq!(m.matches("-->").count(), edges, "{m}");
        let d = dot(&topology, &BTreeMap::new());
        assert_eq!(d.matches(" -> ").count(), edges, "{d}");
        for unit in &topology.units {
            assert!(m.contains(&node_id(&unit.name)), "{m}");
            assert!(d.contains(&format!("\"{}\" [label=", unit.name)), "{d}");
        }
    }

    #[test]
    fn a_join_is_drawn_as_one() {
        let pipeline = switchyard_crds::validate::parse_pipeline(include_str!(
            "../../examples/fan-out-join.yaml"
        ))
        .unwrap();
        let topology = switchyard_crds::validate::analyze(&pipeline).unwrap();
        let m = mermaid(&topology, &BTreeMap::new());
        assert!(m.contains("answer (join)"), "{m}");
        for branch in ["price", "stock", "shipping"] {
            assert!(
                m.contains(&format!("{} --> {}", node_id(branch), node_id("answer"))),
                "{m}"
            );
        }
    }

    #[test]
    fn counts_go_on_the_edges_out_of_a_unit() {
        let topology = laundry();
        let source = topology
            .units
            .iter()
            .find(|u| matches!(u.kind, UnitKind::Source(_)))
            .unwrap();
        let mut counts = BTreeMap::new();
        counts.insert(
            source.name.clone(),
            Counts {
                processed: 12_345,
                published: 0,
                dead_lettered: 0,
            },
        );
        let readers = topology.readers_of(&source.name).count();
        assert!(readers > 0);
        assert_eq!(
            mermaid(&topology, &counts)
                .matches("-- \"12345\" -->")
                .count(),
            readers
        );
        let svg = svg(&topology, &counts);
        assert_eq!(svg.matches(">12,345</text>").count(), readers, "{svg}");
        assert_eq!(
            svg.matches("<rect").count() - svg.matches("rx=\"3\"").count(),
            topology.units.len()
        );
        assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
        assert!(svg.trim_end().ends_with("</svg>"));
    }

    #[test]
    fn text_is_escaped_for_xml_and_thousands_are_grouped() {
        assert_eq!(xml("a<b & \"c\">"), "a&lt;b &amp; &quot;c&quot;&gt;");
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(thousands(12), "12");
    }
}
