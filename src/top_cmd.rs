//! `wasmesh top`: the mesh's service edges in a terminal — who calls whom,
//! requests a second, the share failing, p50 and p99, and the split by
//! subset — refreshed in place; `-o json` prints one snapshot. The numbers
//! come from control (`Status.Top`), which sums the counters its proxies
//! report on their discovery streams.

use std::io::{IsTerminal as _, Write as _};
use std::time::Duration;

use wasmesh_api::proto;

use crate::control_cmd::{Failure, Target};

/// How `top` prints.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum TopFormat {
    /// A table refreshed in place.
    Table,
    /// One snapshot, JSON.
    Json,
}

/// `wasmesh top [-o json] [--window D] [--interval D] [--once]`.
pub async fn top(
    target: &Target,
    format: TopFormat,
    window: Duration,
    interval: Duration,
    once: bool,
) -> Result<(), Failure> {
    let mut c = target.connect().await?;
    let request = proto::TopRequest {
        window_ms: window.as_millis() as u64,
    };
    if let TopFormat::Json = format {
        let r = c.status.top(request).await?.into_inner();
        println!(
            "{}",
            serde_json::to_string_pretty(&json(&r)).unwrap_or_default()
        );
        return Ok(());
    }
    let live = std::io::stdout().is_terminal() && !once;
    loop {
        let r = c.status.top(request).await?.into_inner();
        let mut out = String::new();
        if live {
            // Home, then clear: the table is redrawn where it was.
            out.push_str("\x1b[H\x1b[J");
        }
        out.push_str(&format!(
            "wasmesh top: {} edges, rates over the last {}s{}\n\n",
            r.edges.len(),
            r.window_ms / 1000,
            if live { " (Ctrl-C to quit)" } else { "" }
        ));
        out.push_str(&table(&r));
        let mut stdout = std::io::stdout().lock();
        let _ = stdout.write_all(out.as_bytes());
        let _ = stdout.flush();
        drop(stdout);
        if once {
            return Ok(());
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
        if !live {
            println!();
        }
    }
}

fn window_json(w: Option<&proto::EdgeWindow>) -> serde_json::Value {
    let w = w.cloned().unwrap_or_default();
    serde_json::json!({
        "requests": w.requests,
        "errors": w.errors,
        "rps": w.rps,
        "error_ratio": w.error_ratio,
        "p50_ms": w.p50_ms,
        "p99_ms": w.p99_ms,
    })
}

/// The snapshot as `-o json` prints it.
fn json(r: &proto::TopResponse) -> serde_json::Value {
    let edges: Vec<serde_json::Value> = r
        .edges
        .iter()
        .map(|e| {
            let subsets: Vec<serde_json::Value> = e
                .subsets
                .iter()
                .map(|s| {
                    serde_json::json!({
                        "subset": s.name,
                        "requests": s.requests,
                        "errors": s.errors,
                        "share": s.share,
                        "window": window_json(s.window.as_ref()),
                    })
                })
                .collect();
            serde_json::json!({
                "source": e.source,
                "destination": e.destination,
                "reporter": e.reporter,
                "requests": e.requests,
                "errors": e.errors,
                "window": window_json(e.window.as_ref()),
                "subsets": subsets,
            })
        })
        .collect();
    serde_json::json!({ "window_s": r.window_ms as f64 / 1000.0, "edges": edges })
}

fn millis(v: Option<f64>) -> String {
    match v {
        None => "-".into(),
        Some(ms) if ms < 10.0 => format!("{ms:.2}ms"),
        Some(ms) if ms < 1000.0 => format!("{ms:.1}ms"),
        Some(ms) => format!("{:.2}s", ms / 1000.0),
    }
}

fn row(cells: [String; 9]) -> Vec<String> {
    cells.into()
}

fn cells(w: Option<&proto::EdgeWindow>) -> [String; 4] {
    let w = w.cloned().unwrap_or_default();
    [
        format!("{:.1}", w.rps),
        if w.requests == 0 {
            "-".into()
        } else {
            format!("{:.1}%", w.error_ratio * 100.0)
        },
        millis(w.p50_ms),
        millis(w.p99_ms),
    ]
}

/// The table: an edge's line, then one per subset when it has several (or
/// one with a name).
fn table(r: &proto::TopResponse) -> String {
    if r.edges.is_empty() {
        return "no traffic reported yet (proxies report every 2s while they serve)\n".into();
    }
    let mut rows = vec![row([
        "SOURCE",
        "DESTINATION",
        "SUBSET",
        "SHARE",
        "RPS",
        "ERRORS",
        "P50",
        "P99",
        "REQUESTS",
    ]
    .map(String::from))];
    for e in &r.edges {
        let [rps, err, p50, p99] = cells(e.window.as_ref());
        rows.push(row([
            e.source.clone(),
            e.destination.clone(),
            String::new(),
            String::new(),
            rps,
            err,
            p50,
            p99,
            e.requests.to_string(),
        ]));
        let named = e.subsets.iter().any(|s| !s.name.is_empty());
        if e.subsets.len() > 1 || named {
            for s in &e.subsets {
                let [rps, err, p50, p99] = cells(s.window.as_ref());
                rows.push(row([
                    String::new(),
                    String::new(),
                    if s.name.is_empty() {
                        "?".into()
                    } else {
                        s.name.clone()
                    },
                    format!("{:.1}%", s.share * 100.0),
                    rps,
                    err,
                    p50,
                    p99,
                    s.requests.to_string(),
                ]));
            }
        }
    }
    let widths: Vec<usize> = (0..9)
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(i, (c, w))| {
                if i < 3 {
                    format!("{c:<w$}")
                } else {
                    format!("{c:>w$}")
                }
            })
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_splits_an_edge_by_subset() {
        let w = |requests, errors, p50| proto::EdgeWindow {
            requests,
            errors,
            rps: requests as f64 / 10.0,
            error_ratio: errors as f64 / requests as f64,
            p50_ms: Some(p50),
            p99_ms: Some(p50 * 4.0),
        };
        let r = proto::TopResponse {
            window_ms: 10_000,
            edges: vec![proto::Edge {
                source: "productpage".into(),
                destination: "reviews".into(),
                reporter: "source".into(),
                requests: 100,
                errors: 5,
                window: Some(w(100, 5, 1.5)),
                subsets: vec![
                    proto::EdgeSubset {
                        name: "v1".into(),
                        requests: 75,
                        errors: 0,
                        share: 0.75,
                        window: Some(w(75, 0, 1.0)),
                    },
                    proto::EdgeSubset {
                        name: "v2".into(),
                        requests: 25,
                        errors: 5,
                        share: 0.25,
                        window: Some(w(25, 5, 2500.0)),
                    },
                ],
            }],
        };
        let t = table(&r);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 4, "{t}");
        assert!(lines[0].starts_with("SOURCE"), "{t}");
        assert!(lines[1].starts_with("productpage  reviews"), "{t}");
        assert!(
            lines[1].contains("5.0%") && lines[1].ends_with("100"),
            "{t}"
        );
        assert!(lines[2].contains("v1") && lines[2].contains("75.0%"), "{t}");
        assert!(
            lines[3].contains("20.0%") && lines[3].contains("2.50s"),
            "{t}"
        );
        let j = json(&r);
        assert_eq!(j["edges"][0]["subsets"][1]["errors"], 5);
        assert_eq!(j["window_s"], 10.0);
    }
}
