//! The Prometheus exposition formats every wasmesh process serves on
//! `/metrics`: OpenMetrics text when the scraper asks for it (Prometheus
//! does), else the Prometheus text format 0.0.4 (what `curl` and `promtool
//! check metrics` read). prometheus-client writes OpenMetrics only; this
//! turns its output into 0.0.4.

/// The content type of the Prometheus text format 0.0.4.
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The content type of OpenMetrics text.
pub const OPENMETRICS_TEXT: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Whether `Accept` header values ask for OpenMetrics.
pub fn wants_openmetrics<'a>(accept: impl IntoIterator<Item = &'a str>) -> bool {
    accept
        .into_iter()
        .any(|v| v.contains("application/openmetrics-text"))
}

/// OpenMetrics text → Prometheus text 0.0.4. A family is `# HELP`, `# TYPE`
/// (and `# UNIT`), then its samples: a counter family's comments are
/// renamed to its samples' `_total` name, an info family's to `_info` and
/// typed `gauge`, `unknown` becomes `untyped`.
pub fn to_prometheus_text(open: &str) -> String {
    let mut out = String::with_capacity(open.len());
    let mut help: Option<(&str, &str)> = None;
    for line in open.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            help = Some(rest.split_once(' ').unwrap_or((rest, "")));
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let (suffix, kind) = match kind {
                "counter" => ("_total", "counter"),
                "info" => ("_info", "gauge"),
                "unknown" => ("", "untyped"),
                k => ("", k),
            };
            if let Some((_, text)) = help.take() {
                out.push_str(&format!("# HELP {name}{suffix} {text}\n"));
            }
            out.push_str(&format!("# TYPE {name}{suffix} {kind}\n"));
        } else if line.starts_with("# UNIT ") || line == "# EOF" {
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_info_and_unknown_become_0_0_4() {
        let open = "# HELP a_requests Requests.\n# TYPE a_requests counter\na_requests_total{x=\"1\"} 3\n# HELP b Build.\n# TYPE b info\nb_info{v=\"1\"} 1\n# HELP c_seconds Time.\n# TYPE c_seconds gauge\n# UNIT c_seconds seconds\nc_seconds 2.5\n# EOF\n";
        assert_eq!(
            to_prometheus_text(open),
            "# HELP a_requests_total Requests.\n# TYPE a_requests_total counter\na_requests_total{x=\"1\"} 3\n# HELP b_info Build.\n# TYPE b_info gauge\nb_info{v=\"1\"} 1\n# HELP c_seconds Time.\n# TYPE c_seconds gauge\nc_seconds 2.5\n"
        );
    }
}
